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
pub(crate) const BLANK: usize = 0;
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
        copy_batch(size, self.seq_len(), rng, |_| self.delay)
    }

    fn losses<B: Backend>(&self, outputs: Tensor<B, 3>, batch: &Batch) -> Tensor<B, 1> {
        step_losses(outputs, batch)
    }

    fn evaluate<B: Backend>(&self, outputs: Tensor<B, 3>, batch: &Batch) -> Metrics {
        recall_metrics(outputs, batch)
    }

    /// `10·ln 8 / (T + 20)`: blanks predicted perfectly, the 10 symbols at chance.
    fn baseline(&self) -> f64 {
        RECALL as f64 * (DATA_SYMBOLS as f64).ln() / self.seq_len() as f64
    }

    fn solved(&self, metrics: &Metrics) -> bool {
        recalled(metrics)
    }

    fn metric_name(&self) -> &'static str {
        "cross-entropy"
    }
}

/// Sequences of `len` steps: 10 data symbols, a delimiter `d` steps after the last of them
/// (`d` from `delay`, drawn per sequence), the 10 symbols as targets right after the
/// delimiter; blanks everywhere else.
pub(crate) fn copy_batch(
    size: usize,
    len: usize,
    rng: &mut StdRng,
    mut delay: impl FnMut(&mut StdRng) -> usize,
) -> Batch {
    let (mut inputs, mut targets) = blank_batch(size, len);
    for b in 0..size {
        let d = delay(rng);
        for t in 0..len {
            let symbol = if t < RECALL {
                let s = data_symbol(rng);
                targets[b * len + RECALL + d + t] = s as i64;
                s
            } else if t == RECALL + d - 1 {
                DELIMITER
            } else {
                BLANK
            };
            put(&mut inputs, len, b, t, symbol);
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

/// Solved rule of the recall tasks: recall accuracy ≥ 0.99.
pub(crate) fn recalled(metrics: &Metrics) -> bool {
    metrics.recall_accuracy.is_some_and(|a| a >= 0.99)
}

/// Cross-entropy at every step of a batch with a class per step.
pub(crate) fn step_losses<B: Backend>(outputs: Tensor<B, 3>, batch: &Batch) -> Tensor<B, 1> {
    let Targets::Classes(classes) = &batch.targets else {
        unreachable!("recall tasks have a class per step")
    };
    let [size, len, classes_n] = outputs.dims();
    let device = outputs.device();
    cross_entropy(
        outputs.reshape([size * len, classes_n]),
        class_tensor(classes, &device),
    )
}

/// Mean cross-entropy over all steps, and the accuracy on the steps whose target is a data
/// symbol (not the blank): the positions that need memory.
pub(crate) fn recall_metrics<B: Backend>(outputs: Tensor<B, 3>, batch: &Batch) -> Metrics {
    let Targets::Classes(classes) = &batch.targets else {
        unreachable!("recall tasks have a class per step")
    };
    let predicted = outputs
        .clone()
        .argmax(2)
        .into_data()
        .convert::<i64>()
        .to_vec::<i64>()
        .expect("argmax indices");
    let (mut hits, mut total) = (0usize, 0usize);
    for (p, c) in predicted.iter().zip(classes) {
        if *c != BLANK as i64 {
            total += 1;
            hits += usize::from(p == c);
        }
    }
    Metrics {
        metric: host_mean(step_losses(outputs, batch)),
        recall_accuracy: Some(hits as f64 / total.max(1) as f64),
    }
}

/// One-hot input rows and blank targets for `size` sequences of `len` steps: what every
/// recall task starts from.
pub(crate) fn blank_batch(size: usize, len: usize) -> (Vec<f32>, Vec<i64>) {
    (
        vec![0.0f32; size * len * INPUT_SIZE],
        vec![BLANK as i64; size * len],
    )
}

/// Sets step `t` of sequence `b` (of `len` steps) to `symbol`, one-hot.
pub(crate) fn put(inputs: &mut [f32], len: usize, b: usize, t: usize, symbol: usize) {
    inputs[(b * len + t) * INPUT_SIZE + symbol] = 1.0;
}

/// A data symbol, uniform over `1..=DATA_SYMBOLS`.
pub(crate) fn data_symbol(rng: &mut StdRng) -> usize {
    rng.random_range(1..=DATA_SYMBOLS)
}

/// The marker input symbol (the copy task's delimiter; the selective copy's recall marker).
pub(crate) const MARKER: usize = DELIMITER;

/// Cross-entropy of each row of `logits [n, classes]` against `targets [n]`.
///
/// Written so that no tensor feeds more than two gradient paths: burn 0.21 accumulates a
/// tensor's incoming gradients in hash-map order, and with three or more the float sum (and
/// so a resumed run) would differ in its last bits from one process to the next.
pub(crate) fn cross_entropy<B: Backend>(
    logits: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
) -> Tensor<B, 1> {
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
