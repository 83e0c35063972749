//! The minimal gated unit (Zhou et al. 2016): one forget gate does the work of the GRU's two,
//! `f = σ(W_f x + U_f h + b_f)`, `h̃ = tanh(W_h x + U_h (f ⊙ h) + b_h)`,
//! `h' = (1 − f) ⊙ h + f ⊙ h̃`. Recurrent dropout: both products read `h ⊙ m`, the
//! interpolation reads `h` ([`MguKernel::dropout`]).
//!
//! Tensors in PyTorch's style: `weight_ih [2H, I]`, `weight_hh [2H, H]`, `bias_ih [2H]`,
//! `bias_hh [2H]`, rows f then h̃.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Tensor, TensorData};

use super::{
    accumulate, cols, flatten_params, load_torch_layer, save_torch_layer, sigmoid, sigmoid_grad,
    tanh_grad, uniform_param, Cell,
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

/// Configuration of an [`Mgu`] cell.
#[derive(Config, Debug, PartialEq)]
pub struct MguConfig {
    /// Width of the input.
    pub input_size: usize,
    /// Width of the hidden state.
    pub hidden_size: usize,
}

/// A minimal gated unit.
#[derive(Module, Debug)]
pub struct Mgu<B: Backend> {
    /// Input-to-gates weights `[2H, I]`.
    pub weight_ih: Param<Tensor<B, 2>>,
    /// Hidden-to-gates weights `[2H, H]`.
    pub weight_hh: Param<Tensor<B, 2>>,
    /// Input bias `[2H]`.
    pub bias_ih: Param<Tensor<B, 1>>,
    /// Hidden bias `[2H]`.
    pub bias_hh: Param<Tensor<B, 1>>,
}

impl MguConfig {
    /// Builds the cell with PyTorch's GRU initialisation, `U(-1/√H, 1/√H)` everywhere.
    pub fn init<B: Backend>(&self, device: &B::Device) -> Mgu<B> {
        let (i, h) = (self.input_size, self.hidden_size);
        let bound = 1.0 / (h as f64).sqrt();
        Mgu {
            weight_ih: uniform_param([2 * h, i], bound, device),
            weight_hh: uniform_param([2 * h, h], bound, device),
            bias_ih: uniform_param([2 * h], bound, device),
            bias_hh: uniform_param([2 * h], bound, device),
        }
    }
}

super::single_name_config!(MguConfig => Mgu, "mgu");

/// The MGU step: params `[W_hh^T [H, 2H]]` (biases folded into the projection), one matmul
/// for the gate and one for the candidate; saved `[f, h̃]`.
#[derive(Debug, Clone)]
pub struct MguKernel {
    /// Width of the hidden state.
    pub hidden: usize,
    /// Recurrent dropout: `H` more input columns, the multiplier of the `h` that the
    /// recurrent products read (the interpolation reads `h` itself).
    pub dropout: bool,
}

impl Recurrence for MguKernel {
    fn input_width(&self) -> usize {
        (2 + usize::from(self.dropout)) * self.hidden
    }
    fn state_width(&self) -> usize {
        self.hidden
    }
    fn output_width(&self) -> usize {
        self.hidden
    }
    fn saved_width(&self) -> usize {
        2 * self.hidden
    }
    fn host_output_in_state(&self) -> bool {
        true
    }
    fn param_shapes(&self) -> Vec<[usize; 2]> {
        vec![[self.hidden, 2 * self.hidden]]
    }

    fn step<B: Backend>(
        &self,
        params: &[Tensor<B, 2>],
        xp: Tensor<B, 2>,
        h: Tensor<B, 2>,
    ) -> StepOutput<B> {
        let hd = self.hidden;
        let w = &params[0];
        let read = masked(&h, product_keep(&xp, self.dropout, hd).as_ref());
        let f = sigmoid(cols(&xp, 0, hd) + read.clone().matmul(cols(w, 0, hd)));
        let n = (cols(&xp, hd, hd) + (f.clone() * read).matmul(cols(w, hd, hd))).tanh();
        let h_new = h.clone() + (n.clone() - h) * f.clone();
        StepOutput {
            output: h_new.clone(),
            state: h_new,
            saved: Some(Tensor::cat(vec![f, n], 1)),
        }
    }

    fn step_backward<B: Backend>(
        &self,
        params: &[Tensor<B, 2>],
        step: StepRecord<B>,
        param_grads: &mut [Tensor<B, 2>],
    ) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let hd = self.hidden;
        let saved = step.saved.expect("the MGU saves its gate and candidate");
        let (f, n) = (cols(&saved, 0, hd), cols(&saved, hd, hd));
        let h = step.prev_state;
        let keep = product_keep(&step.xp, self.dropout, hd);
        let read = masked(&h, keep.as_ref());
        let grad_h = step.grad_output + step.grad_state;
        let (w_f, w_n) = (cols(&params[0], 0, hd), cols(&params[0], hd, hd));

        let dn = grad_h.clone() * f.clone() * tanh_grad(n.clone());
        let grad_f_read = dn.clone().matmul(w_n.transpose());
        let df = (grad_h.clone() * (n - h) + grad_f_read.clone() * read.clone())
            * sigmoid_grad(f.clone());
        let grad_read = grad_f_read * f.clone() + df.clone().matmul(w_f.transpose());
        let grad_prev = grad_h * (f.clone().neg() + 1.0) + masked(&grad_read, keep.as_ref());
        let grad_w = Tensor::cat(
            vec![
                read.clone().transpose().matmul(df.clone()),
                (f * read).transpose().matmul(dn.clone()),
            ],
            1,
        );
        accumulate(&mut param_grads[0], grad_w);
        (with_zero_noise_grad(vec![df, dn], keep), grad_prev)
    }

    fn host_step<F: HostFloat>(
        &self,
        params: &[MatRef<F>],
        xp: MatRef<F>,
        prev: MatRef<F>,
        mut out: MatMut<F>,
    ) {
        let hd = self.hidden;
        let w = params[0];
        let mut buffer = Vec::new();
        let read = host_masked(prev, host_product_keep(xp, self.dropout, hd), &mut buffer);
        // Row layout: [h | f, h̃] (the output is the state).
        host::matmul(&mut out.cols_mut(hd, hd), read, w.cols(0, hd), false);
        let batch = prev.rows();
        let mut fh = vec![F::zero(); batch * hd];
        out.for_each_row(|b, row| {
            let f = &mut row[hd..2 * hd];
            host::add_into(f, &xp.row(b)[..hd]);
            F::sigmoid_in_place(f);
        });
        for b in 0..batch {
            let (f, h) = (&out.row_mut(b)[hd..2 * hd], read.row(b));
            for j in 0..hd {
                fh[b * hd + j] = f[j] * h[j];
            }
        }
        let mut candidate = vec![F::zero(); batch * hd];
        host::matmul(
            &mut MatMut::new(&mut candidate, batch, hd),
            MatRef::new(&fh, batch, hd),
            w.cols(hd, hd),
            false,
        );
        out.for_each_row(|b, row| {
            let (h_new, saved) = row.split_at_mut(hd);
            let (f, n) = saved.split_at_mut(hd);
            let (x_n, h) = (&xp.row(b)[hd..], prev.row(b));
            for j in 0..hd {
                n[j] = x_n[j] + candidate[b * hd + j];
            }
            F::tanh_in_place(n);
            for j in 0..hd {
                h_new[j] = h[j] + (n[j] - h[j]) * f[j];
            }
        });
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
        let (fh, _) = &mut grads.products[1];
        // First pass: dh̃, f ⊙ h, the direct part of the gate's gradient (kept in its slot)
        // and the direct part of the previous state's.
        host::for_each_row_triple(
            &mut grads.xp,
            &mut grads.prev,
            fh,
            |b, dxp, grad_prev, operand| {
                step.fetch_ahead(b);
                // Every slice cut to `hd` first: the loop then runs without bounds checks and
                // vectorises.
                let saved = &step.row.row(b)[hd..];
                let (f, n) = (&saved[..hd], &saved[hd..2 * hd]);
                let (h, h_read) = (&step.prev.row(b)[..hd], &read.row(b)[..hd]);
                // The state's gradient holds the output's too.
                let grad_state = &step.grad_state.row(b)[..hd];
                let (dx_f, dx_n) = dxp.split_at_mut(hd);
                let (dx_n, grad_prev, operand) =
                    (&mut dx_n[..hd], &mut grad_prev[..hd], &mut operand[..hd]);
                for j in 0..hd {
                    let grad_h = grad_state[j];
                    dx_n[j] = grad_h * f[j] * (one - n[j] * n[j]);
                    dx_f[j] = grad_h * (n[j] - h[j]);
                    grad_prev[j] = grad_h * (one - f[j]);
                    operand[j] = f[j] * h_read[j];
                }
            },
        );
        let batch = step.xp.rows();
        let mut grad_f_read = vec![F::zero(); batch * hd];
        host::matmul(
            &mut MatMut::new(&mut grad_f_read, batch, hd),
            grads.xp.as_ref().cols(hd, hd),
            step.params_t[0].rows_range(hd, hd),
            false,
        );
        host::for_each_row_pair(&mut grads.xp, &mut grads.prev, |b, dxp, grad_prev| {
            let f = &step.row.row(b)[hd..2 * hd];
            let (h_read, grad) = (&read.row(b)[..hd], &grad_f_read[b * hd..(b + 1) * hd]);
            let dx_f = &mut dxp[..hd];
            for j in 0..hd {
                dx_f[j] = (dx_f[j] + grad[j] * h_read[j]) * (f[j] * (one - f[j]));
            }
            host_add_gated_read(grad_prev, grad, f, keep.map(|k| k.row(b)));
        });
        let df = grads.xp.as_ref().cols(0, hd);
        host_add_masked_product(
            &mut grads.prev,
            df,
            step.params_t[0].rows_range(0, hd),
            keep,
        );
    }

    fn with_product_dropout(&self) -> Option<Self> {
        Some(Self {
            dropout: true,
            ..self.clone()
        })
    }

    fn host_weight_products(&self) -> Vec<WeightProduct> {
        let hd = self.hidden;
        vec![
            WeightProduct {
                param: 0,
                col: 0,
                k: hd,
                n: hd,
                // Under dropout the gate reads the masked state, which the step writes.
                a: if self.dropout {
                    Operand::Written
                } else {
                    Operand::PrevState(0)
                },
                g: Operand::GradInput(0),
            },
            WeightProduct {
                param: 0,
                col: hd,
                k: hd,
                n: hd,
                a: Operand::Written,
                g: Operand::GradInput(hd),
            },
        ]
    }
}

