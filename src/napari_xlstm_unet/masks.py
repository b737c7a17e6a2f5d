"""Reading class masks: the rules shared by training and evaluation.

Semantic masks hold class indices 0..K-1. ``ignore_value`` (if given) marks
pixels left out of the loss and the metrics. With K = 2 (background plus one
class) a {0, 255} mask is read as background/foreground, and a mask with many
grey levels (a binary mask saved as JPEG) is thresholded at 128 with a
warning. Any other value outside the declared classes is an error.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

__all__ = ["IGNORE_INDEX", "ground_truth_classes", "semantic_classes"]

logger = logging.getLogger(__name__)

# Class-map value of ignored pixels (uint8 class maps, so at most 255 classes).
IGNORE_INDEX = 255


def semantic_classes(mask: np.ndarray, path: str | Path, n_classes: int, ignore_value: int | None) -> np.ndarray:
    """Return a uint8 class map from a semantic mask, ignored pixels set to ``IGNORE_INDEX``.

    Raises
    ------
    ValueError
        If the mask contains values outside the declared classes that no rule of
        this module's docstring covers; the message names the file and values.
    """
    mask = np.asarray(mask)
    if np.issubdtype(mask.dtype, np.floating):
        if not np.all(np.isfinite(mask)) or np.any(mask != np.round(mask)):
            raise ValueError(f"mask {path} contains non-integer values; expected class indices 0..{n_classes - 1}")
        mask = mask.astype(np.int64)
    ignore = mask == ignore_value if ignore_value is not None else np.zeros(mask.shape, bool)
    values = np.unique(mask[~ignore])
    valid = (values >= 0) & (values < n_classes)
    if valid.all():
        classes = mask.astype(np.uint8)
    elif n_classes == 2 and set(values.tolist()) <= {0, 255}:
        logger.info("mask %s contains only {0, 255}: read as background (0) and foreground (255)", path)
        classes = (mask == 255).astype(np.uint8)
    elif n_classes == 2 and len(values) > 3 and mask.max() <= 255 and mask.min() >= 0:
        logger.warning(
            "mask %s contains %d grey levels, like a binary mask saved with lossy (JPEG) compression; "
            "thresholded at 128. Save masks as PNG or TIFF to keep them exact.", path, len(values),
        )
        classes = (mask >= 128).astype(np.uint8)
    else:
        bad = values[~valid]
        hint = (
            f"; if {int(bad[-1])} marks pixels to leave out, set data.ignore_value: {int(bad[-1])} "
            f"in training or pass --ignore-value {int(bad[-1])} to evaluate"
            if len(bad) == 1 else ""
        )
        raise ValueError(
            f"mask {path} contains values {bad[:8].tolist()} outside the declared classes "
            f"0..{n_classes - 1}{hint}; otherwise list every class in data.classes"
        )
    classes[ignore] = IGNORE_INDEX
    return classes


def ground_truth_classes(truth: np.ndarray, path: str | Path, prediction: np.ndarray,
                         ignore_value: int | None = None) -> np.ndarray:
    """Return a ground-truth class map for scoring ``prediction``, by the rules of :func:`semantic_classes`.

    The number of classes is the larger of what the prediction and the ground
    truth use, at least 2. The value 255 and ``ignore_value`` do not count as
    classes, so a {0, 255} mask stays binary.
    """
    ignored = truth == 255
    if ignore_value is not None:
        ignored |= truth == ignore_value
    n_classes = max(2, int(prediction.max(initial=0)) + 1, int(truth[~ignored].max(initial=0)) + 1)
    return semantic_classes(truth, path, n_classes, ignore_value)
