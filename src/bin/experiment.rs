//! `experiment`: trains cells on a long-dependency task and compares them.
//!
//! `experiment copy-task --cell gru`, `experiment adding-task --cell lstm,gru,sru --seed 0,1,2`,
//! `experiment suite experiments/quick.toml --jobs 2`, `experiment report runs/quick`.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use clap::{Args, Parser, Subcommand};
use rnn_zoo::backend::{backend_name, default_device, describe, TrainBackend};
use rnn_zoo::suite::{report::write_report, run_parallel, Plan, PlannedRun, Shard, SuiteSpec};
use rnn_zoo::task::TaskKind;
use rnn_zoo::train::config::{ExperimentConfig, InitKind, OptimizerKind, Overrides};
use rnn_zoo::train::report::{markdown, rows, run_experiment};
use rnn_zoo::train::run::{train_run, RunSummary};

#[derive(Parser, Debug)]
#[command(
    name = "experiment",
    version,
    about = "Train and compare recurrent cells on long-dependency tasks"
)]
struct Cli {
    #[command(subcommand)]
    task: TaskCommand,
}

#[derive(Subcommand, Debug)]
enum TaskCommand {
    /// The copy task (Arjovsky et al. 2016): recall 10 symbols after a delay.
    CopyTask {
        /// The delay T (sequences of T + 20 steps) [default: 100].
        #[arg(long)]
        delay: Option<usize>,
        #[command(flatten)]
        common: Common,
    },
    /// The adding problem: the sum of two marked numbers among T.
    AddingTask {
        /// The sequence length T [default: 100].
        #[arg(long)]
        seq_len: Option<usize>,
        #[command(flatten)]
        common: Common,
    },
    /// Variable-delay copy (Henaff et al. 2016): the delay drawn per sequence from 1..=T.
    VariableCopy {
        /// The longest delay T (sequences of T + 20 steps) [default: 100].
        #[arg(long)]
        delay: Option<usize>,
        #[command(flatten)]
        common: Common,
    },
    /// Selective copying (Gu & Dao 2023): 10 symbols scattered among T noise steps, recalled
    /// in order at 10 markers.
    SelectiveCopy {
        /// The length T of the scattered part (at least 10) [default: 100].
        #[arg(long)]
        seq_len: Option<usize>,
        #[command(flatten)]
        common: Common,
    },
    /// Temporal order (Hochreiter & Schmidhuber 1997, 6a): the order of 2 relevant symbols.
    TemporalOrder {
        /// The sequence length T (at least 10) [default: 100].
        #[arg(long)]
        seq_len: Option<usize>,
        #[command(flatten)]
        common: Common,
    },
    /// Temporal order with 3 relevant symbols (Hochreiter & Schmidhuber 1997, 6b).
    #[command(name = "temporal-order-3")]
    TemporalOrder3 {
        /// The sequence length T (at least 10) [default: 100].
        #[arg(long)]
        seq_len: Option<usize>,
        #[command(flatten)]
        common: Common,
    },
    /// Associative recall: n key-value pairs, then a key; answer its value.
    AssociativeRecall {
        /// Key-value pairs n, 1 to 26 (sequences of 2n + 2 steps) [default: 8].
        #[arg(long)]
        pairs: Option<usize>,
        #[command(flatten)]
        common: Common,
    },
    /// Run a suite: the grid of cells × tasks × lengths × seeds in a TOML file. Finished runs
    /// are skipped, so running it again resumes it.
    Suite(SuiteArgs),
    /// Merge finished runs from any number of folders into report.md, report.csv and plots.
    Report {
        /// Folders to gather finished runs from (suite outputs, shards, experiments).
        #[arg(required = true)]
        dirs: Vec<PathBuf>,
        /// Where to write the report [default: the first folder].
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// One run of a suite, in its own process (used by `suite`).
    #[command(hide = true)]
    SuiteRun {
        /// The experiment folder (holds experiment.json).
        #[arg(long)]
        experiment: PathBuf,
        #[arg(long)]
        cell: String,
        #[arg(long)]
        seed: u64,
        #[arg(long)]
        threads: Option<usize>,
    },
}

#[derive(Args, Debug)]
struct SuiteArgs {
    /// The suite file (see experiments/quick.toml).
    file: PathBuf,
    /// Runs at once, each in its own process.
    #[arg(long, default_value_t = 1)]
    jobs: usize,
    /// Worker threads per run [default: 2].
    #[arg(long)]
    threads: Option<usize>,
    /// Run only the runs of shard i of n (0 <= i < n), e.g. 3/16; 0/1 is the whole suite.
    #[arg(long, default_value = "0/1")]
    shard: Shard,
    /// Output folder [default: the suite's `out`, else runs/suite-NAME].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Run only the lengths up to this one this time (the short rows first).
    #[arg(long)]
    max_length: Option<usize>,
}

#[derive(Args, Debug)]
struct Common {
    /// Cell name, a comma list, or `all` [default: gru].
    #[arg(long)]
    cell: Option<String>,
    /// Training steps [default: 2000 (copy), 10000 (adding)].
    #[arg(long)]
    steps: Option<usize>,
    /// Sequences per batch [default: 50].
    #[arg(long)]
    batch_size: Option<usize>,
    /// Hidden units [default: 128].
    #[arg(long)]
    hidden: Option<usize>,
    /// Stacked layers [default: 1].
    #[arg(long)]
    layers: Option<usize>,
    /// Learning rate [default: 0.001].
    #[arg(long)]
    lr: Option<f64>,
    /// Optimiser [default: adam].
    #[arg(long, value_enum)]
    optimizer: Option<OptimizerKind>,
    /// Global gradient-norm clipping, 0 = off [default: 1].
    #[arg(long)]
    clip: Option<f64>,
    /// Gate-bias initialisation [default: default].
    #[arg(long, value_enum)]
    init: Option<InitKind>,
    /// Variational dropout of the recurrent state, one mask per sequence [default: 0].
    #[arg(long)]
    recurrent_dropout: Option<f64>,
    /// Zoneout probability of each state unit at each step [default: 0].
    #[arg(long)]
    zoneout: Option<f64>,
    /// Steps between evaluations [default: 100].
    #[arg(long)]
    eval_every: Option<usize>,
    /// Steps between checkpoints [default: 500].
    #[arg(long)]
    checkpoint_every: Option<usize>,
    /// Held-out sequences [default: 1000].
    #[arg(long)]
    eval_size: Option<usize>,
    /// Seed, or a comma list [default: 0].
    #[arg(long)]
    seed: Option<String>,
    /// Worker threads [default: 2].
    #[arg(long)]
    threads: Option<usize>,
    /// Output folder [default: runs/TASK-TIMESTAMP].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the interrupted experiment in this folder.
    #[arg(long, conflicts_with = "out")]
    resume: Option<PathBuf>,
    /// A TOML file of options (flags override it).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print the resolved config and exit.
    #[arg(long)]
    print_config: bool,
}

impl Common {
    fn overrides(&self) -> Overrides {
        Overrides {
            cell: self.cell.clone(),
            steps: self.steps,
            batch_size: self.batch_size,
            hidden: self.hidden,
            layers: self.layers,
            lr: self.lr,
            optimizer: self.optimizer,
            clip: self.clip,
            init: self.init,
            recurrent_dropout: self.recurrent_dropout,
            zoneout: self.zoneout,
            eval_every: self.eval_every,
            checkpoint_every: self.checkpoint_every,
            eval_size: self.eval_size,
            seed: self.seed.clone(),
            threads: self.threads,
            out: self.out.clone(),
            ..Overrides::default()
        }
    }
}

/// A failure: a usage error (exit 2) or a run error (exit 1).
enum Failure {
    Usage(String),
    Run(String),
}

impl TaskCommand {
    /// The task, its length flag and the common options of a training command.
    fn training(&self) -> Option<(TaskKind, Option<usize>, &Common)> {
        Some(match self {
            Self::CopyTask { delay, common } => (TaskKind::CopyTask, *delay, common),
            Self::AddingTask { seq_len, common } => (TaskKind::AddingTask, *seq_len, common),
            Self::VariableCopy { delay, common } => (TaskKind::VariableCopy, *delay, common),
            Self::SelectiveCopy { seq_len, common } => (TaskKind::SelectiveCopy, *seq_len, common),
            Self::TemporalOrder { seq_len, common } => (TaskKind::TemporalOrder, *seq_len, common),
            Self::TemporalOrder3 { seq_len, common } => {
                (TaskKind::TemporalOrder3, *seq_len, common)
            }
            Self::AssociativeRecall { pairs, common } => {
                (TaskKind::AssociativeRecall, *pairs, common)
            }
            Self::Suite(_) | Self::Report { .. } | Self::SuiteRun { .. } => return None,
        })
    }
}

fn resolve(command: &TaskCommand) -> Result<(ExperimentConfig, bool), Failure> {
    let (task, length, common) = command
        .training()
        .expect("only training commands are resolved");
    let length = Overrides::with_length(task, length);
    if let Some(dir) = &common.resume {
        let path = dir.join("experiment.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| Failure::Usage(format!("cannot resume from {}: {e}", dir.display())))?;
        let mut config: ExperimentConfig = serde_json::from_str(&text)
            .map_err(|e| Failure::Usage(format!("cannot resume from {}: {e}", path.display())))?;
        if config.task != task {
            return Err(Failure::Usage(format!(
                "{} holds a {} experiment",
                dir.display(),
                config.task.name()
            )));
        }
        config.out = dir.clone();
        if let Some(threads) = common.threads {
            config.threads = threads;
        }
        return Ok((config, common.print_config));
    }
    let file = match &common.config {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                Failure::Usage(format!("cannot read config {}: {e}", path.display()))
            })?;
            Overrides::from_toml(&text)
                .map_err(|e| Failure::Usage(format!("config {}: {e}", path.display())))?
        }
        None => Overrides::default(),
    };
    let merged = file.then(length).then(common.overrides());
    let config = ExperimentConfig::resolve(task, merged).map_err(Failure::Usage)?;
    Ok((config, common.print_config))
}

