//! SRU (Lei et al. 2018) with the semantics of the official `sru` 2.6 package:
//! `U = x W` for every step at once (k = 3 blocks, or 4 with a skip projection when the layer's
//! input width differs from its output width), then an elementwise recurrence
//! `f = σ(U1 + v_f⊙c + b_f)`, `r = σ(U2 + v_r⊙c + b_r)`, `c' = f⊙c + (1−f)⊙U0`,
//! `h = r⊙act(c') + (1−r)⊙x'`, with `x' = x·scale_x` (k = 3) or `U3` (k = 4).
//!
//! One zoo cell is one direction. State-dict names are the official ones, per layer:
//! `rnn_lst.{k}.weight [I, dirs·H·k]` (blocks interleaved per hidden unit), `weight_c` and
//! `bias` `[2·dirs·H]` (forget then reset, each direction's H values in turn), and the buffer
//! `scale_x [1]`.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, ElementConversion, Tensor, TensorData};

use super::{
    accumulate, batch_sum, cols, flatten_params, sigmoid, sigmoid_grad, tanh_grad, uniform_param,
    Cell, CellConfig, Position,
};
use crate::host::{
    self, HostFloat, HostStep, HostStepGrads, MatMut, MatRef, Operand, WeightProduct,
};
use crate::import::{ImportError, TensorSource};
use crate::ops::{Passthrough, Recurrence, StepOutput, StepRecord};
use crate::regularisation::{host_product_keep, masked, product_keep, with_zero_noise_grad};

/// Configuration of an [`Sru`] cell (one direction of an official SRU layer).
#[derive(Config, Debug, PartialEq)]
pub struct SruConfig {
    /// Width of the layer input.
    pub input_size: usize,
    /// Width of the hidden state.
    pub hidden_size: usize,
    /// Initial bias of the reset (highway) gate.
    #[config(default = 0.0)]
    pub highway_bias: f64,
    /// Scale the skip term by `√(1 + 2·e^{highway_bias})` (k = 3 only).
    #[config(default = false)]
    pub rescale: bool,
    /// `h = r⊙tanh(c') + ..` instead of `r⊙c' + ..`.
    #[config(default = false)]
    pub use_tanh: bool,
    /// Keep the highway term `(1−r)⊙x'`.
    #[config(default = true)]
    pub has_skip_term: bool,
    /// Width of the layer output (`hidden · directions`); k = 3 when it equals `input_size`.
    /// `None` means `hidden_size` (one direction).
    #[config(default = "None")]
    pub output_size: Option<usize>,
    /// Which direction of the layer this cell is (its skip term reads its own slice of x).
    #[config(default = 0)]
    pub direction: usize,
}

/// One direction of an SRU layer.
#[derive(Module, Debug)]
pub struct Sru<B: Backend> {
    /// `[I, H·k]`, blocks interleaved per hidden unit as in the official package.
    pub weight: Param<Tensor<B, 2>>,
    /// `[2H]`: `v_f` then `v_r`.
    pub weight_c: Param<Tensor<B, 1>>,
    /// `[2H]`: `b_f` then `b_r` (already holding the highway bias).
    pub bias: Param<Tensor<B, 1>>,
    /// Scale of the skip term when k = 3 (a buffer, not trained).
    pub scale_x: f64,
    /// Use `tanh(c')` in the output.
    pub use_tanh: bool,
    /// Keep the highway term.
    pub has_skip_term: bool,
    /// First column of this direction's slice of x in the skip term (k = 3).
    pub skip_offset: usize,
    /// Width of the hidden state.
    pub hidden: usize,
}

impl SruConfig {
    fn blocks(&self) -> usize {
        if self.input_size == self.output_size.unwrap_or(self.hidden_size) {
            3
        } else {
            4
        }
    }

