//! The copy task (Arjovsky et al. 2016): 10 symbols from 8, `T − 1` blanks, a delimiter, 10
//! blanks; the model outputs blanks for `T + 10` steps, then the 10 symbols.

use burn::tensor::{backend::Backend, Int, Tensor};
use rand::{rngs::StdRng, Rng};

use super::{class_tensor, host_mean, Batch, Metrics, Targets, Task};

/// Symbols to remember.
pub const RECALL: usize = 10;
/// Data symbols, classes 1..=8 (0 is the blank).
pub const DATA_SYMBOLS: usize = 8;
/// Input one-hot width: blank, 8 data symbols, delimiter.
pub const INPUT_SIZE: usize = DATA_SYMBOLS + 2;
const BLANK: usize = 0;
const DELIMITER: usize = DATA_SYMBOLS + 1;

/// The copy task with delay `delay` (sequences of `delay + 20` steps).
#[derive(Debug, Clone, Copy)]
pub struct CopyTask {
    /// The delay T.
    pub delay: usize,
}

impl CopyTask {
    /// Steps per sequence.
    pub fn seq_len(&self) -> usize {
        self.delay + 2 * RECALL
    }
}

impl Task for CopyTask {
    fn name(&self) -> &'static str {
        "copy-task"
    }
    fn length(&self) -> usize {
        self.delay
    }
    fn input_size(&self) -> usize {
        INPUT_SIZE
    }
    fn output_size(&self) -> usize {
        DATA_SYMBOLS + 1
    }

    fn batch(&self, size: usize, rng: &mut StdRng) -> Batch {
        let len = self.seq_len();
        let mut inputs = vec![0.0f32; size * len * INPUT_SIZE];
        let mut targets = vec![BLANK as i64; size * len];
        let delimiter_at = RECALL + self.delay - 1;
        for b in 0..size {
            let mut one_hot =
                |t: usize, symbol: usize| inputs[(b * len + t) * INPUT_SIZE + symbol] = 1.0;
            for t in 0..len {
                let symbol = if t < RECALL {
                    let s = rng.random_range(1..=DATA_SYMBOLS);
                    targets[b * len + len - RECALL + t] = s as i64;
                    s
                } else if t == delimiter_at {
                    DELIMITER
                } else {
                    BLANK
                };
                one_hot(t, symbol);
            }
        }
        Batch {
            size,
            len,
            features: INPUT_SIZE,
            inputs,
            targets: Targets::Classes(targets),
        }
    }

    fn losses<B: Backend>(&self, outputs: Tensor<B, 3>, batch: &Batch) -> Tensor<B, 1> {
        let Targets::Classes(classes) = &batch.targets else {
            unreachable!("the copy task has class targets")
        };
        let [size, len, classes_n] = outputs.dims();
        let device = outputs.device();
        cross_entropy(
            outputs.reshape([size * len, classes_n]),
            class_tensor(classes, &device),
        )
    }

    fn evaluate<B: Backend>(&self, outputs: Tensor<B, 3>, batch: &Batch) -> Metrics {
        let Targets::Classes(classes) = &batch.targets else {
            unreachable!("the copy task has class targets")
        };
        let [size, len, _] = outputs.dims();
        let predicted = outputs
            .clone()
            .narrow(1, len - RECALL, RECALL)
            .argmax(2)
            .into_data()
            .convert::<i64>()
            .to_vec::<i64>()
            .expect("argmax indices");
        let correct = (0..size)
            .flat_map(|b| (0..RECALL).map(move |k| (b, k)))
            .filter(|&(b, k)| predicted[b * RECALL + k] == classes[b * len + len - RECALL + k])
            .count();
        let ce = host_mean(self.losses(outputs, batch));
        Metrics {
            metric: ce,
            recall_accuracy: Some(correct as f64 / (size * RECALL) as f64),
        }
    }

    /// `10·ln 8 / (T + 20)`: blanks predicted perfectly, the 10 symbols at chance.
    fn baseline(&self) -> f64 {
        RECALL as f64 * (DATA_SYMBOLS as f64).ln() / self.seq_len() as f64
    }

    fn solved(&self, metrics: &Metrics) -> bool {
        metrics.recall_accuracy.is_some_and(|a| a >= 0.99)
    }

    fn metric_name(&self) -> &'static str {
        "cross-entropy"
    }
}

