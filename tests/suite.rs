//! `experiment suite` and `experiment report` on a tiny grid: resuming skips finished runs,
//! shards split the grid and the report merges them, and its numbers are the summaries'.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::SystemTime;

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_experiment");

const TINY_SUITE: &str = r#"
cells = "rnn,gru"
seeds = [0, 1]
[settings]
hidden = 8
batch-size = 4
eval-every = 4
checkpoint-every = 4
eval-size = 8
[[task]]
name = "adding-task"
lengths = [5]
steps = 12
[[task]]
name = "copy-task"
lengths = [3]
steps = 8
"#;

fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rnn-zoo-suite-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn suite_file(dir: &Path) -> PathBuf {
    let path = dir.join("tiny.toml");
    std::fs::write(&path, TINY_SUITE).unwrap();
    path
}

fn run(args: &[&str]) -> Output {
    let output = Command::new(BIN).args(args).output().expect("binary runs");
    assert!(
        output.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn summaries(root: &Path) -> BTreeMap<String, (Value, SystemTime)> {
    let mut found = BTreeMap::new();
    for experiment in std::fs::read_dir(root).unwrap().flatten() {
        let Ok(runs) = std::fs::read_dir(experiment.path()) else {
            continue;
        };
        for run in runs.flatten() {
            let path = run.path().join("summary.json");
            if let Ok(text) = std::fs::read_to_string(&path) {
                let key = format!(
                    "{}/{}",
                    experiment.file_name().to_string_lossy(),
                    run.file_name().to_string_lossy()
                );
                let modified = std::fs::metadata(&path).unwrap().modified().unwrap();
                found.insert(key, (serde_json::from_str(&text).unwrap(), modified));
            }
        }
    }
    found
}

#[test]
fn a_restarted_suite_runs_only_what_is_not_finished() {
    let dir = scratch("resume");
    let file = suite_file(&dir);
    let out = dir.join("out");
    let (file, out_arg) = (file.to_str().unwrap(), out.to_str().unwrap());
    run(&[
        "suite",
        file,
        "--jobs",
        "2",
        "--threads",
        "1",
        "--out",
        out_arg,
    ]);
    let first = summaries(&out);
    assert_eq!(first.len(), 8, "{:?}", first.keys());

    // An interrupted run: its summary is missing (it still has its checkpoint).
    let victim = out.join("copy-task-T3/gru-s1/summary.json");
    std::fs::remove_file(&victim).unwrap();
    let again = run(&[
        "suite",
        file,
        "--jobs",
        "2",
        "--threads",
        "1",
        "--out",
        out_arg,
    ]);
    let log = String::from_utf8_lossy(&again.stderr);
    assert!(log.contains("7 already finished, 1 to run"), "{log}");
    // One finished run named again on its own (a retried array task) is left as it is.
    let finished = out.join("copy-task-T3");
    let metrics = std::fs::read(finished.join("gru-s0/metrics.jsonl")).unwrap();
    let single = run(&[
        "suite-run",
        "--experiment",
        finished.to_str().unwrap(),
        "--cell",
        "gru",
        "--seed",
        "0",
    ]);
    assert!(
        String::from_utf8_lossy(&single.stderr).contains("finished already, skipped"),
        "{single:?}"
    );
    assert_eq!(
        std::fs::read(finished.join("gru-s0/metrics.jsonl")).unwrap(),
        metrics
    );
    let second = summaries(&out);
    assert_eq!(second.len(), 8);
    for (key, (summary, modified)) in &first {
        if key != "copy-task-T3/gru-s1" {
            assert_eq!(second[key].1, *modified, "{key} was run again");
        }
        assert_eq!(
            second[key].0["final_metric"], summary["final_metric"],
            "{key}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn csv_rows(path: &Path) -> Vec<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    lines
        .map(|line| {
            header
                .iter()
                .zip(line.split(','))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
        .collect()
}

#[test]
fn shards_split_the_grid_and_the_report_merges_them() {
    let dir = scratch("shards");
    let file = suite_file(&dir);
    let file = file.to_str().unwrap();
    let shards = [dir.join("shard0"), dir.join("shard1"), dir.join("shard2")];
    for (i, out) in shards.iter().enumerate() {
        let shard = format!("{i}/3");
        run(&[
            "suite",
            file,
            "--shard",
            &shard,
            "--threads",
            "1",
            "--out",
            out.to_str().unwrap(),
        ]);
    }
    let found: Vec<_> = shards.iter().map(|s| summaries(s)).collect();
    let mut all = BTreeMap::new();
    for runs in &found {
        assert!(!runs.is_empty(), "every shard gets runs");
        for (key, value) in runs {
            assert!(
                all.insert(key.clone(), value.0.clone()).is_none(),
                "{key} ran twice"
            );
        }
    }
    assert_eq!(all.len(), 8);

    let report = dir.join("report");
    let mut args = vec!["report"];
    args.extend(shards.iter().map(|s| s.to_str().unwrap()));
    args.extend(["--out", report.to_str().unwrap()]);
    run(&args);
    let rows = csv_rows(&report.join("report.csv"));
    assert_eq!(rows.len(), 4, "two experiments x two cells");
    for row in &rows {
        let metrics: Vec<f64> = (0..2)
            .map(|seed| {
                let key = format!("{}/{}-s{seed}", row["experiment"], row["cell"]);
                all[&key]["final_metric"].as_f64().unwrap()
            })
            .collect();
        let mean = (metrics[0] + metrics[1]) / 2.0;
        let std = (metrics[0] - metrics[1]).abs() / 2f64.sqrt();
        let reported: f64 = row["final_metric_mean"].parse().unwrap();
        let reported_std: f64 = row["final_metric_std"].parse().unwrap();
        assert_eq!(row["seeds"], "2");
        assert!((reported - mean).abs() < 1e-12, "{row:?} vs {metrics:?}");
        assert!((reported_std - std).abs() < 1e-12, "{row:?} vs {metrics:?}");
    }
    let md = std::fs::read_to_string(report.join("report.md")).unwrap();
    for section in [
        "## adding-task-T5",
        "## copy-task-T3",
        "Longest length solved",
    ] {
        assert!(md.contains(section), "{section} missing:\n{md}");
    }
    for figure in [
        "curves-adding-task-T5.png",
        "curves-copy-task-T3.svg",
        "longest-solved-copy-task.png",
    ] {
        assert!(report.join(figure).exists(), "{figure}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_suite_input_gives_a_short_error() {
    let dir = scratch("bad");
    let missing = dir.join("missing.toml");
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "cells = \"lstm\"\nseeds = [0]\n").unwrap();
    let file = suite_file(&dir);
    for args in [
        vec!["suite", missing.to_str().unwrap()],
        vec!["suite", bad.to_str().unwrap()],
        vec!["suite", file.to_str().unwrap(), "--shard", "3/3"],
        vec!["report", dir.join("nothing").to_str().unwrap()],
    ] {
        let output = Command::new(BIN).args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.starts_with("error:") && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
