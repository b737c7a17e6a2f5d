"""Simple baselines for binary endoscopy segmentation, written as class maps for ``xlstm-unet evaluate``.

    python benchmarks/endoscopy_baselines.py --split training/splits/polyps.csv \
        --data-root ../shared/data --out runs/polyp_baselines

Two baselines, each fitted on the training rows of the split only:

- ``ellipse``: one centred ellipse whose semi-axes are a fixed fraction of
  the frame's height and width, the fraction chosen to maximise the mean
  Dice on the training masks. It measures how much a "lesions sit near the
  middle" prior alone scores.
- ``otsu``: Otsu's threshold on the saturation channel (HSV), the side
  (above or below) chosen on the training masks, then the largest connected
  component.

For every test image it writes ``OUT/<baseline>/<name>_labels.tif`` (uint8,
0 = background, 1 = foreground) and writes the test masks into
``OUT/ground_truth``, so that both methods are scored by the same command:
``xlstm-unet evaluate --task endoscopy OUT/ellipse OUT/ground_truth``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage as ndi
from skimage.color import rgb2hsv
from skimage.filters import threshold_otsu

from napari_xlstm_unet.io import read_image
from napari_xlstm_unet.metrics.semantic import dice
from napari_xlstm_unet.training.data import read_split_csv

FRACTIONS = np.round(np.arange(0.10, 0.46, 0.025), 3)


def ellipse(shape: tuple[int, int], fraction: float) -> np.ndarray:
    """Return a boolean centred ellipse with semi-axes ``fraction`` x (height, width)."""
    height, width = shape
    yy, xx = np.mgrid[:height, :width]
    ry, rx = fraction * height, fraction * width
    return ((yy - (height - 1) / 2) / ry) ** 2 + ((xx - (width - 1) / 2) / rx) ** 2 <= 1.0


def otsu_saturation(image: np.ndarray, above: bool) -> np.ndarray:
    """Return the largest component of the Otsu-thresholded saturation channel."""
    saturation = rgb2hsv(image[..., :3])[..., 1]
    mask = saturation > threshold_otsu(saturation) if above else saturation <= threshold_otsu(saturation)
    labels, count = ndi.label(mask)
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (int(np.argmax(sizes)) + 1)


def load(pairs) -> list[tuple[str, np.ndarray, np.ndarray]]:
    return [(p.image.stem, read_image(p.image).data, read_image(p.mask).data > 0) for p in pairs]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", type=Path, required=True)
    parser.add_argument("--data-root", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    splits = read_split_csv(args.split, args.data_root)
    train, test = load(splits["train"]), load(splits["test"])
    scores = {f: np.mean([dice(m, ellipse(m.shape, f)) for _, _, m in train]) for f in FRACTIONS}
    fraction = max(scores, key=scores.get)
    above = np.mean([dice(m, otsu_saturation(i, True)) for _, i, m in train]) >= \
        np.mean([dice(m, otsu_saturation(i, False)) for _, i, m in train])
    print(f"ellipse fraction {fraction} (train Dice {scores[fraction]:.3f}); otsu side "
          f"{'above' if above else 'below'} the threshold")

    for folder in ("ellipse", "otsu", "ground_truth"):
        (args.out / folder).mkdir(parents=True, exist_ok=True)
    for name, image, mask in test:
        tifffile.imwrite(args.out / "ellipse" / f"{name}_labels.tif", ellipse(mask.shape, fraction).astype(np.uint8))
        tifffile.imwrite(args.out / "otsu" / f"{name}_labels.tif", otsu_saturation(image, above).astype(np.uint8))
        tifffile.imwrite(args.out / "ground_truth" / f"{name}.tif", mask.astype(np.uint8))
    print(f"wrote {len(test)} test predictions per baseline under {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
