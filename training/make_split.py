"""Write a fixed train / validation / test split of shared datasets.

Images are shuffled with a fixed seed within each (dataset, group) pair,
where the group is a column of the dataset's ``index.csv`` (the modality for
cells, the source for endoscopy). 15 % of each group go to test and 10 % to
validation, so every group appears in every split.

The cell split covers the DSB2018 images (CC0) of ``microscopy-extra`` and the
DSB2018 rows of ``microscopy``. GBM40 has no stated licence and is left out::

    python training/make_split.py --data-root ../shared/data \
        --out training/splits/dsb2018.csv

The endoscopy splits::

    python training/make_split.py --data-root ../shared/data --datasets endoscopy \
        --source-filter "" --group-column source --out training/splits/polyps.csv
    python training/make_split.py --data-root ../shared/data --datasets endoscopy-instruments \
        --source-filter "" --group-column source --out training/splits/instruments.csv
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

DATASETS = ("microscopy-extra", "microscopy")
TEST_FRACTION, VAL_FRACTION = 0.15, 0.10


def main() -> int:
    parser = argparse.ArgumentParser(description="Write a split CSV of shared datasets.")
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), help="dataset folders to split")
    parser.add_argument("--source-filter", default="DSB2018",
                        help="keep rows whose source column contains this text ('' keeps all)")
    parser.add_argument("--group-column", default="modality", help="index.csv column that groups images")
    args = parser.parse_args()

    groups: dict[tuple[str, str], list[str]] = {}
    for dataset in args.datasets:
        with open(args.data_root / dataset / "index.csv", newline="") as handle:
            for row in csv.DictReader(handle):
                if args.source_filter not in row["source"]:
                    continue
                groups.setdefault((dataset, row[args.group_column]), []).append(row["name"])

    rng = np.random.default_rng(args.seed)
    rows = []
    for (dataset, group), names in sorted(groups.items()):
        names = sorted(names)
        order = rng.permutation(len(names))
        n_test = max(1, round(TEST_FRACTION * len(names)))
        n_val = max(1, round(VAL_FRACTION * len(names))) if len(names) > 2 else 0
        for rank, index in enumerate(order):
            if rank < n_test:
                split = "test"
            elif rank < n_test + n_val:
                split = "val"
            else:
                split = "train"
            rows.append({"dataset": dataset, "name": names[index], "modality": group, "split": split})

    rows.sort(key=lambda r: (r["split"], r["dataset"], r["name"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["dataset", "name", "modality", "split"])
        writer.writeheader()
        writer.writerows(rows)
    counts = {s: sum(r["split"] == s for r in rows) for s in ("train", "val", "test")}
    print(f"wrote {args.out}: {counts}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
