//! Suites: a grid of runs (cells × tasks × lengths × seeds × optional hyper-parameters) from a
//! TOML file, run on one machine (several at once) or as one deterministic shard of many, with
//! finished runs skipped so that an interrupted suite goes on where it stopped; and
//! [`report`], which merges finished runs from any number of folders.
//!
//! A suite's output folder holds one experiment folder per task, length and hyper-parameter
//! combination (its `experiment.json` is the resolved config), with one run folder per cell
//! and seed inside, the same layout as `experiment copy-task` writes.

pub mod report;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use serde::Deserialize;

use crate::task::TaskKind;
use crate::train::config::{parse_cells, ExperimentConfig, Overrides};
use crate::train::run::write_json;

/// A suite file, parsed and checked.
#[derive(Debug, Clone)]
pub struct SuiteSpec {
    /// Cells of every run.
    pub cells: Vec<String>,
    /// Seeds of every run.
    pub seeds: Vec<u64>,
    /// Output folder (the `--out` flag overrides it).
    pub out: Option<PathBuf>,
    /// Runner options for every run.
    pub settings: Overrides,
    /// Tasks and their lengths.
    pub tasks: Vec<TaskSpec>,
    /// Hyper-parameter axes: every combination of their values is a separate experiment.
    pub grid: Vec<(String, Vec<toml::Value>)>,
}

/// One task of a suite.
#[derive(Debug, Clone)]
pub struct TaskSpec {
    /// The task.
    pub task: TaskKind,
    /// Its lengths (the copy task's delay, the adding task's sequence length).
    pub lengths: Vec<usize>,
    /// Runner options for this task's runs (over the suite's).
    pub settings: Overrides,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct RawSuite {
    cells: String,
    seeds: Vec<u64>,
    out: Option<PathBuf>,
    #[serde(default)]
    settings: toml::Table,
    task: Vec<toml::Table>,
    #[serde(default)]
    grid: BTreeMap<String, Vec<toml::Value>>,
}

/// Keys that a suite sets through its own axes, not through runner options.
const AXIS_KEYS: [&str; 7] = [
    "cell", "seed", "delay", "seq-len", "pairs", "out", "threads",
];

/// Runner options from a TOML table; the suite's axes are not options.
fn options(table: toml::Table, place: &str) -> Result<Overrides, String> {
    if let Some(key) = table.keys().find(|k| AXIS_KEYS.contains(&k.as_str())) {
        return Err(format!(
            "{place}: `{key}` is set by the suite (cells, seeds, [[task]] lengths, --out, --threads)"
        ));
    }
    toml::Value::Table(table)
        .try_into::<Overrides>()
        .map_err(|e| format!("{place}: {}", e.to_string().trim().replace('\n', " ")))
}

fn task_names() -> String {
    TaskKind::ALL.map(TaskKind::name).join(", ")
}

fn task_spec(mut table: toml::Table, index: usize) -> Result<TaskSpec, String> {
    let place = format!("[[task]] {}", index + 1);
    let name = table
        .remove("name")
        .ok_or_else(|| format!("{place}: missing `name` ({})", task_names()))?;
    let task: TaskKind = name
        .try_into()
        .map_err(|_| format!("{place}: unknown task name ({})", task_names()))?;
    let lengths: Vec<usize> = table
        .remove("lengths")
        .ok_or_else(|| format!("{place}: missing `lengths`"))?
        .try_into()
        .map_err(|_| format!("{place}: `lengths` must be a list of positive integers"))?;
    if lengths.is_empty() {
        return Err(format!("{place}: `lengths` is empty"));
    }
    Ok(TaskSpec {
        task,
        lengths,
        settings: options(table, &place)?,
    })
}

impl SuiteSpec {
    /// Parses a suite file's text.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        let raw: RawSuite =
            toml::from_str(text).map_err(|e| e.to_string().trim().replace('\n', " "))?;
        if raw.seeds.is_empty() || raw.task.is_empty() {
            return Err("a suite needs at least one seed and one [[task]]".into());
        }
        let tasks = raw
            .task
            .into_iter()
            .enumerate()
            .map(|(i, t)| task_spec(t, i))
            .collect::<Result<Vec<_>, _>>()?;
        for (key, values) in &raw.grid {
            if values.is_empty() {
                return Err(format!("[grid]: `{key}` has no values"));
            }
            for value in values {
                let probe = toml::Table::from_iter([(key.clone(), value.clone())]);
                options(probe, "[grid]")?;
            }
        }
        Ok(Self {
            cells: parse_cells(&raw.cells)?,
            seeds: raw.seeds,
            out: raw.out,
            settings: options(raw.settings, "[settings]")?,
            tasks,
            grid: raw.grid.into_iter().collect(),
        })
    }

