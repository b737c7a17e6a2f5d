"""Training targets for cells: background (0), interior (1), boundary (2).

The rule follows the NeurIPS 2022 CellSeg challenge's 3-class conversion.
The boundary is each object's inner boundary (``find_boundaries(mode="inner")``)
dilated by a radius-1 disk, and the interior is every other object pixel.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import find_boundaries

logger = logging.getLogger(__name__)

BACKGROUND, INTERIOR, BOUNDARY = 0, 1, 2


def instances_to_classes(labels: np.ndarray) -> np.ndarray:
    """Return a uint8 class map (H, W) from an instance label image (H, W)."""
    boundary = find_boundaries(labels, mode="inner")
    disk1 = ndi.generate_binary_structure(2, 1)  # the radius-1 disk: a plus sign
    boundary = ndi.binary_dilation(boundary, structure=disk1)
    classes = np.zeros(labels.shape, dtype=np.uint8)
    classes[labels > 0] = INTERIOR
    classes[boundary] = BOUNDARY
    return classes


def check_instance_mask(labels: np.ndarray, path: str | Path) -> None:
    """Warn when an instance mask looks binary, since touching cells would merge.

    A mask holding only {0, 1} or {0, 255} marks foreground, not objects:
    touching cells share one id and the network learns no boundary between
    them. Raises ``ValueError`` for negative or non-integer masks.
    """
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"mask {path} has dtype {labels.dtype}; expected integer instance labels")
    if labels.size and labels.min() < 0:
        raise ValueError(f"mask {path} contains negative values; expected 0 = background, 1..N = objects")
    values = np.unique(labels)
    if len(values) == 2 and values[0] == 0 and values[1] in (1, 255):
        n_components = ndi.label(labels > 0)[1]
        if n_components < 2:
            return  # one object: binary and instance masks agree
        logger.warning(
            "mask %s contains only the values {0, %s}: it is a binary mask, not instance labels; "
            "its %s connected components are used as objects and touching cells merge. "
            "Give one id per cell for correct boundaries.",
            path, values[1], n_components,
        )
