//! Synthetic long-dependency tasks: seeded data generators with their loss, metrics, baseline
//! and solved rule. No training code lives here. Adding a task is one file plus one line in
//! [`TaskKind`].

pub mod adding;
pub mod associative_recall;
pub mod copy;
pub mod selective_copy;
pub mod temporal_order;
pub mod variable_copy;

use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use rand::{rngs::StdRng, SeedableRng};
use serde::{Deserialize, Serialize};

/// The targets of a batch.
#[derive(Debug, Clone)]
pub enum Targets {
    /// A class per step, `[batch, T]`.
    Classes(Vec<i64>),
    /// One value per sequence, read at the last step, `[batch]`.
    Values(Vec<f32>),
    /// One class per sequence, read at the last step, `[batch]`.
    Labels(Vec<i64>),
}

/// One batch of a task, on the host.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Sequences in the batch.
    pub size: usize,
    /// Steps per sequence.
    pub len: usize,
    /// Input features per step.
    pub features: usize,
    /// `[size, len, features]`, row-major.
    pub inputs: Vec<f32>,
    /// What the model should predict.
    pub targets: Targets,
}

impl Batch {
    /// The inputs as a tensor `[size, len, features]`.
    pub fn input_tensor<B: Backend>(&self, device: &B::Device) -> Tensor<B, 3> {
        Tensor::from_data(
            TensorData::new(self.inputs.clone(), [self.size, self.len, self.features]),
            device,
        )
    }
}

/// What an evaluation measured.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct Metrics {
    /// The task's metric (lower is better).
    pub metric: f64,
    /// Accuracy on the positions that need memory, where the task has them.
    pub recall_accuracy: Option<f64>,
}

/// A synthetic task.
pub trait Task: Send + Sync {
    /// Short name (`copy-task`).
    fn name(&self) -> &'static str;
    /// Its length parameter (delay or sequence length).
    fn length(&self) -> usize;
    /// Input features per step.
    fn input_size(&self) -> usize;
    /// Outputs of the model's head per step (classes or 1).
    fn output_size(&self) -> usize;
    /// Draws a batch.
    fn batch(&self, size: usize, rng: &mut StdRng) -> Batch;
    /// Per-element training losses of the head's outputs `[batch, T, output_size]` (their mean
    /// is the loss).
    fn losses<B: Backend>(&self, outputs: Tensor<B, 3>, batch: &Batch) -> Tensor<B, 1>;
    /// Evaluation metrics of the head's outputs.
    fn evaluate<B: Backend>(&self, outputs: Tensor<B, 3>, batch: &Batch) -> Metrics;
    /// What a memoryless predictor scores on the metric.
    fn baseline(&self) -> f64;
    /// Whether the metrics count as solved.
    fn solved(&self, metrics: &Metrics) -> bool;
    /// The metric's name, for tables and plots.
    fn metric_name(&self) -> &'static str;
}

/// The random generator of training step `step` under `seed`: every step's batch is a pure
/// function of both, so an interrupted run resumes on the same data.
pub fn step_rng(seed: u64, step: u64) -> StdRng {
    StdRng::seed_from_u64(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ step)
}

/// The generator of the held-out set under `seed` (distinct from every training step's).
pub fn eval_rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(!seed.wrapping_mul(0xD1B5_4A32_D192_ED03))
}

/// The mean of a tensor, summed on the host in a fixed order: burn-ndarray's SIMD reductions
/// can differ in the last bit with the buffer's alignment, and reported values must repeat
/// exactly when a run is resumed.
pub fn host_mean<B: Backend>(values: Tensor<B, 1>) -> f64 {
    let data = values.into_data().convert::<f64>();
    let values = data.to_vec::<f64>().expect("float values");
    values.iter().sum::<f64>() / values.len().max(1) as f64
}

/// Class targets as an Int tensor `[n]`.
pub(crate) fn class_tensor<B: Backend>(classes: &[i64], device: &B::Device) -> Tensor<B, 1, Int> {
    Tensor::from_data(TensorData::new(classes.to_vec(), [classes.len()]), device)
}

/// Loss of the label tasks: cross-entropy of the last step's outputs against the label.
pub(crate) fn label_losses<B: Backend>(outputs: Tensor<B, 3>, batch: &Batch) -> Tensor<B, 1> {
    let Targets::Labels(labels) = &batch.targets else {
        unreachable!("label tasks have one class per sequence")
    };
    let [size, len, classes] = outputs.dims();
    let device = outputs.device();
    copy::cross_entropy(
        outputs.narrow(1, len - 1, 1).reshape([size, classes]),
        class_tensor(labels, &device),
    )
}