    /// Builds the cell: `weight ~ U(±√(3/I))` (unit-variance projections for unit-variance
    /// inputs), `weight_c ~ U(±½√(3/H))`, forget bias 0, reset bias `highway_bias`, and
    /// `scale_x = √(1 + 2·e^{highway_bias})` when rescaling (else 1).
    pub fn init<B: Backend>(&self, device: &B::Device) -> Sru<B> {
        let (i, h, k) = (self.input_size, self.hidden_size, self.blocks());
        let scale_x = if self.rescale && self.has_skip_term && k == 3 {
            (1.0 + 2.0 * self.highway_bias.exp()).sqrt()
        } else {
            1.0
        };
        let bias = Tensor::<B, 1>::zeros([2 * h], device).slice_fill(h..2 * h, self.highway_bias);
        Sru {
            weight: uniform_param([i, h * k], (3.0 / i as f64).sqrt(), device),
            weight_c: uniform_param([2 * h], 0.5 * (3.0 / h as f64).sqrt(), device),
            bias: Param::from_tensor(bias),
            scale_x,
            use_tanh: self.use_tanh,
            has_skip_term: self.has_skip_term,
            skip_offset: self.direction * h,
            hidden: h,
        }
    }
}

impl CellConfig for SruConfig {
    type Cell<B: Backend> = Sru<B>;

    fn names() -> &'static [&'static str] {
        &["sru"]
    }
    fn from_name(name: &str, input_size: usize, hidden_size: usize) -> Option<Self> {
        (name == "sru").then(|| Self::new(input_size, hidden_size))
    }
    fn name(&self) -> &'static str {
        "sru"
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
            output_size: Some(self.hidden_size * position.num_directions),
            direction: position.direction,
            ..self.clone()
        }
    }
    fn init_cell<B: Backend>(&self, device: &B::Device) -> Sru<B> {
        self.init(device)
    }
}

/// The SRU step: elementwise only. Input per step `[U0 | U1 | U2 | x']`, state `c`, output
/// `h`, params `[v_f | v_r]` and `[b_f | b_r]` (each `[1, 2H]`), saved `[f | r]`.
#[derive(Debug, Clone)]
pub struct SruKernel {
    /// Width of the hidden state.
    pub hidden: usize,
    /// Use `tanh(c')` in the output.
    pub use_tanh: bool,
    /// Recurrent dropout: `H` more input columns, the multiplier of the `c` that the gates
    /// read (`v ⊙ c`, the cell's recurrent connections); the carry `f ⊙ c` reads `c` itself.
    pub dropout: bool,
}

impl SruKernel {
    fn activation<B: Backend>(&self, c: Tensor<B, 2>) -> Tensor<B, 2> {
        if self.use_tanh {
            c.tanh()
        } else {
            c
        }
    }
}

/// The four `hd`-wide parts of an SRU step's projected input: `[x̃ | x_f | x_r | skip]`.
fn sru_input_parts<F>(x: &[F], hd: usize) -> (&[F], &[F], &[F], &[F]) {
    (
        &x[..hd],
        &x[hd..2 * hd],
        &x[2 * hd..3 * hd],
        &x[3 * hd..4 * hd],
    )
}

/// The activated gates of one row, `f` and `r`, from the `c` the gates read (`c ⊙ keep` under
/// dropout).
#[inline(always)]
fn sru_gates<F: HostFloat>(
    c: &[F],
    keep: Option<&[F]>,
    (x_f, x_r): (&[F], &[F]),
    (v_f, v_r): (&[F], &[F]),
    (b_f, b_r): (&[F], &[F]),
    f: &mut [F],
    r: &mut [F],
) {
    let hd = r.len();
    let (c, f, keep) = (&c[..hd], &mut f[..hd], keep.map(|k| &k[..hd]));
    let (x_f, x_r, v_f, v_r, b_f, b_r) = (
        &x_f[..hd],
        &x_r[..hd],
        &v_f[..hd],
        &v_r[..hd],
        &b_f[..hd],
        &b_r[..hd],
    );
    for j in 0..hd {
        // The c the gates read (through the dropout mask, if any).
        let read = match keep {
            Some(k) => c[j] * k[j],
            None => c[j],
        };
        f[j] = x_f[j] + v_f[j] * read + b_f[j];
        r[j] = x_r[j] + v_r[j] * read + b_r[j];
    }
    F::sigmoid_in_place(f);
    F::sigmoid_in_place(r);
}

