//! The report of finished runs gathered from any number of folders (suite outputs, shards from
//! other machines, single experiments): `report.md`, `report.csv`, one learning-curve figure
//! per task, length and setting, and one figure per task of the longest length each cell
//! solves.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use crate::cell::cell_names;
use crate::import::write_atomically;
use crate::plot::{write_bars, write_curves, BarFigure, Curve, CurveFigure};
use crate::task::Task;
use crate::train::config::ExperimentConfig;
use crate::train::report::mean_curve;
use crate::train::run::RunSummary;

/// A finished run found on disk.
#[derive(Debug, Clone)]
pub struct FinishedRun {
    /// Its folder.
    pub dir: PathBuf,
    /// The name of its experiment folder (e.g. `copy-task-T100`).
    pub experiment: String,
    /// The experiment's config.
    pub config: ExperimentConfig,
    /// `summary.json`.
    pub summary: RunSummary,
}

/// What makes two experiments the same: their config without where and how they ran.
fn setting_key(config: &ExperimentConfig) -> String {
    let mut plain = config.clone();
    plain.out = PathBuf::new();
    plain.cell.clear();
    plain.seed.clear();
    plain.threads = 0;
    serde_json::to_string(&plain).expect("configs serialise")
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, String> {
    let text =
        fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Every finished run under `roots` (a run folder is one with a `summary.json` inside an
/// experiment folder with an `experiment.json`); the same run found twice is kept once.
pub fn collect(roots: &[PathBuf]) -> Result<Vec<FinishedRun>, String> {
    let mut summaries = Vec::new();
    for root in roots {
        if !root.is_dir() {
            return Err(format!("{} is not a folder", root.display()));
        }
        find_summaries(root, &mut summaries)?;
    }
    summaries.sort();
    let mut seen = std::collections::HashSet::new();
    // Each experiment's config is read once, not once per run.
    let mut configs: BTreeMap<PathBuf, ExperimentConfig> = BTreeMap::new();
    let mut runs = Vec::new();
    for path in summaries {
        let dir = path.parent().expect("a file has a folder").to_path_buf();
        let Some(experiment_dir) = dir.parent() else {
            continue;
        };
        let config_path = experiment_dir.join("experiment.json");
        if !config_path.exists() {
            continue;
        }
        let config = match configs.get(&config_path) {
            Some(config) => config.clone(),
            None => {
                let config: ExperimentConfig = read_json(&config_path)?;
                configs.insert(config_path, config.clone());
                config
            }
        };
        let summary: RunSummary = read_json(&path)?;
        if seen.insert((setting_key(&config), summary.cell.clone(), summary.seed)) {
            runs.push(FinishedRun {
                experiment: experiment_dir
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                dir,
                config,
                summary,
            });
        }
    }
    Ok(runs)
}

fn find_summaries(dir: &Path, found: &mut Vec<PathBuf>) -> Result<(), String> {
    let entries = fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            find_summaries(&path, found)?;
        } else if path.file_name().is_some_and(|n| n == "summary.json") {
            found.push(path);
        }
    }
    Ok(())
}

/// One row of the report: a cell in one experiment, over its seeds.
#[derive(Debug, Clone, PartialEq)]
pub struct ReportRow {
    /// Cell name.
    pub cell: String,
    /// Finished seeds.
    pub seeds: usize,
    /// Seeds the experiment asked for.
    pub seeds_planned: usize,
    /// Mean of the final metric over seeds.
    pub metric_mean: f64,
    /// Its standard deviation over seeds (0 for one seed).
    pub metric_std: f64,
    /// `metric_mean / baseline`.
    pub ratio_to_baseline: f64,
    /// Mean final recall accuracy, where the task has one.
    pub recall_accuracy: Option<f64>,
    /// Seeds that solved the task.
    pub solved: usize,
    /// Median step at which the solving seeds solved it.
    pub median_solved_at: Option<f64>,
    /// Mean minutes per run.
    pub minutes: f64,
}

/// All rows of one experiment (a task at one length with one setting).
#[derive(Debug, Clone)]
pub struct ReportSection {
    /// Experiment folder name.
    pub experiment: String,
    /// Its config.
    pub config: ExperimentConfig,
    /// The task's baseline.
    pub baseline: f64,
    /// The task's metric.
    pub metric: &'static str,
    /// Rows in the zoo's cell order.
    pub rows: Vec<ReportRow>,
    /// Run folders per cell, for the curves.
    run_dirs: Vec<(String, Vec<PathBuf>)>,
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len().max(1) as f64
}

fn std_dev(values: &[f64]) -> f64 {
    if values.len() < 2 {
        return 0.0;
    }
    let m = mean(values);
    (values.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (values.len() - 1) as f64).sqrt()
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(values[n / 2]),
        _ => Some((values[n / 2 - 1] + values[n / 2]) / 2.0),
    }
}

