"""Side-by-side CPU speed comparison: rnn-zoo's `bench` against PyTorch, same machine, same
thread count, configs A, B and C of the speed issue, printed as a Markdown table.

Both sides are run in alternation (`--rounds` times) and each keeps its best median, so that a
burst of load on a shared machine does not favour either side.

    cargo build --release --bin bench
    python3 -m venv .venv && .venv/bin/pip install torch
    .venv/bin/python scripts/compare_cpu.py --threads 2

PyTorch is a comparison tool here, never a dependency of the crate.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {"A": (128, 100, 10, 128), "B": (128, 1000, 10, 128), "C": (64, 100, 512, 512)}
ZOO_CELLS = "rnn,rnn-relu,lstm,peephole-lstm,cifg-lstm,gru,gru-cho,sru"
LATER_CELLS = "irnn,indrnn,mgu,ln-lstm"
TORCH_CELLS = "lstm,gru,rnn,rnn-relu"


def run_json(command):
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def shape_args(config, threads, repeats):
    batch, seq_len, width, hidden = CONFIGS[config]
    return ["--batch", str(batch), "--seq-len", str(seq_len), "--input", str(width),
            "--hidden", str(hidden), "--threads", str(threads), "--repeats", str(repeats), "--json"]


def keep_best(best, rows, key):
    for row in rows:
        name = (key, row["cell"])
        best[name] = min(best.get(name, float("inf")), row["train_step_ms"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="A,B,C")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--bench", default=str(ROOT / "target/release/bench"))
    parser.add_argument("--later-cells", action="store_true",
                        help=f"also time {LATER_CELLS} (no PyTorch peer)")
    args = parser.parse_args()
    cells = ZOO_CELLS + ("," + LATER_CELLS if args.later_cells else "")

    best = {}
    for config in args.configs.split(","):
        shape = shape_args(config, args.threads, args.repeats)
        # burn's own modules only where the issue sets a target (A): they are slow.
        zoo_cells = cells + (",burn-lstm,burn-gru" if config == "A" else "")
        for _ in range(args.rounds):
            keep_best(best, run_json([args.bench, "--cell", zoo_cells] + shape), (config, "zoo"))
            torch = [sys.executable, str(ROOT / "scripts/bench_pytorch.py"), "--cell", TORCH_CELLS]
            keep_best(best, run_json(torch + shape), (config, "torch"))
        print(f"config {config} done", file=sys.stderr)

    print("| config | cell | rnn-zoo ms | PyTorch ms | PyTorch / rnn-zoo | vs our LSTM | burn nn::Lstm / cell |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for config in args.configs.split(","):
        lstm = best[((config, "zoo"), "lstm")]
        burn = best.get(((config, "zoo"), "burn-lstm"))
        for cell in cells.split(",") + ["burn-lstm", "burn-gru"]:
            ours = best.get(((config, "zoo"), cell))
            if ours is None:
                continue
            torch = best.get(((config, "torch"), cell))
            ratio = f"{torch / ours:.2f}" if torch else "–"
            burn_ratio = f"{burn / ours:.1f}" if burn else "–"
            torch_ms = f"{torch:.1f}" if torch else "–"
            print(f"| {config} | {cell} | {ours:.1f} | {torch_ms} | {ratio} | {ours / lstm:.2f} | {burn_ratio} |")

    print_length_scaling(best, cells.split(","), args.configs.split(","))


def print_length_scaling(best, cells, configs):
    """time(B) / time(A): how the step grows with a ten times longer sequence."""
    if "A" not in configs or "B" not in configs:
        return
    ratios = [f"{cell} {best[(('B', 'zoo'), cell)] / best[(('A', 'zoo'), cell)]:.1f}" for cell in cells]
    print("\nB / A: " + ", ".join(ratios))


if __name__ == "__main__":
    main()
