//! The fused SRU kernel (`ops::cube`) on the compiled-in GPU backend (`cuda`, else `wgpu`)
//! against the plain tensor path on the same backend and against the CPU (burn-ndarray) op:
//! outputs and every gradient, masked or not, in both directions, with and without `tanh`. With `wgpu` it runs on any Vulkan device;
//! CI uses Mesa's software one (lavapipe), so the shapes are small. (`check`, the comparison
//! helpers, comes with the default `ndarray`.)
#![cfg(all(any(feature = "wgpu", feature = "cuda"), feature = "ndarray"))]

use burn::backend::{Autodiff, NdArray};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, TensorData};
use rnn_zoo::cell::sru::SruKernel;
use rnn_zoo::check::{gradients_of, max_abs_diff};
use rnn_zoo::ops::{self, Recurrence, RecurrencePath};
use rnn_zoo::prelude::*;

type B = Autodiff<rnn_zoo::backend::DefaultBackend>;
/// The CPU reference backend.
type Cpu = Autodiff<NdArray>;

/// The f32 tolerance the issue sets for the fused kernel against the plain path.
const TOLERANCE: f64 = 1e-4;

/// Deterministic values in [-1, 1], different for each `seed`, on backend `X`.
fn tensor_on<X: AutodiffBackend, const D: usize>(dims: [usize; D], seed: u64) -> Tensor<X, D> {
    let n: usize = dims.iter().product();
    let values: Vec<f32> = (0..n)
        .map(|i| ((i as f64 * 0.7311 + seed as f64 * 1.913).sin()) as f32)
        .collect();
    Tensor::from_data(TensorData::new(values, dims), &Default::default())
}

/// [`tensor_on`] the GPU backend.
fn tensor<const D: usize>(dims: [usize; D], seed: u64) -> Tensor<B, D> {
    tensor_on::<B, D>(dims, seed)
}

/// The time-major `[T, B]` mask of sequences of `lengths`.
fn mask_of<X: AutodiffBackend>(lengths: &[usize], len: usize) -> Tensor<X, 2> {
    let keep: Vec<f32> = (0..len)
        .flat_map(|t| lengths.iter().map(move |&l| if t < l { 1.0 } else { 0.0 }))
        .collect();
    Tensor::from_data(
        TensorData::new(keep, [len, lengths.len()]),
        &Default::default(),
    )
}

/// The op's output and the gradients of its three inputs under a weighted-sum loss, on
/// backend `X`.
fn op_results<X: AutodiffBackend + ops::RnnBackend>(
    path: RecurrencePath,
    kernel: &SruKernel,
    mask: Option<Tensor<X, 2>>,
    reverse: bool,
) -> [TensorData; 4] {
    let (len, batch, hidden) = (7, 3, kernel.hidden);
    let param_len: usize = kernel.param_shapes().iter().map(|[r, c]| r * c).sum();
    let xp = tensor_on::<X, 3>([len, batch, 4 * hidden], 1).require_grad();
    let state0 = tensor_on::<X, 2>([batch, hidden], 2).require_grad();
    let params = tensor_on::<X, 1>([param_len], 3).require_grad();
    let weights = tensor_on::<X, 3>([len, batch, 2 * hidden], 4);
    let output = ops::recurrence_with(
        path,
        kernel,
        xp.clone(),
        state0.clone(),
        params.clone(),
        mask,
        reverse,
    );
    let grads = (output.clone() * weights).sum().backward();
    [
        output.into_data(),
        xp.grad(&grads).expect("grad xp").into_data(),
        state0.grad(&grads).expect("grad state0").into_data(),
        params.grad(&grads).expect("grad params").into_data(),
    ]
}

/// The largest difference of each of the four results.
fn differences(a: &[TensorData; 4], b: &[TensorData; 4]) -> Vec<f64> {
    ["output", "grad xp", "grad state0", "grad params"]
        .iter()
        .zip(a.iter().zip(b))
        .map(|(what, (a, b))| max_abs_diff(what, a, b))
        .collect()
}

#[test]
fn fused_sru_op_matches_plain_path_and_cpu() {
    let lengths = [7, 2, 5];
    let mut failed = Vec::new();
    for use_tanh in [false, true] {
        for masked in [false, true] {
            for reverse in [false, true] {
                let kernel = SruKernel {
                    hidden: 5,
                    use_tanh,
                };
                let mask = masked.then(|| mask_of::<B>(&lengths, 7));
                let fused = op_results(RecurrencePath::Fused, &kernel, mask.clone(), reverse);
                let plain = op_results(RecurrencePath::Plain, &kernel, mask, reverse);
                let cpu_mask = masked.then(|| mask_of::<Cpu>(&lengths, 7));
                let cpu = op_results(RecurrencePath::Fused, &kernel, cpu_mask, reverse);
                let case = format!("use_tanh={use_tanh} masked={masked} reverse={reverse}");
                for (what, errors) in [
                    ("fused vs plain", differences(&fused, &plain)),
                    ("fused vs cpu", differences(&fused, &cpu)),
                    ("plain vs cpu", differences(&plain, &cpu)),
                ] {
                    let shown: Vec<String> = errors.iter().map(|e| format!("{e:.1e}")).collect();
                    println!("{case} {what}: output, grad xp, state0, params {shown:?}");
                    if errors.iter().any(|&e| e >= TOLERANCE) {
                        failed.push(format!("{case} {what}"));
                    }
                }
            }
        }
    }
    assert!(failed.is_empty(), "paths differ: {failed:?}");
}

/// Through the layer: a bidirectional, masked SRU layer reaches the kernel through `AnyCell`.
#[test]
fn fused_sru_layer_matches_plain_path() {
    let device = Default::default();
    let config =
        RnnLayerConfig::new(AnyCellConfig::named("sru", 3, 4).unwrap()).with_bidirectional(true);
    let layer = config.init::<B>(&device);
    let input = tensor([3, 6, 3], 5);
    let mask = Mask::from_lengths(&[6, 2, 4], 6, &device).unwrap();
    let run = |path: RecurrencePath| {
        let x = input.clone().require_grad();
        let (output, state) = layer.forward_with_path(x.clone(), Some(&mask), None, path);
        let mut loss = (output.clone() * output.clone()).sum();
        for c in &state.components {
            loss = loss + c.clone().sum();
        }
        let grads = loss.backward();
        let mut tensors = vec![output.into_data(), x.grad(&grads).unwrap().into_data()];
        tensors.extend(state.components.into_iter().map(|c| c.into_data()));
        tensors.extend(
            gradients_of(layer.clone(), &grads)
                .state_dict()
                .into_iter()
                .map(|(_, d)| d),
        );
        tensors
    };
    let (fused, plain) = (run(RecurrencePath::Fused), run(RecurrencePath::Plain));
    assert_eq!(fused.len(), plain.len());
    let worst = fused
        .iter()
        .zip(&plain)
        .map(|(a, b)| max_abs_diff("sru layer", a, b))
        .fold(0.0, f64::max);
    println!("sru layer: fused vs plain max abs difference {worst:.1e}");
    assert!(
        worst < TOLERANCE,
        "fused and plain paths differ by {worst:e}"
    );
}
