"""PyTorch peer of rnn-zoo's `bench` binary (CPU, or CUDA with cuDNN), for reproducing speed comparisons.

This is a comparison tool only; rnn-zoo does not depend on Python or PyTorch. It times the
same harness as `cargo run --release --bin bench`: one training step (torch.nn.LSTM/GRU/RNN
with batch_first=True, a Linear(H, 10) head on every step's output, mean as loss, backward;
no optimiser step) and one forward pass of the layer under no_grad, each after two warm-up
runs, reported as the median and (min..max) of --repeats timed runs.

    python3 -m venv .venv && .venv/bin/pip install torch
    .venv/bin/python scripts/bench_pytorch.py --cell all --json
    python3 scripts/bench_pytorch.py --device cuda --seq-len 100,1000   # cuDNN on a GPU
"""

import argparse
import json
import statistics
import time

import torch

CELLS = {
    "lstm": lambda i, h, l: torch.nn.LSTM(i, h, num_layers=l, batch_first=True),
    "gru": lambda i, h, l: torch.nn.GRU(i, h, num_layers=l, batch_first=True),
    "rnn": lambda i, h, l: torch.nn.RNN(i, h, num_layers=l, nonlinearity="tanh", batch_first=True),
    "rnn-relu": lambda i, h, l: torch.nn.RNN(i, h, num_layers=l, nonlinearity="relu", batch_first=True),
}
WARMUP = 2


def elapsed_ms(run, device):
    """Milliseconds `run` takes, waiting for the GPU to finish its work."""
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3


def time_ms(run, repeats, device):
    """The first run's time, then the median and (min, max) in ms of `repeats` timed runs
    after WARMUP untimed ones (the first among them)."""
    first = elapsed_ms(run, device)
    for _ in range(WARMUP - 1):
        elapsed_ms(run, device)
    samples = [elapsed_ms(run, device) for _ in range(max(repeats, 1))]
    return first, statistics.median(samples), (min(samples), max(samples))


def bench(cell, batch, seq_len, args, backend):
    device = torch.device(args.device)
    layer = CELLS[cell](args.input, args.hidden, args.layers).to(device)
    head = torch.nn.Linear(args.hidden, 10).to(device)
    params = list(layer.parameters()) + list(head.parameters())
    x = torch.rand(batch, seq_len, args.input, device=device)

    def train_step():
        for p in params:
            p.grad = None
        head(layer(x)[0]).mean().backward()

    def forward():
        with torch.no_grad():
            layer(x)

    first, train, train_range = time_ms(train_step, args.repeats, device)
    _, fwd, _ = time_ms(forward, args.repeats, device)
    return {
        "cell": cell, "batch": batch, "seq_len": seq_len, "input": args.input,
        "hidden": args.hidden, "layers": args.layers, "threads": args.threads,
        "first_train_step_ms": first, "train_step_ms": train, "train_step_range_ms": list(train_range), "forward_ms": fwd,
        "train_steps_per_s": batch * seq_len / (train / 1e3), "backend": backend,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cell", default="lstm", help="name, comma list, or `all` (%s)" % ",".join(CELLS))
    p.add_argument("--batch", type=int, default=128, help="sequences per batch")
    p.add_argument("--seq-len", default="100", help="steps per sequence; a comma list times each")
    p.add_argument("--input", type=int, default=10, help="input width")
    p.add_argument("--hidden", type=int, default=128, help="hidden width")
    p.add_argument("--layers", type=int, default=1, help="stacked layers")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats (after 2 warm-up runs)")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (nn.LSTM/GRU/RNN run on cuDNN)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    args = p.parse_args()

    cells = list(CELLS) if args.cell == "all" else [c.strip() for c in args.cell.split(",")]
    unknown = [c for c in cells if c not in CELLS]
    if unknown:
        p.error("unknown cell(s) %s; choose from %s or all" % (", ".join(unknown), ", ".join(CELLS)))
    seq_lens = [int(s) for s in args.seq_len.split(",")]

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    device = "cpu" if args.device == "cpu" else "cuda-" + torch.cuda.get_device_name().replace(" ", "-")
    backend = "pytorch-%s-%s" % (torch.__version__.split("+")[0], device)
    if not args.json:
        print("backend: %s, %d threads" % (backend, args.threads))
        print("%-14s %6s %6s %6s %6s %12s %18s %11s %14s" % (
            "cell", "batch", "T", "input", "hidden", "train ms", "(min..max)", "forward ms", "train steps/s"))
    for seq_len in seq_lens:
        for cell in cells:
            r = bench(cell, args.batch, seq_len, args, backend)
            if args.json:
                print(json.dumps(r), flush=True)
            else:
                lo, hi = r["train_step_range_ms"]
                print("%-14s %6d %6d %6d %6d %12.1f %18s %11.1f %14.0f" % (
                    r["cell"], r["batch"], r["seq_len"], r["input"], r["hidden"], r["train_step_ms"],
                    "(%.1f..%.1f)" % (lo, hi), r["forward_ms"], r["train_steps_per_s"]), flush=True)


if __name__ == "__main__":
    main()
