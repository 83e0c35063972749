//! The recurrence op: a cell's recurrent step run over a whole sequence as one operation with a
//! hand-written backward.
//!
//! Why one op: in burn 0.21 every slice of a sequence-long tensor taken inside an autodiff loop
//! materialises a full-size gradient in backward, which makes training O(T²). Here the loop
//! runs on the inner (non-autodiff) backend, where slicing is free, and the backward walks the
//! sequence once, so a training step costs O(T).
//!
//! The op is a method of [`RnnBackend`], an extension of burn's [`Backend`]. Its default bodies
//! are plain tensor ops (the fallback, and the reference every fast path is tested against);
//! [`Autodiff`] wraps them in a custom backward node; burn-ndarray runs them on host memory
//! (`cpu`). The input projection and the batch-major output layout are ops of the same trait,
//! and so is the projected recurrence: projection and recurrence as one op, for a backend that
//! computes each step's projection inside the walk (the CPU path, for narrow inputs), so that
//! the projected input and its gradient, `input_width` values per row and step, never reach
//! memory.

use burn::backend::autodiff::{
    checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
    Autodiff,
};
use burn::tensor::{
    backend::{AutodiffBackend, Backend},
    ops::FloatTensor,
    Tensor, TensorPrimitive,
};

use crate::cell::sru::SruKernel;
use crate::host::{HostFloat, HostStep, HostStepGrads, MatMut, MatRef, WeightProduct};
pub use head::HeadGrad;

#[cfg(feature = "ndarray")]
pub mod cpu;
#[cfg(any(feature = "wgpu", feature = "cuda"))]
pub mod cube;
#[cfg(any(feature = "wgpu", feature = "cuda"))]
pub mod cube_gru;
#[cfg(any(feature = "wgpu", feature = "cuda"))]
pub mod cube_lstm;
#[cfg(any(feature = "wgpu", feature = "cuda"))]
mod fusion;
pub mod head;

/// The recurrent part of a cell, free of any backend: it knows the widths of its tensors and
/// how to advance one step (and its backward) from an input that was projected beforehand.
///
/// A step reads `xp` (`[batch, input_width]`, the input projection of that step) and the
/// previous state (`[batch, state_width]`), and returns the output, the new state and whatever
/// else its backward needs (`saved`). Parameters arrive as 2-D tensors of [`param_shapes`].
///
/// [`param_shapes`]: Recurrence::param_shapes
pub trait Recurrence: Clone + Send + Sync + core::fmt::Debug + 'static {
    /// Width of one step's projected input.
    fn input_width(&self) -> usize;
    /// Width of the packed state (e.g. `[h | c]` is `2H` for an LSTM).
    fn state_width(&self) -> usize;
    /// Width of one step's output.
    fn output_width(&self) -> usize;
    /// Width of the extra per-step values that the backward reads (0 if none).
    fn saved_width(&self) -> usize;
    /// Width of the saved values in the host path's packed rows: those of the tensor path by
    /// default, fewer for a kernel whose host backward recomputes them (memory traffic costs
    /// more there than arithmetic).
    fn host_saved_width(&self) -> usize {
        self.saved_width()
    }
    /// Whether the host path may leave the output out of its packed rows, because it is the
    /// first `output_width` columns of the new state (an RNN's `h`; an LSTM's `h` of
    /// `[h | c]`): the rows are then `[state | saved]`, less memory to write and read back.
    /// Such a kernel's [`host_step`](Recurrence::host_step) writes no output columns, and its
    /// [`host_step_backward`](Recurrence::host_step_backward) finds the output's gradient
    /// added into the state's (`grad_output` is empty). False by default.
    fn host_output_in_state(&self) -> bool {
        false
    }
    /// Width of the row [`host_step`](Recurrence::host_step) writes: `[output | state |
    /// saved]`, or `[state | saved]` where [`host_output_in_state`](Recurrence::host_output_in_state).
    fn host_row_width(&self) -> usize {
        let output = if self.host_output_in_state() {
            0
        } else {
            self.output_width()
        };
        output + self.state_width() + self.host_saved_width()
    }
    /// Shapes of the recurrent parameters, in the order the step receives them.
    fn param_shapes(&self) -> Vec<[usize; 2]>;
    /// One step forward.
    fn step<B: Backend>(
        &self,
        params: &[Tensor<B, 2>],
        xp: Tensor<B, 2>,
        state: Tensor<B, 2>,
    ) -> StepOutput<B>;
    /// One step backward: returns the gradients of `xp` and of the previous state, and adds the
    /// gradients of the parameters to `param_grads`.
    fn step_backward<B: Backend>(
        &self,
        params: &[Tensor<B, 2>],
        step: StepRecord<B>,
        param_grads: &mut [Tensor<B, 2>],
    ) -> (Tensor<B, 2>, Tensor<B, 2>);

    /// [`step`](Recurrence::step) on host memory (the CPU fast path): reads `xp` `[batch,
    /// input_width]` and `prev` `[batch, state_width]`, writes the packed row
    /// `[batch, output | state | saved]` into `out` (`[batch, state | saved]` where
    /// [`host_output_in_state`](Recurrence::host_output_in_state); `host_saved_width` saved
    /// values, at least: a wrapper may lend a wider row). Must compute what `step` computes.
    fn host_step<F: HostFloat>(
        &self,
        params: &[MatRef<F>],
        xp: MatRef<F>,
        prev: MatRef<F>,
        out: MatMut<F>,
    );
    /// [`step_backward`](Recurrence::step_backward) on host memory. Weight gradients listed in
    /// [`host_weight_products`](Recurrence::host_weight_products) are left to the driver: the
    /// step writes their operands instead. Its loop over the batch rows calls
    /// [`step.fetch_ahead(b)`](HostStep::fetch_ahead) for each row `b` (the next steps' rows,
    /// fetched while this one computes).
    fn host_step_backward<F: HostFloat>(
        &self,
        params: &[MatRef<F>],
        step: HostStep<F>,
        grads: HostStepGrads<F>,
    );
    /// Weight gradients that are sums over steps of `a_tᵀ · g_t` (none by default).
    fn host_weight_products(&self) -> Vec<WeightProduct> {
        Vec::new()
    }
    /// This kernel doing recurrent dropout itself, for cells whose step reads the previous
    /// state outside its recurrent products too (a GRU's interpolation `z ⊙ h`): it takes
    /// `state_width` more input columns, the multiplier of the state its products read, and
    /// reads the state unmasked elsewhere. `None` (the default): the kernel reads its state
    /// only through its products, and [`Regularised`](crate::regularisation::Regularised)
    /// masks the state before the step.
    fn with_product_dropout(&self) -> Option<Self> {
        None
    }
    /// The SRU kernel, when this is one: the GPU backends have a fused kernel for it.
    fn as_sru(&self) -> Option<&SruKernel> {
        None
    }
    /// The hidden size, when this is `torch.nn.LSTM`'s cell (no peepholes, separate gates;
    /// params `[W_hhᵀ]`): the GPU backends have a fused kernel for it.
    fn as_plain_lstm(&self) -> Option<usize> {
        None
    }
    /// The hidden size, when this is `torch.nn.GRU`'s cell (reset after the recurrent matmul;
    /// params `[W_hhᵀ, b_hh]`): the GPU backends have a fused kernel for it.
    fn as_plain_gru(&self) -> Option<usize> {
        None
    }
}

/// What one forward step produces.
#[derive(Debug, Clone)]
pub struct StepOutput<B: Backend> {
    /// `[batch, output_width]`.
    pub output: Tensor<B, 2>,
    /// `[batch, state_width]`.
    pub state: Tensor<B, 2>,
    /// `[batch, saved_width]`, or `None` when `saved_width` is 0.
    pub saved: Option<Tensor<B, 2>>,
}

/// Everything a step's backward can read: its inputs, what it produced, and the gradients
/// arriving at its output and at its new state.
#[derive(Debug, Clone)]
pub struct StepRecord<B: Backend> {
    /// The step's projected input.
    pub xp: Tensor<B, 2>,
    /// The state the step started from.
    pub prev_state: Tensor<B, 2>,
    /// The step's output.
    pub output: Tensor<B, 2>,
    /// The step's new state.
    pub state: Tensor<B, 2>,
    /// The step's saved values (`None` when `saved_width` is 0).
    pub saved: Option<Tensor<B, 2>>,
    /// Gradient of the loss with respect to `output`.
    pub grad_output: Tensor<B, 2>,
    /// Gradient of the loss with respect to `state`.
    pub grad_state: Tensor<B, 2>,
}

/// Gradients of the recurrence op's three differentiable inputs.
#[derive(Debug, Clone)]
pub struct RecurrenceGrads<B: Backend> {
    /// `[T, batch, input_width]`.
    pub xp: FloatTensor<B>,
    /// `[batch, state_width]`.
    pub state0: FloatTensor<B>,
    /// `[param_len]`, the flat parameters.
    pub params: FloatTensor<B>,
}

/// Inputs of the recurrence op, as primitives of one backend.
#[derive(Debug, Clone)]
pub struct RecurrenceInput<B: Backend> {
    /// Time-major projected input `[T, batch, input_width]`.
    pub xp: FloatTensor<B>,
    /// Initial packed state `[batch, state_width]`.
    pub state0: FloatTensor<B>,
    /// The recurrent parameters flattened and concatenated, `[param_len]`.
    pub params: FloatTensor<B>,
    /// `[T, batch]`, 1 for a real step and 0 for padding; `None` when every step is real.
    pub mask: Option<FloatTensor<B>>,
    /// Walk the sequence from its end to its start.
    pub reverse: bool,
}

