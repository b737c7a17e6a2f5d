"""Time and memory of the parallel and chunkwise mLSTM kernels against sequence length.

    python benchmarks/mlstm.py [--threads 2] [--tokens 256 1024 ...] [--json]

Each (kernel, tokens) pair runs in a fresh subprocess, so that its peak
resident memory (``resource.getrusage(...).ru_maxrss``) belongs to that
measurement alone. ``peak_mb`` is that peak minus the resident memory the
subprocess had just before the first call of the kernel (torch and the
inputs): the most the kernel added, over forward and forward+backward.
Times are the minimum over at least ``--repeats`` runs after one warm-up
run, and over at least ``--min-seconds`` of timed runs. The parallel kernel
is skipped where its S x S tensors are estimated to exceed
``--max-parallel-gb``.

``--json`` prints a list of rows with the keys ``kernel``, ``tokens``,
``forward_s``, ``forward_backward_s`` and ``peak_mb``; skipped rows are left
out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch

from napari_xlstm_unet.model.mlstm import mlstm_chunkwise, mlstm_parallel

DEFAULT_TOKENS = [256, 1024, 4096, 16384, 65536]
# The bottleneck ViL of the shipped cell model: width 192, inner width 384,
# 4 heads of 96 features.
BATCH, HEADS, HEAD_DIM = 1, 4, 96
CHUNK_SIZE = 64

# Float32 S x S tensors per head that the parallel kernel keeps alive at the
# peak of forward+backward: 5 saved for the backward pass, plus gradients and
# temporaries. This script measured 2,400 MB at 4,096 tokens with batch 1 and
# 4 heads, and 9 x 1 x 4 x 4096^2 x 4 bytes = 2,416 MB.
PARALLEL_SQUARE_TENSORS = 9


def parallel_estimate_gb(tokens: int) -> float:
    """Return the estimated peak memory of parallel forward+backward, in GB."""
    return PARALLEL_SQUARE_TENSORS * BATCH * HEADS * tokens**2 * 4 / 1e9


def max_rss_mb() -> float:
    # ru_maxrss is in kilobytes on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_inputs(tokens: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    shape = (BATCH, HEADS, tokens, HEAD_DIM)
    q, k, v = (torch.randn(shape, generator=generator) for _ in range(3))
    input_gate = torch.randn(shape[:3], generator=generator)
    forget_gate = 3.0 + torch.randn(shape[:3], generator=generator)
    return [q, k, v, input_gate, forget_gate]


def min_seconds(function, repeats: int, min_total_s: float) -> float:
    """Return the fastest of at least ``repeats`` timed runs after one warm-up run.

    Short runs repeat until ``min_total_s`` seconds have been timed, up to
    200 runs, because on a busy machine a run of a few milliseconds often
    waits for a core. The minimum of many runs is closer to the kernel's cost.
    """
    function()  # warm-up
    seconds: list[float] = []
    while len(seconds) < repeats or (sum(seconds) < min_total_s and len(seconds) < 200):
        start = time.perf_counter()
        function()
        seconds.append(time.perf_counter() - start)
    return min(seconds)


def measure(kernel: str, tokens: int, threads: int, repeats: int, min_total_s: float) -> dict:
    """Measure one row in this process, which should be a fresh subprocess."""
    torch.set_num_threads(threads)
    if kernel == "parallel":
        function = mlstm_parallel
    else:
        function = lambda *inputs: mlstm_chunkwise(*inputs, chunk_size=CHUNK_SIZE)  # noqa: E731
    inputs = make_inputs(tokens)
    leaves = [tensor.clone().requires_grad_() for tensor in inputs]
    baseline_mb = max_rss_mb()

    def forward():
        with torch.no_grad():
            function(*inputs)

    def forward_backward():
        for leaf in leaves:
            leaf.grad = None
        function(*leaves).sum().backward()

    forward_s = min_seconds(forward, repeats, min_total_s)
    forward_backward_s = min_seconds(forward_backward, repeats, min_total_s)
    return {
        "kernel": kernel,
        "tokens": tokens,
        "forward_s": forward_s,
        "forward_backward_s": forward_backward_s,
        "peak_mb": max_rss_mb() - baseline_mb,
    }


def run_in_subprocess(kernel: str, tokens: int, args: argparse.Namespace) -> dict:
    command = [
        sys.executable, __file__, "--worker", kernel, str(tokens),
        "--threads", str(args.threads), "--repeats", str(args.repeats),
        "--min-seconds", str(args.min_seconds),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(
            f"measuring {kernel} at {tokens} tokens failed with exit code "
            f"{result.returncode}:\n{result.stderr}"
        )
    return json.loads(result.stdout.strip().splitlines()[-1])


def goal_lines(rows: list[dict]) -> list[str]:
    """Return one line per goal: time and memory scaling, and the speed-up at 16,384 tokens."""
    by_key = {(row["kernel"], row["tokens"]): row for row in rows}
    lines = []
    for small, large in ((256, 4096), (1024, 16384), (4096, 65536)):
        a, b = by_key.get(("chunkwise", small)), by_key.get(("chunkwise", large))
        if a is None or b is None:
            continue
        time_ratio = b["forward_backward_s"] / a["forward_backward_s"]
        memory_ratio = b["peak_mb"] / a["peak_mb"] if a["peak_mb"] > 0 else float("nan")
        lines.append(
            f"chunkwise {small} -> {large} tokens: forward+backward time x{time_ratio:.1f} "
            f"(goal <= 20: {'met' if time_ratio <= 20 else 'NOT met'}), "
            f"forward time x{b['forward_s'] / a['forward_s']:.1f}, peak memory x{memory_ratio:.1f} "
            f"(linear would be x16)"
        )
    parallel, chunkwise = by_key.get(("parallel", 16384)), by_key.get(("chunkwise", 16384))
    if parallel and chunkwise:
        speedup = parallel["forward_backward_s"] / chunkwise["forward_backward_s"]
        lines.append(
            f"16384 tokens: chunkwise {speedup:.0f}x faster than parallel "
            f"(goal >= 20: {'met' if speedup >= 20 else 'NOT met'})"
        )
    else:
        lines.append("16384 tokens: parallel not measured, so the speed-up goal is not checked")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads per measurement")
    parser.add_argument(
        "--repeats", type=int, default=3, help="minimum number of timed runs after one warm-up run"
    )
    parser.add_argument(
        "--min-seconds", type=float, default=3.0,
        help="repeat short runs until this many seconds are timed (at most 200 runs)",
    )
    parser.add_argument("--tokens", type=int, nargs="+", default=DEFAULT_TOKENS, help="sequence lengths S")
    parser.add_argument(
        "--max-parallel-gb", type=float, default=8.0,
        help="skip the parallel kernel where its estimated forward+backward peak exceeds this many GB",
    )
    parser.add_argument("--json", action="store_true", help="print only a JSON list of rows")
    parser.add_argument(
        "--worker", nargs=2, metavar=("KERNEL", "TOKENS"),
        help="measure one row (kernel 'parallel' or 'chunkwise') in this process and print it as JSON",
    )
    args = parser.parse_args()

    if args.worker:
        kernel, tokens = args.worker
        if kernel not in ("parallel", "chunkwise"):
            parser.error(f"--worker kernel must be 'parallel' or 'chunkwise', got {kernel!r}")
        print(json.dumps(measure(kernel, int(tokens), args.threads, args.repeats, args.min_seconds)))
        return 0

    def say(line: str = "") -> None:
        if not args.json:
            print(line, flush=True)

    say(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {args.threads} threads")
    say("load average at start (1, 5, 15 min): " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
    say(f"shapes: batch {BATCH}, {HEADS} heads, head dim {HEAD_DIM}, float32; chunk size {CHUNK_SIZE}")
    say(f"times: minimum over at least {args.repeats} runs and {args.min_seconds:g} s after a warm-up; "
        f"memory: ru_maxrss of a fresh subprocess per row, minus its resident memory before the first call")
    say()
    say(f"{'kernel':10s} {'tokens':>7s} {'forward_s':>10s} {'fwd+bwd_s':>10s} {'peak_mb':>9s}")

    rows = []
    for tokens in args.tokens:
        for kernel in ("parallel", "chunkwise"):
            if kernel == "parallel" and parallel_estimate_gb(tokens) > args.max_parallel_gb:
                say(f"{kernel:10s} {tokens:7d}   skipped: about {parallel_estimate_gb(tokens):.0f} GB "
                    f"estimated, over --max-parallel-gb {args.max_parallel_gb:g}")
                continue
            row = run_in_subprocess(kernel, tokens, args)
            rows.append(row)
            say(f"{kernel:10s} {tokens:7d} {row['forward_s']:10.4f} "
                f"{row['forward_backward_s']:10.4f} {row['peak_mb']:9.1f}")

    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        say()
        say("load average at end (1, 5, 15 min): " + ", ".join(f"{x:.2f}" for x in os.getloadavg()))
        for line in goal_lines(rows):
            say(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
