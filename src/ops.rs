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
//! [`Autodiff`] wraps them in a custom backward node.

use burn::backend::autodiff::{
    checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
    Autodiff,
};
use burn::tensor::{backend::Backend, ops::FloatTensor, Tensor, TensorPrimitive};

use std::borrow::Cow;

use burn::tensor::DType;

use crate::host::{
    self, HostFloat, HostInput, HostStep, HostStepGrads, MatMut, MatRef, WeightProduct,
};

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
    /// `[batch, output | state | saved]` into `out`. Must compute what `step` computes.
    fn host_step<F: HostFloat>(
        &self,
        params: &[MatRef<F>],
        xp: MatRef<F>,
        prev: MatRef<F>,
        out: MatMut<F>,
    );
    /// [`step_backward`](Recurrence::step_backward) on host memory. Weight gradients listed in
    /// [`host_weight_products`](Recurrence::host_weight_products) are left to the driver: the
    /// step writes their operands instead.
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
        (packed.clone(), visible::<Self, K>(kernel, packed))
    }

    /// The recurrence op: each step's output and new state, `[T, batch, O + S]` (the packed
    /// sequence without the saved values, which only the backward needs).
    fn rnn_recurrence<K: Recurrence>(
        kernel: &K,
        input: RecurrenceInput<Self>,
    ) -> FloatTensor<Self> {
        Self::rnn_recurrence_split(kernel, input).1
    }

    /// The backward of [`rnn_recurrence`](RnnBackend::rnn_recurrence), from its inputs, the
    /// full packed sequence and the gradient of the op's output (`[T, batch, O + S]`).
    fn rnn_recurrence_backward<K: Recurrence>(
        kernel: &K,
        input: RecurrenceInput<Self>,
        packed: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> RecurrenceGrads<Self> {
        recurrence_backward::<Self, K>(kernel, input, packed, grad)
    }

    /// The input projection `x · Wᵀ + b` of every step (`x` `[T, batch, in]`, any layout;
    /// `weight` `[out, in]`, `bias` `[out]`), as PyTorch's `linear`: `[T, batch, out]`.
    fn rnn_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
    ) -> FloatTensor<Self> {
        linear::tensor_forward::<Self>(x, weight, bias)
    }

    /// `grad · weight` (`[T, batch, out]` by `[out, in]`): the projection's input gradient.
    fn rnn_linear_grad_input(
        grad: FloatTensor<Self>,
        weight: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        linear::tensor_grad_input::<Self>(grad, weight)
    }

    /// `gradᵀ · x` and the column sums of `grad`: the projection's weight and bias gradients.
    fn rnn_linear_grad_params(
        grad: FloatTensor<Self>,
        x: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        linear::tensor_grad_params::<Self>(grad, x)
    }

    /// Each step's output, batch-major and contiguous: `[batch, T, O]` from the op's
    /// `[T, batch, W]` output (its first `O` columns).
    fn rnn_outputs(visible: FloatTensor<Self>, output_width: usize) -> FloatTensor<Self> {
        primitive(
            float::<Self, 3>(visible)
                .narrow(2, 0, output_width)
                .swap_dims(0, 1),
        )
    }

    /// The backward of [`rnn_outputs`](RnnBackend::rnn_outputs): `[T, batch, W]` with zeros
    /// beyond the first `O` columns.
    fn rnn_outputs_backward(grad: FloatTensor<Self>, width: usize) -> FloatTensor<Self> {
        let grad = float::<Self, 3>(grad).swap_dims(0, 1);
        let [len, batch, output_width] = grad.dims();
        let zeros = Tensor::zeros([len, batch, width - output_width], &grad.device());
        primitive(Tensor::cat(vec![grad, zeros], 2))
    }
}

/// The input projection's forward and gradients: plain tensor ops, and a host (GEMM) version
/// for backends that lend their memory (f32/f64).
pub mod linear {
    use super::*;

    /// `x · Wᵀ + b` with tensor ops.
    pub fn tensor_forward<B: Backend>(
        x: FloatTensor<B>,
        weight: FloatTensor<B>,
        bias: Option<FloatTensor<B>>,
    ) -> FloatTensor<B> {
        let x = float::<B, 3>(x);
        let [len, batch, width] = x.dims();
        let weight = float::<B, 2>(weight);
        let out = weight.dims()[0];
        let y = x.reshape([len * batch, width]).matmul(weight.transpose());
        let y = match bias {
            Some(bias) => y + float::<B, 1>(bias).unsqueeze_dim(0),
            None => y,
        };
        primitive(y.reshape([len, batch, out]))
    }

