"""Endoscopy: semantic class maps from the inference code, the command line and the widget."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from conftest import CASES
from napari_xlstm_unet.cli import main
from napari_xlstm_unet.inference.predict import class_map, segment_image
from napari_xlstm_unet.model import ModelConfig, build_model
from napari_xlstm_unet.model.checkpoint import LoadedModel, save_checkpoint

BR17 = CASES / "BR-17"


class RednessModel(torch.nn.Module):
    """Two-class stand-in: class 1 where the first channel exceeds the second by 0.2."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(()))  # the predictor reads the device from a parameter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = (x[:, 0:1] - x[:, 1:2] - 0.2) * 50
        return torch.cat([-score, score], dim=1)


def semantic_stub() -> LoadedModel:
    config = ModelConfig(in_channels=3, num_classes=2, widths=(4, 8), strides=(1, 2), encoder_blocks=(1, 1),
                         decoder_blocks=(1,), xlstm="none")
    loaded = LoadedModel(model=build_model(config), config=config, task="semantic",
                         class_names=["background", "tool"], postprocess={})
    loaded.model = RednessModel()
    return loaded


def test_class_map_takes_the_most_probable_class():
    probabilities = np.zeros((3, 2, 2), np.float32)
    probabilities[0] = [[0.6, 0.1], [0.2, 0.3]]
    probabilities[1] = [[0.3, 0.8], [0.1, 0.3]]
    probabilities[2] = [[0.1, 0.1], [0.7, 0.4]]
    result = class_map(probabilities)
    np.testing.assert_array_equal(result, [[0, 1], [2, 2]])
    assert result.dtype == np.uint8


def test_semantic_model_returns_classes_for_frames_and_stacks():
    frame = np.zeros((40, 60, 3), np.uint8)
    frame[..., 1] = 100
    frame[10:20, 5:25, 0] = 250  # a red bar
    result = segment_image(frame, semantic_stub(), tile_size=32)
    expected = np.zeros((40, 60), np.uint8)
    expected[10:20, 5:25] = 1
    np.testing.assert_array_equal(result.labels, expected)
    assert result.probabilities.shape == (2, 40, 60)

    video = np.stack([frame, np.roll(frame, 7, axis=1)])  # (T, H, W, C)
    frames = segment_image(video, semantic_stub(), tile_size=32, axes="TYXS")
    assert frames.labels.shape == (2, 40, 60)
    assert frames.axes == "TYX"
    np.testing.assert_array_equal(frames.labels[1], np.roll(expected, 7, axis=1))


def test_constant_frame_gives_empty_class_map():
    result = segment_image(np.full((32, 32, 3), 90, np.uint8), semantic_stub())
    assert result.labels.dtype == np.uint8
    assert not result.labels.any()


def _write(folder, name, array):
    folder.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(folder / name, array)


def test_evaluate_endoscopy_on_png_and_jpeg_masks(tmp_path, capsys):
    expected = json.loads((BR17 / "expected.json").read_text())
    png = np.asarray(Image.open(BR17 / "br17_mask_0_255.png"))
    jpeg = np.asarray(Image.open(BR17 / "br17_mask_0_255.jpg").convert("L"))
    _write(tmp_path / "pred", "frame_labels.tif", (jpeg >= 128).astype(np.uint8))
    _write(tmp_path / "gt", "frame.tif", png)  # 0/255 ground truth, read as 0/1
    csv_path = tmp_path / "scores.csv"
    assert main(["evaluate", "--task", "endoscopy", str(tmp_path / "pred"), str(tmp_path / "gt"),
                 "--csv", str(csv_path)]) == 0
    rows = csv_path.read_text().splitlines()
    assert rows[0] == "name,dice,nsd,n_classes,dice_1,nsd_1"
    dice = float(rows[1].split(",")[1])
    assert dice == pytest.approx(expected["dice_jpeg_thresholded_at_128_vs_png"])
    assert "tolerance 2 px" in capsys.readouterr().out


