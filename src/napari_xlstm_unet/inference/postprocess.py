"""Turn 3-class probabilities (background, interior, boundary) into instance labels."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.morphology import local_maxima, reconstruction
from skimage.segmentation import relabel_sequential, watershed

__all__ = ["labels_dtype", "probabilities_to_labels", "relabel_planes", "remove_small", "split_seeds"]

_EIGHT = np.ones((3, 3), bool)
# Smoothing of the distance map before its maxima are searched, in pixels of
# the full-resolution image: without it every kink of a seed outline makes a
# maximum, and seeds split into slivers.
SPLIT_SMOOTHING = 2.0


def labels_dtype(max_label: int) -> np.dtype:
    """Return uint16 for up to 65,535 objects, uint32 beyond."""
    return np.dtype(np.uint16) if max_label <= np.iinfo(np.uint16).max else np.dtype(np.uint32)


def probabilities_to_labels(
    probabilities: np.ndarray,
    prob_threshold: float = 0.5,
    min_size: int = 16,
    split_depth: float = 0.0,
) -> np.ndarray:
    """Build instance labels from interior seeds grown into the cell mask.

    Seeds are the 8-connected components of ``P(interior) > prob_threshold``,
    each split by :func:`split_seeds` when ``split_depth`` is above 0.
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
    split_depth : float
        Smallest dip, in pixels, of a seed's smoothed distance map between
        two nuclei for the seed to split (see :func:`split_seeds`); larger
        values split less, 0 keeps every seed whole.

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
    if split_depth < 0:
        raise ValueError(f"split_depth is a distance in pixels, at least 0 (0 = no splitting), got {split_depth}")
    interior = _finite(probabilities[1])
    cell_mask = (interior + _finite(probabilities[2])) > 0.5
    seed_mask = interior > prob_threshold
    if split_depth > 0:
        seeds = split_seeds(seed_mask, split_depth)
    else:
        seeds, _ = ndi.label(seed_mask, structure=_EIGHT)
    if not seeds.any():
        return np.zeros(interior.shape, dtype=np.uint16)

    labels = watershed(-interior, markers=seeds, mask=cell_mask | seed_mask)
    return remove_small(labels, min_size)


def _finite(plane: np.ndarray) -> np.ndarray:
    """Return ``plane`` as it is when finite, else a copy with NaN set to 0."""
    return plane if np.isfinite(plane).all() else np.nan_to_num(plane, nan=0.0)