/// Columns of the layer input that a kernel reads unprojected, after the projection's:
/// `x[.., start..start + width] · scale` (SRU's skip term when the layer's input and output
/// widths agree). Copied, where a scaled identity block in the weight would cost a third more
/// GEMM work forward and backward.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Passthrough {
    /// First layer-input column passed through.
    pub start: usize,
    /// How many columns.
    pub width: usize,
    /// Their factor.
    pub scale: f64,
}

impl Passthrough {
    /// The projected input `xp` `[T, batch, out]` with the passed-through columns of `x`
    /// appended: `[T, batch, out + width]`.
    pub fn append<B: Backend>(&self, xp: Tensor<B, 3>, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let skip = x.narrow(2, self.start, self.width).mul_scalar(self.scale);
        Tensor::cat(vec![xp, skip], 2)
    }

    /// The backward of [`append`](Passthrough::append) into `x`'s gradient: adds the scaled
    /// gradient of the appended columns (`[T, batch, width]`) to `grad_x`.
    fn add_grad<B: Backend>(&self, grad_x: Tensor<B, 3>, grad_tail: Tensor<B, 3>) -> Tensor<B, 3> {
        let [len, batch, _] = grad_x.dims();
        let columns = [0..len, 0..batch, self.start..self.start + self.width];
        let passed = grad_x.clone().slice(columns.clone()) + grad_tail.mul_scalar(self.scale);
        grad_x.slice_assign(columns, passed)
    }
}

/// Inputs of the projected recurrence op: the layer input and the input projection's
/// parameters in place of the projected input (see [`RnnBackend::rnn_projected_recurrence`]).
#[derive(Debug, Clone)]
pub struct ProjectedInput<B: Backend> {
    /// Time-major layer input `[T, batch, width]`.
    pub x: FloatTensor<B>,
    /// The projection's weight `[out, width]`: the kernel's input is `out` projected columns,
    /// then `passthrough`'s.
    pub weight: FloatTensor<B>,
    /// The projection's bias `[out]`.
    pub bias: Option<FloatTensor<B>>,
    /// Columns of `x` appended to the projection's (`None`: the projection is all of it).
    pub passthrough: Option<Passthrough>,
    /// Initial packed state `[batch, state_width]`.
    pub state0: FloatTensor<B>,
    /// The recurrent parameters flattened and concatenated, `[param_len]`.
    pub params: FloatTensor<B>,
    /// `[T, batch]`, 1 for a real step and 0 for padding; `None` when every step is real.
    pub mask: Option<FloatTensor<B>>,
    /// Walk the sequence from its end to its start.
    pub reverse: bool,
    /// Recurrent noise, columns of the kernel's input after the projection's.
    pub noise: Option<InputNoise<B>>,
}

/// Recurrent noise as columns of a kernel's projected input, after the projection's (see
/// [`Regularised`](crate::regularisation::Regularised)); never differentiated.
#[derive(Debug, Clone)]
pub struct InputNoise<B: Backend> {
    /// `[batch, width]`, the same at every step (a dropout mask), or `None`.
    pub keep: Option<FloatTensor<B>>,
    /// `[T, batch, width]` (zoneout's), or `None`.
    pub zone: Option<FloatTensor<B>>,
}

impl<B: Backend> InputNoise<B> {
    /// `xp` `[T, batch, ·]` with the noise columns appended (`keep`'s repeated at every step).
    pub fn appended(self, xp: FloatTensor<B>) -> FloatTensor<B> {
        let xp = float::<B, 3>(xp);
        let [len, batch, _] = xp.dims();
        let mut columns = vec![xp];
        if let Some(keep) = self.keep {
            let keep = float::<B, 2>(keep);
            let width = keep.dims()[1];
            columns.push(keep.unsqueeze_dim::<3>(0).expand([len, batch, width]));
        }
        columns.extend(self.zone.map(float::<B, 3>));
        primitive(Tensor::cat(columns, 2))
    }

    /// Columns of the noise.
    pub fn width(&self) -> usize {
        let keep = self
            .keep
            .as_ref()
            .map_or(0, |keep| dims_of::<B, 2>(keep)[1]);
        keep + self
            .zone
            .as_ref()
            .map_or(0, |zone| dims_of::<B, 3>(zone)[2])
    }
}

/// The dims of a float tensor primitive.
fn dims_of<B: Backend, const D: usize>(tensor: &FloatTensor<B>) -> [usize; D] {
    float::<B, D>(tensor.clone()).dims()
}

impl<B: RnnBackend> ProjectedInput<B> {
    /// The recurrence op's input, the projection computed beforehand by its own op (and the
    /// noise appended to it).
    pub fn projected(self) -> RecurrenceInput<B> {
        let xp = B::rnn_linear(self.x, self.weight, self.bias, self.passthrough);
        RecurrenceInput {
            xp: match self.noise {
                Some(noise) => noise.appended(xp),
                None => xp,
            },
            state0: self.state0,
            params: self.params,
            mask: self.mask,
            reverse: self.reverse,
        }
    }
}

/// Gradients of the projected recurrence op's inputs.
#[derive(Debug, Clone)]
pub struct ProjectedGrads<B: Backend> {
    /// `[T, batch, width]`, when asked for.
    pub x: Option<FloatTensor<B>>,
    /// `[input_width, width]`.
    pub weight: FloatTensor<B>,
    /// `[input_width]`, when the projection has a bias.
    pub bias: Option<FloatTensor<B>>,
    /// `[batch, state_width]`.
    pub state0: FloatTensor<B>,
    /// `[param_len]`, the flat parameters.
    pub params: FloatTensor<B>,
}

/// The projected recurrence's backward as the backwards of its two parts: the recurrence op's
/// (from the projection computed again) and the projection op's.
pub fn projected_backward_in_parts<B: RnnBackend, K: Recurrence>(
    kernel: &K,
    input: ProjectedInput<B>,
    packed: FloatTensor<B>,
    grad: FloatTensor<B>,
    grad_x: bool,
) -> ProjectedGrads<B> {
    let (x, weight, has_bias) = (input.x.clone(), input.weight.clone(), input.bias.is_some());
    let passthrough = input.passthrough;
    let noise_width = input.noise.as_ref().map_or(0, InputNoise::width);
    let grads = B::rnn_recurrence_backward(kernel, input.projected(), packed, grad);
    // The noise columns' gradient belongs to nothing.
    let grad_xp = match noise_width {
        0 => grads.xp,
        _ => {
            let grad_xp = float::<B, 3>(grads.xp);
            let width = grad_xp.dims()[2] - noise_width;
            primitive(grad_xp.narrow(2, 0, width))
        }
    };
    let (x_grad, params) = linear_grads_wanted::<B>(grad_xp, x, weight, passthrough, grad_x, true);
    let (grad_weight, grad_bias) = params.expect("the parameters' gradients were asked for");
    ProjectedGrads {
        x: x_grad,
        weight: grad_weight,
        bias: has_bias.then_some(grad_bias),
        state0: grads.state0,
        params: grads.params,
    }
}

/// A projection's weight and bias gradients.
type ParamGrads<B> = (FloatTensor<B>, FloatTensor<B>);

/// The projection's gradients that are asked for: its input's (`want_x`), and its weight's and
/// bias's (`want_params`); through [`RnnBackend::rnn_linear_grads`] when both are.
fn linear_grads_wanted<B: RnnBackend>(
    grad: FloatTensor<B>,
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    passthrough: Option<Passthrough>,
    want_x: bool,
    want_params: bool,
) -> (Option<FloatTensor<B>>, Option<ParamGrads<B>>) {
    match (want_x, want_params) {
        (true, true) => {
            let (grad_x, grad_weight, grad_bias) =
                B::rnn_linear_grads(grad, x, weight, passthrough);
            (Some(grad_x), Some((grad_weight, grad_bias)))
        }
        (true, false) => (
            Some(B::rnn_linear_grad_input(grad, weight, passthrough)),
            None,
        ),
        (false, true) => (None, Some(B::rnn_linear_grad_params(grad, x, passthrough))),
        (false, false) => (None, None),
    }
}

/// A backend that can run the recurrence op. Every method has a plain-tensor default; a
/// backend overrides them with a faster path where it has one.
pub trait RnnBackend: Backend {
    /// Runs the recurrence and returns the full packed sequence `[T, batch, O + S + V]`: each
    /// step's output, new state and saved values side by side (see [`Recurrence`]). What the
    /// backward reads.
    fn rnn_recurrence_packed<K: Recurrence>(
        kernel: &K,
        input: RecurrenceInput<Self>,
    ) -> FloatTensor<Self> {
        recurrence_forward::<Self, K>(kernel, input)
    }

    /// The full packed sequence and the op's output (its first `O + S` columns) as a tensor of
    /// its own. The default slices one out of the other.
    fn rnn_recurrence_split<K: Recurrence>(
        kernel: &K,
        input: RecurrenceInput<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let packed = Self::rnn_recurrence_packed(kernel, input);
        split::<Self, K>(kernel, packed)
    }

    /// The recurrence op: each step's output and new state, `[T, batch, O + S]` (the packed
    /// sequence without the saved values, which only the backward needs). The state is always
    /// the last `S` columns; the host path leaves out the output columns, `[T, batch, S]`, when
    /// the output is the state's first columns and no mask sets them apart
    /// ([`Recurrence::host_output_in_state`]).
    fn rnn_recurrence<K: Recurrence>(
        kernel: &K,
        input: RecurrenceInput<Self>,
    ) -> FloatTensor<Self> {
        Self::rnn_recurrence_split(kernel, input).1
    }

