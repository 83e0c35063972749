//! The resolved configuration of an experiment: defaults, then a TOML file, then flags; every
//! value checked against its allowed range.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::cell::{cell_names, AnyCellConfig};
use crate::task::{LengthKey, TaskKind};

/// Optimiser, with PyTorch's defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum OptimizerKind {
    /// Adam (β = 0.9, 0.999; ε = 1e-8).
    Adam,
    /// RMSprop (α = 0.99, ε = 1e-8, no momentum).
    Rmsprop,
}

/// Initialisation of the gate biases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum InitKind {
    /// The cells' own initialisation (LSTM forget bias 1).
    Default,
    /// Chrono initialisation (Tallec & Ollivier 2018) of the gated cells.
    Chrono,
}

/// Everything a comparison needs, resolved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ExperimentConfig {
    /// The task.
    pub task: TaskKind,
    /// Its length parameter (the copy task's delay, the adding task's sequence length).
    pub length: usize,
    /// Cells to compare.
    pub cell: Vec<String>,
    /// Training steps per run.
    pub steps: usize,
    /// Sequences per training batch.
    pub batch_size: usize,
    /// Hidden units.
    pub hidden: usize,
    /// Stacked layers.
    pub layers: usize,
    /// Learning rate.
    pub lr: f64,
    /// Optimiser.
    pub optimizer: OptimizerKind,
    /// Global gradient-norm clipping threshold (0 = off).
    pub clip: f64,
    /// Gate-bias initialisation.
    pub init: InitKind,
    /// Variational dropout of the recurrent state (0 = off).
    #[serde(default)]
    pub recurrent_dropout: f64,
    /// Zoneout probability (0 = off).
    #[serde(default)]
    pub zoneout: f64,
    /// Steps between evaluations.
    pub eval_every: usize,
    /// Steps between checkpoints.
    pub checkpoint_every: usize,
    /// Sequences in the held-out set.
    pub eval_size: usize,
    /// Seeds; each cell runs once per seed.
    pub seed: Vec<u64>,
    /// Worker threads.
    pub threads: usize,
    /// Output folder.
    pub out: PathBuf,
}

/// Optional values from a TOML file or from flags, merged over the defaults.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Overrides {
    /// Copy task delay.
    pub delay: Option<usize>,
    /// Sequence length (adding, selective copy, temporal order).
    pub seq_len: Option<usize>,
    /// Key-value pairs (associative recall).
    pub pairs: Option<usize>,
    /// Cells: a name, `all`, or a comma list.
    pub cell: Option<String>,
    /// See [`ExperimentConfig::steps`].
    pub steps: Option<usize>,
    /// See [`ExperimentConfig::batch_size`].
    pub batch_size: Option<usize>,
    /// See [`ExperimentConfig::hidden`].
    pub hidden: Option<usize>,
    /// See [`ExperimentConfig::layers`].
    pub layers: Option<usize>,
    /// See [`ExperimentConfig::lr`].
    pub lr: Option<f64>,
    /// See [`ExperimentConfig::optimizer`].
    pub optimizer: Option<OptimizerKind>,
    /// See [`ExperimentConfig::clip`].
    pub clip: Option<f64>,
    /// See [`ExperimentConfig::init`].
    pub init: Option<InitKind>,
    /// See [`ExperimentConfig::recurrent_dropout`].
    pub recurrent_dropout: Option<f64>,
    /// See [`ExperimentConfig::zoneout`].
    pub zoneout: Option<f64>,
    /// See [`ExperimentConfig::eval_every`].
    pub eval_every: Option<usize>,
    /// See [`ExperimentConfig::checkpoint_every`].
    pub checkpoint_every: Option<usize>,
    /// See [`ExperimentConfig::eval_size`].
    pub eval_size: Option<usize>,
    /// Seeds: one or a comma list.
    pub seed: Option<String>,
    /// See [`ExperimentConfig::threads`].
    pub threads: Option<usize>,
    /// See [`ExperimentConfig::out`].
    pub out: Option<PathBuf>,
}

impl Overrides {
    /// Parses a TOML file's text; unknown keys are errors naming them.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim().replace('\n', " "))
    }

    /// The length parameter under `key`.
    pub fn length(&self, key: LengthKey) -> Option<usize> {
        match key {
            LengthKey::Delay => self.delay,
            LengthKey::SeqLen => self.seq_len,
            LengthKey::Pairs => self.pairs,
        }
    }

    /// Only the length parameter of `task`, set to `length`.
    pub fn with_length(task: TaskKind, length: Option<usize>) -> Self {
        let mut overrides = Self::default();
        match task.length_key() {
            LengthKey::Delay => overrides.delay = length,
            LengthKey::SeqLen => overrides.seq_len = length,
            LengthKey::Pairs => overrides.pairs = length,
        }
        overrides
    }

    /// `other`'s values where it has them, else ours.
    pub fn then(self, other: Overrides) -> Overrides {
        macro_rules! pick {
            ($($f:ident),*) => { Overrides { $($f: other.$f.or(self.$f)),* } };
        }
        pick!(
            delay,
            seq_len,
            pairs,
            cell,
            steps,
            batch_size,
            hidden,
            layers,
            lr,
            optimizer,
            clip,
            init,
            recurrent_dropout,
            zoneout,
            eval_every,
            checkpoint_every,
            eval_size,
            seed,
            threads,
            out
        )
    }
}

