#!/usr/bin/env bash
# Runs a suite as a Slurm job array: task i of n runs shard i/n, with no coordinator. Every
# shard writes into the same output folder (a shared file system) or its own (then merge with
# `experiment report DIR...`). Finished runs are skipped, so resubmitting resumes.
#
#   cargo build --release --bin experiment
#   sbatch --array=0-15 experiments/slurm-array.sh experiments/standard.toml runs/standard
#
#SBATCH --job-name=rnn-zoo-suite
#SBATCH --cpus-per-task=2
#SBATCH --mem=4G
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%A_%a.out
set -euo pipefail
suite="${1:-experiments/standard.toml}"
out="${2:-runs/standard}"
exec target/release/experiment suite "$suite" --out "$out" \
  --shard "${SLURM_ARRAY_TASK_ID}/${SLURM_ARRAY_TASK_COUNT}" \
  --threads "${SLURM_CPUS_PER_TASK:-2}"
