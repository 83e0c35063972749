//! GRU, gates r, z, n as `torch.nn.GRU`, in two variants:
//! - `gru` (reset after the recurrent matmul, PyTorch/cuDNN):
//!   `n = tanh(W_in x + b_in + r⊙(W_hn h + b_hn))`;
//! - `gru-cho` (reset before it, Cho et al. 2014): `n = tanh(W_in x + b_in + W_hn (r⊙h) + b_hn)`;
//!
//! and in both `r = σ(..)`, `z = σ(..)`, `h' = (1 − z)⊙n + z⊙h`.
//!
//! Recurrent dropout (as Keras' GRU): the recurrent products read `h ⊙ m`, the interpolation
//! reads `h`; the kernel does it itself ([`GruKernel::dropout`]).

use burn::config::Config;
use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Tensor, TensorData};

use super::{
    accumulate, batch_sum, cols, flatten_params, load_torch_layer, save_torch_layer, sigmoid,
    sigmoid_grad, tanh_grad, uniform_param, Cell, CellConfig, Position,
};
use crate::host::{
    self, HostFloat, HostStep, HostStepGrads, MatMut, MatRef, Operand, WeightProduct,
};
use crate::import::{ImportError, TensorSource};
use crate::ops::{Recurrence, StepOutput, StepRecord};
use crate::regularisation::{
    host_add_gated_read, host_add_masked_product, host_backward_reads, host_masked,
    host_product_keep, masked, product_keep, with_zero_noise_grad,
};

/// Configuration of a [`Gru`] cell.
#[derive(Config, Debug, PartialEq)]
pub struct GruConfig {
    /// Width of the input.
    pub input_size: usize,
    /// Width of the hidden state.
    pub hidden_size: usize,
    /// Reset gate applied after the recurrent matmul (PyTorch, cuDNN) rather than before it
    /// (Cho et al. 2014).
    #[config(default = true)]
    pub reset_after: bool,
}

/// A GRU cell. Weights in PyTorch's layout: `weight_ih [3H, I]`, `weight_hh [3H, H]`, rows r, z, n.
#[derive(Module, Debug)]
pub struct Gru<B: Backend> {
    /// Input-to-gates weights `[3H, I]`.
    pub weight_ih: Param<Tensor<B, 2>>,
    /// Hidden-to-gates weights `[3H, H]`.
    pub weight_hh: Param<Tensor<B, 2>>,
    /// Input bias `[3H]`.
    pub bias_ih: Param<Tensor<B, 1>>,
    /// Hidden bias `[3H]`.
    pub bias_hh: Param<Tensor<B, 1>>,
    /// Reset after the recurrent matmul (`gru`) or before it (`gru-cho`).
    pub reset_after: bool,
}

impl GruConfig {
    /// Builds the cell with PyTorch's initialisation, `U(-1/√H, 1/√H)` everywhere.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Gru<B> {
        let (i, h) = (self.input_size, self.hidden_size);
        let bound = 1.0 / (h as f64).sqrt();
        Gru {
            weight_ih: uniform_param([3 * h, i], bound, device),
            weight_hh: uniform_param([3 * h, h], bound, device),
            bias_ih: uniform_param([3 * h], bound, device),
            bias_hh: uniform_param([3 * h], bound, device),
            reset_after: self.reset_after,
        }
    }
}

impl CellConfig for GruConfig {
    type Cell<B: Backend> = Gru<B>;

    fn names() -> &'static [&'static str] {
        &["gru", "gru-cho"]
    }
    fn from_name(name: &str, input_size: usize, hidden_size: usize) -> Option<Self> {
        let reset_after = match name {
            "gru" => true,
            "gru-cho" => false,
            _ => return None,
        };
        Some(Self::new(input_size, hidden_size).with_reset_after(reset_after))
    }
    fn name(&self) -> &'static str {
        if self.reset_after {
            "gru"
        } else {
            "gru-cho"
        }
    }
    fn input_size(&self) -> usize {
        self.input_size
    }
    fn hidden_size(&self) -> usize {
        self.hidden_size
    }
    fn at_position(&self, position: Position) -> Self {
        Self {
            input_size: position.input_size,
            ..self.clone()
        }
    }
    fn init_cell<B: Backend>(&self, device: &B::Device) -> Gru<B> {
        self.init(device)
    }
}