impl Recurrence for SruKernel {
    fn input_width(&self) -> usize {
        (4 + usize::from(self.dropout)) * self.hidden
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
    fn host_saved_width(&self) -> usize {
        // The host backward recomputes f and r from the input and c (a few FLOPs per value)
        // rather than write and read back 2H values per row: the step is memory-bound.
        0
    }
    fn param_shapes(&self) -> Vec<[usize; 2]> {
        vec![[1, 2 * self.hidden], [1, 2 * self.hidden]]
    }

    fn step<B: Backend>(
        &self,
        params: &[Tensor<B, 2>],
        xp: Tensor<B, 2>,
        c: Tensor<B, 2>,
    ) -> StepOutput<B> {
        let hd = self.hidden;
        let (v, b) = (&params[0], &params[1]);
        let read = masked(&c, product_keep(&xp, self.dropout, hd).as_ref());
        let f = sigmoid(cols(&xp, hd, hd) + cols(v, 0, hd) * read.clone() + cols(b, 0, hd));
        let r = sigmoid(cols(&xp, 2 * hd, hd) + cols(v, hd, hd) * read + cols(b, hd, hd));
        let u0 = cols(&xp, 0, hd);
        let c_new = u0.clone() + (c - u0) * f.clone();
        let skip = cols(&xp, 3 * hd, hd);
        let h = skip.clone() + (self.activation(c_new.clone()) - skip) * r.clone();
        StepOutput {
            output: h,
            state: c_new,
            saved: Some(Tensor::cat(vec![f, r], 1)),
        }
    }

    fn step_backward<B: Backend>(
        &self,
        params: &[Tensor<B, 2>],
        step: StepRecord<B>,
        param_grads: &mut [Tensor<B, 2>],
    ) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let hd = self.hidden;
        let saved = step.saved.expect("the SRU saves its gates");
        let (f, r) = (cols(&saved, 0, hd), cols(&saved, hd, hd));
        let (c_prev, c_new) = (step.prev_state, step.state);
        let (u0, skip) = (cols(&step.xp, 0, hd), cols(&step.xp, 3 * hd, hd));
        let grad_h = step.grad_output;

        let act = self.activation(c_new.clone());
        let act_slope = if self.use_tanh {
            tanh_grad(act.clone())
        } else {
            c_new.ones_like()
        };
        let dz_r = grad_h.clone() * (act - skip) * sigmoid_grad(r.clone());
        let grad_skip = grad_h.clone() * (r.clone().neg() + 1.0);
        let grad_c = step.grad_state + grad_h * r * act_slope;
        let dz_f = grad_c.clone() * (c_prev.clone() - u0) * sigmoid_grad(f.clone());
        let grad_u0 = grad_c.clone() * (f.clone().neg() + 1.0);

        let v = &params[0];
        let keep = product_keep(&step.xp, self.dropout, hd);
        let read = masked(&c_prev, keep.as_ref());
        let grad_read = dz_f.clone() * cols(v, 0, hd) + dz_r.clone() * cols(v, hd, hd);
        let grad_c_prev = grad_c * f + masked(&grad_read, keep.as_ref());
        let grad_v = Tensor::cat(
            vec![
                batch_sum(dz_f.clone() * read.clone()),
                batch_sum(dz_r.clone() * read),
            ],
            1,
        );
        accumulate(&mut param_grads[0], grad_v);
        accumulate(
            &mut param_grads[1],
            Tensor::cat(vec![batch_sum(dz_f.clone()), batch_sum(dz_r.clone())], 1),
        );
        (
            with_zero_noise_grad(vec![grad_u0, dz_f, dz_r, grad_skip], keep),
            grad_c_prev,
        )
    }

