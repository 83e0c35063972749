//! The temporal-order problem (Hochreiter & Schmidhuber 1997, experiments 6a and 6b): a
//! sequence of `T` random distractors (a, b, c, d) framed by start and end symbols (E, B), with
//! 2 (6a) or 3 (6b) relevant symbols, each X or Y, at random steps in fixed windows; the class
//! (4 or 8) is their order (XX, XY, YX, YY, …), read at the last step.

use burn::tensor::{backend::Backend, Tensor};
use rand::{rngs::StdRng, Rng};

use super::{label_losses, label_metrics, labelled, Batch, Metrics, Targets, Task};

const START: usize = 0;
const END: usize = 1;
/// The four distractors a, b, c, d are symbols 2..=5.
const DISTRACTORS: std::ops::RangeInclusive<usize> = 2..=5;
const X: usize = 6;
const Y: usize = 7;
const SYMBOLS: usize = 8;

/// The temporal-order problem over `seq_len` steps with `relevant` (2 or 3) relevant symbols.
#[derive(Debug, Clone, Copy)]
pub struct TemporalOrderTask {
    /// The length T (at least 10).
    pub seq_len: usize,
    /// Relevant symbols: 2 (experiment 6a) or 3 (6b).
    pub relevant: usize,
}

impl TemporalOrderTask {
    /// The windows of the relevant symbols, as fractions of T: the paper's [10, 20] and
    /// [50, 60] for 6a, [10, 20], [33, 43] and [66, 76] for 6b (at T = 100).
    fn windows(&self) -> Vec<(usize, usize)> {
        let fractions: &[(f64, f64)] = match self.relevant {
            2 => &[(0.10, 0.20), (0.50, 0.60)],
            _ => &[(0.10, 0.20), (0.33, 0.43), (0.66, 0.76)],
        };
        let t = self.seq_len as f64;
        fractions
            .iter()
            .map(|&(lo, hi)| (((lo * t) as usize).max(1), ((hi * t) as usize).max(1)))
            .collect()
    }

    fn classes(&self) -> usize {
        1 << self.relevant
    }
}

impl Task for TemporalOrderTask {
    fn name(&self) -> &'static str {
        if self.relevant == 2 {
            "temporal-order"
        } else {
            "temporal-order-3"
        }
    }
    fn length(&self) -> usize {
        self.seq_len
    }
    fn input_size(&self) -> usize {
        SYMBOLS
    }
    fn output_size(&self) -> usize {
        self.classes()
    }
    fn batch(&self, size: usize, rng: &mut StdRng) -> Batch {
        let len = self.seq_len.max(10);
        let windows = self.windows();
        let mut inputs = vec![0.0f32; size * len * SYMBOLS];
        let mut labels = vec![0i64; size];
        for b in 0..size {
            let mut symbols: Vec<usize> = (0..len).map(|_| rng.random_range(DISTRACTORS)).collect();
            symbols[0] = START;
            symbols[len - 1] = END;
            for &(lo, hi) in &windows {
                let relevant = if rng.random::<bool>() { Y } else { X };
                symbols[rng.random_range(lo..=hi)] = relevant;
                labels[b] = 2 * labels[b] + i64::from(relevant == Y);
            }
            for (t, &s) in symbols.iter().enumerate() {
                inputs[(b * len + t) * SYMBOLS + s] = 1.0;
            }
        }
        Batch {
            size,
            len,
            features: SYMBOLS,
            inputs,
            targets: Targets::Labels(labels),
        }
    }
    fn losses<B: Backend>(&self, outputs: Tensor<B, 3>, batch: &Batch) -> Tensor<B, 1> {
        label_losses(outputs, batch)
    }
    fn evaluate<B: Backend>(&self, outputs: Tensor<B, 3>, batch: &Batch) -> Metrics {
        label_metrics(outputs, batch)
    }
    /// Chance: `ln 4` (6a) or `ln 8` (6b); the distractors say nothing about the class.
    fn baseline(&self) -> f64 {
        (self.classes() as f64).ln()
    }
    fn solved(&self, metrics: &Metrics) -> bool {
        labelled(metrics)
    }
    fn metric_name(&self) -> &'static str {
        "cross-entropy"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::step_rng;
    use crate::task::tests::{chance_logits, symbol_at};

    #[test]
    fn sequences_follow_the_definition() {
        for relevant in [2, 3] {
            let task = TemporalOrderTask {
                seq_len: 100,
                relevant,
            };
            let batch = task.batch(2000, &mut step_rng(9, relevant as u64));
            let Targets::Labels(labels) = &batch.targets else {
                panic!()
            };
            let mut class_counts = vec![0usize; task.classes()];
            for (b, &label) in labels.iter().enumerate() {
                let symbols: Vec<usize> = (0..100).map(|t| symbol_at(&batch, b, t)).collect();
                assert_eq!((symbols[0], symbols[99]), (START, END));
                let relevant_at: Vec<usize> = (0..100)
                    .filter(|&t| symbols[t] == X || symbols[t] == Y)
                    .collect();
                assert_eq!(relevant_at.len(), relevant);
                for (&t, &(lo, hi)) in relevant_at.iter().zip(&task.windows()) {
                    assert!((lo..=hi).contains(&t), "{t} outside {lo}..={hi}");
                }
                let class = relevant_at
                    .iter()
                    .fold(0, |c, &t| 2 * c + i64::from(symbols[t] == Y));
                assert_eq!(label, class, "the label is the order");
                class_counts[class as usize] += 1;
                assert!(symbols[1..99]
                    .iter()
                    .all(|s| DISTRACTORS.contains(s) || *s == X || *s == Y));
            }
            let expected = 2000 / task.classes();
            assert!(
                class_counts
                    .iter()
                    .all(|&n| n > expected * 7 / 10 && n < expected * 13 / 10),
                "{class_counts:?}"
            );
        }
        assert_eq!(
            TemporalOrderTask {
                seq_len: 100,
                relevant: 2
            }
            .windows(),
            [(10, 20), (50, 60)]
        );
    }

    #[test]
    fn chance_scores_the_baseline() {
        let task = TemporalOrderTask {
            seq_len: 30,
            relevant: 3,
        };
        let batch = task.batch(100, &mut step_rng(10, 0));
        let metrics = task.evaluate(chance_logits(&batch, 8), &batch);
        assert!(
            (metrics.metric - task.baseline()).abs() < 1e-5,
            "{metrics:?}"
        );
        assert!((metrics.recall_accuracy.unwrap() - 1.0 / 8.0).abs() < 0.1);
    }
}
