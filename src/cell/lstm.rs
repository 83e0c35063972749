//! LSTM and its variants: `lstm` (gates i, f, g, o as `torch.nn.LSTM`), `peephole-lstm`
//! (diagonal peepholes `p_i, p_f` on the old cell and `p_o` on the new one, Gers & Schmidhuber
//! 2000) and `cifg-lstm` (coupled input and forget gate `f = 1 − i`, Greff et al. 2017; rows
//! i, g, o only).
//!
//! Step (standard): `i, f, o = σ(z_i, z_f, z_o)`, `g = tanh(z_g)`, `c' = f⊙c + i⊙g`,
//! `h' = o⊙tanh(c')` with `z = W_ih x + b_ih + W_hh h + b_hh`.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use super::{
    accumulate, batch_sum, cols, flatten_params, load_param, load_torch_layer, param_data,
    save_torch_layer, sigmoid, sigmoid_grad, tanh_grad, torch_name, uniform, uniform_param, Cell,
    CellConfig, Position,
};
use crate::host::{
    self, HostFloat, HostStep, HostStepGrads, MatMut, MatRef, Operand, WeightProduct,
};
use crate::import::{ImportError, TensorSource};
use crate::ops::{Recurrence, StepOutput, StepRecord};

/// Which LSTM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LstmVariant {
    /// `torch.nn.LSTM`.
    Standard,
    /// Peephole connections from the cell to the gates.
    Peephole,
    /// Coupled input and forget gate.
    Cifg,
}

/// Configuration of an [`Lstm`] cell.
#[derive(Config, Debug, PartialEq)]
pub struct LstmConfig {
    /// Width of the input.
    pub input_size: usize,
    /// Width of the hidden state.
    pub hidden_size: usize,
    /// Which LSTM.
    #[config(default = "LstmVariant::Standard")]
    pub variant: LstmVariant,
    /// Initial value of the forget-gate slice of `bias_ih` (`bias_hh`'s is 0); the zoo's default
    /// 1 follows Gers et al. 2000 and Jozefowicz et al. 2015. `None` keeps PyTorch's uniform
    /// initialisation. Unused by the CIFG variant, which has no forget rows.
    #[config(default = "Some(1.0)")]
    pub forget_bias: Option<f64>,
}

/// An LSTM cell. Weights in PyTorch's layout: `weight_ih [G, I]`, `weight_hh [G, H]` with
/// `G = 4H` (rows i, f, g, o) or `3H` for CIFG (rows i, g, o).
#[derive(Module, Debug)]
pub struct Lstm<B: Backend> {
    /// Input-to-gates weights `[G, I]`.
    pub weight_ih: Param<Tensor<B, 2>>,
    /// Hidden-to-gates weights `[G, H]`.
    pub weight_hh: Param<Tensor<B, 2>>,
    /// Input bias `[G]`.
    pub bias_ih: Param<Tensor<B, 1>>,
    /// Hidden bias `[G]`.
    pub bias_hh: Param<Tensor<B, 1>>,
    /// Peephole weights `[p_i, p_f, p_o]` (`[3H]`), peephole variant only.
    pub weight_peephole: Option<Param<Tensor<B, 1>>>,
    /// Input and forget gates coupled (CIFG).
    pub coupled: bool,
}

impl LstmConfig {
    fn gate_rows(&self) -> usize {
        match self.variant {
            LstmVariant::Cifg => 3 * self.hidden_size,
            _ => 4 * self.hidden_size,
        }
    }

    /// Builds the cell: PyTorch's `U(-1/√H, 1/√H)`, then the forget-gate bias (see
    /// [`forget_bias`](LstmConfig::forget_bias)).
    pub fn init<B: Backend>(&self, device: &B::Device) -> Lstm<B> {
        let (i, h, g) = (self.input_size, self.hidden_size, self.gate_rows());
        let bound = 1.0 / (h as f64).sqrt();
        let mut bias_ih = uniform::<B, 1>([g], bound, device);
        let mut bias_hh = uniform::<B, 1>([g], bound, device);
        if let (Some(value), false) = (self.forget_bias, self.variant == LstmVariant::Cifg) {
            bias_ih = bias_ih.slice_fill(h..2 * h, value);
            bias_hh = bias_hh.slice_fill(h..2 * h, 0.0);
        }
        Lstm {
            weight_ih: uniform_param([g, i], bound, device),
            weight_hh: uniform_param([g, h], bound, device),
            bias_ih: Param::from_tensor(bias_ih),
            bias_hh: Param::from_tensor(bias_hh),
            weight_peephole: (self.variant == LstmVariant::Peephole)
                .then(|| uniform_param([3 * h], bound, device)),
            coupled: self.variant == LstmVariant::Cifg,
        }
    }
}

