//! Selective copying (Gu & Dao 2023): 10 data symbols (from 8) scattered at random positions
//! among `T` steps of noise (blanks), then 10 markers at which the model outputs the data
//! symbols in their order. Sequences have `T + 10` steps; unlike the copy task, where the
//! symbols are is different in every sequence.

use burn::tensor::{backend::Backend, Tensor};
use rand::{rngs::StdRng, seq::index::sample};

use super::copy::{
    blank_batch, data_symbol, put, recall_metrics, recalled, step_losses, DATA_SYMBOLS, INPUT_SIZE,
    MARKER, RECALL,
};
use super::{Batch, Metrics, Targets, Task};

/// Selective copying over `seq_len` steps of data and noise (at least 10).
#[derive(Debug, Clone, Copy)]
pub struct SelectiveCopyTask {
    /// The length T of the scattered part.
    pub seq_len: usize,
}

impl Task for SelectiveCopyTask {
    fn name(&self) -> &'static str {
        "selective-copy"
    }
    fn length(&self) -> usize {
        self.seq_len
    }
    fn input_size(&self) -> usize {
        INPUT_SIZE
    }
    fn output_size(&self) -> usize {
        DATA_SYMBOLS + 1
    }
    fn batch(&self, size: usize, rng: &mut StdRng) -> Batch {
        let span = self.seq_len.max(RECALL);
        let len = span + RECALL;
        let (mut inputs, mut targets) = blank_batch(size, len);
        for b in 0..size {
            let mut positions = sample(rng, span, RECALL).into_vec();
            positions.sort_unstable();
            for t in 0..len {
                put(&mut inputs, len, b, t, if t >= span { MARKER } else { 0 });
            }
            for (k, &t) in positions.iter().enumerate() {
                let s = data_symbol(rng);
                inputs[(b * len + t) * INPUT_SIZE] = 0.0;
                put(&mut inputs, len, b, t, s);
                targets[b * len + span + k] = s as i64;
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
        step_losses(outputs, batch)
    }
    fn evaluate<B: Backend>(&self, outputs: Tensor<B, 3>, batch: &Batch) -> Metrics {
        recall_metrics(outputs, batch)
    }
    /// `10·ln 8 / (T + 10)`: blanks right, the 10 recalled symbols at chance.
    fn baseline(&self) -> f64 {
        RECALL as f64 * (DATA_SYMBOLS as f64).ln() / (self.seq_len.max(RECALL) + RECALL) as f64
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
    use crate::task::copy::BLANK;
    use crate::task::step_rng;
    use crate::task::tests::{memoryless_recall_logits, symbol_at};

    #[test]
    fn sequences_follow_the_definition() {
        let task = SelectiveCopyTask { seq_len: 40 };
        let batch = task.batch(1000, &mut step_rng(7, 0));
        let Targets::Classes(targets) = &batch.targets else {
            panic!()
        };
        let len = 50;
        let mut position_counts = vec![0usize; 40];
        for b in 0..1000 {
            let data: Vec<(usize, usize)> = (0..40)
                .map(|t| (t, symbol_at(&batch, b, t)))
                .filter(|&(_, s)| s != BLANK)
                .collect();
            assert_eq!(data.len(), RECALL, "10 data symbols among the noise");
            for &(t, s) in &data {
                assert!((1..=DATA_SYMBOLS).contains(&s));
                position_counts[t] += 1;
            }
            for k in 0..RECALL {
                assert_eq!(symbol_at(&batch, b, 40 + k), MARKER);
                assert_eq!(targets[b * len + 40 + k], data[k].1 as i64, "in order");
            }
            assert!(targets[b * len..b * len + 40]
                .iter()
                .all(|&c| c == BLANK as i64));
        }
        // Positions are uniform: 10 000 symbols over 40 places, 250 each.
        assert!(
            position_counts.iter().all(|&n| (180..320).contains(&n)),
            "{position_counts:?}"
        );
    }

    #[test]
    fn memoryless_predictor_scores_the_baseline() {
        let task = SelectiveCopyTask { seq_len: 30 };
        let batch = task.batch(64, &mut step_rng(8, 0));
        let metrics = task.evaluate(memoryless_recall_logits(&batch), &batch);
        assert!(
            (metrics.metric - task.baseline()).abs() < 1e-4,
            "{metrics:?}"
        );
    }
}