    /// The backward of [`rnn_recurrence`](RnnBackend::rnn_recurrence), from its inputs, the
    /// full packed sequence and the gradient of the op's output (of its shape).
    fn rnn_recurrence_backward<K: Recurrence>(
        kernel: &K,
        input: RecurrenceInput<Self>,
        packed: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> RecurrenceGrads<Self> {
        recurrence_backward::<Self, K>(kernel, input, packed, grad)
    }

    /// Whether this backend computes each step's input projection inside the recurrence for
    /// the layer input `x` (`[T, batch, width]`), so that the projected input is never stored
    /// ([`rnn_projected_split`](RnnBackend::rnn_projected_split)). If not (the default), the
    /// projected recurrence is the projection op followed by the recurrence op.
    fn rnn_projects_in_step(x: &FloatTensor<Self>) -> bool {
        let _ = x;
        false
    }

    /// The input projection and the recurrence op as one op: the recurrence op's output
    /// (`[T, batch, O + S]`) from the layer input.
    fn rnn_projected_recurrence<K: Recurrence>(
        kernel: &K,
        input: ProjectedInput<Self>,
    ) -> FloatTensor<Self> {
        if Self::rnn_projects_in_step(&input.x) {
            Self::rnn_projected_split(kernel, input).1
        } else {
            Self::rnn_recurrence(kernel, input.projected())
        }
    }

    /// [`rnn_recurrence_split`](RnnBackend::rnn_recurrence_split) of the projected recurrence.
    /// The default projects the whole input first.
    fn rnn_projected_split<K: Recurrence>(
        kernel: &K,
        input: ProjectedInput<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        Self::rnn_recurrence_split(kernel, input.projected())
    }

    /// The backward of [`rnn_projected_split`](RnnBackend::rnn_projected_split); the gradient
    /// of `x` only when `grad_x`. The default is [`projected_backward_in_parts`].
    fn rnn_projected_backward<K: Recurrence>(
        kernel: &K,
        input: ProjectedInput<Self>,
        packed: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        grad_x: bool,
    ) -> ProjectedGrads<Self> {
        projected_backward_in_parts::<Self, K>(kernel, input, packed, grad, grad_x)
    }

    /// The input projection `x · Wᵀ + b` of every step (`x` `[T, batch, in]`, any layout;
    /// `weight` `[out, in]`, `bias` `[out]`), as PyTorch's `linear`: `[T, batch, out]`, with
    /// `passthrough`'s columns of `x` appended (`[T, batch, out + p]`).
    fn rnn_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        passthrough: Option<Passthrough>,
    ) -> FloatTensor<Self> {
        linear::tensor_forward::<Self>(x, weight, bias, passthrough)
    }

    /// The projection's input gradient from the gradient of its output (`[T, batch, out + p]`):
    /// `grad · weight` (`weight` `[out, in]`) plus the passed-through columns' share.
    fn rnn_linear_grad_input(
        grad: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        passthrough: Option<Passthrough>,
    ) -> FloatTensor<Self> {
        linear::tensor_grad_input::<Self>(grad, weight, passthrough)
    }

    /// `gradᵀ · x` and the column sums of `grad` over its first `out` columns (those before
    /// `passthrough`'s): the projection's weight and bias gradients.
    fn rnn_linear_grad_params(
        grad: FloatTensor<Self>,
        x: FloatTensor<Self>,
        passthrough: Option<Passthrough>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        linear::tensor_grad_params::<Self>(grad, x, passthrough)
    }

    /// Both of the projection's gradient ops at once, `(input, weight, bias)` gradients: the
    /// host path runs them as one pass over the rows.
    fn rnn_linear_grads(
        grad: FloatTensor<Self>,
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        passthrough: Option<Passthrough>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let grad_x = Self::rnn_linear_grad_input(grad.clone(), weight, passthrough);
        let (grad_weight, grad_bias) = Self::rnn_linear_grad_params(grad, x, passthrough);
        (grad_x, grad_weight, grad_bias)
    }

    /// Each step's output, batch-major: `[batch, T, O]` from the op's `[T, batch, W]` output
    /// (its first `O` columns); contiguous, or (on the host path, where the op's output is
    /// stored batch-major) a view of it, rows one stride apart.
    fn rnn_outputs(visible: FloatTensor<Self>, output_width: usize) -> FloatTensor<Self> {
        outputs::tensor_forward::<Self>(visible, output_width)
    }

    /// The backward of [`rnn_outputs`](RnnBackend::rnn_outputs): `[T, batch, W]` with zeros
    /// beyond the first `O` columns.
    fn rnn_outputs_backward(grad: FloatTensor<Self>, width: usize) -> FloatTensor<Self> {
        outputs::tensor_backward::<Self>(grad, width)
    }

    /// Whether the recurrence op's backward takes, for a gradient like `grad` (of the op's
    /// outputs, `[batch, T, O]`), that gradient alone, its first two axes swapped (`[T, batch,
    /// O]`, the state's gradient zero), in place of the op's whole `[T, batch, W]` gradient.
    /// The host path does: where the state is not an output (SRU, the LSTMs' `c`), the whole
    /// gradient of a long sequence is mostly zeros, which cost a copy twice its size and a
    /// second read. Default: no.
    fn rnn_takes_output_grads(grad: &FloatTensor<Self>) -> bool {
        let _ = grad;
        false
    }

    /// Whether the recurrence op's backward, for an output like `visible`, takes the gradient
    /// of a per-step linear head on its outputs in factors ([`HeadGrad`], see [`head`]). The
    /// host path does. Default: no.
    fn rnn_takes_head_grads(visible: &FloatTensor<Self>) -> bool {
        let _ = visible;
        false
    }

    /// [`rnn_recurrence_backward`](RnnBackend::rnn_recurrence_backward) from `grad` (the
    /// gradient that reached the op as a tensor, if any) and a head's gradient in factors;
    /// also the head's weight gradient where [`HeadGrad::weight_grad`]. The default
    /// materialises the head's gradient ([`HeadGrad::materialised`]).
    fn rnn_recurrence_backward_with_head<K: Recurrence>(
        kernel: &K,
        input: RecurrenceInput<Self>,
        packed: FloatTensor<Self>,
        grad: Option<FloatTensor<Self>>,
        head: HeadGrad<Self>,
    ) -> (RecurrenceGrads<Self>, Option<FloatTensor<Self>>) {
        let (grad, grad_weight) = head.materialised(grad);
        let grads = Self::rnn_recurrence_backward(kernel, input, packed, grad);
        (grads, grad_weight)
    }

    /// [`rnn_projected_backward`](RnnBackend::rnn_projected_backward) with a head's gradient
    /// in factors, as [`rnn_recurrence_backward_with_head`].
    ///
    /// [`rnn_recurrence_backward_with_head`]: RnnBackend::rnn_recurrence_backward_with_head
    fn rnn_projected_backward_with_head<K: Recurrence>(
        kernel: &K,
        input: ProjectedInput<Self>,
        packed: FloatTensor<Self>,
        grad: Option<FloatTensor<Self>>,
        head: HeadGrad<Self>,
        grad_x: bool,
    ) -> (ProjectedGrads<Self>, Option<FloatTensor<Self>>) {
        let (grad, grad_weight) = head.materialised(grad);
        let grads = Self::rnn_projected_backward(kernel, input, packed, grad, grad_x);
        (grads, grad_weight)
    }

    /// What a layer reads of the recurrence op's own output `visible` (`[T, batch, W]`): each
    /// step's output, batch-major (as [`rnn_outputs`](RnnBackend::rnn_outputs) gives it), and
    /// the final state, the last `state_width` columns of step `last` (`[batch, S]`). The
    /// op's backward may then take the outputs' gradient alone ([`rnn_takes_output_grads`]),
    /// so these two must be the only readers of `visible` (burn cannot sum that gradient with
    /// a whole-width one from another node).
    ///
    /// [`rnn_takes_output_grads`]: RnnBackend::rnn_takes_output_grads
    fn rnn_layer_outputs(
        visible: FloatTensor<Self>,
        output_width: usize,
        state_width: usize,
        last: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let final_state = outputs::final_state::<Self>(visible.clone(), state_width, last);
        (Self::rnn_outputs(visible, output_width), final_state)
    }
}

/// The batch-major output layout and its backward with plain tensor ops (the host versions
/// are in [`cpu`]).
pub mod outputs {
    use super::*;

    /// The first `output_width` columns of `[T, batch, W]`, as `[batch, T, O]`.
    pub fn tensor_forward<B: Backend>(
        visible: FloatTensor<B>,
        output_width: usize,
    ) -> FloatTensor<B> {
        primitive(
            float::<B, 3>(visible)
                .narrow(2, 0, output_width)
                .swap_dims(0, 1),
        )
    }

    /// The last `state_width` columns of step `last` of `[T, batch, W]`: `[batch, S]`.
    pub fn final_state<B: Backend>(
        visible: FloatTensor<B>,
        state_width: usize,
        last: usize,
    ) -> FloatTensor<B> {
        let visible = float::<B, 3>(visible);
        let [_, batch, width] = visible.dims();
        primitive(
            visible
                .narrow(0, last, 1)
                .narrow(2, width - state_width, state_width)
                .reshape([batch, state_width]),
        )
    }