/// Metrics of the label tasks: mean cross-entropy, and the accuracy of the last step's class.
pub(crate) fn label_metrics<B: Backend>(outputs: Tensor<B, 3>, batch: &Batch) -> Metrics {
    let Targets::Labels(labels) = &batch.targets else {
        unreachable!("label tasks have one class per sequence")
    };
    let [size, len, classes] = outputs.dims();
    let predicted = outputs
        .clone()
        .narrow(1, len - 1, 1)
        .reshape([size, classes])
        .argmax(1)
        .into_data()
        .convert::<i64>()
        .to_vec::<i64>()
        .expect("argmax indices");
    let hits = predicted.iter().zip(labels).filter(|(p, l)| p == l).count();
    Metrics {
        metric: host_mean(label_losses(outputs, batch)),
        recall_accuracy: Some(hits as f64 / size.max(1) as f64),
    }
}

/// Solved rule of the label tasks: accuracy ≥ 0.99.
pub(crate) fn labelled(metrics: &Metrics) -> bool {
    metrics.recall_accuracy.is_some_and(|a| a >= 0.99)
}

/// The tasks the runner knows; adding a task is one variant here plus its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TaskKind {
    /// [`copy::CopyTask`].
    CopyTask,
    /// [`adding::AddingTask`].
    AddingTask,
    /// [`variable_copy::VariableCopyTask`].
    VariableCopy,
    /// [`selective_copy::SelectiveCopyTask`].
    SelectiveCopy,
    /// [`temporal_order::TemporalOrderTask`] with 2 relevant symbols (experiment 6a).
    TemporalOrder,
    /// [`temporal_order::TemporalOrderTask`] with 3 relevant symbols (experiment 6b).
    #[serde(rename = "temporal-order-3")]
    TemporalOrder3,
    /// [`associative_recall::AssociativeRecallTask`].
    AssociativeRecall,
}

/// The name of a task's length parameter, as a config key and a flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LengthKey {
    /// `delay`: the copy tasks' delay.
    Delay,
    /// `seq-len`: a sequence length.
    SeqLen,
    /// `pairs`: associative recall's number of key-value pairs.
    Pairs,
}

impl LengthKey {
    /// The key as written in configs (`seq-len`).
    pub fn key(self) -> &'static str {
        match self {
            Self::Delay => "delay",
            Self::SeqLen => "seq-len",
            Self::Pairs => "pairs",
        }
    }
}

impl TaskKind {
    /// Every task, in the order of the runner's help.
    pub const ALL: [TaskKind; 7] = [
        Self::CopyTask,
        Self::AddingTask,
        Self::VariableCopy,
        Self::SelectiveCopy,
        Self::TemporalOrder,
        Self::TemporalOrder3,
        Self::AssociativeRecall,
    ];

    /// The task with length parameter `length`.
    pub fn build(self, length: usize) -> AnyTask {
        match self {
            Self::CopyTask => AnyTask::Copy(copy::CopyTask { delay: length }),
            Self::AddingTask => AnyTask::Adding(adding::AddingTask { seq_len: length }),
            Self::VariableCopy => {
                AnyTask::VariableCopy(variable_copy::VariableCopyTask { max_delay: length })
            }
            Self::SelectiveCopy => {
                AnyTask::SelectiveCopy(selective_copy::SelectiveCopyTask { seq_len: length })
            }
            Self::TemporalOrder | Self::TemporalOrder3 => {
                AnyTask::TemporalOrder(temporal_order::TemporalOrderTask {
                    seq_len: length,
                    relevant: if self == Self::TemporalOrder { 2 } else { 3 },
                })
            }
            Self::AssociativeRecall => {
                AnyTask::AssociativeRecall(associative_recall::AssociativeRecallTask {
                    pairs: length,
                })
            }
        }
    }
    /// The task's name.
    pub fn name(self) -> &'static str {
        match self {
            Self::CopyTask => "copy-task",
            Self::AddingTask => "adding-task",
            Self::VariableCopy => "variable-copy",
            Self::SelectiveCopy => "selective-copy",
            Self::TemporalOrder => "temporal-order",
            Self::TemporalOrder3 => "temporal-order-3",
            Self::AssociativeRecall => "associative-recall",
        }
    }
    /// What its length parameter is called.
    pub fn length_key(self) -> LengthKey {
        match self {
            Self::CopyTask | Self::VariableCopy => LengthKey::Delay,
            Self::AssociativeRecall => LengthKey::Pairs,
            _ => LengthKey::SeqLen,
        }
    }
    /// The allowed lengths.
    pub fn length_range(self) -> (usize, usize) {
        match self {
            Self::AssociativeRecall => (1, associative_recall::KEYS),
            Self::SelectiveCopy | Self::TemporalOrder | Self::TemporalOrder3 => (10, 100_000),
            Self::AddingTask => (2, 100_000),
            _ => (1, 100_000),
        }
    }
    /// Default length parameter.
    pub fn default_length(self) -> usize {
        match self {
            Self::AssociativeRecall => 8,
            _ => 100,
        }
    }
    /// Default training steps: the copy tasks' default run takes minutes on 2 cores; the
    /// adding task at T = 100 needs thousands of steps for an LSTM.
    pub fn default_steps(self) -> usize {
        match self {
            Self::CopyTask | Self::VariableCopy | Self::SelectiveCopy => 2000,
            Self::AddingTask => 10_000,
            Self::TemporalOrder | Self::TemporalOrder3 | Self::AssociativeRecall => 5000,
        }
    }
}