impl CellConfig for LstmConfig {
    type Cell<B: Backend> = Lstm<B>;

    fn names() -> &'static [&'static str] {
        &["lstm", "peephole-lstm", "cifg-lstm"]
    }
    fn from_name(name: &str, input_size: usize, hidden_size: usize) -> Option<Self> {
        let variant = match name {
            "lstm" => LstmVariant::Standard,
            "peephole-lstm" => LstmVariant::Peephole,
            "cifg-lstm" => LstmVariant::Cifg,
            _ => return None,
        };
        Some(Self::new(input_size, hidden_size).with_variant(variant))
    }
    fn name(&self) -> &'static str {
        match self.variant {
            LstmVariant::Standard => "lstm",
            LstmVariant::Peephole => "peephole-lstm",
            LstmVariant::Cifg => "cifg-lstm",
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
    fn init_cell<B: Backend>(&self, device: &B::Device) -> Lstm<B> {
        self.init(device)
    }
}

/// The LSTM step for all three variants. Biases are folded into the projection. Saved per
/// step: the activated gates (i, f, g, o, or i, g, o when coupled).
#[derive(Debug, Clone)]
pub struct LstmKernel {
    /// Width of the hidden state.
    pub hidden: usize,
    /// Peephole connections (`params[1]` is `[1, 3H]`).
    pub peephole: bool,
    /// Coupled input and forget gate.
    pub coupled: bool,
}

impl LstmKernel {
    fn gates(&self) -> usize {
        if self.coupled {
            3
        } else {
            4
        }
    }
}

/// Activated gates of one step.
struct Gates<B: Backend> {
    i: Tensor<B, 2>,
    f: Tensor<B, 2>,
    g: Tensor<B, 2>,
    o: Tensor<B, 2>,
}

/// What one batch row of the LSTM's host backward reads.
struct LstmRowGrads<'a, F> {
    c_new: &'a [F],
    /// The activated gates, `[i | f | g | o]` (`[i | g | o]` when coupled).
    saved: &'a [F],
    c_prev: &'a [F],
    /// `[h | c]`, the output's gradient added into `h`'s.
    grad_state: &'a [F],
    /// `[i | f | o]` peephole weights (empty for a cell without them).
    peephole: &'a [F],
}

/// One batch row of the LSTM backward: writes `dz` (the gate pre-activation gradients, also
/// the gradient of the projected input) and the gradient of `c_prev`. Every slice is cut to
/// `hd` and `COUPLED` and `PEEPHOLE` are constants, so the loop has no bounds checks or
/// branches and vectorises.
#[inline(always)]
fn lstm_row_backward<F: HostFloat, const COUPLED: bool, const PEEPHOLE: bool>(
    hd: usize,
    r: LstmRowGrads<'_, F>,
    dz: &mut [F],
    grad_c_prev: &mut [F],
) {
    let (zero, one) = (F::zero(), F::one());
    let (i, f, g, o) = if COUPLED {
        let i = &r.saved[..hd];
        (i, i, &r.saved[hd..2 * hd], &r.saved[2 * hd..3 * hd])
    } else {
        (
            &r.saved[..hd],
            &r.saved[hd..2 * hd],
            &r.saved[2 * hd..3 * hd],
            &r.saved[3 * hd..4 * hd],
        )
    };
    let (gs_h, gs_c) = (&r.grad_state[..hd], &r.grad_state[hd..2 * hd]);
    let (c_prev, grad_c_prev) = (&r.c_prev[..hd], &mut grad_c_prev[..hd]);
    let (p_i, p_f, p_o) = if PEEPHOLE {
        (
            &r.peephole[..hd],
            &r.peephole[hd..2 * hd],
            &r.peephole[2 * hd..3 * hd],
        )
    } else {
        (&[][..], &[][..], &[][..])
    };
    // A peephole weight, or nothing to add without peepholes (decided at compile time).
    let peep = |p: &[F], j: usize| if PEEPHOLE { p[j] } else { zero };
    let (dz_0, rest) = dz.split_at_mut(hd);
    let (dz_1, rest) = rest.split_at_mut(hd);
    let (dz_2, rest) = rest.split_at_mut(hd);
    let dz_3 = &mut rest[..if COUPLED { 0 } else { hd }];
    // tanh(c') waits in dz_0: element j is read before dz_0[j] is written.
    dz_0.copy_from_slice(&r.c_new[..hd]);
    F::tanh_in_place(dz_0);
    for j in 0..hd {
        let tanh_c = dz_0[j];
        let (ij, gate, oj) = (i[j], g[j], o[j]);
        let fj = if COUPLED { one - ij } else { f[j] };
        let grad_h = gs_h[j];
        let dz_o = grad_h * tanh_c * (oj * (one - oj));
        let grad_c = gs_c[j] + grad_h * oj * (one - tanh_c * tanh_c) + dz_o * peep(p_o, j);
        let d_i = grad_c * gate;
        let dz_g = grad_c * ij * (one - gate * gate);
        let d_f = grad_c * c_prev[j];
        if COUPLED {
            grad_c_prev[j] = grad_c * fj;
            dz_0[j] = (d_i - d_f) * (ij * (one - ij));
            dz_1[j] = dz_g;
            dz_2[j] = dz_o;
        } else {
            let (dz_i, dz_f) = (d_i * (ij * (one - ij)), d_f * (fj * (one - fj)));
            grad_c_prev[j] = grad_c * fj + (dz_i * peep(p_i, j) + dz_f * peep(p_f, j));
            dz_0[j] = dz_i;
            dz_1[j] = dz_f;
            dz_2[j] = dz_g;
            dz_3[j] = dz_o;
        }
    }
}

