//! The CPU path of the ops: burn-ndarray lends its buffers to [`crate::host`], which runs the
//! recurrence, the projection and the output layout on host memory with the `gemm` crate and
//! vectorised loops. Tensors of other float types, and other backends, take the tensor-op
//! defaults of [`RnnBackend`].

use std::borrow::Cow;

use burn::tensor::{backend::Backend, ops::FloatTensor, DType, Tensor};

use super::*;
use crate::host::{self, HostFloat, HostInput, MatMut, MatRef};

/// Runs `$run` with the type `$f` standing for the element type of `$tensor` when it is f32
/// or f64 (the host path), `$fallback` (the tensor-op default) for any other type.
macro_rules! by_float_type {
    ($tensor:expr, $f:ident => $run:expr, other => $fallback:expr) => {
        match float::<B, 1>(($tensor).clone()).dtype() {
            DType::F32 => {
                type $f = f32;
                $run
            }
            DType::F64 => {
                type $f = f64;
                $run
            }
            _ => $fallback,
        }
    };
}

// burn-ndarray runs the recurrence on host memory (`crate::host`). The bounds repeat
// burn-ndarray's own: Rust needs a struct's bounds spelled out on every impl.
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

    fn rnn_projects_in_step(x: &FloatTensor<Self>) -> bool {
        host_projects_in_step::<Self>(x)
    }

    fn rnn_projected_split<K: Recurrence>(
        kernel: &K,
        input: ProjectedInput<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        host_projected_forward::<Self, K>(kernel, input)
    }

    fn rnn_projected_backward<K: Recurrence>(
        kernel: &K,
        input: ProjectedInput<Self>,
        packed: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        grad_x: bool,
    ) -> ProjectedGrads<Self> {
        host_projected_backward::<Self, K>(kernel, input, packed, grad, grad_x)
    }

    fn rnn_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        passthrough: Option<Passthrough>,
    ) -> FloatTensor<Self> {
        host_linear::<Self>(x, weight, bias, passthrough)
    }

    fn rnn_linear_grad_input(
        grad: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        passthrough: Option<Passthrough>,
    ) -> FloatTensor<Self> {
        host_linear_grad_input::<Self>(grad, weight, passthrough)
    }

    fn rnn_linear_grad_params(
        grad: FloatTensor<Self>,
        x: FloatTensor<Self>,
        passthrough: Option<Passthrough>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        host_linear_grad_params::<Self>(grad, x, passthrough)
    }

    fn rnn_linear_grads(
        grad: FloatTensor<Self>,
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        passthrough: Option<Passthrough>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        host_linear_grads::<Self>(grad, x, weight, passthrough)
    }

    fn rnn_outputs(visible: FloatTensor<Self>, output_width: usize) -> FloatTensor<Self> {
        host_outputs::<Self>(visible, output_width)
    }

    fn rnn_outputs_backward(grad: FloatTensor<Self>, width: usize) -> FloatTensor<Self> {
        host_outputs_backward::<Self>(grad, width)
    }

    fn rnn_takes_output_grads(grad: &FloatTensor<Self>) -> bool {
        host_takes_output_grads::<Self>(grad)
    }

    fn rnn_takes_head_grads(visible: &FloatTensor<Self>) -> bool {
        host_takes_output_grads::<Self>(visible)
    }

    fn rnn_recurrence_backward_with_head<K: Recurrence>(
        kernel: &K,
        input: RecurrenceInput<Self>,
        packed: FloatTensor<Self>,
        grad: Option<FloatTensor<Self>>,
        head: HeadGrad<Self>,
    ) -> (RecurrenceGrads<Self>, Option<FloatTensor<Self>>) {
        host_recurrence_backward_with_head::<Self, K>(kernel, input, packed, grad, head)
    }

    fn rnn_projected_backward_with_head<K: Recurrence>(
        kernel: &K,
        input: ProjectedInput<Self>,
        packed: FloatTensor<Self>,
        grad: Option<FloatTensor<Self>>,
        head: HeadGrad<Self>,
        grad_x: bool,
    ) -> (ProjectedGrads<Self>, Option<FloatTensor<Self>>) {
        host_projected_backward_with_head::<Self, K>(kernel, input, packed, grad, head, grad_x)
    }
}

/// Rows (batch rows or steps) per chunk of the layout changes between the recurrence's
/// `[T, batch, ·]` and the layer's `[batch, T, ·]`.
const GROUP: usize = 8;

/// [`RnnBackend::rnn_outputs`] on host memory: a view of the op's output, its first two axes
/// swapped and its output columns, when it is batch-major (no copy: a consumer reads the rows
/// one stride apart); else one row copy per step and sequence, read where the recurrence wrote
/// it.
pub fn host_outputs<B: HostTensors>(
    visible: FloatTensor<B>,
    output_width: usize,
) -> FloatTensor<B> {
    fn run<B: HostTensors, F: HostFloat>(visible: FloatTensor<B>, out_w: usize) -> FloatTensor<B> {
        let [len, batch, _] = dims3::<B>(&visible);
        let (values, strides) = host_sequence::<B, F>(&visible);
        // Sequences one after another, each row's outputs first: a view of their first
        // columns, rows one stride apart.
        if strides.row == len * strides.step {
            drop(values);
            let sequences = B::float_swap_dims(visible, 0, 1);
            return B::leading_columns::<3>(sequences, out_w);
        }
        // A few batch rows' outputs per chunk, chunks in parallel; step by step inside a
        // chunk, so that the reads of a step are neighbouring rows (one far jump per step for
        // the whole group instead of one per row).
        // SAFETY: every row of `out_w` values of every chunk is copied into.
        let outputs = unsafe {
            host::written_by_chunks(batch * len * out_w, GROUP * len * out_w, |i, chunk| {
                let group = chunk.len() / (len * out_w);
                for t in 0..len {
                    for g in 0..group {
                        let out = &mut chunk[(g * len + t) * out_w..][..out_w];
                        let at = t * strides.step + (i * GROUP + g) * strides.row;
                        host::copy_uninit(out, &values[at..at + out_w]);
                    }
                }
            })
        };
        from_host::<B, F, 3>(outputs, [batch, len, out_w], &B::float_device(&visible))
    }
    by_float_type!(&visible,
        F => run::<B, F>(visible, output_width),
        other => outputs::tensor_forward::<B>(visible, output_width))
}

/// [`RnnBackend::rnn_outputs_backward`] on host memory: the gradient itself, its first two axes
/// swapped, when the op's output has no state columns beside the outputs (a view, no copy: the
/// host backward reads its rows where they lie); else a batch-major copy with zero state
/// columns, written by streaming stores when large.
pub fn host_outputs_backward<B: HostTensors>(grad: FloatTensor<B>, width: usize) -> FloatTensor<B> {
    fn run<B: HostTensors, F: HostFloat>(grad: FloatTensor<B>, width: usize) -> FloatTensor<B> {
        let [batch, len, out_w] = dims3::<B>(&grad);
        if out_w == width {
            return B::float_swap_dims(grad, 0, 1);
        }
        let values = B::host_slice::<F, 3>(&grad);
        // Batch-major, row for row (the host backward reads it where it lies), sequences in
        // parallel. The state columns stay zero.
        // SAFETY: every row of `width` values of every chunk is copied into and zero-filled.
        let stream = host::streams(batch * len * width * std::mem::size_of::<F>());
        let full = unsafe {
            host::written_by_chunks(batch * len * width, len * width, |b, sequence| {
                let rows = values[b * len * out_w..(b + 1) * len * out_w].chunks_exact(out_w);
                let zeros = vec![F::zero(); width - out_w];
                for (row, values) in sequence.chunks_exact_mut(width).zip(rows) {
                    let (shown, state) = row.split_at_mut(out_w);
                    host::write_uninit(shown, values, stream);
                    host::write_uninit(state, &zeros, stream);
                }
                host::streamed();
            })
        };
        let full = from_host::<B, F, 3>(full, [batch, len, width], &B::float_device(&grad));
        B::float_swap_dims(full, 0, 1)
    }
    by_float_type!(&grad,
        F => run::<B, F>(grad, width),
        other => outputs::tensor_backward::<B>(grad, width))
}

