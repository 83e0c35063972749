//! The sequence layer over every cell: gradients of a stacked, bidirectional, masked layer;
//! masking against sequences run alone; the custom op against autodiff through plain steps;
//! the single-step API; shape and mask errors.

use burn::tensor::{Distribution, Tensor, TensorData};
use rnn_zoo::cell::cell_names;
use rnn_zoo::check::{
    finite_differences, gradients_of, layer_results, max_abs_diff, max_difference, values,
    F64Autodiff, F64,
};
use rnn_zoo::layer::MaskError;
use rnn_zoo::ops::{self, Recurrence, RecurrencePath};
use rnn_zoo::prelude::*;

fn config(name: &str, input: usize, hidden: usize) -> RnnLayerConfig<AnyCellConfig> {
    RnnLayerConfig::new(AnyCellConfig::named(name, input, hidden).unwrap())
}

#[test]
fn stacked_bidirectional_masked_layer_matches_finite_differences() {
    for name in cell_names() {
        let config = config(name, 3, 3)
            .with_num_layers(2)
            .with_bidirectional(true);
        let report = finite_differences(&config, 3, 4, Some(&[4, 2, 3]));
        println!(
            "finite differences {name:>14}: {} gradients, max relative error {:.1e}",
            report.compared, report.max_relative_error
        );
    }
}

#[test]
fn padded_batch_matches_each_sequence_alone() {
    type B = F64;
    let device = Default::default();
    let lengths = [6, 3, 1];
    for name in cell_names() {
        let layer = config(name, 4, 5)
            .with_num_layers(2)
            .with_bidirectional(true)
            .init::<B>(&device);
        let input = Tensor::<B, 3>::random([3, 6, 4], Distribution::Default, &device);
        let mask = Mask::from_lengths(&lengths, 6, &device).unwrap();
        let (output, state) = layer.forward_masked(input.clone(), &mask, None);
        for (b, &len) in lengths.iter().enumerate() {
            let alone = input.clone().narrow(0, b, 1).narrow(1, 0, len);
            let (out_alone, state_alone) = layer.forward(alone, None);
            let out_b = output.clone().narrow(0, b, 1);
            let err = max_abs_diff(
                "output",
                &out_b.clone().narrow(1, 0, len).into_data(),
                &out_alone.into_data(),
            );
            assert!(err < 1e-12, "{name}: row {b} output differs by {err:e}");
            if len < 6 {
                let padding = values(&out_b.narrow(1, len, 6 - len).into_data());
                assert!(
                    padding.iter().all(|&v| v == 0.0),
                    "{name}: padded outputs not zero"
                );
            }
            for (k, (batched, single)) in state
                .components
                .iter()
                .zip(&state_alone.components)
                .enumerate()
            {
                let err = max_abs_diff(
                    "state",
                    &batched.clone().narrow(1, b, 1).into_data(),
                    &single.clone().into_data(),
                );
                assert!(err < 1e-12, "{name}: row {b} state {k} differs by {err:e}");
            }
        }
    }
}