/// The GRU step. Reset-after: params `[W_hh^T [H, 3H], b_hh [1, 3H]]`, one matmul per step,
/// saved r, z, n and `W_hn h + b_hn`. Reset-before: params `[W_hh^T]` (every bias folded into
/// the projection), one matmul for r, z and one for the candidate, saved r, z, n.
#[derive(Debug, Clone)]
pub struct GruKernel {
    /// Width of the hidden state.
    pub hidden: usize,
    /// Reset after the recurrent matmul.
    pub reset_after: bool,
    /// Recurrent dropout: `H` more input columns, the multiplier of the `h` that the
    /// recurrent products read (the interpolation reads `h` itself).
    pub dropout: bool,
}

impl Recurrence for GruKernel {
    fn input_width(&self) -> usize {
        (3 + usize::from(self.dropout)) * self.hidden
    }
    fn state_width(&self) -> usize {
        self.hidden
    }
    fn output_width(&self) -> usize {
        self.hidden
    }
    fn saved_width(&self) -> usize {
        if self.reset_after {
            4 * self.hidden
        } else {
            3 * self.hidden
        }
    }
    fn host_output_in_state(&self) -> bool {
        true
    }
    fn param_shapes(&self) -> Vec<[usize; 2]> {
        let h = self.hidden;
        if self.reset_after {
            vec![[h, 3 * h], [1, 3 * h]]
        } else {
            vec![[h, 3 * h]]
        }
    }

    fn step<B: Backend>(
        &self,
        params: &[Tensor<B, 2>],
        xp: Tensor<B, 2>,
        h: Tensor<B, 2>,
    ) -> StepOutput<B> {
        let hd = self.hidden;
        let read = masked(&h, product_keep(&xp, self.dropout, hd).as_ref());
        let (r, z, n, extra) = if self.reset_after {
            let hz = read.matmul(params[0].clone()) + params[1].clone();
            let r = sigmoid(cols(&xp, 0, hd) + cols(&hz, 0, hd));
            let z = sigmoid(cols(&xp, hd, hd) + cols(&hz, hd, hd));
            let hn = cols(&hz, 2 * hd, hd);
            let n = (cols(&xp, 2 * hd, hd) + r.clone() * hn.clone()).tanh();
            (r, z, n, Some(hn))
        } else {
            let w = &params[0];
            let hz = read.clone().matmul(cols(w, 0, 2 * hd));
            let r = sigmoid(cols(&xp, 0, hd) + cols(&hz, 0, hd));
            let z = sigmoid(cols(&xp, hd, hd) + cols(&hz, hd, hd));
            let n = (cols(&xp, 2 * hd, hd) + (r.clone() * read).matmul(cols(w, 2 * hd, hd))).tanh();
            (r, z, n, None)
        };
        let h_new = n.clone() + (h - n.clone()) * z.clone();
        let mut saved = vec![r, z, n];
        saved.extend(extra);
        StepOutput {
            output: h_new.clone(),
            state: h_new,
            saved: Some(Tensor::cat(saved, 1)),
        }
    }

    fn step_backward<B: Backend>(
        &self,
        params: &[Tensor<B, 2>],
        step: StepRecord<B>,
        param_grads: &mut [Tensor<B, 2>],
    ) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let hd = self.hidden;
        let saved = step.saved.expect("the GRU saves its gates");
        let (r, z, n) = (
            cols(&saved, 0, hd),
            cols(&saved, hd, hd),
            cols(&saved, 2 * hd, hd),
        );
        let h = step.prev_state;
        let keep = product_keep(&step.xp, self.dropout, hd);
        let read = masked(&h, keep.as_ref());
        let grad_h = step.grad_output + step.grad_state;

