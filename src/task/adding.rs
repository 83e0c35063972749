//! The adding problem (Hochreiter & Schmidhuber 1997; Le et al. 2015): `T` numbers from
//! `U[0, 1]`, two of them marked (one in each half); the target is their sum, read at the last
//! step.

use burn::tensor::{backend::Backend, Tensor, TensorData};
use rand::{rngs::StdRng, Rng};

use super::{host_mean, Batch, Metrics, Targets, Task};

/// The adding task over sequences of `seq_len` steps.
#[derive(Debug, Clone, Copy)]
pub struct AddingTask {
    /// The length T.
    pub seq_len: usize,
}

impl AddingTask {
    fn predictions<B: Backend>(outputs: Tensor<B, 3>) -> Tensor<B, 1> {
        let [size, len, _] = outputs.dims();
        outputs.narrow(1, len - 1, 1).reshape([size])
    }
}

impl Task for AddingTask {
    fn name(&self) -> &'static str {
        "adding-task"
    }
    fn length(&self) -> usize {
        self.seq_len
    }
    fn input_size(&self) -> usize {
        2
    }
    fn output_size(&self) -> usize {
        1
    }

    fn batch(&self, size: usize, rng: &mut StdRng) -> Batch {
        let len = self.seq_len;
        let half = len / 2;
        let mut inputs = vec![0.0f32; size * len * 2];
        let mut targets = vec![0.0f32; size];
        for b in 0..size {
            for t in 0..len {
                inputs[(b * len + t) * 2] = rng.random::<f32>();
            }
            let marks = [rng.random_range(0..half), rng.random_range(half..len)];
            for t in marks {
                inputs[(b * len + t) * 2 + 1] = 1.0;
                targets[b] += inputs[(b * len + t) * 2];
            }
        }
        Batch {
            size,
            len,
            features: 2,
            inputs,
            targets: Targets::Values(targets),
        }
    }

    fn losses<B: Backend>(&self, outputs: Tensor<B, 3>, batch: &Batch) -> Tensor<B, 1> {
        let Targets::Values(values) = &batch.targets else {
            unreachable!("the adding task has value targets")
        };
        let device = outputs.device();
        let target =
            Tensor::<B, 1>::from_data(TensorData::new(values.clone(), [values.len()]), &device);
        (Self::predictions(outputs) - target).square()
    }

    fn evaluate<B: Backend>(&self, outputs: Tensor<B, 3>, batch: &Batch) -> Metrics {
        Metrics {
            metric: host_mean(self.losses(outputs, batch)),
            recall_accuracy: None,
        }
    }

    /// Predicting 1 (the mean of the sum) gives the variance of a sum of two `U[0, 1]`: 1/6.
    fn baseline(&self) -> f64 {
        1.0 / 6.0
    }

    fn solved(&self, metrics: &Metrics) -> bool {
        metrics.metric < 0.01
    }

    fn metric_name(&self) -> &'static str {
        "MSE"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::step_rng;
    use burn::backend::NdArray;

    #[test]
    fn sequences_follow_the_definition() {
        let task = AddingTask { seq_len: 40 };
        let batch = task.batch(500, &mut step_rng(3, 0));
        let Targets::Values(targets) = &batch.targets else {
            panic!()
        };
        for (row, target) in batch.inputs.chunks(80).zip(targets) {
            let marked: Vec<usize> = (0..40).filter(|&t| row[t * 2 + 1] == 1.0).collect();
            assert_eq!(marked.len(), 2);
            assert!(marked[0] < 20 && marked[1] >= 20);
            let sum: f32 = marked.iter().map(|&t| row[t * 2]).sum();
            assert!((sum - target).abs() < 1e-6);
            assert!((0..40).all(|t| (0.0..1.0).contains(&row[t * 2])));
        }
    }

    #[test]
    fn predicting_one_scores_the_baseline() {
        let task = AddingTask { seq_len: 20 };
        let batch = task.batch(20_000, &mut step_rng(4, 0));
        let ones = Tensor::<NdArray, 3>::ones([20_000, 20, 1], &Default::default());
        let mse = task.evaluate(ones, &batch).metric;
        assert!((mse - task.baseline()).abs() < 0.005, "{mse}");
    }
}
