"""Store evaluation scores in a checkpoint's model card.

    python training/record_scores.py runs/cells_small.pt \
        --score test_f1_at_0.5=runs/benchmark_cells/dsb2018_test_model.csv \
        --score gbm40_f1_at_0.5=runs/benchmark_cells/gbm40_model.csv

Each ``--score KEY=CSV`` stores the mean of the ``f1`` column of a CSV
written by ``xlstm-unet evaluate --csv``, with the number of images. The
checkpoint is rewritten atomically.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from napari_xlstm_unet.model.checkpoint import load_checkpoint, save_checkpoint


def mean_f1(csv_path: Path) -> tuple[float, int]:
    with open(csv_path, newline="") as handle:
        values = [float(row["f1"]) for row in csv.DictReader(handle)]
    if not values:
        raise ValueError(f"{csv_path} has no rows; run xlstm-unet evaluate --csv first")
    return float(np.mean(values)), len(values)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--score", action="append", default=[], metavar="KEY=CSV",
                        help="model-card key and the evaluate CSV whose mean F1 it records")
    parser.add_argument("--note", action="append", default=[], metavar="KEY=TEXT",
                        help="free-text model-card entry")
    args = parser.parse_args()

    loaded = load_checkpoint(args.checkpoint)
    for item in args.score:
        key, _, path = item.partition("=")
        value, count = mean_f1(Path(path))
        loaded.model_card[key] = round(value, 4)
        loaded.model_card[key + "_images"] = count
        print(f"{key} = {value:.4f} over {count} images")
    for item in args.note:
        key, _, text = item.partition("=")
        loaded.model_card[key] = text
    save_checkpoint(args.checkpoint, loaded)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