/// Sizes burn-ndarray's pools: rayon's global pool and matrixmultiply's threads.
fn set_threads(threads: usize) {
    std::env::set_var("MATMUL_NUM_THREADS", threads.to_string());
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global();
}

fn run(cli: Cli) -> Result<(), Failure> {
    match &cli.task {
        TaskCommand::Suite(args) => run_suite(args),
        TaskCommand::Report { dirs, out } => {
            let out = out.clone().unwrap_or_else(|| dirs[0].clone());
            let sections = write_report(dirs, &out).map_err(Failure::Usage)?;
            let runs: usize = sections.iter().flat_map(|s| &s.rows).map(|r| r.seeds).sum();
            println!(
                "report of {runs} runs in {} experiments: {}",
                sections.len(),
                out.join("report.md").display()
            );
            Ok(())
        }
        TaskCommand::SuiteRun {
            experiment,
            cell,
            seed,
            threads,
        } => suite_run(experiment, cell, *seed, *threads),
        command => train(command),
    }
}

/// One run of a suite: the experiment's config from its folder, this cell and seed.
fn suite_run(dir: &Path, cell: &str, seed: u64, threads: Option<usize>) -> Result<(), Failure> {
    let path = dir.join("experiment.json");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| Failure::Usage(format!("cannot read {}: {e}", path.display())))?;
    let mut config: ExperimentConfig = serde_json::from_str(&text)
        .map_err(|e| Failure::Usage(format!("{}: {e}", path.display())))?;
    config.out = dir.to_path_buf();
    if let Some(threads) = threads {
        config.threads = threads;
    }
    // A job list may name a finished run again (a rerun shard, a retried array task).
    if config.run_dir(cell, seed).join("summary.json").exists() {
        eprintln!("{cell} seed {seed}: finished already, skipped");
        return Ok(());
    }
    set_threads(config.threads);
    train_run::<TrainBackend>(&config, cell, seed, &default_device(), backend_name())
        .map_err(Failure::Run)?;
    Ok(())
}

