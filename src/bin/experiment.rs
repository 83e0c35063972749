//! `experiment`: trains cells on a long-dependency task and compares them.
//!
//! `experiment copy-task --cell gru`, `experiment adding-task --cell lstm,gru,sru --seed 0,1,2`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use rnn_zoo::backend::{backend_name, default_device, describe, TrainBackend};
use rnn_zoo::task::TaskKind;
use rnn_zoo::train::config::{ExperimentConfig, InitKind, OptimizerKind, Overrides};
use rnn_zoo::train::report::{markdown, rows, run_experiment};

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

fn resolve(cli: &Cli) -> Result<(ExperimentConfig, bool), Failure> {
    let (task, length, common) = match &cli.task {
        TaskCommand::CopyTask { delay, common } => (
            TaskKind::CopyTask,
            Overrides {
                delay: *delay,
                ..Default::default()
            },
            common,
        ),
        TaskCommand::AddingTask { seq_len, common } => (
            TaskKind::AddingTask,
            Overrides {
                seq_len: *seq_len,
                ..Default::default()
            },
            common,
        ),
    };
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

fn run(cli: Cli) -> Result<(), Failure> {
    let (config, print_only) = resolve(&cli)?;
    if print_only {
        println!(
            "{}",
            toml::to_string(&config).map_err(|e| Failure::Run(e.to_string()))?
        );
        return Ok(());
    }
    // burn-ndarray runs on rayon's global pool and matrixmultiply's own threads.
    std::env::set_var("MATMUL_NUM_THREADS", config.threads.to_string());
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(config.threads)
        .build_global();
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