/// The hand-written backward of the recurrence op against autodiff through the kernel's plain
/// tensor steps (the fallback path), masked and not, in both directions.
#[test]
fn custom_op_matches_autodiff_through_steps() {
    type B = F64Autodiff;
    let device = Default::default();
    let (batch, len, hidden) = (3, 5, 4);
    for name in cell_names() {
        let cell = AnyCellConfig::named(name, 3, hidden)
            .unwrap()
            .init_cell::<B>(&device);
        let kernel = cell.kernel();
        let param_len: usize = kernel.param_shapes().iter().map(|[r, c]| r * c).sum();
        let random = |shape: Vec<usize>| {
            let n = shape.iter().product::<usize>();
            Tensor::<B, 1>::random([n], Distribution::Uniform(-1.0, 1.0), &device)
        };
        let xp = random(vec![len, batch, kernel.input_width()]).reshape([
            len,
            batch,
            kernel.input_width(),
        ]);
        let state0 =
            random(vec![batch, kernel.state_width()]).reshape([batch, kernel.state_width()]);
        let params = random(vec![param_len]);
        // The op's output is each step's output and state (saved values stay inside).
        let keep = kernel.output_width() + kernel.state_width();
        let weights = random(vec![len, batch, keep]).reshape([len, batch, keep]);
        let mask = rnn_zoo::layer::Mask::<B>::from_lengths(&[5, 2, 4], len, &device).unwrap();
        let mask_tm: Tensor<B, 2> = {
            let lengths = mask.lengths();
            let data: Vec<f64> = (0..len)
                .flat_map(|t| lengths.iter().map(move |&l| if t < l { 1.0 } else { 0.0 }))
                .collect();
            Tensor::from_data(TensorData::new(data, [len, batch]), &device)
        };
        for (reverse, masked) in [(false, true), (true, true), (false, false), (true, false)] {
            let run = |custom: bool| {
                let (xp, state0, params) = (
                    xp.clone().require_grad(),
                    state0.clone().require_grad(),
                    params.clone().require_grad(),
                );
                let path = if custom {
                    RecurrencePath::Fused
                } else {
                    RecurrencePath::Plain
                };
                // Unmasked, the CPU op may leave out output columns that are the state's first.
                let packed = ops::with_output_columns(
                    &kernel,
                    ops::recurrence_with(
                        path,
                        &kernel,
                        xp.clone(),
                        state0.clone(),
                        params.clone(),
                        masked.then(|| mask_tm.clone()),
                        reverse,
                    ),
                );
                let grads = (packed.clone() * weights.clone()).sum().backward();
                let grad = |t: &Tensor<B, 3>| t.grad(&grads).unwrap().into_data();
                (
                    packed.into_data(),
                    grad(&xp),
                    state0.grad(&grads).unwrap().into_data(),
                    params.grad(&grads).unwrap().into_data(),
                )
            };
            let (custom, plain) = (run(true), run(false));
            let errors = [
                max_abs_diff("forward", &custom.0, &plain.0),
                max_abs_diff("grad xp", &custom.1, &plain.1),
                max_abs_diff("grad state0", &custom.2, &plain.2),
                max_abs_diff("grad params", &custom.3, &plain.3),
            ];
            let worst = errors.iter().cloned().fold(0.0, f64::max);
            assert!(
                worst < 1e-10,
                "{name} reverse={reverse} masked={masked}: {errors:?}"
            );
        }
    }
}

#[test]
fn single_steps_match_the_sequence() {
    type B = F64;
    let device = Default::default();
    for name in cell_names() {
        let layer = config(name, 3, 4).with_num_layers(2).init::<B>(&device);
        let input = Tensor::<B, 3>::random([2, 5, 3], Distribution::Default, &device);
        let (output, final_state) = layer.forward(input.clone(), None);
        let mut state = None;
        for t in 0..5 {
            let (out, next) = layer.step(input.clone().narrow(1, t, 1).squeeze_dim(1), state);
            let expected = output.clone().narrow(1, t, 1).squeeze_dim::<2>(1);
            let err = max_abs_diff("step", &out.into_data(), &expected.into_data());
            assert!(err < 1e-12, "{name}: step {t} differs by {err:e}");
            state = Some(next);
        }
        for (a, b) in state
            .unwrap()
            .components
            .into_iter()
            .zip(final_state.components)
        {
            assert!(max_abs_diff("state", &a.into_data(), &b.into_data()) < 1e-12);
        }
    }
}

#[test]
#[should_panic(expected = "input has shape [2, 5, 4] but the layer expects [batch, T, 3]")]
fn wrong_input_width_names_both_shapes() {
    let layer = config("lstm", 3, 4).init::<F64>(&Default::default());
    layer.forward(Tensor::zeros([2, 5, 4], &Default::default()), None);
}

