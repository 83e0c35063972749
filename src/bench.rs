//! The speed harness behind `bench`: one training step (layer, a `Linear(H, 10)` head on every
//! step's output through [`linear_per_step`], as the runner's model applies it, mean as loss,
//! backward; no optimiser step) and one forward pass, timed after
//! warm-up as the median and spread of several repeats.

use std::time::Instant;

use burn::module::{AutodiffModule, Module};
use burn::nn::{GruConfig, Linear, LinearConfig, LstmConfig};
use burn::tensor::{backend::AutodiffBackend, Distribution, Tensor};
use serde::Serialize;

use crate::cell::{AnyCellConfig, CellConfig};
use crate::layer::linear_per_step;
use crate::layer::RnnLayerConfig;
use crate::ops::RnnBackend;

/// The shape of one benchmark.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct BenchShape {
    /// Sequences per batch.
    pub batch: usize,
    /// Steps per sequence.
    pub seq_len: usize,
    /// Input width.
    pub input: usize,
    /// Hidden width.
    pub hidden: usize,
    /// Stacked layers.
    pub layers: usize,
}

/// Timings of one model at one shape.
#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    /// Cell name (`burn-lstm`, `burn-gru` for burn's own modules).
    pub cell: String,
    /// Sequences per batch.
    pub batch: usize,
    /// Steps per sequence.
    pub seq_len: usize,
    /// Input width.
    pub input: usize,
    /// Hidden width.
    pub hidden: usize,
    /// Stacked layers.
    pub layers: usize,
    /// Worker threads.
    pub threads: usize,
    /// The first (untimed warm-up) training step, ms: on GPU backends it includes compiling
    /// the step's kernels, i.e. the start-up cost.
    pub first_train_step_ms: f64,
    /// Median training step (forward + backward), ms.
    pub train_step_ms: f64,
    /// Smallest and largest training step, ms.
    pub train_step_range_ms: (f64, f64),
    /// Median forward pass, ms.
    pub forward_ms: f64,
    /// Sequence steps per second in training (`batch · seq_len / train step`).
    pub train_steps_per_s: f64,
    /// The backend.
    pub backend: String,
}

/// Timing settings.
#[derive(Debug, Clone, Copy)]
pub struct BenchSettings {
    /// Untimed runs first.
    pub warmup: usize,
    /// Timed runs.
    pub repeats: usize,
    /// Worker threads (recorded only; the caller sets up the pool).
    pub threads: usize,
}

fn median_and_range(mut samples: Vec<f64>) -> (f64, (f64, f64)) {
    samples.sort_by(f64::total_cmp);
    let n = samples.len();
    let median = if n % 2 == 1 {
        samples[n / 2]
    } else {
        (samples[n / 2 - 1] + samples[n / 2]) / 2.0
    };
    (median, (samples[0], samples[n - 1]))
}

/// Milliseconds `run` takes.
fn elapsed_ms(run: &mut impl FnMut()) -> f64 {
    let start = Instant::now();
    run();
    start.elapsed().as_secs_f64() * 1e3
}

/// The first warm-up run's time, then the median and range of the timed runs.
fn time_ms(settings: BenchSettings, mut run: impl FnMut()) -> (f64, f64, (f64, f64)) {
    let first = elapsed_ms(&mut run);
    for _ in 1..settings.warmup {
        run();
    }
    let samples = (0..settings.repeats.max(1))
        .map(|_| elapsed_ms(&mut run))
        .collect();
    let (median, range) = median_and_range(samples);
    (first, median, range)
}

