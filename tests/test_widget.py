"""The Segment dock widget in a real napari viewer."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import tifffile

from conftest import CASES

pytestmark = pytest.mark.napari


@pytest.fixture
def widget_and_viewer(make_napari_viewer):
    from napari_xlstm_unet.widgets import SegmentWidget

    viewer = make_napari_viewer()
    return SegmentWidget(viewer), viewer


def test_segment_widget_adds_scaled_labels(widget_and_viewer, qtbot):
    from napari.layers import Labels

    from napari_xlstm_unet.inference.predict import segment_image
    from napari_xlstm_unet.pretrained import load_model

    widget, viewer = widget_and_viewer
    meta = json.loads((CASES / "BR-21" / "br21_layer_meta.json").read_text())
    expected = json.loads((CASES / "BR-21" / "expected.json").read_text())
    image = tifffile.imread(CASES / "BR-21" / "br21_scaled_imagej.tif")
    layer = viewer.add_image(image, name="scaled", scale=meta["scale"], translate=meta["translate"])

    widget._image.value = layer
    widget.run()
    qtbot.waitUntil(lambda: len(viewer.layers) == 2, timeout=60_000)
    qtbot.waitUntil(lambda: widget._worker is None, timeout=10_000)

    labels = viewer.layers[-1]
    assert isinstance(labels, Labels)
    assert labels.name == "scaled_labels"
    assert list(labels.data.shape) == expected["labels_layer_shape"]
    assert list(labels.scale) == expected["labels_layer_scale"]
    assert list(labels.translate) == expected["labels_layer_translate"]
    assert labels.data.max() > 0
    # The widget returns what the plain function returns.
    direct = segment_image(image, load_model("cells")).labels
    np.testing.assert_array_equal(labels.data, direct)
    assert widget._run.enabled and not widget._cancel.enabled


def test_cancel_stops_without_adding_layer(widget_and_viewer, qtbot):
    widget, viewer = widget_and_viewer
    rng = np.random.default_rng(0)
    layer = viewer.add_image(rng.integers(0, 255, (2048, 2048), dtype=np.uint8), name="large")
    widget._image.value = layer

    widget.run()
    qtbot.waitUntil(lambda: widget._progress.value >= 1, timeout=60_000)
    start = time.perf_counter()
    widget.cancel()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=20_000)
    assert time.perf_counter() - start < 10
    assert len(viewer.layers) == 1
    assert widget._progress.value < widget._progress.max
    assert "cancelled" in widget._status.value


def test_missing_checkpoint_shows_error_and_keeps_running_state(widget_and_viewer, monkeypatch):
    from napari_xlstm_unet.widgets import _segment

    widget, viewer = widget_and_viewer
    viewer.add_image(np.zeros((32, 32), np.uint8), name="blank")
    messages = []
    monkeypatch.setattr("napari.utils.notifications.show_error", messages.append)
    widget._model.value = _segment.FILE_CHOICE
    assert not widget._checkpoint.native.isHidden()
    widget.run()
    assert messages and "checkpoint" in messages[0]
    assert widget._worker is None
    assert len(viewer.layers) == 1


def test_dock_widget_from_manifest(make_napari_viewer):
    from napari_xlstm_unet.widgets import SegmentWidget

    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-xlstm-unet", "Segment")
    assert isinstance(widget, SegmentWidget)


def test_sample_data_opens(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-xlstm-unet", "nuclei")
    assert viewer.layers[0].data.shape == (520, 348)


def test_stack_layer_segments_each_plane(widget_and_viewer, qtbot):
    widget, viewer = widget_and_viewer
    stack = np.zeros((3, 32, 32), np.uint16)  # constant planes skip the network
    layer = viewer.add_image(stack, name="stack", scale=(2.0, 0.5, 0.5))
    widget._image.value = layer
    widget.run()
    qtbot.waitUntil(lambda: len(viewer.layers) == 2, timeout=30_000)
    labels = viewer.layers[-1]
    assert labels.data.shape == (3, 32, 32)
    assert labels.data.max() == 0
    assert tuple(labels.scale) == (2.0, 0.5, 0.5)


def test_singleton_leading_axis_layer_segments(widget_and_viewer, qtbot):
    widget, viewer = widget_and_viewer
    data = np.load(CASES / "BR-03" / "br03_1yx_layer_data.npy")
    assert data.shape[0] == 1
    widget._image.value = viewer.add_image(data, name="projection")
    widget.run()
    qtbot.waitUntil(lambda: len(viewer.layers) == 2, timeout=60_000)
    assert viewer.layers[-1].data.shape == data.shape[1:]


def test_changing_thresholds_relabels_without_the_network(widget_and_viewer, qtbot, monkeypatch):
    from napari_xlstm_unet.inference.postprocess import probabilities_to_labels
    from napari_xlstm_unet.pretrained import load_model

    widget, viewer = widget_and_viewer
    image = tifffile.imread(CASES / "BR-21" / "br21_scaled_imagej.tif")
    widget._image.value = viewer.add_image(image, name="cells")
    widget.run()
    qtbot.waitUntil(lambda: widget._worker is None and len(viewer.layers) == 2, timeout=60_000)
    labels_layer = viewer.layers[-1]
    probabilities, _ = widget._last
    tuned = load_model("cells").postprocess
    assert widget._threshold.value == tuned["prob_threshold"]
    assert widget._min_size.value == tuned["min_size"]
    assert widget._split_depth.value == tuned["split_depth"] > 0

    def no_network(*args, **kwargs):
        raise AssertionError("the network ran again")

    monkeypatch.setattr(load_model("cells").model, "forward", no_network)
    monkeypatch.setattr("napari_xlstm_unet.inference.tiling.iter_predict_tiled", no_network)
    before = labels_layer.data.copy()
    sizes = np.sort(np.bincount(before.ravel())[1:])
    min_size = int(sizes[len(sizes) // 2]) + 1  # removes the smaller half of the objects
    widget._min_size.value = min_size
    depth = tuned["split_depth"]
    expected = probabilities_to_labels(probabilities, tuned["prob_threshold"], min_size, depth)
    np.testing.assert_array_equal(labels_layer.data, expected)
    assert expected.max() < before.max()
    widget._threshold.value = 0.95
    np.testing.assert_array_equal(labels_layer.data,
                                  probabilities_to_labels(probabilities, 0.95, min_size, depth))
    assert "threshold 0.95" in widget._status.value
    widget._split_depth.value = 0.0
    np.testing.assert_array_equal(labels_layer.data, probabilities_to_labels(probabilities, 0.95, min_size))
    assert "split depth 0" in widget._status.value


def test_rgb_frame_with_the_polyp_model_gives_classes(widget_and_viewer, qtbot):
    from napari_xlstm_unet._sample_data import polyp_sample
    from napari_xlstm_unet.widgets._segment import SHIPPED_CHOICES

    widget, viewer = widget_and_viewer
    [(data, meta, _)] = polyp_sample()
    widget._image.value = viewer.add_image(data, **meta)
    polyp_choice = next(text for text, (name, _) in SHIPPED_CHOICES.items() if name == "polyps")
    assert polyp_choice in widget._model.choices
    widget._model.value = polyp_choice
    widget.run()
    qtbot.waitUntil(lambda: widget._worker is None and len(viewer.layers) == 2, timeout=60_000)
    labels = viewer.layers[-1]
    assert labels.data.shape == data.shape[:2]
    assert set(np.unique(labels.data)) == {0, 1}
    assert "foreground classes" in widget._status.value
    assert not widget._threshold.enabled  # cell thresholds do not apply to class maps


def test_mirror_box_reaches_network(widget_and_viewer, qtbot):
    from napari_xlstm_unet.inference.predict import segment_image
    from napari_xlstm_unet.pretrained import load_model

    widget, viewer = widget_and_viewer
    image = tifffile.imread(CASES / "BR-21" / "br21_scaled_imagej.tif")[:96, :96]
    widget._image.value = viewer.add_image(image, name="crop")
    widget._mirror.value = True
    widget.run()
    qtbot.waitUntil(lambda: len(viewer.layers) == 2, timeout=60_000)
    qtbot.waitUntil(lambda: widget._worker is None, timeout=10_000)
    expected = segment_image(image, load_model("cells"), mirror=True)
    np.testing.assert_array_equal(viewer.layers[-1].data, expected.labels)
    np.testing.assert_allclose(widget._last[0], expected.probabilities, atol=1e-6)
