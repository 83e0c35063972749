//! Correctness checks for cells and layers: gradients by finite differences in f64, through the
//! same code path training uses. The zoo's own tests use them; so can a new cell.

use burn::backend::{Autodiff, NdArray};
use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::{backend::AutodiffBackend, Distribution, Tensor, TensorData};

use crate::cell::{Cell, CellConfig};
use crate::import::StateDict;
use crate::layer::{Mask, RnnLayer, RnnLayerConfig, RnnState};
use crate::ops::{RecurrencePath, RnnBackend};
use crate::regularisation::StateNoise;

/// The f64 CPU backend the checks run on.
pub type F64 = NdArray<f64>;
/// [`F64`] with autodiff.
pub type F64Autodiff = Autodiff<F64>;

struct GradientsAsParams<'a, B: AutodiffBackend> {
    grads: &'a B::Gradients,
}

impl<B: AutodiffBackend> ModuleMapper<B> for GradientsAsParams<'_, B> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let grad = tensor
            .grad(self.grads)
            .map(Tensor::from_inner)
            .unwrap_or_else(|| tensor.zeros_like());
        Param::from_mapped_value(id, grad, mapper)
    }
}

/// The module with every float parameter replaced by its gradient (zeros where it has none),
/// so that the module's own naming (e.g. [`RnnLayer::state_dict`]) names the gradients.
pub fn gradients_of<B: AutodiffBackend, M: Module<B>>(module: M, grads: &B::Gradients) -> M {
    module.map(&mut GradientsAsParams::<B> { grads })
}

/// Everything a training step reads from a layer run along `path` (for comparing two paths):
/// the output, the final states, and the gradients of the loss `Σ output² + Σ states` with
/// respect to the input, the initial states (when given) and every parameter.
pub fn layer_results<B: AutodiffBackend + RnnBackend, C: Cell<B>>(
    layer: &RnnLayer<B, C>,
    input: Tensor<B, 3>,
    mask: Option<&Mask<B>>,
    state0: Option<RnnState<B>>,
    noise: Option<&[StateNoise<B>]>,
    path: RecurrencePath,
) -> Vec<TensorData> {
    let x = input.require_grad();
    let s0: Option<Vec<Tensor<B, 3>>> =
        state0.map(|s| s.components.into_iter().map(|c| c.require_grad()).collect());
    let (output, state) = layer.forward_with_noise(
        x.clone(),
        mask,
        s0.clone().map(|components| RnnState { components }),
        noise,
        path,
    );
    let mut loss = (output.clone() * output.clone()).sum();
    for c in &state.components {
        loss = loss + c.clone().sum();
    }
    let grads = loss.backward();
    let mut tensors = vec![
        output.into_data(),
        x.grad(&grads).expect("input gradient").into_data(),
    ];
    tensors.extend(state.components.into_iter().map(|c| c.into_data()));
    for s in s0.iter().flatten() {
        tensors.push(s.grad(&grads).expect("state gradient").into_data());
    }
    tensors.extend(
        gradients_of(layer.clone(), &grads)
            .state_dict()
            .into_iter()
            .map(|(_, d)| d),
    );
    tensors
}

/// The largest [`max_abs_diff`] between two [`layer_results`].
pub fn max_difference(what: &str, a: &[TensorData], b: &[TensorData]) -> f64 {
    assert_eq!(a.len(), b.len(), "{what}: different result counts");
    a.iter()
        .zip(b)
        .map(|(x, y)| max_abs_diff(what, x, y))
        .fold(0.0, f64::max)
}