/// [`RnnBackend::rnn_takes_output_grads`] on host memory: for the float types whose recurrence
/// backward runs here (it reads the state's gradient as zeros where the rows stop at the
/// outputs, see [`host::OutputGrad`]).
pub fn host_takes_output_grads<B: Backend>(grad: &FloatTensor<B>) -> bool {
    matches!(float::<B, 3>(grad.clone()).dtype(), DType::F32 | DType::F64)
}

/// How a backend lends its tensors to the host path: by default a copy through `into_data`;
/// burn-ndarray lends its buffers without copying.
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

    /// `tensor` as the rows of its last axis, read where they lie when the backend can.
    fn host_rows<F: HostFloat, const D: usize>(tensor: &FloatTensor<Self>) -> HostRows<'_, F> {
        HostRows::copied::<Self, D>(tensor)
    }

    /// A 3-D `tensor` read where it lies: its elements from the first and the strides of its
    /// axes, when its last axis is contiguous; `None` (the default) when the backend cannot.
    fn host_strided<F: HostFloat>(tensor: &FloatTensor<Self>) -> Option<(&[F], [usize; 3])> {
        let _ = tensor;
        None
    }

    /// The first `cols` entries of the last axis of `tensor` (a copy by default; burn-ndarray
    /// returns a view of the same buffer).
    fn leading_columns<const D: usize>(
        tensor: FloatTensor<Self>,
        cols: usize,
    ) -> FloatTensor<Self> {
        primitive(float::<Self, D>(tensor).narrow(D - 1, 0, cols))
    }
}

/// A tensor read as the rows of its last axis: `rows` rows of `cols` values, each row
/// `row_stride` after the one before (a narrowed view of a wider tensor reads in place).
pub struct HostRows<'a, F: Clone> {
    values: Cow<'a, [F]>,
    rows: usize,
    cols: usize,
    row_stride: usize,
}

impl<'a, F: HostFloat> HostRows<'a, F> {
    /// The rows of `tensor` through [`HostTensors::host_slice`].
    fn copied<B: HostTensors, const D: usize>(tensor: &'a FloatTensor<B>) -> Self {
        let cols = float::<B, D>(tensor.clone()).dims()[D - 1];
        let values = B::host_slice::<F, D>(tensor);
        Self {
            rows: values.len().checked_div(cols).unwrap_or(0),
            values,
            cols,
            row_stride: cols,
        }
    }

    /// The rows as a matrix view.
    pub fn mat(&self) -> MatRef<'_, F> {
        MatRef::strided(&self.values, self.rows, self.cols, self.row_stride)
    }
}

/// An ndarray view in place: the elements from its first to its last, and the strides of its
/// axes, when no stride is negative and the last axis is contiguous; `None` otherwise, and for
/// an empty view.
fn view_in_place<'a, E: 'static, F: HostFloat>(
    view: &ndarray::ArrayViewD<'a, E>,
) -> Option<(&'a [F], Vec<usize>)> {
    let shape = view.shape();
    let strides = view
        .strides()
        .iter()
        .map(|&stride| usize::try_from(stride).ok())
        .collect::<Option<Vec<_>>>()?;
    let last = shape.len().checked_sub(1)?;
    if shape.contains(&0) || (shape[last] > 1 && strides[last] != 1) {
        return None;
    }
    let extent = 1 + shape
        .iter()
        .zip(&strides)
        .map(|(&n, &s)| (n - 1) * s)
        .sum::<usize>();
    // SAFETY: the view's first element is at `as_ptr()` and its last `extent - 1` elements
    // further on; with non-negative strides everything between lies in the same initialised
    // buffer (the gaps are elements of the array the view was cut from), borrowed for `'a`.
    let all = unsafe { core::slice::from_raw_parts(view.as_ptr(), extent) };
    Some((same_type(all)?, strides))
}

/// The rows of an ndarray view's last axis in place, when they are contiguous and one stride
/// apart (a slice of the last axis, or a contiguous array); `None` otherwise.
fn rows_in_place<'a, E: 'static, F: HostFloat>(
    view: ndarray::ArrayViewD<'a, E>,
) -> Option<HostRows<'a, F>> {
    let (values, strides) = view_in_place(&view)?;
    let (&cols, outer) = view.shape().split_last()?;
    // Walking the leading axes from the innermost out must step through rows at one stride.
    let (mut row_stride, mut next) = (None, None);
    for (axis, &n) in outer.iter().enumerate().rev().filter(|&(_, &n)| n > 1) {
        let stride = strides[axis];
        if next.is_some_and(|expected| expected != stride) {
            return None;
        }
        row_stride.get_or_insert(stride);
        next = Some(stride * n);
    }
    let row_stride = row_stride.unwrap_or(cols);
    if row_stride < cols {
        return None;
    }
    Some(HostRows {
        values: Cow::Borrowed(values),
        rows: outer.iter().product(),
        cols,
        row_stride,
    })
}

/// A 3-D ndarray view in place, as [`HostTensors::host_strided`] gives it.
fn strided_in_place<'a, E: 'static, F: HostFloat>(
    view: ndarray::ArrayViewD<'a, E>,
) -> Option<(&'a [F], [usize; 3])> {
    let (values, strides) = view_in_place(&view)?;
    Some((values, strides.try_into().ok()?))
}

/// The elements of an ndarray view in row-major order, each lane along the last axis one
/// memcpy when contiguous (burn's own copy goes element by element).
fn lanes_to_vec<E: Copy>(view: ndarray::ArrayViewD<'_, E>) -> Vec<E> {
    let mut values = Vec::with_capacity(view.len());
    for lane in view.rows() {
        match lane.as_slice() {
            Some(run) => values.extend_from_slice(run),
            None => values.extend(lane.iter().copied()),
        }
    }
    values
}

/// `array` narrowed to the first `cols` entries of its last axis, sharing its buffer.
fn narrow_last<E>(
    mut array: ndarray::ArcArray<E, ndarray::IxDyn>,
    cols: usize,
) -> ndarray::ArcArray<E, ndarray::IxDyn> {
    let last = ndarray::Axis(array.ndim() - 1);
    array.slice_axis_inplace(last, ndarray::Slice::from(..cols));
    array
}

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
        // A strided view (a transpose, a slice): copy it lane by lane.
        let copied: Option<Vec<F>> = match tensor {
            NdArrayTensor::F32(storage) => same_type_vec(lanes_to_vec(storage.view())),
            NdArrayTensor::F64(storage) => same_type_vec(lanes_to_vec(storage.view())),
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

    fn host_rows<F: HostFloat, const D: usize>(tensor: &FloatTensor<Self>) -> HostRows<'_, F> {
        use burn::backend::ndarray::NdArrayTensor;
        let in_place = match tensor {
            NdArrayTensor::F32(storage) => rows_in_place(storage.view()),
            NdArrayTensor::F64(storage) => rows_in_place(storage.view()),
            _ => None,
        };
        in_place.unwrap_or_else(|| HostRows::copied::<Self, D>(tensor))
    }

    fn host_strided<F: HostFloat>(tensor: &FloatTensor<Self>) -> Option<(&[F], [usize; 3])> {
        use burn::backend::ndarray::NdArrayTensor;
        match tensor {
            NdArrayTensor::F32(storage) => strided_in_place(storage.view()),
            NdArrayTensor::F64(storage) => strided_in_place(storage.view()),
            _ => None,
        }
    }

    fn leading_columns<const D: usize>(
        tensor: FloatTensor<Self>,
        cols: usize,
    ) -> FloatTensor<Self> {
        use burn::backend::ndarray::NdArrayTensor;
        match tensor {
            NdArrayTensor::F32(storage) => narrow_last(storage.into_shared(), cols).into(),
            NdArrayTensor::F64(storage) => narrow_last(storage.into_shared(), cols).into(),
            other => primitive(float::<Self, D>(other).narrow(D - 1, 0, cols)),
        }
    }
}

/// `values` as `Vec<F>` when its element type is `F`.
fn same_type_vec<A: 'static, F: 'static>(values: Vec<A>) -> Option<Vec<F>> {
    let boxed: Box<dyn core::any::Any> = Box::new(values);
    boxed.downcast::<Vec<F>>().ok().map(|values| *values)
}

/// `slice` as `&[F]` when its element type is `F`.
fn same_type<A: 'static, F: 'static>(slice: &[A]) -> Option<&[F]> {
    (core::any::TypeId::of::<A>() == core::any::TypeId::of::<F>()).then(|| {
        // SAFETY: `A` and `F` are the same type.
        unsafe { core::slice::from_raw_parts(slice.as_ptr().cast::<F>(), slice.len()) }
    })
}

