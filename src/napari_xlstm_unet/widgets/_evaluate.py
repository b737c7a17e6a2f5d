"""Evaluate dock widget: score a predicted Labels layer against a ground-truth Labels layer.

A thin shell over :func:`evaluate_layers`, which tests call without a viewer.
Instances (cells) get precision, recall and F1 at IoU 0.5, the mean F1 over
IoU 0.5 to 0.95 and the counts, plus a layer marking false positives (1) and
missed objects (2). Class maps (endoscopy) get Dice and NSD per class.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import ComboBox, Container, Label, PushButton, create_widget

if TYPE_CHECKING:
    import napari

__all__ = ["EvaluateWidget", "evaluate_layers"]

KINDS = ("instances (cells)", "classes (endoscopy)")


def evaluate_layers(prediction: np.ndarray, truth: np.ndarray, kind: str = KINDS[0]) -> tuple[dict, np.ndarray | None]:
    """Return the scores of ``prediction`` against ``truth``, and the error map for instances.

    Parameters
    ----------
    prediction, truth : numpy.ndarray, shape (H, W)
        Label images of the same shape.
    kind : str
        One of :data:`KINDS`.

    Returns
    -------
    scores : dict
        For instances: ``precision``, ``recall``, ``f1``, ``f1_mean_0.5_0.95``, ``tp``, ``fp``,
        ``fn``. For classes: ``dice``, ``nsd`` and ``dice_<k>``, ``nsd_<k>`` per class.
    errors : numpy.ndarray or None
        uint8, 1 on false positives and 2 on missed objects; None for classes.
    """
    from ..metrics import error_map, f1_over_thresholds, match_instances, semantic_scores

    prediction, truth = np.asarray(prediction), np.asarray(truth)
    if prediction.shape != truth.shape:
        raise ValueError(f"the layers differ in shape: prediction {prediction.shape}, ground truth {truth.shape}; "
                         "choose layers of the same image")
    if prediction.ndim != 2:
        raise ValueError(f"expected 2D label layers, got shape {prediction.shape}; evaluate one plane at a time")
    if kind == KINDS[0]:
        result = match_instances(truth, prediction)
        scores = {"precision": result.precision, "recall": result.recall, "f1": result.f1,
                  "f1_mean_0.5_0.95": f1_over_thresholds(truth, prediction),
                  "tp": result.tp, "fp": result.fp, "fn": result.fn}
        return scores, error_map(truth, prediction)
    result = semantic_scores(truth, prediction)
    scores = {"dice": result.dice, "nsd": result.nsd}
    for class_id, values in sorted(result.per_class.items()):
        scores[f"dice_{class_id}"] = values["dice"]
        scores[f"nsd_{class_id}"] = values["nsd"]
    return scores, None


def format_scores(scores: dict) -> str:
    """Return the scores as short lines for the widget."""
    return "\n".join(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}"
                     for key, value in scores.items())


class EvaluateWidget(Container):
    """Dock widget: pick prediction and ground truth, press Evaluate."""

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=True)
        import napari.layers

        self._viewer = viewer
        self.prediction = create_widget(annotation=napari.layers.Labels, label="Prediction")
        self.truth = create_widget(annotation=napari.layers.Labels, label="Ground truth")
        self.kind = ComboBox(label="Compare as", choices=list(KINDS), value=KINDS[0])
        self.button = PushButton(text="Evaluate")
        self.result = Label(label="Scores", value="")
        self.extend([self.prediction, self.truth, self.kind, self.button, self.result])
        self.button.changed.connect(self.evaluate)
        viewer.layers.events.inserted.connect(self.reset_choices)
        viewer.layers.events.removed.connect(self.reset_choices)

    def evaluate(self) -> dict | None:
        """Score the chosen layers, show the numbers and add the error layer."""
        from napari.utils.notifications import show_error

        prediction, truth = self.prediction.value, self.truth.value
        if prediction is None or truth is None:
            show_error("Choose a prediction and a ground-truth Labels layer.")
            return None
        try:
            scores, errors = evaluate_layers(prediction.data, truth.data, self.kind.value)
        except (ValueError, TypeError) as error:
            show_error(f"Evaluation failed: {error}")
            return None
        self.result.value = format_scores(scores)
        if errors is not None:
            name = f"{prediction.name}_errors"
            if name in self._viewer.layers:
                self._viewer.layers[name].data = errors
            else:
                self._viewer.add_labels(errors, name=name, scale=prediction.scale, translate=prediction.translate)
        return scores