    /// `grad · W` with tensor ops.
    pub fn tensor_grad_input<B: Backend>(
        grad: FloatTensor<B>,
        weight: FloatTensor<B>,
    ) -> FloatTensor<B> {
        let grad = float::<B, 3>(grad);
        let [len, batch, out] = grad.dims();
        let weight = float::<B, 2>(weight);
        let width = weight.dims()[1];
        let dx = grad.reshape([len * batch, out]).matmul(weight);
        primitive(dx.reshape([len, batch, width]))
    }

    /// `gradᵀ · x` and the column sums of `grad` with tensor ops.
    pub fn tensor_grad_params<B: Backend>(
        grad: FloatTensor<B>,
        x: FloatTensor<B>,
    ) -> (FloatTensor<B>, FloatTensor<B>) {
        let grad = float::<B, 3>(grad);
        let [len, batch, out] = grad.dims();
        let grad = grad.reshape([len * batch, out]);
        let x = float::<B, 3>(x);
        let width = x.dims()[2];
        let weight = grad
            .clone()
            .transpose()
            .matmul(x.reshape([len * batch, width]));
        (primitive(weight), primitive(grad.sum_dim(0).reshape([out])))
    }

    fn dims3<B: Backend>(tensor: &FloatTensor<B>) -> [usize; 3] {
        float::<B, 3>(tensor.clone()).dims()
    }

    fn dims<B: Backend>(tensor: &FloatTensor<B>) -> [usize; 2] {
        float::<B, 2>(tensor.clone()).dims()
    }

    fn host_float<B: Backend>(tensor: &FloatTensor<B>) -> Option<DType> {
        let dtype = float::<B, 3>(tensor.clone()).dtype();
        matches!(dtype, DType::F32 | DType::F64).then_some(dtype)
    }

    /// `x · Wᵀ + b` through the GEMM on host memory.
    pub fn host_forward<B: HostTensors>(
        x: FloatTensor<B>,
        weight: FloatTensor<B>,
        bias: Option<FloatTensor<B>>,
    ) -> FloatTensor<B> {
        fn run<B: HostTensors, F: HostFloat>(
            x: FloatTensor<B>,
            weight: FloatTensor<B>,
            bias: Option<FloatTensor<B>>,
        ) -> FloatTensor<B> {
            let ([len, batch, inner], [out, _]) = (dims3::<B>(&x), dims::<B>(&weight));
            let rows = len * batch;
            let (xs, ws) = (B::host_slice::<F, 3>(&x), B::host_slice::<F, 2>(&weight));
            let mut y = vec![F::zero(); rows * out];
            if let Some(bias) = &bias {
                let bias = B::host_slice::<F, 1>(bias);
                y.chunks_mut(out.max(1))
                    .for_each(|row| row.copy_from_slice(&bias));
            }
            host::matmul(
                &mut MatMut::new(&mut y, rows, out),
                MatRef::new(&xs, rows, inner),
                MatRef::new(&ws, out, inner).t(),
                bias.is_some(),
            );
            from_host::<B, F, 3>(y, [len, batch, out], &B::float_device(&x))
        }
        match host_float::<B>(&x) {
            Some(DType::F32) => run::<B, f32>(x, weight, bias),
            Some(_) => run::<B, f64>(x, weight, bias),
            None => tensor_forward::<B>(x, weight, bias),
        }
    }

    /// `grad · W` through the GEMM on host memory.
    pub fn host_grad_input<B: HostTensors>(
        grad: FloatTensor<B>,
        weight: FloatTensor<B>,
    ) -> FloatTensor<B> {
        fn run<B: HostTensors, F: HostFloat>(
            grad: FloatTensor<B>,
            weight: FloatTensor<B>,
        ) -> FloatTensor<B> {
            let ([len, batch, out], [_, inner]) = (dims3::<B>(&grad), dims::<B>(&weight));
            let rows = len * batch;
            let (gs, ws) = (B::host_slice::<F, 3>(&grad), B::host_slice::<F, 2>(&weight));
            let mut dx = vec![F::zero(); rows * inner];
            host::matmul(
                &mut MatMut::new(&mut dx, rows, inner),
                MatRef::new(&gs, rows, out),
                MatRef::new(&ws, out, inner),
                false,
            );
            from_host::<B, F, 3>(dx, [len, batch, inner], &B::float_device(&grad))
        }
        match host_float::<B>(&grad) {
            Some(DType::F32) => run::<B, f32>(grad, weight),
            Some(_) => run::<B, f64>(grad, weight),
            None => tensor_grad_input::<B>(grad, weight),
        }
    }

