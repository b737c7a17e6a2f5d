"""Link the images and masks of one split into plain folders for the command line.

    python benchmarks/split_folders.py --split training/splits/dsb2018.csv \
        --data-root ../shared/data --which test --out runs/test_split

writes ``OUT/images/<name>.<ext>`` and ``OUT/masks/<name>.<ext>`` as symbolic links.
With ``--gbm40`` it links the GBM40 images of ``microscopy`` instead.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", type=Path)
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--which", default="test", help="train, val or test")
    parser.add_argument("--gbm40", action="store_true", help="link the GBM40 images instead")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    if args.gbm40:
        folder = args.data_root / "microscopy"
        rows = [{"dataset": "microscopy", "name": p.stem}
                for p in sorted((folder / "images").glob("gbm40_*.tif"))]
    else:
        with open(args.split, newline="") as handle:
            rows = [r for r in csv.DictReader(handle) if r["split"] == args.which]

    for kind in ("images", "masks"):
        target = args.out / kind
        target.mkdir(parents=True, exist_ok=True)
        for row in rows:
            # The file keeps its own suffix (.tif for cells, .png for endoscopy).
            source = next((args.data_root / row["dataset"] / kind).glob(f"{row['name']}.*"))
            link = target / source.name
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(source.resolve())
    print(f"linked {len(rows)} image/mask pairs under {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
