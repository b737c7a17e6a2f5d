"""Semantic segmentation metrics: Dice and normalised surface Dice (NSD) per class.

Rules:

- Each foreground class is scored on its own binary mask. Background
  (class 0) is never scored.
- NSD with tolerance ``tau`` pixels (Nikolov et al., 2021, as in the
  MONAI and DeepMind surface-distance implementations) is the share of
  boundary pixels of each mask that lie within ``tau`` of the other mask's
  boundary, over both boundaries together. A boundary pixel is a mask pixel
  with a 4-connected neighbour outside the mask, the outside of the image
  included (as in those implementations, which pad with background).
- A class that is empty in both the ground truth and the prediction of an
  image is not scored for that image. The image score is the mean over the
  classes present in either.
- An image where every class is empty in both is a correct true negative:
  Dice and NSD are 1.0 for that image (and listed with ``n_classes = 0``).
  A class present on one side only scores 0.0.
- Pixels marked as ignored (for example the 255 band of some endoscopy
  masks) are removed from both masks before scoring.
- The summary over images is the mean of the per-image values.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage as ndi

__all__ = ["SemanticResult", "mean_semantic_scores", "semantic_scores"]


@dataclass(frozen=True)
class SemanticResult:
    """Scores of one image.

    Attributes
    ----------
    dice, nsd : float
        Means over the scored classes (1.0 when no class is present).
    per_class : dict
        ``{class_id: {"dice": float, "nsd": float}}`` for every scored class.
    """

    dice: float
    nsd: float
    per_class: dict[int, dict[str, float]] = field(default_factory=dict)

    @property
    def n_classes(self) -> int:
        """Number of classes scored on this image."""
        return len(self.per_class)


def _boundary(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1, mode="constant", constant_values=False)
    eroded = ndi.binary_erosion(padded, structure=ndi.generate_binary_structure(2, 1))
    return mask & ~eroded[1:-1, 1:-1]


def dice(true: np.ndarray, pred: np.ndarray) -> float:
    """Return the Dice coefficient of two boolean masks (1.0 when both are empty)."""
    total = int(true.sum()) + int(pred.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(true, pred).sum()) / total


def surface_dice(true: np.ndarray, pred: np.ndarray, tolerance: float) -> float:
    """Return the NSD of two boolean masks at ``tolerance`` pixels (1.0 when both are empty)."""
    edge_true, edge_pred = _boundary(true), _boundary(pred)
    n_true, n_pred = int(edge_true.sum()), int(edge_pred.sum())
    if n_true + n_pred == 0:
        return 1.0
    if n_true == 0 or n_pred == 0:
        return 0.0
    # Distance from every pixel to the nearest boundary pixel of each mask.
    to_true = ndi.distance_transform_edt(~edge_true)
    to_pred = ndi.distance_transform_edt(~edge_pred)
    close_pred = int((to_true[edge_pred] <= tolerance).sum())
    close_true = int((to_pred[edge_true] <= tolerance).sum())
    return (close_pred + close_true) / (n_true + n_pred)


def semantic_scores(
    true: np.ndarray,
    pred: np.ndarray,
    classes: list[int] | tuple[int, ...] | None = None,
    tolerance: float = 2.0,
    ignore: np.ndarray | None = None,
) -> SemanticResult:
    """Score one predicted class map against the ground truth.

    Parameters
    ----------
    true, pred : numpy.ndarray, shape (H, W)
        Integer class maps, 0 = background.
    classes : sequence of int, optional
        Foreground class ids to consider; default every id above 0 found in
        either map.
    tolerance : float
        NSD tolerance in pixels.
    ignore : numpy.ndarray of bool, shape (H, W), optional
        Pixels left out of both maps.

    Returns
    -------
    SemanticResult
    """
    true, pred = np.asarray(true), np.asarray(pred)
    if true.shape != pred.shape:
        raise ValueError(f"class maps differ in shape: true {true.shape}, predicted {pred.shape}")
    if true.ndim != 2:
        raise ValueError(f"expected 2D class maps (H, W), got shape {true.shape}")
    keep = np.ones(true.shape, bool) if ignore is None else ~np.asarray(ignore, bool)
    if classes is None:
        found = np.union1d(np.unique(true[keep]), np.unique(pred[keep]))
        classes = [int(c) for c in found if c > 0]
    per_class: dict[int, dict[str, float]] = {}
    for class_id in classes:
        mask_true = (true == class_id) & keep
        mask_pred = (pred == class_id) & keep
        if not mask_true.any() and not mask_pred.any():
            continue
        per_class[int(class_id)] = {
            "dice": dice(mask_true, mask_pred),
            "nsd": surface_dice(mask_true, mask_pred, tolerance),
        }
    if not per_class:
        return SemanticResult(1.0, 1.0, {})
    return SemanticResult(
        dice=float(np.mean([s["dice"] for s in per_class.values()])),
        nsd=float(np.mean([s["nsd"] for s in per_class.values()])),
        per_class=per_class,
    )


def mean_semantic_scores(results: list[SemanticResult]) -> dict[str, float]:
    """Return the mean Dice and NSD over images (NaN for an empty list)."""
    if not results:
        return {"dice": float("nan"), "nsd": float("nan")}
    return {
        "dice": float(np.mean([r.dice for r in results])),
        "nsd": float(np.mean([r.nsd for r in results])),
    }