    /// `gradᵀ · x` and the column sums of `grad` through the GEMM on host memory.
    pub fn host_grad_params<B: HostTensors>(
        grad: FloatTensor<B>,
        x: FloatTensor<B>,
    ) -> (FloatTensor<B>, FloatTensor<B>) {
        fn run<B: HostTensors, F: HostFloat>(
            grad: FloatTensor<B>,
            x: FloatTensor<B>,
        ) -> (FloatTensor<B>, FloatTensor<B>) {
            let ([len, batch, out], [_, _, inner]) = (dims3::<B>(&grad), dims3::<B>(&x));
            let rows = len * batch;
            let (gs, xs) = (B::host_slice::<F, 3>(&grad), B::host_slice::<F, 3>(&x));
            let grads = MatRef::new(&gs, rows, out);
            let mut dw = vec![F::zero(); out * inner];
            host::matmul(
                &mut MatMut::new(&mut dw, out, inner),
                grads.t(),
                MatRef::new(&xs, rows, inner),
                false,
            );
            // Column sums as a product with a row of ones: parallel, in a fixed order.
            let ones = vec![F::one(); rows];
            let mut db = vec![F::zero(); out];
            host::matmul(
                &mut MatMut::new(&mut db, 1, out),
                MatRef::new(&ones, 1, rows),
                grads,
                false,
            );
            let device = B::float_device(&grad);
            (
                from_host::<B, F, 2>(dw, [out, inner], &device),
                from_host::<B, F, 1>(db, [out], &device),
            )
        }
        match host_float::<B>(&grad) {
            Some(DType::F32) => run::<B, f32>(grad, x),
            Some(_) => run::<B, f64>(grad, x),
            None => tensor_grad_params::<B>(grad, x),
        }
    }
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
    type State = (RecurrenceInput<B>, FloatTensor<B>);

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let [node_xp, node_state0, node_params] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (input, packed) = ops.state;
        let result = B::rnn_recurrence_backward(&self.0, input, packed, grad);
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
                prep.finish((inner, packed), output)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::rnn_recurrence(kernel, inner)),
        }
    }

    fn rnn_outputs(visible: FloatTensor<Self>, output_width: usize) -> FloatTensor<Self> {
        let width = float::<B, 3>(visible.primitive.clone()).dims()[2];
        match OutputsBackward
            .prepare::<C>([visible.node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                prep.finish(width, B::rnn_outputs(visible.primitive, output_width))
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::rnn_outputs(visible.primitive, output_width))
            }
        }
    }

    fn rnn_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
    ) -> FloatTensor<Self> {
        let state = (x.primitive.clone(), weight.primitive.clone());
        let (x_node, weight_node) = (x.node, weight.node);
        let (x, weight) = state.clone();
        // Two nodes without a bias, three with one: burn's nodes have a fixed parent count.
        match bias {
            None => match LinearBackward
                .prepare::<C>([x_node, weight_node])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => prep.finish(state, B::rnn_linear(x, weight, None)),
                OpsKind::UnTracked(prep) => prep.finish(B::rnn_linear(x, weight, None)),
            },
            Some(bias) => match LinearBackward
                .prepare::<C>([x_node, weight_node, bias.node])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(prep) => {
                    prep.finish(state, B::rnn_linear(x, weight, Some(bias.primitive)))
                }
                OpsKind::UnTracked(prep) => {
                    prep.finish(B::rnn_linear(x, weight, Some(bias.primitive)))
                }
            },
        }
    }
}

/// The autodiff node of [`RnnBackend::rnn_outputs`]; its state is the input's width.
#[derive(Debug)]
struct OutputsBackward;

