//! The `experiment` binary on tiny settings: its output layout, its error format, the NaN stop
//! and an exact resume after SIGKILL.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_experiment");

fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rnn-zoo-exp-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Tiny settings: small model, short sequences, frequent evaluation and checkpoints.
fn tiny(task: &str, out: &Path) -> Vec<String> {
    let length = if task == "copy-task" {
        "--delay"
    } else {
        "--seq-len"
    };
    [
        task,
        length,
        "5",
        "--hidden",
        "8",
        "--batch-size",
        "4",
        "--steps",
        "12",
        "--eval-every",
        "4",
        "--checkpoint-every",
        "4",
        "--eval-size",
        "8",
        "--threads",
        "1",
        "--out",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([out.display().to_string()])
    .collect()
}

fn run(args: &[String]) -> Output {
    Command::new(BIN).args(args).output().expect("binary runs")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).to_string()
}

fn assert_error(output: &Output, code: i32, needle: &str) {
    let err = stderr(output);
    assert_eq!(output.status.code(), Some(code), "stderr: {err}");
    // Usage errors print nothing else; a failed run's progress lines may precede its message.
    let message = err.lines().find(|l| l.starts_with("error:"));
    assert!(message.is_some(), "no line starts with 'error:': {err}");
    if code == 2 {
        assert!(
            err.starts_with("error:"),
            "first line must start with 'error:': {err}"
        );
    }
    assert!(err.contains(needle), "'{needle}' not in: {err}");
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
}

fn metrics_without_time(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("wall_time_s");
            v
        })
        .collect()
}

