"""Files per second of the batch engine on a folder, with the shipped model.

    python benchmarks/batch_throughput.py ../shared/data/microscopy/images [--threads 2]

Segments every image of the folder into a temporary folder with
:func:`napari_xlstm_unet.batch.run_batch`. Prints the machine, the number
of files and megapixels, the wall time, files and megapixels per second,
and the sum of the per-file seconds, for comparison with the wall time.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from napari_xlstm_unet.batch import BatchOptions, run_batch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--task", default="cells")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    rows = []
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        summary = run_batch([args.folder], BatchOptions(out_dir=Path(out), task=args.task),
                            on_result=lambda result, done, total: rows.append(result))
        wall = time.perf_counter() - start
    pixels = sum(pixel_count(r.shape) for r in rows if r.status == "ok")
    busy = sum(float(r.seconds) for r in rows if r.status == "ok")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{summary['ok']} files ok, {summary['failed']} failed, {pixels / 1e6:.1f} megapixels")
    print(f"wall {wall:.1f} s (model loading included): {summary['ok'] / wall:.2f} files/s, "
          f"{pixels / 1e6 / wall:.2f} megapixels/s; per-file segmentation time summed: {busy:.1f} s")
    return 0


def pixel_count(shape: str) -> int:
    total = 1
    for side in shape.split("x"):
        total *= int(side)
    return total


if __name__ == "__main__":
    raise SystemExit(main())
