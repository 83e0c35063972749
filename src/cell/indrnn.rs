//! IndRNN (Li et al. 2018): `h' = relu(W x + b + u ⊙ h)`, each unit its own recurrence
//! through one recurrent weight. Training keeps `|u| ≤ 2^(1/T)` (T the sequence length) so
//! that no unit's gradient explodes over T steps: the runner clips after every optimiser step
//! ([`Cell::constrain_recurrent`]).
//!
//! Tensor names: `weight_ih_l{k}` `[H, I]`, `weight_hh_l{k}` `[H]` (u), `bias_ih_l{k}` `[H]`
//! (`_reverse` for the second direction), as the common PyTorch IndRNN modules.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Distribution, Tensor, TensorData};

use super::{accumulate, batch_sum, flatten_params, load_param, param_data, torch_name, Cell};
use crate::host::{self, HostFloat, HostStep, HostStepGrads, MatMut, MatRef, WeightProduct};
use crate::import::{ImportError, TensorSource};
use crate::ops::{Recurrence, StepOutput, StepRecord};

/// Configuration of an [`IndRnn`] cell.
#[derive(Config, Debug, PartialEq)]
pub struct IndRnnConfig {
    /// Width of the input.
    pub input_size: usize,
    /// Width of the hidden state.
    pub hidden_size: usize,
}

/// An IndRNN cell.
#[derive(Module, Debug)]
pub struct IndRnn<B: Backend> {
    /// Input-to-hidden weights `[H, I]`.
    pub weight_ih: Param<Tensor<B, 2>>,
    /// The recurrent weights u, one per unit, `[H]`.
    pub weight_hh: Param<Tensor<B, 1>>,
    /// Bias `[H]`.
    pub bias_ih: Param<Tensor<B, 1>>,
}

impl IndRnnConfig {
    /// Builds the cell with the initialisation of the paper's code for the adding problem:
    /// `u ~ U(0, 1)`, `W ~ N(0, 0.001²)`, zero bias.
    pub fn init<B: Backend>(&self, device: &B::Device) -> IndRnn<B> {
        let (i, h) = (self.input_size, self.hidden_size);
        IndRnn {
            weight_ih: Param::from_tensor(Tensor::random(
                [h, i],
                Distribution::Normal(0.0, 0.001),
                device,
            )),
            weight_hh: Param::from_tensor(Tensor::random(
                [h],
                Distribution::Uniform(0.0, 1.0),
                device,
            )),
            bias_ih: Param::from_tensor(Tensor::zeros([h], device)),
        }
    }
}

super::single_name_config!(IndRnnConfig => IndRnn, "indrnn");

/// The IndRNN step: elementwise, the bias folded into the projection; params `[u [1, H]]`.
#[derive(Debug, Clone)]
pub struct IndRnnKernel {
    /// Width of the hidden state.
    pub hidden: usize,
}

impl Recurrence for IndRnnKernel {
    fn input_width(&self) -> usize {
        self.hidden
    }
    fn state_width(&self) -> usize {
        self.hidden
    }
    fn output_width(&self) -> usize {
        self.hidden
    }
    fn saved_width(&self) -> usize {
        0
    }
    fn host_output_in_state(&self) -> bool {
        true
    }
    fn param_shapes(&self) -> Vec<[usize; 2]> {
        vec![[1, self.hidden]]
    }

    fn step<B: Backend>(
        &self,
        params: &[Tensor<B, 2>],
        xp: Tensor<B, 2>,
        h: Tensor<B, 2>,
    ) -> StepOutput<B> {
        let h_new = burn::tensor::activation::relu(xp + params[0].clone() * h);
        StepOutput {
            output: h_new.clone(),
            state: h_new,
            saved: None,
        }
    }

    fn step_backward<B: Backend>(
        &self,
        params: &[Tensor<B, 2>],
        step: StepRecord<B>,
        param_grads: &mut [Tensor<B, 2>],
    ) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let active = step.state.greater_elem(0.0).float();
        let d_pre = (step.grad_output + step.grad_state) * active;
        accumulate(
            &mut param_grads[0],
            batch_sum(d_pre.clone() * step.prev_state),
        );
        let grad_prev = d_pre.clone() * params[0].clone();
        (d_pre, grad_prev)
    }

    fn host_step<F: HostFloat>(
        &self,
        params: &[MatRef<F>],
        xp: MatRef<F>,
        prev: MatRef<F>,
        mut out: MatMut<F>,
    ) {
        let u = params[0].row(0);
        // Row layout: [h] (the output is the state).
        out.for_each_row(|b, h_new| {
            let (x, h) = (xp.row(b), prev.row(b));
            // Zipped rather than indexed, so that the loop vectorises (as the backward's).
            for (h_new, ((&x, &u), &h)) in h_new.iter_mut().zip(x.iter().zip(u).zip(h)) {
                let pre = x + u * h;
                *h_new = if pre > F::zero() { pre } else { F::zero() };
            }
        });
    }

    fn host_step_backward<F: HostFloat>(
        &self,
        params: &[MatRef<F>],
        step: HostStep<F>,
        mut grads: HostStepGrads<F>,
    ) {
        let u = params[0].row(0);
        host::for_each_row_pair(&mut grads.xp, &mut grads.prev, |b, d_pre, grad_prev| {
            step.fetch_ahead(b);
            // The state's gradient holds the output's too.
            let (h_new, g) = (step.row.row(b), step.grad_state.row(b));
            // Zipped rather than indexed: without bounds checks the loop vectorises (the
            // branch becomes a select).
            let rows = d_pre.iter_mut().zip(grad_prev.iter_mut());
            for ((d, gp), ((&h, &g), &u)) in rows.zip(h_new.iter().zip(g).zip(u)) {
                *d = if h > F::zero() { g } else { F::zero() };
                *gp = *d * u;
            }
        });
        // u's gradient is a sum over the batch: rows in order, one accumulator.
        let grad_u = grads.params[0].row_mut(0);
        for b in 0..step.xp.rows() {
            let (d_pre, h) = (grads.xp.as_ref().row(b), step.prev.row(b));
            for ((acc, &d), &h) in grad_u.iter_mut().zip(d_pre).zip(h) {
                *acc += d * h;
            }
        }
    }

    fn host_weight_products(&self) -> Vec<WeightProduct> {
        Vec::new()
    }
}