    fn host_step<F: HostFloat>(
        &self,
        params: &[MatRef<F>],
        xp: MatRef<F>,
        prev: MatRef<F>,
        mut out: MatMut<F>,
    ) {
        let hd = self.hidden;
        let (v, bias) = (params[0].row(0), params[1].row(0));
        let ((v_f, v_r), (b_f, b_r)) = (v[..2 * hd].split_at(hd), bias[..2 * hd].split_at(hd));
        let keep = host_product_keep(xp, self.dropout, hd);
        // Row layout: [h | c]; the gates are not saved (see `host_saved_width`). Every slice
        // below is cut to `hd` so that the loops compile without bounds checks, and vectorise.
        out.for_each_row(|b, row| {
            let (u0, x_f, x_r, skip) = sru_input_parts(xp.row(b), hd);
            let c = &prev.row(b)[..hd];
            let (h, c_new) = row[..2 * hd].split_at_mut(hd);
            // f in c_new's slot, r in h's, until c' and h are computed from them.
            sru_gates(
                c,
                keep.map(|k| k.row(b)),
                (x_f, x_r),
                (v_f, v_r),
                (b_f, b_r),
                c_new,
                h,
            );
            for j in 0..hd {
                c_new[j] = u0[j] + (c[j] - u0[j]) * c_new[j];
            }
            if self.use_tanh {
                // tanh(c') and r are both needed: tanh a chunk at a time on the stack.
                const CHUNK: usize = 32;
                for ((h, c_new), skip) in h
                    .chunks_mut(CHUNK)
                    .zip(c_new.chunks(CHUNK))
                    .zip(skip.chunks(CHUNK))
                {
                    let mut act = [F::zero(); CHUNK];
                    let act = &mut act[..c_new.len()];
                    act.copy_from_slice(c_new);
                    F::tanh_in_place(act);
                    for (j, h) in h.iter_mut().enumerate() {
                        *h = skip[j] + (act[j] - skip[j]) * *h;
                    }
                }
            } else {
                for j in 0..hd {
                    h[j] = skip[j] + (c_new[j] - skip[j]) * h[j];
                }
            }
        });
    }

