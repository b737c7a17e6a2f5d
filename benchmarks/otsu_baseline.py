"""Classical baseline: Otsu threshold plus distance-transform watershed.

Writes ``<stem>_labels.tif`` for each input image, the same naming as
``xlstm-unet segment``, so ``xlstm-unet evaluate`` scores both alike.

    python benchmarks/otsu_baseline.py IMAGE_OR_FOLDER... --out DIR
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from skimage.feature import peak_local_max
from skimage.filters import gaussian, threshold_otsu
from skimage.segmentation import relabel_sequential, watershed

from napari_xlstm_unet.inference.normalize import normalize_percentile, to_channels_first
from napari_xlstm_unet.io import labels_output_path, list_images, read_image, write_labels


def otsu_watershed(image: np.ndarray, has_alpha: bool = False, min_size: int = 16,
                   min_distance: int = 4) -> np.ndarray:
    """Return instance labels from Otsu foreground split by a distance watershed.

    Multi-channel images are averaged to grey. Objects are assumed brighter
    than the background. When the Otsu foreground covers more than half the
    image (dark nuclei on a bright stain), the foreground is inverted.
    """
    grey = normalize_percentile(to_channels_first(image, has_alpha)).mean(axis=0)
    grey = gaussian(grey, sigma=1)
    if grey.max() <= grey.min():
        return np.zeros(grey.shape, np.uint16)
    foreground = grey > threshold_otsu(grey)
    if foreground.mean() > 0.5:
        foreground = ~foreground
    components, _ = ndi.label(foreground)
    sizes = np.bincount(components.ravel())
    foreground &= sizes[components] >= min_size
    distance = ndi.distance_transform_edt(foreground)
    peaks = peak_local_max(distance, min_distance=min_distance, labels=ndi.label(foreground)[0],
                           exclude_border=False)
    markers = np.zeros(grey.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    labels = watershed(-distance, markers, mask=foreground)
    return relabel_sequential(labels)[0].astype(np.uint16)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    used_paths: set[Path] = set()
    for path in list_images(args.inputs):
        image = read_image(path)
        labels = otsu_watershed(image.data, image.has_alpha)
        write_labels(labels_output_path(path, args.out, used_paths), labels, overwrite=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
