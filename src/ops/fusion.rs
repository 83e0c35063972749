//! The recurrence op under burn's fusion backend: each pass is registered as one custom
//! operation that runs the inner backend's op (for the SRU, its fused kernel) when the fusion
//! stream executes. Fusion does not look inside it; the elementwise ops around it still fuse.

use core::marker::PhantomData;

use burn::tensor::{ops::FloatTensor, Shape};
use burn_fusion::{
    stream::{Operation, OperationStreams},
    Fusion, FusionBackend, FusionRuntime, FusionTensor,
};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};

use super::{Recurrence, RecurrenceGrads, RecurrenceInput, RnnBackend};

type Handles<B> =
    HandleContainer<<<B as FusionBackend>::FusionRuntime as FusionRuntime>::FusionHandle>;

impl<B: FusionBackend + RnnBackend> RnnBackend for Fusion<B> {
    fn rnn_recurrence_split<K: Recurrence>(
        kernel: &K,
        input: RecurrenceInput<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (len, batch) = (input.xp.shape[0], input.xp.shape[1]);
        let width = kernel.output_width() + kernel.state_width();
        let shapes = vec![
            Shape::new([len, batch, width + kernel.saved_width()]),
            Shape::new([len, batch, width]),
        ];
        let op = RecurrenceOp::<B, K>::describe(Pass::Forward, kernel, &input);
        let mut outputs = op.register(input.tensors(), shapes).into_iter();
        (next(&mut outputs), next(&mut outputs))
    }

    fn rnn_recurrence_backward<K: Recurrence>(
        kernel: &K,
        input: RecurrenceInput<Self>,
        packed: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> RecurrenceGrads<Self> {
        let shapes = vec![
            input.xp.shape.clone(),
            input.state0.shape.clone(),
            input.params.shape.clone(),
        ];
        let op = RecurrenceOp::<B, K>::describe(Pass::Backward, kernel, &input);
        let mut tensors = input.tensors();
        tensors.extend([packed, grad]);
        let mut outputs = op.register(tensors, shapes).into_iter();
        RecurrenceGrads {
            xp: next(&mut outputs),
            state0: next(&mut outputs),
            params: next(&mut outputs),
        }
    }
}

fn next<T>(items: &mut impl Iterator<Item = T>) -> T {
    items
        .next()
        .expect("the recurrence op has all its inputs and outputs")
}

impl<B: FusionBackend> RecurrenceInput<Fusion<B>> {
    /// `xp`, `state0`, `params` and, when present, the mask: the custom op's first inputs.
    fn tensors(self) -> Vec<FusionTensor<B::FusionRuntime>> {
        let mut tensors = vec![self.xp, self.state0, self.params];
        tensors.extend(self.mask);
        tensors
    }
}

/// Which op of the recurrence a custom operation runs.
#[derive(Debug, Clone, Copy)]
enum Pass {
    /// `rnn_recurrence_split`: inputs as [`RecurrenceInput::tensors`]; outputs packed, visible.
    Forward,
    /// `rnn_recurrence_backward`: the same inputs then packed and grad; outputs the gradients
    /// of xp, state0 and params.
    Backward,
}

/// One registered pass of the recurrence op.
struct RecurrenceOp<B, K> {
    pass: Pass,
    kernel: K,
    masked: bool,
    reverse: bool,
    desc: Option<CustomOpIr>,
    _backend: PhantomData<fn() -> B>,
}

impl<B: FusionBackend + RnnBackend, K: Recurrence> RecurrenceOp<B, K> {
    fn describe(pass: Pass, kernel: &K, input: &RecurrenceInput<Fusion<B>>) -> Self {
        Self {
            pass,
            kernel: kernel.clone(),
            masked: input.mask.is_some(),
            reverse: input.reverse,
            desc: None,
            _backend: PhantomData,
        }
    }

    /// Registers the op on its inputs' fusion streams; returns its outputs, of `shapes`.
    fn register(
        mut self,
        inputs: Vec<FusionTensor<B::FusionRuntime>>,
        shapes: Vec<Shape>,
    ) -> Vec<FusionTensor<B::FusionRuntime>> {
        let client = inputs[0].client.clone();
        let dtype = inputs[0].dtype;
        let streams = OperationStreams::with_inputs(&inputs);
        let outputs: Vec<TensorIr> = shapes
            .into_iter()
            .map(|shape| TensorIr::uninit(client.create_empty_handle(), shape, dtype))
            .collect();
        let inputs: Vec<TensorIr> = inputs.into_iter().map(FusionTensor::into_ir).collect();
        let name = match self.pass {
            Pass::Forward => "rnn_recurrence_split",
            Pass::Backward => "rnn_recurrence_backward",
        };
        let desc = CustomOpIr::new(name, &inputs, &outputs);
        self.desc = Some(desc.clone());
        client.register(streams, OperationIr::Custom(desc), self)
    }

    fn run(&self, inputs: Vec<FloatTensor<B>>) -> Vec<FloatTensor<B>> {
        let mut inputs = inputs.into_iter();
        let input = RecurrenceInput {
            xp: next(&mut inputs),
            state0: next(&mut inputs),
            params: next(&mut inputs),
            mask: self.masked.then(|| next(&mut inputs)),
            reverse: self.reverse,
        };
        match self.pass {
            Pass::Forward => {
                let (packed, visible) = B::rnn_recurrence_split(&self.kernel, input);
                vec![packed, visible]
            }
            Pass::Backward => {
                let (packed, grad) = (next(&mut inputs), next(&mut inputs));
                let grads = B::rnn_recurrence_backward(&self.kernel, input, packed, grad);
                vec![grads.xp, grads.state0, grads.params]
            }
        }
    }
}

impl<B: FusionBackend + RnnBackend, K: Recurrence> Operation<B::FusionRuntime>
    for RecurrenceOp<B, K>
{
    fn execute(&self, handles: &mut Handles<B>) {
        let desc = self
            .desc
            .as_ref()
            .expect("registered ops have a description");
        let inputs = desc
            .inputs
            .iter()
            .map(|tensor| handles.get_float_tensor::<B>(tensor))
            .collect();
        for (tensor, result) in desc.outputs.iter().zip(self.run(inputs)) {
            handles.register_float_tensor::<B>(&tensor.id, result);
        }
    }
}

impl<B, K: core::fmt::Debug> core::fmt::Debug for RecurrenceOp<B, K> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("RecurrenceOp")
            .field("pass", &self.pass)
            .field("kernel", &self.kernel)
            .field("masked", &self.masked)
            .field("reverse", &self.reverse)
            .finish()
    }
}
