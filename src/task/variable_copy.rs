//! The variable-delay copy task (Henaff et al. 2016): the copy task with the delay drawn per
//! sequence, uniformly from `1..=T`. Sequences have `T + 20` steps: 10 symbols from 8, `d − 1`
//! blanks, a delimiter, then the model outputs the 10 symbols; blanks fill the rest. The model
//! must count nothing; it must recall when the delimiter comes.

use burn::tensor::{backend::Backend, Tensor};
use rand::{rngs::StdRng, Rng};

use super::copy::{
    copy_batch, recall_metrics, recalled, step_losses, DATA_SYMBOLS, INPUT_SIZE, RECALL,
};
use super::{Batch, Metrics, Task};

/// The variable-delay copy task with longest delay `max_delay`.
#[derive(Debug, Clone, Copy)]
pub struct VariableCopyTask {
    /// The longest delay T.
    pub max_delay: usize,
}

impl Task for VariableCopyTask {
    fn name(&self) -> &'static str {
        "variable-copy"
    }
    fn length(&self) -> usize {
        self.max_delay
    }
    fn input_size(&self) -> usize {
        INPUT_SIZE
    }
    fn output_size(&self) -> usize {
        DATA_SYMBOLS + 1
    }
    fn batch(&self, size: usize, rng: &mut StdRng) -> Batch {
        let max = self.max_delay;
        copy_batch(size, max + 2 * RECALL, rng, |rng| rng.random_range(1..=max))
    }
    fn losses<B: Backend>(&self, outputs: Tensor<B, 3>, batch: &Batch) -> Tensor<B, 1> {
        step_losses(outputs, batch)
    }
    fn evaluate<B: Backend>(&self, outputs: Tensor<B, 3>, batch: &Batch) -> Metrics {
        recall_metrics(outputs, batch)
    }
    /// As the copy task's: `10·ln 8 / (T + 20)`, blanks right and the symbols at chance (a
    /// predictor that only remembers where the delimiter was, not the symbols).
    fn baseline(&self) -> f64 {
        RECALL as f64 * (DATA_SYMBOLS as f64).ln() / (self.max_delay + 2 * RECALL) as f64
    }
    fn solved(&self, metrics: &Metrics) -> bool {
        recalled(metrics)
    }
    fn metric_name(&self) -> &'static str {
        "cross-entropy"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::copy::{BLANK, MARKER};
    use crate::task::tests::{memoryless_recall_logits, symbol_at};
    use crate::task::{step_rng, Targets};

    #[test]
    fn sequences_follow_the_definition() {
        let task = VariableCopyTask { max_delay: 30 };
        let batch = task.batch(2000, &mut step_rng(5, 0));
        let Targets::Classes(targets) = &batch.targets else {
            panic!()
        };
        let len = 50;
        let mut delays = vec![0usize; 31];
        for b in 0..2000 {
            let delimiters: Vec<usize> = (0..len)
                .filter(|&t| symbol_at(&batch, b, t) == MARKER)
                .collect();
            assert_eq!(delimiters.len(), 1);
            let d = delimiters[0] + 1 - RECALL;
            delays[d] += 1;
            for t in 0..len {
                let s = symbol_at(&batch, b, t);
                let target = targets[b * len + t];
                if t < RECALL {
                    assert!((1..=DATA_SYMBOLS).contains(&s));
                    assert_eq!(
                        targets[b * len + RECALL + d + t],
                        s as i64,
                        "recalled in order"
                    );
                } else if t != delimiters[0] {
                    assert_eq!(s, BLANK);
                }
                let recall = (RECALL + d..2 * RECALL + d).contains(&t);
                assert_eq!(
                    target != BLANK as i64,
                    recall,
                    "targets only after the delimiter"
                );
            }
        }
        // Delays cover 1..=30 about uniformly (2000 / 30 ≈ 67 each).
        assert_eq!(delays[0], 0);
        assert!(
            delays[1..].iter().all(|&n| (30..110).contains(&n)),
            "{delays:?}"
        );
    }

    #[test]
    fn memoryless_predictor_scores_the_baseline() {
        let task = VariableCopyTask { max_delay: 40 };
        let batch = task.batch(64, &mut step_rng(6, 0));
        let metrics = task.evaluate(memoryless_recall_logits(&batch), &batch);
        assert!(
            (metrics.metric - task.baseline()).abs() < 1e-4,
            "{metrics:?}"
        );
    }
}
