"""Test-time mirroring against one pass: mean F1 at IoU 0.5 and time, per split.

Segments every validation and test image of a split CSV twice with the same
model: once as is, and once averaged over the 4 mirror images of each window
(``segment_image(..., mirror=True)``). Both are scored by the NeurIPS 2022
cell rule, which leaves out objects touching a 2-pixel border. The two passes
of one image run back to back, so their time ratio shares the machine's load.

    python benchmarks/mirroring.py [--model cells] [--split training/splits/dsb2018.csv]
        [--data-root ../shared/data] [--threads 2] [--csv FILE]

Prints one line per split and modality, then the time ratio.
"""

from __future__ import annotations

import argparse
import csv
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from napari_xlstm_unet.inference.predict import segment_image
from napari_xlstm_unet.io import read_image
from napari_xlstm_unet.metrics import match_instances
from napari_xlstm_unet.pretrained import load_model
from napari_xlstm_unet.training.data import read_split_csv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="cells", help="shipped model name or checkpoint file")
    parser.add_argument("--split", type=Path, default=Path("training/splits/dsb2018.csv"))
    parser.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    parser.add_argument("--splits", nargs="+", default=["val", "test"], help="split names to score")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--csv", type=Path, default=None, help="write one row per image and mode")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    loaded = load_model(args.model, device="cpu")
    pairs = read_split_csv(args.split, args.data_root)
    rows = []
    seconds = {False: 0.0, True: 0.0}
    for split in args.splits:
        for pair in pairs.get(split, []):
            image = read_image(pair.image)
            truth = read_image(pair.mask).data
            for mirror in (False, True):
                start = time.perf_counter()
                labels = segment_image(image.data, loaded, has_alpha=image.has_alpha, axes=image.axes,
                                       mirror=mirror).labels
                seconds[mirror] += time.perf_counter() - start
                result = match_instances(truth, labels)
                rows.append({"split": split, "modality": pair.group, "name": pair.image.stem,
                             "mirror": mirror, "f1": result.f1})

    if not rows:
        raise SystemExit(f"no images in the splits {args.splits} of {args.split}; "
                         f"it has {sorted(pairs)}")
    groups = defaultdict(list)
    for row in rows:
        groups[(row["split"], "all", row["mirror"])].append(row["f1"])
        groups[(row["split"], row["modality"], row["mirror"])].append(row["f1"])
    print(f"model {args.model}; mean F1 at IoU 0.5")
    print(f"{'split':6s} {'modality':16s} {'images':>6s} {'one pass':>9s} {'mirrored':>9s} {'change':>8s}")
    for split, modality, mirror in sorted(groups):
        if mirror:
            continue
        plain, mirrored = np.mean(groups[(split, modality, False)]), np.mean(groups[(split, modality, True)])
        print(f"{split:6s} {modality:16s} {len(groups[(split, modality, False)]):6d} "
              f"{plain:9.4f} {mirrored:9.4f} {mirrored - plain:+8.4f}")
    print(f"time: one pass {seconds[False]:.1f} s, mirrored {seconds[True]:.1f} s, "
          f"ratio {seconds[True] / max(seconds[False], 1e-9):.2f} ({args.threads} threads)")
    if args.csv is not None:
        with open(args.csv, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
