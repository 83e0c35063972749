//! The comparison across cells: running every cell and seed, `results.md`, `results.csv` and
//! the learning-curve plot `curves.svg` / `curves.png`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use burn::tensor::backend::AutodiffBackend;

use super::config::ExperimentConfig;
use super::run::{train_run, write_json, MetricsLine, RunSummary};
use crate::import::write_atomically;
use crate::ops::RnnBackend;
use crate::plot::{write_curves, Curve, CurveFigure};

/// Runs every cell and seed of `config` (runs whose `summary.json` exists are kept as they
/// are), then writes the comparison. Returns the summaries.
pub fn run_experiment<B: AutodiffBackend + RnnBackend>(
    config: &ExperimentConfig,
    device: &B::Device,
    backend: &str,
) -> Result<Vec<RunSummary>, String>
where
    B::InnerBackend: RnnBackend,
{
    fs::create_dir_all(&config.out)
        .map_err(|e| format!("cannot create output folder {}: {e}", config.out.display()))?;
    write_json(&config.out.join("experiment.json"), config)?;
    let mut summaries = Vec::new();
    for cell in &config.cell {
        for &seed in &config.seed {
            let done = config.run_dir(cell, seed).join("summary.json");
            let summary = match fs::read_to_string(&done)
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok())
            {
                Some(summary) => summary,
                None => train_run::<B>(config, cell, seed, device, backend)?,
            };
            summaries.push(summary);
        }
    }
    write_report(config, &summaries)?;
    Ok(summaries)
}

/// One row of the comparison: a cell over its seeds.
#[derive(Debug, Clone)]
pub struct CellRow {
    /// Cell name.
    pub cell: String,
    /// Trainable parameters.
    pub parameters: usize,
    /// Mean final metric over seeds.
    pub final_metric: f64,
    /// `final_metric / baseline`.
    pub ratio_to_baseline: f64,
    /// Mean final recall accuracy, where the task has one.
    pub recall_accuracy: Option<f64>,
    /// Solved-at step per seed (`None` = not solved).
    pub solved_at: Vec<Option<usize>>,
    /// Mean minutes per run.
    pub minutes: f64,
}

/// Aggregates run summaries by cell, in the order of `config.cell`.
pub fn rows(config: &ExperimentConfig, summaries: &[RunSummary]) -> Vec<CellRow> {
    config
        .cell
        .iter()
        .filter_map(|cell| {
            let runs: Vec<&RunSummary> = summaries.iter().filter(|s| &s.cell == cell).collect();
            let n = runs.len() as f64;
            let first = runs.first()?;
            let mean = |f: &dyn Fn(&RunSummary) -> f64| runs.iter().map(|s| f(s)).sum::<f64>() / n;
            let final_metric = mean(&|s| s.final_metric);
            Some(CellRow {
                cell: cell.clone(),
                parameters: first.parameters,
                final_metric,
                ratio_to_baseline: final_metric / first.baseline,
                recall_accuracy: first
                    .final_recall_accuracy
                    .map(|_| mean(&|s| s.final_recall_accuracy.unwrap_or(0.0))),
                solved_at: runs.iter().map(|s| s.solved_at).collect(),
                minutes: mean(&|s| s.wall_time_s) / 60.0,
            })
        })
        .collect()
}

fn solved_text(solved: &[Option<usize>]) -> String {
    solved
        .iter()
        .map(|s| s.map_or("-".to_string(), |v| v.to_string()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The comparison as a markdown table.
pub fn markdown(
    config: &ExperimentConfig,
    rows: &[CellRow],
    baseline: f64,
    metric: &str,
) -> String {
    let mut md = format!(
        "# {} (length {}), {} steps, batch {}, hidden {}, {} layer(s), seeds {:?}\n\n\
         Baseline {metric}: {baseline:.4} (memoryless predictor). Beats it: ratio ≤ 0.9.\n\n\
         | cell | parameters | final {metric} | ratio to baseline | recall accuracy | solved at step (per seed) | minutes per run |\n\
         |---|---|---|---|---|---|---|\n",
        config.task.name(),
        config.length,
        config.steps,
        config.batch_size,
        config.hidden,
        config.layers,
        config.seed
    );
    for row in rows {
        let recall = row
            .recall_accuracy
            .map_or("-".into(), |a| format!("{a:.3}"));
        let _ = writeln!(
            md,
            "| {} | {} | {:.4} | {:.3} | {recall} | {} | {:.1} |",
            row.cell,
            row.parameters,
            row.final_metric,
            row.ratio_to_baseline,
            solved_text(&row.solved_at),
            row.minutes
        );
    }
    md
}

/// The comparison as CSV, one row per cell.
pub fn csv(rows: &[CellRow]) -> String {
    let mut text = String::from(
        "cell,parameters,final_metric,ratio_to_baseline,recall_accuracy,solved_at,minutes\n",
    );
    for row in rows {
        let _ = writeln!(
            text,
            "{},{},{},{},{},{},{:.3}",
            row.cell,
            row.parameters,
            row.final_metric,
            row.ratio_to_baseline,
            row.recall_accuracy.map_or(String::new(), |a| a.to_string()),
            solved_text(&row.solved_at),
            row.minutes
        );
    }
    text
}

fn read_metrics(path: &Path) -> Vec<MetricsLine> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Mean eval metric per step over the runs in `run_dirs` (a cell's seeds).
pub fn mean_curve(run_dirs: impl IntoIterator<Item = PathBuf>) -> Vec<(f64, f64)> {
    let mut by_step: BTreeMap<usize, (f64, usize)> = BTreeMap::new();
    for dir in run_dirs {
        for line in read_metrics(&dir.join("metrics.jsonl")) {
            let entry = by_step.entry(line.step).or_insert((0.0, 0));
            entry.0 += line.eval_metric;
            entry.1 += 1;
        }
    }
    by_step
        .into_iter()
        .map(|(step, (sum, n))| (step as f64, sum / n as f64))
        .collect()
}

/// Writes `results.md`, `results.csv`, `curves.svg` and `curves.png` into the output folder.
pub fn write_report(config: &ExperimentConfig, summaries: &[RunSummary]) -> Result<(), String> {
    let task = config.task.build(config.length);
    let (baseline, metric) = {
        use crate::task::Task;
        (task.baseline(), task.metric_name())
    };
    let rows = rows(config, summaries);
    let out = &config.out;
    let write = |name: &str, text: &str| {
        write_atomically(&out.join(name), text.as_bytes()).map_err(|e| e.to_string())
    };
    write("results.md", &markdown(config, &rows, baseline, metric))?;
    write("results.csv", &csv(&rows))?;
    let figure = CurveFigure {
        title: format!(
            "{} (length {}): held-out {metric}",
            config.task.name(),
            config.length
        ),
        metric,
        baseline,
        steps: config.steps as f64,
        curves: config
            .cell
            .iter()
            .map(|cell| Curve {
                label: cell.clone(),
                points: mean_curve(config.seed.iter().map(|&s| config.run_dir(cell, s))),
            })
            .collect(),
    };
    write_curves(&out.join("curves"), &figure)
}