    /// `full` `[T, batch, W]` with `grad` (`[batch, S]`) added to the last `S` columns of step
    /// `last`: the backward of [`final_state`].
    pub fn add_final_state_grad<B: Backend>(
        full: FloatTensor<B>,
        grad: FloatTensor<B>,
        last: usize,
    ) -> FloatTensor<B> {
        let (full, grad) = (float::<B, 3>(full), float::<B, 2>(grad));
        let ([_, batch, width], [_, state_width]) = (full.dims(), grad.dims());
        let at = [last..last + 1, 0..batch, width - state_width..width];
        let sum = full.clone().slice(at.clone()) + grad.reshape([1, batch, state_width]);
        primitive(full.slice_assign(at, sum))
    }

    /// `[batch, T, O]` back to `[T, batch, W]`, zeros beyond the first `O` columns.
    pub fn tensor_backward<B: Backend>(grad: FloatTensor<B>, width: usize) -> FloatTensor<B> {
        let grad = float::<B, 3>(grad).swap_dims(0, 1);
        let [len, batch, output_width] = grad.dims();
        let zeros = Tensor::zeros([len, batch, width - output_width], &grad.device());
        primitive(Tensor::cat(vec![grad, zeros], 2))
    }
}

/// The layer normalisation's forward and gradients with plain tensor ops (the host versions
/// are in [`cpu`]).
pub mod norm {
    use super::*;

    /// `(x̂, 1/√(var + epsilon))` over the last axis, the latter with that axis of size 1.
    pub fn normalized<B: Backend, const D: usize>(
        x: Tensor<B, D>,
        epsilon: f64,
    ) -> (Tensor<B, D>, Tensor<B, D>) {
        let centred = x.clone() - x.mean_dim(D - 1);
        let inv_std = (centred.clone().square().mean_dim(D - 1) + epsilon)
            .sqrt()
            .recip();
        (centred * inv_std.clone(), inv_std)
    }

    /// The gradient through [`normalized`] from that of `x̂`:
    /// `inv_std · (g − mean(g) − x̂·mean(g⊙x̂))`.
    pub fn normalized_backward<B: Backend, const D: usize>(
        normalized: Tensor<B, D>,
        inv_std: Tensor<B, D>,
        grad: Tensor<B, D>,
    ) -> Tensor<B, D> {
        let mean = grad.clone().mean_dim(D - 1);
        let mean_dot = (grad.clone() * normalized.clone()).mean_dim(D - 1);
        (grad - mean - normalized * mean_dot) * inv_std
    }
}

/// The input projection's forward and gradients with plain tensor ops (the host versions are
/// in [`cpu`]).
pub mod linear {
    use super::*;

    /// `x · Wᵀ + b`, then the passed-through columns, with tensor ops.
    pub fn tensor_forward<B: Backend>(
        x: FloatTensor<B>,
        weight: FloatTensor<B>,
        bias: Option<FloatTensor<B>>,
        passthrough: Option<Passthrough>,
    ) -> FloatTensor<B> {
        let x = float::<B, 3>(x);
        let input = passthrough.map(|p| (p, x.clone()));
        let [len, batch, width] = x.dims();
        let weight = float::<B, 2>(weight);
        let out = weight.dims()[0];
        let y = x.reshape([len * batch, width]).matmul(weight.transpose());
        let y = match bias {
            Some(bias) => y + float::<B, 1>(bias).unsqueeze_dim(0),
            None => y,
        };
        let y = y.reshape([len, batch, out]);
        primitive(match input {
            Some((passthrough, x)) => passthrough.append(y, x),
            None => y,
        })
    }

    /// `grad · W` plus the passed-through columns' share, with tensor ops.
    pub fn tensor_grad_input<B: Backend>(
        grad: FloatTensor<B>,
        weight: FloatTensor<B>,
        passthrough: Option<Passthrough>,
    ) -> FloatTensor<B> {
        let grad = float::<B, 3>(grad);
        let weight = float::<B, 2>(weight);
        let ([len, batch, _], [out, width]) = (grad.dims(), weight.dims());
        let projected = grad.clone().narrow(2, 0, out);
        let dx = projected.reshape([len * batch, out]).matmul(weight);
        let dx = dx.reshape([len, batch, width]);
        primitive(match passthrough {
            Some(passthrough) => passthrough.add_grad(dx, grad.narrow(2, out, passthrough.width)),
            None => dx,
        })
    }

    /// `gradᵀ · x` and the column sums of `grad` with tensor ops.
    ///
    /// Both sum over all `T · batch` rows, long reductions onto small results: done at once, a
    /// GPU runs them on a handful of threads or tiles, each walking every row. So the rows are
    /// cut into chunks of [`steps_per_chunk`] whole steps, reduced in parallel (the product as
    /// one batched matmul, a chunk per batch entry) and the partial results summed; the steps
    /// left over (fewer than a chunk) are reduced on their own and added.
    pub fn tensor_grad_params<B: Backend>(
        grad: FloatTensor<B>,
        x: FloatTensor<B>,
        passthrough: Option<Passthrough>,
    ) -> (FloatTensor<B>, FloatTensor<B>) {
        let grad = float::<B, 3>(grad);
        let grad = match passthrough {
            Some(p) => grad.clone().narrow(2, 0, grad.dims()[2] - p.width),
            None => grad,
        };
        let [len, batch, out] = grad.dims();
        let x = float::<B, 3>(x);
        let width = x.dims()[2];
        let steps = steps_per_chunk(len, batch, out * width);
        let (chunks, rest) = (len / steps, len % steps);
        let (weight, bias) = match rest {
            0 => chunk_sums(grad, x, chunks),
            _ => {
                let start = chunks * steps;
                let (weight, bias) = chunk_sums(
                    grad.clone().narrow(0, 0, start),
                    x.clone().narrow(0, 0, start),
                    chunks,
                );
                let (w, b) = chunk_sums(grad.narrow(0, start, rest), x.narrow(0, start, rest), 1);
                (weight + w, bias + b)
            }
        };
        (primitive(weight), primitive(bias))
    }

    /// `gradᵀ · x` `[out, width]` and the column sums of `grad` `[out]` over `chunks` equal
    /// chunks of the steps of `grad` `[T, batch, out]` and `x` `[T, batch, width]`.
    fn chunk_sums<B: Backend>(
        grad: Tensor<B, 3>,
        x: Tensor<B, 3>,
        chunks: usize,
    ) -> (Tensor<B, 2>, Tensor<B, 1>) {
        let ([len, batch, out], width) = (grad.dims(), x.dims()[2]);
        let rows = len / chunks.max(1) * batch;
        let grad = grad.reshape([chunks, rows, out]);
        // The bias gradient too: one sum down 128k rows took 15 ms on an H100 (config B).
        let bias = grad.clone().sum_dim(1).sum_dim(0).reshape([out]);
        let weight = grad
            .swap_dims(1, 2)
            .matmul(x.reshape([chunks, rows, width]))
            .sum_dim(0)
            .reshape([out, width]);
        (weight, bias)
    }

    /// How many whole steps a chunk of [`tensor_grad_params`] holds: enough that there are at
    /// most `len` chunks, one per 512 rows and 16M partial-product values.
    pub fn steps_per_chunk(len: usize, batch: usize, result_size: usize) -> usize {
        let chunks = len
            .min((len * batch / 512).max(1))
            .min((16 << 20) / result_size.max(1))
            .max(1);
        len.div_ceil(chunks).max(1)
    }

    #[cfg(test)]
    mod tests {
        use burn::tensor::{Distribution, TensorData};

        use super::*;
        use crate::check::{max_abs_diff, F64};

        #[test]
        fn chunks_cover_the_steps_within_bounds() {
            // Configs A, B and C of the speed issue, then degenerate shapes.
            assert_eq!(steps_per_chunk(100, 128, 512 * 10), 4);
            assert_eq!(steps_per_chunk(1000, 128, 512 * 10), 4);
            assert_eq!(steps_per_chunk(100, 64, 2048 * 512), 9);
            assert_eq!(steps_per_chunk(7, 3, 20), 7);
            assert_eq!(steps_per_chunk(1, 1, 1), 1);
            assert_eq!(steps_per_chunk(97, 512, 40), 1);
            // A prime length is cut too (into 4 chunks of 3 steps, and 1 step left).
            assert_eq!(steps_per_chunk(13, 200, 15), 3);
        }

        #[test]
        fn chunked_sums_match_one_product_with_steps_left_over() {
            let device = Default::default();
            let (len, batch, out, width) = (13, 200, 3, 5);
            let random = |shape: [usize; 3]| {
                Tensor::<F64, 3>::random(shape, Distribution::Uniform(-1.0, 1.0), &device)
            };
            let (grad, x) = (random([len, batch, out]), random([len, batch, width]));
            let (weight, bias) =
                tensor_grad_params::<F64>(primitive(grad.clone()), primitive(x.clone()), None);
            let rows = grad.reshape([len * batch, out]);
            let expected_weight = rows
                .clone()
                .transpose()
                .matmul(x.reshape([len * batch, width]));
            let expected_bias = rows.sum_dim(0).reshape([out]);
            let diff = |got: FloatTensor<F64>, expected: TensorData| {
                max_abs_diff("chunked sum", &float::<F64, 2>(got).into_data(), &expected)
            };
            assert!(diff(weight, expected_weight.into_data()) < 1e-12);
            let bias = float::<F64, 1>(bias).reshape([1, out]);
            assert!(diff(primitive(bias), expected_bias.reshape([1, out]).into_data()) < 1e-12);
        }
    }
}

/// A full packed sequence and its output columns.
fn split<B: Backend, K: Recurrence>(
    kernel: &K,
    packed: FloatTensor<B>,
) -> (FloatTensor<B>, FloatTensor<B>) {
    (packed.clone(), visible::<B, K>(kernel, packed))
}