/// The op's inputs as host slices.
struct HostView<'a, F: Clone> {
    xp: Cow<'a, [F]>,
    projection: Option<ProjectionView<'a, F>>,
    state0: Cow<'a, [F]>,
    params: Cow<'a, [F]>,
    mask: Option<Cow<'a, [F]>>,
    /// `[T, batch, input_width]` of the projected input.
    dims: [usize; 3],
    reverse: bool,
}

/// The projected recurrence's input and projection as host slices.
struct ProjectionView<'a, F: Clone> {
    /// `[T, batch, width]`, rows contiguous, steps and batch rows `x_strides` apart.
    x: Cow<'a, [F]>,
    x_strides: [usize; 2],
    width: usize,
    /// `Wᵀ` `[width, projected_width]`, with `b` as one more row (see [`host::Projection`]).
    weights: Vec<F>,
    /// The projection's columns of the kernel's input (the noise's follow).
    projected_width: usize,
    grad_x: bool,
    /// Recurrent noise: a per-sequence `[batch, ·]` multiplier, per-step `[T, batch, ·]` rows.
    keep: Option<(Cow<'a, [F]>, usize)>,
    zone: Option<HostSequence<'a, F>>,
}

impl<'a, F: HostFloat> HostView<'a, F> {
    fn read<B: HostTensors>(input: &'a RecurrenceInput<B>) -> Self {
        Self {
            xp: B::host_slice::<F, 3>(&input.xp),
            projection: None,
            state0: B::host_slice::<F, 2>(&input.state0),
            params: B::host_slice::<F, 1>(&input.params),
            mask: input.mask.as_ref().map(|mask| B::host_slice::<F, 2>(mask)),
            dims: dims3::<B>(&input.xp),
            reverse: input.reverse,
        }
    }

    fn read_projected<B: HostTensors>(input: &'a ProjectedInput<B>, grad_x: bool) -> Self {
        let ([len, batch, width], [out, _]) = (dims3::<B>(&input.x), dims::<B>(&input.weight));
        let weight = B::host_slice::<F, 2>(&input.weight);
        let bias = input.bias.as_ref().map(|bias| B::host_slice::<F, 1>(bias));
        let (bias, passthrough) = (bias.as_deref(), input.passthrough);
        let weights = projection_weights(&weight, [out, width], bias, passthrough);
        let projected_width = out + passthrough.map_or(0, |p| p.width);
        let noise = input.noise.as_ref();
        let keep = noise.and_then(|noise| noise.keep.as_ref()).map(|keep| {
            let [_, width] = dims::<B>(keep);
            (B::host_slice::<F, 2>(keep), width)
        });
        let zone = noise
            .and_then(|noise| noise.zone.as_ref())
            .map(|zone| HostSequence::read::<B>(zone));
        let noise_width = keep.as_ref().map_or(0, |k| k.1) + zone.as_ref().map_or(0, |z| z.width);
        // The layer's input is a transposed view: read in place, not copied to time-major.
        let (x, x_strides) = match B::host_strided::<F>(&input.x) {
            Some((x, [step, row, _])) => (Cow::Borrowed(x), [step, row]),
            None => (B::host_slice::<F, 3>(&input.x), [batch * width, width]),
        };
        Self {
            xp: Cow::Borrowed(&[]),
            projection: Some(ProjectionView {
                x,
                x_strides,
                width,
                weights,
                projected_width,
                grad_x,
                keep,
                zone,
            }),
            state0: B::host_slice::<F, 2>(&input.state0),
            params: B::host_slice::<F, 1>(&input.params),
            mask: input.mask.as_ref().map(|mask| B::host_slice::<F, 2>(mask)),
            dims: [len, batch, projected_width + noise_width],
            reverse: input.reverse,
        }
    }

    fn view(&self) -> HostInput<'_, F> {
        let batch = self.dims[1];
        HostInput {
            xp: &self.xp,
            projection: self.projection.as_ref().map(|p| {
                let columns = p.projected_width;
                host::Projection {
                    x: &p.x,
                    x_strides: p.x_strides,
                    width: p.width,
                    weights: MatRef::new(&p.weights, p.weights.len() / columns, columns),
                    grad_x: p.grad_x,
                    keep: p
                        .keep
                        .as_ref()
                        .map(|(keep, cols)| MatRef::new(keep, batch, *cols)),
                    zone: p.zone.as_ref().map(HostSequence::rows),
                }
            }),
            state0: &self.state0,
            params: &self.params,
            mask: self.mask.as_deref(),
            len: self.dims[0],
            batch: self.dims[1],
            reverse: self.reverse,
        }
    }

    /// The backward on host memory, from the full packed sequence and the gradient of the op's
    /// output: a tensor (whole, or of the outputs alone), a head's in factors, or both (see
    /// [`host::OutputGrad`]).
    fn backward<B: HostTensors, K: Recurrence>(
        &self,
        kernel: &K,
        packed: &FloatTensor<B>,
        grad: Option<&FloatTensor<B>>,
        head: Option<&HeadGrad<B>>,
    ) -> host::HostGrads<F> {
        let packed = B::host_slice::<F, 3>(packed);
        let rows = grad.map(HostSequence::<F>::read::<B>);
        // The head's gradient and input, time-major views of their batch-major tensors.
        let time_major = |tensor: &FloatTensor<B>| B::float_swap_dims(tensor.clone(), 0, 1);
        let head_tensors = head.map(|head| (time_major(&head.grad), time_major(&head.input)));
        let head_rows = head
            .zip(head_tensors.as_ref())
            .map(|(head, (grad, input))| {
                let weight = B::host_slice::<F, 2>(&head.weight);
                let (grad, input) = (
                    HostSequence::read::<B>(grad),
                    HostSequence::read::<B>(input),
                );
                (grad, weight, input, head.weight_grad)
            });
        let grad = host::OutputGrad {
            rows: rows.as_ref().map(HostSequence::rows),
            head: head_rows
                .as_ref()
                .map(|(grad, weight, input, weight_grad)| host::HeadGrad {
                    grad: grad.rows(),
                    weight: MatRef::new(weight, grad.width, input.width),
                    input: input.rows(),
                    weight_grad: *weight_grad,
                }),
        };
        host::backward(kernel, self.view(), &packed, grad)
    }

    /// The forward on host memory: the full packed sequence and the op's output (a view of it).
    fn forward<B: HostTensors, K: Recurrence>(
        &self,
        kernel: &K,
        device: &B::Device,
    ) -> (FloatTensor<B>, FloatTensor<B>) {
        let [len, batch, _] = self.dims;
        let shown = host::visible_width(kernel, self.mask.is_some());
        let width = shown + kernel.host_saved_width();
        let view = self.view();
        let batch_major = host::packs_batch_major(kernel, &view);
        let packed = host::forward(kernel, view);
        let shape = match batch_major {
            true => [batch, len, width],
            false => [len, batch, width],
        };
        let packed = from_host::<B, F, 3>(packed, shape, device);
        // The op's output is the packed sequence less its saved columns: a view, not a copy
        // (of a batch-major sequence, with its first two axes swapped).
        let output = B::leading_columns::<3>(packed.clone(), shown);
        match batch_major {
            true => (packed, B::float_swap_dims(output, 0, 1)),
            false => (packed, output),
        }
    }
}

/// A `[T, batch, width]` tensor's rows on host memory ([`host_sequence`]).
struct HostSequence<'a, F: Clone> {
    values: Cow<'a, [F]>,
    strides: host::RowStrides,
    width: usize,
}

impl<'a, F: HostFloat> HostSequence<'a, F> {
    fn read<B: HostTensors>(tensor: &'a FloatTensor<B>) -> Self {
        let (values, strides) = host_sequence::<B, F>(tensor);
        let width = dims3::<B>(tensor)[2];
        Self {
            values,
            strides,
            width,
        }
    }

    fn rows(&self) -> host::SequenceRows<'_, F> {
        host::SequenceRows {
            values: &self.values,
            strides: self.strides,
            width: self.width,
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
        HostView::<F>::read(&input).forward::<B, K>(kernel, &device)
    }
    by_float_type!(&input.xp,
    F => run::<B, F, K>(kernel, input),
    other => {
        let packed = recurrence_forward::<B, K>(kernel, input);
        (packed.clone(), visible::<B, K>(kernel, packed))
    })
}

