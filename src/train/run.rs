//! One training run (one cell, one seed): the loop, evaluation, metrics log, checkpoints,
//! resumption and the NaN stop.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::{AutodiffModule, Module};
use burn::optim::GradientsParams;
use burn::record::{BinBytesRecorder, FullPrecisionSettings, Recorder};
use burn::tensor::backend::AutodiffBackend;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use super::config::{ExperimentConfig, InitKind};
use super::model::{chrono_init, clip_global_norm, AnyOptimizer, SequenceModel};
use crate::cell::AnyCellConfig;
use crate::import::write_atomically;
use crate::layer::RnnLayerConfig;
use crate::ops::RnnBackend;
use rand::RngCore;

use crate::task::{eval_rng, host_mean, step_rng, AnyTask, Batch, Metrics, Task};

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MetricsLine {
    /// Training step.
    pub step: usize,
    /// Seconds of training so far (across resumptions).
    pub wall_time_s: f64,
    /// Training loss of this step's batch.
    pub train_loss: f64,
    /// The task's metric on the held-out set.
    pub eval_metric: f64,
    /// Recall accuracy on the held-out set, where the task has one.
    pub recall_accuracy: Option<f64>,
    /// The task's memoryless baseline.
    pub baseline: f64,
}

/// `summary.json` of a finished run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunSummary {
    /// Task name.
    pub task: String,
    /// Task length parameter.
    pub length: usize,
    /// Cell name.
    pub cell: String,
    /// Seed.
    pub seed: u64,
    /// Trainable parameters.
    pub parameters: usize,
    /// Backend.
    pub backend: String,
    /// Steps trained.
    pub steps: usize,
    /// Metric at the last evaluation.
    pub final_metric: f64,
    /// Best metric seen.
    pub best_metric: f64,
    /// Recall accuracy at the last evaluation, where the task has one.
    pub final_recall_accuracy: Option<f64>,
    /// The task's baseline.
    pub baseline: f64,
    /// First evaluated step at which the task counted as solved.
    pub solved_at: Option<usize>,
    /// Seconds of training.
    pub wall_time_s: f64,
}

/// Everything needed to continue a run exactly.
#[derive(Serialize, Deserialize)]
struct Checkpoint {
    step: usize,
    wall_time_s: f64,
    best_metric: Option<f64>,
    solved_at: Option<usize>,
    model: Vec<u8>,
    optimizer: Vec<u8>,
}

fn checkpoint_path(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoint").join("checkpoint.mpk")
}

fn io_error(path: &Path, e: impl std::fmt::Display) -> String {
    format!("cannot write {}: {e}", path.display())
}

/// Writes `value` as pretty JSON, atomically.
pub fn write_json(path: &Path, value: &impl Serialize) -> Result<(), String> {
    let text = serde_json::to_string_pretty(value).map_err(|e| e.to_string())?;
    write_atomically(path, text.as_bytes()).map_err(|e| e.to_string())
}

/// Evaluates on the held-out set in chunks (to bound memory), averaging the metrics.
fn evaluate<B: RnnBackend>(
    task: &AnyTask,
    model: &SequenceModel<B>,
    eval: &[Batch],
    device: &B::Device,
) -> Metrics {
    let total: usize = eval.iter().map(|b| b.size).sum();
    let mut metric = 0.0;
    let mut recall = None;
    for chunk in eval {
        let m = task.evaluate(model.forward(chunk.input_tensor(device)), chunk);
        let weight = chunk.size as f64 / total as f64;
        metric += m.metric * weight;
        if let Some(a) = m.recall_accuracy {
            *recall.get_or_insert(0.0) += a * weight;
        }
    }
    Metrics {
        metric,
        recall_accuracy: recall,
    }
}

/// Keeps the first `step`-bounded lines of a metrics log (those before the checkpoint).
fn truncate_metrics(path: &Path, up_to_step: usize) -> Result<(), String> {
    if !path.exists() {
        return Ok(());
    }
    let file = File::open(path).map_err(|e| io_error(path, e))?;
    let kept: Vec<String> = BufReader::new(file)
        .lines()
        .map_while(Result::ok)
        .filter(|line| {
            serde_json::from_str::<MetricsLine>(line).is_ok_and(|m| m.step <= up_to_step)
        })
        .collect();
    let text: String = kept.iter().map(|l| format!("{l}\n")).collect();
    write_atomically(path, text.as_bytes()).map_err(|e| e.to_string())
}

