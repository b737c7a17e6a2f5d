"""Mean F1 per imaging modality from `xlstm-unet evaluate --csv` files.

    python benchmarks/by_modality.py runs/benchmark_cells/dsb2018_test_model.csv \
        runs/benchmark_cells/dsb2018_test_otsu.csv

The modality of each image comes from the split CSV (`--split`, the
project's DSB2018 split by default), matched on the image name. Prints one
row per modality and one column per evaluate CSV.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("csvs", nargs="+", type=Path, help="CSV files written by xlstm-unet evaluate --csv")
    parser.add_argument("--split", type=Path, default=REPO / "training" / "splits" / "dsb2018.csv",
                        help="split CSV with the columns name and modality")
    args = parser.parse_args(argv)

    with open(args.split, newline="") as handle:
        modality = {row["name"]: row.get("modality") or "all" for row in csv.DictReader(handle)}
    columns = []
    for path in args.csvs:
        scores = defaultdict(list)
        with open(path, newline="") as handle:
            for row in csv.DictReader(handle):
                if row["name"] not in modality:
                    print(f"error: {row['name']} in {path} is not in {args.split}", file=sys.stderr)
                    return 2
                scores[modality[row["name"]]].append(float(row["f1"]))
        columns.append(scores)
    groups = sorted(set().union(*columns))
    print(f"{'modality':16s} {'images':>6s} " + " ".join(f"{path.stem:>24s}" for path in args.csvs))
    for group in groups:
        counts = {len(column.get(group, [])) for column in columns}
        values = " ".join(f"{np.mean(column[group]):24.3f}" if group in column else f"{'-':>24s}"
                          for column in columns)
        print(f"{group:16s} {'/'.join(map(str, sorted(counts))):>6s} {values}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
