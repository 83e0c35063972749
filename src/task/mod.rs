//! Synthetic long-dependency tasks: seeded data generators with their loss, metrics, baseline
//! and solved rule. No training code lives here. Adding a task is one file plus one line in
//! [`TaskKind`].

pub mod adding;
pub mod copy;

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

/// The tasks the runner knows; adding a task is one variant here plus its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TaskKind {
    /// [`copy::CopyTask`].
    CopyTask,
    /// [`adding::AddingTask`].
    AddingTask,
}

impl TaskKind {
    /// The task with length parameter `length`.
    pub fn build(self, length: usize) -> AnyTask {
        match self {
            Self::CopyTask => AnyTask::Copy(copy::CopyTask { delay: length }),
            Self::AddingTask => AnyTask::Adding(adding::AddingTask { seq_len: length }),
        }
    }
    /// The task's name.
    pub fn name(self) -> &'static str {
        match self {
            Self::CopyTask => "copy-task",
            Self::AddingTask => "adding-task",
        }
    }
    /// Default length parameter.
    pub fn default_length(self) -> usize {
        100
    }
    /// Default training steps: the copy task's default run takes minutes on 2 cores; the
    /// adding task at T = 100 needs thousands of steps for an LSTM.
    pub fn default_steps(self) -> usize {
        match self {
            Self::CopyTask => 2000,
            Self::AddingTask => 10_000,
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
}

macro_rules! delegate {
    ($self:ident, $t:ident => $e:expr) => {
        match $self {
            AnyTask::Copy($t) => $e,
            AnyTask::Adding($t) => $e,
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