impl Recurrence for LstmKernel {
    fn input_width(&self) -> usize {
        self.gates() * self.hidden
    }
    fn state_width(&self) -> usize {
        2 * self.hidden
    }
    fn output_width(&self) -> usize {
        self.hidden
    }
    fn saved_width(&self) -> usize {
        self.gates() * self.hidden
    }
    fn host_output_in_state(&self) -> bool {
        true
    }
    fn param_shapes(&self) -> Vec<[usize; 2]> {
        let mut shapes = vec![[self.hidden, self.gates() * self.hidden]];
        if self.peephole {
            shapes.push([1, 3 * self.hidden]);
        }
        shapes
    }

    fn step<B: Backend>(
        &self,
        params: &[Tensor<B, 2>],
        xp: Tensor<B, 2>,
        state: Tensor<B, 2>,
    ) -> StepOutput<B> {
        let hd = self.hidden;
        let (h, c) = (cols(&state, 0, hd), cols(&state, hd, hd));
        let z = xp + h.matmul(params[0].clone());
        let (gates, c_new) = if self.coupled {
            let i = sigmoid(cols(&z, 0, hd));
            let g = cols(&z, hd, hd).tanh();
            let o = sigmoid(cols(&z, 2 * hd, hd));
            let f = i.clone().neg() + 1.0;
            let c_new = f.clone() * c + i.clone() * g.clone();
            (Gates { i, f, g, o }, c_new)
        } else {
            let (mut zi, mut zf, mut zo) =
                (cols(&z, 0, hd), cols(&z, hd, hd), cols(&z, 3 * hd, hd));
            if self.peephole {
                let p = &params[1];
                zi = zi + cols(p, 0, hd) * c.clone();
                zf = zf + cols(p, hd, hd) * c.clone();
            }
            let (i, f, g) = (sigmoid(zi), sigmoid(zf), cols(&z, 2 * hd, hd).tanh());
            let c_new = f.clone() * c + i.clone() * g.clone();
            if self.peephole {
                zo = zo + cols(&params[1], 2 * hd, hd) * c_new.clone();
            }
            (
                Gates {
                    i,
                    f,
                    g,
                    o: sigmoid(zo),
                },
                c_new,
            )
        };
        let h_new = gates.o.clone() * c_new.clone().tanh();
        let saved = if self.coupled {
            Tensor::cat(vec![gates.i, gates.g, gates.o], 1)
        } else {
            Tensor::cat(vec![gates.i, gates.f, gates.g, gates.o], 1)
        };
        StepOutput {
            output: h_new.clone(),
            state: Tensor::cat(vec![h_new, c_new], 1),
            saved: Some(saved),
        }
    }