/// Any task of the zoo.
#[derive(Debug, Clone)]
pub enum AnyTask {
    /// The copy task.
    Copy(copy::CopyTask),
    /// The adding task.
    Adding(adding::AddingTask),
    /// The variable-delay copy task.
    VariableCopy(variable_copy::VariableCopyTask),
    /// Selective copying.
    SelectiveCopy(selective_copy::SelectiveCopyTask),
    /// The temporal-order problem.
    TemporalOrder(temporal_order::TemporalOrderTask),
    /// Associative recall.
    AssociativeRecall(associative_recall::AssociativeRecallTask),
}

macro_rules! delegate {
    ($self:ident, $t:ident => $e:expr) => {
        match $self {
            AnyTask::Copy($t) => $e,
            AnyTask::Adding($t) => $e,
            AnyTask::VariableCopy($t) => $e,
            AnyTask::SelectiveCopy($t) => $e,
            AnyTask::TemporalOrder($t) => $e,
            AnyTask::AssociativeRecall($t) => $e,
        }
    };
}

impl Task for AnyTask {
    fn name(&self) -> &'static str {
        delegate!(self, t => t.name())
    }
    fn length(&self) -> usize {
        delegate!(self, t => t.length())
    }
    fn input_size(&self) -> usize {
        delegate!(self, t => t.input_size())
    }
    fn output_size(&self) -> usize {
        delegate!(self, t => t.output_size())
    }
    fn batch(&self, size: usize, rng: &mut StdRng) -> Batch {
        delegate!(self, t => t.batch(size, rng))
    }
    fn losses<B: Backend>(&self, outputs: Tensor<B, 3>, batch: &Batch) -> Tensor<B, 1> {
        delegate!(self, t => t.losses(outputs, batch))
    }
    fn evaluate<B: Backend>(&self, outputs: Tensor<B, 3>, batch: &Batch) -> Metrics {
        delegate!(self, t => t.evaluate(outputs, batch))
    }
    fn baseline(&self) -> f64 {
        delegate!(self, t => t.baseline())
    }
    fn solved(&self, metrics: &Metrics) -> bool {
        delegate!(self, t => t.solved(metrics))
    }
    fn metric_name(&self) -> &'static str {
        delegate!(self, t => t.metric_name())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use burn::backend::NdArray;

    /// The symbol of step `t` of sequence `b`, checking that its input row is one-hot.
    pub fn symbol_at(batch: &Batch, b: usize, t: usize) -> usize {
        let start = (b * batch.len + t) * batch.features;
        let row = &batch.inputs[start..start + batch.features];
        assert_eq!(row.iter().sum::<f32>(), 1.0, "one-hot at {b}, {t}");
        row.iter().position(|&v| v == 1.0).unwrap()
    }

    /// A predictor that knows which steps are recall steps but not the symbols there: the
    /// blank where the target is blank, uniform over the data symbols elsewhere.
    pub fn memoryless_recall_logits(batch: &Batch) -> Tensor<NdArray, 3> {
        let Targets::Classes(classes) = &batch.targets else {
            panic!("a recall task")
        };
        let n = copy::DATA_SYMBOLS + 1;
        let mut logits = vec![0.0f32; classes.len() * n];
        for (row, &class) in logits.chunks_mut(n).zip(classes) {
            row[copy::BLANK] = if class == copy::BLANK as i64 {
                1e4
            } else {
                -1e4
            };
        }
        Tensor::from_data(
            TensorData::new(logits, [batch.size, batch.len, n]),
            &Default::default(),
        )
    }

    /// Equal logits over `classes` at every step: chance.
    pub fn chance_logits(batch: &Batch, classes: usize) -> Tensor<NdArray, 3> {
        Tensor::zeros([batch.size, batch.len, classes], &Default::default())
    }

    #[test]
    fn every_task_kind_builds_its_task() {
        for kind in TaskKind::ALL {
            let task = kind.build(kind.default_length());
            assert_eq!(task.name(), kind.name());
            assert_eq!(task.length(), kind.default_length());
            let batch = task.batch(3, &mut step_rng(0, 0));
            assert_eq!(batch.inputs.len(), 3 * batch.len * task.input_size());
        }
    }
}