fn progress_bar(steps: usize, start: usize, label: &str) -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = ProgressBar::new(steps as u64);
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} {per_sec} ETA {eta}")
            .expect("template")
            .progress_chars("=> "),
    );
    bar.set_prefix(label.to_string());
    bar.set_position(start as u64);
    Some(bar)
}

/// Test hooks: `RNN_ZOO_FAULT_NAN_AT_STEP=N` makes step N's loss NaN (to test the NaN stop),
/// `RNN_ZOO_FAULT_PANIC_AT_STEP=N` panics at step N (to test how a panic is reported).
fn injected(fault: &str, step: usize) -> bool {
    std::env::var(format!("RNN_ZOO_FAULT_{fault}_AT_STEP"))
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        == Some(step)
}

/// Runs `f`, turning a panic into an error: burn's recorder panics on some malformed bytes
/// (a checkpoint of another version of the model, a damaged file) instead of returning one.
fn without_panics<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    std::panic::set_hook(hook);
    result.map_err(|panic| crate::backend::panic_message(panic.as_ref()))
}

/// Trains `cell` with `seed` under `config` in its run folder, resuming from its checkpoint if
/// there is one. Returns the summary (also written to `summary.json`).
pub fn train_run<B: AutodiffBackend + RnnBackend>(
    config: &ExperimentConfig,
    cell: &str,
    seed: u64,
    device: &B::Device,
    backend: &str,
) -> Result<RunSummary, String>
where
    B::InnerBackend: RnnBackend,
{
    let run_dir = config.run_dir(cell, seed);
    fs::create_dir_all(run_dir.join("checkpoint")).map_err(|e| io_error(&run_dir, e))?;
    let task = config.task.build(config.length);
    let mut run_config = config.clone();
    run_config.cell = vec![cell.to_string()];
    run_config.seed = vec![seed];
    write_json(&run_dir.join("config.json"), &run_config)?;

    B::seed(device, seed);
    let cell_config = AnyCellConfig::named(cell, task.input_size(), config.hidden)?;
    let layer_config = RnnLayerConfig::new(cell_config)
        .with_num_layers(config.layers)
        .with_recurrent_dropout(config.recurrent_dropout)
        .with_zoneout(config.zoneout);
    let noisy = config.recurrent_dropout > 0.0 || config.zoneout > 0.0;
    let mut model = SequenceModel::<B>::new(&layer_config, task.output_size(), device);
    if config.init == InitKind::Chrono {
        let t_max = task.batch(1, &mut eval_rng(seed)).len;
        model = chrono_init(model, cell, t_max, seed)?;
    }
    let parameters = model.num_params();
    let mut optim = AnyOptimizer::<B>::new(config.optimizer);
    let mut eval_rng = eval_rng(seed);
    let chunk = 250.min(config.eval_size);
    let eval: Vec<Batch> = (0..config.eval_size.div_ceil(chunk))
        .map(|i| task.batch(chunk.min(config.eval_size - i * chunk), &mut eval_rng))
        .collect();

    let recorder = BinBytesRecorder::<FullPrecisionSettings>::default();
    let mut start = 0;
    let mut wall_before = 0.0;
    let mut best: Option<f64> = None;
    let mut solved_at = None;
    let ckpt_path = checkpoint_path(&run_dir);
    if ckpt_path.exists() {
        let bytes = fs::read(&ckpt_path).map_err(|e| io_error(&ckpt_path, e))?;
        // The detail is the decoder's own (often a panic message from burn's recorder): lead
        // with what to do about it.
        let unusable = |e: String| {
            format!(
                "corrupt or incompatible checkpoint {} (another cell or config, or an older \
                 rnn-zoo; delete the run's folder to start it again): {e}",
                ckpt_path.display()
            )
        };
        let ckpt: Checkpoint =
            rmp_serde::from_slice(&bytes).map_err(|e| unusable(e.to_string()))?;
        let record = without_panics(|| recorder.load(ckpt.model, device))
            .and_then(|r| r.map_err(|e| e.to_string()))
            .map_err(unusable)?;
        model = without_panics(|| model.load_record(record)).map_err(unusable)?;
        optim = without_panics(|| optim.load_bytes(ckpt.optimizer, device))
            .and_then(|r| r)
            .map_err(unusable)?;
        start = ckpt.step;
        wall_before = ckpt.wall_time_s;
        best = ckpt.best_metric;
        solved_at = ckpt.solved_at;
    }
    let metrics_path = run_dir.join("metrics.jsonl");
    truncate_metrics(&metrics_path, start)?;
    let mut metrics_file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .map_err(|e| io_error(&metrics_path, e))?;

    let label = format!("{cell} s{seed}");
    let bar = progress_bar(config.steps, start, &label);
    let clock = Instant::now();
    let elapsed = || wall_before + clock.elapsed().as_secs_f64();
    let mut last = None;
    let mut last_checkpoint = start;
    for step in start + 1..=config.steps {
        let batch = task.batch(config.batch_size, &mut step_rng(seed, step as u64));
        if noisy {
            // The step's recurrent noise depends on (seed, step) alone, so that a resumed run
            // draws what the uninterrupted one did.
            B::seed(device, step_rng(!seed, step as u64).next_u64());
        }
        let losses = task.losses(model.forward(batch.input_tensor(device)), &batch);
        let mut loss_value = host_mean(losses.clone());
        let loss = losses.mean();
        if injected("NAN", step) {
            loss_value = f64::NAN;
        }
        assert!(!injected("PANIC", step), "injected fault at step {step}");
        if !loss_value.is_finite() {
            if let Some(bar) = &bar {
                bar.abandon();
            }
            return Err(format!(
                "non-finite loss ({loss_value}) at step {step} of {cell} seed {seed}; stopped, the last good checkpoint (step {last_checkpoint}) is kept in {}",
                run_dir.join("checkpoint").display()
            ));
        }
        let mut grads = GradientsParams::from_grads(loss.backward(), &model);
        clip_global_norm(&model, &mut grads, config.clip);
        model = optim.step(config.lr, model, grads);
        model.rnn = model.rnn.constrain_recurrent(batch.len);

        if step % config.eval_every == 0 || step == config.steps {
            let metrics = evaluate(&task, &model.valid(), &eval, device);
            let line = MetricsLine {
                step,
                wall_time_s: elapsed(),
                train_loss: loss_value,
                eval_metric: metrics.metric,
                recall_accuracy: metrics.recall_accuracy,
                baseline: task.baseline(),
            };
            writeln!(
                metrics_file,
                "{}",
                serde_json::to_string(&line).map_err(|e| e.to_string())?
            )
            .map_err(|e| io_error(&metrics_path, e))?;
            best = Some(best.map_or(metrics.metric, |b: f64| b.min(metrics.metric)));
            if solved_at.is_none() && task.solved(&metrics) {
                solved_at = Some(step);
            }
            let recall = metrics
                .recall_accuracy
                .map(|a| format!(" recall {a:.3}"))
                .unwrap_or_default();
            let message = format!(
                "loss {loss_value:.4} eval {} {:.4} (baseline {:.4}){recall}",
                task.metric_name(),
                metrics.metric,
                task.baseline()
            );
            match &bar {
                Some(bar) => bar.set_message(message),
                None => eprintln!(
                    "{label} step {step}/{}: {message} [{:.0}s]",
                    config.steps,
                    elapsed()
                ),
            }
            last = Some(metrics);
        }
        if step % config.checkpoint_every == 0 || step == config.steps {
            let ckpt = Checkpoint {
                step,
                wall_time_s: elapsed(),
                best_metric: best,
                solved_at,
                model: recorder
                    .record(model.clone().into_record(), ())
                    .map_err(|e| e.to_string())?,
                optimizer: optim.to_bytes()?,
            };
            let bytes = rmp_serde::to_vec(&ckpt).map_err(|e| e.to_string())?;
            write_atomically(&ckpt_path, &bytes).map_err(|e| e.to_string())?;
            last_checkpoint = step;
        }
        if let Some(bar) = &bar {
            bar.set_position(step as u64);
        }
    }
    if let Some(bar) = &bar {
        bar.finish();
    }
    let last = match last {
        Some(m) => m,
        None => evaluate(&task, &model.valid(), &eval, device),
    };
    let summary = RunSummary {
        task: task.name().to_string(),
        length: task.length(),
        cell: cell.to_string(),
        seed,
        parameters,
        backend: backend.to_string(),
        steps: config.steps,
        final_metric: last.metric,
        best_metric: best.unwrap_or(last.metric),
        final_recall_accuracy: last.recall_accuracy,
        baseline: task.baseline(),
        solved_at,
        wall_time_s: elapsed(),
    };
    write_json(&run_dir.join("summary.json"), &summary)?;
    Ok(summary)
}