fn run_suite(args: &SuiteArgs) -> Result<(), Failure> {
    let text = std::fs::read_to_string(&args.file)
        .map_err(|e| Failure::Usage(format!("cannot read suite {}: {e}", args.file.display())))?;
    let spec = SuiteSpec::from_toml(&text)
        .map_err(|e| Failure::Usage(format!("suite {}: {e}", args.file.display())))?;
    if args.jobs == 0 {
        return Err(Failure::Usage("jobs must be at least 1".into()));
    }
    let out = args.out.clone().or(spec.out.clone()).unwrap_or_else(|| {
        let stem = args.file.file_stem().unwrap_or_default().to_string_lossy();
        PathBuf::from(format!("runs/suite-{stem}"))
    });
    let plan = spec
        .plan(&out, args.threads)
        .map_err(|e| Failure::Usage(format!("suite {}: {e}", args.file.display())))?;
    plan.write_configs().map_err(Failure::Run)?;
    let max_length = args.max_length.unwrap_or(usize::MAX);
    let mine: Vec<&PlannedRun> = plan
        .shard(args.shard)
        .into_iter()
        .filter(|r| plan.groups[r.group].config.length <= max_length)
        .collect();
    let pending: Vec<&PlannedRun> = mine.iter().copied().filter(|r| !plan.finished(r)).collect();
    eprintln!(
        "suite {}: {} runs in all, {} in shard {}/{}, {} already finished, {} to run ({} at a time); output {}",
        args.file.display(),
        plan.runs.len(),
        mine.len(),
        args.shard.index,
        args.shard.count,
        mine.len() - pending.len(),
        pending.len(),
        args.jobs,
        out.display()
    );
    let exe = std::env::current_exe().map_err(|e| Failure::Run(e.to_string()))?;
    let done = std::sync::atomic::AtomicUsize::new(0);
    let results = run_parallel(&pending, args.jobs, |run| {
        let result = spawn_run(&exe, &plan, run, args.threads);
        let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        match &result {
            Ok(summary) => eprintln!(
                "[{n}/{}] {}: {}",
                pending.len(),
                plan.label(run),
                outcome(summary)
            ),
            Err(e) => eprintln!("[{n}/{}] {} failed: {e}", pending.len(), plan.label(run)),
        }
        result
    });
    let failed: Vec<String> = pending
        .iter()
        .zip(&results)
        .filter(|(_, r)| r.is_err())
        .map(|(run, _)| plan.label(run))
        .collect();
    match write_report(std::slice::from_ref(&out), &out) {
        Ok(_) => println!("report: {}", out.join("report.md").display()),
        Err(e) => eprintln!("no report yet: {e}"),
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(Failure::Run(format!(
            "{} run(s) failed (their logs are train.log in each run folder): {}",
            failed.len(),
            failed.join(", ")
        )))
    }
}

