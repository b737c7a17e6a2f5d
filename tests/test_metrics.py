"""Instance matching and F1, with hand-made tables and the shared cases BR-14 and BR-16."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import tifffile
from PIL import Image
from scipy import ndimage as ndi

from conftest import CASES
from napari_xlstm_unet.metrics import (
    iou_matrix,
    match_instances,
    mean_scores,
    mean_semantic_scores,
    semantic_scores,
)


def test_iou_matrix_exact():
    true = np.array([[1, 1, 0, 0], [1, 1, 0, 2]])
    pred = np.array([[1, 1, 1, 0], [0, 0, 0, 2]])
    # true 1 (4 px) vs pred 1 (3 px): overlap 2, union 5; true 2 vs pred 2: 1/1.
    np.testing.assert_allclose(iou_matrix(true, pred), [[0.4, 0.0], [0.0, 1.0]])


def test_one_to_one_matching_counts():
    true = np.zeros((20, 20), int)
    true[2:8, 2:8] = 1
    true[10:16, 10:16] = 2
    pred = np.zeros_like(true)
    pred[2:8, 2:8] = 5  # exact match
    pred[10:13, 10:16] = 7  # half of object 2: IoU 0.5, a hit at 0.5
    pred[13:16, 10:16] = 8  # the other half: no partner left
    result = match_instances(true, pred, 0.5, border_width=0)
    assert (result.tp, result.fp, result.fn) == (2, 1, 0)
    assert result.precision == pytest.approx(2 / 3)
    assert result.recall == 1.0
    assert result.f1 == pytest.approx(0.8)

    strict = match_instances(true, pred, 0.6, border_width=0)
    assert (strict.tp, strict.fp, strict.fn) == (1, 2, 1)


def test_border_objects_removed_by_default():
    true = np.zeros((20, 20), int)
    true[0:4, 5:9] = 1  # touches the top edge
    true[8:12, 8:12] = 2
    pred = np.zeros_like(true)
    pred[8:12, 8:12] = 1
    assert match_instances(true, pred).f1 == 1.0
    with_border = match_instances(true, pred, border_width=0)
    assert (with_border.tp, with_border.fn) == (1, 1)


def test_border_band_is_two_pixels_wide():
    true = np.zeros((20, 20), int)
    true[2:5, 8:11] = 1  # starts at row 2: outside a 2-pixel band
    true[1:4, 14:17] = 2  # reaches row 1: inside the band
    result = match_instances(true, true)
    assert result.n_true == 1


def test_border_removal_drops_whole_id():
    true = np.zeros((20, 20), int)
    true[0:3, 2:5] = 1  # one id in two pieces: one on the edge, one inside
    true[10:13, 10:13] = 1
    true[6:9, 6:9] = 2
    result = match_instances(true, true)
    assert result.n_true == 1


def test_tiny_images_do_not_fail():
    single_pixel = np.ones((1, 1), int)
    assert match_instances(single_pixel, single_pixel).f1 == 1.0  # all objects lie in the band
    assert match_instances(single_pixel, single_pixel, border_width=0).tp == 1


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="differ in shape"):
        match_instances(np.zeros((4, 4), int), np.zeros((4, 5), int))


def test_float_labels_rejected():
    with pytest.raises(TypeError, match="integer label image"):
        match_instances(np.zeros((4, 4)), np.zeros((4, 4), int))


BR14_FILES = {"empty": "br14_empty.tif", "one": "br14_one.tif", "two": "br14_two.tif"}


@pytest.mark.parametrize(
    "pair", ["gt=empty,pred=one", "gt=one,pred=empty", "gt=one,pred=one", "gt=two,pred=one"]
)
def test_br14_empty_cases(pair):
    expected = json.loads((CASES / "BR-14" / "expected.json").read_text())["pairs"][pair]
    gt_key, pred_key = (part.split("=")[1] for part in pair.split(","))
    true = tifffile.imread(CASES / "BR-14" / BR14_FILES[gt_key])
    pred = tifffile.imread(CASES / "BR-14" / BR14_FILES[pred_key])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = match_instances(true, pred)
    for key in ("n_true", "n_pred", "tp", "fp", "fn"):
        json_key = "n_gt" if key == "n_true" else key
        assert getattr(result, key) == expected[json_key], key
    for key in ("precision", "recall", "f1"):
        assert getattr(result, key) == pytest.approx(expected[key]), key


def test_br14_empty_vs_empty_is_true_negative():
    convention = json.loads((CASES / "BR-14" / "expected.json").read_text())["gt=empty,pred=empty_convention"]
    empty = tifffile.imread(CASES / "BR-14" / "br14_empty.tif")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = match_instances(empty, empty)
    assert result.f1 == convention["true_negative_convention"]
    assert (result.tp, result.fp, result.fn) == (0, 0, 0)


def test_br14_folder_mean_is_finite():
    images = {k: tifffile.imread(CASES / "BR-14" / v) for k, v in BR14_FILES.items()}
    results = [match_instances(images[a], images[b]) for a in images for b in images]
    means = mean_scores(results)
    assert all(math.isfinite(v) for v in means.values())


def test_br16_binary_gt_merges_touching_cells():
    expected = json.loads((CASES / "BR-16" / "expected.json").read_text())
    binary = np.asarray(Image.open(CASES / "BR-16" / "br16_gt_binary_0_255.png"))
    instances = tifffile.imread(CASES / "BR-16" / "br16_gt_instances.tif")
    pred = tifffile.imread(CASES / "BR-16" / "br16_pred_two_objects.tif")

    binary_labels, n_components = ndi.label(binary > 0)
    assert n_components == expected["binary_gt_connected_components"]

    for true, key in [(binary_labels, "metric_binary_gt_vs_two_object_pred"),
                      (instances, "metric_instance_gt_vs_two_object_pred")]:
        result = match_instances(true, pred)
        values = expected[key]
        assert (result.n_true, result.n_pred) == (values["n_gt"], values["n_pred"])
        assert (result.tp, result.fp, result.fn) == (values["tp"], values["fp"], values["fn"])
        assert result.precision == pytest.approx(values["precision"])
        assert result.recall == pytest.approx(values["recall"])
        assert result.f1 == pytest.approx(values["f1"])


# --- semantic metrics: Dice and NSD ----------------------------------------------------------

def _square(shift_x: int = 0, value: int = 1) -> np.ndarray:
    mask = np.zeros((32, 32), np.uint8)
    mask[10:20, 10 + shift_x:20 + shift_x] = value
    return mask


def test_semantic_scores_shifted_square():
    true, pred = _square(), _square(1)
    # Overlap 10 x 9 = 90 pixels of 100 + 100.
    assert semantic_scores(true, pred, tolerance=2).dice == pytest.approx(0.9)
    # Every boundary pixel (36 per square) is within 1 pixel of the other boundary.
    assert semantic_scores(true, pred, tolerance=2).nsd == pytest.approx(1.0)
    # At tolerance 0 only the shared top and bottom rows match: 9 + 9 of 36, on each side.
    assert semantic_scores(true, pred, tolerance=0).nsd == pytest.approx(36 / 72)


def test_far_prediction_scores_zero_and_classes_average():
    true = _square()
    pred = np.zeros_like(true)
    pred[0:5, 25:30] = 1
    result = semantic_scores(true, pred)
    assert (result.dice, result.nsd) == (0.0, 0.0)
    # Class 2 correct, class 1 missed: the image mean is 0.5.
    true2, pred2 = true.copy(), np.zeros_like(true)
    true2[25:30, 0:5] = 2
    pred2[25:30, 0:5] = 2
    both = semantic_scores(true2, pred2)
    assert both.per_class == {1: {"dice": 0.0, "nsd": 0.0}, 2: {"dice": 1.0, "nsd": 1.0}}
    assert (both.dice, both.nsd) == (0.5, 0.5)


def test_empty_frames_and_one_sided_classes():
    empty = np.zeros((16, 16), np.uint8)
    result = semantic_scores(empty, empty)
    assert (result.dice, result.nsd, result.n_classes) == (1.0, 1.0, 0)
    one = empty.copy()
    one[4:8, 4:8] = 1
    assert (semantic_scores(empty, one).dice, semantic_scores(empty, one).nsd) == (0.0, 0.0)
    assert (semantic_scores(one, empty).dice, semantic_scores(one, empty).nsd) == (0.0, 0.0)
    means = mean_semantic_scores([result, semantic_scores(one, empty)])
    assert means == {"dice": 0.5, "nsd": 0.5}


def test_ignored_pixels_are_left_out():
    true, pred = _square(), _square(1)
    ignore = np.zeros(true.shape, bool)
    ignore[:, 19:] = True  # hides the columns where the two squares differ on the right
    ignore[:, :11] = True  # and on the left
    result = semantic_scores(true, pred, ignore=ignore)
    assert result.dice == 1.0


def test_surface_dice_full_image_mask():
    full = np.ones((8, 8), np.uint8)
    inset = np.zeros((8, 8), np.uint8)
    inset[1:7, 1:7] = 1
    # 28 edge pixels vs the 20 of the inset square: 1 pixel apart, except the
    # 4 image corners, which lie sqrt(2) from the inset's corners.
    assert semantic_scores(full, inset, tolerance=1).nsd == pytest.approx(44 / 48)
    assert semantic_scores(full, inset, tolerance=1.5).nsd == 1.0
    assert semantic_scores(full, inset, tolerance=0.5).nsd == 0.0
