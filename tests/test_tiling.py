"""Sliding-window prediction: exact stitching, seams (case BR-08), sizes (case BR-09)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import torch

from conftest import CASES, LogModel
from napari_xlstm_unet.inference.predict import segment_image
from napari_xlstm_unet.inference.tiling import (
    Cancelled,
    count_windows,
    fitted_side,
    gaussian_weights,
    predict_tiled,
    tile_starts,
)
from napari_xlstm_unet.metrics import match_instances
from napari_xlstm_unet.model import build_model
from napari_xlstm_unet.model.checkpoint import LoadedModel


class ThresholdModel(torch.nn.Module):
    """Interior where the normalised image is bright, background elsewhere."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the model a device

    def forward(self, x):
        bright = 20.0 * (x[:, :1] - 0.5)
        return torch.cat([-bright, bright, torch.full_like(bright, -30.0)], dim=1)


def test_fitted_side_exact_values():
    assert fitted_side(600, 512, 0.125, 16) == 320  # 2 windows of 320 instead of 2 of 512
    assert fitted_side(2048, 512, 0.125, 16) == 464
    assert fitted_side(4096, 512, 0.125, 16) == 512  # 9 windows of 512 already fit
    assert fitted_side(300, 512, 0.125, 16) == 300  # one window: the image itself
    assert fitted_side(513, 512, 0.0, 1) == 257


@pytest.mark.parametrize("overlap", [0.0, 0.125, 0.5])
@pytest.mark.parametrize("multiple", [1, 16, 128])
def test_fitted_windows_cover_the_image(overlap, multiple):
    for length in range(130, 3000, 37):
        side = fitted_side(length, 512, overlap, multiple)
        starts = tile_starts(length, side, overlap)
        assert len(starts) == len(tile_starts(length, 512, overlap)), length
        assert side <= 512
        assert side % multiple == 0 or side in (length, 512)
        assert starts[0] == 0
        assert starts[-1] + side == length
        gaps = np.diff(starts)
        assert (gaps <= side - overlap * side + 1e-9).all(), length  # neighbours share the overlap