    fn step_backward<B: Backend>(
        &self,
        params: &[Tensor<B, 2>],
        step: StepRecord<B>,
        param_grads: &mut [Tensor<B, 2>],
    ) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let hd = self.hidden;
        let saved = step.saved.expect("the LSTM saves its gates");
        let (i, g, o, f) = if self.coupled {
            let i = cols(&saved, 0, hd);
            let f = i.clone().neg() + 1.0;
            (i, cols(&saved, hd, hd), cols(&saved, 2 * hd, hd), f)
        } else {
            (
                cols(&saved, 0, hd),
                cols(&saved, 2 * hd, hd),
                cols(&saved, 3 * hd, hd),
                cols(&saved, hd, hd),
            )
        };
        let (h_prev, c_prev) = (
            cols(&step.prev_state, 0, hd),
            cols(&step.prev_state, hd, hd),
        );
        let c_new = cols(&step.state, hd, hd);
        let grad_h = step.grad_output + cols(&step.grad_state, 0, hd);
        let mut grad_c = cols(&step.grad_state, hd, hd);

        let tanh_c = c_new.clone().tanh();
        let dz_o = grad_h.clone() * tanh_c.clone() * sigmoid_grad(o.clone());
        grad_c = grad_c + grad_h * o * tanh_grad(tanh_c);
        if self.peephole {
            grad_c = grad_c + dz_o.clone() * cols(&params[1], 2 * hd, hd);
        }
        let d_i = grad_c.clone() * g.clone();
        let dz_g = grad_c.clone() * i.clone() * tanh_grad(g);
        let d_f = grad_c.clone() * c_prev.clone();
        let mut grad_c_prev = grad_c * f.clone();

