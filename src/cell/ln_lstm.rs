//! The layer-normalised LSTM (Ba, Kiros & Hinton 2016, §3.1 and the LSTM equations of its
//! supplement): layer normalisation of the input projection, of the recurrent projection and
//! of the new cell before its output `tanh`, each over its own features and per example.
//!
//! `z = LN(W_ih x; γ_ih) + LN(W_hh h; γ_hh) + b`, gates i, f, g, o as `torch.nn.LSTM`,
//! `c' = f⊙c + i⊙g`, `h' = o⊙tanh(LN(c'; γ_c, β_c))`, where
//! `LN(v; γ, β) = γ⊙(v − mean(v))/√(var(v) + ε) + β` (ε = 1e-5, PyTorch's). The two projections'
//! shifts would only add to `b`, so they are folded into it.
//!
//! Tensors: `weight_ih [4H, I]`, `weight_hh [4H, H]`, `bias [4H]`, `ln_ih_weight [4H]`,
//! `ln_hh_weight [4H]`, `ln_cell_weight [H]`, `ln_cell_bias [H]`, each with the layer and
//! direction suffix of PyTorch's names (`weight_ih_l0`, `ln_cell_bias_l1_reverse`).
//!
//! All three normalisations run inside the step, forward and backward: the input projection
//! `W_ih x` reaches the step raw (the recurrence op may compute it step by step itself), so no
//! sequence-long normalised copy of it is written and read back.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Tensor, TensorData};

use super::{
    accumulate, batch_sum, cols, flatten_params, load_param, param_data, sigmoid, sigmoid_grad,
    tanh_grad, torch_name, uniform_param, Cell,
};
use crate::host::{
    self, HostFloat, HostStep, HostStepGrads, MatMut, MatRef, Operand, WeightProduct,
};
use crate::import::{ImportError, TensorSource};
use crate::ops::{norm, Recurrence, StepOutput, StepRecord};

/// The variance floor of every normalisation (PyTorch's `LayerNorm` default).
pub const LN_EPSILON: f64 = 1e-5;

/// Configuration of an [`LnLstm`] cell.
#[derive(Config, Debug, PartialEq)]
pub struct LnLstmConfig {
    /// Width of the input.
    pub input_size: usize,
    /// Width of the hidden state.
    pub hidden_size: usize,
    /// Initial value of the forget-gate slice of `bias`, as the zoo's LSTM (Gers et al. 2000).
    #[config(default = "1.0")]
    pub forget_bias: f64,
}

/// A layer-normalised LSTM cell.
#[derive(Module, Debug)]
pub struct LnLstm<B: Backend> {
    /// Input-to-gates weights `[4H, I]`, rows i, f, g, o.
    pub weight_ih: Param<Tensor<B, 2>>,
    /// Hidden-to-gates weights `[4H, H]`.
    pub weight_hh: Param<Tensor<B, 2>>,
    /// Gate bias `[4H]` (the normalisations' shifts folded in).
    pub bias: Param<Tensor<B, 1>>,
    /// Gain of the input projection's normalisation `[4H]`.
    pub ln_ih_weight: Param<Tensor<B, 1>>,
    /// Gain of the recurrent projection's normalisation `[4H]`.
    pub ln_hh_weight: Param<Tensor<B, 1>>,
    /// Gain of the cell's normalisation `[H]`.
    pub ln_cell_weight: Param<Tensor<B, 1>>,
    /// Shift of the cell's normalisation `[H]`.
    pub ln_cell_bias: Param<Tensor<B, 1>>,
}

/// Calls `$then!` with the cell's fields, whose names are also its tensors' names in a state
/// dict (with the layer and direction suffix): one list for loading and saving.
macro_rules! with_param_names {
    ($then:ident) => {
        $then!(
            weight_ih,
            weight_hh,
            bias,
            ln_ih_weight,
            ln_hh_weight,
            ln_cell_weight,
            ln_cell_bias
        )
    };
}

