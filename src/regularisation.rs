//! Recurrent regularisation for every cell: zoneout (Krueger et al. 2017) and variational
//! dropout of the recurrent connections (Gal & Ghahramani 2016).
//!
//! Both act between steps, so they wrap a cell's [`Recurrence`] kernel: the noise travels as
//! extra columns of each step's projected input, and [`Regularised`] applies it around the
//! inner step on every path (host, tensor, GPU fallback) with a hand-written backward, so
//! training keeps its O(T) cost.
//! - Dropout: what the recurrent connections read is `s ⊙ m`, with one mask
//!   `m ∈ {0, 1/(1−p)}` per sequence and unit, the same at every step, on the state component
//!   the step's weights read: `h`, or a cell's only component (the SRU's `c`, read by its
//!   gates as `v ⊙ c`). An LSTM's `c` is its memory and is not masked. Where a step reads the
//!   state only through its weights (RNNs, LSTMs, IndRNN), the wrapper masks the state before
//!   the step. Where it also carries the state itself (GRU's `z ⊙ h`, MGU's `(1 − f) ⊙ h`,
//!   SRU's `f ⊙ c`), the kernel applies the mask to its weighted reads only
//!   ([`Recurrence::with_product_dropout`]), as Keras' GRU does: masking the carried state as
//!   well trained a GRU on the adding problem (T = 50) to MSE 0.008 in training but 0.14 at
//!   evaluation, where zoneout or no noise gave 0.002. Off at evaluation.
//! - Zoneout: each unit of every state component keeps its previous value with probability
//!   `p` at each step: `s' = z ⊙ s + (1 − z) ⊙ cell(s)`, `z ~ Bernoulli(p)`; the step's
//!   output is the cell's own (as the authors' code). At evaluation `z = p`, the expectation.

use burn::tensor::{backend::Backend, Distribution, Tensor, TensorPrimitive};

use crate::host::{self, HostFloat, HostStep, HostStepGrads, MatMut, MatRef, Operand};
use crate::ops::{InputNoise, Recurrence, StepOutput, StepRecord};

/// The noise of one cell over one sequence batch.
#[derive(Debug, Clone)]
pub struct StateNoise<B: Backend> {
    /// `[batch, state_width]`: what multiplies the state a step reads (dropout), or `None`.
    pub keep: Option<Tensor<B, 2>>,
    /// `[T, batch, state_width]`: the share of each unit's previous value kept at each step
    /// (zoneout), or `None`.
    pub zone: Option<Tensor<B, 3>>,
}

impl<B: Backend> StateNoise<B> {
    /// Noise for a cell with state components `names` of `hidden` units each: a dropout mask
    /// of rate `dropout` on the component named `h` (or the only one), and zoneout of rate
    /// `zoneout` on all;
    /// random when `training`, else dropout off and zoneout at its expectation. `None` when
    /// neither applies.
    pub fn sample(
        names: &[&str],
        hidden: usize,
        [len, batch]: [usize; 2],
        (dropout, zoneout): (f64, f64),
        training: bool,
        device: &B::Device,
    ) -> Option<Self> {
        let width = hidden * names.len();
        let keep = (training && dropout > 0.0).then(|| {
            let parts = names
                .iter()
                .map(|&name| match name == "h" || names.len() == 1 {
                    true => {
                        Tensor::random(
                            [batch, hidden],
                            Distribution::Bernoulli(1.0 - dropout),
                            device,
                        ) / (1.0 - dropout)
                    }
                    false => Tensor::ones([batch, hidden], device),
                })
                .collect();
            Tensor::cat(parts, 1)
        });
        let zone = (zoneout > 0.0).then(|| match training {
            true => Tensor::random(
                [len, batch, width],
                Distribution::Bernoulli(zoneout),
                device,
            ),
            false => Tensor::full([len, batch, width], zoneout, device),
        });
        (keep.is_some() || zone.is_some()).then_some(Self { keep, zone })
    }

    /// The kernel wrapped to apply this noise, and the projected input `[T, batch, ·]` with
    /// the noise columns appended.
    pub fn wrap<K: Recurrence>(
        &self,
        kernel: K,
        xp: Tensor<B, 3>,
    ) -> (Regularised<K>, Tensor<B, 3>) {
        let xp = self.input_noise().appended(xp.into_primitive().tensor());
        (
            self.wrapped(kernel),
            Tensor::from_primitive(TensorPrimitive::Float(xp)),
        )
    }