    /// Every combination of the grid's values, as `(key, value)` lists (one empty list when
    /// there is no grid).
    fn grid_points(&self) -> Vec<Vec<(String, toml::Value)>> {
        let mut points = vec![Vec::new()];
        for (key, values) in &self.grid {
            points = points
                .into_iter()
                .flat_map(|point| {
                    values.iter().map(move |value| {
                        let mut next = point.clone();
                        next.push((key.clone(), value.clone()));
                        next
                    })
                })
                .collect();
        }
        points
    }

    /// Resolves the grid into experiments under `out`, in a fixed order.
    pub fn plan(&self, out: &Path, threads: Option<usize>) -> Result<Plan, String> {
        let mut groups = Vec::new();
        for task in &self.tasks {
            for &length in &task.lengths {
                for point in self.grid_points() {
                    groups.push(self.group(task, length, &point, out, threads)?);
                }
            }
        }
        let runs = groups
            .iter()
            .enumerate()
            .flat_map(|(g, group)| {
                group.config.cell.iter().flat_map(move |cell| {
                    group.config.seed.iter().map(move |&seed| PlannedRun {
                        group: g,
                        cell: cell.clone(),
                        seed,
                    })
                })
            })
            .collect();
        Ok(Plan { groups, runs })
    }

    fn group(
        &self,
        task: &TaskSpec,
        length: usize,
        point: &[(String, toml::Value)],
        out: &Path,
        threads: Option<usize>,
    ) -> Result<Group, String> {
        let mut name = format!("{}-T{length}", task.task.name());
        for (key, value) in point {
            name.push_str(&format!("_{key}-{}", value_text(value)));
        }
        let grid = options(toml::Table::from_iter(point.iter().cloned()), "[grid]")?;
        let axes = Overrides {
            cell: Some(self.cells.join(",")),
            seed: Some(
                self.seeds
                    .iter()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            out: Some(out.join(&name)),
            threads,
            ..Overrides::with_length(task.task, Some(length))
        };
        let merged = self
            .settings
            .clone()
            .then(task.settings.clone())
            .then(grid)
            .then(axes);
        let config =
            ExperimentConfig::resolve(task.task, merged).map_err(|e| format!("{name}: {e}"))?;
        Ok(Group { name, config })
    }
}

/// A grid value as it appears in folder names: `0.003`, `chrono`.
fn value_text(value: &toml::Value) -> String {
    match value {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// One experiment of a suite: a task at one length with one set of hyper-parameters.
#[derive(Debug, Clone)]
pub struct Group {
    /// Folder name, e.g. `copy-task-T100` or `copy-task-T100_lr-0.003`.
    pub name: String,
    /// The resolved config (all of the suite's cells and seeds).
    pub config: ExperimentConfig,
}

/// One run of a suite: a cell and seed of a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedRun {
    /// Index into [`Plan::groups`].
    pub group: usize,
    /// Cell name.
    pub cell: String,
    /// Seed.
    pub seed: u64,
}

/// A suite's experiments and runs, in a fixed order.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The experiments.
    pub groups: Vec<Group>,
    /// Every run of every experiment.
    pub runs: Vec<PlannedRun>,
}

impl Plan {
    /// The run's folder.
    pub fn run_dir(&self, run: &PlannedRun) -> PathBuf {
        self.groups[run.group].config.run_dir(&run.cell, run.seed)
    }

    /// Whether the run has finished (its `summary.json` exists).
    pub fn finished(&self, run: &PlannedRun) -> bool {
        self.run_dir(run).join("summary.json").exists()
    }

    /// A short label: `copy-task-T100 gru s0`.
    pub fn label(&self, run: &PlannedRun) -> String {
        format!("{} {} s{}", self.groups[run.group].name, run.cell, run.seed)
    }

    /// The runs of `shard`, in plan order.
    pub fn shard(&self, shard: Shard) -> Vec<&PlannedRun> {
        self.runs
            .iter()
            .enumerate()
            .filter(|(i, _)| shard.owns(*i))
            .map(|(_, run)| run)
            .collect()
    }

    /// Writes each experiment's `experiment.json` (the same on every shard and machine).
    pub fn write_configs(&self) -> Result<(), String> {
        for group in &self.groups {
            let dir = &group.config.out;
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            write_json(&dir.join("experiment.json"), &group.config)?;
        }
        Ok(())
    }
}

/// A deterministic slice of a suite: runs `index`, `index + count`, `index + 2·count`, … of
/// the plan (round robin, so that every shard gets a mix of short and long runs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// This shard, `0 ≤ index < count`.
    pub index: usize,
    /// Number of shards.
    pub count: usize,
}

impl Shard {
    /// The whole suite.
    pub const ALL: Shard = Shard { index: 0, count: 1 };