impl<B: RnnBackend> Backward<B, 1> for OutputsBackward {
    type State = usize;

    fn backward(self, ops: Ops<usize, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = grads.consume::<B>(&ops.node);
        if let [Some(node)] = ops.parents {
            grads.register::<B>(node.id, B::rnn_outputs_backward(grad, ops.state));
        }
    }
}

/// The autodiff node of the projection (parents: input, weight and, when present, bias); its
/// state is the input and the weight.
#[derive(Debug)]
struct LinearBackward;

impl LinearBackward {
    fn run<B: RnnBackend, const N: usize>(
        ops: Ops<(FloatTensor<B>, FloatTensor<B>), N>,
        grads: &mut Gradients,
    ) {
        let grad = grads.consume::<B>(&ops.node);
        let (x, weight) = ops.state;
        let mut parents = ops.parents.into_iter();
        let (node_x, node_weight) = (parents.next().flatten(), parents.next().flatten());
        let node_bias = parents.next().flatten();
        if let Some(node) = node_x {
            grads.register::<B>(node.id, B::rnn_linear_grad_input(grad.clone(), weight));
        }
        if node_weight.is_some() || node_bias.is_some() {
            let (grad_weight, grad_bias) = B::rnn_linear_grad_params(grad, x);
            if let Some(node) = node_weight {
                grads.register::<B>(node.id, grad_weight);
            }
            if let Some(node) = node_bias {
                grads.register::<B>(node.id, grad_bias);
            }
        }
    }
}

impl<B: RnnBackend> Backward<B, 2> for LinearBackward {
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        Self::run::<B, 2>(ops, grads)
    }
}

impl<B: RnnBackend> Backward<B, 3> for LinearBackward {
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        Self::run::<B, 3>(ops, grads)
    }
}

// burn-ndarray runs the recurrence on host memory (`crate::host`).
#[cfg(feature = "ndarray")]
impl<E, I, Q> RnnBackend for burn::backend::NdArray<E, I, Q>
where
    E: burn::backend::ndarray::FloatNdArrayElement,
    I: burn::backend::ndarray::IntNdArrayElement,
    Q: burn::backend::ndarray::QuantElement,
    burn::backend::ndarray::NdArrayTensor: From<burn::backend::ndarray::SharedArray<E>>,
    burn::backend::ndarray::NdArrayTensor: From<burn::backend::ndarray::SharedArray<I>>,
{
    fn rnn_recurrence_split<K: Recurrence>(
        kernel: &K,
        input: RecurrenceInput<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        host_recurrence_forward::<Self, K>(kernel, input)
    }

    fn rnn_recurrence_backward<K: Recurrence>(
        kernel: &K,
        input: RecurrenceInput<Self>,
        packed: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> RecurrenceGrads<Self> {
        host_recurrence_backward::<Self, K>(kernel, input, packed, grad)
    }

    fn rnn_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
    ) -> FloatTensor<Self> {
        linear::host_forward::<Self>(x, weight, bias)
    }

    fn rnn_linear_grad_input(
        grad: FloatTensor<Self>,
        weight: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        linear::host_grad_input::<Self>(grad, weight)
    }

    fn rnn_linear_grad_params(
        grad: FloatTensor<Self>,
        x: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        linear::host_grad_params::<Self>(grad, x)
    }

    fn rnn_outputs(visible: FloatTensor<Self>, output_width: usize) -> FloatTensor<Self> {
        host_outputs::<Self>(visible, output_width)
    }

    fn rnn_outputs_backward(grad: FloatTensor<Self>, width: usize) -> FloatTensor<Self> {
        host_outputs_backward::<Self>(grad, width)
    }
}

/// [`RnnBackend::rnn_outputs`] on host memory: one row copy per step and sequence.
pub fn host_outputs<B: HostTensors>(
    visible: FloatTensor<B>,
    output_width: usize,
) -> FloatTensor<B> {
    fn run<B: HostTensors, F: HostFloat>(visible: FloatTensor<B>, out_w: usize) -> FloatTensor<B> {
        let [len, batch, width] = float::<B, 3>(visible.clone()).dims();
        let values = B::host_slice::<F, 3>(&visible);
        let mut outputs = vec![F::zero(); batch * len * out_w];
        for (b, sequence) in outputs.chunks_mut((len * out_w).max(1)).enumerate() {
            for (t, row) in sequence.chunks_mut(out_w.max(1)).enumerate() {
                let start = (t * batch + b) * width;
                row.copy_from_slice(&values[start..start + out_w]);
            }
        }
        from_host::<B, F, 3>(outputs, [batch, len, out_w], &B::float_device(&visible))
    }
    match float::<B, 3>(visible.clone()).dtype() {
        DType::F32 => run::<B, f32>(visible, output_width),
        DType::F64 => run::<B, f64>(visible, output_width),
        _ => primitive(
            float::<B, 3>(visible)
                .narrow(2, 0, output_width)
                .swap_dims(0, 1),
        ),
    }
}