#[test]
#[should_panic(expected = "state 'c' has shape [1, 3, 4], expected [1, 2, 4]")]
fn wrong_state_shape_names_both_shapes() {
    let device = Default::default();
    let layer = config("lstm", 3, 4).init::<F64>(&device);
    let state = RnnState {
        components: vec![
            Tensor::zeros([1, 2, 4], &device),
            Tensor::zeros([1, 3, 4], &device),
        ],
    };
    layer.forward(Tensor::zeros([2, 5, 3], &device), Some(state));
}

#[test]
fn masks_must_be_prefixes() {
    let device = Default::default();
    let bools = Tensor::<F64, 2, burn::tensor::Bool>::from_data(
        TensorData::new(vec![true, false, true, true, false, false], [2, 3]),
        &device,
    );
    assert_eq!(
        Mask::from_bool(bools).unwrap_err(),
        MaskError::NotPrefix { row: 0, step: 2 }
    );
    assert!(matches!(
        Mask::<F64>::from_lengths(&[2, 4], 3, &device),
        Err(MaskError::TooLong {
            row: 1,
            length: 4,
            max: 3
        })
    ));
    let ok = Tensor::<F64, 2, burn::tensor::Bool>::from_data(
        TensorData::new(vec![true, true, true, false, false, false], [3, 2]),
        &device,
    );
    assert_eq!(Mask::from_bool(ok).unwrap().lengths(), &[2, 1, 0]);
}

/// The fused op against the plain path on a stacked, bidirectional, masked layer: outputs,
/// final states and the gradients of the input, the initial state and every parameter.
#[test]
fn fused_path_matches_plain_path_on_stacked_bidirectional_masked_layer() {
    for name in cell_names() {
        let config = config(name, 3, 4)
            .with_num_layers(2)
            .with_bidirectional(true);
        let worst = fused_minus_plain(&config);
        println!("fused vs plain {name:>14}: max abs difference {worst:.1e}");
    }
}

/// With recurrent dropout and zoneout, one noise draw for both paths.
#[test]
fn regularised_fused_path_matches_plain_path() {
    for name in cell_names() {
        let config = regularised(config(name, 3, 4).with_bidirectional(true));
        let worst = fused_minus_plain(&config);
        println!("regularised fused vs plain {name:>14}: max abs difference {worst:.1e}");
    }
}

/// The same over more batch rows than one of the CPU walk's blocks (64): each block reads its
/// own rows of the noise.
#[test]
fn regularised_fused_path_matches_plain_path_over_batch_blocks() {
    for name in ["sru", "lstm", "gru"] {
        let config = regularised(config(name, 3, 4));
        let worst = fused_minus_plain_over(&config, 130, 4);
        println!("regularised fused vs plain {name:>14}, 130 rows: max abs difference {worst:.1e}");
    }
}

#[test]
fn regularised_layer_matches_finite_differences() {
    for name in cell_names() {
        let config = regularised(config(name, 3, 3).with_bidirectional(true));
        let report = finite_differences(&config, 3, 4, Some(&[4, 2, 3]));
        println!(
            "regularised finite differences {name:>14}: {} gradients, max relative error {:.1e}",
            report.compared, report.max_relative_error
        );
    }
}