    /// The kernel wrapped to apply this noise, which reads it as columns of its input after
    /// the cell's own ([`input_noise`](StateNoise::input_noise)).
    pub fn wrapped<K: Recurrence>(&self, kernel: K) -> Regularised<K> {
        Regularised::new(kernel, self.keep.is_some(), self.zone.is_some())
    }

    /// The noise as the recurrence ops take it.
    pub fn input_noise(&self) -> InputNoise<B> {
        InputNoise {
            keep: self.keep.clone().map(|keep| keep.into_primitive().tensor()),
            zone: self.zone.clone().map(|zone| zone.into_primitive().tensor()),
        }
    }
}

/// The dropout multiplier of a kernel that applies dropout itself
/// ([`Recurrence::with_product_dropout`]): the last `width` columns of its projected input,
/// when `on`.
pub(crate) fn product_keep<B: Backend>(
    xp: &Tensor<B, 2>,
    on: bool,
    width: usize,
) -> Option<Tensor<B, 2>> {
    let columns = xp.dims()[1];
    on.then(|| xp.clone().narrow(1, columns - width, width))
}

/// [`product_keep`] on host memory.
pub(crate) fn host_product_keep<F: HostFloat>(
    xp: MatRef<'_, F>,
    on: bool,
    width: usize,
) -> Option<MatRef<'_, F>> {
    on.then(|| xp.cols(xp.width() - width, width))
}

/// What the host backward of a kernel that applies dropout itself reads first: the dropout
/// multiplier (when `on`) and the state its products read (`prev ⊙ keep`, in `buffer`, or
/// `prev`). Under dropout it also writes that state as the `a` of the first weight product (the
/// driver cannot read it) and zeroes the multiplier's gradient (noise is not learnt).
pub(crate) fn host_backward_reads<'a, F: HostFloat>(
    step: &HostStep<'a, F>,
    grads: &mut HostStepGrads<F>,
    on: bool,
    width: usize,
    buffer: &'a mut Vec<F>,
) -> (Option<MatRef<'a, F>>, MatRef<'a, F>) {
    let keep = host_product_keep(step.xp, on, width);
    let read = host_masked(step.prev, keep, buffer);
    if keep.is_some() {
        grads.products[0]
            .0
            .for_each_row(|b, row| row.copy_from_slice(read.row(b)));
        let columns = grads.xp.as_ref().width();
        grads
            .xp
            .cols_mut(columns - width, width)
            .for_each_row(|_, row| row.fill(F::zero()));
    }
    (keep, read)
}

/// `state ⊙ keep` (the state a recurrent product reads under dropout), or `state`.
pub(crate) fn masked<B: Backend>(
    state: &Tensor<B, 2>,
    keep: Option<&Tensor<B, 2>>,
) -> Tensor<B, 2> {
    match keep {
        Some(keep) => state.clone() * keep.clone(),
        None => state.clone(),
    }
}

/// A step's projected-input gradient from its parts, with zeros for the dropout multiplier
/// when it is there (noise is not learnt).
pub(crate) fn with_zero_noise_grad<B: Backend>(
    mut parts: Vec<Tensor<B, 2>>,
    keep: Option<Tensor<B, 2>>,
) -> Tensor<B, 2> {
    parts.extend(keep.map(|keep| keep.zeros_like()));
    Tensor::cat(parts, 1)
}

/// [`masked`] on host memory: `state ⊙ keep` copied into `buffer`, or `state`.
pub(crate) fn host_masked<'a, F: HostFloat>(
    state: MatRef<'a, F>,
    keep: Option<MatRef<'a, F>>,
    buffer: &'a mut Vec<F>,
) -> MatRef<'a, F> {
    let Some(keep) = keep else {
        return state;
    };
    let (rows, width) = (state.rows(), keep.width());
    *buffer = (0..rows)
        .flat_map(|b| state.row(b).iter().zip(keep.row(b)).map(|(&s, &m)| s * m))
        .collect();
    MatRef::new(buffer, rows, width)
}