        let dn = grad_h.clone() * (z.clone().neg() + 1.0) * tanh_grad(n.clone());
        let dz = grad_h.clone() * (h - n) * sigmoid_grad(z.clone());
        let w = &params[0];
        let (grad_xp, grad_read) = if self.reset_after {
            let hn = cols(&saved, 3 * hd, hd);
            let dr = dn.clone() * hn * sigmoid_grad(r.clone());
            let d_hz = Tensor::cat(vec![dr.clone(), dz.clone(), dn.clone() * r], 1);
            accumulate(&mut param_grads[0], read.transpose().matmul(d_hz.clone()));
            accumulate(&mut param_grads[1], batch_sum(d_hz.clone()));
            let grad_read = d_hz.matmul(w.clone().transpose());
            (vec![dr, dz, dn], grad_read)
        } else {
            let (w_rz, w_n) = (cols(w, 0, 2 * hd), cols(w, 2 * hd, hd));
            let r_read = r.clone() * read.clone();
            let grad_r_read = dn.clone().matmul(w_n.transpose());
            let dr = grad_r_read.clone() * read.clone() * sigmoid_grad(r.clone());
            let d_rz = Tensor::cat(vec![dr.clone(), dz.clone()], 1);
            let grad_read = grad_r_read * r + d_rz.clone().matmul(w_rz.transpose());
            let grad_w = Tensor::cat(
                vec![
                    read.transpose().matmul(d_rz),
                    r_read.transpose().matmul(dn.clone()),
                ],
                1,
            );
            accumulate(&mut param_grads[0], grad_w);
            (vec![dr, dz, dn], grad_read)
        };
        let grad_prev = grad_h * z + masked(&grad_read, keep.as_ref());
        (with_zero_noise_grad(grad_xp, keep), grad_prev)
    }

    fn host_step<F: HostFloat>(
        &self,
        params: &[MatRef<F>],
        xp: MatRef<F>,
        prev: MatRef<F>,
        mut out: MatMut<F>,
    ) {
        let hd = self.hidden;
        let mut buffer = Vec::new();
        let read = host_masked(prev, host_product_keep(xp, self.dropout, hd), &mut buffer);
        // Row layout: [h | r, z, n (, W_hn h + b_hn)] (the output is the state).
        if self.reset_after {
            host::matmul(&mut out.cols_mut(hd, 3 * hd), read, params[0], false);
            let bias = params[1].row(0);
            out.for_each_row(|b, row| {
                let (x, h) = (xp.row(b), prev.row(b));
                let (h_new, saved) = row.split_at_mut(hd);
                host::add_into(&mut saved[..3 * hd], bias);
                let (gates, hn) = saved.split_at_mut(3 * hd);
                hn.copy_from_slice(&gates[2 * hd..]);
                host::add_into(&mut gates[..2 * hd], &x[..2 * hd]);
                F::sigmoid_in_place(&mut gates[..2 * hd]);
                for j in 0..hd {
                    gates[2 * hd + j] = x[2 * hd + j] + gates[j] * hn[j];
                }
                F::tanh_in_place(&mut gates[2 * hd..]);
                blend(h_new, h, gates);
            });
        } else {
            let w = params[0];
            host::matmul(
                &mut out.cols_mut(hd, 2 * hd),
                read,
                w.cols(0, 2 * hd),
                false,
            );
            out.for_each_row(|b, row| {
                let (h_new, rest) = row.split_at_mut(hd);
                let gates = &mut rest[..2 * hd];
                host::add_into(gates, &xp.row(b)[..2 * hd]);
                F::sigmoid_in_place(gates);
                // r ⊙ h goes into the new state's slot until the candidate's matmul has read
                // it.
                for ((o, r), h) in h_new.iter_mut().zip(&gates[..hd]).zip(read.row(b)) {
                    *o = *r * *h;
                }
            });
            let batch = prev.rows();
            let mut candidate = vec![F::zero(); batch * hd];
            let mut rh = vec![F::zero(); batch * hd];
            for b in 0..batch {
                rh[b * hd..(b + 1) * hd].copy_from_slice(&out.row_mut(b)[..hd]);
            }
            host::matmul(
                &mut MatMut::new(&mut candidate, batch, hd),
                MatRef::new(&rh, batch, hd),
                w.cols(2 * hd, hd),
                false,
            );
            out.for_each_row(|b, row| {
                let (h_new, gates) = row.split_at_mut(hd);
                let x_n = &xp.row(b)[2 * hd..];
                let n = &mut gates[2 * hd..3 * hd];
                for j in 0..hd {
                    n[j] = x_n[j] + candidate[b * hd + j];
                }
                F::tanh_in_place(n);
                blend(h_new, prev.row(b), gates);
            });
        }
    }

    fn host_step_backward<F: HostFloat>(
        &self,
        _params: &[MatRef<F>],
        step: HostStep<F>,
        mut grads: HostStepGrads<F>,
    ) {
        let (hd, one) = (self.hidden, F::one());
        let mut buffer = Vec::new();
        let (keep, read) = host_backward_reads(&step, &mut grads, self.dropout, hd, &mut buffer);
        // The operand this step writes: d(W_hh h + b_hh) (reset-after) or r ⊙ h (reset-before).
        let product = if self.reset_after { 0 } else { 1 };
        let (a, g) = &mut grads.products[product];
        let written = if self.reset_after { g } else { a };
        // First pass: everything that does not need the candidate's recurrent gradient.
        host::for_each_row_triple(
            &mut grads.xp,
            &mut grads.prev,
            written,
            |b, dxp, grad_prev, operand| {
                step.fetch_ahead(b);
                // Every slice cut to `hd` first: the loops then run without bounds checks and
                // vectorise.
                let saved = &step.row.row(b)[hd..];
                let (r, z, n) = (&saved[..hd], &saved[hd..2 * hd], &saved[2 * hd..3 * hd]);
                // The state's gradient holds the output's too.
                let (h, grad_state) = (&step.prev.row(b)[..hd], &step.grad_state.row(b)[..hd]);
                let (dx_r, rest) = dxp.split_at_mut(hd);
                let (dx_z, dx_n) = rest.split_at_mut(hd);
                let (dx_r, dx_n, grad_prev) =
                    (&mut dx_r[..hd], &mut dx_n[..hd], &mut grad_prev[..hd]);
                for j in 0..hd {
                    let grad_h = grad_state[j];
                    dx_n[j] = grad_h * (one - z[j]) * (one - n[j] * n[j]);
                    dx_z[j] = grad_h * (h[j] - n[j]) * (z[j] * (one - z[j]));
                    grad_prev[j] = grad_h * z[j];
                }
                if self.reset_after {
                    let hn = &saved[3 * hd..4 * hd];
                    for j in 0..hd {
                        dx_r[j] = dx_n[j] * hn[j] * (r[j] * (one - r[j]));
                    }
                    let (o_rz, o_n) = operand.split_at_mut(2 * hd);
                    o_rz[..hd].copy_from_slice(dx_r);
                    o_rz[hd..].copy_from_slice(dx_z);
                    for ((o, &dn), &r) in o_n[..hd].iter_mut().zip(dx_n.iter()).zip(r) {
                        *o = dn * r;
                    }
                } else {
                    let (operand, h_read) = (&mut operand[..hd], &read.row(b)[..hd]);
                    for j in 0..hd {
                        operand[j] = r[j] * h_read[j];
                    }
                }
            },
        );
        if self.reset_after {
            let d_hz = grads.products[0].1.as_ref();
            host_add_masked_product(&mut grads.prev, d_hz, step.params_t[0], keep);
            return;
        }
        let batch = step.xp.rows();
        let mut grad_r_read = vec![F::zero(); batch * hd];
        host::matmul(
            &mut MatMut::new(&mut grad_r_read, batch, hd),
            grads.xp.as_ref().cols(2 * hd, hd),
            step.params_t[0].rows_range(2 * hd, hd),
            false,
        );
        host::for_each_row_pair(&mut grads.xp, &mut grads.prev, |b, dxp, grad_prev| {
            let r = &step.row.row(b)[hd..2 * hd];
            let (h_read, grad) = (&read.row(b)[..hd], &grad_r_read[b * hd..(b + 1) * hd]);
            let dx_r = &mut dxp[..hd];
            for j in 0..hd {
                dx_r[j] = grad[j] * h_read[j] * (r[j] * (one - r[j]));
            }
            host_add_gated_read(grad_prev, grad, r, keep.map(|k| k.row(b)));
        });
        let d_rz = grads.xp.as_ref().cols(0, 2 * hd);
        host_add_masked_product(
            &mut grads.prev,
            d_rz,
            step.params_t[0].rows_range(0, 2 * hd),
            keep,
        );
    }

    fn with_product_dropout(&self) -> Option<Self> {
        Some(Self {
            dropout: true,
            ..self.clone()
        })
    }

    fn as_plain_gru(&self) -> Option<usize> {
        // The fused GPU kernel knows neither the reset-before variant nor dropout.
        (self.reset_after && !self.dropout).then_some(self.hidden)
    }

    fn host_weight_products(&self) -> Vec<WeightProduct> {
        let hd = self.hidden;
        // Under dropout the products read the masked state, which the step writes.
        let state = if self.dropout {
            Operand::Written
        } else {
            Operand::PrevState(0)
        };
        if self.reset_after {
            vec![
                WeightProduct {
                    param: 0,
                    col: 0,
                    k: hd,
                    n: 3 * hd,
                    a: state,
                    g: Operand::Written,
                },
                // b_hh's gradient: the same g_t summed over the batch.
                WeightProduct {
                    param: 1,
                    col: 0,
                    k: 1,
                    n: 3 * hd,
                    a: Operand::Ones,
                    g: Operand::GradOf(0),
                },
            ]
        } else {
            vec![
                WeightProduct {
                    param: 0,
                    col: 0,
                    k: hd,
                    n: 2 * hd,
                    a: state,
                    g: Operand::GradInput(0),
                },
                WeightProduct {
                    param: 0,
                    col: 2 * hd,
                    k: hd,
                    n: hd,
                    a: Operand::Written,
                    g: Operand::GradInput(2 * hd),
                },
            ]
        }
    }
}