/// [`RnnBackend::rnn_outputs_backward`] on host memory.
pub fn host_outputs_backward<B: HostTensors>(grad: FloatTensor<B>, width: usize) -> FloatTensor<B> {
    fn run<B: HostTensors, F: HostFloat>(grad: FloatTensor<B>, width: usize) -> FloatTensor<B> {
        let [batch, len, out_w] = float::<B, 3>(grad.clone()).dims();
        let values = B::host_slice::<F, 3>(&grad);
        let mut full = vec![F::zero(); len * batch * width];
        for (b, sequence) in values.chunks((len * out_w).max(1)).enumerate() {
            for (t, row) in sequence.chunks(out_w.max(1)).enumerate() {
                let start = (t * batch + b) * width;
                full[start..start + out_w].copy_from_slice(row);
            }
        }
        from_host::<B, F, 3>(full, [len, batch, width], &B::float_device(&grad))
    }
    match float::<B, 3>(grad.clone()).dtype() {
        DType::F32 => run::<B, f32>(grad, width),
        DType::F64 => run::<B, f64>(grad, width),
        _ => {
            let grad = float::<B, 3>(grad).swap_dims(0, 1);
            let [len, batch, out_w] = grad.dims();
            let zeros = Tensor::zeros([len, batch, width - out_w], &grad.device());
            primitive(Tensor::cat(vec![grad, zeros], 2))
        }
    }
}

/// How a backend lends its tensors to the host path: by default a copy through `into_data`;
/// burn-ndarray lends its contiguous buffers without copying.
pub trait HostTensors: Backend {
    /// The elements of `tensor` in row-major order as `F`.
    fn host_slice<F: HostFloat, const D: usize>(tensor: &FloatTensor<Self>) -> Cow<'_, [F]> {
        Cow::Owned(
            float::<Self, D>(tensor.clone())
                .into_data()
                .convert::<F>()
                .into_vec::<F>()
                .expect("converted to the host float type"),
        )
    }
}

/// The elements of an ndarray view in row-major order (a macro: burn-ndarray does not export
/// ndarray's types, but their methods can be called).
#[cfg(feature = "ndarray")]
macro_rules! lanes_to_vec {
    ($view:expr) => {{
        let view = $view;
        let mut values = Vec::with_capacity(view.len());
        for lane in view.rows() {
            match lane.as_slice() {
                Some(run) => values.extend_from_slice(run),
                None => values.extend(lane.iter().copied()),
            }
        }
        values
    }};
}

#[cfg(feature = "ndarray")]
impl<E, I, Q> HostTensors for burn::backend::NdArray<E, I, Q>
where
    E: burn::backend::ndarray::FloatNdArrayElement,
    I: burn::backend::ndarray::IntNdArrayElement,
    Q: burn::backend::ndarray::QuantElement,
    burn::backend::ndarray::NdArrayTensor: From<burn::backend::ndarray::SharedArray<E>>,
    burn::backend::ndarray::NdArrayTensor: From<burn::backend::ndarray::SharedArray<I>>,
{
    fn host_slice<F: HostFloat, const D: usize>(tensor: &FloatTensor<Self>) -> Cow<'_, [F]> {
        use burn::backend::ndarray::NdArrayTensor;
        let borrowed = match tensor {
            NdArrayTensor::F32(storage) => storage.view().to_slice().and_then(same_type),
            NdArrayTensor::F64(storage) => storage.view().to_slice().and_then(same_type),
            _ => None,
        };
        if let Some(slice) = borrowed {
            return Cow::Borrowed(slice);
        }
        // A strided view (a transpose, a slice): copy it lane by lane, each lane along the last
        // axis one memcpy when contiguous (burn's own copy goes element by element).
        let copied: Option<Vec<F>> = match tensor {
            NdArrayTensor::F32(storage) => same_type_vec(lanes_to_vec!(storage.view())),
            NdArrayTensor::F64(storage) => same_type_vec(lanes_to_vec!(storage.view())),
            _ => None,
        };
        Cow::Owned(copied.unwrap_or_else(|| {
            float::<Self, D>(tensor.clone())
                .into_data()
                .convert::<F>()
                .into_vec::<F>()
                .expect("converted to the host float type")
        }))
    }
}