    fn host_step_backward<F: HostFloat>(
        &self,
        params: &[MatRef<F>],
        step: HostStep<F>,
        mut grads: HostStepGrads<F>,
    ) {
        let (hd, one) = (self.hidden, F::one());
        let (v_f, v_r) = params[0].row(0)[..2 * hd].split_at(hd);
        let (b_f, b_r) = params[1].row(0)[..2 * hd].split_at(hd);
        // tanh'(c') = 1 − act², or 1 without the tanh: no branch inside the loop.
        let tanh_on = if self.use_tanh { one } else { F::zero() };
        let keep = host_product_keep(step.xp, self.dropout, hd);
        host::for_each_row_pair(&mut grads.xp, &mut grads.prev, |b, dxp, grad_c_prev| {
            step.fetch_ahead(b);
            let c_new = &step.row.row(b)[hd..2 * hd];
            let (u0, x_f, x_r, skip) = sru_input_parts(step.xp.row(b), hd);
            let c_prev = &step.prev.row(b)[..hd];
            let (go, gs) = (
                &step.grad_output.row(b)[..hd],
                &step.grad_state.row(b)[..hd],
            );
            let (dx_u0, rest) = dxp.split_at_mut(hd);
            let (dz_f, rest) = rest.split_at_mut(hd);
            let (dz_r, rest) = rest.split_at_mut(hd);
            let (dx_skip, dx_keep) = rest.split_at_mut(hd);
            let grad_c_prev = &mut grad_c_prev[..hd];
            // The gates again, as the forward computed them, in dz_f's and dz_r's slots: each
            // is read below before its gradient overwrites it.
            sru_gates(
                c_prev,
                keep.map(|k| k.row(b)),
                (x_f, x_r),
                (v_f, v_r),
                (b_f, b_r),
                dz_f,
                dz_r,
            );
            // tanh(c') waits in the c_prev gradient's slot until element j is written;
            // without the tanh, act(c') is c' itself.
            let c_new = &c_new[..hd];
            if self.use_tanh {
                grad_c_prev.copy_from_slice(c_new);
                F::tanh_in_place(grad_c_prev);
            }
            for j in 0..hd {
                let act = if self.use_tanh {
                    grad_c_prev[j]
                } else {
                    c_new[j]
                };
                let (fj, rj) = (dz_f[j], dz_r[j]);
                let slope = one - tanh_on * act * act;
                dz_r[j] = go[j] * (act - skip[j]) * (rj * (one - rj));
                let grad_c = gs[j] + go[j] * rj * slope;
                dz_f[j] = grad_c * (c_prev[j] - u0[j]) * (fj * (one - fj));
                dx_u0[j] = grad_c * (one - fj);
                dx_skip[j] = go[j] * (one - rj);
                // The carry's part; the gates' part (through `v`) is added below.
                grad_c_prev[j] = grad_c * fj;
            }
            let through_v = (0..hd).map(|j| dz_f[j] * v_f[j] + dz_r[j] * v_r[j]);
            match keep {
                Some(keep) => {
                    let keep = &keep.row(b)[..hd];
                    for ((g, read), &k) in grad_c_prev.iter_mut().zip(through_v).zip(keep) {
                        *g += read * k;
                    }
                    // Noise is not learnt.
                    dx_keep.fill(F::zero());
                }
                None => grad_c_prev
                    .iter_mut()
                    .zip(through_v)
                    .for_each(|(g, read)| *g += read),
            }
        });
        // v's gradient is a sum over the batch of dz ⊙ (the c the gates read): rows in order,
        // one accumulator.
        let (grad_v_f, grad_v_r) = grads.params[0].row_mut(0)[..2 * hd].split_at_mut(hd);
        for b in 0..step.xp.rows() {
            let dz = grads.xp.as_ref().row(b);
            let (dz_f, dz_r) = (&dz[hd..2 * hd], &dz[2 * hd..3 * hd]);
            let c_prev = &step.prev.row(b)[..hd];
            let mut add = |j: usize, read: F| {
                grad_v_f[j] += dz_f[j] * read;
                grad_v_r[j] += dz_r[j] * read;
            };
            // The dropout choice is made once per row, not per element.
            match keep.map(|k| &k.row(b)[..hd]) {
                Some(k) => (0..hd).for_each(|j| add(j, c_prev[j] * k[j])),
                None => (0..hd).for_each(|j| add(j, c_prev[j])),
            }
        }
    }

    fn as_sru(&self) -> Option<&SruKernel> {
        // The fused GPU kernels know nothing of dropout.
        (!self.dropout).then_some(self)
    }

    fn with_product_dropout(&self) -> Option<Self> {
        Some(Self {
            dropout: true,
            ..self.clone()
        })
    }

    fn host_weight_products(&self) -> Vec<WeightProduct> {
        // The biases' gradient: dz_f and dz_r summed over the batch and the sequence.
        vec![WeightProduct {
            param: 1,
            col: 0,
            k: 1,
            n: 2 * self.hidden,
            a: Operand::Ones,
            g: Operand::GradInput(self.hidden),
        }]
    }
}

impl<B: Backend> Sru<B> {
    fn blocks(&self) -> usize {
        self.weight.dims()[1] / self.hidden
    }
}

impl<B: Backend> Cell<B> for Sru<B> {
    type Kernel = SruKernel;

