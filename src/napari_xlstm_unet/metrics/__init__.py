"""Scores: instance F1 for cells, Dice and NSD for semantic class maps."""

from .instances import (
    MatchResult,
    error_map,
    f1_over_thresholds,
    iou_matrix,
    match_instances,
    mean_scores,
    remove_border_objects,
)
from .semantic import SemanticResult, mean_semantic_scores, semantic_scores

__all__ = [
    "MatchResult",
    "SemanticResult",
    "error_map",
    "f1_over_thresholds",
    "iou_matrix",
    "match_instances",
    "mean_scores",
    "mean_semantic_scores",
    "remove_border_objects",
    "semantic_scores",
]