/// The backward of [`host_recurrence_forward`].
pub fn host_recurrence_backward<B: HostTensors + RnnBackend, K: Recurrence>(
    kernel: &K,
    input: RecurrenceInput<B>,
    packed: FloatTensor<B>,
    grad: FloatTensor<B>,
) -> RecurrenceGrads<B> {
    by_float_type!(&input.xp,
        F => host_recurrence_grads::<B, F, K>(kernel, input, packed, Some(grad), None).0,
        other => recurrence_backward::<B, K>(kernel, input, packed, grad))
}

/// [`RnnBackend::rnn_recurrence_backward_with_head`] on host memory: the head's share added
/// step by step in the walk.
pub fn host_recurrence_backward_with_head<B: HostTensors + RnnBackend, K: Recurrence>(
    kernel: &K,
    input: RecurrenceInput<B>,
    packed: FloatTensor<B>,
    grad: Option<FloatTensor<B>>,
    head: HeadGrad<B>,
) -> (RecurrenceGrads<B>, Option<FloatTensor<B>>) {
    by_float_type!(&input.xp,
    F => host_recurrence_grads::<B, F, K>(kernel, input, packed, grad, Some(head)),
    other => {
        let (grad, weight) = head.materialised(grad);
        (recurrence_backward::<B, K>(kernel, input, packed, grad), weight)
    })
}

/// The recurrence's gradients on host memory, and a head's weight gradient where there is a
/// head.
fn host_recurrence_grads<B: HostTensors, F: HostFloat, K: Recurrence>(
    kernel: &K,
    input: RecurrenceInput<B>,
    packed: FloatTensor<B>,
    grad: Option<FloatTensor<B>>,
    head: Option<HeadGrad<B>>,
) -> (RecurrenceGrads<B>, Option<FloatTensor<B>>) {
    let device = B::float_device(&input.xp);
    let view = HostView::<F>::read(&input);
    let grads = view.backward::<B, K>(kernel, &packed, grad.as_ref(), head.as_ref());
    let [len, batch, width] = view.dims;
    let param_len = grads.params.len();
    let recurrence = RecurrenceGrads {
        xp: from_host::<B, F, 3>(grads.xp, [len, batch, width], &device),
        state0: from_host::<B, F, 2>(grads.state0, [batch, kernel.state_width()], &device),
        params: from_host::<B, F, 1>(grads.params, [param_len], &device),
    };
    (
        recurrence,
        head_weight::<B, F>(grads.head_weight, head, &device),
    )
}

/// The head's weight gradient as a tensor of the head weight's shape, where the walk summed it.
fn head_weight<B: HostTensors, F: HostFloat>(
    values: Option<Vec<F>>,
    head: Option<HeadGrad<B>>,
    device: &B::Device,
) -> Option<FloatTensor<B>> {
    let shape = dims::<B>(&head?.weight);
    Some(from_host::<B, F, 2>(values?, shape, device))
}

/// The widest layer input whose projection the CPU recurrence computes step by step: up to
/// here a step's projection costs less than storing the projected input and reading it back
/// twice; wider inputs are projected first by one large GEMM.
pub const MAX_PROJECTED_IN_STEP: usize = 32;

/// The step projection's `[Wᵀ | b]` ([`host::Projection::weights`]) from `W` `[out, width]`,
/// with a passthrough's scaled identity as more columns: the walk's GEMM then writes those
/// columns too, and its weight gradient gets rows for them (dropped) while the gradient of `x`
/// gets their share.
fn projection_weights<F: HostFloat>(
    weight: &[F],
    [out, width]: [usize; 2],
    bias: Option<&[F]>,
    passthrough: Option<Passthrough>,
) -> Vec<F> {
    let extra = passthrough.map_or(0, |p| p.width);
    let columns = out + extra;
    let mut weights = vec![F::zero(); (width + usize::from(bias.is_some())) * columns];
    // Wᵀ's rows, each widened by the passthrough's columns.
    let weight_t = host::transpose(MatRef::new(weight, out, width));
    for (row, source) in weights
        .chunks_exact_mut(columns)
        .zip(weight_t.chunks_exact(out))
    {
        row[..out].copy_from_slice(source);
    }
    if let Some(p) = passthrough {
        let scale = host_scale::<F>(p);
        for j in 0..p.width {
            weights[(p.start + j) * columns + out + j] = scale;
        }
    }
    if let Some(bias) = bias {
        weights[width * columns..width * columns + out].copy_from_slice(bias);
    }
    weights
}

/// [`RnnBackend::rnn_projects_in_step`] on host memory: f32 and f64 inputs of at most
/// [`MAX_PROJECTED_IN_STEP`] features.
pub fn host_projects_in_step<B: Backend>(x: &FloatTensor<B>) -> bool {
    let x = float::<B, 3>(x.clone());
    matches!(x.dtype(), DType::F32 | DType::F64) && x.dims()[2] <= MAX_PROJECTED_IN_STEP
}

/// The projected recurrence on host memory: each step's projection computed inside the walk.
pub fn host_projected_forward<B: HostTensors + RnnBackend, K: Recurrence>(
    kernel: &K,
    input: ProjectedInput<B>,
) -> (FloatTensor<B>, FloatTensor<B>) {
    fn run<B: HostTensors + RnnBackend, F: HostFloat, K: Recurrence>(
        kernel: &K,
        input: ProjectedInput<B>,
    ) -> (FloatTensor<B>, FloatTensor<B>) {
        let device = B::float_device(&input.x);
        HostView::<F>::read_projected(&input, false).forward::<B, K>(kernel, &device)
    }
    by_float_type!(&input.x,
        F => run::<B, F, K>(kernel, input),
        other => B::rnn_recurrence_split(kernel, input.projected()))
}

/// The backward of [`host_projected_forward`].
pub fn host_projected_backward<B: HostTensors + RnnBackend, K: Recurrence>(
    kernel: &K,
    input: ProjectedInput<B>,
    packed: FloatTensor<B>,
    grad: FloatTensor<B>,
    grad_x: bool,
) -> ProjectedGrads<B> {
    by_float_type!(&input.x,
        F => host_projected_grads::<B, F, K>(kernel, input, packed, Some(grad), None, grad_x).0,
        other => projected_backward_in_parts::<B, K>(kernel, input, packed, grad, grad_x))
}

/// [`RnnBackend::rnn_projected_backward_with_head`] on host memory: the head's share added
/// step by step in the walk.
pub fn host_projected_backward_with_head<B: HostTensors + RnnBackend, K: Recurrence>(
    kernel: &K,
    input: ProjectedInput<B>,
    packed: FloatTensor<B>,
    grad: Option<FloatTensor<B>>,
    head: HeadGrad<B>,
    grad_x: bool,
) -> (ProjectedGrads<B>, Option<FloatTensor<B>>) {
    by_float_type!(&input.x,
    F => host_projected_grads::<B, F, K>(kernel, input, packed, grad, Some(head), grad_x),
    other => {
        let (grad, weight) = head.materialised(grad);
        let grads = projected_backward_in_parts::<B, K>(kernel, input, packed, grad, grad_x);
        (grads, weight)
    })
}

/// The projected recurrence's gradients on host memory, and a head's weight gradient where
/// there is a head.
fn host_projected_grads<B: HostTensors + RnnBackend, F: HostFloat, K: Recurrence>(
    kernel: &K,
    input: ProjectedInput<B>,
    packed: FloatTensor<B>,
    grad: Option<FloatTensor<B>>,
    head: Option<HeadGrad<B>>,
    grad_x: bool,
) -> (ProjectedGrads<B>, Option<FloatTensor<B>>) {
    let device = B::float_device(&input.x);
    let view = HostView::<F>::read_projected(&input, grad_x);
    let grads = view.backward::<B, K>(kernel, &packed, grad.as_ref(), head.as_ref());
    let ([len, batch, width], [input_width, _]) = (dims3::<B>(&input.x), dims::<B>(&input.weight));
    let (mut weight, mut bias) = grads.projection.expect("a projected backward");
    // The passed-through columns' rows of the gradients belong to no parameter.
    weight.truncate(input_width * width);
    bias.truncate(input_width);
    let param_len = grads.params.len();
    let projected = ProjectedGrads {
        x: grad_x.then(|| from_host::<B, F, 3>(grads.xp, [len, batch, width], &device)),
        weight: from_host::<B, F, 2>(weight, [input_width, width], &device),
        bias: input
            .bias
            .is_some()
            .then(|| from_host::<B, F, 1>(bias, [input_width], &device)),
        state0: from_host::<B, F, 2>(grads.state0, [batch, kernel.state_width()], &device),
        params: from_host::<B, F, 1>(grads.params, [param_len], &device),
    };
    (
        projected,
        head_weight::<B, F>(grads.head_weight, head, &device),
    )
}

