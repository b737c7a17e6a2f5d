"""Probabilities to instance labels, on hand-made arrays."""

from __future__ import annotations

import numpy as np
import pytest

from napari_xlstm_unet.inference.postprocess import labels_dtype, probabilities_to_labels


def three_class(interior: np.ndarray, boundary: np.ndarray) -> np.ndarray:
    interior = interior.astype(np.float32)
    boundary = boundary.astype(np.float32)
    return np.stack([1 - interior - boundary, interior, boundary])


def test_two_touching_cells_split_by_boundary():
    interior = np.zeros((10, 12))
    boundary = np.zeros((10, 12))
    interior[2:8, 1:5] = 0.9
    interior[2:8, 7:11] = 0.9
    boundary[2:8, 5:7] = 0.9  # a shared wall between the two cells
    boundary[1, 1:11] = 0.9
    labels = probabilities_to_labels(three_class(interior, boundary), prob_threshold=0.5, min_size=0)

    assert labels.dtype == np.uint16
    assert labels.max() == 2
    assert set(np.unique(labels[2:8, 1:5])) == {1}
    assert set(np.unique(labels[2:8, 7:11])) == {2}
    # The boundary band is shared out to the cells, not left as background.
    assert (labels[2:8, 5:7] > 0).all()
    assert (labels[1, 1:11] > 0).all()
    assert (labels[9] == 0).all()


def test_small_objects_removed_and_labels_consecutive():
    interior = np.zeros((20, 20))
    interior[1:3, 1:3] = 0.9  # 4 pixels
    interior[10:16, 10:16] = 0.9  # 36 pixels
    labels = probabilities_to_labels(three_class(interior, np.zeros_like(interior)), 0.5, min_size=10)
    assert sorted(np.unique(labels)) == [0, 1]
    assert (labels[10:16, 10:16] == 1).all()
    assert labels[1:3, 1:3].max() == 0


def test_threshold_controls_seeds():
    interior = np.zeros((8, 8))
    interior[2:6, 2:6] = 0.45
    probabilities = three_class(interior, np.full((8, 8), 0.2) * (interior > 0))
    assert probabilities_to_labels(probabilities, 0.5, 0).max() == 0
    assert probabilities_to_labels(probabilities, 0.4, 0).max() == 1


def test_empty_probabilities_give_empty_uint16():
    probabilities = np.zeros((3, 5, 7), dtype=np.float32)
    probabilities[0] = 1
    labels = probabilities_to_labels(probabilities)
    assert labels.shape == (5, 7)
    assert labels.dtype == np.uint16
    assert labels.max() == 0


def test_nan_probabilities_give_no_objects():
    probabilities = np.full((3, 6, 6), np.nan, dtype=np.float32)
    labels = probabilities_to_labels(probabilities)
    assert labels.max() == 0


def test_many_objects_switch_to_uint32():
    # 70,000 isolated single-pixel seeds on a checkerboard-like grid.
    side = 2 * 265
    interior = np.zeros((side, side), dtype=np.float32)
    interior[::2, ::2] = 0.9
    labels = probabilities_to_labels(three_class(interior, np.zeros_like(interior)), 0.5, min_size=0)
    assert labels.max() == 265 * 265
    assert labels.dtype == np.uint32


def test_labels_dtype_boundaries():
    assert labels_dtype(65535) == np.uint16
    assert labels_dtype(65536) == np.uint32


def test_wrong_class_count_raises():
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        probabilities_to_labels(np.zeros((2, 4, 4)))
