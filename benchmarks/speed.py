"""Time segmentation of a 512 x 512 image with the shipped cell model.

    python benchmarks/speed.py [--threads 2] [--repeats 10] [--image PATH]

Prints the machine, then the median and minimum wall time of the whole call
(normalisation, network, post-processing) in float32 and in bfloat16, and of
the network and the post-processing alone in float32, the latter also
without seed splitting (``split_depth`` 0). Each figure comes from
``--repeats`` runs after one warm-up run, interleaved so that machine noise
hits every row alike.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from napari_xlstm_unet.inference.postprocess import probabilities_to_labels
from napari_xlstm_unet.inference.predict import predict_probabilities, segment_image
from napari_xlstm_unet.io import read_image
from napari_xlstm_unet.pretrained import load_model

DEFAULT_IMAGE = Path(__file__).resolve().parents[2] / "shared/data/microscopy/images/stardist_dsb2018_img2d.tif"


def time_interleaved(functions: dict, repeats: int) -> dict[str, list[float]]:
    """Return wall times per function, running one of each per round."""
    for function in functions.values():
        function()
    seconds: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            seconds[name].append(time.perf_counter() - start)
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE, help="a 512 x 512 image")
    parser.add_argument("--model", default="cells", help="shipped model name or checkpoint path")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    loaded = load_model(args.model, device="cpu")
    image = read_image(args.image).data
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"image: {args.image.name} {image.shape} {image.dtype}; model: {loaded.source}")

    probabilities = predict_probabilities(image, loaded)
    params = loaded.postprocess
    functions = {
        "whole call": lambda: segment_image(image, loaded),
        "whole call, bfloat16": lambda: segment_image(image, loaded, precision="bfloat16"),
        "network only": lambda: predict_probabilities(image, loaded),
        "post-processing only": lambda: probabilities_to_labels(
            probabilities, params["prob_threshold"], params["min_size"], params.get("split_depth", 0.0)
        ),
        "post-processing, no split": lambda: probabilities_to_labels(
            probabilities, params["prob_threshold"], params["min_size"], 0.0
        ),
    }
    rows = time_interleaved(functions, args.repeats)
    for name, seconds in rows.items():
        print(f"{name:26s} median {statistics.median(seconds):.3f} s   min {min(seconds):.3f} s")
    objects = int(np.max(segment_image(image, loaded).labels))
    print(f"objects found: {objects}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