fn in_range<T: PartialOrd + std::fmt::Display>(
    key: &str,
    value: T,
    lo: T,
    hi: T,
) -> Result<T, String> {
    if value >= lo && value <= hi {
        Ok(value)
    } else {
        Err(format!(
            "{key} = {value} is out of range (allowed {lo}..={hi})"
        ))
    }
}

/// The cells a `--cell` value names.
pub fn parse_cells(value: &str) -> Result<Vec<String>, String> {
    if value.trim() == "all" {
        return Ok(cell_names().into_iter().map(String::from).collect());
    }
    let cells: Vec<String> = value.split(',').map(|s| s.trim().to_string()).collect();
    for cell in &cells {
        AnyCellConfig::named(cell, 1, 1).map_err(|e| format!("cell: {e}"))?;
    }
    Ok(cells)
}

fn parse_seeds(value: &str) -> Result<Vec<u64>, String> {
    value
        .split(',')
        .map(|s| {
            s.trim()
                .parse()
                .map_err(|_| format!("seed = '{s}' is not a non-negative integer"))
        })
        .collect()
}

impl ExperimentConfig {
    /// Defaults for `task`, then `overrides`, checked.
    pub fn resolve(task: TaskKind, overrides: Overrides) -> Result<Self, String> {
        let o = overrides;
        let length_key = task.length_key();
        let other = [LengthKey::Delay, LengthKey::SeqLen, LengthKey::Pairs]
            .into_iter()
            .find(|&k| k != length_key && o.length(k).is_some());
        if let Some(key) = other {
            return Err(format!(
                "{} does not apply to {} (use {})",
                key.key(),
                task.name(),
                length_key.key()
            ));
        }
        let (min_length, max_length) = task.length_range();
        let config = Self {
            task,
            length: in_range(
                length_key.key(),
                o.length(length_key).unwrap_or(task.default_length()),
                min_length,
                max_length,
            )?,
            cell: parse_cells(o.cell.as_deref().unwrap_or("gru"))?,
            steps: in_range(
                "steps",
                o.steps.unwrap_or(task.default_steps()),
                1,
                100_000_000,
            )?,
            batch_size: in_range("batch-size", o.batch_size.unwrap_or(50), 1, 65_536)?,
            hidden: in_range("hidden", o.hidden.unwrap_or(128), 1, 65_536)?,
            layers: in_range("layers", o.layers.unwrap_or(1), 1, 64)?,
            lr: in_range("lr", o.lr.unwrap_or(1e-3), 1e-9, 10.0)?,
            optimizer: o.optimizer.unwrap_or(OptimizerKind::Adam),
            clip: in_range("clip", o.clip.unwrap_or(1.0), 0.0, 1e9)?,
            init: o.init.unwrap_or(InitKind::Default),
            recurrent_dropout: in_range(
                "recurrent-dropout",
                o.recurrent_dropout.unwrap_or(0.0),
                0.0,
                0.95,
            )?,
            zoneout: in_range("zoneout", o.zoneout.unwrap_or(0.0), 0.0, 0.95)?,
            eval_every: in_range("eval-every", o.eval_every.unwrap_or(100), 1, 100_000_000)?,
            checkpoint_every: in_range(
                "checkpoint-every",
                o.checkpoint_every.unwrap_or(500),
                1,
                100_000_000,
            )?,
            eval_size: in_range("eval-size", o.eval_size.unwrap_or(1000), 1, 1_000_000)?,
            seed: parse_seeds(o.seed.as_deref().unwrap_or("0"))?,
            threads: in_range("threads", o.threads.unwrap_or(2), 1, 1024)?,
            out: o.out.unwrap_or_else(|| {
                let stamp = chrono::Local::now().format("%Y%m%d-%H%M%S");
                PathBuf::from(format!("runs/{}-{stamp}", task.name()))
            }),
        };
        if config.init == InitKind::Chrono {
            let ungated = ["rnn", "rnn-relu", "irnn", "indrnn"];
            if let Some(cell) = config.cell.iter().find(|c| ungated.contains(&c.as_str())) {
                return Err(format!(
                    "init = chrono needs gated cells; {cell} has no gates"
                ));
            }
        }
        Ok(config)
    }

    /// The run folder of one cell and seed.
    pub fn run_dir(&self, cell: &str, seed: u64) -> PathBuf {
        self.out.join(format!("{cell}-s{seed}"))
    }
}
