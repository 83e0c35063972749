//! Associative recall (as in Ba et al. 2016, "fast weights"): `n` key–value pairs (distinct
//! keys from 26, values from 10 digits), a query marker and one of the keys; the answer is
//! its value, read at the last step. Sequences have `2n + 2` steps.

use burn::tensor::{backend::Backend, Tensor};
use rand::{rngs::StdRng, seq::index::sample, Rng};

use super::{label_losses, label_metrics, labelled, Batch, Metrics, Targets, Task};

/// Keys are symbols `0..KEYS`.
pub const KEYS: usize = 26;
/// Values are symbols `KEYS..KEYS + VALUES`.
pub const VALUES: usize = 10;
const QUERY: usize = KEYS + VALUES;
const SYMBOLS: usize = QUERY + 1;

/// Associative recall over `pairs` key–value pairs (1 to 26).
#[derive(Debug, Clone, Copy)]
pub struct AssociativeRecallTask {
    /// Number of pairs n.
    pub pairs: usize,
}

impl Task for AssociativeRecallTask {
    fn name(&self) -> &'static str {
        "associative-recall"
    }
    fn length(&self) -> usize {
        self.pairs
    }
    fn input_size(&self) -> usize {
        SYMBOLS
    }
    fn output_size(&self) -> usize {
        VALUES
    }
    fn batch(&self, size: usize, rng: &mut StdRng) -> Batch {
        let n = self.pairs.clamp(1, KEYS);
        let len = 2 * n + 2;
        let mut inputs = vec![0.0f32; size * len * SYMBOLS];
        let mut labels = vec![0i64; size];
        for b in 0..size {
            let keys = sample(rng, KEYS, n).into_vec();
            let values: Vec<usize> = (0..n).map(|_| rng.random_range(0..VALUES)).collect();
            let asked = rng.random_range(0..n);
            let mut put = |t: usize, s: usize| inputs[(b * len + t) * SYMBOLS + s] = 1.0;
            for k in 0..n {
                put(2 * k, keys[k]);
                put(2 * k + 1, KEYS + values[k]);
            }
            put(2 * n, QUERY);
            put(2 * n + 1, keys[asked]);
            labels[b] = values[asked] as i64;
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
    /// Chance over the 10 values, `ln 10`: the query key alone says nothing about its value.
    fn baseline(&self) -> f64 {
        (VALUES as f64).ln()
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
        let task = AssociativeRecallTask { pairs: 8 };
        let batch = task.batch(3000, &mut step_rng(11, 0));
        let Targets::Labels(labels) = &batch.targets else {
            panic!()
        };
        assert_eq!(batch.len, 18);
        let mut value_counts = [0usize; VALUES];
        for b in 0..3000 {
            let symbols: Vec<usize> = (0..18).map(|t| symbol_at(&batch, b, t)).collect();
            let keys: Vec<usize> = (0..8).map(|k| symbols[2 * k]).collect();
            assert!(keys.iter().all(|&k| k < KEYS));
            let mut distinct = keys.clone();
            distinct.sort_unstable();
            distinct.dedup();
            assert_eq!(distinct.len(), 8, "keys are distinct");
            assert!((0..8).all(|k| (KEYS..QUERY).contains(&symbols[2 * k + 1])));
            assert_eq!(symbols[16], QUERY);
            let asked = keys
                .iter()
                .position(|&k| k == symbols[17])
                .expect("a stored key");
            assert_eq!(
                labels[b],
                (symbols[2 * asked + 1] - KEYS) as i64,
                "its value"
            );
            value_counts[labels[b] as usize] += 1;
        }
        assert!(
            value_counts.iter().all(|&n| (220..380).contains(&n)),
            "{value_counts:?}"
        );
    }

    #[test]
    fn chance_scores_the_baseline() {
        let task = AssociativeRecallTask { pairs: 5 };
        let batch = task.batch(200, &mut step_rng(12, 0));
        let metrics = task.evaluate(chance_logits(&batch, VALUES), &batch);
        assert!(
            (metrics.metric - task.baseline()).abs() < 1e-5,
            "{metrics:?}"
        );
    }
}
