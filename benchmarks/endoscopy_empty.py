"""How often a lesion model leaves lesion-free input empty.

    python benchmarks/endoscopy_empty.py --model polyps --split training/splits/polyps.csv \
        --data-root ../shared/data

The shared polyp frames all contain a polyp, so lesion-free input is made in
two ways:

- ``crops``: from every test frame, up to two non-overlapping square crops
  (``--crop`` pixels, default 192) that contain no polyp pixel, found by
  sliding a window in steps of 16 pixels;
- ``laparoscopy``: the laparoscopic frames of the instrument dataset
  (``cholecinstseg_*`` in ``endoscopy-instruments``), which show abdominal
  surgery and no polyp.

For each set it prints how many inputs come back with no foreground pixel,
and the mean and largest foreground share of the others.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from napari_xlstm_unet.inference.predict import segment_image
from napari_xlstm_unet.io import read_image
from napari_xlstm_unet.pretrained import load_model
from napari_xlstm_unet.training.data import read_split_csv


def free_crops(mask: np.ndarray, size: int, step: int = 16, limit: int = 2) -> list[tuple[int, int]]:
    """Return up to ``limit`` top-left corners of non-overlapping lesion-free ``size`` squares."""
    height, width = mask.shape
    taken: list[tuple[int, int]] = []
    for y in range(0, height - size + 1, step):
        for x in range(0, width - size + 1, step):
            if mask[y:y + size, x:x + size].any():
                continue
            if all(abs(y - ty) >= size or abs(x - tx) >= size for ty, tx in taken):
                taken.append((y, x))
            if len(taken) == limit:
                return taken
    return taken


def summarise(name: str, shares: list[float]) -> None:
    shares_array = np.asarray(shares)
    empty = int(np.sum(shares_array == 0))
    nonzero = shares_array[shares_array > 0]
    detail = (f"; the others: mean {100 * nonzero.mean():.2f} %, largest {100 * nonzero.max():.2f} % of pixels"
              if len(nonzero) else "")
    print(f"{name}: {empty} of {len(shares_array)} inputs empty{detail}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="polyps", help="shipped model name or checkpoint")
    parser.add_argument("--split", type=Path, required=True)
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--crop", type=int, default=192)
    args = parser.parse_args(argv)

    loaded = load_model(args.model, device="cpu")
    crop_shares = []
    for pair in read_split_csv(args.split, args.data_root)["test"]:
        image = read_image(pair.image).data
        mask = read_image(pair.mask).data > 0
        for y, x in free_crops(mask, args.crop):
            labels = segment_image(image[y:y + args.crop, x:x + args.crop], loaded).labels
            crop_shares.append(float(np.count_nonzero(labels)) / labels.size)
    summarise(f"lesion-free {args.crop} x {args.crop} crops of test frames", crop_shares)

    laparoscopy = sorted((args.data_root / "endoscopy-instruments" / "images").glob("cholecinstseg_*"))
    frame_shares = []
    for path in laparoscopy:
        labels = segment_image(read_image(path).data, loaded).labels
        frame_shares.append(float(np.count_nonzero(labels)) / labels.size)
    summarise("laparoscopy frames without polyps", frame_shares)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