/// A finished run in a few words.
fn outcome(summary: &RunSummary) -> String {
    let solved = summary
        .solved_at
        .map_or("not solved".to_string(), |s| format!("solved at {s}"));
    format!(
        "{:.4} (ratio {:.3} to baseline), {solved}, {:.1} min",
        summary.final_metric,
        summary.final_metric / summary.baseline,
        summary.wall_time_s / 60.0
    )
}

/// Runs one suite run in a child process (its output goes to `train.log` in the run folder).
fn spawn_run(
    exe: &Path,
    plan: &Plan,
    run: &PlannedRun,
    threads: Option<usize>,
) -> Result<RunSummary, String> {
    let run_dir = plan.run_dir(run);
    std::fs::create_dir_all(&run_dir)
        .map_err(|e| format!("cannot create {}: {e}", run_dir.display()))?;
    let log_path = run_dir.join("train.log");
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| format!("cannot open {}: {e}", log_path.display()))?;
    let mut command = Command::new(exe);
    command
        .arg("suite-run")
        .arg("--experiment")
        .arg(&plan.groups[run.group].config.out)
        .args(["--cell", &run.cell, "--seed", &run.seed.to_string()])
        .stdout(Stdio::null())
        .stderr(log);
    if let Some(threads) = threads {
        command.args(["--threads", &threads.to_string()]);
    }
    let status = command
        .status()
        .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
    if !status.success() {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        let last = log
            .lines()
            .rev()
            .find(|l| l.starts_with("error:"))
            .unwrap_or("");
        return Err(format!("{status}; {last}"));
    }
    let summary = std::fs::read_to_string(run_dir.join("summary.json"))
        .map_err(|e| format!("no summary: {e}"))?;
    serde_json::from_str(&summary).map_err(|e| format!("bad summary: {e}"))
}

fn train(command: &TaskCommand) -> Result<(), Failure> {
    let (config, print_only) = resolve(command)?;
    if print_only {
        println!(
            "{}",
            toml::to_string(&config).map_err(|e| Failure::Run(e.to_string()))?
        );
        return Ok(());
    }
    set_threads(config.threads);
    eprintln!("backend: {}", describe());
    eprintln!("output: {}", config.out.display());
    let summaries = run_experiment::<TrainBackend>(&config, &default_device(), backend_name())
        .map_err(Failure::Run)?;
    let task = config.task.build(config.length);
    use rnn_zoo::task::Task;
    println!(
        "{}",
        markdown(
            &config,
            &rows(&config, &summaries),
            task.baseline(),
            task.metric_name()
        )
    );
    println!("results: {}", config.out.join("results.md").display());
    Ok(())
}

fn main() -> ExitCode {
    rnn_zoo::backend::keep_freed_memory();
    rnn_zoo::backend::report_panics_in_one_line();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(message)) => {
            eprintln!("error: {message}");
            ExitCode::from(2)
        }
        Err(Failure::Run(message)) => {
            eprintln!("error: {message}");
            ExitCode::from(1)
        }
    }
}