#[test]
fn a_comparison_writes_the_documented_layout() {
    let out = scratch("layout");
    let mut args = tiny("copy-task", &out);
    args.extend([
        "--cell".into(),
        "gru,sru".into(),
        "--seed".into(),
        "0,1".into(),
    ]);
    let output = run(&args);
    assert!(output.status.success(), "{}", stderr(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("| gru |") && stdout.contains("| sru |"),
        "{stdout}"
    );
    for name in [
        "results.md",
        "results.csv",
        "curves.svg",
        "curves.png",
        "experiment.json",
    ] {
        assert!(out.join(name).is_file(), "{name} missing");
    }
    let csv = std::fs::read_to_string(out.join("results.csv")).unwrap();
    assert_eq!(csv.lines().count(), 3, "{csv}");
    for cell in ["gru", "sru"] {
        for seed in [0, 1] {
            let dir = out.join(format!("{cell}-s{seed}"));
            let config: Value =
                serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                    .unwrap();
            assert_eq!(config["cell"][0], cell);
            let summary: Value =
                serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap())
                    .unwrap();
            for key in [
                "task",
                "length",
                "cell",
                "seed",
                "parameters",
                "backend",
                "final_metric",
                "best_metric",
                "solved_at",
                "wall_time_s",
            ] {
                assert!(summary.get(key).is_some(), "summary has no {key}");
            }
            let lines = metrics_without_time(&dir.join("metrics.jsonl"));
            let steps: Vec<u64> = lines.iter().map(|l| l["step"].as_u64().unwrap()).collect();
            assert_eq!(steps, [4, 8, 12]);
            assert!(lines[0]["recall_accuracy"].is_number() && lines[0]["baseline"].is_number());
            assert!(dir.join("checkpoint/checkpoint.mpk").is_file());
        }
    }
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn chrono_initialisation_trains_every_gated_cell() {
    let out = scratch("chrono");
    let mut args = tiny("adding-task", &out);
    args.extend([
        "--init".into(),
        "chrono".into(),
        "--cell".into(),
        "lstm,cifg-lstm,gru-cho,sru".into(),
    ]);
    let output = run(&args);
    assert!(output.status.success(), "{}", stderr(&output));
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn print_config_resolves_file_then_flags() {
    let out = scratch("print");
    std::fs::create_dir_all(&out).unwrap();
    let file = out.join("exp.toml");
    std::fs::write(&file, "cell = \"lstm\"\nsteps = 77\nlr = 0.01\n").unwrap();
    let output = run(&[
        "adding-task".into(),
        "--config".into(),
        file.display().to_string(),
        "--lr".into(),
        "0.002".into(),
        "--print-config".into(),
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(
        printed.contains("steps = 77") && printed.contains("lr = 0.002"),
        "{printed}"
    );
    assert!(printed.contains("cell = [\"lstm\"]"), "{printed}");
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn bad_input_gives_a_short_error() {
    let out = scratch("errors");
    std::fs::create_dir_all(&out).unwrap();
    assert_error(&run(&["copy-task".into(), "--bogus".into()]), 2, "--bogus");
    assert_error(
        &run(&["copy-task".into(), "--cell".into(), "tranformer".into()]),
        2,
        "unknown cell 'tranformer'",
    );
    assert_error(
        &run(&["copy-task".into(), "--hidden".into(), "0".into()]),
        2,
        "hidden = 0 is out of range (allowed 1..=65536)",
    );
    assert_error(
        &run(&[
            "adding-task".into(),
            "--init".into(),
            "chrono".into(),
            "--cell".into(),
            "lstm,rnn".into(),
        ]),
        2,
        "init = chrono needs gated cells; rnn has no gates",
    );
    assert_error(
        &run(&["copy-task".into(), "--recurrent-dropout".into(), "1".into()]),
        2,
        "recurrent-dropout = 1 is out of range",
    );
    assert_error(
        &run(&["copy-task".into(), "--zoneout".into(), "1".into()]),
        2,
        "zoneout = 1 is out of range",
    );
    let file = out.join("bad.toml");
    std::fs::write(&file, "stepz = 5\n").unwrap();
    assert_error(
        &run(&[
            "copy-task".into(),
            "--config".into(),
            file.display().to_string(),
        ]),
        2,
        "stepz",
    );
    // An output folder below a regular file cannot be created.
    let blocker = out.join("file");
    std::fs::write(&blocker, "x").unwrap();
    assert_error(
        &run(&tiny("copy-task", &blocker.join("runs"))),
        1,
        "cannot create output folder",
    );
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn a_corrupt_checkpoint_is_reported() {
    let out = scratch("corrupt");
    assert!(run(&tiny("adding-task", &out)).status.success());
    let dir = out.join("gru-s0");
    std::fs::remove_file(dir.join("summary.json")).unwrap();
    std::fs::write(dir.join("checkpoint/checkpoint.mpk"), b"garbage").unwrap();
    let output = run(&[
        "adding-task".into(),
        "--resume".into(),
        out.display().to_string(),
    ]);
    assert_error(&output, 1, "corrupt or incompatible checkpoint");

    // A checkpoint of another cell (burn's recorder panics on some such records).
    let other = scratch("corrupt-other");
    let mut args = tiny("adding-task", &other);
    args.extend(["--cell".into(), "lstm".into()]);
    assert!(run(&args).status.success());
    std::fs::copy(
        other.join("lstm-s0/checkpoint/checkpoint.mpk"),
        dir.join("checkpoint/checkpoint.mpk"),
    )
    .unwrap();
    let output = run(&[
        "adding-task".into(),
        "--resume".into(),
        out.display().to_string(),
    ]);
    assert_error(&output, 1, "delete the run's folder to start it again");
    let _ = std::fs::remove_dir_all(&out);
    let _ = std::fs::remove_dir_all(&other);
}

/// A panic (here injected; in practice a GPU backend that cannot start) is one `error:` line.
#[test]
fn a_panic_is_reported_in_one_line() {
    let out = scratch("panic");
    let output = Command::new(BIN)
        .args(tiny("adding-task", &out))
        .env("RNN_ZOO_FAULT_PANIC_AT_STEP", "2")
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap();
    assert_error(&output, 101, "injected fault at step 2");
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn a_nan_loss_stops_the_run_and_keeps_the_last_checkpoint() {
    let out = scratch("nan");
    let output = Command::new(BIN)
        .args(tiny("adding-task", &out))
        .env("RNN_ZOO_FAULT_NAN_AT_STEP", "6")
        .output()
        .unwrap();
    assert_error(&output, 1, "non-finite loss");
    assert!(
        stderr(&output).contains("last good checkpoint (step 4)"),
        "{}",
        stderr(&output)
    );
    let ckpt = out.join("gru-s0/checkpoint/checkpoint.mpk");
    assert!(ckpt.is_file());
    // Resuming continues from step 4 and finishes.
    let resumed = run(&[
        "adding-task".into(),
        "--resume".into(),
        out.display().to_string(),
    ]);
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn a_run_killed_between_checkpoints_resumes_exactly() {
    let args = |out: &Path| {
        let mut a = tiny("copy-task", out);
        let steps = a.iter().position(|s| s == "--steps").unwrap();
        // Long enough that the kill lands mid-run however fast a step is.
        a[steps + 1] = "600".into();
        let ckpt = a.iter().position(|s| s == "--checkpoint-every").unwrap();
        a[ckpt + 1] = "10".into();
        let eval = a.iter().position(|s| s == "--eval-every").unwrap();
        a[eval + 1] = "2".into();
        // Recurrent noise too: a resumed run must draw the noise the uninterrupted one drew.
        a.extend(["--zoneout", "0.1"].map(String::from));
        a
    };
    let reference = scratch("uninterrupted");
    assert!(run(&args(&reference)).status.success());

    let killed = scratch("killed");
    let mut child = Command::new(BIN)
        .args(args(&killed))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let metrics = killed.join("gru-s0/metrics.jsonl");
    let start = Instant::now();
    // Kill once a checkpoint is behind us and the run is between two checkpoints.
    loop {
        let steps = std::fs::read_to_string(&metrics)
            .map(|t| t.lines().count())
            .unwrap_or(0);
        if steps * 2 >= 24 || start.elapsed() > Duration::from_secs(120) {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let partial = std::fs::read_to_string(&metrics).unwrap().lines().count();
    assert!(
        partial < 300,
        "the run finished before it was killed ({partial} evaluations)"
    );

    let resumed = run(&[
        "copy-task".into(),
        "--resume".into(),
        killed.display().to_string(),
    ]);
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    assert_eq!(
        metrics_without_time(&metrics),
        metrics_without_time(&reference.join("gru-s0/metrics.jsonl")),
        "a resumed run must log exactly what an uninterrupted one logs"
    );
    let _ = std::fs::remove_dir_all(&reference);
    let _ = std::fs::remove_dir_all(&killed);
}