/// `grad_prev += grad ⊙ gate ⊙ keep` on one row: what a gate's product with the state it read
/// (`gate ⊙ h`, masked under dropout: GRU's `r`, MGU's `f`) sends back to that state. The
/// dropout choice is made once per row, so that the loop vectorises.
pub(crate) fn host_add_gated_read<F: HostFloat>(
    grad_prev: &mut [F],
    grad: &[F],
    gate: &[F],
    keep: Option<&[F]>,
) {
    let terms = grad_prev.iter_mut().zip(grad.iter().zip(gate));
    match keep {
        Some(keep) => {
            for ((acc, (&g, &gate)), &k) in terms.zip(keep) {
                *acc += g * gate * k;
            }
        }
        None => {
            for (acc, (&g, &gate)) in terms {
                *acc += g * gate;
            }
        }
    }
}

/// `grad_prev += (a · b) ⊙ keep`: a gradient reaching the previous state through a product
/// that read it masked (plain `+= a · b` without dropout).
pub(crate) fn host_add_masked_product<F: HostFloat>(
    grad_prev: &mut MatMut<F>,
    a: MatRef<F>,
    b: MatRef<F>,
    keep: Option<MatRef<F>>,
) {
    let Some(keep) = keep else {
        host::matmul(grad_prev, a, b, true);
        return;
    };
    let (rows, width) = (keep.rows(), keep.width());
    let mut product = vec![F::zero(); rows * width];
    host::matmul(&mut MatMut::new(&mut product, rows, width), a, b, false);
    grad_prev.for_each_row(|r, row| {
        for ((g, &p), &m) in row.iter_mut().zip(&product[r * width..]).zip(keep.row(r)) {
            *g += p * m;
        }
    });
}

/// A kernel with dropout and/or zoneout around its step. Its projected input is the inner
/// one followed by the dropout multiplier and the zoneout share (`state_width` columns each,
/// when on); its packed row is `[output | state | output | cell state | inner saved]`, so that
/// the inner step's own row `[output | cell state | saved]` lies in it unchanged.
#[derive(Debug, Clone)]
pub struct Regularised<K> {
    /// The cell's kernel.
    pub inner: K,
    /// Dropout columns present, applied by the wrapper (see [`Regularised::new`]).
    pub dropout: bool,
    /// Zoneout columns present.
    pub zoneout: bool,
}

impl<K: Recurrence> Regularised<K> {
    /// `kernel` with the given noise columns; a kernel that does recurrent dropout itself
    /// ([`Recurrence::with_product_dropout`]) takes the dropout columns as its own input.
    pub fn new(kernel: K, dropout: bool, zoneout: bool) -> Self {
        match dropout.then(|| kernel.with_product_dropout()).flatten() {
            Some(inner) => Self {
                inner,
                dropout: false,
                zoneout,
            },
            None => Self {
                inner: kernel,
                dropout,
                zoneout,
            },
        }
    }

    fn widths(&self) -> (usize, usize, usize, usize) {
        let k = &self.inner;
        (
            k.input_width(),
            k.output_width(),
            k.state_width(),
            k.saved_width(),
        )
    }
    /// First column of the dropout multiplier in the projected input.
    fn keep_col(&self) -> Option<usize> {
        self.dropout.then(|| self.inner.input_width())
    }
    /// First column of the zoneout share in the projected input.
    fn zone_col(&self) -> Option<usize> {
        let (i, _, s, _) = self.widths();
        self.zoneout.then(|| i + if self.dropout { s } else { 0 })
    }
    /// Where the inner kernel's state starts in the row it writes on the host, and the width
    /// of that row (see [`Recurrence::host_row_width`]).
    fn inner_row(&self) -> (usize, usize) {
        let width = self.inner.host_row_width();
        let state_at = width - self.inner.state_width() - self.inner.host_saved_width();
        (state_at, width)
    }
    fn noise_width(&self) -> usize {
        self.inner.state_width() * (usize::from(self.dropout) + usize::from(self.zoneout))
    }

    /// The state the inner step reads: `prev ⊙ keep` (copied into `buffer`) or `prev`.
    fn host_read<'a, F: HostFloat>(
        &self,
        xp: MatRef<'a, F>,
        prev: MatRef<'a, F>,
        buffer: &'a mut Vec<F>,
    ) -> MatRef<'a, F> {
        let keep = self
            .keep_col()
            .map(|col| xp.cols(col, self.inner.state_width()));
        host_masked(prev, keep, buffer)
    }
}