/// The rows of a `[T, batch, width]` tensor where they lie (burn-ndarray: in place, whether
/// time- or batch-major), or else a time-major copy.
fn host_sequence<B: HostTensors, F: HostFloat>(
    tensor: &FloatTensor<B>,
) -> (Cow<'_, [F]>, host::RowStrides) {
    if let Some((values, [step, row, 1])) = B::host_strided::<F>(tensor) {
        return (Cow::Borrowed(values), host::RowStrides { step, row });
    }
    let [_, batch, width] = dims3::<B>(tensor);
    let values = B::host_slice::<F, 3>(tensor);
    (values, host::RowStrides::time_major(batch, width))
}

fn dims3<B: Backend>(tensor: &FloatTensor<B>) -> [usize; 3] {
    float::<B, 3>(tensor.clone()).dims()
}

fn dims<B: Backend>(tensor: &FloatTensor<B>) -> [usize; 2] {
    float::<B, 2>(tensor.clone()).dims()
}

/// `x · Wᵀ + b` through the GEMM on host memory, then the passed-through columns.
pub fn host_linear<B: HostTensors>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    bias: Option<FloatTensor<B>>,
    passthrough: Option<Passthrough>,
) -> FloatTensor<B> {
    fn run<B: HostTensors, F: HostFloat>(
        x: FloatTensor<B>,
        weight: FloatTensor<B>,
        bias: Option<FloatTensor<B>>,
        passthrough: Option<Passthrough>,
    ) -> FloatTensor<B> {
        let ([len, batch, _], [out, inner]) = (dims3::<B>(&x), dims::<B>(&weight));
        let (rows, full) = (len * batch, out + passthrough.map_or(0, |p| p.width));
        let (xs, ws) = (B::host_rows::<F, 3>(&x), B::host_slice::<F, 2>(&weight));
        let (xs, ws) = (xs.mat(), MatRef::new(&ws, out, inner).t());
        let bias = bias.map(|bias| B::host_slice::<F, 1>(&bias).into_owned());
        if passthrough.is_none() && out <= host::FEW_OUTPUTS {
            let y = host::product_by_rows(xs, ws, bias.as_deref());
            return from_host::<B, F, 3>(y, [len, batch, out], &B::float_device(&x));
        }
        if bias.is_none() && passthrough.is_none() {
            let y = host::product(xs, ws);
            return from_host::<B, F, 3>(y, [len, batch, out], &B::float_device(&x));
        }
        // Each row: the bias (or zeros) for the GEMM to add to, then the copied columns.
        let bias = bias.unwrap_or_else(|| vec![F::zero(); out]);
        let copied = passthrough.map(|p| (p.start..p.start + p.width, host_scale::<F>(p)));
        let mut y = Vec::with_capacity(rows * full);
        for r in 0..rows {
            y.extend_from_slice(&bias);
            if let Some((columns, scale)) = &copied {
                y.extend(xs.row(r)[columns.clone()].iter().map(|&v| v * *scale));
            }
        }
        host::matmul(&mut MatMut::strided(&mut y, rows, out, full), xs, ws, true);
        from_host::<B, F, 3>(y, [len, batch, full], &B::float_device(&x))
    }
    by_float_type!(&x,
        F => run::<B, F>(x, weight, bias, passthrough),
        other => linear::tensor_forward::<B>(x, weight, bias, passthrough))
}

/// A passthrough's scale in the host float type.
fn host_scale<F: HostFloat>(passthrough: Passthrough) -> F {
    host_value(passthrough.scale)
}

/// An `f64` setting in the host float type.
fn host_value<F: HostFloat>(value: f64) -> F {
    <F as num_traits::NumCast>::from(value).expect("a setting fits the float type")
}

/// `grad · W` through the GEMM on host memory, plus the passed-through columns' share.
pub fn host_linear_grad_input<B: HostTensors>(
    grad: FloatTensor<B>,
    weight: FloatTensor<B>,
    passthrough: Option<Passthrough>,
) -> FloatTensor<B> {
    fn run<B: HostTensors, F: HostFloat>(
        grad: FloatTensor<B>,
        weight: FloatTensor<B>,
        passthrough: Option<Passthrough>,
    ) -> FloatTensor<B> {
        let ([len, batch, full], [out, inner]) = (dims3::<B>(&grad), dims::<B>(&weight));
        let rows = len * batch;
        let (gs, ws) = (B::host_slice::<F, 3>(&grad), B::host_slice::<F, 2>(&weight));
        let projected = MatRef::strided(&gs, rows, out, full);
        let mut dx = host::product(projected, MatRef::new(&ws, out, inner));
        if let Some(p) = passthrough {
            let scale = host_scale::<F>(p);
            for (dx, g) in dx.chunks_exact_mut(inner).zip(gs.chunks_exact(full)) {
                for (d, &g) in dx[p.start..p.start + p.width].iter_mut().zip(&g[out..]) {
                    *d += g * scale;
                }
            }
        }
        from_host::<B, F, 3>(dx, [len, batch, inner], &B::float_device(&grad))
    }
    by_float_type!(&grad,
        F => run::<B, F>(grad, weight, passthrough),
        other => linear::tensor_grad_input::<B>(grad, weight, passthrough))
}

/// `gradᵀ · x` and the column sums of `grad` (its columns before the passed-through ones)
/// through the GEMM on host memory.
pub fn host_linear_grad_params<B: HostTensors>(
    grad: FloatTensor<B>,
    x: FloatTensor<B>,
    passthrough: Option<Passthrough>,
) -> (FloatTensor<B>, FloatTensor<B>) {
    fn run<B: HostTensors, F: HostFloat>(
        grad: FloatTensor<B>,
        x: FloatTensor<B>,
        passthrough: Option<Passthrough>,
    ) -> (FloatTensor<B>, FloatTensor<B>) {
        let ([len, batch, full], [_, _, inner]) = (dims3::<B>(&grad), dims3::<B>(&x));
        let (rows, out) = (len * batch, full - passthrough.map_or(0, |p| p.width));
        let (gs, xs) = (B::host_slice::<F, 3>(&grad), B::host_rows::<F, 3>(&x));
        let grads = MatRef::strided(&gs, rows, out, full);
        let dw = host::product(grads.t(), xs.mat());
        let mut db = vec![F::zero(); out];
        host::add_column_sums(&mut db, grads);
        let device = B::float_device(&grad);
        (
            from_host::<B, F, 2>(dw, [out, inner], &device),
            from_host::<B, F, 1>(db, [out], &device),
        )
    }
    by_float_type!(&grad,
        F => run::<B, F>(grad, x, passthrough),
        other => linear::tensor_grad_params::<B>(grad, x, passthrough))
}

/// [`host_linear_grad_input`] and [`host_linear_grad_params`] as one pass over the rows
/// ([`host::linear_grads`]) for a map of [`host::FEW_OUTPUTS`] outputs or fewer; else (or
/// with a passthrough) the two.
pub fn host_linear_grads<B: HostTensors>(
    grad: FloatTensor<B>,
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    passthrough: Option<Passthrough>,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    fn run<B: HostTensors, F: HostFloat>(
        grad: FloatTensor<B>,
        x: FloatTensor<B>,
        weight: FloatTensor<B>,
    ) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
        let ([len, batch, out], [out_w, inner]) = (dims3::<B>(&grad), dims::<B>(&weight));
        let rows = len * batch;
        let (gs, ws) = (B::host_slice::<F, 3>(&grad), B::host_slice::<F, 2>(&weight));
        let xs = B::host_rows::<F, 3>(&x);
        let (dx, dw, db) = host::linear_grads(
            MatRef::new(&gs, rows, out),
            xs.mat(),
            MatRef::new(&ws, out_w, inner),
        );
        let device = B::float_device(&grad);
        (
            from_host::<B, F, 3>(dx, [len, batch, inner], &device),
            from_host::<B, F, 2>(dw, [out, inner], &device),
            from_host::<B, F, 1>(db, [out], &device),
        )
    }
    let apart = |grad: FloatTensor<B>, x, weight| {
        let grad_x = host_linear_grad_input::<B>(grad.clone(), weight, passthrough);
        let (grad_weight, grad_bias) = host_linear_grad_params::<B>(grad, x, passthrough);
        (grad_x, grad_weight, grad_bias)
    };
    if passthrough.is_some() || dims::<B>(&weight)[0] > host::FEW_OUTPUTS {
        return apart(grad, x, weight);
    }
    by_float_type!(&grad,
        F => run::<B, F>(grad, x, weight),
        other => apart(grad, x, weight))
}

