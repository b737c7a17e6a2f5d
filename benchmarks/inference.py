"""Whole-model benchmarks: speed per megapixel, memory, xLSTM overhead, GEMM share, a peer and training.

    python benchmarks/inference.py [--threads 2] [--json]

Sections, all measured in one run so that ratios compare like with like:

1. Seconds per megapixel of the tiled predictor (512 x 512 windows, random
   weights) for each preset and xLSTM placement. Each row also gives the
   overhead of the placement as a ratio to ``none`` of the same preset, and
   the share of this machine's float32 matrix-multiply rate that the network
   reaches: network FLOPs (``torch.utils.flop_counter``) / time / measured
   GEMM FLOP/s.
2. Peak resident memory and time of the shipped cell model on square images
   of 512 to 4096 pixels, each in a fresh process whose peak is reset just
   before the call (Linux only). ``--memory-modes`` picks what runs: the
   tiled predictor on a random 3-channel float32 image (``predictor``, with
   fitted windows; ``fixed``, with 512-pixel windows), and the whole
   ``segment_image`` call on the grey uint16 nuclei sample repeated to the
   size (``segment``). Each row also gives the working memory: the peak
   minus the resident memory before the call (which holds the input) and
   minus the returned arrays. Time is also given per computed megapixel
   (the sum of the window areas), since overlapping windows make the work
   grow in steps with the image size.
3. A peer: cellpose's U-Net (``cellpose.resnet_torch.CPnet``, built without
   weights) on the same 512 x 512 input, when the ``cellpose`` package is
   installed (``pip install 'cellpose<4'``); otherwise the row is marked as
   skipped.
4. Training throughput (patches per second, forward + backward + AdamW step)
   for each preset at its training patch size.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

from napari_xlstm_unet.inference.tiling import count_windows, fitted_side, predict_tiled
from napari_xlstm_unet.model import build_model, preset

PLACEMENTS = ("none", "bot", "enc", "full")
MEMORY_MODES = ("predictor", "fixed", "segment")
TRAIN_PATCH = {"small": (8, 192), "reference": (2, 512)}  # (batch, patch side)


def median_seconds(function, repeats: int) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gemm_flops_per_second(size: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    seconds = median_seconds(lambda: a @ b, repeats)
    return 2 * size**3 / seconds


def network_flops(model: torch.nn.Module, side: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(torch.zeros(1, 3, side, side))
    return float(counter.get_total_flops())


def speed_rows(args, gemm: float) -> list[dict]:
    rows = []
    image = np.random.default_rng(0).random((3, args.side, args.side), dtype=np.float32)
    megapixels = args.side * args.side / 1e6
    for name in args.presets:
        baseline = None
        for placement in PLACEMENTS:
            row = {"section": "speed", "preset": name, "xlstm": placement, "side": args.side}
            try:
                model = build_model(preset(name, xlstm=placement)).eval()
            except ValueError as error:
                rows.append({**row, "skipped": str(error)})
                continue
            try:
                seconds = median_seconds(
                    lambda: predict_tiled(model, image, 3, tile_size=512, device="cpu"), args.repeats)
            except (RuntimeError, ValueError) as error:
                rows.append({**row, "skipped": str(error).splitlines()[0]})
                continue
            flops = network_flops(model, 512) * (args.side / 512) ** 2
            baseline = seconds if placement == "none" else baseline
            rows.append({**row, "s_per_megapixel": seconds / megapixels,
                         "parameters_m": sum(p.numel() for p in model.parameters()) / 1e6,
                         "overhead_vs_none": seconds / baseline if baseline else float("nan"),
                         "gemm_share": flops / seconds / gemm})
            print(f"  speed {name}/{placement}: {seconds / megapixels:.2f} s/MP", file=sys.stderr, flush=True)
    return rows


def _memory_child(side: int, threads: int, mode: str) -> None:
    torch.set_num_threads(threads)
    from napari_xlstm_unet._sample_data import nuclei_sample
    from napari_xlstm_unet.inference.predict import segment_image
    from napari_xlstm_unet.pretrained import load_model

    loaded = load_model("cells", device="cpu")
    predict_tiled(loaded.model, np.zeros((3, 64, 64), np.float32), 3, tile_size=512)  # warm-up
    if mode == "segment":
        # The shipped nuclei sample (uint16, grey) repeated to the size: real
        # objects for the post-processing, which noise would not give.
        sample = nuclei_sample()[0][0]
        reps = -(-side // min(sample.shape))
        image = np.ascontiguousarray(np.tile(sample, (reps, reps))[:side, :side])
    else:
        image = np.random.default_rng(0).random((3, side, side), dtype=np.float32)
    # ru_maxrss survives fork and exec, so it can report the parent's peak.
    # Linux resets this process's own peak (VmHWM) on writing 5 to clear_refs.
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    before_mb = _status_mb("VmRSS")
    fit = mode != "fixed"
    multiple = loaded.config.total_stride
    start = time.perf_counter()
    if mode == "segment":
        result = segment_image(image, loaded)
        output_bytes = result.labels.nbytes + result.probabilities.nbytes
    else:
        output_bytes = predict_tiled(loaded.model, image, 3, tile_size=512, device="cpu", fit_windows=fit,
                                     multiple=multiple).nbytes
    seconds = time.perf_counter() - start
    window_side = fitted_side(side, 512, 0.125, multiple) if fit else min(side, 512)
    count = count_windows(side, side, 512, 0.125)
    peak_mb = _status_mb("VmHWM")
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_mb, "rss_before_mb": before_mb,
                      "output_mb": output_bytes / 2**20,
                      "working_mb": peak_mb - before_mb - output_bytes / 2**20,
                      "windows": count, "window_side": window_side,
                      "computed_megapixels": count * window_side**2 / 1e6}))


def _status_mb(field: str) -> float:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # the file gives kB
    raise RuntimeError(f"{field} not found in /proc/self/status; the memory section needs Linux")


def memory_rows(args) -> list[dict]:
    rows = []
    for side in args.memory_sides:
        for mode in args.memory_modes:
            command = [sys.executable, __file__, "--memory-child", str(side), "--threads", str(args.threads),
                       "--memory-modes", mode]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            result = json.loads(output.strip().splitlines()[-1])
            rows.append({"section": "memory", "side": side, "mode": mode, "megapixels": side * side / 1e6,
                         **result, "s_per_megapixel": result["seconds"] / (side * side / 1e6),
                         "s_per_computed_megapixel": result["seconds"] / result["computed_megapixels"]})
            print(f"  memory {side} {mode}: {result['seconds']:.2f} s, {result['peak_rss_mb']:.0f} MB peak, "
                  f"{result['working_mb']:.0f} MB above input and output",
                  file=sys.stderr, flush=True)
    return rows


def peer_rows(args, gemm: float) -> list[dict]:
    try:
        from cellpose.resnet_torch import CPnet
    except ImportError:
        return [{"section": "peer", "model": "cellpose CPnet", "skipped": "cellpose not installed"}]
    net = CPnet(nbase=[3, 32, 64, 128, 256], nout=3, sz=3).eval()
    image = torch.randn(1, 3, args.side, args.side)

    def run():
        with torch.inference_mode():
            net(image)

    seconds = median_seconds(run, args.repeats)
    return [{"section": "peer", "model": "cellpose CPnet (no weights)", "side": args.side,
             "s_per_megapixel": seconds / (args.side**2 / 1e6),
             "parameters_m": sum(p.numel() for p in net.parameters()) / 1e6}]


def training_rows(args) -> list[dict]:
    rows = []
    for name in args.presets:
        batch, side = TRAIN_PATCH[name]
        model = build_model(preset(name, xlstm="bot")).train()
        optimizer = torch.optim.AdamW(model.parameters())
        images, targets = torch.randn(batch, 3, side, side), torch.randint(0, 3, (batch, side, side))

        def step():
            outputs = model(images)
            loss = sum(torch.nn.functional.cross_entropy(o, targets[:, ::side // o.shape[-1], ::side // o.shape[-1]])
                       for o in outputs)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        seconds = median_seconds(step, args.train_repeats)
        rows.append({"section": "training", "preset": name, "xlstm": "bot", "batch": batch, "patch": side,
                     "patches_per_s": batch / seconds})
        print(f"  training {name}: {batch / seconds:.2f} patches/s", file=sys.stderr, flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--side", type=int, default=512, help="image side for the speed and peer sections")
    parser.add_argument("--presets", nargs="+", default=["small", "reference"])
    parser.add_argument("--memory-sides", nargs="+", type=int, default=[512, 600, 1024, 2048, 4096])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-repeats", type=int, default=2)
    parser.add_argument("--sections", nargs="+", default=["speed", "memory", "peer", "training"])
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--memory-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--memory-modes", nargs="+", choices=MEMORY_MODES, default=["predictor", "segment"],
                        help="predictor: the tiled predictor on a random 3-channel float32 image, windows "
                             "fitted; fixed: the same with fixed 512-pixel windows; segment: the whole "
                             "segment_image call on the grey uint16 nuclei sample repeated to the size")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_child:
        _memory_child(args.memory_child, args.threads, args.memory_modes[0])
        return 0

    gemm = gemm_flops_per_second()
    machine = {"section": "machine", "processor": platform.processor() or platform.machine(),
               "cpus": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "gemm_gflops": gemm / 1e9}
    rows = [machine]
    if "speed" in args.sections:
        rows += speed_rows(args, gemm)
    if "memory" in args.sections:
        rows += memory_rows(args)
    if "peer" in args.sections:
        rows += peer_rows(args, gemm)
    if "training" in args.sections:
        rows += training_rows(args)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            print(", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