/// `values` as `Vec<F>` when its element type is `F`.
#[cfg(feature = "ndarray")]
fn same_type_vec<A: 'static, F: 'static>(values: Vec<A>) -> Option<Vec<F>> {
    let boxed: Box<dyn core::any::Any> = Box::new(values);
    boxed.downcast::<Vec<F>>().ok().map(|values| *values)
}

/// `slice` as `&[F]` when its element type is `F`.
#[cfg(feature = "ndarray")]
fn same_type<A: 'static, F: 'static>(slice: &[A]) -> Option<&[F]> {
    (core::any::TypeId::of::<A>() == core::any::TypeId::of::<F>()).then(|| {
        // SAFETY: `A` and `F` are the same type.
        unsafe { core::slice::from_raw_parts(slice.as_ptr().cast::<F>(), slice.len()) }
    })
}

/// The op's inputs as host slices.
struct HostView<'a, F: Clone> {
    xp: Cow<'a, [F]>,
    state0: Cow<'a, [F]>,
    params: Cow<'a, [F]>,
    mask: Option<Cow<'a, [F]>>,
    dims: [usize; 3],
    reverse: bool,
}

impl<'a, F: HostFloat> HostView<'a, F> {
    fn read<B: HostTensors>(input: &'a RecurrenceInput<B>) -> Self {
        Self {
            xp: B::host_slice::<F, 3>(&input.xp),
            state0: B::host_slice::<F, 2>(&input.state0),
            params: B::host_slice::<F, 1>(&input.params),
            mask: input.mask.as_ref().map(|mask| B::host_slice::<F, 2>(mask)),
            dims: float::<B, 3>(input.xp.clone()).dims(),
            reverse: input.reverse,
        }
    }

    fn view(&self) -> HostInput<'_, F> {
        HostInput {
            xp: &self.xp,
            state0: &self.state0,
            params: &self.params,
            mask: self.mask.as_deref(),
            len: self.dims[0],
            batch: self.dims[1],
            reverse: self.reverse,
        }
    }
}

fn from_host<B: Backend, F: HostFloat, const D: usize>(
    values: Vec<F>,
    shape: [usize; D],
    device: &B::Device,
) -> FloatTensor<B> {
    primitive(Tensor::<B, D>::from_data(
        burn::tensor::TensorData::new(values, shape),
        device,
    ))
}

/// The recurrence on host memory for f32 and f64 tensors (the plain path for other types):
/// the full packed sequence and the op's output, both contiguous.
pub fn host_recurrence_forward<B: HostTensors, K: Recurrence>(
    kernel: &K,
    input: RecurrenceInput<B>,
) -> (FloatTensor<B>, FloatTensor<B>) {
    fn run<B: HostTensors, F: HostFloat, K: Recurrence>(
        kernel: &K,
        input: RecurrenceInput<B>,
    ) -> (FloatTensor<B>, FloatTensor<B>) {
        let device = B::float_device(&input.xp);
        let view = HostView::<F>::read(&input);
        let packed = host::forward(kernel, view.view());
        let [len, batch, _] = view.dims;
        let shown = kernel.output_width() + kernel.state_width();
        let width = shown + kernel.saved_width();
        let mut output = Vec::with_capacity(len * batch * shown);
        for row in packed.chunks(width.max(1)) {
            output.extend_from_slice(&row[..shown]);
        }
        (
            from_host::<B, F, 3>(packed, [len, batch, width], &device),
            from_host::<B, F, 3>(output, [len, batch, shown], &device),
        )
    }
    match float::<B, 3>(input.xp.clone()).dtype() {
        DType::F32 => run::<B, f32, K>(kernel, input),
        DType::F64 => run::<B, f64, K>(kernel, input),
        _ => {
            let packed = recurrence_forward::<B, K>(kernel, input);
            (packed.clone(), visible::<B, K>(kernel, packed))
        }
    }
}