impl LnLstmConfig {
    /// Builds the cell: weights `U(-1/√H, 1/√H)` as PyTorch's LSTM, gains 1 and shifts 0 as
    /// PyTorch's `LayerNorm`, the bias 0 but for the forget slice.
    pub fn init<B: Backend>(&self, device: &B::Device) -> LnLstm<B> {
        let (i, h) = (self.input_size, self.hidden_size);
        let bound = 1.0 / (h as f64).sqrt();
        let bias: Vec<f64> = (0..4 * h)
            .map(|k| {
                if (h..2 * h).contains(&k) {
                    self.forget_bias
                } else {
                    0.0
                }
            })
            .collect();
        let vector = |values: Vec<f64>| {
            let n = values.len();
            Param::from_tensor(Tensor::from_data(TensorData::new(values, [n]), device))
        };
        LnLstm {
            weight_ih: uniform_param([4 * h, i], bound, device),
            weight_hh: uniform_param([4 * h, h], bound, device),
            bias: vector(bias),
            ln_ih_weight: vector(vec![1.0; 4 * h]),
            ln_hh_weight: vector(vec![1.0; 4 * h]),
            ln_cell_weight: vector(vec![1.0; h]),
            ln_cell_bias: vector(vec![0.0; h]),
        }
    }
}

super::single_name_config!(LnLstmConfig => LnLstm, "ln-lstm");

/// The LN-LSTM step on the raw input projection `W_ih x`. Params `[W_hh^T [H, 4H], γ_ih [1, 4H],
/// γ_hh [1, 4H], b [1, 4H], γ_c [1, H], β_c [1, H]]`; state `[h | c]`; saved `[i, f, g, o | r̂ |
/// ĉ | tanh(γ_c⊙ĉ + β_c) | 1/σ_r, 1/σ_c]` with `r̂` the normalised recurrent projection and `ĉ`
/// the normalised new cell. The normalised input `x̂` is not saved: the backward recomputes it
/// from the step's input.
#[derive(Debug, Clone)]
pub struct LnLstmKernel {
    /// Width of the hidden state.
    pub hidden: usize,
}

/// Where each saved value starts in a packed row `[h' | c' | saved]` (the output is `h'`).
struct Layout {
    gates: usize,
    r_hat: usize,
    c_hat: usize,
    act: usize,
    inv_std: usize,
}

impl LnLstmKernel {
    fn layout(&self) -> Layout {
        let hd = self.hidden;
        Layout {
            gates: 2 * hd,
            r_hat: 6 * hd,
            c_hat: 10 * hd,
            act: 11 * hd,
            inv_std: 12 * hd,
        }
    }
}

/// The step's gain and shift rows `[γ_ih, γ_hh, b, γ_c, β_c]` (params 1-5).
fn gains<'a, F: Copy>(params: &[MatRef<'a, F>]) -> [&'a [F]; 5] {
    [1, 2, 3, 4, 5].map(|p| params[p].row(0))
}

/// [`LN_EPSILON`] in the host float type.
fn epsilon<F: HostFloat>() -> F {
    <F as num_traits::NumCast>::from(LN_EPSILON).expect("ε fits the float type")
}

host::simd_dispatched! {
    /// `acc += a ⊙ b`.
    fn add_products<F: HostFloat>(acc: &mut [F], a: &[F], b: &[F]) {
        for ((acc, &a), &b) in acc.iter_mut().zip(a).zip(b) {
            *acc += a * b;
        }
    }
}

impl Recurrence for LnLstmKernel {
    fn input_width(&self) -> usize {
        4 * self.hidden
    }
    fn state_width(&self) -> usize {
        2 * self.hidden
    }
    fn output_width(&self) -> usize {
        self.hidden
    }
    fn saved_width(&self) -> usize {
        10 * self.hidden + 2
    }
    fn host_output_in_state(&self) -> bool {
        true
    }
    fn param_shapes(&self) -> Vec<[usize; 2]> {
        let hd = self.hidden;
        vec![
            [hd, 4 * hd],
            [1, 4 * hd],
            [1, 4 * hd],
            [1, 4 * hd],
            [1, hd],
            [1, hd],
        ]
    }

