"""Validation during training, post-processing tuning and the evaluation report."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import torch

from ..inference.postprocess import probabilities_to_labels, remove_small
from ..inference.tiling import predict_tiled
from ..metrics import match_instances, semantic_scores
from .data import IGNORE_INDEX, Sample

logger = logging.getLogger(__name__)

THRESHOLD_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
MIN_SIZE_GRID = (0, 8, 16, 32, 48, 64)
# 0 keeps seeds whole. On the shipped cell model's validation split, F1 was
# about flat from 1.5 to 3 px (an estimate from one sweep), so 2 px stands for that range.
SPLIT_DEPTH_GRID = (0.0, 2.0)


def predict_all(model: torch.nn.Module, samples: list[Sample], num_classes: int, device: torch.device,
                tile_size: int) -> list[np.ndarray]:
    """Return the (K, H, W) class probabilities of every sample; the model is left in training mode."""
    model.eval()
    with torch.inference_mode():
        probabilities = [
            predict_tiled(model, s.image, num_classes, tile_size=tile_size, device=device) for s in samples
        ]
    model.train()
    return probabilities


def cell_scores(probabilities: list[np.ndarray], samples: list[Sample], threshold: float,
                min_size: int, split_depth: float = 0.0) -> list[dict]:
    """Return one row of instance scores (F1 at IoU 0.5 and counts) per image."""
    rows = []
    for p, sample in zip(probabilities, samples):
        result = match_instances(sample.labels, probabilities_to_labels(p, threshold, min_size, split_depth))
        rows.append({"image": sample.name, **result.to_dict()})
    return rows


def class_scores(probabilities: list[np.ndarray], samples: list[Sample], tolerance: float,
                 class_names: list[str]) -> list[dict]:
    """Return one row of Dice and NSD (mean and per class) per image of a semantic task."""
    rows = []
    for p, sample in zip(probabilities, samples):
        prediction = p.argmax(axis=0)
        ignore = sample.labels == IGNORE_INDEX
        result = semantic_scores(sample.labels, prediction, range(1, len(class_names)), tolerance, ignore)
        row = {"image": sample.name, "dice": result.dice, "nsd": result.nsd, "n_classes": result.n_classes}
        for class_id, name in enumerate(class_names[1:], start=1):
            scores = result.per_class.get(class_id, {})
            row[f"dice_{name}"] = scores.get("dice", "")
            row[f"nsd_{name}"] = scores.get("nsd", "")
        rows.append(row)
    return rows


def validation_score(task: str, probabilities, samples, postprocess: dict, tolerance: float,
                     class_names: list[str]) -> float:
    """Return the metric that picks the best epoch: mean F1 at 0.5 (cells) or mean Dice."""
    if task == "cells":
        rows = cell_scores(probabilities, samples, postprocess["prob_threshold"], postprocess["min_size"],
                           postprocess.get("split_depth", 0.0))
        return float(np.mean([r["f1"] for r in rows]))
    rows = class_scores(probabilities, samples, tolerance, class_names)
    return float(np.mean([r["dice"] for r in rows]))


def tune_postprocess(probabilities, samples, start: dict) -> tuple[dict, float]:
    """Grid-search the cell threshold, minimum size and split depth on validation images.

    Returns the best parameters and their mean F1. Ties go to the grid point
    nearest ``start`` (the values the run began with), so that a validation
    set too small to tell settings apart does not move them to the edge of
    the grid.
    """
    grid = {}
    for threshold in THRESHOLD_GRID:
        for depth in SPLIT_DEPTH_GRID:
            # The seeds do not depend on the minimum size: build them once per
            # threshold and depth, then drop small objects for each size.
            unfiltered = [probabilities_to_labels(p, threshold, 0, depth) for p in probabilities]
            for min_size in MIN_SIZE_GRID:
                f1 = [match_instances(s.labels, remove_small(labels, min_size)).f1
                      for labels, s in zip(unfiltered, samples)]
                grid[(threshold, min_size, depth)] = float(np.mean(f1))
    best = max(grid.values())

    def distance(point):
        return (abs(point[0] - start["prob_threshold"]) + abs(point[1] - start["min_size"]) / 100
                + abs(point[2] - start.get("split_depth", 0.0)) / 10)

    threshold, min_size, depth = min((p for p, f1 in grid.items() if f1 == best), key=distance)
    return {"prob_threshold": threshold, "min_size": min_size, "split_depth": depth}, best


def write_report(rows: list[dict], folder: Path, name: str) -> dict:
    """Write ``<name>.csv`` (one row per image) and ``<name>_summary.json``; return the summary."""
    folder.mkdir(parents=True, exist_ok=True)
    summary: dict = {"images": len(rows)}
    if rows:
        with open(folder / f"{name}.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        for key, value in rows[0].items():
            if key != "image" and isinstance(value, (int, float)):
                values = [r[key] for r in rows if isinstance(r[key], (int, float))]
                summary[f"mean_{key}"] = float(np.mean(values))
    with open(folder / f"{name}_summary.json", "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=2)
    return summary