/// Cross-entropy of each row of `logits [n, classes]` against `targets [n]`.
///
/// Written so that no tensor feeds more than two gradient paths: burn 0.21 accumulates a
/// tensor's incoming gradients in hash-map order, and with three or more the float sum (and
/// so a resumed run) would differ in its last bits from one process to the next.
fn cross_entropy<B: Backend>(logits: Tensor<B, 2>, targets: Tensor<B, 1, Int>) -> Tensor<B, 1> {
    let [n, _] = logits.dims();
    let max = logits.clone().detach().max_dim(1);
    let shifted = logits - max;
    let log_norm = shifted.clone().exp().sum_dim(1).log();
    let log_probs = shifted - log_norm;
    log_probs
        .gather(1, targets.reshape([n, 1]))
        .neg()
        .reshape([n])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::step_rng;

    #[test]
    fn sequences_follow_the_definition() {
        let task = CopyTask { delay: 30 };
        let batch = task.batch(200, &mut step_rng(1, 0));
        let Targets::Classes(targets) = &batch.targets else {
            panic!()
        };
        let len = task.seq_len();
        assert_eq!(len, 50);
        let mut counts = [0usize; DATA_SYMBOLS + 1];
        for b in 0..200 {
            let symbol_at = |t: usize| {
                let row = &batch.inputs[(b * len + t) * INPUT_SIZE..(b * len + t + 1) * INPUT_SIZE];
                assert_eq!(row.iter().sum::<f32>(), 1.0, "one-hot");
                row.iter().position(|&v| v == 1.0).unwrap()
            };
            for t in 0..len {
                let s = symbol_at(t);
                match t {
                    0..RECALL => {
                        assert!((1..=DATA_SYMBOLS).contains(&s));
                        assert_eq!(
                            targets[b * len + len - RECALL + t],
                            s as i64,
                            "recall target"
                        );
                        counts[s] += 1;
                    }
                    t if t == RECALL + 30 - 1 => assert_eq!(s, DELIMITER),
                    _ => assert_eq!(s, BLANK),
                }
                if t < len - RECALL {
                    assert_eq!(targets[b * len + t], BLANK as i64);
                }
            }
        }
        // Symbols are roughly uniform: 2000 draws, 250 expected each.
        assert!(
            counts[1..].iter().all(|&c| (180..320).contains(&c)),
            "{counts:?}"
        );
    }

    #[test]
    fn memoryless_predictor_scores_the_baseline() {
        use burn::backend::NdArray;
        let task = CopyTask { delay: 100 };
        assert!((task.baseline() - 0.1733).abs() < 1e-4);
        // Certain blanks for T + 10 steps, uniform over the 8 symbols for the last 10.
        let batch = task.batch(50, &mut step_rng(2, 0));
        let len = task.seq_len();
        let mut logits = vec![0.0f32; 50 * len * 9];
        for b in 0..50 {
            for t in 0..len {
                let row = &mut logits[(b * len + t) * 9..(b * len + t + 1) * 9];
                if t < len - RECALL {
                    row[0] = 1e4;
                } else {
                    row[0] = -1e4;
                }
            }
        }
        let outputs = Tensor::<NdArray, 3>::from_data(
            burn::tensor::TensorData::new(logits, [50, len, 9]),
            &Default::default(),
        );
        let metrics = task.evaluate(outputs, &batch);
        assert!(
            (metrics.metric - task.baseline()).abs() < 1e-4,
            "{metrics:?}"
        );
    }
}