    fn input_size(&self) -> usize {
        self.weight.dims()[0]
    }
    fn hidden_size(&self) -> usize {
        self.hidden
    }
    fn state_names(&self) -> &'static [&'static str] {
        &["c"]
    }
    fn kernel(&self) -> SruKernel {
        SruKernel {
            hidden: self.hidden,
            use_tanh: self.use_tanh,
            dropout: false,
        }
    }

    fn input_affine(&self) -> (Tensor<B, 2>, Option<Tensor<B, 1>>) {
        let (h, k) = (self.hidden, self.blocks());
        // [I, H·k] interleaved per unit -> [k·H, I] block-major, for one matmul.
        let weight = self
            .weight
            .val()
            .reshape([self.input_size(), h, k])
            .swap_dims(1, 2)
            .reshape([self.input_size(), k * h])
            .transpose();
        (weight, None)
    }

    fn input_passthrough(&self) -> Option<Passthrough> {
        // k = 3: the skip term `x' = x·scale_x` (this direction's slice of x), zero without one.
        (self.blocks() == 3).then_some(Passthrough {
            start: self.skip_offset,
            width: self.hidden,
            scale: if self.has_skip_term {
                self.scale_x
            } else {
                0.0
            },
        })
    }

    fn recurrent_params(&self) -> Tensor<B, 1> {
        flatten_params(vec![
            self.weight_c.val().unsqueeze_dim(0),
            self.bias.val().unsqueeze_dim(0),
        ])
    }

    fn load_layer(
        cells: Vec<Self>,
        layer: usize,
        source: &mut dyn TensorSource,
    ) -> Result<Vec<Self>, ImportError> {
        let dirs = cells.len();
        let Some(first) = cells.first() else {
            return Ok(cells);
        };
        let (input, h, k) = (first.input_size(), first.hidden, first.blocks());
        let device = first.weight.val().device();
        let name = |base: &str| format!("rnn_lst.{layer}.{base}");
        let weight: Tensor<B, 2> = Tensor::from_data(
            source.take(&name("weight"), &[input, dirs * h * k])?,
            &device,
        );
        let weight_c: Tensor<B, 2> =
            Tensor::<B, 1>::from_data(source.take(&name("weight_c"), &[2 * dirs * h])?, &device)
                .reshape([2, dirs * h]);
        let bias: Tensor<B, 2> =
            Tensor::<B, 1>::from_data(source.take(&name("bias"), &[2 * dirs * h])?, &device)
                .reshape([2, dirs * h]);
        let scale_x = Tensor::<B, 1>::from_data(source.take(&name("scale_x"), &[1])?, &device)
            .into_scalar()
            .elem::<f64>();
        // Per direction: its column block of `weight`, its H values of each gate row.
        let per_direction = |t: &Tensor<B, 2>, d: usize| -> Tensor<B, 1> {
            t.clone().narrow(1, d * h, h).reshape([2 * h])
        };
        Ok(cells
            .into_iter()
            .enumerate()
            .map(|(d, cell)| Sru {
                weight: Param::from_tensor(weight.clone().narrow(1, d * h * k, h * k)),
                weight_c: Param::from_tensor(per_direction(&weight_c, d)),
                bias: Param::from_tensor(per_direction(&bias, d)),
                scale_x,
                ..cell
            })
            .collect())
    }

    fn save_layer(cells: &[Self], layer: usize) -> Vec<(String, TensorData)> {
        let Some(first) = cells.first() else {
            return Vec::new();
        };
        let h = first.hidden;
        let name = |base: &str| format!("rnn_lst.{layer}.{base}");
        let weight = Tensor::cat(cells.iter().map(|c| c.weight.val()).collect(), 1);
        // Gate-major over directions: [forget of every direction | reset of every direction].
        let gate_major = |get: &dyn Fn(&Sru<B>) -> Tensor<B, 1>| -> Tensor<B, 1> {
            let rows: Vec<Tensor<B, 2>> = cells.iter().map(|c| get(c).reshape([2, h])).collect();
            Tensor::cat(rows, 1).reshape([2 * cells.len() * h])
        };
        let scale = Tensor::<B, 1>::from_floats([first.scale_x], &weight.device());
        vec![
            (name("weight"), weight.into_data()),
            (
                name("weight_c"),
                gate_major(&|c| c.weight_c.val()).into_data(),
            ),
            (name("bias"), gate_major(&|c| c.bias.val()).into_data()),
            (name("scale_x"), scale.into_data()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::{
        compare_step, compare_step_reading, finite_differences,
        reference::{self, *},
    };
    use crate::layer::RnnLayerConfig;
    use reference::sigmoid;

    /// The SRU equations of design.md §3 (official layout: weight `[I, H·k]` interleaved per
    /// unit), one batch row, in plain f64; the gates read `read` (`c`, or `c ⊙ m` under
    /// recurrent dropout).
    fn reference_step(
        w: &Weights,
        x: &[f64],
        state: &[Vec<f64>],
        read: &[f64],
        use_tanh: bool,
    ) -> (Vec<f64>, Vec<Vec<f64>>) {
        let c = &state[0];
        let n = c.len();
        let weight = w.mat("rnn_lst.0.weight");
        let k = weight.cols / n;
        let u = weight.vecmat(x);
        let (vc, bias) = (w.vec("rnn_lst.0.weight_c"), w.vec("rnn_lst.0.bias"));
        let scale = w.vec("rnn_lst.0.scale_x")[0];
        let mut h = vec![0.0; n];
        let mut c_new = vec![0.0; n];
        for j in 0..n {
            let block = |g: usize| u[j * k + g];
            let f = sigmoid(block(1) + vc[j] * read[j] + bias[j]);
            let r = sigmoid(block(2) + vc[n + j] * read[j] + bias[n + j]);
            c_new[j] = f * c[j] + (1.0 - f) * block(0);
            let skip = if k == 4 { block(3) } else { x[j] * scale };
            let act = if use_tanh { c_new[j].tanh() } else { c_new[j] };
            h[j] = r * act + (1.0 - r) * skip;
        }
        (h, vec![c_new])
    }

    #[test]
    fn step_matches_f64_reference() {
        // Hidden 40: the host step's tanh runs in chunks of 32, so a whole one and a part.
        for (input, hidden, use_tanh, rescale) in [
            (4, 4, false, true),
            (3, 4, false, false),
            (4, 4, true, false),
            (3, 40, true, false),
        ] {
            let config = SruConfig::new(input, hidden)
                .with_use_tanh(use_tanh)
                .with_rescale(rescale)
                .with_highway_bias(-1.0);
            let err = compare_step(config, 3, |w, x, s| {
                reference_step(w, x, s, &s[0], use_tanh)
            });
            assert!(
                err < 1e-12,
                "input={input} hidden={hidden} use_tanh={use_tanh}: {err:e}"
            );
        }
    }

    /// Recurrent dropout masks the `c` the gates read (`v ⊙ c`), not the carried one.
    #[test]
    fn recurrent_dropout_masks_only_what_the_gates_read() {
        let config = SruConfig::new(4, 4).with_use_tanh(true);
        let err = compare_step_reading(config, 3, 0.5, |w, x, s, read| {
            reference_step(w, x, s, &read[0], true)
        });
        assert!(err < 1e-12, "{err:e}");
    }

    #[test]
    fn gradients_match_finite_differences() {
        for (input, use_tanh) in [(4, false), (3, true)] {
            let cell = SruConfig::new(input, 4)
                .with_use_tanh(use_tanh)
                .with_rescale(true);
            finite_differences(&RnnLayerConfig::new(cell), 2, 4, None);
        }
    }
}