#[cfg(test)]
mod tests {
    use burn::tensor::ops::FloatTensorOps;
    use burn::tensor::{Distribution, TensorData};

    use super::*;
    use crate::cell::sru::SruConfig;
    use crate::cell::{cell_names, AnyCellConfig, Cell, CellConfig};
    use crate::check::{max_abs_diff, F64};
    use crate::regularisation::Regularised;

    fn random<const D: usize>(shape: [usize; D]) -> FloatTensor<F64> {
        primitive(Tensor::<F64, D>::random(
            shape,
            Distribution::Uniform(-1.0, 1.0),
            &Default::default(),
        ))
    }

    /// The `[T, batch]` mask of sequences where sequence `b` ends after step `len − 1 − b % 3`
    /// (a whole sequence, then shorter ones).
    fn stepped_mask(len: usize, batch: usize) -> FloatTensor<F64> {
        let keep: Vec<f64> = (0..len)
            .flat_map(|t| (0..batch).map(move |b| f64::from(t + 1 + b % 3 <= len)))
            .collect();
        primitive(Tensor::<F64, 2>::from_data(
            TensorData::new(keep, [len, batch]),
            &Default::default(),
        ))
    }

    /// Random inputs of `kernel`'s recurrence over `len` steps of `batch` rows, masked by
    /// [`stepped_mask`] when `masked`.
    fn random_input<K: Recurrence>(
        kernel: &K,
        [len, batch]: [usize; 2],
        masked: bool,
        reverse: bool,
    ) -> RecurrenceInput<F64> {
        let param_len: usize = kernel.param_shapes().iter().map(|[r, c]| r * c).sum();
        RecurrenceInput {
            xp: random([len, batch, kernel.input_width()]),
            state0: random([batch, kernel.state_width()]),
            params: random([param_len]),
            mask: masked.then(|| stepped_mask(len, batch)),
            reverse,
        }
    }

    fn data<const D: usize>(tensor: FloatTensor<F64>) -> TensorData {
        float::<F64, D>(tensor).into_data()
    }

    /// The projection's two gradient ops run as one pass over the rows, against the tensor
    /// ops: a strided input (the layer's batch-major view), more rows than one chunk holds and
    /// not a multiple of it; with a passthrough, the two ops it falls back on.
    #[test]
    fn host_linear_grads_match_tensor_ops() {
        // More rows than a chunk holds, and not a multiple of it.
        let len = host::LINEAR_ROWS / 30 + 2;
        let x = primitive(float::<F64, 3>(random([len, 30, 5])).swap_dims(0, 1));
        let weight = random([6, 5]);
        let passed = Passthrough {
            start: 2,
            width: 2,
            scale: 0.5,
        };
        let mut worst = 0.0f64;
        for passthrough in [None, Some(passed)] {
            let grad = random([30, len, 6 + passthrough.map_or(0, |p| p.width)]);
            let (dx, dw, db) =
                host_linear_grads::<F64>(grad.clone(), x.clone(), weight.clone(), passthrough);
            let expected_dx =
                linear::tensor_grad_input::<F64>(grad.clone(), weight.clone(), passthrough);
            let (expected_dw, expected_db) =
                linear::tensor_grad_params::<F64>(grad, x.clone(), passthrough);
            worst = worst
                .max(max_abs_diff(
                    "input gradient",
                    &data::<3>(dx),
                    &data::<3>(expected_dx),
                ))
                .max(max_abs_diff(
                    "weight gradient",
                    &data::<2>(dw),
                    &data::<2>(expected_dw),
                ))
                .max(max_abs_diff(
                    "bias gradient",
                    &data::<1>(db),
                    &data::<1>(expected_db),
                ));
        }
        assert!(worst < 1e-12, "host linear gradients differ by {worst}");
    }

    /// The per-step head's product in chunks of rows, in `f32` (the packed kernel's type, where
    /// the CPU has one) and `f64`, with and without a bias: more rows than one chunk holds,
    /// and not a multiple of it, read through the layer's strided view; and a wider map's.
    #[test]
    fn host_linear_by_rows_matches_tensor_ops() {
        fn worst<B: HostTensors>() -> f64 {
            let device = Default::default();
            let random = |shape: [usize; 3]| {
                Tensor::<B, 3>::random(shape, Distribution::Uniform(-1.0, 1.0), &device)
            };
            let len = host::LINEAR_ROWS / 30 + 2;
            let x = primitive(random([len, 30, 24]).narrow(2, 0, 19).swap_dims(0, 1));
            // A head's few outputs, and as many as an input projection's (the GEMM's path).
            let cases = [7, host::FEW_OUTPUTS + 5].into_iter().flat_map(|out| {
                let weight = primitive(random([1, out, 19]).squeeze::<2>());
                let bias = primitive(random([1, 1, out]).squeeze::<1>());
                [(weight.clone(), None), (weight, Some(bias))]
            });
            cases
                .map(|(weight, bias)| {
                    let host = host_linear::<B>(x.clone(), weight.clone(), bias.clone(), None);
                    let ops = linear::tensor_forward::<B>(x.clone(), weight, bias, None);
                    max_abs_diff(
                        "linear",
                        &float::<B, 3>(host).into_data().convert::<f64>(),
                        &float::<B, 3>(ops).into_data().convert::<f64>(),
                    )
                })
                .fold(0.0, f64::max)
        }
        let (single, double) = (worst::<burn::backend::NdArray<f32>>(), worst::<F64>());
        assert!(
            single < 1e-5 && double < 1e-12,
            "differ by {single} (f32), {double} (f64)"
        );
    }