/// The op's output columns (`O + S`) of a full packed sequence.
fn visible<B: Backend, K: Recurrence>(kernel: &K, packed: FloatTensor<B>) -> FloatTensor<B> {
    let width = kernel.output_width() + kernel.state_width();
    primitive(float::<B, 3>(packed).narrow(2, 0, width))
}

fn float<B: Backend, const D: usize>(primitive: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(primitive))
}

fn primitive<B: Backend, const D: usize>(tensor: Tensor<B, D>) -> FloatTensor<B> {
    tensor.into_primitive().tensor()
}

/// Splits the flat parameter vector into the kernel's 2-D parameters.
fn unpack_params<B: Backend>(shapes: &[[usize; 2]], flat: Tensor<B, 1>) -> Vec<Tensor<B, 2>> {
    let mut offset = 0;
    shapes
        .iter()
        .map(|&[rows, cols]| {
            let piece = flat
                .clone()
                .narrow(0, offset, rows * cols)
                .reshape([rows, cols]);
            offset += rows * cols;
            piece
        })
        .collect()
}

/// Step indices in the order the recurrence visits them.
fn visit_order(len: usize, reverse: bool) -> Box<dyn Iterator<Item = usize>> {
    if reverse {
        Box::new((0..len).rev())
    } else {
        Box::new(0..len)
    }
}

/// Row `t` of a time-major `[T, batch, width]` tensor, as `[batch, width]`.
fn time_row<B: Backend>(tensor: &Tensor<B, 3>, t: usize) -> Tensor<B, 2> {
    let [_, batch, width] = tensor.dims();
    tensor.clone().narrow(0, t, 1).reshape([batch, width])
}

/// Mask column of step `t` as `[batch, 1]`.
fn mask_column<B: Backend>(mask: &Tensor<B, 2>, t: usize) -> Tensor<B, 2> {
    let [_, batch] = mask.dims();
    mask.clone().narrow(0, t, 1).reshape([batch, 1])
}

/// The plain-tensor forward of the recurrence op.
pub fn recurrence_forward<B: Backend, K: Recurrence>(
    kernel: &K,
    input: RecurrenceInput<B>,
) -> FloatTensor<B> {
    let xp: Tensor<B, 3> = float(input.xp);
    let params = unpack_params(&kernel.param_shapes(), float(input.params));
    let mask: Option<Tensor<B, 2>> = input.mask.map(float);
    let len = xp.dims()[0];

    let mut rows: Vec<Option<Tensor<B, 2>>> = vec![None; len];
    let mut state: Tensor<B, 2> = float(input.state0);
    for t in visit_order(len, input.reverse) {
        let step = kernel.step(&params, time_row(&xp, t), state.clone());
        let (output, new_state) = match &mask {
            Some(mask) => {
                let keep = mask_column(mask, t);
                let carried = state.clone() + (step.state - state) * keep.clone();
                (step.output * keep, carried)
            }
            None => (step.output, step.state),
        };
        let mut parts = vec![output, new_state.clone()];
        parts.extend(step.saved);
        rows[t] = Some(Tensor::cat(parts, 1));
        state = new_state;
    }
    let rows: Vec<Tensor<B, 2>> = rows.into_iter().map(|row| row.expect("visited")).collect();
    primitive(Tensor::stack::<3>(rows, 0))
}

/// The plain-tensor backward of the recurrence op: one walk over the sequence in the opposite
/// order, each step's backward reading only its own rows.
pub fn recurrence_backward<B: Backend, K: Recurrence>(
    kernel: &K,
    input: RecurrenceInput<B>,
    packed: FloatTensor<B>,
    grad: FloatTensor<B>,
) -> RecurrenceGrads<B> {
    let shapes = kernel.param_shapes();
    let xp: Tensor<B, 3> = float(input.xp);
    let params = unpack_params(&shapes, float(input.params));
    let mask: Option<Tensor<B, 2>> = input.mask.map(float);
    let state0: Tensor<B, 2> = float(input.state0);
    let packed: Tensor<B, 3> = float(packed);
    let grad: Tensor<B, 3> = float(grad);
    let [len, batch, _] = xp.dims();
    let device = xp.device();
    let (out_w, state_w, saved_w) = (
        kernel.output_width(),
        kernel.state_width(),
        kernel.saved_width(),
    );

    let mut param_grads: Vec<Tensor<B, 2>> = shapes
        .iter()
        .map(|&shape| Tensor::zeros(shape, &device))
        .collect();
    let mut grad_xp: Vec<Option<Tensor<B, 2>>> = vec![None; len];
    let mut grad_state = Tensor::<B, 2>::zeros([batch, state_w], &device);

    let forward_order: Vec<usize> = visit_order(len, input.reverse).collect();
    for (position, &t) in forward_order.iter().enumerate().rev() {
        let row = time_row(&packed, t);
        let grad_row = time_row(&grad, t);
        let prev_state = match position {
            0 => state0.clone(),
            _ => time_row(&packed, forward_order[position - 1]).narrow(1, out_w, state_w),
        };
        let mut grad_output = grad_row.clone().narrow(1, 0, out_w);
        let mut grad_new_state = grad_state + grad_row.narrow(1, out_w, state_w);
        let mut grad_carried = None;
        if let Some(mask) = &mask {
            let keep = mask_column(mask, t);
            grad_carried = Some(grad_new_state.clone() * (keep.clone().neg() + 1.0));
            grad_output = grad_output * keep.clone();
            grad_new_state = grad_new_state * keep;
        }
        let record = StepRecord {
            xp: time_row(&xp, t),
            prev_state,
            output: row.clone().narrow(1, 0, out_w),
            state: row.clone().narrow(1, out_w, state_w),
            saved: (saved_w > 0).then(|| row.narrow(1, out_w + state_w, saved_w)),
            grad_output,
            grad_state: grad_new_state,
        };
        let (grad_xp_t, grad_prev) = kernel.step_backward(&params, record, &mut param_grads);
        grad_xp[t] = Some(grad_xp_t);
        grad_state = match grad_carried {
            Some(carried) => grad_prev + carried,
            None => grad_prev,
        };
    }

    let grad_xp: Vec<Tensor<B, 2>> = grad_xp.into_iter().map(|g| g.expect("visited")).collect();
    let flat_params: Vec<Tensor<B, 1>> = param_grads
        .into_iter()
        .map(|g| {
            let n = g.shape().num_elements();
            g.reshape([n])
        })
        .collect();
    RecurrenceGrads {
        xp: primitive(Tensor::stack::<3>(grad_xp, 0)),
        state0: primitive(grad_state),
        params: primitive(Tensor::cat(flat_params, 0)),
    }
}

/// The autodiff node of the recurrence op; its state is everything the backward reads.
#[derive(Debug)]
struct RecurrenceBackward<K>(K);

