"""Write the fixed train / validation / test split of the DSB2018 images.

The split covers the DSB2018 images (CC0) of the shared ``microscopy-extra``
folder and the DSB2018 rows of ``microscopy``; GBM40 has no stated licence
and is left out. Images are shuffled with a fixed seed within each
(dataset, modality) group, and 15 % of each group go to test and 10 % to
validation, so every modality appears in every split.

    python training/make_split.py --data-root ../shared/data \
        --out training/splits/dsb2018.csv
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

DATASETS = ("microscopy-extra", "microscopy")
TEST_FRACTION, VAL_FRACTION = 0.15, 0.10


def main() -> int:
    parser = argparse.ArgumentParser(description="Write the DSB2018 split CSV.")
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    groups: dict[tuple[str, str], list[str]] = {}
    for dataset in DATASETS:
        with open(args.data_root / dataset / "index.csv", newline="") as handle:
            for row in csv.DictReader(handle):
                if "DSB2018" not in row["source"]:
                    continue
                groups.setdefault((dataset, row["modality"]), []).append(row["name"])

    rng = np.random.default_rng(args.seed)
    rows = []
    for (dataset, modality), names in sorted(groups.items()):
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
            rows.append({"dataset": dataset, "name": names[index], "modality": modality, "split": split})

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