    fn step<B: Backend>(
        &self,
        params: &[Tensor<B, 2>],
        xp: Tensor<B, 2>,
        state: Tensor<B, 2>,
    ) -> StepOutput<B> {
        let hd = self.hidden;
        let (h, c) = (cols(&state, 0, hd), cols(&state, hd, hd));
        let (x_hat, _) = norm::normalized(xp, LN_EPSILON);
        let (r_hat, inv_std_r) = norm::normalized(h.matmul(params[0].clone()), LN_EPSILON);
        let z = x_hat * params[1].clone() + r_hat.clone() * params[2].clone() + params[3].clone();
        let i = sigmoid(cols(&z, 0, hd));
        let f = sigmoid(cols(&z, hd, hd));
        let g = cols(&z, 2 * hd, hd).tanh();
        let o = sigmoid(cols(&z, 3 * hd, hd));
        let c_new = f.clone() * c + i.clone() * g.clone();
        let (c_hat, inv_std_c) = norm::normalized(c_new.clone(), LN_EPSILON);
        let act = (c_hat.clone() * params[4].clone() + params[5].clone()).tanh();
        let h_new = o.clone() * act.clone();
        StepOutput {
            output: h_new.clone(),
            state: Tensor::cat(vec![h_new, c_new], 1),
            saved: Some(Tensor::cat(
                vec![i, f, g, o, r_hat, c_hat, act, inv_std_r, inv_std_c],
                1,
            )),
        }
    }

    fn step_backward<B: Backend>(
        &self,
        params: &[Tensor<B, 2>],
        step: StepRecord<B>,
        param_grads: &mut [Tensor<B, 2>],
    ) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let hd = self.hidden;
        let saved = step
            .saved
            .expect("the LN-LSTM saves its gates and normalisations");
        let part = |k: usize, width: usize| cols(&saved, k, width);
        let (i, f, g, o) = (
            part(0, hd),
            part(hd, hd),
            part(2 * hd, hd),
            part(3 * hd, hd),
        );
        let (r_hat, c_hat, act) = (part(4 * hd, 4 * hd), part(8 * hd, hd), part(9 * hd, hd));
        let (inv_std_r, inv_std_c) = (part(10 * hd, 1), part(10 * hd + 1, 1));
        let (h, c) = (
            cols(&step.prev_state, 0, hd),
            cols(&step.prev_state, hd, hd),
        );
        let grad_h = step.grad_output + cols(&step.grad_state, 0, hd);