/// The fused op's backward takes the gradient of the outputs alone where the loss reads only
/// them, and the final state's node widens it where the loss reads the state too: with the
/// outputs, the final states or both in the loss, and masked or not, the gradients are the
/// plain path's. (The state here is not the output for the SRU and the LSTM's `c`.)
#[test]
fn gradients_match_the_plain_path_whether_the_loss_reads_outputs_or_states() {
    type B = F64Autodiff;
    let device = Default::default();
    let mask = Mask::from_lengths(&[5, 2, 4], 5, &device).unwrap();
    for name in ["sru", "lstm", "indrnn"] {
        let layer = config(name, 3, 4)
            .with_num_layers(2)
            .with_bidirectional(true)
            .init::<B>(&device);
        let input = Tensor::<B, 3>::random([3, 5, 3], Distribution::Default, &device);
        for (reads, mask) in [("outputs", None), ("states", None), ("both", Some(&mask))] {
            let gradients = |path| {
                let x = input.clone().require_grad();
                let (output, state) = layer.forward_with_path(x.clone(), mask, None, path);
                let outputs = (output.clone() * output).sum();
                let states = state
                    .components
                    .into_iter()
                    .map(|c| (c.clone() * c).sum())
                    .reduce(|a, b| a + b)
                    .expect("a state");
                let loss = match reads {
                    "outputs" => outputs,
                    "states" => states,
                    _ => outputs + states,
                };
                let grads = loss.backward();
                let mut found = vec![x.grad(&grads).expect("input gradient").into_data()];
                let params = gradients_of(layer.clone(), &grads).state_dict();
                found.extend(params.into_iter().map(|(_, d)| d));
                found
            };
            let fused = gradients(RecurrencePath::Fused);
            let worst = max_difference(name, &fused, &gradients(RecurrencePath::Plain));
            println!("{name:>6}, loss of the {reads}: max abs difference {worst:.1e}");
            assert!(
                worst < 1e-5,
                "{name} ({reads}): fused and plain differ by {worst:e}"
            );
        }
    }
}

/// A per-step head on the layer's outputs passes its gradient to the recurrence op in factors
/// on the fused path (`rnn_zoo::ops::head`): every gradient, of the layer's and the head's
/// parameters and of the input, matches the plain path, alone and beside other readers of the
/// outputs and states, masked or not, one layer or two, and with the head's weight frozen.
#[test]
fn gradients_through_a_per_step_head_match_the_plain_path() {
    type B = F64Autodiff;
    let device = Default::default();
    let mask = Mask::from_lengths(&[5, 2, 4], 5, &device).unwrap();
    let weights = Tensor::<B, 3>::random([3, 5, 2], Distribution::Default, &device);
    for name in cell_names() {
        for (layers, input_width) in [(1, 3), (2, 40)] {
            let layer = config(name, input_width, 4)
                .with_num_layers(layers)
                .init::<B>(&device);
            let head = burn::nn::LinearConfig::new(4, 2).init::<B>(&device);
            let input = Tensor::<B, 3>::random([3, 5, input_width], Distribution::Default, &device);
            let cases = [
                ("head", None, false),
                ("head", Some(&mask), false),
                ("head+outputs", None, false),
                ("head+states", Some(&mask), false),
                ("head, frozen", None, true),
            ];
            for (reads, mask, frozen) in cases {
                let head = match frozen {
                    true => burn::module::Module::no_grad(head.clone()),
                    false => head.clone(),
                };
                let gradients = |path| {
                    let x = input.clone().require_grad();
                    let (output, state) = layer.forward_with_path(x.clone(), mask, None, path);
                    let projected = rnn_zoo::layer::linear_per_step(&head, output.clone());
                    let mut loss = (projected * weights.clone()).sum();
                    if reads.contains("outputs") {
                        loss = loss + (output.clone() * output).sum();
                    }
                    if reads.contains("states") {
                        let c = state.components[0].clone();
                        loss = loss + (c.clone() * c).sum();
                    }
                    let grads = loss.backward();
                    let mut found = vec![x.grad(&grads).expect("input gradient").into_data()];
                    let params = gradients_of(layer.clone(), &grads).state_dict();
                    found.extend(params.into_iter().map(|(_, d)| d));
                    if !frozen {
                        let bias = head.bias.as_ref().expect("a bias").val();
                        found.push(head.weight.val().grad(&grads).unwrap().into_data());
                        found.push(bias.grad(&grads).unwrap().into_data());
                    }
                    found
                };
                let fused = gradients(RecurrencePath::Fused);
                let worst = max_difference(name, &fused, &gradients(RecurrencePath::Plain));
                assert!(
                    worst < 1e-5,
                    "{name}, {layers} layer(s), {reads}, masked {}: fused and plain differ by {worst:e}",
                    mask.is_some()
                );
            }
        }
    }
}