fn row(cell: &str, runs: &[&FinishedRun], seeds_planned: usize) -> ReportRow {
    let metrics: Vec<f64> = runs.iter().map(|r| r.summary.final_metric).collect();
    let solved_at: Vec<f64> = runs
        .iter()
        .filter_map(|r| r.summary.solved_at.map(|s| s as f64))
        .collect();
    let recall: Vec<f64> = runs
        .iter()
        .filter_map(|r| r.summary.final_recall_accuracy)
        .collect();
    let metric_mean = mean(&metrics);
    ReportRow {
        cell: cell.to_string(),
        seeds: runs.len(),
        seeds_planned,
        metric_mean,
        metric_std: std_dev(&metrics),
        ratio_to_baseline: metric_mean / runs[0].summary.baseline,
        recall_accuracy: (!recall.is_empty()).then(|| mean(&recall)),
        solved: solved_at.len(),
        median_solved_at: median(solved_at),
        minutes: mean(
            &runs
                .iter()
                .map(|r| r.summary.wall_time_s / 60.0)
                .collect::<Vec<_>>(),
        ),
    }
}

/// Groups runs into sections (by task, then length, then experiment name).
pub fn sections(runs: &[FinishedRun]) -> Vec<ReportSection> {
    let mut by_setting: BTreeMap<String, Vec<&FinishedRun>> = BTreeMap::new();
    for run in runs {
        by_setting
            .entry(setting_key(&run.config))
            .or_default()
            .push(run);
    }
    let order = cell_names();
    let cell_rank = |cell: &str| order.iter().position(|c| *c == cell).unwrap_or(usize::MAX);
    let mut sections: Vec<ReportSection> = by_setting
        .into_values()
        .map(|runs| {
            let first = runs[0];
            let task = first.config.task.build(first.config.length);
            let mut cells: Vec<&str> = runs.iter().map(|r| r.summary.cell.as_str()).collect();
            cells.sort_by_key(|c| (cell_rank(c), c.to_string()));
            cells.dedup();
            let of_cell = |cell: &str| -> Vec<&FinishedRun> {
                runs.iter()
                    .copied()
                    .filter(|r| r.summary.cell == cell)
                    .collect()
            };
            ReportSection {
                experiment: first.experiment.clone(),
                config: first.config.clone(),
                baseline: task.baseline(),
                metric: task.metric_name(),
                rows: cells
                    .iter()
                    .map(|c| row(c, &of_cell(c), first.config.seed.len()))
                    .collect(),
                run_dirs: cells
                    .iter()
                    .map(|c| {
                        (
                            c.to_string(),
                            of_cell(c).iter().map(|r| r.dir.clone()).collect(),
                        )
                    })
                    .collect(),
            }
        })
        .collect();
    sections.sort_by(|a, b| {
        (a.config.task.name(), a.config.length, &a.experiment).cmp(&(
            b.config.task.name(),
            b.config.length,
            &b.experiment,
        ))
    });
    // Two settings under one folder name (merged from different suites) get distinct names,
    // so that their figures do not overwrite each other.
    let mut seen = std::collections::HashMap::<String, usize>::new();
    for section in &mut sections {
        let count = seen.entry(section.experiment.clone()).or_insert(0);
        *count += 1;
        if *count > 1 {
            section.experiment = format!("{}_{}", section.experiment, count);
        }
    }
    sections
}

/// The setting of an experiment without its length: `copy-task` or `copy-task_lr-0.003`.
fn family(section: &ReportSection) -> String {
    let suffix = section
        .experiment
        .split_once('_')
        .map(|(_, s)| format!("_{s}"))
        .unwrap_or_default();
    format!("{}{suffix}", section.config.task.name())
}

/// Per task family and cell: the longest length that most of the cell's seeds solved (0 when
/// none), over the lengths that were run.
pub fn longest_solved(sections: &[ReportSection]) -> BTreeMap<String, Vec<(String, usize)>> {
    let mut table: BTreeMap<String, Vec<(String, usize)>> = BTreeMap::new();
    for section in sections {
        let cells = table.entry(family(section)).or_default();
        for row in &section.rows {
            let solved = 2 * row.solved > row.seeds;
            let length = if solved { section.config.length } else { 0 };
            match cells.iter_mut().find(|(c, _)| *c == row.cell) {
                Some(entry) => entry.1 = entry.1.max(length),
                None => cells.push((row.cell.clone(), length)),
            }
        }
    }
    table
}

fn fmt_opt(value: Option<f64>, digits: usize) -> String {
    value.map_or("-".into(), |v| format!("{v:.digits$}"))
}