        let d_act = grad_h.clone() * o.clone() * tanh_grad(act.clone());
        accumulate(
            &mut param_grads[4],
            batch_sum(d_act.clone() * c_hat.clone()),
        );
        accumulate(&mut param_grads[5], batch_sum(d_act.clone()));
        let grad_c = cols(&step.grad_state, hd, hd)
            + norm::normalized_backward(c_hat, inv_std_c, d_act * params[4].clone());
        let dz = Tensor::cat(
            vec![
                grad_c.clone() * g.clone() * sigmoid_grad(i.clone()),
                grad_c.clone() * c * sigmoid_grad(f.clone()),
                grad_c.clone() * i * tanh_grad(g),
                grad_h * act * sigmoid_grad(o),
            ],
            1,
        );
        let (x_hat, inv_std_x) = norm::normalized(step.xp, LN_EPSILON);
        accumulate(&mut param_grads[1], batch_sum(dz.clone() * x_hat.clone()));
        accumulate(&mut param_grads[2], batch_sum(dz.clone() * r_hat.clone()));
        accumulate(&mut param_grads[3], batch_sum(dz.clone()));
        let dr = norm::normalized_backward(r_hat, inv_std_r, dz.clone() * params[2].clone());
        accumulate(&mut param_grads[0], h.transpose().matmul(dr.clone()));
        let grad_h_prev = dr.matmul(params[0].clone().transpose());
        let dxp = norm::normalized_backward(x_hat, inv_std_x, dz * params[1].clone());
        (dxp, Tensor::cat(vec![grad_h_prev, grad_c * f], 1))
    }

    fn host_step<F: HostFloat>(
        &self,
        params: &[MatRef<F>],
        xp: MatRef<F>,
        prev: MatRef<F>,
        mut out: MatMut<F>,
    ) {
        let (hd, at) = (self.hidden, self.layout());
        // The recurrent projection lands in r̂'s slot and is normalised there.
        host::matmul(
            &mut out.cols_mut(at.r_hat, 4 * hd),
            prev.cols(0, hd),
            params[0],
            false,
        );
        let [gain_x, gain_r, bias, gain_c, shift_c] = gains(params);
        let epsilon = epsilon::<F>();
        out.for_each_row(|b, row| {
            let (head, saved) = row.split_at_mut(at.gates);
            let (gates, rest) = saved.split_at_mut(4 * hd);
            let (r_hat, rest) = rest.split_at_mut(4 * hd);
            let (c_hat, rest) = rest.split_at_mut(hd);
            let (act, inv_std) = rest.split_at_mut(hd);
            inv_std[0] = host::normalize_in_place(r_hat, epsilon);
            // x̂ in the gates' slot, then the gates' pre-activations over it.
            gates.copy_from_slice(xp.row(b));
            host::normalize_in_place(gates, epsilon);
            for k in 0..4 * hd {
                gates[k] = gain_x[k] * gates[k] + gain_r[k] * r_hat[k] + bias[k];
            }
            F::sigmoid_in_place(&mut gates[..2 * hd]);
            F::tanh_in_place(&mut gates[2 * hd..3 * hd]);
            F::sigmoid_in_place(&mut gates[3 * hd..]);
            let c = &prev.row(b)[hd..];
            for j in 0..hd {
                c_hat[j] = gates[hd + j] * c[j] + gates[j] * gates[2 * hd + j];
            }
            head[hd..].copy_from_slice(c_hat);
            inv_std[1] = host::normalize_in_place(c_hat, epsilon);
            for j in 0..hd {
                act[j] = gain_c[j] * c_hat[j] + shift_c[j];
            }
            F::tanh_in_place(act);
            for j in 0..hd {
                head[j] = gates[3 * hd + j] * act[j];
            }
        });
    }

    fn host_step_backward<F: HostFloat>(
        &self,
        params: &[MatRef<F>],
        step: HostStep<F>,
        mut grads: HostStepGrads<F>,
    ) {
        let (hd, at, one) = (self.hidden, self.layout(), F::one());
        let [gain_x, gain_r, _, gain_c, _] = gains(params);
        let (_, dr) = &mut grads.products[0];
        // Per row: the gate gradients dz into dxp's slot (made dxp below), dc_prev into its
        // slot, and the gradient of the recurrent projection into dr; d(γ_c ĉ + β_c) waits in
        // the h_prev gradient's slot.
        host::for_each_row_triple(&mut grads.xp, &mut grads.prev, dr, |b, dz, gp, dr| {
            step.fetch_ahead(b);
            let row = step.row.row(b);
            let gates = &row[at.gates..at.r_hat];
            let (r_hat, c_hat) = (&row[at.r_hat..at.c_hat], &row[at.c_hat..at.act]);
            let (act, inv_std) = (&row[at.act..at.inv_std], &row[at.inv_std..]);
            let c = &step.prev.row(b)[hd..];
            // The state's gradient holds the output's too.
            let gs = step.grad_state.row(b);
            let (d_act, grad_c) = gp.split_at_mut(hd);
            for j in 0..hd {
                let grad_h = gs[j];
                d_act[j] = grad_h * gates[3 * hd + j] * (one - act[j] * act[j]);
                grad_c[j] = d_act[j] * gain_c[j];
            }
            host::normalize_backward_in_place(c_hat, inv_std[1], grad_c);
            for j in 0..hd {
                let (i, f, g, o) = (
                    gates[j],
                    gates[hd + j],
                    gates[2 * hd + j],
                    gates[3 * hd + j],
                );
                let dc = grad_c[j] + gs[hd + j];
                dz[j] = dc * g * (i * (one - i));
                dz[hd + j] = dc * c[j] * (f * (one - f));
                dz[2 * hd + j] = dc * i * (one - g * g);
                dz[3 * hd + j] = gs[j] * act[j] * (o * (one - o));
                grad_c[j] = dc * f;
            }
            for k in 0..4 * hd {
                dr[k] = dz[k] * gain_r[k];
            }
            host::normalize_backward_in_place(r_hat, inv_std[0], dr);
        });
        // The gains' and shifts' gradients, sums over the batch with rows in order; then each
        // row's dz becomes the input projection's gradient through x̂ (recomputed here).
        let epsilon = epsilon::<F>();
        let mut x_hat = vec![F::zero(); 4 * hd];
        for b in 0..step.xp.rows() {
            let row = step.row.row(b);
            let (r_hat, c_hat) = (&row[at.r_hat..at.c_hat], &row[at.c_hat..at.act]);
            x_hat.copy_from_slice(step.xp.row(b));
            let inv_std_x = host::normalize_in_place(&mut x_hat, epsilon);
            let dz = grads.xp.row_mut(b);
            let d_act = &grads.prev.as_ref().row(b)[..hd];
            add_products(grads.params[1].row_mut(0), dz, &x_hat);
            add_products(grads.params[2].row_mut(0), dz, r_hat);
            host::add_into(grads.params[3].row_mut(0), dz);
            add_products(grads.params[4].row_mut(0), d_act, c_hat);
            host::add_into(grads.params[5].row_mut(0), d_act);
            for k in 0..4 * hd {
                dz[k] *= gain_x[k];
            }
            host::normalize_backward_in_place(&x_hat, inv_std_x, dz);
        }
        let dr = grads.products[0].1.as_ref();
        host::matmul(&mut grads.prev.cols_mut(0, hd), dr, step.params_t[0], false);
    }

    fn host_weight_products(&self) -> Vec<WeightProduct> {
        vec![WeightProduct {
            param: 0,
            col: 0,
            k: self.hidden,
            n: 4 * self.hidden,
            a: Operand::PrevState(0),
            g: Operand::Written,
        }]
    }
}

