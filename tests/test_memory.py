"""Memory of the prediction path: blend shares instead of a weight image, grey stored once."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from conftest import LogModel
from napari_xlstm_unet.inference.normalize import (
    NORMALIZE_ROWS,
    match_channels,
    normalize_percentile,
    prepare_image,
)
from napari_xlstm_unet.inference.tiling import axis_shares, gaussian_weights, predict_tiled, tile_starts


def peak_bytes(function, *args, **kwargs) -> int:
    """Return the peak of numpy's traced allocations while ``function`` runs."""
    tracemalloc.start()
    try:
        function(*args, **kwargs)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("length, side, overlap", [(300, 128, 0.25), (1000, 464, 0.125), (97, 40, 0.5)])
def test_axis_shares_add_up_to_one(length, side, overlap):
    starts = tile_starts(length, side, overlap)
    total = np.zeros(length)
    for start, share in zip(starts, axis_shares(length, starts, side)):
        total[start:start + side] += share
    np.testing.assert_allclose(total, 1.0, rtol=0, atol=1e-12)


def test_single_window_share_is_one():
    shares = axis_shares(50, [0], 50)
    assert np.array_equal(shares[0], np.ones(50))


def test_two_window_shares_exact():
    # Windows [0, 6) and [4, 10) share pixels 4 and 5. There the left
    # window weighs its own axis values 4 and 5, and the right one its
    # values 0 and 1.
    from napari_xlstm_unet.inference.tiling import gaussian_axis

    weight = gaussian_axis(6)
    left, right = axis_shares(10, [0, 4], 6)
    assert left[4] == pytest.approx(weight[4] / (weight[4] + weight[0]), rel=1e-12)
    assert right[1] == pytest.approx(weight[1] / (weight[5] + weight[1]), rel=1e-12)
    assert left[0] == 1.0


def test_gaussian_corner_is_floor():
    weights = gaussian_weights(64, 64)
    assert weights[0, 0] == pytest.approx(1e-6, rel=1e-6)


def test_overlap_band_fades_across():
    # 1,000 pixels in windows of 448 at 1/8 overlap: 3 windows, and the
    # first two share pixels 392 to 447.
    starts = tile_starts(1000, 448, 0.125)
    first = axis_shares(1000, starts, 448)[0]
    band = first[starts[1]:448]
    assert np.all(np.diff(band) < 0)
    assert band[0] > 0.85
    assert band[-1] < 0.15


def test_predictor_allocates_only_output():
    rng = np.random.default_rng(1)
    raw = rng.uniform(0.1, 1.0, (3, 600, 700)).astype(np.float32)
    image = raw / raw.sum(axis=0, keepdims=True)
    output_bytes = image.nbytes
    peak = peak_bytes(predict_tiled, LogModel(), image, 3, tile_size=128, overlap=0.25)
    # A full-size weight image alone would add 600 * 700 * 4 = 1.68 MB.
    assert peak < output_bytes + 1_000_000


def test_grey_is_repeated_as_view():
    grey = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
    three = match_channels(grey, 3)
    assert three.shape == (3, 3, 4)
    assert np.shares_memory(three, grey)
    assert not three.flags.writeable


def test_normalised_bands_exact_values():
    rows = NORMALIZE_ROWS + 37  # two bands, the second one partial
    image = (np.arange(rows * 5, dtype=np.uint16) * 7).reshape(1, rows, 5)
    image[0, -1, -1] = 60_000
    as_float = image[0].astype(np.float32)
    lo, hi = np.percentile(as_float, [1.0, 99.8])
    expected = ((as_float - lo) / (hi - lo)).astype(np.float32)
    result = normalize_percentile(image)
    assert result.dtype == np.float32
    assert np.array_equal(result[0], expected)


def test_nonfinite_in_second_band_zeroed():
    image = np.linspace(0, 1, (NORMALIZE_ROWS + 10) * 4, dtype=np.float64).reshape(1, -1, 4)
    image[0, NORMALIZE_ROWS + 3, 2] = np.nan
    result = normalize_percentile(image)
    assert result[0, NORMALIZE_ROWS + 3, 2] == 0.0


def test_grey_preparation_peak_memory():
    image = np.random.default_rng(2).integers(0, 4096, (1024, 1024), dtype=np.uint16)
    plane_bytes = 1024 * 1024 * 4
    peak = peak_bytes(prepare_image, image, 3)
    # The float32 result, one float32 channel and the copy np.percentile
    # partitions: about 3.25 planes, measured. Repeating grey into 3
    # channels would add 3 more.
    assert peak < 3.5 * plane_bytes


def test_seed_splitting_peak_memory():
    from napari_xlstm_unet.inference.postprocess import split_seeds

    # Pairs of touching discs (radius 9, centres 14 pixels apart), one pair
    # per 40 x 40 cell: about 29 % of the pixels are seeds.
    yy, xx = np.mgrid[0:40, 0:40]
    pair = ((yy - 20) ** 2 + (xx - 13) ** 2 <= 81) | ((yy - 20) ** 2 + (xx - 27) ** 2 <= 81)
    mask = np.tile(pair, (26, 26))[:1024, :1024]
    peak = peak_bytes(split_seeds, mask, 2.0)
    # Pairing every pixel's region and coarse label in int64 took about 40
    # bytes per pixel; pairing the seed pixels only takes about 25.
    assert peak < 32 * mask.size