/// `h' = n + (h − n) ⊙ z` from the gates `[r, z, n, …]`.
fn blend<F: HostFloat>(h_new: &mut [F], h: &[F], gates: &[F]) {
    let hd = h_new.len();
    for j in 0..hd {
        let (z, n) = (gates[hd + j], gates[2 * hd + j]);
        h_new[j] = n + (h[j] - n) * z;
    }
}

impl<B: Backend> Cell<B> for Gru<B> {
    type Kernel = GruKernel;

    fn input_size(&self) -> usize {
        self.weight_ih.dims()[1]
    }
    fn hidden_size(&self) -> usize {
        self.weight_hh.dims()[1]
    }
    fn state_names(&self) -> &'static [&'static str] {
        &["h"]
    }
    fn kernel(&self) -> GruKernel {
        GruKernel {
            hidden: self.hidden_size(),
            reset_after: self.reset_after,
            dropout: false,
        }
    }
    fn input_affine(&self) -> (Tensor<B, 2>, Option<Tensor<B, 1>>) {
        let bias = if self.reset_after {
            self.bias_ih.val()
        } else {
            self.bias_ih.val() + self.bias_hh.val()
        };
        (self.weight_ih.val(), Some(bias))
    }
    fn recurrent_params(&self) -> Tensor<B, 1> {
        let mut params = vec![self.weight_hh.val().transpose()];
        if self.reset_after {
            params.push(self.bias_hh.val().unsqueeze_dim(0));
        }
        flatten_params(params)
    }

    fn load_layer(
        cells: Vec<Self>,
        layer: usize,
        source: &mut dyn TensorSource,
    ) -> Result<Vec<Self>, ImportError> {
        load_torch_layer(cells, layer, source)
    }

    fn save_layer(cells: &[Self], layer: usize) -> Vec<(String, TensorData)> {
        save_torch_layer(cells, layer)
    }
}