/// The backward of [`host_recurrence_forward`].
pub fn host_recurrence_backward<B: HostTensors, K: Recurrence>(
    kernel: &K,
    input: RecurrenceInput<B>,
    packed: FloatTensor<B>,
    grad: FloatTensor<B>,
) -> RecurrenceGrads<B> {
    fn run<B: HostTensors, F: HostFloat, K: Recurrence>(
        kernel: &K,
        input: RecurrenceInput<B>,
        packed: FloatTensor<B>,
        grad: FloatTensor<B>,
    ) -> RecurrenceGrads<B> {
        let device = B::float_device(&input.xp);
        let view = HostView::<F>::read(&input);
        let packed = B::host_slice::<F, 3>(&packed);
        let grad = B::host_slice::<F, 3>(&grad);
        let grads = host::backward(kernel, view.view(), &packed, &grad);
        let [len, batch, width] = view.dims;
        let param_len = grads.params.len();
        RecurrenceGrads {
            xp: from_host::<B, F, 3>(grads.xp, [len, batch, width], &device),
            state0: from_host::<B, F, 2>(grads.state0, [batch, kernel.state_width()], &device),
            params: from_host::<B, F, 1>(grads.params, [param_len], &device),
        }
    }
    match float::<B, 3>(input.xp.clone()).dtype() {
        DType::F32 => run::<B, f32, K>(kernel, input, packed, grad),
        DType::F64 => run::<B, f64, K>(kernel, input, packed, grad),
        _ => recurrence_backward::<B, K>(kernel, input, packed, grad),
    }
}

// GPU backends run the plain-tensor path (a fused kernel is future work).
#[cfg(any(feature = "wgpu", feature = "cuda"))]
impl<R, F, I, BT> RnnBackend for burn_cubecl::CubeBackend<R, F, I, BT>
where
    burn_cubecl::CubeBackend<R, F, I, BT>: Backend,
    R: burn_cubecl::CubeRuntime,
    F: burn_cubecl::FloatElement,
    I: burn_cubecl::IntElement,
    BT: burn_cubecl::BoolElement,
{
}

#[cfg(any(feature = "wgpu", feature = "cuda"))]
impl<B: burn_fusion::FusionBackend> RnnBackend for burn_fusion::Fusion<B> {}

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

/// Each step's output, batch-major and contiguous (`[batch, T, O]`), from the recurrence
/// op's `[T, batch, O + S]` output: what the layer returns.
pub fn outputs_batch_major<B: RnnBackend>(
    visible: Tensor<B, 3>,
    output_width: usize,
) -> Tensor<B, 3> {
    float(B::rnn_outputs(primitive(visible), output_width))
}

/// Runs the recurrence op on high-level tensors along the chosen [`RecurrencePath`]: the
/// entry point the layer uses.
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

#[cfg(all(test, feature = "ndarray"))]
mod tests {
    use burn::tensor::{Distribution, TensorData};

    use super::*;
    use crate::cell::{cell_names, AnyCellConfig, Cell, CellConfig};
    use crate::check::{max_abs_diff, F64};

    fn random<const D: usize>(shape: [usize; D]) -> FloatTensor<F64> {
        primitive(Tensor::<F64, D>::random(
            shape,
            Distribution::Uniform(-1.0, 1.0),
            &Default::default(),
        ))
    }

    fn data<const D: usize>(tensor: FloatTensor<F64>) -> TensorData {
        float::<F64, D>(tensor).into_data()
    }