    /// Whether the run at `position` of the plan belongs to this shard.
    pub fn owns(self, position: usize) -> bool {
        position % self.count == self.index
    }
}

impl std::str::FromStr for Shard {
    type Err = String;

    /// Parses `i/n`.
    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || format!("shard '{text}' must be i/n with 0 <= i < n");
        let (index, count) = text.split_once('/').ok_or_else(bad)?;
        let index: usize = index.trim().parse().map_err(|_| bad())?;
        let count: usize = count.trim().parse().map_err(|_| bad())?;
        if index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

/// Runs `work` on each of `runs`, `jobs` at a time, in order of the list; returns each run's
/// result in the same order.
pub fn run_parallel<T: Sync, R: Send>(
    runs: &[T],
    jobs: usize,
    work: impl Fn(&T) -> R + Sync,
) -> Vec<R> {
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<R>>> = Mutex::new((0..runs.len()).map(|_| None).collect());
    std::thread::scope(|scope| {
        for _ in 0..jobs.clamp(1, runs.len().max(1)) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(run) = runs.get(i) else { break };
                let result = work(run);
                results.lock().expect("no worker panics")[i] = Some(result);
            });
        }
    });
    results
        .into_inner()
        .expect("no worker panics")
        .into_iter()
        .map(|r| r.expect("every run visited"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: &str = r#"
        cells = "rnn,gru,sru"
        seeds = [0, 1, 2]
        [settings]
        hidden = 16
        [[task]]
        name = "adding-task"
        lengths = [10, 20]
        steps = 30
        [[task]]
        name = "copy-task"
        lengths = [5]
        [grid]
        lr = [0.001, 0.003]
    "#;

    fn plan() -> Plan {
        SuiteSpec::from_toml(SPEC)
            .unwrap()
            .plan(Path::new("/tmp/suite"), Some(1))
            .unwrap()
    }

    #[test]
    fn the_grid_is_every_combination() {
        let plan = plan();
        assert_eq!(plan.groups.len(), 3 * 2);
        assert_eq!(plan.runs.len(), 6 * 3 * 3);
        let names: Vec<&str> = plan.groups.iter().map(|g| g.name.as_str()).collect();
        assert_eq!(names[0], "adding-task-T10_lr-0.001");
        assert_eq!(names[5], "copy-task-T5_lr-0.003");
        let first = &plan.groups[0].config;
        assert_eq!((first.steps, first.hidden, first.length), (30, 16, 10));
        assert_eq!(plan.groups[1].config.lr, 0.003);
        // The copy task takes the runner's default steps, not the adding task's.
        assert_eq!(plan.groups[4].config.steps, 2000);
    }

    #[test]
    fn shards_cover_every_run_exactly_once() {
        let plan = plan();
        for count in 1..=7 {
            let mut seen = vec![0; plan.runs.len()];
            for index in 0..count {
                for run in plan.shard(Shard { index, count }) {
                    let position = plan.runs.iter().position(|r| r == run).unwrap();
                    seen[position] += 1;
                }
            }
            assert!(seen.iter().all(|&n| n == 1), "{count} shards: {seen:?}");
        }
    }

    #[test]
    fn shards_parse_and_reject_bad_text() {
        assert_eq!("2/5".parse::<Shard>(), Ok(Shard { index: 2, count: 5 }));
        for bad in ["5/5", "1", "a/2", "1/0", "-1/2"] {
            assert!(bad.parse::<Shard>().is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_suites_are_explained() {
        let cases = [
            ("cells = \"lstm\"\nseeds = [0]\n[[task]]\nname = \"copy-task\"\nlengths = [5]\nseed = \"1\"", "set by the suite"),
            ("cells = \"lstm\"\nseeds = [0]\n[[task]]\nname = \"copy\"\nlengths = [5]", "unknown task"),
            ("cells = \"lstm\"\nseeds = [0]\n[[task]]\nname = \"copy-task\"\nlengths = [5]\n[grid]\nlearning-rate = [1]", "learning-rate"),
            ("cells = \"nope\"\nseeds = [0]\n[[task]]\nname = \"copy-task\"\nlengths = [5]", "nope"),
            ("cells = \"lstm\"\nseeds = [0]\n[[task]]\nname = \"copy-task\"", "lengths"),
        ];
        for (text, needle) in cases {
            let err = SuiteSpec::from_toml(text).unwrap_err();
            assert!(err.contains(needle), "{needle}: {err}");
        }
    }

    #[test]
    fn parallel_work_keeps_the_order_of_its_input() {
        let items: Vec<usize> = (0..20).collect();
        assert_eq!(
            run_parallel(&items, 3, |i| i * 2),
            (0..40).step_by(2).collect::<Vec<_>>()
        );
    }
}