impl<B: Backend> Cell<B> for LnLstm<B> {
    type Kernel = LnLstmKernel;

    fn input_size(&self) -> usize {
        self.weight_ih.dims()[1]
    }
    fn hidden_size(&self) -> usize {
        self.weight_hh.dims()[1]
    }
    fn state_names(&self) -> &'static [&'static str] {
        &["h", "c"]
    }
    fn kernel(&self) -> LnLstmKernel {
        LnLstmKernel {
            hidden: self.hidden_size(),
        }
    }
    fn input_affine(&self) -> (Tensor<B, 2>, Option<Tensor<B, 1>>) {
        // Only W_ih x: its normalisation and the bias are the step's.
        (self.weight_ih.val(), None)
    }
    fn recurrent_params(&self) -> Tensor<B, 1> {
        flatten_params(vec![
            self.weight_hh.val().transpose(),
            self.ln_ih_weight.val().unsqueeze_dim(0),
            self.ln_hh_weight.val().unsqueeze_dim(0),
            self.bias.val().unsqueeze_dim(0),
            self.ln_cell_weight.val().unsqueeze_dim(0),
            self.ln_cell_bias.val().unsqueeze_dim(0),
        ])
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
                let name = |field: &str| torch_name(field, layer, direction);
                macro_rules! load {
                    ($($field:ident),*) => {
                        LnLstm { $($field: load_param(source, &name(stringify!($field)), &cell.$field)?),* }
                    };
                }
                Ok(with_param_names!(load))
            })
            .collect()
    }

    fn save_layer(cells: &[Self], layer: usize) -> Vec<(String, TensorData)> {
        cells
            .iter()
            .enumerate()
            .flat_map(|(direction, cell)| {
                let name = |field: &str| torch_name(field, layer, direction);
                macro_rules! save {
                    ($($field:ident),*) => {
                        vec![$((name(stringify!($field)), param_data(&cell.$field))),*]
                    };
                }
                with_param_names!(save)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::{
        compare_step, finite_differences,
        reference::{self, *},
    };
    use crate::layer::RnnLayerConfig;
    use reference::sigmoid;

    /// `γ⊙(v − mean)/√(var + ε) + β` in f64.
    fn layer_norm(v: &[f64], gain: &[f64], shift: Option<&[f64]>) -> Vec<f64> {
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n;
        (0..v.len())
            .map(|k| {
                gain[k] * (v[k] - mean) / (var + LN_EPSILON).sqrt() + shift.map_or(0.0, |s| s[k])
            })
            .collect()
    }

    /// The LN-LSTM equations, one batch row, in plain f64.
    fn reference_step(w: &Weights, x: &[f64], state: &[Vec<f64>]) -> (Vec<f64>, Vec<Vec<f64>>) {
        let (h, c) = (&state[0], &state[1]);
        let n = h.len();
        let zx = layer_norm(
            &w.mat("weight_ih_l0").matvec(x),
            &w.vec("ln_ih_weight_l0"),
            None,
        );
        let zh = layer_norm(
            &w.mat("weight_hh_l0").matvec(h),
            &w.vec("ln_hh_weight_l0"),
            None,
        );
        let z = add(&add(&zx, &zh), &w.vec("bias_l0"));
        let c_new: Vec<f64> = (0..n)
            .map(|j| sigmoid(z[n + j]) * c[j] + sigmoid(z[j]) * z[2 * n + j].tanh())
            .collect();
        let c_norm = layer_norm(
            &c_new,
            &w.vec("ln_cell_weight_l0"),
            Some(&w.vec("ln_cell_bias_l0")),
        );
        let h_new: Vec<f64> = (0..n)
            .map(|j| sigmoid(z[3 * n + j]) * c_norm[j].tanh())
            .collect();
        (h_new.clone(), vec![h_new, c_new])
    }

    #[test]
    fn step_matches_f64_reference() {
        let err = compare_step(LnLstmConfig::new(3, 4), 3, reference_step);
        assert!(err < 1e-12, "{err:e}");
    }

    #[test]
    fn gradients_match_finite_differences() {
        finite_differences(&RnnLayerConfig::new(LnLstmConfig::new(3, 4)), 2, 4, None);
    }

    #[test]
    fn initialisation_and_names() {
        type B = crate::check::F64;
        let cell = LnLstmConfig::new(2, 3).init::<B>(&Default::default());
        let bias = crate::check::values(&cell.bias.val().into_data());
        assert_eq!(bias, [0., 0., 0., 1., 1., 1., 0., 0., 0., 0., 0., 0.]);
        let names: Vec<String> = LnLstm::save_layer(&[cell], 1)
            .into_iter()
            .map(|(name, _)| name)
            .collect();
        assert_eq!(
            names,
            [
                "weight_ih_l1",
                "weight_hh_l1",
                "bias_l1",
                "ln_ih_weight_l1",
                "ln_hh_weight_l1",
                "ln_cell_weight_l1",
                "ln_cell_bias_l1"
            ]
        );
    }
}
