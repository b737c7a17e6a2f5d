"""Probabilities to instance labels, on hand-made arrays."""

from __future__ import annotations

import numpy as np
import pytest

from napari_xlstm_unet.inference.postprocess import labels_dtype, probabilities_to_labels, remove_small, split_seeds


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


def _disks(shape, centres, radius):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return np.any([(yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2 for cy, cx in centres], axis=0)


def test_split_depth_separates_overlapping_disks():
    # Disks of radius 12, centres 20 px apart: the neck is 13 px wide. After
    # the 2-px smoothing the distance map dips by between 3 and 4 px there.
    seed = _disks((48, 72), [(24, 24), (24, 44)], 12)
    probabilities = three_class(seed * 0.9, np.zeros(seed.shape))
    whole = probabilities_to_labels(probabilities, 0.5, min_size=0)
    split = probabilities_to_labels(probabilities, 0.5, min_size=0, split_depth=2.0)
    too_deep = probabilities_to_labels(probabilities, 0.5, min_size=0, split_depth=4.0)
    assert whole.max() == 1
    assert too_deep.max() == 1
    assert split.max() == 2
    assert split[24, 24] != split[24, 44]
    assert ((split > 0) == seed).all()  # splitting moves no pixel in or out
    # The cut lies at the neck, half-way between the centres.
    assert split[24, 32] == split[24, 24]
    assert split[24, 36] == split[24, 44]


@pytest.mark.parametrize("radii", [(10, 10), (12, 5)])
def test_split_depth_keeps_single_nuclei(radii):
    yy, xx = np.mgrid[:40, :40]
    seed = ((yy - 20) / radii[0]) ** 2 + ((xx - 20) / radii[1]) ** 2 <= 1
    labels = probabilities_to_labels(three_class(seed * 0.9, np.zeros(seed.shape)), 0.5, 0, split_depth=2.0)
    assert labels.max() == 1
    assert ((labels > 0) == seed).all()


def test_split_seeds_keeps_thin_regions():
    mask = np.zeros((12, 40), bool)
    mask[5, 3:31] = True  # one pixel wide, on an odd row: absent from mask[::2, ::2]
    mask[2:10, 34:38] = True
    seeds = split_seeds(mask, 2.0)
    assert seeds.dtype == np.int32
    assert len(np.unique(seeds[mask])) == 2
    assert (seeds[~mask] == 0).all()
    assert (seeds[5, 3:31] == seeds[5, 3]).all()


@pytest.mark.parametrize("depth", [0.5, 2.0, 5.0, 50.0])
def test_split_seeds_keeps_one_pixel_gap(depth):
    mask = np.zeros((20, 30), bool)
    mask[4:16, 2:11] = True
    mask[4:16, 12:21] = True  # a one-pixel gap at column 11, which mask[::2, ::2] skips
    seeds = split_seeds(mask, depth)
    assert len(np.unique(seeds[mask])) == 2
    assert (seeds[4:16, 2:11] == seeds[4, 2]).all()
    assert (seeds[4:16, 12:21] == seeds[4, 12]).all()
    labels = probabilities_to_labels(three_class(mask * 0.9, np.zeros(mask.shape)), 0.5, 0, depth)
    assert labels.max() == 2


def test_remove_small_matches_min_size():
    interior = np.zeros((30, 30))
    interior[1:4, 1:4] = 0.9  # 9 pixels
    interior[10:20, 10:20] = 0.9  # 100 pixels
    interior[22:26, 2:6] = 0.9  # 16 pixels
    probabilities = three_class(interior, np.zeros_like(interior))
    unfiltered = probabilities_to_labels(probabilities, 0.5, min_size=0)
    for min_size in (0, 10, 16, 17, 101):
        np.testing.assert_array_equal(remove_small(unfiltered, min_size),
                                      probabilities_to_labels(probabilities, 0.5, min_size))
    assert remove_small(unfiltered, 10).max() == 2


def test_negative_split_depth_rejected():
    with pytest.raises(ValueError, match="split_depth is a distance in pixels, at least 0.*got -1"):
        probabilities_to_labels(three_class(np.ones((4, 4)), np.zeros((4, 4))), split_depth=-1.0)


def test_split_seeds_keeps_corner_joined_parts():
    mask = np.zeros((40, 40), bool)
    mask[4:19, 4:19] = True
    mask[19:34, 19:34] = True  # touches the first square at one corner only
    whole = probabilities_to_labels(three_class(mask * 0.9, np.zeros(mask.shape)), 0.5, 0)
    for depth in (0.5, 2.0, 5.0):
        labels = probabilities_to_labels(three_class(mask * 0.9, np.zeros(mask.shape)), 0.5, 0, depth)
        assert ((labels > 0) == (whole > 0)).all()  # no pixel is lost
        assert labels.max() >= whole.max()


@pytest.mark.parametrize("shape", [(0, 0), (0, 5), (1, 1)])
def test_split_seeds_tiny_and_empty(shape):
    probabilities = three_class(np.full(shape, 0.9), np.zeros(shape))
    labels = probabilities_to_labels(probabilities, 0.5, 0, split_depth=2.0)
    assert labels.shape == shape
    np.testing.assert_array_equal(labels, probabilities_to_labels(probabilities, 0.5, 0))
