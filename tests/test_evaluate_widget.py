"""Scores of label layers: the plain function on hand-made arrays, and the Evaluate widget in a viewer."""

from __future__ import annotations

import numpy as np
import pytest

from napari_xlstm_unet.metrics import match_instances
from napari_xlstm_unet.widgets._evaluate import KINDS, evaluate_layers


def _scene():
    truth = np.zeros((64, 64), np.uint16)
    truth[5:15, 5:15] = 1
    truth[20:30, 20:30] = 2
    truth[40:50, 40:50] = 3  # missed
    prediction = np.zeros_like(truth)
    prediction[5:15, 6:16] = 7  # IoU 90/110
    prediction[20:30, 20:30] = 8
    prediction[40:46, 5:11] = 9  # false positive
    return truth, prediction


def test_instance_scores_and_error_map():
    truth, prediction = _scene()
    scores, errors = evaluate_layers(prediction, truth)
    assert (scores["tp"], scores["fp"], scores["fn"]) == (2, 1, 1)
    assert scores["f1"] == pytest.approx(2 / 3)
    direct = match_instances(truth, prediction)
    assert (scores["precision"], scores["recall"]) == (direct.precision, direct.recall)
    # IoU 0.818 passes thresholds 0.5..0.8 (7 of 10); the exact pair passes all 10.
    assert scores["f1_mean_0.5_0.95"] == pytest.approx(np.mean([2 / 3] * 7 + [1 / 3] * 3))
    assert set(np.unique(errors)) == {0, 1, 2}
    assert (errors == 1).sum() == 36
    assert (errors == 2).sum() == 100
    assert errors[45, 45] == 2


def test_class_scores_and_shape_error():
    truth = np.zeros((16, 16), np.uint8)
    truth[2:10, 2:10] = 1
    scores, errors = evaluate_layers(truth.copy(), truth, KINDS[1])
    assert scores == {"dice": 1.0, "nsd": 1.0, "dice_1": 1.0, "nsd_1": 1.0}
    assert errors is None
    with pytest.raises(ValueError, match=r"differ in shape.*\(16, 16\).*\(8, 8\)"):
        evaluate_layers(truth, truth[:8, :8])


@pytest.mark.napari
def test_evaluate_widget_matches_the_metrics_module(make_napari_viewer):
    from napari_xlstm_unet.widgets import EvaluateWidget

    viewer = make_napari_viewer()
    truth, prediction = _scene()
    widget = EvaluateWidget(viewer)
    widget.truth.value = viewer.add_labels(truth, name="truth")
    widget.prediction.value = viewer.add_labels(prediction, name="pred")
    scores = widget.evaluate()
    expected = match_instances(truth, prediction)
    assert scores["f1"] == expected.f1
    assert (scores["tp"], scores["fp"], scores["fn"]) == (expected.tp, expected.fp, expected.fn)
    assert "f1: 0.6667" in widget.result.value
    errors = viewer.layers["pred_errors"].data
    assert (errors == 2).sum() == 100