impl<B: RnnBackend, K: Recurrence> Backward<B, 3> for RecurrenceBackward<K> {
    type State = (RecurrenceInput<B>, FloatTensor<B>, Option<HeadToken>);

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let (rows, head) = op_grad::<B, _, 3>(grads, &ops, ops.state.1.clone());
        let [node_xp, node_state0, node_params] = ops.parents;
        let (input, packed, _) = ops.state;
        let result = match head {
            None => {
                let Some(rows) = rows else { return };
                B::rnn_recurrence_backward(&self.0, input, packed, rows)
            }
            Some(pending) => {
                let (result, grad_weight) = B::rnn_recurrence_backward_with_head(
                    &self.0,
                    input,
                    packed,
                    rows,
                    pending.head,
                );
                register_head_weight::<B>(grads, pending.weight_node, grad_weight);
                result
            }
        };
        for (node, grad) in [
            (node_xp, result.xp),
            (node_state0, result.state0),
            (node_params, result.params),
        ] {
            if let Some(node) = node {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

impl<B: RnnBackend, C: CheckpointStrategy> RnnBackend for Autodiff<B, C> {
    fn rnn_recurrence<K: Recurrence>(
        kernel: &K,
        input: RecurrenceInput<Self>,
    ) -> FloatTensor<Self> {
        let nodes = [
            input.xp.node.clone(),
            input.state0.node.clone(),
            input.params.node.clone(),
        ];
        let inner = RecurrenceInput::<B> {
            xp: input.xp.primitive,
            state0: input.state0.primitive,
            params: input.params.primitive,
            mask: input.mask.map(|mask| mask.primitive),
            reverse: input.reverse,
        };
        match RecurrenceBackward(kernel.clone())
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (packed, output) = B::rnn_recurrence_split(kernel, inner.clone());
                let token = op_token::<B>(&output);
                marked_op(prep.finish((inner, packed, token.clone()), output), token)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::rnn_recurrence(kernel, inner)),
        }
    }

    fn rnn_projected_recurrence<K: Recurrence>(
        kernel: &K,
        input: ProjectedInput<Self>,
    ) -> FloatTensor<Self> {
        if !B::rnn_projects_in_step(&input.x.primitive) {
            return Self::rnn_recurrence(kernel, input.projected());
        }
        let inner = ProjectedInput::<B> {
            x: input.x.primitive,
            weight: input.weight.primitive,
            bias: input.bias.as_ref().map(|bias| bias.primitive.clone()),
            passthrough: input.passthrough,
            state0: input.state0.primitive,
            params: input.params.primitive,
            mask: input.mask.map(|mask| mask.primitive),
            reverse: input.reverse,
            noise: input.noise.map(|noise| InputNoise {
                keep: noise.keep.map(|keep| keep.primitive),
                zone: noise.zone.map(|zone| zone.primitive),
            }),
        };
        let (x, weight) = (input.x.node, input.weight.node);
        let (state0, params) = (input.state0.node, input.params.node);
        // Four parents without a bias, five with one: burn's nodes have a fixed parent count.
        let node = ProjectedBackward(kernel.clone());
        match input.bias {
            None => finish_projected(
                node.prepare::<C>([x, weight, state0, params])
                    .compute_bound()
                    .stateful(),
                kernel,
                inner,
            ),
            Some(bias) => finish_projected(
                node.prepare::<C>([x, weight, bias.node, state0, params])
                    .compute_bound()
                    .stateful(),
                kernel,
                inner,
            ),
        }
    }

    fn rnn_layer_outputs(
        visible: FloatTensor<Self>,
        output_width: usize,
        state_width: usize,
        last: usize,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let inner = visible.primitive.clone();
        let final_state = outputs::final_state::<B>(inner.clone(), state_width, last);
        let dims = float::<B, 3>(inner.clone()).dims();
        let final_state = match FinalStateBackward
            .prepare::<C>([visible.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((final_state.clone(), dims, last), final_state),
            OpsKind::UnTracked(prep) => prep.finish(final_state),
        };
        // The final state is a parent of the outputs only so that their node is deeper in the
        // graph: burn runs its backward first (see `FinalStateBackward`).
        let outputs = B::rnn_outputs(inner, output_width);
        let op = (visible.node.id, visible.node.order);
        let outputs = match OutputsBackward
            .prepare::<C>([visible.node, final_state.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                // A head on these outputs may pass its gradient in factors where they read a
                // recurrence op that takes them (see `head`).
                let token = head::take_op_mark(op.0).then(HeadToken::default);
                let state = (dims[2], outputs.clone(), token.clone());
                let outputs = prep.finish(state, outputs);
                if let Some(token) = &token {
                    let (op_order, op_width) = (op.1, dims[2]);
                    let mark = head::OutputsMark { op_order, op_width };
                    head::mark_outputs(outputs.node.id, mark, token);
                }
                outputs
            }
            OpsKind::UnTracked(prep) => prep.finish(outputs),
        };
        (outputs, final_state)
    }

    fn rnn_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        passthrough: Option<Passthrough>,
    ) -> FloatTensor<Self> {
        let state = (x.primitive.clone(), weight.primitive.clone(), passthrough);
        let (x_node, weight_node) = (x.node, weight.node);
        let (x, weight) = (state.0.clone(), state.1.clone());
        // Two nodes without a bias, three with one: burn's nodes have a fixed parent count.
        match bias {
            None => match LinearBackward
                .prepare::<C>([x_node, weight_node])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => {
                    prep.finish(state, B::rnn_linear(x, weight, None, passthrough))
                }
                OpsKind::UnTracked(prep) => {
                    prep.finish(B::rnn_linear(x, weight, None, passthrough))
                }
            },
            Some(bias) => match LinearBackward
                .prepare::<C>([x_node, weight_node, bias.node])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => {
                    let y = B::rnn_linear(x, weight, Some(bias.primitive), passthrough);
                    prep.finish(state, y)
                }
                OpsKind::UnTracked(prep) => {
                    prep.finish(B::rnn_linear(x, weight, Some(bias.primitive), passthrough))
                }
            },
        }
    }
}

/// The autodiff node of the projected recurrence op (parents: input, weight, the bias when
/// present, initial state, parameters); its state is everything the backward reads.
#[derive(Debug)]
struct ProjectedBackward<K>(K);

type ProjectedState<B> = (ProjectedInput<B>, FloatTensor<B>, Option<HeadToken>);