/// Recurrent dropout 0.4, zoneout 0.3.
fn regularised(config: RnnLayerConfig<AnyCellConfig>) -> RnnLayerConfig<AnyCellConfig> {
    config.with_recurrent_dropout(0.4).with_zoneout(0.3)
}

/// The largest difference between the fused and the plain path of a masked layer (f64, in
/// training mode): outputs, final states and every gradient. Panics above 1e-5.
fn fused_minus_plain(config: &RnnLayerConfig<AnyCellConfig>) -> f64 {
    fused_minus_plain_over(config, 3, 5)
}

/// [`fused_minus_plain`] over `batch` sequences of up to `len` steps.
fn fused_minus_plain_over(config: &RnnLayerConfig<AnyCellConfig>, batch: usize, len: usize) -> f64 {
    type B = F64Autodiff;
    let device = Default::default();
    let layer = config.init::<B>(&device);
    let input = Tensor::<B, 3>::random([batch, len, 3], Distribution::Default, &device);
    let state0 = layer.zero_state(batch, &device);
    let state0 = RnnState {
        components: state0.components.into_iter().map(|s| s + 0.3).collect(),
    };
    // Lengths len, 2, len − 1, len, 2, ...
    let lengths: Vec<usize> = (0..batch).map(|b| [len, 2, len - 1][b % 3]).collect();
    let mask = Mask::from_lengths(&lengths, len, &device).unwrap();
    let noise = layer.sample_noise(&input);
    let run = |path: RecurrencePath| {
        let state0 = Some(state0.clone());
        layer_results(
            &layer,
            input.clone(),
            Some(&mask),
            state0,
            noise.as_deref(),
            path,
        )
    };
    let name = config.cell.name();
    let worst = max_difference(
        name,
        &run(RecurrencePath::Fused),
        &run(RecurrencePath::Plain),
    );
    assert!(
        worst < 1e-5,
        "{name}: fused and plain paths differ by {worst:e}"
    );
    worst
}

/// The per-step head through the projection op gives what burn's `Linear::forward` gives:
/// output and the gradients of the input, weight and bias.
#[test]
fn linear_per_step_matches_burn_linear() {
    type B = F64Autodiff;
    let device = Default::default();
    let linear = burn::nn::LinearConfig::new(5, 3).init::<B>(&device);
    let x = Tensor::<B, 3>::random([4, 6, 5], Distribution::Default, &device).require_grad();
    let ours = rnn_zoo::layer::linear_per_step(&linear, x.clone());
    let burns = linear.forward(x.clone());
    let weights = Tensor::<B, 3>::random([4, 6, 3], Distribution::Default, &device);
    let grads_ours = (ours.clone() * weights.clone()).sum().backward();
    let grads_burn = (burns.clone() * weights).sum().backward();
    let pairs = [
        (ours.into_data(), burns.into_data()),
        (
            x.grad(&grads_ours).unwrap().into_data(),
            x.grad(&grads_burn).unwrap().into_data(),
        ),
        (
            linear.weight.val().grad(&grads_ours).unwrap().into_data(),
            linear.weight.val().grad(&grads_burn).unwrap().into_data(),
        ),
        (
            linear
                .bias
                .as_ref()
                .unwrap()
                .val()
                .grad(&grads_ours)
                .unwrap()
                .into_data(),
            linear
                .bias
                .as_ref()
                .unwrap()
                .val()
                .grad(&grads_burn)
                .unwrap()
                .into_data(),
        ),
    ];
    for (name, (a, b)) in ["output", "input grad", "weight grad", "bias grad"]
        .iter()
        .zip(pairs)
    {
        let diff = max_abs_diff(name, &a, &b);
        assert!(diff < 1e-12, "{name}: {diff:e}");
    }
}