        let gate_grads = if self.coupled {
            // f = 1 − i: the forget path reaches z_i with the opposite sign.
            let dz_i = (d_i - d_f) * sigmoid_grad(i);
            vec![dz_i, dz_g, dz_o]
        } else {
            let dz_i = d_i * sigmoid_grad(i);
            let dz_f = d_f * sigmoid_grad(f);
            if self.peephole {
                let p = &params[1];
                grad_c_prev =
                    grad_c_prev + dz_i.clone() * cols(p, 0, hd) + dz_f.clone() * cols(p, hd, hd);
                let grad_p = Tensor::cat(
                    vec![
                        batch_sum(dz_i.clone() * c_prev.clone()),
                        batch_sum(dz_f.clone() * c_prev),
                        batch_sum(dz_o.clone() * c_new),
                    ],
                    1,
                );
                accumulate(&mut param_grads[1], grad_p);
            }
            vec![dz_i, dz_f, dz_g, dz_o]
        };
        let dz = Tensor::cat(gate_grads, 1);
        accumulate(&mut param_grads[0], h_prev.transpose().matmul(dz.clone()));
        let grad_h_prev = dz.clone().matmul(params[0].clone().transpose());
        (dz, Tensor::cat(vec![grad_h_prev, grad_c_prev], 1))
    }

    fn host_step<F: HostFloat>(
        &self,
        params: &[MatRef<F>],
        xp: MatRef<F>,
        prev: MatRef<F>,
        mut out: MatMut<F>,
    ) {
        let hd = self.hidden;
        let peephole = self.peephole.then(|| params[1].row(0));
        // Row layout: [h, c | gates] (the output is h); the gates start as h_prev · W.
        host::matmul(
            &mut out.cols_mut(2 * hd, self.gates() * hd),
            prev.cols(0, hd),
            params[0],
            false,
        );
        out.for_each_row(|b, row| {
            let c_prev = &prev.row(b)[hd..2 * hd];
            let (state, z) = row.split_at_mut(2 * hd);
            let (h_new, c_new) = state.split_at_mut(hd);
            host::add_into(z, xp.row(b));
            let (f_slot, o_slot) = if self.coupled {
                F::sigmoid_in_place(&mut z[..hd]);
                F::tanh_in_place(&mut z[hd..2 * hd]);
                (None, 2 * hd)
            } else {
                if let Some(p) = peephole {
                    let (p_i, p_f, c_prev) = (&p[..hd], &p[hd..2 * hd], &c_prev[..hd]);
                    let (z_i, z_f) = z[..2 * hd].split_at_mut(hd);
                    for j in 0..hd {
                        z_i[j] += p_i[j] * c_prev[j];
                        z_f[j] += p_f[j] * c_prev[j];
                    }
                }
                F::sigmoid_in_place(&mut z[..2 * hd]);
                F::tanh_in_place(&mut z[2 * hd..3 * hd]);
                (Some(hd), 3 * hd)
            };
            let c_prev = &c_prev[..hd];
            let (i, g) = (&z[..hd], &z[o_slot - hd..o_slot]);
            // Slices cut to `hd`, no branch inside: the loops vectorise.
            match f_slot {
                Some(slot) => {
                    let f = &z[slot..slot + hd];
                    for j in 0..hd {
                        c_new[j] = f[j] * c_prev[j] + i[j] * g[j];
                    }
                }
                None => {
                    for j in 0..hd {
                        c_new[j] = (F::one() - i[j]) * c_prev[j] + i[j] * g[j];
                    }
                }
            }
            if let Some(p) = peephole {
                let (p_o, o) = (&p[2 * hd..3 * hd], &mut z[o_slot..o_slot + hd]);
                for j in 0..hd {
                    o[j] += p_o[j] * c_new[j];
                }
            }
            F::sigmoid_in_place(&mut z[o_slot..o_slot + hd]);
            h_new.copy_from_slice(c_new);
            F::tanh_in_place(h_new);
            let o = &z[o_slot..o_slot + hd];
            for j in 0..hd {
                h_new[j] *= o[j];
            }
        });
    }

    fn host_step_backward<F: HostFloat>(
        &self,
        params: &[MatRef<F>],
        step: HostStep<F>,
        mut grads: HostStepGrads<F>,
    ) {
        let hd = self.hidden;
        let peephole = if self.peephole {
            &params[1].row(0)[..3 * hd]
        } else {
            &[][..]
        };
        // One batch row: writes dz (the gate pre-activation gradients, also the gradient of
        // the projected input) and the gradient of c_prev.
        let row_backward = |b: usize, dz: &mut [F], grad_prev: &mut [F]| {
            step.fetch_ahead(b);
            let row = step.row.row(b);
            let rows = LstmRowGrads {
                c_new: &row[hd..2 * hd],
                saved: &row[2 * hd..],
                c_prev: &step.prev.row(b)[hd..2 * hd],
                grad_state: step.grad_state.row(b),
                peephole,
            };
            let grad_c_prev = &mut grad_prev[hd..2 * hd];
            match (self.coupled, self.peephole) {
                (true, false) => lstm_row_backward::<F, true, false>(hd, rows, dz, grad_c_prev),
                (false, false) => lstm_row_backward::<F, false, false>(hd, rows, dz, grad_c_prev),
                (false, true) => lstm_row_backward::<F, false, true>(hd, rows, dz, grad_c_prev),
                (true, true) => lstm_row_backward::<F, true, true>(hd, rows, dz, grad_c_prev),
            }
        };
        host::for_each_row_pair(&mut grads.xp, &mut grads.prev, row_backward);
        if self.peephole {
            // The peephole gradient is a sum over the batch: rows in order, one accumulator.
            // Every slice is cut to `hd` so that the loop vectorises.
            let (grad_i, rest) = grads.params[1].row_mut(0)[..3 * hd].split_at_mut(hd);
            let (grad_f, grad_o) = rest.split_at_mut(hd);
            for b in 0..step.xp.rows() {
                let dz = grads.xp.as_ref().row(b);
                let (dz_i, dz_f, dz_o) = (&dz[..hd], &dz[hd..2 * hd], &dz[3 * hd..4 * hd]);
                let c_prev = &step.prev.row(b)[hd..2 * hd];
                let c_new = &step.row.row(b)[hd..2 * hd];
                for j in 0..hd {
                    grad_i[j] += dz_i[j] * c_prev[j];
                    grad_f[j] += dz_f[j] * c_prev[j];
                    grad_o[j] += dz_o[j] * c_new[j];
                }
            }
        }
        host::matmul(
            &mut grads.prev.cols_mut(0, hd),
            grads.xp.as_ref(),
            step.params_t[0],
            false,
        );
    }

    fn host_weight_products(&self) -> Vec<WeightProduct> {
        vec![WeightProduct {
            param: 0,
            col: 0,
            k: self.hidden,
            n: self.gates() * self.hidden,
            a: Operand::PrevState(0),
            g: Operand::GradInput(0),
        }]
    }

    fn as_plain_lstm(&self) -> Option<usize> {
        (!self.peephole && !self.coupled).then_some(self.hidden)
    }
}

impl<B: Backend> Cell<B> for Lstm<B> {
    type Kernel = LstmKernel;