impl<K: Recurrence> ProjectedBackward<K> {
    fn run<B: RnnBackend, const N: usize>(
        self,
        ops: Ops<ProjectedState<B>, N>,
        grads: &mut Gradients,
    ) {
        let (rows, head) = op_grad::<B, _, N>(grads, &ops, ops.state.1.clone());
        let (input, packed, _) = ops.state;
        let has_bias = input.bias.is_some();
        let mut parents = ops.parents.into_iter();
        let (node_x, node_weight) = (parents.next().flatten(), parents.next().flatten());
        let node_bias = if has_bias {
            parents.next().flatten()
        } else {
            None
        };
        let (node_state0, node_params) = (parents.next().flatten(), parents.next().flatten());
        let grad_x = node_x.is_some();
        let result = match head {
            None => {
                let Some(rows) = rows else { return };
                B::rnn_projected_backward(&self.0, input, packed, rows, grad_x)
            }
            Some(pending) => {
                let (result, grad_weight) = B::rnn_projected_backward_with_head(
                    &self.0,
                    input,
                    packed,
                    rows,
                    pending.head,
                    grad_x,
                );
                register_head_weight::<B>(grads, pending.weight_node, grad_weight);
                result
            }
        };
        let pairs = [
            (node_x, result.x),
            (node_weight, Some(result.weight)),
            (node_bias, result.bias),
            (node_state0, Some(result.state0)),
            (node_params, Some(result.params)),
        ];
        for (node, grad) in pairs {
            if let (Some(node), Some(grad)) = (node, grad) {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

impl<B: RnnBackend, K: Recurrence> Backward<B, 4> for ProjectedBackward<K> {
    type State = ProjectedState<B>;

    fn backward(self, ops: Ops<Self::State, 4>, grads: &mut Gradients, _: &mut Checkpointer) {
        self.run::<B, 4>(ops, grads)
    }
}

impl<B: RnnBackend, K: Recurrence> Backward<B, 5> for ProjectedBackward<K> {
    type State = ProjectedState<B>;

    fn backward(self, ops: Ops<Self::State, 5>, grads: &mut Gradients, _: &mut Checkpointer) {
        self.run::<B, 5>(ops, grads)
    }
}

/// The projected recurrence op on `Autodiff<B>` with `N` parents, once its node is prepared.
fn finish_projected<B, C, K, const N: usize>(
    kind: OpsKind<ProjectedBackward<K>, B, ProjectedState<B>, C, N>,
    kernel: &K,
    inner: ProjectedInput<B>,
) -> FloatTensor<Autodiff<B, C>>
where
    B: RnnBackend,
    C: CheckpointStrategy,
    K: Recurrence,
    ProjectedBackward<K>: Backward<B, N, State = ProjectedState<B>>,
{
    match kind {
        OpsKind::Tracked(prep) => {
            let (packed, output) = B::rnn_projected_split(kernel, inner.clone());
            let token = op_token::<B>(&output);
            marked_op(prep.finish((inner, packed, token.clone()), output), token)
        }
        OpsKind::UnTracked(prep) => prep.finish(B::rnn_projected_recurrence(kernel, inner)),
    }
}

/// The autodiff node of the outputs that [`RnnBackend::rnn_layer_outputs`] returns (parents:
/// the recurrence op's output and the final state, which gets no gradient here); its state is
/// the op output's width, the outputs (to probe `Gradients` with) and, where a head may pass
/// its gradient in factors, the token of this node's mark (see [`head`]).
#[derive(Debug)]
struct OutputsBackward;

impl<B: RnnBackend> Backward<B, 2> for OutputsBackward {
    type State = (usize, FloatTensor<B>, Option<HeadToken>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = take_registered::<B, _, 2>(grads, &ops, None, ops.state.1.clone());
        // Taken whether or not there is a parent to hand it to: nothing is left behind.
        let head = head::take_head::<B>(ops.node.id);
        let [Some(node), _] = ops.parents else {
            return;
        };
        if let Some(grad) = grad {
            let grad = match B::rnn_takes_output_grads(&grad) {
                true => B::float_swap_dims(grad, 0, 1),
                false => B::rnn_outputs_backward(grad, ops.state.0),
            };
            grads.register::<B>(node.id, grad);
        }
        if let Some(pending) = head {
            head::put_head(node.id, pending);
        }
    }
}

/// The autodiff node of the final state that [`RnnBackend::rnn_layer_outputs`] returns
/// (parent: the recurrence op's output); its state is that output's shape and the step the
/// state was read from. The outputs' node runs its backward first and may have registered the
/// outputs' gradient alone ([`RnnBackend::rnn_takes_output_grads`]), to which burn could not
/// add a whole-width gradient: this node takes that back, widens it, adds the final state's
/// gradient at its step and registers the sum, where the loss reads the state (else it finds
/// no gradient of its own and does nothing).
#[derive(Debug)]
struct FinalStateBackward;

impl<B: RnnBackend> Backward<B, 1> for FinalStateBackward {
    type State = (FloatTensor<B>, [usize; 3], usize);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (template, [len, batch, width], last) = ops.state.clone();
        // The outputs' node reaches this one as its parent even where the loss does not read
        // the state: then there is no gradient here.
        let Some(grad) = take_registered::<B, _, 1>(grads, &ops, None, template) else {
            return;
        };
        let Some(node) = ops.parents[0].clone() else {
            return;
        };
        let full = match take_registered::<B, _, 1>(grads, &ops, Some(0), grad.clone()) {
            Some(alone) if float::<B, 3>(alone.clone()).dims()[2] < width => {
                B::rnn_outputs_backward(B::float_swap_dims(alone, 0, 1), width)
            }
            Some(full) => full,
            None => {
                let device = B::float_device(&grad);
                primitive(Tensor::<B, 3>::zeros([len, batch, width], &device))
            }
        };
        let sum = outputs::add_final_state_grad::<B>(full, grad, last);
        grads.register::<B>(node.id, sum);
    }
}

/// Takes out of `grads` the gradient registered for `ops`' node, or for its parent number
/// `parent`: `None` where there is none (where `Gradients::consume` would panic). `Gradients`
/// finds a gradient by a tensor of the node: one is made for the purpose from `template`.
fn take_registered<B: Backend, S, const N: usize>(
    grads: &mut Gradients,
    ops: &Ops<S, N>,
    parent: Option<usize>,
    template: FloatTensor<B>,
) -> Option<FloatTensor<B>> {
    let node = match parent {
        None => ops.node.clone(),
        Some(index) => ops.parents[index].clone()?,
    };
    let mut probe = <Autodiff<B> as AutodiffBackend>::from_inner(template);
    probe.rc = std::sync::Arc::new(node.id);
    probe.node = node;
    grads.remove::<B>(&probe)
}

/// What keeps a mark of [`head`] alive: held in its node's state.
type HeadToken = std::sync::Arc<()>;

/// A token for the mark of a recurrence op's `output`, where the backend's backward takes a
/// head's gradient in factors.
fn op_token<B: RnnBackend>(output: &FloatTensor<B>) -> Option<HeadToken> {
    B::rnn_takes_head_grads(output).then(HeadToken::default)
}

/// The recurrence op's output, marked for a layer outputs' node where there is a `token`.
fn marked_op<B: Backend>(
    output: FloatTensor<Autodiff<B>>,
    token: Option<HeadToken>,
) -> FloatTensor<Autodiff<B>> {
    if let Some(token) = &token {
        head::mark_op(output.node.id, token);
    }
    output
}

/// The gradient of a recurrence op's output: what reached its node through `Gradients`, and a
/// head's gradient in factors (either may be missing); `template`: any tensor of `B`.
fn op_grad<B: RnnBackend, S, const N: usize>(
    grads: &mut Gradients,
    ops: &Ops<S, N>,
    template: FloatTensor<B>,
) -> (Option<FloatTensor<B>>, Option<head::Pending<B>>) {
    let rows = take_registered::<B, S, N>(grads, ops, None, template);
    (rows, head::take_head::<B>(ops.node.id))
}

/// Registers a head's weight gradient that the recurrence op computed.
fn register_head_weight<B: Backend>(
    grads: &mut Gradients,
    node: Option<burn::backend::autodiff::NodeId>,
    grad: Option<FloatTensor<B>>,
) {
    if let (Some(node), Some(grad)) = (node, grad) {
        grads.register::<B>(node, grad);
    }
}

/// The autodiff node of the projection (parents: input, weight and, when present, bias); its
/// state is the input, the weight and the passthrough.
#[derive(Debug)]
struct LinearBackward;

type LinearState<B> = (FloatTensor<B>, FloatTensor<B>, Option<Passthrough>);

impl LinearBackward {
    fn run<B: RnnBackend, const N: usize>(ops: Ops<LinearState<B>, N>, grads: &mut Gradients) {
        let grad = grads.consume::<B>(&ops.node);
        let (x, weight, passthrough) = ops.state;
        let mut parents = ops.parents.into_iter();
        let (node_x, node_weight) = (parents.next().flatten(), parents.next().flatten());
        let node_bias = parents.next().flatten();
        // A head on a layer's outputs: its input gradient goes to the recurrence op in factors.
        let outputs_mark = match (&node_x, passthrough) {
            (Some(node), None) => head::take_outputs_mark(node.id).map(|mark| (node.id, mark)),
            _ => None,
        };
        if let Some((node, mark)) = outputs_mark {
            let weight_node = node_weight.map(|node| (node.id, node.order));
            let bias_node = node_bias.map(|node| node.id);
            let pending =
                head_in_factors::<B>(grads, grad, x, weight, mark, weight_node, bias_node);
            head::put_head(node, pending);
            return;
        }
        let params = node_weight.is_some() || node_bias.is_some();
        let (grad_x, grad_params) =
            linear_grads_wanted::<B>(grad, x, weight, passthrough, node_x.is_some(), params);
        if let (Some(node), Some(grad_x)) = (node_x, grad_x) {
            grads.register::<B>(node.id, grad_x);
        }
        if let Some((grad_weight, grad_bias)) = grad_params {
            if let Some(node) = node_weight {
                grads.register::<B>(node.id, grad_weight);
            }
            if let Some(node) = node_bias {
                grads.register::<B>(node.id, grad_bias);
            }
        }
    }
}

/// A head's gradient in factors for the recurrence op (see [`head`]), once this registers what
/// the op does not compute: the bias gradient, and the weight's where burn runs the weight
/// node's backward before the op's (its node `(id, order)` as deep as the op's or deeper).
fn head_in_factors<B: RnnBackend>(
    grads: &mut Gradients,
    grad: FloatTensor<B>,
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    mark: head::OutputsMark,
    weight_node: Option<(burn::backend::autodiff::NodeId, usize)>,
    bias_node: Option<burn::backend::autodiff::NodeId>,
) -> head::Pending<B> {
    let (by_op, by_head) = match weight_node {
        Some((id, order)) if order < mark.op_order => (Some(id), None),
        other => (None, other.map(|(id, _)| id)),
    };
    if let Some(node) = by_head {
        let (grad_weight, grad_bias) = B::rnn_linear_grad_params(grad.clone(), x.clone(), None);
        grads.register::<B>(node, grad_weight);
        if let Some(node) = bias_node {
            grads.register::<B>(node, grad_bias);
        }
    } else if let Some(node) = bias_node {
        let k = float::<B, 3>(grad.clone()).dims()[2];
        let sums = float::<B, 3>(grad.clone())
            .sum_dim(0)
            .sum_dim(1)
            .reshape([k]);
        grads.register::<B>(node, primitive(sums));
    }
    let head = HeadGrad {
        grad,
        weight,
        input: x,
        op_width: mark.op_width,
        weight_grad: by_op.is_some(),
    };
    head::Pending {
        head,
        weight_node: by_op,
    }
}

impl<B: RnnBackend> Backward<B, 2> for LinearBackward {
    type State = LinearState<B>;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        Self::run::<B, 2>(ops, grads)
    }
}

impl<B: RnnBackend> Backward<B, 3> for LinearBackward {
    type State = LinearState<B>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        Self::run::<B, 3>(ops, grads)
    }
}

// GPU backends: the SRU, the plain LSTM and the plain GRU run as one fused kernel per pass
// (`cube`, `cube_lstm`, `cube_gru`), other cells as plain tensor ops.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
impl<R, F, I, BT> RnnBackend for burn_cubecl::CubeBackend<R, F, I, BT>
where
    R: burn_cubecl::CubeRuntime,
    F: burn_cubecl::FloatElement,
    I: burn_cubecl::IntElement,
    BT: burn_cubecl::BoolElement,
{
    fn rnn_recurrence_split<K: Recurrence>(
        kernel: &K,
        input: RecurrenceInput<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        if let Some(sru) = kernel.as_sru() {
            return cube::sru_forward(sru, cube_input(input));
        }
        match fused_gated(kernel, &input) {
            Some(Gated::Lstm(hidden)) => cube_lstm::lstm_forward(hidden, cube_input(input)),
            Some(Gated::Gru(hidden)) => cube_gru::gru_forward(hidden, cube_input(input)),
            None => split::<Self, K>(kernel, recurrence_forward::<Self, K>(kernel, input)),
        }
    }

    fn rnn_recurrence_backward<K: Recurrence>(
        kernel: &K,
        input: RecurrenceInput<Self>,
        packed: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> RecurrenceGrads<Self> {
        if let Some(sru) = kernel.as_sru() {
            let grads = cube::sru_backward(sru, cube_input(input), packed, grad);
            let per_row = float::<Self, 2>(grads.params_per_row);
            let width = per_row.dims()[1];
            return RecurrenceGrads {
                xp: grads.xp,
                state0: grads.state0,
                params: primitive(per_row.sum_dim(0).reshape([width])),
            };
        }
        match fused_gated(kernel, &input) {
            Some(gated) => gated_backward_cube(gated, input, packed, grad),
            None => recurrence_backward::<Self, K>(kernel, input, packed, grad),
        }
    }
}

/// A gated cell that one of the fused row-per-cube kernels runs, with its hidden size.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
#[derive(Debug, Clone, Copy)]
enum Gated {
    Lstm(usize),
    Gru(usize),
}

#[cfg(any(feature = "wgpu", feature = "cuda"))]
impl Gated {
    fn hidden(self) -> usize {
        let (Self::Lstm(hidden) | Self::Gru(hidden)) = self;
        hidden
    }

    /// Width of the recurrent product `h · W_hhᵀ`: four gates or three.
    fn gates(self) -> usize {
        match self {
            Self::Lstm(hidden) => 4 * hidden,
            Self::Gru(hidden) => 3 * hidden,
        }
    }
}

/// The fused kernel that runs this recurrence, where one does: `torch.nn.LSTM`'s or
/// `torch.nn.GRU`'s cell, of at most as many units as a cube has threads.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
fn fused_gated<R, F, I, BT, K: Recurrence>(
    kernel: &K,
    input: &RecurrenceInput<burn_cubecl::CubeBackend<R, F, I, BT>>,
) -> Option<Gated>
where
    R: burn_cubecl::CubeRuntime,
    F: burn_cubecl::FloatElement,
    I: burn_cubecl::IntElement,
    BT: burn_cubecl::BoolElement,
{
    let gated = match (kernel.as_plain_lstm(), kernel.as_plain_gru()) {
        (Some(hidden), _) => Gated::Lstm(hidden),
        (None, Some(hidden)) => Gated::Gru(hidden),
        (None, None) => return None,
    };
    cube_lstm::fits(&input.xp, gated.hidden()).then_some(gated)
}

#[cfg(any(feature = "wgpu", feature = "cuda"))]
type Cube<R, F, I, BT> = burn_cubecl::CubeBackend<R, F, I, BT>;

/// The fused gated backward: the kernel gives the gradients of the projected input, of the
/// initial state and of the recurrent pre-activations (the LSTM's are the projected input's,
/// `dz`; the GRU's differ in the candidate's block, `r ⊙ dn`); the recurrent weight's gradient
/// `Σ h_prevᵀ d` (and the GRU's recurrent bias', `Σ d`) is one chunked product over every step.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
fn gated_backward_cube<R, F, I, BT>(
    gated: Gated,
    input: RecurrenceInput<Cube<R, F, I, BT>>,
    packed: FloatTensor<Cube<R, F, I, BT>>,
    grad: FloatTensor<Cube<R, F, I, BT>>,
) -> RecurrenceGrads<Cube<R, F, I, BT>>
where
    R: burn_cubecl::CubeRuntime,
    F: burn_cubecl::FloatElement,
    I: burn_cubecl::IntElement,
    BT: burn_cubecl::BoolElement,
{
    let (hidden, gates) = (gated.hidden(), gated.gates());
    let (state0, reverse) = (input.state0.clone(), input.reverse);
    // `W_hh` `[G, H]` from the params' `W_hhᵀ` (the GRU's `b_hh` follows it).
    let weight = float::<Cube<R, F, I, BT>, 1>(input.params.clone())
        .narrow(0, 0, hidden * gates)
        .reshape([hidden, gates])
        .transpose();
    let (weight, packed_in) = (primitive(weight), packed.clone());
    let (grad_xp, grad_state0, recurrent) = match gated {
        Gated::Lstm(_) => {
            let (dz, state0) =
                cube_lstm::lstm_backward(hidden, cube_input(input), weight, packed_in, grad);
            (dz.clone(), state0, dz)
        }
        Gated::Gru(_) => {
            let grads = cube_gru::gru_backward(hidden, cube_input(input), weight, packed_in, grad);
            (grads.xp, grads.state0, grads.hz)
        }
    };
    let h_prev = previous_h::<Cube<R, F, I, BT>>(packed, state0, hidden, reverse);
    let (grad_weight, grad_bias) = recurrent_weight_grads::<Cube<R, F, I, BT>>(recurrent, h_prev);
    let params = match gated {
        Gated::Lstm(_) => grad_weight,
        Gated::Gru(_) => primitive(Tensor::cat(
            vec![
                float::<Cube<R, F, I, BT>, 1>(grad_weight),
                float::<Cube<R, F, I, BT>, 1>(grad_bias),
            ],
            0,
        )),
    };
    RecurrenceGrads {
        xp: grad_xp,
        state0: grad_state0,
        params,
    }
}

/// The `h` each step started from, in step order, `[T, B, H]`: `state0`'s first `H` columns
/// and the packed sequence's columns `H..2H` (a fused gated kernel's `h out | h | ..` rows).
#[cfg(any(feature = "wgpu", feature = "cuda"))]
fn previous_h<B: Backend>(
    packed: FloatTensor<B>,
    state0: FloatTensor<B>,
    hidden: usize,
    reverse: bool,
) -> FloatTensor<B> {
    let h_seq = float::<B, 3>(packed).narrow(2, hidden, hidden);
    let len = h_seq.dims()[0];
    let h0 = float::<B, 2>(state0)
        .narrow(1, 0, hidden)
        .unsqueeze_dim::<3>(0);
    primitive(match (len, reverse) {
        (1, _) => h0,
        (_, false) => Tensor::cat(vec![h0, h_seq.narrow(0, 0, len - 1)], 0),
        (_, true) => Tensor::cat(vec![h_seq.narrow(0, 1, len - 1), h0], 0),
    })
}

/// The gradients of a recurrent weight `W_hhᵀ` `[H, G]` (flat) and of a bias added after it
/// (`[G]`), from the gradient `d` `[T, B, G]` of their output and the `h` it read `[T, B, H]`.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
fn recurrent_weight_grads<B: Backend>(
    d: FloatTensor<B>,
    h_prev: FloatTensor<B>,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let (grad_weight, grad_bias) = linear::tensor_grad_params::<B>(d, h_prev, None);
    let grad_weight = float::<B, 2>(grad_weight).transpose();
    let [hidden, gates] = grad_weight.dims();
    (primitive(grad_weight.reshape([hidden * gates])), grad_bias)
}

/// The op's inputs as the fused kernels take them.
#[cfg(any(feature = "wgpu", feature = "cuda"))]
fn cube_input<R, F, I, BT>(
    input: RecurrenceInput<burn_cubecl::CubeBackend<R, F, I, BT>>,
) -> cube::CubeInput<R>
where
    R: burn_cubecl::CubeRuntime,
    F: burn_cubecl::FloatElement,
    I: burn_cubecl::IntElement,
    BT: burn_cubecl::BoolElement,
{
    cube::CubeInput {
        xp: input.xp,
        state0: input.state0,
        params: input.params,
        mask: input.mask,
        reverse: input.reverse,
    }
}

/// How the recurrence is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RecurrencePath {
    /// One op with a hand-written backward (the backend's fastest path): what training uses.
    #[default]
    Fused,
    /// The kernel's plain tensor steps, differentiated by autodiff op by op. Same numbers,
    /// but its backward costs O(T²) in burn 0.21: a reference for checking the fused path.
    Plain,
}

/// What a layer reads of the recurrence op's output (`[T, batch, W]`): each step's output,
/// batch-major (`[batch, T, O]`, see [`RnnBackend::rnn_outputs`]), and the final state, the
/// last `state_width` columns of step `last` (`[batch, S]`); `path`: the path that computed
/// the op's output. The plain path reads them with burn's own tensor ops, the fused one with
/// [`RnnBackend::rnn_layer_outputs`].
pub fn layer_outputs<B: RnnBackend>(
    visible: Tensor<B, 3>,
    output_width: usize,
    state_width: usize,
    last: usize,
    path: RecurrencePath,
) -> (Tensor<B, 3>, Tensor<B, 2>) {
    let visible = primitive(visible);
    let (outputs, final_state) = match path {
        RecurrencePath::Fused => B::rnn_layer_outputs(visible, output_width, state_width, last),
        RecurrencePath::Plain => (
            outputs::tensor_forward::<B>(visible.clone(), output_width),
            outputs::final_state::<B>(visible, state_width, last),
        ),
    };
    (float(outputs), float(final_state))
}

/// The projected recurrence op ([`RnnBackend::rnn_projected_recurrence`]) on high-level
/// tensors: the recurrence op's output `[T, batch, O + S]` (or `[T, batch, S]`, see
/// [`with_output_columns`]) from `input`.
pub fn projected_recurrence<B: RnnBackend, K: Recurrence>(
    kernel: &K,
    input: ProjectedInput<B>,
) -> Tensor<B, 3> {
    float(B::rnn_projected_recurrence(kernel, input))
}

impl<B: Backend> ProjectedInput<B> {
    /// The op's input from high-level tensors: the layer input `x` `[T, batch, width]`, the
    /// projection `x · weightᵀ + bias` and the columns of `x` that `passthrough` appends to
    /// it; no noise.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        x: Tensor<B, 3>,
        weight: Tensor<B, 2>,
        bias: Option<Tensor<B, 1>>,
        passthrough: Option<Passthrough>,
        state0: Tensor<B, 2>,
        params: Tensor<B, 1>,
        mask: Option<Tensor<B, 2>>,
        reverse: bool,
    ) -> Self {
        Self {
            x: primitive(x),
            weight: primitive(weight),
            bias: bias.map(primitive),
            passthrough,
            state0: primitive(state0),
            params: primitive(params),
            mask: mask.map(primitive),
            reverse,
            noise: None,
        }
    }
}