    /// The projection and the outputs op on host memory against their tensor-op defaults
    /// (what GPU backends run), with a strided (transposed) input as the layer passes it.
    #[test]
    fn host_linear_and_outputs_match_tensor_ops() {
        let x = primitive(float::<F64, 3>(random([4, 3, 5])).swap_dims(0, 1));
        let (weight, bias) = (random([6, 5]), random([6]));
        let passed = Passthrough {
            start: 1,
            width: 3,
            scale: 0.7,
        };
        let mut worst = Vec::new();
        for (passthrough, bias) in [
            (None, Some(bias.clone())),
            (Some(passed), None),
            (Some(passed), Some(bias)),
        ] {
            let grad = random([3, 4, 6 + passthrough.map_or(0, |p| p.width)]);
            let forward = |linear: fn(_, _, _, _) -> FloatTensor<F64>| {
                data::<3>(linear(x.clone(), weight.clone(), bias.clone(), passthrough))
            };
            worst.push(max_abs_diff(
                "linear",
                &forward(host_linear::<F64>),
                &forward(linear::tensor_forward::<F64>),
            ));
            worst.push(max_abs_diff(
                "linear input gradient",
                &data::<3>(host_linear_grad_input::<F64>(
                    grad.clone(),
                    weight.clone(),
                    passthrough,
                )),
                &data::<3>(linear::tensor_grad_input::<F64>(
                    grad.clone(),
                    weight.clone(),
                    passthrough,
                )),
            ));
            let (host_w, host_b) =
                host_linear_grad_params::<F64>(grad.clone(), x.clone(), passthrough);
            let (ops_w, ops_b) = linear::tensor_grad_params::<F64>(grad, x.clone(), passthrough);
            worst.push(max_abs_diff(
                "linear weight gradient",
                &data::<2>(host_w),
                &data::<2>(ops_w),
            ));
            worst.push(max_abs_diff(
                "linear bias gradient",
                &data::<1>(host_b),
                &data::<1>(ops_b),
            ));
        }
        // The recurrence hands over its output as a view of the wider packed sequence; more
        // steps and batch rows than a chunk of the layout change holds, and not a multiple.
        let (len, batch) = (2 * GROUP + 3, GROUP + 5);
        let visible = F64::leading_columns::<3>(random([len, batch, 9]), 7);
        let outputs = host_outputs::<F64>(visible.clone(), 2);
        let expected = float::<F64, 3>(visible).narrow(2, 0, 2).swap_dims(0, 1);
        let grad = random([batch, len, 2]);
        let back = host_outputs_backward::<F64>(grad.clone(), 7);
        let expected_back = Tensor::cat(
            vec![
                float::<F64, 3>(grad).swap_dims(0, 1),
                Tensor::zeros([len, batch, 5], &Default::default()),
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

    /// A batch-major op output becomes the layer's output without a copy (of outputs alone: the
    /// same buffer; with more columns: a view of the first), and a gradient of outputs alone
    /// goes back without one, read where it lies.
    #[test]
    fn batch_major_outputs_pass_as_views() {
        let (len, batch) = (2 * GROUP + 3, GROUP + 5);
        let sequences = random([batch, len, 2]);
        let visible = F64::float_swap_dims(sequences.clone(), 0, 1);
        let outputs = host_outputs::<F64>(visible, 2);
        let first = |t: &FloatTensor<F64>| F64::host_strided::<f64>(t).map(|(v, _)| v.as_ptr());
        assert_eq!(
            first(&outputs),
            first(&sequences),
            "the outputs are the sequences"
        );
        assert_eq!(data::<3>(outputs), data::<3>(sequences.clone()));

        let wide = random([batch, len, 5]);
        let visible = F64::float_swap_dims(F64::leading_columns::<3>(wide.clone(), 3), 0, 1);
        let outputs = host_outputs::<F64>(visible, 2);
        assert_eq!(first(&outputs), first(&wide), "a view of the sequences");
        let expected = float::<F64, 3>(wide).narrow(2, 0, 2);
        assert_eq!(data::<3>(outputs), expected.into_data());

        let back = host_outputs_backward::<F64>(sequences.clone(), 2);
        let (values, strides) = host_sequence::<F64, f64>(&back);
        assert_eq!(
            strides,
            host::RowStrides::batch_major(len, 2),
            "read in place"
        );
        let swapped = float::<F64, 3>(sequences).swap_dims(0, 1);
        let read: Vec<f64> = (0..len)
            .flat_map(|t| (0..batch).map(move |b| (t, b)))
            .flat_map(|(t, b)| values[t * strides.step + b * strides.row..][..2].to_vec())
            .collect();
        assert_eq!(read, swapped.into_data().to_vec::<f64>().unwrap());
    }

    /// Rows are read in place exactly when they lie one stride apart with a contiguous last
    /// axis, and then hold the tensor's values.
    #[test]
    fn rows_are_read_in_place_only_when_one_stride_apart() {
        let whole = random([4, 3, 9]);
        let narrowed = F64::leading_columns::<3>(whole.clone(), 7);
        let single_step = F64::leading_columns::<3>(random([1, 3, 9]), 7);
        let swapped = primitive(float::<F64, 3>(whole.clone()).swap_dims(0, 1));
        let transposed = primitive(float::<F64, 3>(whole.clone()).swap_dims(1, 2));
        for (name, tensor, in_place, stride) in [
            ("whole", &whole, true, 9),
            ("narrowed", &narrowed, true, 9),
            ("narrowed, one step", &single_step, true, 9),
            ("batch and time swapped", &swapped, false, 9),
            ("last two axes swapped", &transposed, false, 3),
        ] {
            let rows = F64::host_rows::<f64, 3>(tensor);
            assert_eq!(
                matches!(rows.values, Cow::Borrowed(_)),
                in_place,
                "{name}: in place"
            );
            assert_eq!(rows.row_stride, stride, "{name}: row stride");
            let expected = data::<3>(tensor.clone()).to_vec::<f64>().unwrap();
            let read: Vec<f64> = (0..rows.rows)
                .flat_map(|r| rows.mat().row(r).to_vec())
                .collect();
            assert_eq!(read, expected, "{name}: values");
        }
    }

    /// The host path (what burn-ndarray runs) against the plain-tensor default bodies (what
    /// the GPU backends run), forward and backward, for every cell, both directions, masked
    /// and not (a kernel whose output is in its state then leaves it out of the host rows);
    /// and the same with each kind of recurrent noise around the cell (random noise values:
    /// the formulas hold for any).
    /// The host backward with a head's gradient in factors gives what the head's gradient
    /// materialised with the backend's ops gives ([`HeadGrad::materialised`], the path of
    /// backends that do not take factors): every cell, masked or not, with and without a
    /// gradient of the op's output beside the head's.
    #[test]
    fn head_in_factors_matches_the_materialised_head() {
        let (len, batch, k) = (5, 3, 2);
        for name in cell_names() {
            let config = AnyCellConfig::named(name, 3, 4).unwrap();
            let kernel = config.init_cell::<F64>(&Default::default()).kernel();
            for (masked, beside) in [(false, false), (false, true), (true, false), (true, true)] {
                let input = random_input(&kernel, [len, batch], masked, false);
                let (packed, visible) = host_recurrence_forward::<F64, _>(&kernel, input.clone());
                let width = dims3::<F64>(&visible)[2];
                let output_width = kernel.output_width();
                let head = HeadGrad {
                    grad: random([batch, len, k]),
                    weight: random([k, output_width]),
                    input: host_outputs::<F64>(visible, output_width),
                    op_width: width,
                    weight_grad: true,
                };
                let rows = beside.then(|| random([len, batch, width]));
                let (factors, weight) = host_recurrence_backward_with_head::<F64, _>(
                    &kernel,
                    input.clone(),
                    packed.clone(),
                    rows.clone(),
                    head.clone(),
                );
                let (grad, expected_weight) = head.materialised(rows);
                let expected = host_recurrence_backward::<F64, _>(&kernel, input, packed, grad);
                let case = format!("{name} (masked {masked}, a gradient beside {beside})");
                let weights = (weight.expect("summed"), expected_weight.expect("summed"));
                let worst = [
                    max_abs_diff(&case, &data::<3>(factors.xp), &data::<3>(expected.xp)),
                    max_abs_diff(
                        &case,
                        &data::<2>(factors.state0),
                        &data::<2>(expected.state0),
                    ),
                    max_abs_diff(
                        &case,
                        &data::<1>(factors.params),
                        &data::<1>(expected.params),
                    ),
                    max_abs_diff(&case, &data::<2>(weights.0), &data::<2>(weights.1)),
                ]
                .into_iter()
                .fold(0.0, f64::max);
                assert!(worst < 1e-12, "{case}: {worst:e}");
            }
        }
    }

    #[test]
    fn host_path_matches_tensor_path() {
        for name in cell_names() {
            let config = AnyCellConfig::named(name, 3, 4).unwrap();
            let kernel = config.init_cell::<F64>(&Default::default()).kernel();
            compare_host_and_tensor(name, &kernel);
            for (dropout, zoneout) in [(true, false), (false, true), (true, true)] {
                let wrapped = Regularised::new(kernel.clone(), dropout, zoneout);
                compare_host_and_tensor(
                    &format!("{name} dropout {dropout} zoneout {zoneout}"),
                    &wrapped,
                );
            }
        }
    }

    /// A batch large enough that the host path splits it into blocks of rows, each run through
    /// the sequence on its own (in parallel when there are threads).
    #[test]
    fn host_path_in_blocks_matches_tensor_path() {
        for name in ["lstm", "sru", "peephole-lstm", "gru"] {
            let config = AnyCellConfig::named(name, 3, 4).unwrap();
            let kernel = config.init_cell::<F64>(&Default::default()).kernel();
            compare_host_and_tensor_batch(name, &kernel, 131);
            compare_host_and_tensor_batch(
                &format!("{name} with dropout"),
                &Regularised::new(kernel.clone(), true, false),
                131,
            );
        }
    }

    /// The projected recurrence on host memory (each step's projection computed in the walk,
    /// the weight products summed step by step) against the projection and the recurrence as
    /// separate tensor ops: forward and every gradient, masked and not, both directions, one block of
    /// rows and two, the input contiguous and transposed (as the layer passes it).
    #[test]
    fn projected_host_path_matches_projection_then_recurrence() {
        let (len, width) = (5, 3);
        for name in cell_names() {
            let cell = AnyCellConfig::named(name, width, 4)
                .unwrap()
                .init_cell::<F64>(&Default::default());
            check_projected_host_path(name, &cell, len, width);
        }
        // SRU with k = 3: the skip term passed through, of the whole input and of the second
        // direction's half.
        let device = Default::default();
        check_projected_host_path("sru k=3", &SruConfig::new(4, 4).init(&device), len, 4);
        let second = SruConfig::new(8, 4)
            .with_output_size(Some(8))
            .with_direction(1);
        check_projected_host_path("sru k=3 reverse half", &second.init(&device), len, 8);
    }

    /// The host path's projected recurrence (projection computed in the walk) against the
    /// tensor projection, passthrough and recurrence, forward and every gradient.
    fn check_projected_host_path<C: Cell<F64>>(name: &str, cell: &C, len: usize, width: usize) {
        let (weight, bias) = cell.input_affine();
        let (kernel, passthrough) = (cell.kernel(), cell.input_passthrough());
        let (weight, bias) = (primitive(weight), bias.map(primitive));
        let param_len: usize = kernel.param_shapes().iter().map(|[r, c]| r * c).sum();
        let cases = [
            (3, false, true, true),
            (3, true, false, true),
            (131, true, true, true),
            (3, false, true, false),
            (131, true, false, false),
        ];
        for (batch, reverse, transposed, masked) in cases {
            let x = match transposed {
                true => primitive(float::<F64, 3>(random([batch, len, width])).swap_dims(0, 1)),
                false => random([len, batch, width]),
            };
            let input = ProjectedInput::<F64> {
                x: x.clone(),
                weight: weight.clone(),
                bias: bias.clone(),
                passthrough,
                state0: random([batch, kernel.state_width()]),
                params: random([param_len]),
                mask: masked.then(|| stepped_mask(len, batch)),
                reverse,
                noise: None,
            };
            let xp =
                linear::tensor_forward::<F64>(x.clone(), weight.clone(), bias.clone(), passthrough);
            let apart = RecurrenceInput::<F64> {
                xp,
                state0: input.state0.clone(),
                params: input.params.clone(),
                mask: input.mask.clone(),
                reverse,
            };
            let tensor_out = recurrence_forward::<F64, _>(&kernel, apart.clone());
            let (host_out, host_visible) = host_projected_forward::<F64, _>(&kernel, input.clone());
            let in_state = host::visible_width(&kernel, masked) == kernel.state_width();
            let grad = random([len, batch, kernel.output_width() + kernel.state_width()]);
            let tensor =
                recurrence_backward::<F64, _>(&kernel, apart, tensor_out.clone(), grad.clone());
            let grad = folded_grad(&kernel, in_state, grad);
            let (tensor_w, tensor_b) =
                linear::tensor_grad_params::<F64>(tensor.xp.clone(), x.clone(), passthrough);
            let tensor_x = linear::tensor_grad_input::<F64>(tensor.xp, weight.clone(), passthrough);
            let host = host_projected_backward::<F64, _>(&kernel, input, host_out, grad, true);
            let case = format!("{name} (batch {batch}, reverse {reverse}, masked {masked})");
            let tensor_visible = visible::<F64, _>(&kernel, tensor_out);
            let mut diffs = vec![
                max_abs_diff(
                    &case,
                    &data::<3>(host_visible),
                    &data::<3>(host_layout(&kernel, in_state, tensor_visible)),
                ),
                max_abs_diff(&case, &data::<3>(host.x.unwrap()), &data::<3>(tensor_x)),
                max_abs_diff(&case, &data::<2>(host.weight), &data::<2>(tensor_w)),
                max_abs_diff(&case, &data::<2>(host.state0), &data::<2>(tensor.state0)),
                max_abs_diff(&case, &data::<1>(host.params), &data::<1>(tensor.params)),
            ];
            assert_eq!(host.bias.is_some(), bias.is_some(), "{case}: bias gradient");
            if let Some(host_b) = host.bias {
                diffs.push(max_abs_diff(
                    &case,
                    &data::<1>(host_b),
                    &data::<1>(tensor_b),
                ));
            }
            let worst = diffs.into_iter().fold(0.0, f64::max);
            assert!(worst < 1e-12, "{case}: {worst:e}");
        }
    }

    fn compare_host_and_tensor<K: Recurrence>(name: &str, kernel: &K) {
        compare_host_and_tensor_batch(name, kernel, 3)
    }

    /// Sequence `b` of the batch ends after step `4 - b % 3` of 5 (a full sequence, then
    /// shorter ones), or (unmasked) every sequence is whole.
    fn compare_host_and_tensor_batch<K: Recurrence>(name: &str, kernel: &K, batch: usize) {
        let len = 5;
        for (reverse, masked) in [(false, true), (true, true), (false, false), (true, false)] {
            let case = format!("{name} (reverse {reverse}, masked {masked})");
            let input = random_input(kernel, [len, batch], masked, reverse);
            let tensor_out = recurrence_forward::<F64, _>(kernel, input.clone());
            let (host_out, host_visible) = host_recurrence_forward::<F64, _>(kernel, input.clone());
            let in_state = host::visible_width(kernel, masked) == kernel.state_width();
            // The whole packed rows where both paths save the same values; else (a host step
            // that recomputes in its backward what it does not save) the op's output.
            let forward = if kernel.host_saved_width() == kernel.saved_width() {
                max_abs_diff(
                    &case,
                    &data::<3>(host_out.clone()),
                    &data::<3>(host_layout(kernel, in_state, tensor_out.clone())),
                )
            } else {
                let tensor_visible = visible::<F64, _>(kernel, tensor_out.clone());
                max_abs_diff(
                    &case,
                    &data::<3>(host_visible),
                    &data::<3>(host_layout(kernel, in_state, tensor_visible)),
                )
            };
            let grad = random([len, batch, kernel.output_width() + kernel.state_width()]);
            let tensor =
                recurrence_backward::<F64, _>(kernel, input.clone(), tensor_out, grad.clone());
            let host_grad = folded_grad(kernel, in_state, grad);
            let host = host_recurrence_backward::<F64, _>(kernel, input, host_out, host_grad);
            let backward = [
                max_abs_diff(&case, &data::<3>(host.xp), &data::<3>(tensor.xp)),
                max_abs_diff(&case, &data::<2>(host.state0), &data::<2>(tensor.state0)),
                max_abs_diff(&case, &data::<1>(host.params), &data::<1>(tensor.params)),
            ];
            let worst = backward.into_iter().fold(forward, f64::max);
            assert!(worst < 1e-12, "{case}: {worst:e}");
        }
    }

    /// The tensor path's packed rows (or op output) as the host path lays them out: without
    /// the output columns when the host leaves them out, after checking that they are the
    /// state's first columns, as [`Recurrence::host_output_in_state`] promises.
    fn host_layout<K: Recurrence>(
        kernel: &K,
        in_state: bool,
        rows: FloatTensor<F64>,
    ) -> FloatTensor<F64> {
        if !in_state {
            return rows;
        }
        let rows = float::<F64, 3>(rows);
        let (o, width) = (kernel.output_width(), rows.dims()[2]);
        let output = data::<3>(primitive(rows.clone().narrow(2, 0, o)));
        let state_head = data::<3>(primitive(rows.clone().narrow(2, o, o)));
        assert_eq!(
            output, state_head,
            "the output is the state's first columns"
        );
        primitive(rows.narrow(2, o, width - o))
    }

    /// The op output's gradient `[output | state]` as the host path takes it: the output's
    /// gradient added into the state's first columns when the host leaves the output out.
    fn folded_grad<K: Recurrence>(
        kernel: &K,
        in_state: bool,
        grad: FloatTensor<F64>,
    ) -> FloatTensor<F64> {
        if !in_state {
            return grad;
        }
        let grad = float::<F64, 3>(grad);
        let (o, s) = (kernel.output_width(), kernel.state_width());
        let output = grad.clone().narrow(2, 0, o);
        let state = grad.narrow(2, o, s);
        let head = state.clone().narrow(2, 0, o) + output;
        match s - o {
            0 => primitive(head),
            rest => primitive(Tensor::cat(vec![head, state.narrow(2, o, rest)], 2)),
        }
    }
}