impl<K: Recurrence> Recurrence for Regularised<K> {
    fn input_width(&self) -> usize {
        self.inner.input_width() + self.noise_width()
    }
    fn state_width(&self) -> usize {
        self.inner.state_width()
    }
    fn output_width(&self) -> usize {
        self.inner.output_width()
    }
    fn saved_width(&self) -> usize {
        let (_, o, s, v) = self.widths();
        o + s + v
    }
    fn host_saved_width(&self) -> usize {
        // The inner kernel's whole row.
        self.inner_row().1
    }
    fn param_shapes(&self) -> Vec<[usize; 2]> {
        self.inner.param_shapes()
    }

    fn step<B: Backend>(
        &self,
        params: &[Tensor<B, 2>],
        xp: Tensor<B, 2>,
        state: Tensor<B, 2>,
    ) -> StepOutput<B> {
        let (i, _, s, _) = self.widths();
        let read = match self.keep_col() {
            Some(col) => state.clone() * xp.clone().narrow(1, col, s),
            None => state.clone(),
        };
        let step = self.inner.step(params, xp.clone().narrow(1, 0, i), read);
        let new_state = match self.zone_col() {
            Some(col) => {
                let zone = xp.narrow(1, col, s);
                step.state.clone() + (state - step.state.clone()) * zone
            }
            None => step.state.clone(),
        };
        let mut saved = vec![step.output.clone(), step.state];
        saved.extend(step.saved);
        StepOutput {
            output: step.output,
            state: new_state,
            saved: Some(Tensor::cat(saved, 1)),
        }
    }