/// `report.md`.
pub fn markdown(sections: &[ReportSection], sources: &[PathBuf]) -> String {
    let mut md = String::from("# rnn-zoo report\n\n");
    let sources: Vec<String> = sources.iter().map(|s| s.display().to_string()).collect();
    let _ = writeln!(
        md,
        "Finished runs gathered from: {}. Each row: one cell over its finished seeds; the final \
         metric is the held-out value at the last step (mean ± standard deviation over seeds); \
         solved = seeds that met the task's rule; steps to solve = median over those seeds; \
         minutes = mean training time per run.\n",
        sources.join(", ")
    );
    for section in sections {
        let c = &section.config;
        let _ = writeln!(
            md,
            "## {} — {} steps, batch {}, hidden {}, lr {}, {:?}, clip {}, init {:?}\n\n\
             Baseline {}: {:.4}. ![curves](curves-{}.png)\n\n\
             | cell | seeds | final {} | ratio to baseline | recall accuracy | solved | steps to solve (median) | minutes |\n\
             |---|---|---|---|---|---|---|---|",
            section.experiment,
            c.steps,
            c.batch_size,
            c.hidden,
            c.lr,
            c.optimizer,
            c.clip,
            c.init,
            section.metric,
            section.baseline,
            section.experiment,
            section.metric,
        );
        for r in &section.rows {
            let _ = writeln!(
                md,
                "| {} | {}/{} | {:.4} ± {:.4} | {:.3} | {} | {}/{} | {} | {:.2} |",
                r.cell,
                r.seeds,
                r.seeds_planned,
                r.metric_mean,
                r.metric_std,
                r.ratio_to_baseline,
                fmt_opt(r.recall_accuracy, 3),
                r.solved,
                r.seeds,
                fmt_opt(r.median_solved_at, 0),
                r.minutes
            );
        }
        md.push('\n');
    }
    let longest = longest_solved(sections);
    if !longest.is_empty() {
        md.push_str(
            "## Longest length solved (by most seeds), per task\n\n\
             0 = no length that was run. Only the lengths present above count.\n\n",
        );
        for (family, cells) in &longest {
            let list: Vec<String> = cells.iter().map(|(c, l)| format!("{c} {l}")).collect();
            let _ = writeln!(
                md,
                "- {family}: {} ![longest](longest-solved-{family}.png)",
                list.join(", ")
            );
        }
    }
    md
}

/// `report.csv`: one line per experiment and cell.
pub fn csv(sections: &[ReportSection]) -> String {
    let mut text = String::from(
        "experiment,task,length,cell,seeds,seeds_planned,final_metric_mean,final_metric_std,\
         ratio_to_baseline,recall_accuracy,solved,median_steps_to_solve,minutes\n",
    );
    for section in sections {
        for r in &section.rows {
            let _ = writeln!(
                text,
                "{},{},{},{},{},{},{},{},{},{},{},{},{:.3}",
                section.experiment,
                section.config.task.name(),
                section.config.length,
                r.cell,
                r.seeds,
                r.seeds_planned,
                r.metric_mean,
                r.metric_std,
                r.ratio_to_baseline,
                r.recall_accuracy.map_or(String::new(), |a| a.to_string()),
                r.solved,
                r.median_solved_at.map_or(String::new(), |s| s.to_string()),
                r.minutes
            );
        }
    }
    text
}

/// Gathers the finished runs under `sources` and writes the report into `out`. Returns the
/// sections.
pub fn write_report(sources: &[PathBuf], out: &Path) -> Result<Vec<ReportSection>, String> {
    let runs = collect(sources)?;
    if runs.is_empty() {
        let list: Vec<String> = sources.iter().map(|s| s.display().to_string()).collect();
        return Err(format!("no finished runs under {}", list.join(", ")));
    }
    let sections = sections(&runs);
    fs::create_dir_all(out).map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    let write = |name: &str, text: &str| {
        write_atomically(&out.join(name), text.as_bytes()).map_err(|e| e.to_string())
    };
    write("report.md", &markdown(&sections, sources))?;
    write("report.csv", &csv(&sections))?;
    for section in &sections {
        let figure = CurveFigure {
            title: format!("{}: held-out {}", section.experiment, section.metric),
            metric: section.metric,
            baseline: section.baseline,
            steps: section.config.steps as f64,
            curves: section
                .run_dirs
                .iter()
                .map(|(cell, dirs)| Curve {
                    label: cell.clone(),
                    points: mean_curve(dirs.iter().cloned()),
                })
                .collect(),
        };
        write_curves(&out.join(format!("curves-{}", section.experiment)), &figure)?;
    }
    for (family, cells) in longest_solved(&sections) {
        let figure = BarFigure {
            title: format!("{family}: longest length solved"),
            y_desc: "length (T)".into(),
            bars: cells.into_iter().map(|(c, l)| (c, l as f64)).collect(),
        };
        write_bars(&out.join(format!("longest-solved-{family}")), &figure)?;
    }
    Ok(sections)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_and_median_follow_their_definitions() {
        assert_eq!(std_dev(&[1.0]), 0.0);
        assert!((std_dev(&[1.0, 3.0]) - 2f64.sqrt()).abs() < 1e-12);
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0]), Some(2.5));
    }
}
