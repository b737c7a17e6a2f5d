"""Instance segmentation metrics: precision, recall and F1 at an IoU threshold.

Rules, as in the NeurIPS 2022 Cell Segmentation challenge's scoring script
unless stated otherwise:

- Objects are matched one-to-one by the Hungarian algorithm on their IoU
  matrix. A matched pair counts as a true positive when its IoU is at least
  the threshold (0.5 by default).
- Border objects: every object touching a band of ``border_width`` pixels
  (default 2, as in the challenge) along the image edge is removed from the
  ground truth and from the prediction before matching. Such objects are cut
  by the field of view. ``border_width=0`` keeps every object.
- Empty images: when neither the ground truth nor the prediction contains an
  object, precision, recall and F1 are all 1.0 (a correct true negative).
  The challenge script reports 0.0 there. An empty side facing a non-empty
  one scores 0.0. No case gives NaN or a division warning.
- The summary over images is the mean of the per-image values.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment
from skimage.segmentation import relabel_sequential

__all__ = [
    "MatchResult",
    "error_map",
    "f1_over_thresholds",
    "iou_matrix",
    "match_instances",
    "mean_scores",
    "remove_border_objects",
]


@dataclass(frozen=True)
class MatchResult:
    """Counts and scores of one image."""

    n_true: int
    n_pred: int
    tp: int
    fp: int
    fn: int
    precision: float
    recall: float
    f1: float
    mean_matched_iou: float

    def to_dict(self) -> dict[str, float | int]:
        """Return the fields as a dictionary."""
        return asdict(self)


def _as_labels(labels: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(labels)
    if not np.issubdtype(array.dtype, np.integer) and array.dtype != bool:
        raise TypeError(f"{name} must be an integer label image, got dtype {array.dtype}")
    if array.size and array.min() < 0:
        raise ValueError(f"{name} contains negative labels (minimum {array.min()}); expected 0 = background")
    return array.astype(np.int64, copy=False)


def iou_matrix(true: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Return IoU between every true object (rows) and predicted object (columns).

    Both inputs must be labelled 0..N without gaps (as after
    ``relabel_sequential``); row i is true label i + 1.
    """
    n_true, n_pred = int(true.max(initial=0)), int(pred.max(initial=0))
    overlap = np.bincount(
        true.ravel() * (n_pred + 1) + pred.ravel(), minlength=(n_true + 1) * (n_pred + 1)
    ).reshape(n_true + 1, n_pred + 1)
    area_true = overlap.sum(axis=1, keepdims=True)
    area_pred = overlap.sum(axis=0, keepdims=True)
    union = area_true + area_pred - overlap
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, overlap / np.maximum(union, 1), 0.0)
    return iou[1:, 1:]


def remove_border_objects(labels: np.ndarray, border_width: int) -> np.ndarray:
    """Return ``labels`` without every id that has a pixel within ``border_width`` of the edge.

    The whole id goes, also parts of it away from the edge.
    """
    band = np.ones(labels.shape, dtype=bool)
    band[border_width:-border_width, border_width:-border_width] = False
    touching = np.unique(labels[band])
    touching = touching[touching > 0]
    if len(touching) == 0:
        return labels
    return np.where(np.isin(labels, touching), 0, labels)


def match_instances(
    true: np.ndarray,
    pred: np.ndarray,
    iou_threshold: float = 0.5,
    border_width: int = 2,
) -> MatchResult:
    """Match predicted to true objects and score the image.

    Parameters
    ----------
    true, pred : numpy.ndarray, shape (H, W)
        Integer label images, 0 = background.
    iou_threshold : float
        Minimum IoU of a true positive.
    border_width : int
        Remove objects touching this many pixels along the image edge first;
        0 keeps them.

    Returns
    -------
    MatchResult
    """
    true, pred, pairs = _match(true, pred, iou_threshold, border_width)
    n_true, n_pred = int(true.max(initial=0)), int(pred.max(initial=0))
    if n_true == 0 and n_pred == 0:
        return MatchResult(0, 0, 0, 0, 0, 1.0, 1.0, 1.0, 0.0)
    tp = len(pairs)
    matched_iou = float(np.mean([iou for _, _, iou in pairs])) if tp else 0.0

    fp, fn = n_pred - tp, n_true - tp
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_true if n_true else 0.0
    f1 = 2 * tp / (n_true + n_pred) if tp else 0.0
    return MatchResult(n_true, n_pred, tp, fp, fn, precision, recall, f1, matched_iou)


def _match(true: np.ndarray, pred: np.ndarray, iou_threshold: float, border_width: int):
    """Return the relabelled images and the matched pairs ``(true id, pred id, IoU)`` at the threshold."""
    true = _as_labels(true, "true labels")
    pred = _as_labels(pred, "predicted labels")
    if true.shape != pred.shape:
        raise ValueError(f"label images differ in shape: true {true.shape}, predicted {pred.shape}")
    if border_width > 0:
        true = remove_border_objects(true, border_width)
        pred = remove_border_objects(pred, border_width)
    true = relabel_sequential(true)[0]
    pred = relabel_sequential(pred)[0]
    n_true, n_pred = int(true.max(initial=0)), int(pred.max(initial=0))
    pairs: list[tuple[int, int, float]] = []
    if n_true and n_pred:
        iou = iou_matrix(true, pred)
        # Pairs above the threshold dominate; IoU breaks ties among them.
        cost = -(iou >= iou_threshold).astype(float) - iou / (2 * min(n_true, n_pred))
        rows, cols = linear_sum_assignment(cost)
        pairs = [(int(r) + 1, int(c) + 1, float(iou[r, c])) for r, c in zip(rows, cols)
                 if iou[r, c] >= iou_threshold]
    return true, pred, pairs


def error_map(true: np.ndarray, pred: np.ndarray, iou_threshold: float = 0.5, border_width: int = 2) -> np.ndarray:
    """Return a uint8 map of the errors: 1 on false-positive objects, 2 on missed true objects.

    The matching and the border rule are those of :func:`match_instances`.
    Where a false positive overlaps a missed object, the pixel shows the miss.
    """
    true, pred, pairs = _match(true, pred, iou_threshold, border_width)
    matched_true = {t for t, _, _ in pairs}
    matched_pred = {p for _, p, _ in pairs}
    errors = np.zeros(true.shape, np.uint8)
    errors[(pred > 0) & ~np.isin(pred, list(matched_pred))] = 1
    errors[(true > 0) & ~np.isin(true, list(matched_true))] = 2
    return errors


def f1_over_thresholds(true: np.ndarray, pred: np.ndarray, thresholds=None, border_width: int = 2) -> float:
    """Return the mean F1 over IoU thresholds (default 0.5, 0.55, ..., 0.95)."""
    if thresholds is None:
        thresholds = np.round(np.arange(0.5, 0.96, 0.05), 2)
    return float(np.mean([match_instances(true, pred, t, border_width).f1 for t in thresholds]))


def mean_scores(results: list[MatchResult]) -> dict[str, float]:
    """Return the mean precision, recall and F1 over images (NaN for an empty list)."""
    if not results:
        return {"precision": float("nan"), "recall": float("nan"), "f1": float("nan")}
    return {
        key: float(np.mean([getattr(r, key) for r in results]))
        for key in ("precision", "recall", "f1")
    }