/// Largest absolute difference between two tensors' values; panics on a shape mismatch.
pub fn max_abs_diff(what: &str, actual: &TensorData, expected: &TensorData) -> f64 {
    assert_eq!(
        actual.shape, expected.shape,
        "{what}: shape {:?} differs from the expected {:?}",
        actual.shape, expected.shape
    );
    values(actual)
        .iter()
        .zip(values(expected))
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// A tensor's values as f64.
pub fn values(data: &TensorData) -> Vec<f64> {
    data.clone()
        .convert::<f64>()
        .to_vec::<f64>()
        .expect("float data")
}

/// Buffers that a state dict carries but that are not trained parameters.
fn is_buffer(name: &str) -> bool {
    name.ends_with("scale_x")
}

/// The layer with every parameter redrawn from `U(-scale, scale)` (init values can hide bugs,
/// e.g. zero biases). Buffers are kept.
pub fn randomized<B: RnnBackend, C: Cell<B>>(layer: RnnLayer<B, C>, scale: f64) -> RnnLayer<B, C> {
    let device = layer.cells[0].devices()[0].clone();
    let named = layer
        .state_dict()
        .into_iter()
        .map(|(name, data)| {
            if is_buffer(&name) {
                return (name, data);
            }
            let shape: [usize; 1] = [data.num_elements()];
            let random =
                Tensor::<B, 1>::random(shape, Distribution::Uniform(-scale, scale), &device);
            (
                name,
                TensorData::new(values(&random.into_data()), data.shape.clone()),
            )
        })
        .collect();
    layer
        .load_state_dict(&mut StateDict::from_tensors(named))
        .expect("same names and shapes")
}

/// What [`finite_differences`] measured.
#[derive(Debug, Clone, Copy)]
pub struct FiniteDifferenceReport {
    /// Scalars compared (every parameter element, every input element, every initial state element).
    pub compared: usize,
    /// Largest `|analytic − numeric| / max(|analytic|, |numeric|, 1e-3)`.
    pub max_relative_error: f64,
}

/// Checks every gradient of a layer against central differences (step `1e-6`, f64): of each
/// parameter element, each input element and each initial-state element, for the loss
/// `Σ output⊙g + Σ_k state_k⊙w_k` with fixed random `g`, `w_k`. With `lengths`, the batch is
/// right-padded to `len` and masked. Recurrent dropout and zoneout noise, if the layer has them,
/// is drawn once and held fixed.
pub fn finite_differences<C: CellConfig>(
    config: &RnnLayerConfig<C>,
    batch: usize,
    len: usize,
    lengths: Option<&[usize]>,
) -> FiniteDifferenceReport {
    type B = F64Autodiff;
    let device = Default::default();
    <B as burn::tensor::backend::Backend>::seed(&device, 7);
    let layer = randomized(config.init::<B>(&device), 0.6);
    let random = |shape: [usize; 3]| {
        Tensor::<B, 3>::random(shape, Distribution::Uniform(-1.0, 1.0), &device)
    };
    let input = random([batch, len, layer.input_size()]);
    let state_shape = [layer.cells.len(), batch, layer.hidden_size()];
    let state0: Vec<Tensor<B, 3>> = layer
        .state_names()
        .iter()
        .map(|_| random(state_shape))
        .collect();
    let grad_out = random([batch, len, layer.output_size()]);
    let state_weights: Vec<Tensor<B, 3>> = layer
        .state_names()
        .iter()
        .map(|_| random(state_shape))
        .collect();
    let mask = lengths.map(|l| Mask::<B>::from_lengths(l, len, &device).expect("valid lengths"));
    // Recurrent dropout and zoneout noise, if the layer has them, drawn once.
    let noise = layer.sample_noise(&input);

    let loss = |layer: &RnnLayer<B, C::Cell<B>>, input: Tensor<B, 3>, state0: Vec<Tensor<B, 3>>| {
        let state = Some(RnnState { components: state0 });
        let (output, state) = layer.forward_with_noise(
            input,
            mask.as_ref(),
            state,
            noise.as_deref(),
            RecurrencePath::Fused,
        );
        let mut total = (output * grad_out.clone()).sum();
        for (component, weight) in state.components.into_iter().zip(&state_weights) {
            total = total + (component * weight.clone()).sum();
        }
        total
    };
    let scalar = |t: Tensor<B, 1>| values(&t.into_data())[0];

    // Analytic gradients.
    let input_tracked = input.clone().require_grad();
    let state_tracked: Vec<Tensor<B, 3>> =
        state0.iter().map(|s| s.clone().require_grad()).collect();
    let grads = loss(&layer, input_tracked.clone(), state_tracked.clone()).backward();
    let param_grads = gradients_of(layer.clone(), &grads).state_dict();

    let eps = 1e-6;
    let mut report = FiniteDifferenceReport {
        compared: 0,
        max_relative_error: 0.0,
    };
    let mut record = |analytic: f64, numeric: f64, what: &str| {
        let rel = (analytic - numeric).abs() / analytic.abs().max(numeric.abs()).max(1e-3);
        assert!(
            rel <= 1e-5,
            "{what}: analytic {analytic:e} vs numeric {numeric:e} (relative error {rel:e})"
        );
        report.compared += 1;
        report.max_relative_error = report.max_relative_error.max(rel);
    };

    // Parameters, perturbed through the state dict.
    let named = layer.state_dict();
    for ((name, data), (_, grad)) in named.iter().zip(&param_grads) {
        if is_buffer(name) {
            continue;
        }
        let base = values(data);
        let analytic = values(grad);
        for j in 0..base.len() {
            let eval = |delta: f64| {
                let mut perturbed = base.clone();
                perturbed[j] += delta;
                let dict: Vec<(String, TensorData)> = named
                    .iter()
                    .map(|(n, d)| {
                        if n == name {
                            (
                                n.clone(),
                                TensorData::new(perturbed.clone(), d.shape.clone()),
                            )
                        } else {
                            (n.clone(), d.clone())
                        }
                    })
                    .collect();
                let moved = layer
                    .clone()
                    .load_state_dict(&mut StateDict::from_tensors(dict))
                    .expect("same names");
                scalar(loss(&moved, input.clone(), state0.clone()))
            };
            let numeric = (eval(eps) - eval(-eps)) / (2.0 * eps);
            record(analytic[j], numeric, &format!("{name}[{j}]"));
        }
    }

    // Input and initial state.
    let mut check_tensor =
        |what: &str, tracked: &Tensor<B, 3>, eval: &dyn Fn(Tensor<B, 3>) -> f64| {
            let analytic = values(&tracked.grad(&grads).expect("a gradient").into_data());
            let base_data = tracked.clone().detach().into_data();
            let base = values(&base_data);
            for j in 0..base.len() {
                let at = |delta: f64| {
                    let mut v = base.clone();
                    v[j] += delta;
                    eval(Tensor::from_data(
                        TensorData::new(v, base_data.shape.clone()),
                        &device,
                    ))
                };
                let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
                record(analytic[j], numeric, &format!("{what}[{j}]"));
            }
        };
    check_tensor("input", &input_tracked, &|x| {
        scalar(loss(&layer, x, state0.clone()))
    });
    for (k, tracked) in state_tracked.iter().enumerate() {
        check_tensor(&format!("state{k}"), tracked, &|s| {
            let mut states = state0.clone();
            states[k] = s;
            scalar(loss(&layer, input.clone(), states))
        });
    }
    report
}

/// Plain-Rust f64 building blocks for reference implementations of cell equations.
pub mod reference {
    use std::collections::HashMap;

    /// A row-major matrix.
    #[derive(Debug, Clone)]
    pub struct Mat {
        /// Rows.
        pub rows: usize,
        /// Columns.
        pub cols: usize,
        /// `rows · cols` values, row-major.
        pub data: Vec<f64>,
    }

    impl Mat {
        /// `self · x`.
        pub fn matvec(&self, x: &[f64]) -> Vec<f64> {
            assert_eq!(x.len(), self.cols, "matvec width");
            (0..self.rows)
                .map(|r| {
                    (0..self.cols)
                        .map(|c| self.data[r * self.cols + c] * x[c])
                        .sum()
                })
                .collect()
        }
        /// `x · self` (a row vector times the matrix).
        pub fn vecmat(&self, x: &[f64]) -> Vec<f64> {
            assert_eq!(x.len(), self.rows, "vecmat width");
            (0..self.cols)
                .map(|c| {
                    (0..self.rows)
                        .map(|r| x[r] * self.data[r * self.cols + c])
                        .sum()
                })
                .collect()
        }
        /// Rows `[start, start + n)`.
        pub fn rows(&self, start: usize, n: usize) -> Mat {
            Mat {
                rows: n,
                cols: self.cols,
                data: self.data[start * self.cols..(start + n) * self.cols].to_vec(),
            }
        }
    }

    /// Named weights of a layer, as a state dict holds them.
    #[derive(Debug, Clone, Default)]
    pub struct Weights(pub HashMap<String, (Vec<usize>, Vec<f64>)>);

    impl Weights {
        /// A 2-D tensor as a matrix.
        pub fn mat(&self, name: &str) -> Mat {
            let (shape, data) = self
                .0
                .get(name)
                .unwrap_or_else(|| panic!("no weight '{name}'"));
            assert_eq!(shape.len(), 2, "'{name}' is not a matrix");
            Mat {
                rows: shape[0],
                cols: shape[1],
                data: data.clone(),
            }
        }
        /// A tensor's values.
        pub fn vec(&self, name: &str) -> Vec<f64> {
            self.0
                .get(name)
                .unwrap_or_else(|| panic!("no weight '{name}'"))
                .1
                .clone()
        }
    }

    /// Logistic sigmoid.
    pub fn sigmoid(x: f64) -> f64 {
        1.0 / (1.0 + (-x).exp())
    }

    /// Elementwise `a + b`.
    pub fn add(a: &[f64], b: &[f64]) -> Vec<f64> {
        a.iter().zip(b).map(|(x, y)| x + y).collect()
    }

    /// Elements `[start, start + n)`.
    pub fn part(v: &[f64], start: usize, n: usize) -> Vec<f64> {
        v[start..start + n].to_vec()
    }
}

/// One step's output and state components, per batch row: what a reference step returns.
pub type StepValues = (Vec<f64>, Vec<Vec<f64>>);

/// Compares one step of the single-layer, unidirectional `cell` (on random weights, input and
/// state, f64) with `reference(weights, x, state)` row by row; returns the largest absolute
/// difference.
pub fn compare_step<C: CellConfig>(
    cell: C,
    batch: usize,
    reference: impl Fn(&reference::Weights, &[f64], &[Vec<f64>]) -> StepValues,
) -> f64 {
    compare_step_reading(cell, batch, 0.0, |w, x, state, _| reference(w, x, state))
}

/// [`compare_step`] with recurrent dropout of rate `dropout` (a random mask, training mode):
/// `reference(weights, x, state, read)` also gets each state component as the recurrent
/// connections read it, multiplied by its part of the mask ([`StateNoise::sample`]; the
/// state itself without dropout).
pub fn compare_step_reading<C: CellConfig>(
    cell: C,
    batch: usize,
    dropout: f64,
    reference: impl Fn(&reference::Weights, &[f64], &[Vec<f64>], &[Vec<f64>]) -> StepValues,
) -> f64 {
    type B = F64;
    let device = Default::default();
    <B as burn::tensor::backend::Backend>::seed(&device, 11);
    let layer = randomized(RnnLayerConfig::new(cell).init::<B>(&device), 0.8);
    let weights = reference::Weights(
        layer
            .state_dict()
            .into_iter()
            .map(|(name, data)| (name, (data.shape.to_vec(), values(&data))))
            .collect(),
    );
    let (input, hidden) = (layer.input_size(), layer.hidden_size());
    let x = Tensor::<B, 2>::random([batch, input], Distribution::Uniform(-1.0, 1.0), &device);
    let state0: Vec<Tensor<B, 3>> = layer
        .state_names()
        .iter()
        .map(|_| {
            Tensor::random(
                [1, batch, hidden],
                Distribution::Uniform(-1.0, 1.0),
                &device,
            )
        })
        .collect();
    let start = Some(RnnState {
        components: state0.clone(),
    });
    let noise = StateNoise::<B>::sample(
        layer.state_names(),
        hidden,
        [1, batch],
        (dropout, 0.0),
        true,
        &device,
    );
    let (output, state, keep) = match noise {
        None => {
            let (output, state) = layer.step(x.clone(), start);
            (output, state, None)
        }
        Some(noise) => {
            let keep = noise.keep.clone();
            let sequence = x.clone().unsqueeze_dim::<3>(1);
            let (output, state) = layer.forward_with_noise(
                sequence,
                None,
                start,
                Some(&[noise]),
                RecurrencePath::Fused,
            );
            (output.squeeze_dim::<2>(1), state, keep)
        }
    };
    let rows = |t: TensorData, width: usize| -> Vec<Vec<f64>> {
        values(&t).chunks(width).map(<[f64]>::to_vec).collect()
    };
    let xs = rows(x.into_data(), input);
    let s0: Vec<Vec<Vec<f64>>> = state0
        .into_iter()
        .map(|s| rows(s.into_data(), hidden))
        .collect();
    let out = rows(output.into_data(), hidden);
    let s1: Vec<Vec<Vec<f64>>> = state
        .components
        .into_iter()
        .map(|s| rows(s.into_data(), hidden))
        .collect();

    // `[batch, components · hidden]`: each component's multiplier side by side.
    let keep = keep.map(|keep| rows(keep.into_data(), s0.len() * hidden));
    if let Some(keep) = &keep {
        assert!(
            keep.iter().flatten().any(|&m| m == 0.0),
            "the mask drops nothing"
        );
    }
    let mut worst: f64 = 0.0;
    for b in 0..batch {
        let state_b: Vec<Vec<f64>> = s0.iter().map(|s| s[b].clone()).collect();
        let read: Vec<Vec<f64>> = state_b
            .iter()
            .enumerate()
            .map(|(k, component)| match &keep {
                Some(keep) => component
                    .iter()
                    .zip(&keep[b][k * hidden..])
                    .map(|(s, m)| s * m)
                    .collect(),
                None => component.clone(),
            })
            .collect();
        let (ref_out, ref_state) = reference(&weights, &xs[b], &state_b, &read);
        let mut diff = |a: &[f64], e: &[f64]| {
            assert_eq!(a.len(), e.len());
            for (x, y) in a.iter().zip(e) {
                worst = worst.max((x - y).abs());
            }
        };
        diff(&out[b], &ref_out);
        for (k, component) in ref_state.iter().enumerate() {
            diff(&s1[k][b], component);
        }
    }
    worst
}