    fn step_backward<B: Backend>(
        &self,
        params: &[Tensor<B, 2>],
        step: StepRecord<B>,
        param_grads: &mut [Tensor<B, 2>],
    ) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let (i, o, s, v) = self.widths();
        let saved = step.saved.expect("the wrapper saves the cell's state");
        let keep = self.keep_col().map(|col| step.xp.clone().narrow(1, col, s));
        let zone = self.zone_col().map(|col| step.xp.clone().narrow(1, col, s));
        let read = match &keep {
            Some(keep) => step.prev_state * keep.clone(),
            None => step.prev_state,
        };
        let grad_cell_state = match &zone {
            Some(zone) => step.grad_state.clone() * (zone.clone().neg() + 1.0),
            None => step.grad_state.clone(),
        };
        let inner = StepRecord {
            xp: step.xp.clone().narrow(1, 0, i),
            prev_state: read,
            output: step.output,
            state: saved.clone().narrow(1, o, s),
            saved: (v > 0).then(|| saved.narrow(1, o + s, v)),
            grad_output: step.grad_output,
            grad_state: grad_cell_state,
        };
        let (grad_xp, grad_read) = self.inner.step_backward(params, inner, param_grads);
        let mut grad_prev = match keep {
            Some(keep) => grad_read * keep,
            None => grad_read,
        };
        if let Some(zone) = zone {
            grad_prev = grad_prev + step.grad_state * zone;
        }
        let [batch, _] = grad_xp.dims();
        let noise = Tensor::zeros([batch, self.noise_width()], &grad_xp.device());
        (Tensor::cat(vec![grad_xp, noise], 1), grad_prev)
    }

    fn host_step<F: HostFloat>(
        &self,
        params: &[MatRef<F>],
        xp: MatRef<F>,
        prev: MatRef<F>,
        mut out: MatMut<F>,
    ) {
        let (i, o, s, _) = self.widths();
        let (state_at, inner_w) = self.inner_row();
        let mut buffer = Vec::new();
        let read = self.host_read(xp, prev, &mut buffer);
        self.inner
            .host_step(params, xp.cols(0, i), read, out.cols_mut(o + s, inner_w));
        let zone = self.zone_col().map(|col| xp.cols(col, s));
        out.for_each_row(|b, row| {
            let (visible, cell) = row.split_at_mut(o + s);
            let (output, state) = visible.split_at_mut(o);
            output.copy_from_slice(&cell[..o]);
            let cell_state = &cell[state_at..state_at + s];
            match zone {
                Some(zone) => {
                    for (((new, &c), &p), &z) in state
                        .iter_mut()
                        .zip(cell_state)
                        .zip(prev.row(b))
                        .zip(zone.row(b))
                    {
                        *new = c + (p - c) * z;
                    }
                }
                None => state.copy_from_slice(cell_state),
            }
        });
    }

    fn host_step_backward<F: HostFloat>(
        &self,
        params: &[MatRef<F>],
        step: HostStep<F>,
        grads: HostStepGrads<F>,
    ) {
        let (i, o, s, _) = self.widths();
        let (state_at, inner_w) = self.inner_row();
        let batch = step.xp.rows();
        let mut buffer = Vec::new();
        let read = self.host_read(step.xp, step.prev, &mut buffer);
        let zone = self.zone_col().map(|col| step.xp.cols(col, s));
        // The state's gradient reaching the cell: all of it, or the share zoneout did not keep.
        // (Slices zipped row by row rather than indexed: the loops vectorise.)
        let mut grad_cell_state = vec![F::zero(); batch * s];
        for (b, cell) in grad_cell_state.chunks_exact_mut(s).enumerate() {
            let grad = &step.grad_state.row(b)[..s];
            match zone {
                Some(zone) => {
                    for ((c, &g), &z) in cell.iter_mut().zip(grad).zip(&zone.row(b)[..s]) {
                        *c = g * (F::one() - z);
                    }
                }
                None => cell.copy_from_slice(grad),
            }
        }
        // An inner kernel whose output is its state's first columns takes the output's
        // gradient added into the state's.
        let grad_output = match state_at {
            0 => {
                for (b, g) in grad_cell_state.chunks_exact_mut(s).enumerate() {
                    host::add_into(&mut g[..o], step.grad_output.row(b));
                }
                step.grad_output.cols(0, 0)
            }
            _ => step.grad_output,
        };

        // Products over the state the inner step read: the wrapper writes that state, since
        // with dropout it is not the packed previous state the driver would read.
        let HostStepGrads {
            mut xp,
            mut prev,
            params: param_grads,
            products,
        } = grads;
        let inner_products = products
            .into_iter()
            .zip(self.host_weight_products())
            .zip(self.inner.host_weight_products())
            .map(|(((mut a, g), outer), inner)| {
                if let (Operand::Written, Operand::PrevState(col)) = (outer.a, inner.a) {
                    for b in 0..batch {
                        a.row_mut(b)
                            .copy_from_slice(&read.row(b)[col..col + inner.k]);
                    }
                    return (MatMut::new(&mut [], batch, 0), g);
                }
                (a, g)
            })
            .collect();
        xp.cols_mut(i, self.noise_width())
            .for_each_row(|_, row| row.fill(F::zero()));
        let mut grad_read = vec![F::zero(); batch * s];
        self.inner.host_step_backward(
            params,
            HostStep {
                xp: step.xp.cols(0, i),
                prev: read,
                row: step.row.cols(o + s, inner_w),
                grad_output,
                grad_state: MatRef::new(&grad_cell_state, batch, s),
                params_t: step.params_t,
                ahead: step.ahead,
            },
            HostStepGrads {
                xp: xp.cols_mut(0, i),
                prev: MatMut::new(&mut grad_read, batch, s),
                params: param_grads,
                products: inner_products,
            },
        );
        let keep = self.keep_col().map(|col| step.xp.cols(col, s));
        prev.for_each_row(|b, row| {
            let (row, read_grad) = (&mut row[..s], &grad_read[b * s..(b + 1) * s]);
            match keep {
                Some(keep) => {
                    for ((g, &r), &k) in row.iter_mut().zip(read_grad).zip(&keep.row(b)[..s]) {
                        *g = r * k;
                    }
                }
                None => row.copy_from_slice(read_grad),
            }
            if let Some(zone) = zone {
                let kept = step.grad_state.row(b)[..s].iter().zip(&zone.row(b)[..s]);
                for (g, (&d, &z)) in row.iter_mut().zip(kept) {
                    *g += d * z;
                }
            }
        });
    }

    fn host_weight_products(&self) -> Vec<host::WeightProduct> {
        self.inner
            .host_weight_products()
            .into_iter()
            .map(|mut product| {
                if self.dropout && matches!(product.a, Operand::PrevState(_)) {
                    product.a = Operand::Written;
                }
                product
            })
            .collect()
    }
}