def test_evaluate_endoscopy_ignore_band(tmp_path, capsys):
    ignore_mask = np.asarray(Image.open(BR17 / "br17_mask_0_1_ignore255.png"))
    prediction = (ignore_mask == 1).astype(np.uint8)
    prediction[ignore_mask == 255] = 1  # wrong only inside the ignored band
    _write(tmp_path / "pred", "f_labels.tif", prediction)
    _write(tmp_path / "gt", "f.tif", ignore_mask)
    args = ["evaluate", "--task", "endoscopy", str(tmp_path / "pred"), str(tmp_path / "gt")]
    assert main(args) == 1  # the file fails by name, as any unreadable pair does
    assert "set data.ignore_value: 255" in capsys.readouterr().err
    assert main(args + ["--ignore-value", "255", "--csv", str(tmp_path / "s.csv")]) == 0
    assert float((tmp_path / "s.csv").read_text().splitlines()[1].split(",")[1]) == 1.0


def test_segment_rejects_a_model_of_the_other_task(tmp_path, capsys):
    _write(tmp_path / "in", "frame.tif", np.zeros((32, 32, 3), np.uint8))
    assert main(["segment", "--task", "endoscopy", "--model", "cells", str(tmp_path / "in"),
                 "--out", str(tmp_path / "out")]) == 2
    message = capsys.readouterr().err
    assert "'cells' model" in message
    assert "task 'endoscopy'" in message


def test_segment_endoscopy_with_a_checkpoint(tmp_path, capsys):
    loaded = semantic_stub()
    loaded.model = build_model(loaded.config)
    save_checkpoint(tmp_path / "tools.pt", loaded)
    frame = np.asarray(Image.open(BR17 / "br17_frame.png"))
    _write(tmp_path / "in", "frame.tif", frame)
    assert main(["segment", "--task", "endoscopy", "--model", str(tmp_path / "tools.pt"),
                 str(tmp_path / "in"), "--out", str(tmp_path / "out")]) == 0
    labels = tifffile.imread(tmp_path / "out" / "frame_labels.tif")
    assert labels.shape == frame.shape[:2]
    assert labels.dtype == np.uint8
    assert set(np.unique(labels)) <= {0, 1}
    assert "class area" in capsys.readouterr().out


def test_widget_offers_endoscopy_models_for_rgb_layers_only(monkeypatch):
    from types import SimpleNamespace

    from napari_xlstm_unet.widgets import _segment

    monkeypatch.setattr("napari_xlstm_unet.pretrained.available_models", lambda: ["cells", "polyps"])
    grey = _segment.model_choices(SimpleNamespace(rgb=False))
    rgb = _segment.model_choices(SimpleNamespace(rgb=True))
    assert [c.split(":")[0] for c in grey] == ["cells", _segment.FILE_CHOICE]
    assert [c.split(":")[0] for c in rgb] == ["cells", "polyps", _segment.FILE_CHOICE]


def test_input_scale_zooms_in_and_resizes_back():
    loaded = semantic_stub()
    loaded.input_scale = 0.5
    frame = np.zeros((40, 60, 3), np.uint8)
    frame[..., 1] = 100
    frame[10:30, 20:40, 0] = 250
    result = segment_image(frame, loaded, tile_size=32)
    assert result.labels.shape == (40, 60)
    assert result.probabilities.shape == (2, 40, 60)
    expected = np.zeros((40, 60), bool)
    expected[10:30, 20:40] = True
    # Half resolution blurs the square's edge by about one pixel.
    assert np.count_nonzero((result.labels == 1) != expected) <= 2 * (20 + 20)
    assert result.labels[20, 30] == 1
    assert result.labels[2, 2] == 0


def test_polyp_sample_is_an_rgb_frame():
    from napari_xlstm_unet._sample_data import polyp_sample

    [(data, meta, kind)] = polyp_sample()
    assert data.shape == (384, 512, 3)
    assert data.dtype == np.uint8
    assert meta["rgb"] is True
    assert kind == "image"
