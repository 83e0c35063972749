//! A per-step linear head's gradient handed to the recurrence op in factors.
//!
//! A head `y_t = x_t · Wᵀ + b` on a layer's outputs `x` has the input gradient `g · W`: on a
//! long sequence a `[batch, T, O]` tensor that the head's backward writes to memory and the
//! recurrence op's backward reads back, while its factors `g` (`[batch, T, k]`, a few columns)
//! and `W` are small. Where the backend's walk can add `g_t · W` step by step
//! ([`RnnBackend::rnn_takes_head_grads`]), the autodiff nodes pass the factors instead: the
//! recurrence op's node marks its output, the layer outputs' node marks its own where it reads
//! a marked op, the head's node finds that mark and leaves `(g, W)` here rather than
//! registering `g · W`, and the outputs' node hands them on to the op's node. Burn's
//! `Gradients` holds one tensor per node, so the factors travel beside it, keyed by node.
//! Each mark is taken once, so one head and one outputs node per op take this way; any other
//! reader sends its gradient through `Gradients` as usual, and the op adds both.

use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, MutexGuard, Weak};

use burn::backend::autodiff::NodeId;
use burn::tensor::{backend::Backend, ops::FloatTensor};

use super::RnnBackend;

/// The gradient of a per-step linear head on the recurrence op's outputs, in factors.
#[derive(Debug, Clone)]
pub struct HeadGrad<B: Backend> {
    /// The gradient of the head's output, `[batch, T, k]`.
    pub grad: FloatTensor<B>,
    /// The head's weight, `[k, O]`.
    pub weight: FloatTensor<B>,
    /// The head's input, the op's outputs `[batch, T, O]` (as
    /// [`RnnBackend::rnn_outputs`] gives them).
    pub input: FloatTensor<B>,
    /// Columns of the op's output, `W`.
    pub op_width: usize,
    /// Whether the op sums the head's weight gradient (not where it is not wanted, or where
    /// the head's own node computes it).
    pub weight_grad: bool,
}

impl<B: RnnBackend> HeadGrad<B> {
    /// What the head's own backward and the outputs' node would give, with the backend's ops:
    /// the op's whole output gradient `[T, batch, W]`, `rows` (the gradient that reached the
    /// op through `Gradients`, whole or of the outputs alone) plus the head's share, and the
    /// head's weight gradient where [`weight_grad`](Self::weight_grad).
    pub fn materialised(
        self,
        rows: Option<FloatTensor<B>>,
    ) -> (FloatTensor<B>, Option<FloatTensor<B>>) {
        let width = self.op_width;
        let (grad_x, grad_weight) = match self.weight_grad {
            true => {
                let (grad_x, grad_weight, _) =
                    B::rnn_linear_grads(self.grad, self.input, self.weight, None);
                (grad_x, Some(grad_weight))
            }
            false => (B::rnn_linear_grad_input(self.grad, self.weight, None), None),
        };
        let own = B::rnn_outputs_backward(grad_x, width);
        let grad = match rows {
            None => own,
            Some(rows) => {
                let rows = match super::float::<B, 3>(rows.clone()).dims()[2] < width {
                    true => B::rnn_outputs_backward(B::float_swap_dims(rows, 0, 1), width),
                    false => rows,
                };
                B::float_add(rows, own)
            }
        };
        (grad, grad_weight)
    }
}

/// A head's gradient on its way to the op, and the node of the head's weight where the op
/// registers its gradient (where [`HeadGrad::weight_grad`]).
pub(super) struct Pending<B: RnnBackend> {
    pub head: HeadGrad<B>,
    pub weight_node: Option<NodeId>,
}

/// What a mark of a layer outputs' node tells the head's node.
#[derive(Debug, Clone, Copy)]
pub(super) struct OutputsMark {
    /// The op's depth in the graph: a weight whose node is shallower gets its gradient
    /// registered by the op's node before burn runs the weight node's backward.
    pub op_order: usize,
    /// Columns of the op's output.
    pub op_width: usize,
}

enum Entry {
    /// The output of a recurrence op whose backward takes a head's gradient.
    Op { alive: Weak<()> },
    /// A layer outputs' node that reads such an op.
    Outputs { mark: OutputsMark, alive: Weak<()> },
    /// A head's gradient (a [`Pending`]).
    Head(Box<dyn Any + Send>),
}

/// Entries by node. Marks hold a weak token whose strong half lives in their node's state:
/// a graph dropped without a backward leaves dead marks, cleared at the next mark.
static ENTRIES: LazyLock<Mutex<HashMap<u64, Entry>>> = LazyLock::new(Mutex::default);