#[cfg(all(test, feature = "ndarray"))]
mod tests {
    use burn::module::AutodiffModule;
    use burn::tensor::{Distribution, Tensor};

    use super::*;
    use crate::cell::AnyCellConfig;
    use crate::check::{values, F64Autodiff, F64};
    use crate::layer::{RnnLayerConfig, RnnState};
    use crate::ops::RecurrencePath;

    fn lstm_layer(dropout: f64, zoneout: f64) -> RnnLayerConfig<AnyCellConfig> {
        RnnLayerConfig::new(AnyCellConfig::named("lstm", 3, 4).unwrap())
            .with_recurrent_dropout(dropout)
            .with_zoneout(zoneout)
    }

    /// An LSTM layer in training mode against the equations written out in f64: the gates
    /// read `h ⊙ m`, then `c' = z_c c + (1 − z_c) c̃`, `h' = z_h h + (1 − z_h) o tanh(c̃)`, and
    /// the output is `o tanh(c̃)`.
    #[test]
    fn lstm_with_dropout_and_zoneout_matches_the_equations() {
        type B = F64Autodiff;
        let device = Default::default();
        let layer = lstm_layer(0.5, 0.4).init::<B>(&device);
        let (batch, len, hidden) = (2, 6, 4);
        let input = Tensor::<B, 3>::random([batch, len, 3], Distribution::Default, &device);
        let state = layer.zero_state(batch, &device);
        let state = RnnState {
            components: state.components.into_iter().map(|s| s + 0.5).collect(),
        };
        let noise = layer.sample_noise(&input).expect("noise in training");
        let (output, last) = layer.forward_with_noise(
            input.clone(),
            None,
            Some(state),
            Some(&noise),
            RecurrencePath::Fused,
        );

        let weights: std::collections::HashMap<String, Vec<f64>> = layer
            .state_dict()
            .into_iter()
            .map(|(name, data)| (name, values(&data)))
            .collect();
        let w = |name: &str| &weights[name];
        let x = values(&input.into_data());
        let keep = values(&noise[0].keep.clone().unwrap().into_data());
        let zone = values(&noise[0].zone.clone().unwrap().into_data());
        let (out, last_h, last_c) = (
            values(&output.into_data()),
            values(&last.components[0].clone().into_data()),
            values(&last.components[1].clone().into_data()),
        );
        let sigmoid = |v: f64| 1.0 / (1.0 + (-v).exp());
        let mut worst: f64 = 0.0;
        for b in 0..batch {
            let (mut h, mut c) = (vec![0.5; hidden], vec![0.5; hidden]);
            for t in 0..len {
                let read: Vec<f64> = (0..hidden)
                    .map(|j| h[j] * keep[b * 2 * hidden + j])
                    .collect();
                let pre = |row: usize| {
                    let mut v = w("bias_ih_l0")[row] + w("bias_hh_l0")[row];
                    for k in 0..3 {
                        v += w("weight_ih_l0")[row * 3 + k] * x[(b * len + t) * 3 + k];
                    }
                    for (k, r) in read.iter().enumerate() {
                        v += w("weight_hh_l0")[row * hidden + k] * r;
                    }
                    v
                };
                let z = |j: usize| zone[(t * batch + b) * 2 * hidden + j];
                for j in 0..hidden {
                    let (i, f) = (sigmoid(pre(j)), sigmoid(pre(hidden + j)));
                    let (g, o) = (pre(2 * hidden + j).tanh(), sigmoid(pre(3 * hidden + j)));
                    let cell = f * c[j] + i * g;
                    let shown = o * cell.tanh();
                    worst = worst.max((out[(b * len + t) * hidden + j] - shown).abs());
                    // The gates read `read`, a copy: updating `h` in place is safe.
                    h[j] = z(j) * h[j] + (1.0 - z(j)) * shown;
                    c[j] = z(hidden + j) * c[j] + (1.0 - z(hidden + j)) * cell;
                }
            }
            for j in 0..hidden {
                worst = worst.max((last_h[b * hidden + j] - h[j]).abs());
                worst = worst.max((last_c[b * hidden + j] - c[j]).abs());
            }
        }
        assert!(worst < 1e-12, "layer and equations differ by {worst:e}");
    }