def split_seeds(seed_mask: np.ndarray, depth: float) -> np.ndarray:
    """Label a binary seed mask, splitting regions that hold several round objects.

    The distance of each seed pixel to the seed's edge, smoothed by
    :data:`SPLIT_SMOOTHING` pixels, has one maximum per round nucleus. Maxima
    that rise at least ``depth`` pixels above the saddle joining them (the
    h-maxima of Soille's *Morphological Image Analysis*) become markers, and
    a watershed of the distance map divides the seed between them. Regions
    without such a maximum stay whole. The search runs at half resolution,
    on a quarter of the pixels, because the reconstruction is the costly step.

    Parameters
    ----------
    seed_mask : numpy.ndarray of bool, shape (H, W)
    depth : float
        Smallest dip, in pixels of distance, between two maxima that are kept apart.

    Returns
    -------
    numpy.ndarray of int32, shape (H, W)
        1..N for the seeds; 0 outside the mask, and on mask pixels that no
        coarse label reached but that the final watershed of
        :func:`probabilities_to_labels` reaches along edges.
    """
    seed_mask = np.asarray(seed_mask, dtype=bool)
    if not seed_mask.any():
        return np.zeros(seed_mask.shape, np.int32)
    half = seed_mask[::2, ::2]
    distance = ndi.gaussian_filter(ndi.distance_transform_edt(half), SPLIT_SMOOTHING / 2)
    # h-maxima as the regional maxima of the reconstruction of (distance - h)
    # under distance. (skimage's h_maxima keeps every peak of equal height, so
    # two identical touching nuclei would always split.) Background sits far
    # below every seed so that no plateau joins seeds through it.
    distance[~half] = -1e6
    raised = reconstruction(distance - depth / 2, distance, method="dilation")
    peaks = local_maxima(raised, connectivity=2) & half
    markers, n_markers = ndi.label(peaks, structure=_EIGHT)
    split = watershed(-distance, markers=markers, mask=half)
    # Seeds apart at full resolution may touch at half resolution and share a
    # coarse label, so each seed is one (full-resolution region, coarse label) pair.
    # A region too thin to survive the subsampling stays one seed. Pixels of a
    # split region that no coarse label reached are set to 0 and left to the final watershed.
    # The pairs are built for the seed pixels only (flat indices), which
    # keeps the int64 arithmetic off the background.
    regions, n_regions = ndi.label(seed_mask, structure=_EIGHT)
    width = seed_mask.shape[1]
    flat = np.flatnonzero(seed_mask)
    rows, cols = np.divmod(flat, width)
    coarse = split[rows // 2, cols // 2]
    del rows, cols
    region = regions.ravel()[flat]
    del regions
    reached = np.zeros(n_regions + 1, bool)
    reached[region[coarse > 0]] = True
    pair = region.astype(np.int64) * (n_markers + 1) + coarse
    pair[reached[region] & (coarse == 0)] = 0
    del region, coarse
    # Every other pair is above 0, since seed pixels lie in regions 1..N. The
    # sorted unique pairs are numbered in order, 0 staying 0.
    values, index = np.unique(pair, return_inverse=True)
    seeds = np.zeros(seed_mask.shape, np.int32)
    seeds.ravel()[flat] = index if values[0] == 0 else index + 1
    unreached = seed_mask & (seeds == 0)
    if unreached.any():
        # The final watershed moves along edges only. Unreached pixels with no
        # labelled pixel in their edge-connected part of the mask (a part
        # joined to the rest by a corner alone) would be lost, so they take
        # the label of a neighbour across corners here.
        edge_parts, _ = ndi.label(seed_mask)
        has_seed = np.zeros(edge_parts.max() + 1, bool)
        has_seed[edge_parts[seeds > 0]] = True
        stranded = unreached & ~has_seed[edge_parts]
        if stranded.any():
            filled = watershed(np.zeros(seed_mask.shape, np.float32), markers=seeds, mask=seed_mask,
                               connectivity=2)
            seeds = np.where(stranded, filled, seeds)
    return seeds.astype(np.int32, copy=False)


def remove_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Remove objects under ``min_size`` pixels and number the rest 1..N in their order.

    Returns uint16 labels, or uint32 past 65,535 objects.
    """
    if min_size > 0:
        sizes = np.bincount(labels.ravel())
        too_small = sizes < min_size
        too_small[0] = False
        labels = np.where(too_small[labels], 0, labels)
    labels, _, _ = relabel_sequential(labels)
    return labels.astype(labels_dtype(int(labels.max())), copy=False)


def relabel_planes(probabilities: np.ndarray, prob_threshold: float, min_size: int,
                   split_depth: float = 0.0) -> np.ndarray:
    """Apply :func:`probabilities_to_labels` to (3, H, W) or to every plane of (*planes, 3, H, W).

    This is all that changes when only the post-processing parameters change:
    the network's probabilities are reused as they are.
    """
    if probabilities.ndim == 3:
        return probabilities_to_labels(probabilities, prob_threshold, min_size, split_depth)
    flat = probabilities.reshape((-1,) + probabilities.shape[-3:])
    planes = [probabilities_to_labels(plane, prob_threshold, min_size, split_depth) for plane in flat]
    dtype = max((plane.dtype for plane in planes), key=lambda d: d.itemsize)
    return np.stack(planes).astype(dtype, copy=False).reshape(probabilities.shape[:-3] + flat.shape[-2:])
