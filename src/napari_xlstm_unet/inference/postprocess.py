"""Turn 3-class probabilities (background, interior, boundary) into instance labels."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import relabel_sequential, watershed

__all__ = ["labels_dtype", "probabilities_to_labels", "relabel_planes"]


def labels_dtype(max_label: int) -> np.dtype:
    """Return uint16 for up to 65,535 objects, uint32 beyond."""
    return np.dtype(np.uint16) if max_label <= np.iinfo(np.uint16).max else np.dtype(np.uint32)


def probabilities_to_labels(
    probabilities: np.ndarray,
    prob_threshold: float = 0.5,
    min_size: int = 16,
) -> np.ndarray:
    """Build instance labels from interior seeds grown into the cell mask.

    Seeds are the 8-connected components of ``P(interior) > prob_threshold``.
    Each seed grows by a watershed on ``-P(interior)`` into the cell mask
    ``P(interior) + P(boundary) > 0.5``, so the thin boundary band given to
    neighbouring cells in training returns to its cells. Objects smaller than
    ``min_size`` pixels are removed and the rest numbered 1..N.

    Parameters
    ----------
    probabilities : numpy.ndarray, shape (3, H, W)
        Softmax output: background, interior, boundary.
    prob_threshold : float
        Interior probability above which a pixel seeds an object.
    min_size : int
        Smallest object kept, in pixels.

    Returns
    -------
    numpy.ndarray, shape (H, W)
        Labels, 0 for background; uint16, or uint32 past 65,535 objects.
    """
    if probabilities.ndim != 3 or probabilities.shape[0] != 3:
        raise ValueError(
            f"expected probabilities of shape (3, H, W) (background, interior, boundary), "
            f"got {probabilities.shape}"
        )
    interior = np.nan_to_num(probabilities[1], nan=0.0)
    cell_mask = (interior + np.nan_to_num(probabilities[2], nan=0.0)) > 0.5
    seeds, n_seeds = ndi.label(interior > prob_threshold, structure=np.ones((3, 3), bool))
    if n_seeds == 0:
        return np.zeros(interior.shape, dtype=np.uint16)

    labels = watershed(-interior, markers=seeds, mask=cell_mask | (seeds > 0))
    if min_size > 0:
        sizes = np.bincount(labels.ravel())
        too_small = sizes < min_size
        too_small[0] = False
        labels[too_small[labels]] = 0
    labels, _, _ = relabel_sequential(labels)
    return labels.astype(labels_dtype(int(labels.max())), copy=False)


def relabel_planes(probabilities: np.ndarray, prob_threshold: float, min_size: int) -> np.ndarray:
    """Apply :func:`probabilities_to_labels` to (3, H, W) or to every plane of (*planes, 3, H, W).

    This is all that changes when only the thresholds change: the network's
    probabilities are reused as they are.
    """
    if probabilities.ndim == 3:
        return probabilities_to_labels(probabilities, prob_threshold, min_size)
    flat = probabilities.reshape((-1,) + probabilities.shape[-3:])
    planes = [probabilities_to_labels(plane, prob_threshold, min_size) for plane in flat]
    dtype = max((plane.dtype for plane in planes), key=lambda d: d.itemsize)
    return np.stack(planes).astype(dtype, copy=False).reshape(probabilities.shape[:-3] + flat.shape[-2:])