    fn input_size(&self) -> usize {
        self.weight_ih.dims()[1]
    }
    fn hidden_size(&self) -> usize {
        self.weight_hh.dims()[1]
    }
    fn state_names(&self) -> &'static [&'static str] {
        &["h", "c"]
    }
    fn kernel(&self) -> LstmKernel {
        LstmKernel {
            hidden: self.hidden_size(),
            peephole: self.weight_peephole.is_some(),
            coupled: self.coupled,
        }
    }
    fn input_affine(&self) -> (Tensor<B, 2>, Option<Tensor<B, 1>>) {
        let bias = self.bias_ih.val() + self.bias_hh.val();
        (self.weight_ih.val(), Some(bias))
    }
    fn recurrent_params(&self) -> Tensor<B, 1> {
        let mut params = vec![self.weight_hh.val().transpose()];
        if let Some(p) = &self.weight_peephole {
            params.push(p.val().unsqueeze_dim(0));
        }
        flatten_params(params)
    }

    fn load_layer(
        cells: Vec<Self>,
        layer: usize,
        source: &mut dyn TensorSource,
    ) -> Result<Vec<Self>, ImportError> {
        load_torch_layer(cells, layer, source)?
            .into_iter()
            .enumerate()
            .map(|(direction, cell)| {
                let peephole = torch_name("weight_peephole", layer, direction);
                Ok(Lstm {
                    weight_peephole: match &cell.weight_peephole {
                        Some(p) => Some(load_param(source, &peephole, p)?),
                        None => None,
                    },
                    ..cell
                })
            })
            .collect()
    }

    fn save_layer(cells: &[Self], layer: usize) -> Vec<(String, TensorData)> {
        let mut tensors = save_torch_layer(cells, layer);
        for (direction, cell) in cells.iter().enumerate() {
            if let Some(p) = &cell.weight_peephole {
                tensors.push((
                    torch_name("weight_peephole", layer, direction),
                    param_data(p),
                ));
            }
        }
        tensors
    }
}

super::torch_style!(Lstm);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::check::{
        compare_step, finite_differences,
        reference::{self, *},
    };
    use crate::layer::RnnLayerConfig;
    use reference::sigmoid;

    /// The LSTM equations of design.md §3, one batch row, in plain f64.
    fn reference_step(
        w: &Weights,
        x: &[f64],
        state: &[Vec<f64>],
        variant: LstmVariant,
    ) -> (Vec<f64>, Vec<Vec<f64>>) {
        let (h, c) = (&state[0], &state[1]);
        let n = h.len();
        let z = add(
            &add(&w.mat("weight_ih_l0").matvec(x), &w.vec("bias_ih_l0")),
            &add(&w.mat("weight_hh_l0").matvec(h), &w.vec("bias_hh_l0")),
        );
        let p = match variant {
            LstmVariant::Peephole => w.vec("weight_peephole_l0"),
            _ => vec![0.0; 3 * n],
        };
        let mut h_new = vec![0.0; n];
        let mut c_new = vec![0.0; n];
        for j in 0..n {
            let (i, f, g, zo) = match variant {
                LstmVariant::Cifg => {
                    let i = sigmoid(z[j]);
                    (i, 1.0 - i, z[n + j].tanh(), z[2 * n + j])
                }
                _ => (
                    sigmoid(z[j] + p[j] * c[j]),
                    sigmoid(z[n + j] + p[n + j] * c[j]),
                    z[2 * n + j].tanh(),
                    z[3 * n + j],
                ),
            };
            c_new[j] = f * c[j] + i * g;
            let o = sigmoid(zo + p[2 * n + j] * c_new[j]);
            h_new[j] = o * c_new[j].tanh();
        }
        (h_new.clone(), vec![h_new, c_new])
    }

    const VARIANTS: [LstmVariant; 3] = [
        LstmVariant::Standard,
        LstmVariant::Peephole,
        LstmVariant::Cifg,
    ];

    #[test]
    fn step_matches_f64_reference() {
        for variant in VARIANTS {
            let config = LstmConfig::new(3, 4).with_variant(variant);
            let err = compare_step(config, 3, |w, x, s| reference_step(w, x, s, variant));
            assert!(err < 1e-12, "{variant:?}: {err:e}");
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        for variant in VARIANTS {
            let config = RnnLayerConfig::new(LstmConfig::new(3, 4).with_variant(variant));
            finite_differences(&config, 2, 4, None);
        }
    }

    #[test]
    fn forget_bias_initialisation() {
        let lstm = LstmConfig::new(2, 3).init::<crate::check::F64>(&Default::default());
        let b_ih = crate::check::values(&lstm.bias_ih.val().into_data());
        let b_hh = crate::check::values(&lstm.bias_hh.val().into_data());
        assert_eq!(&b_ih[3..6], &[1.0; 3]);
        assert_eq!(&b_hh[3..6], &[0.0; 3]);
    }
}