class ShapeRecorder(torch.nn.Module):
    """Pointwise model that remembers the window shapes it was given."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def forward(self, x):
        self.shapes.append(tuple(x.shape[2:]))
        return torch.log(x)


def test_fitted_windows_same_pointwise_result():
    rng = np.random.default_rng(0)
    image = rng.random((3, 600, 700)).astype(np.float32) + 0.01
    image /= image.sum(axis=0, keepdims=True)
    fitted, fixed = ShapeRecorder(), ShapeRecorder()
    out_fitted = predict_tiled(fitted, image, 3, tile_size=512, multiple=16)
    out_fixed = predict_tiled(fixed, image, 3, tile_size=512, fit_windows=False)
    np.testing.assert_allclose(out_fitted, image, rtol=1e-5)
    np.testing.assert_allclose(out_fixed, image, rtol=1e-5)
    assert set(fixed.shapes) == {(512, 512)}
    assert set(fitted.shapes) == {(320, 384)}  # ceil(700 / 1.875) = 374, rounded up to 16
    assert len(fitted.shapes) == len(fixed.shapes) == count_windows(600, 700, 512, 0.125) == 4


def test_window_multiple_defaults_to_model_stride():
    import types

    image = np.full((3, 600, 700), 1 / 3, np.float32)
    model = ShapeRecorder()
    model.config = types.SimpleNamespace(total_stride=128)
    predict_tiled(model, image, 3, tile_size=512)
    assert set(model.shapes) == {(384, 384)}  # 320 and 374 rounded up to 128


def test_tile_starts_cover_and_end_at_edge():
    assert tile_starts(100, 128, 0.25) == [0]
    assert tile_starts(128, 128, 0.25) == [0]
    assert tile_starts(300, 128, 0.25) == [0, 96, 172]
    assert tile_starts(300, 128, 0.0) == [0, 128, 172]


def test_gaussian_weights_peak_and_floor():
    weights = gaussian_weights(9, 9)
    assert weights[4, 4] == pytest.approx(1.0)
    assert weights.min() >= 1e-6
    assert weights.shape == (9, 9)


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5])
def test_identity_predictor_is_stitched_exactly(overlap):
    rng = np.random.default_rng(0)
    raw = rng.uniform(0.1, 1.0, (3, 100, 130)).astype(np.float32)
    probabilities = raw / raw.sum(axis=0, keepdims=True)
    result = predict_tiled(LogModel(), probabilities, 3, tile_size=32, overlap=overlap)
    np.testing.assert_allclose(result, probabilities, rtol=1e-5, atol=1e-6)


def test_progress_reports_every_window_and_cancel_stops():
    image = np.full((3, 64, 64), 1 / 3, dtype=np.float32)
    seen = []
    predict_tiled(LogModel(), image, 3, tile_size=32, overlap=0.0, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]

    calls = []
    with pytest.raises(Cancelled):
        predict_tiled(LogModel(), image, 3, tile_size=32, overlap=0.0,
                      progress=lambda d, t: calls.append(d), should_stop=lambda: len(calls) >= 2)
    assert calls == [1, 2]


def stub_model():
    from napari_xlstm_unet.model import ModelConfig

    config = ModelConfig(in_channels=1, widths=(4, 8), strides=(1, 2), encoder_blocks=(1, 1),
                         decoder_blocks=(1,), xlstm="none")
    return LoadedModel(model=ThresholdModel(), config=config,
                       postprocess={"prob_threshold": 0.5, "min_size": 0})


def test_br08_objects_on_seams_are_not_split():
    expected = json.loads((CASES / "BR-08" / "expected.json").read_text())
    image = tifffile.imread(CASES / "BR-08" / "br08_seams_1024.tif")
    truth = tifffile.imread(CASES / "BR-08" / "br08_gt_labels.tif")
    loaded = stub_model()

    tiled = segment_image(image, loaded, tile_size=256, overlap=0.125).labels
    untiled = segment_image(image, loaded, tile_size=2048).labels

    assert tiled.max() == expected["n_objects"]
    tiled_score = match_instances(truth, tiled, border_width=0)
    untiled_score = match_instances(truth, untiled, border_width=0)
    assert tiled_score.f1 == expected["F1_vs_gt_with_threshold_stub_model"]
    assert tiled_score.f1 == untiled_score.f1
    # Each true object is covered by exactly one predicted label.
    for label in range(1, int(truth.max()) + 1):
        assert len(np.unique(tiled[(truth == label) & (tiled > 0)])) == 1


@pytest.mark.parametrize("name", ["br09_250x333.tif", "br09_31x1024.tif", "br09_7x7.tif", "br09_1x1.tif"])
def test_br09_any_size_keeps_shape(name, tiny_config):
    expected = json.loads((CASES / "BR-09" / "expected.json").read_text())["output_shape_equals_input_shape"]
    image = tifffile.imread(CASES / "BR-09" / name)
    loaded = LoadedModel(model=build_model(tiny_config).eval(), config=tiny_config)
    labels = segment_image(image, loaded, tile_size=256).labels
    assert list(labels.shape) == expected[name]
    assert labels.dtype == np.uint16


@pytest.mark.parametrize(
    "shape, expected",
    [
        ((256, 256), (1, 256, 256)),
        ((1, 256, 256), (1, 256, 256)),
        ((256, 256, 1), (1, 256, 256)),
        ((1, 1, 256, 256), (1, 256, 256)),
        ((256, 256, 3), (3, 256, 256)),
        ((2, 256, 256), (2, 256, 256)),
        ((1, 1, 3), (3, 1, 1)),
        ((1, 1), (1, 1, 1)),
    ],
)
def test_channel_layouts(shape, expected):
    from napari_xlstm_unet.inference.normalize import to_channels_first

    assert to_channels_first(np.zeros(shape)).shape == expected


def test_stack_is_rejected_with_shape():
    from napari_xlstm_unet.inference.normalize import to_channels_first

    with pytest.raises(ValueError, match=r"\(5, 64, 64\)"):
        to_channels_first(np.zeros((5, 64, 64)))


def test_constant_and_nonfinite_images_normalise_to_finite():
    from napari_xlstm_unet.inference.normalize import normalize_percentile

    constant = normalize_percentile(np.full((1, 8, 8), 1000.0))
    assert np.array_equal(constant, np.zeros((1, 8, 8), np.float32))
    noisy = np.arange(64, dtype=np.float32).reshape(1, 8, 8)
    noisy[0, 0, 0] = np.nan
    noisy[0, 1, 1] = np.inf
    result = normalize_percentile(noisy)
    assert np.isfinite(result).all()
    assert result[0, 0, 0] == 0.0


@pytest.mark.parametrize(
    "name", ["br06_zeros_uint16.tif", "br06_const1000_uint16.tif", "br06_const_float32.tif",
             "br06_near_constant_uint16.tif"],
)
def test_br06_constant_images_give_empty_labels(name, tiny_config):
    image = tifffile.imread(CASES / "BR-06" / name)
    loaded = LoadedModel(model=build_model(tiny_config).eval(), config=tiny_config)
    result = segment_image(image, loaded)
    assert result.labels.shape == (256, 256)
    assert result.labels.dtype == np.uint16
    assert result.labels.max() == 0
    assert np.isfinite(result.probabilities).all()


def test_all_nan_image_gives_empty_labels(tiny_config):
    loaded = LoadedModel(model=build_model(tiny_config).eval(), config=tiny_config)
    result = segment_image(np.full((40, 50), np.nan, np.float32), loaded)
    assert result.labels.max() == 0


class RampModel(torch.nn.Module):
    """Ignores its input: class 1 logits rise along the columns, so mirroring changes the output."""

    def forward(self, x):
        ramp = torch.linspace(-2.0, 2.0, x.shape[-1]).expand(x.shape[0], 1, x.shape[-2], x.shape[-1])
        return torch.cat([torch.zeros_like(ramp), ramp], dim=1)


def test_mirroring_unflips_outputs_before_mean():
    image = np.zeros((1, 6, 5), np.float32)
    plain = predict_tiled(RampModel(), image, 2, tile_size=64)
    mirrored = predict_tiled(RampModel(), image, 2, tile_size=64, mirror=True)
    ramp = np.linspace(-2.0, 2.0, 5)
    forward = 1 / (1 + np.exp(-ramp))
    np.testing.assert_allclose(plain[1, 0], forward, rtol=1e-6)
    # Two of the four passes are mirrored left-right: their ramp comes back reversed.
    np.testing.assert_allclose(mirrored[1, 0], (forward + forward[::-1]) / 2, rtol=1e-6)
    np.testing.assert_allclose(mirrored.sum(axis=0), 1.0, rtol=1e-6)


def test_mirroring_keeps_symmetric_model_output():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 3, 3, padding=1, bias=False)
    with torch.no_grad():  # a kernel symmetric under both flips gives a mirror-equivariant model
        weight = conv.weight
        conv.weight.copy_((weight + weight.flip(2) + weight.flip(3) + weight.flip(2, 3)) / 4)
    image = np.random.default_rng(1).normal(size=(3, 40, 50)).astype(np.float32)
    plain = predict_tiled(conv.eval(), image, 3, tile_size=32, overlap=0.25)
    mirrored = predict_tiled(conv.eval(), image, 3, tile_size=32, overlap=0.25, mirror=True)
    np.testing.assert_allclose(mirrored, plain, atol=1e-5)


@pytest.mark.parametrize("shape", [(7, 7), (40, 50)])
def test_channel_token_network_any_size(shape, tiny_config):
    import dataclasses

    config = dataclasses.replace(tiny_config, xlstm="enc", vil_channel_tokens=True, patch_size=(16, 16))
    assert config.channel_token_grids  # the ViL really runs on channel tokens
    loaded = LoadedModel(model=build_model(config).eval(), config=config)
    image = np.random.default_rng(0).integers(0, 255, shape).astype(np.uint8)
    steps = []
    labels = segment_image(image, loaded, tile_size=512, progress=lambda *step: steps.append(step)).labels
    assert labels.shape == image.shape[:2]
    # Windows shrink to the 16-pixel patch, and progress counts those windows.
    assert steps[-1][0] == steps[-1][1] == len(tile_starts(image.shape[0], 16, 0.125)) * len(
        tile_starts(image.shape[1], 16, 0.125))


def test_small_tile_warns_with_training_patch(caplog):
    from napari_xlstm_unet.pretrained import load_model

    image = np.zeros((40, 40), np.uint8)  # constant, so the network does not run
    with caplog.at_level("WARNING", logger="napari_xlstm_unet.inference.predict"):
        segment_image(image, load_model("cells", device="cpu"), tile_size=64)
    assert "tile size 64 is smaller than the 192-pixel patches" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="napari_xlstm_unet.inference.predict"):
        segment_image(image, load_model("cells", device="cpu"), tile_size=192)
    assert "smaller than" not in caplog.text


def test_complex_image_is_rejected():
    from napari_xlstm_unet.inference.normalize import prepare_image

    with pytest.raises(ValueError, match="complex values"):
        prepare_image(np.ones((8, 8), np.complex64), 3)


def test_nonfinite_warning_counts_pixels(caplog):
    from napari_xlstm_unet.inference.normalize import prepare_image

    image = np.ones((3, 4, 5), np.float32)
    image[:, 0, 0] = np.nan  # one pixel, all three channels
    prepare_image(image, 3)
    assert "contains 1 non-finite pixels" in caplog.text