impl<B: Backend> Cell<B> for Mgu<B> {
    type Kernel = MguKernel;

    fn input_size(&self) -> usize {
        self.weight_ih.dims()[1]
    }
    fn hidden_size(&self) -> usize {
        self.weight_hh.dims()[1]
    }
    fn state_names(&self) -> &'static [&'static str] {
        &["h"]
    }
    fn kernel(&self) -> MguKernel {
        MguKernel {
            hidden: self.hidden_size(),
            dropout: false,
        }
    }
    fn input_affine(&self) -> (Tensor<B, 2>, Option<Tensor<B, 1>>) {
        let bias = self.bias_ih.val() + self.bias_hh.val();
        (self.weight_ih.val(), Some(bias))
    }
    fn recurrent_params(&self) -> Tensor<B, 1> {
        flatten_params(vec![self.weight_hh.val().transpose()])
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

super::torch_style!(Mgu);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::{
        compare_step, compare_step_reading, finite_differences,
        reference::{self, *},
    };
    use crate::layer::RnnLayerConfig;
    use reference::sigmoid;

    /// The MGU equations, one batch row, in plain f64; the recurrent products read `read`
    /// (`h`, or `h ⊙ m` under recurrent dropout).
    fn reference_step(
        w: &Weights,
        x: &[f64],
        state: &[Vec<f64>],
        read: &[f64],
    ) -> (Vec<f64>, Vec<Vec<f64>>) {
        let h = &state[0];
        let n = h.len();
        let gx = add(&w.mat("weight_ih_l0").matvec(x), &w.vec("bias_ih_l0"));
        let (w_hh, b_hh) = (w.mat("weight_hh_l0"), w.vec("bias_hh_l0"));
        let gh_f = add(&w_hh.rows(0, n).matvec(read), &part(&b_hh, 0, n));
        let f: Vec<f64> = (0..n).map(|j| sigmoid(gx[j] + gh_f[j])).collect();
        let fh: Vec<f64> = (0..n).map(|j| f[j] * read[j]).collect();
        let gh_n = add(&w_hh.rows(n, n).matvec(&fh), &part(&b_hh, n, n));
        let h_new: Vec<f64> = (0..n)
            .map(|j| (1.0 - f[j]) * h[j] + f[j] * (gx[n + j] + gh_n[j]).tanh())
            .collect();
        (h_new.clone(), vec![h_new])
    }

    #[test]
    fn step_matches_f64_reference() {
        let err = compare_step(MguConfig::new(3, 4), 3, |w, x, s| {
            reference_step(w, x, s, &s[0])
        });
        assert!(err < 1e-12, "{err:e}");
    }

    /// Recurrent dropout masks the `h` of the recurrent products, not of the interpolation.
    #[test]
    fn recurrent_dropout_masks_only_what_the_products_read() {
        let err = compare_step_reading(MguConfig::new(3, 4), 3, 0.5, |w, x, s, read| {
            reference_step(w, x, s, &read[0])
        });
        assert!(err < 1e-12, "{err:e}");
    }

    #[test]
    fn gradients_match_finite_differences() {
        finite_differences(&RnnLayerConfig::new(MguConfig::new(3, 4)), 2, 4, None);
    }
}