    /// The projection and the outputs op on host memory against their tensor-op defaults
    /// (what GPU backends run), with a strided (transposed) input as the layer passes it.
    #[test]
    fn host_linear_and_outputs_match_tensor_ops() {
        let x = primitive(float::<F64, 3>(random([4, 3, 5])).swap_dims(0, 1));
        let (weight, bias) = (random([6, 5]), random([6]));
        let grad = random([3, 4, 6]);
        let worst = [
            max_abs_diff(
                "linear",
                &data::<3>(linear::host_forward::<F64>(
                    x.clone(),
                    weight.clone(),
                    Some(bias.clone()),
                )),
                &data::<3>(linear::tensor_forward::<F64>(
                    x.clone(),
                    weight.clone(),
                    Some(bias),
                )),
            ),
            max_abs_diff(
                "linear input gradient",
                &data::<3>(linear::host_grad_input::<F64>(grad.clone(), weight.clone())),
                &data::<3>(linear::tensor_grad_input::<F64>(grad.clone(), weight)),
            ),
            {
                let (host_w, host_b) = linear::host_grad_params::<F64>(grad.clone(), x.clone());
                let (ops_w, ops_b) = linear::tensor_grad_params::<F64>(grad, x);
                max_abs_diff(
                    "linear weight gradient",
                    &data::<2>(host_w),
                    &data::<2>(ops_w),
                )
                .max(max_abs_diff(
                    "linear bias gradient",
                    &data::<1>(host_b),
                    &data::<1>(ops_b),
                ))
            },
        ];
        let visible = random([4, 3, 7]);
        let outputs = host_outputs::<F64>(visible.clone(), 2);
        let expected = float::<F64, 3>(visible).narrow(2, 0, 2).swap_dims(0, 1);
        let grad = random([3, 4, 2]);
        let back = host_outputs_backward::<F64>(grad.clone(), 7);
        let expected_back = Tensor::cat(
            vec![
                float::<F64, 3>(grad).swap_dims(0, 1),
                Tensor::zeros([4, 3, 5], &Default::default()),
            ],
            2,
        );
        let worst = worst
            .into_iter()
            .fold(0.0, f64::max)
            .max(max_abs_diff(
                "outputs",
                &data::<3>(outputs),
                &expected.into_data(),
            ))
            .max(max_abs_diff(
                "outputs backward",
                &data::<3>(back),
                &expected_back.into_data(),
            ));
        assert!(worst < 1e-12, "host and tensor ops differ by {worst:e}");
    }

    /// The host path (what burn-ndarray runs) against the plain-tensor default bodies (what
    /// the GPU backends run), forward and backward, for every cell, both directions, masked.
    #[test]
    fn host_path_matches_tensor_path() {
        let (len, batch) = (5, 3);
        let keep = [
            [1.0, 1.0, 1.0],
            [1.0, 1.0, 1.0],
            [1.0, 0.0, 1.0],
            [1.0, 0.0, 1.0],
        ];
        let mut mask: Vec<f64> = keep.iter().flatten().copied().collect();
        mask.extend([1.0, 0.0, 0.0]);
        for name in cell_names() {
            let config = AnyCellConfig::named(name, 3, 4).unwrap();
            let kernel = config.init_cell::<F64>(&Default::default()).kernel();
            let param_len: usize = kernel.param_shapes().iter().map(|[r, c]| r * c).sum();
            for reverse in [false, true] {
                let input = RecurrenceInput::<F64> {
                    xp: random([len, batch, kernel.input_width()]),
                    state0: random([batch, kernel.state_width()]),
                    params: random([param_len]),
                    mask: Some(primitive(Tensor::<F64, 2>::from_data(
                        TensorData::new(mask.clone(), [len, batch]),
                        &Default::default(),
                    ))),
                    reverse,
                };
                let tensor_out = recurrence_forward::<F64, _>(&kernel, input.clone());
                let host_out = host_recurrence_forward::<F64, _>(&kernel, input.clone()).0;
                let forward = max_abs_diff(
                    name,
                    &data::<3>(host_out.clone()),
                    &data::<3>(tensor_out.clone()),
                );
                let grad = random([len, batch, kernel.output_width() + kernel.state_width()]);
                let tensor =
                    recurrence_backward::<F64, _>(&kernel, input.clone(), tensor_out, grad.clone());
                let host = host_recurrence_backward::<F64, _>(&kernel, input, host_out, grad);
                let backward = [
                    max_abs_diff(name, &data::<3>(host.xp), &data::<3>(tensor.xp)),
                    max_abs_diff(name, &data::<2>(host.state0), &data::<2>(tensor.state0)),
                    max_abs_diff(name, &data::<1>(host.params), &data::<1>(tensor.params)),
                ];
                let worst = backward.into_iter().fold(forward, f64::max);
                assert!(worst < 1e-12, "{name} (reverse {reverse}): {worst:e}");
            }
        }
    }
}