fn entries() -> MutexGuard<'static, HashMap<u64, Entry>> {
    // An entry is inserted or removed whole: a panic elsewhere cannot leave one half-written.
    ENTRIES
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn insert_mark(node: NodeId, entry: Entry) {
    let mut entries = entries();
    entries.retain(|_, entry| match entry {
        Entry::Op { alive } | Entry::Outputs { alive, .. } => alive.strong_count() > 0,
        Entry::Head(_) => true,
    });
    entries.insert(node.value, entry);
}

/// Marks the output of a recurrence op; the mark lives as long as `token`.
pub(super) fn mark_op(node: NodeId, token: &Arc<()>) {
    let alive = Arc::downgrade(token);
    insert_mark(node, Entry::Op { alive });
}

/// Takes the mark of an op output: whether `node` is one.
pub(super) fn take_op_mark(node: NodeId) -> bool {
    take_if(node, |entry| {
        matches!(entry, Entry::Op { .. }).then_some(())
    })
    .is_some()
}

/// Marks a layer outputs' node; the mark lives as long as `token`.
pub(super) fn mark_outputs(node: NodeId, mark: OutputsMark, token: &Arc<()>) {
    let alive = Arc::downgrade(token);
    insert_mark(node, Entry::Outputs { mark, alive });
}

/// Takes the mark of a layer outputs' node, if `node` is one.
pub(super) fn take_outputs_mark(node: NodeId) -> Option<OutputsMark> {
    take_if(node, |entry| match entry {
        Entry::Outputs { mark, .. } => Some(*mark),
        _ => None,
    })
}

/// Removes the entry of `node` where `read` finds in it what it looks for.
fn take_if<T>(node: NodeId, read: impl FnOnce(&Entry) -> Option<T>) -> Option<T> {
    let mut entries = entries();
    let found = read(entries.get(&node.value)?)?;
    entries.remove(&node.value);
    Some(found)
}

/// Leaves a head's gradient for the backward of `node`.
pub(super) fn put_head<B: RnnBackend>(node: NodeId, pending: Pending<B>) {
    entries().insert(node.value, Entry::Head(Box::new(pending)));
}

/// Takes the head's gradient left for `node`, and with it any mark of `node`.
pub(super) fn take_head<B: RnnBackend>(node: NodeId) -> Option<Pending<B>> {
    match entries().remove(&node.value)? {
        Entry::Head(pending) => pending
            .downcast::<Pending<B>>()
            .ok()
            .map(|pending| *pending),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Distribution, Tensor, TensorData};

    use crate::cell::project_sequence;
    use crate::check::{gradients_of, max_difference, F64Autodiff};
    use crate::ops::RecurrencePath;
    use crate::prelude::*;

    /// A head whose weight comes out of a chain of ops deeper than the recurrence op: burn
    /// runs the weight's node before the op's, so the head's node computes the weight's
    /// gradient itself. Every gradient matches the plain path's.
    #[test]
    fn a_head_weight_deeper_than_the_op_gets_its_gradient_from_the_head() {
        type B = F64Autodiff;
        let device = Default::default();
        let cell = AnyCellConfig::named("gru", 3, 4).expect("a cell");
        let layer = RnnLayerConfig::new(cell).init::<B>(&device);
        let input = Tensor::<B, 3>::random([3, 5, 3], Distribution::Default, &device);
        let weight = Tensor::<B, 2>::random([2, 4], Distribution::Default, &device);
        let bias = Tensor::<B, 1>::random([2], Distribution::Default, &device);
        let gradients = |path| -> Vec<TensorData> {
            let (x, w, b) = (
                input.clone().require_grad(),
                weight.clone().require_grad(),
                bias.clone().require_grad(),
            );
            // Thirty ops deep: deeper than the layer's recurrence op.
            let deep = (0..30).fold(w.clone(), |w, _| w * 1.0);
            let (output, _) = layer.forward_with_path(x.clone(), None, None, path);
            let loss = project_sequence(output, deep, Some(b.clone()), None).powf_scalar(2.0);
            let grads = loss.sum().backward();
            let mut found: Vec<TensorData> = [x.grad(&grads).map(|g| g.into_data())]
                .into_iter()
                .chain([w.grad(&grads).map(|g| g.into_data())])
                .chain([b.grad(&grads).map(|g| g.into_data())])
                .map(|g| g.expect("a gradient"))
                .collect();
            let params = gradients_of(layer.clone(), &grads).state_dict();
            found.extend(params.into_iter().map(|(_, d)| d));
            found
        };
        let fused = gradients(RecurrencePath::Fused);
        let worst = max_difference("gru", &fused, &gradients(RecurrencePath::Plain));
        assert!(worst < 1e-9, "fused and plain differ by {worst:e}");
    }
}