/// Times any sequence model given as forward closures `[B, T, I] -> [B, T, H]`: `forward`
/// for training (autodiff), `infer` for the forward pass (the inner backend, no graph).
fn bench_model<B: AutodiffBackend + RnnBackend>(
    cell: &str,
    shape: BenchShape,
    settings: BenchSettings,
    forward: impl Fn(Tensor<B, 3>) -> Tensor<B, 3>,
    infer: impl Fn(Tensor<B::InnerBackend, 3>) -> Tensor<B::InnerBackend, 3>,
    head: &Linear<B>,
    backend: &str,
) -> BenchResult {
    let device = head.devices()[0].clone();
    let input = Tensor::<B, 3>::random(
        [shape.batch, shape.seq_len, shape.input],
        Distribution::Default,
        &device,
    );
    let (first_train, train, range) = time_ms(settings, || {
        let loss = linear_per_step(head, forward(input.clone())).mean();
        let grads = loss.backward();
        // Reading a value waits for asynchronous backends to finish the step.
        let _ = head
            .weight
            .val()
            .grad(&grads)
            .map(|g| g.sum().into_scalar());
    });
    let inner_input = input.clone().inner();
    let (_, forward_ms, _) = time_ms(settings, || {
        let out = infer(inner_input.clone());
        let _ = out.sum().into_scalar();
    });
    BenchResult {
        cell: cell.to_string(),
        batch: shape.batch,
        seq_len: shape.seq_len,
        input: shape.input,
        hidden: shape.hidden,
        layers: shape.layers,
        threads: settings.threads,
        first_train_step_ms: first_train,
        train_step_ms: train,
        train_step_range_ms: range,
        forward_ms,
        train_steps_per_s: (shape.batch * shape.seq_len) as f64 / (train / 1e3),
        backend: backend.to_string(),
    }
}

/// Benchmarks one zoo cell by name.
pub fn bench_cell<B: AutodiffBackend + RnnBackend>(
    name: &str,
    shape: BenchShape,
    settings: BenchSettings,
    device: &B::Device,
    backend: &str,
) -> Result<BenchResult, String>
where
    B::InnerBackend: RnnBackend,
{
    let cell = AnyCellConfig::named(name, shape.input, shape.hidden)?;
    let layer = RnnLayerConfig::new(cell)
        .with_num_layers(shape.layers)
        .init::<B>(device);
    let head = LinearConfig::new(shape.hidden, 10).init(device);
    let inner = layer.valid();
    Ok(bench_model(
        name,
        shape,
        settings,
        |x| layer.forward(x, None).0,
        |x| inner.forward(x, None).0,
        &head,
        backend,
    ))
}

/// Benchmarks burn's own `nn::Lstm` (`burn-lstm`) or `nn::Gru` (`burn-gru`), one layer.
pub fn bench_burn_baseline<B: AutodiffBackend + RnnBackend>(
    which: &str,
    shape: BenchShape,
    settings: BenchSettings,
    device: &B::Device,
    backend: &str,
) -> Result<BenchResult, String> {
    let head = LinearConfig::new(shape.hidden, 10).init(device);
    match which {
        "burn-lstm" => {
            let lstm = LstmConfig::new(shape.input, shape.hidden, true).init::<B>(device);
            let inner = lstm.valid();
            Ok(bench_model(
                which,
                shape,
                settings,
                |x| lstm.forward(x, None).0,
                |x| inner.forward(x, None).0,
                &head,
                backend,
            ))
        }
        "burn-gru" => {
            let gru = GruConfig::new(shape.input, shape.hidden, true).init::<B>(device);
            let inner = gru.valid();
            Ok(bench_model(
                which,
                shape,
                settings,
                |x| gru.forward(x, None),
                |x| inner.forward(x, None),
                &head,
                backend,
            ))
        }
        other => Err(format!("unknown baseline '{other}'")),
    }
}

/// The names `--cell all` runs: every zoo cell, then burn's own LSTM and GRU.
pub fn all_names() -> Vec<String> {
    let mut names: Vec<String> = AnyCellConfig::names()
        .iter()
        .map(|s| s.to_string())
        .collect();
    names.push("burn-lstm".into());
    names.push("burn-gru".into());
    names
}
