//! `bench`: times a training step and a forward pass of zoo cells (and burn's own LSTM/GRU).

use clap::Parser;
use rnn_zoo::backend::{backend_name, default_device, describe, TrainBackend};
use rnn_zoo::bench::{all_names, bench_burn_baseline, bench_cell, BenchSettings, BenchShape};

/// Time one training step (layer + Linear(H, 10) head on every step + mean loss + backward)
/// and one forward pass.
#[derive(Parser, Debug)]
#[command(name = "bench", version)]
struct Args {
    /// Cell name, a comma list, or `all` (every cell plus burn's nn::Lstm and nn::Gru).
    #[arg(long, default_value = "lstm")]
    cell: String,
    /// Sequences per batch.
    #[arg(long, default_value_t = 128)]
    batch: usize,
    /// Steps per sequence; a comma list times each length.
    #[arg(long, default_value = "100", value_delimiter = ',')]
    seq_len: Vec<usize>,
    /// Input width.
    #[arg(long, default_value_t = 10)]
    input: usize,
    /// Hidden width.
    #[arg(long, default_value_t = 128)]
    hidden: usize,
    /// Stacked layers.
    #[arg(long, default_value_t = 1)]
    layers: usize,
    /// Worker threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Timed repeats (after 2 warm-up runs).
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    json: bool,
}

fn main() {
    rnn_zoo::backend::keep_freed_memory();
    rnn_zoo::backend::report_panics_in_one_line();
    let args = Args::parse();
    if let Err(message) = run(args) {
        eprintln!("error: {message}");
        std::process::exit(1);
    }
}

fn run(args: Args) -> Result<(), String> {
    // burn-ndarray runs on rayon's global pool and matrixmultiply's own threads.
    std::env::set_var("MATMUL_NUM_THREADS", args.threads.to_string());
    rayon::ThreadPoolBuilder::new()
        .num_threads(args.threads)
        .build_global()
        .map_err(|e| e.to_string())?;
    let names: Vec<String> = if args.cell == "all" {
        all_names()
    } else {
        args.cell.split(',').map(|s| s.trim().to_string()).collect()
    };
    let device = default_device();
    let settings = BenchSettings {
        warmup: 2,
        repeats: args.repeats,
        threads: args.threads,
    };
    if !args.json {
        println!("backend: {}", describe());
        println!(
            "{:<14} {:>6} {:>6} {:>6} {:>6} {:>12} {:>18} {:>11} {:>14} {:>13}",
            "cell",
            "batch",
            "T",
            "input",
            "hidden",
            "train ms",
            "(min..max)",
            "forward ms",
            "train steps/s",
            "first step ms"
        );
    }
    for &seq_len in &args.seq_len {
        let shape = BenchShape {
            batch: args.batch,
            seq_len,
            input: args.input,
            hidden: args.hidden,
            layers: args.layers,
        };
        for name in &names {
            let result = if name.starts_with("burn-") {
                bench_burn_baseline::<TrainBackend>(name, shape, settings, &device, backend_name())?
            } else {
                bench_cell::<TrainBackend>(name, shape, settings, &device, backend_name())?
            };
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string(&result).map_err(|e| e.to_string())?
                );
            } else {
                let (lo, hi) = result.train_step_range_ms;
                println!(
                    "{:<14} {:>6} {:>6} {:>6} {:>6} {:>12.1} {:>18} {:>11.1} {:>14.0} {:>13.0}",
                    result.cell,
                    result.batch,
                    result.seq_len,
                    result.input,
                    result.hidden,
                    result.train_step_ms,
                    format!("({lo:.1}..{hi:.1})"),
                    result.forward_ms,
                    result.train_steps_per_s,
                    result.first_train_step_ms
                );
            }
        }
    }
    Ok(())
}