    /// Dropout: one mask per sequence on `h` only, values 0 or 1/(1 − p), about p dropped;
    /// zoneout: 0/1 per step and unit, about p kept; at evaluation no dropout and z = p.
    #[test]
    fn noise_has_the_rates_and_shapes_of_its_definition() {
        let device = Default::default();
        // Enough sequences that the dropout rates (batch · hidden draws) sit within 9 standard
        // deviations of p: the draws come from a generator other tests share.
        let (len, batch, hidden) = (50, 400, 16);
        let noise = StateNoise::<F64>::sample(
            &["h", "c"],
            hidden,
            [len, batch],
            (0.25, 0.1),
            true,
            &device,
        )
        .unwrap();
        let keep = values(&noise.keep.unwrap().into_data());
        assert_eq!(keep.len(), batch * 2 * hidden);
        let (h_part, c_part): (Vec<_>, Vec<_>) = keep
            .chunks(hidden)
            .enumerate()
            .partition(|(k, _)| k % 2 == 0);
        let h: Vec<f64> = h_part.into_iter().flat_map(|(_, v)| v.to_vec()).collect();
        assert!(c_part.iter().all(|(_, v)| v.iter().all(|&m| m == 1.0)));
        assert!(h
            .iter()
            .all(|&m| m == 0.0 || (m - 1.0 / 0.75).abs() < 1e-12));
        let dropped = h.iter().filter(|&&m| m == 0.0).count() as f64 / h.len() as f64;
        assert!((dropped - 0.25).abs() < 0.05, "dropped {dropped}");

        let zone = values(&noise.zone.unwrap().into_data());
        assert_eq!(zone.len(), len * batch * 2 * hidden);
        assert!(zone.iter().all(|&z| z == 0.0 || z == 1.0));
        let kept = zone.iter().sum::<f64>() / zone.len() as f64;
        assert!((kept - 0.1).abs() < 0.01, "kept {kept}");

        let eval =
            StateNoise::<F64>::sample(&["h"], hidden, [len, batch], (0.25, 0.1), false, &device)
                .unwrap();
        assert!(eval.keep.is_none());
        assert!(values(&eval.zone.unwrap().into_data())
            .iter()
            .all(|&z| z == 0.1));
        // A cell with one state component (the SRU's `c`) has it masked.
        let only =
            StateNoise::<F64>::sample(&["c"], hidden, [len, batch], (0.25, 0.0), true, &device)
                .unwrap();
        let dropped = values(&only.keep.unwrap().into_data())
            .iter()
            .filter(|&&m| m == 0.0)
            .count() as f64;
        assert!((dropped / (batch * hidden) as f64 - 0.25).abs() < 0.05);
        let none =
            StateNoise::<F64>::sample(&["h"], hidden, [len, batch], (0.25, 0.0), false, &device);
        assert!(none.is_none(), "dropout alone is off at evaluation");
    }

    /// The evaluation copy of a trained layer is deterministic and uses zoneout's expectation:
    /// with z = p it equals a training forward given the noise `keep = 1, zone = p`.
    #[test]
    fn evaluation_uses_the_expectation() {
        let device = Default::default();
        let layer = lstm_layer(0.3, 0.2).init::<F64Autodiff>(&device);
        let input = Tensor::<F64Autodiff, 3>::random([2, 5, 3], Distribution::Default, &device);
        let eval = layer.valid();
        let first = eval.forward(input.clone().inner(), None).0.into_data();
        let again = eval.forward(input.clone().inner(), None).0.into_data();
        assert_eq!(first, again);
        let expectation = StateNoise {
            keep: Some(Tensor::ones([2, 8], &device)),
            zone: Some(Tensor::full([5, 2, 8], 0.2, &device)),
        };
        let trained = layer
            .forward_with_noise(
                input,
                None,
                None,
                Some(&[expectation]),
                RecurrencePath::Fused,
            )
            .0
            .into_data();
        let diff = values(&first)
            .iter()
            .zip(values(&trained))
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(
            diff < 1e-12,
            "evaluation differs from the expectation by {diff:e}"
        );
    }
}