impl<B: Backend> IndRnn<B> {
    /// The cell with every recurrent weight clipped to `[-limit, limit]`.
    pub fn clip_recurrent(self, limit: f64) -> Self {
        let clipped = self.weight_hh.map(|u| u.clamp(-limit, limit));
        Self {
            weight_hh: clipped,
            ..self
        }
    }
}

impl<B: Backend> Cell<B> for IndRnn<B> {
    type Kernel = IndRnnKernel;

    fn input_size(&self) -> usize {
        self.weight_ih.dims()[1]
    }
    fn hidden_size(&self) -> usize {
        self.weight_hh.dims()[0]
    }
    fn state_names(&self) -> &'static [&'static str] {
        &["h"]
    }
    fn kernel(&self) -> IndRnnKernel {
        IndRnnKernel {
            hidden: self.hidden_size(),
        }
    }
    fn input_affine(&self) -> (Tensor<B, 2>, Option<Tensor<B, 1>>) {
        (self.weight_ih.val(), Some(self.bias_ih.val()))
    }
    fn recurrent_params(&self) -> Tensor<B, 1> {
        flatten_params(vec![self.weight_hh.val().unsqueeze_dim(0)])
    }

    /// `|u| ≤ 2^(1/T)` for sequences of `max_len` steps (Li et al. 2018).
    fn constrain_recurrent(self, max_len: usize) -> Self {
        self.clip_recurrent(2f64.powf(1.0 / max_len.max(1) as f64))
    }

    fn load_layer(
        cells: Vec<Self>,
        layer: usize,
        source: &mut dyn TensorSource,
    ) -> Result<Vec<Self>, ImportError> {
        cells
            .into_iter()
            .enumerate()
            .map(|(direction, cell)| {
                let name = |base: &str| torch_name(base, layer, direction);
                Ok(IndRnn {
                    weight_ih: load_param(source, &name("weight_ih"), &cell.weight_ih)?,
                    weight_hh: load_param(source, &name("weight_hh"), &cell.weight_hh)?,
                    bias_ih: load_param(source, &name("bias_ih"), &cell.bias_ih)?,
                })
            })
            .collect()
    }

    fn save_layer(cells: &[Self], layer: usize) -> Vec<(String, TensorData)> {
        cells
            .iter()
            .enumerate()
            .flat_map(|(direction, cell)| {
                let name = |base: &str| torch_name(base, layer, direction);
                [
                    (name("weight_ih"), param_data(&cell.weight_ih)),
                    (name("weight_hh"), param_data(&cell.weight_hh)),
                    (name("bias_ih"), param_data(&cell.bias_ih)),
                ]
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::{compare_step, finite_differences, reference::*, F64};
    use crate::layer::RnnLayerConfig;

    /// `h' = relu(W x + b + u ⊙ h)`, one batch row, in plain f64.
    fn reference_step(w: &Weights, x: &[f64], state: &[Vec<f64>]) -> (Vec<f64>, Vec<Vec<f64>>) {
        let pre = add(&w.mat("weight_ih_l0").matvec(x), &w.vec("bias_ih_l0"));
        let u = w.vec("weight_hh_l0");
        let h: Vec<f64> = (0..pre.len())
            .map(|j| (pre[j] + u[j] * state[0][j]).max(0.0))
            .collect();
        (h.clone(), vec![h])
    }

    #[test]
    fn step_matches_f64_reference() {
        let err = compare_step(IndRnnConfig::new(3, 4), 3, reference_step);
        assert!(err < 1e-12, "{err:e}");
    }

    #[test]
    fn gradients_match_finite_differences() {
        finite_differences(&RnnLayerConfig::new(IndRnnConfig::new(3, 4)), 2, 4, None);
    }

    #[test]
    fn initialisation_and_clipping_follow_the_paper() {
        let cell = IndRnnConfig::new(3, 64).init::<F64>(&Default::default());
        let u: Vec<f64> = cell.weight_hh.val().into_data().to_vec().unwrap();
        assert!(u.iter().all(|v| (0.0..1.0).contains(v)));
        assert!(cell.bias_ih.val().abs().max().into_scalar() == 0.0);
        let wide = cell.weight_hh.map(|u| u * 3.0 - 1.5);
        let cell = IndRnn {
            weight_hh: wide,
            ..cell
        }
        .constrain_recurrent(10);
        let limit = 2f64.powf(0.1);
        let u: Vec<f64> = cell.weight_hh.val().into_data().to_vec().unwrap();
        assert!(u.iter().all(|v| v.abs() <= limit + 1e-15), "{u:?}");
        assert!(
            u.iter().any(|v| (v.abs() - limit).abs() < 1e-15),
            "some were clipped"
        );
    }
}