/// Runs the recurrence op on high-level tensors along the chosen [`RecurrencePath`]: the
/// entry point the layer uses. Its output is `[T, batch, O + S]`, or `[T, batch, S]` where the
/// host path leaves out output columns that are the state's first ([`with_output_columns`]
/// puts them back).
pub fn recurrence_with<B: RnnBackend, K: Recurrence>(
    path: RecurrencePath,
    kernel: &K,
    xp: Tensor<B, 3>,
    state0: Tensor<B, 2>,
    params: Tensor<B, 1>,
    mask: Option<Tensor<B, 2>>,
    reverse: bool,
) -> Tensor<B, 3> {
    let input = RecurrenceInput {
        xp: primitive(xp),
        state0: primitive(state0),
        params: primitive(params),
        mask: mask.map(primitive),
        reverse,
    };
    float(match path {
        RecurrencePath::Fused => B::rnn_recurrence(kernel, input),
        RecurrencePath::Plain => visible::<B, K>(kernel, recurrence_forward::<B, K>(kernel, input)),
    })
}

/// The recurrence op's output with its output columns, `[T, batch, O + S]`, whichever layout
/// the backend returned: the host path leaves them out where they are the state's first
/// columns and no mask sets them apart ([`Recurrence::host_output_in_state`]); this puts them
/// back, through autodiff.
pub fn with_output_columns<B: Backend, K: Recurrence>(
    kernel: &K,
    output: Tensor<B, 3>,
) -> Tensor<B, 3> {
    let (o, s) = (kernel.output_width(), kernel.state_width());
    if output.dims()[2] == o + s {
        return output;
    }
    Tensor::cat(vec![output.clone().narrow(2, 0, o), output], 2)
}