super::torch_style!(Gru);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::{
        compare_step, compare_step_reading, finite_differences,
        reference::{self, *},
    };
    use crate::layer::RnnLayerConfig;
    use reference::sigmoid;

    /// The GRU equations of design.md §3, one batch row, in plain f64; the recurrent products
    /// read `read` (`h`, or `h ⊙ m` under recurrent dropout).
    fn reference_step(
        w: &Weights,
        x: &[f64],
        state: &[Vec<f64>],
        read: &[f64],
        reset_after: bool,
    ) -> (Vec<f64>, Vec<Vec<f64>>) {
        let h = &state[0];
        let n = h.len();
        let gx = add(&w.mat("weight_ih_l0").matvec(x), &w.vec("bias_ih_l0"));
        let w_hh = w.mat("weight_hh_l0");
        let b_hh = w.vec("bias_hh_l0");
        let gh_rz = add(&w_hh.rows(0, 2 * n).matvec(read), &part(&b_hh, 0, 2 * n));
        let r: Vec<f64> = (0..n).map(|j| sigmoid(gx[j] + gh_rz[j])).collect();
        let z: Vec<f64> = (0..n).map(|j| sigmoid(gx[n + j] + gh_rz[n + j])).collect();
        let w_hn = w_hh.rows(2 * n, n);
        let b_hn = part(&b_hh, 2 * n, n);
        let cand: Vec<f64> = if reset_after {
            let hn = add(&w_hn.matvec(read), &b_hn);
            (0..n)
                .map(|j| (gx[2 * n + j] + r[j] * hn[j]).tanh())
                .collect()
        } else {
            let rh: Vec<f64> = (0..n).map(|j| r[j] * read[j]).collect();
            let hn = add(&w_hn.matvec(&rh), &b_hn);
            (0..n).map(|j| (gx[2 * n + j] + hn[j]).tanh()).collect()
        };
        let h_new: Vec<f64> = (0..n)
            .map(|j| (1.0 - z[j]) * cand[j] + z[j] * h[j])
            .collect();
        (h_new.clone(), vec![h_new])
    }

    #[test]
    fn step_matches_f64_reference() {
        for reset_after in [true, false] {
            let config = GruConfig::new(3, 4).with_reset_after(reset_after);
            let err = compare_step(config, 3, |w, x, s| {
                reference_step(w, x, s, &s[0], reset_after)
            });
            assert!(err < 1e-12, "reset_after={reset_after}: {err:e}");
        }
    }

    /// Recurrent dropout masks the `h` of the recurrent products, not of the interpolation.
    #[test]
    fn recurrent_dropout_masks_only_what_the_products_read() {
        for reset_after in [true, false] {
            let config = GruConfig::new(3, 4).with_reset_after(reset_after);
            let err = compare_step_reading(config, 3, 0.5, |w, x, s, read| {
                reference_step(w, x, s, &read[0], reset_after)
            });
            assert!(err < 1e-12, "reset_after={reset_after}: {err:e}");
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        for reset_after in [true, false] {
            let config = RnnLayerConfig::new(GruConfig::new(3, 4).with_reset_after(reset_after));
            finite_differences(&config, 2, 4, None);
        }
    }
}
