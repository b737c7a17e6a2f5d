"""The Fine-tune widget: a few real training steps from napari layers, cancel, and the switch of Segment."""

from __future__ import annotations

import time

import numpy as np
import pytest
import tifffile
import torch

from conftest import DATA

pytestmark = pytest.mark.napari

IMAGE = DATA / "microscopy" / "images" / "dsb2018s1test_191b2b2205f2.tif"
MASK = DATA / "microscopy" / "masks" / "dsb2018s1test_191b2b2205f2.tif"


@pytest.fixture
def viewer_with_pair(make_napari_viewer):
    viewer = make_napari_viewer()
    image = viewer.add_image(tifffile.imread(IMAGE)[:160, :160], name="nuclei")
    labels = viewer.add_labels(tifffile.imread(MASK)[:160, :160].astype(np.uint32), name="corrected")
    return viewer, image, labels


def test_finetune_changes_weights_and_switches_segment(viewer_with_pair, qtbot, tmp_path):
    from napari_xlstm_unet.model.checkpoint import load_checkpoint
    from napari_xlstm_unet.pretrained import resolve_model_path
    from napari_xlstm_unet.widgets import FinetuneWidget, SegmentWidget

    viewer, image, labels = viewer_with_pair
    segment = SegmentWidget(viewer)
    widget = FinetuneWidget(viewer)
    widget.image.value, widget.labels.value = image, labels
    widget.add_pair.changed.emit(True)
    widget.add_pair.changed.emit(True)  # the same pair twice gives a validation image
    widget.epochs.value = 1
    widget.output.value = tmp_path / "tuned.pt"
    widget.run()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=180_000)

    assert widget.progress.value == widget.progress.max == 10
    tuned = load_checkpoint(tmp_path / "tuned.pt")
    base = load_checkpoint(resolve_model_path("cells"))
    changed = [k for k, v in base.model.state_dict().items() if not torch.equal(v, tuned.model.state_dict()[k])]
    assert changed
    assert tuned.model_card["init"] == str(resolve_model_path("cells"))
    assert str(segment._checkpoint.value) == str(tmp_path / "tuned.pt")
    assert segment._model_spec() == str(tmp_path / "tuned.pt")
    assert widget.plot is not None
    assert len(widget.plot.losses) == 10


def test_finetune_cancel_stops_soon_and_saves_nothing(viewer_with_pair, qtbot, tmp_path):
    from napari_xlstm_unet.widgets import FinetuneWidget

    viewer, image, labels = viewer_with_pair
    widget = FinetuneWidget(viewer)
    widget.image.value, widget.labels.value = image, labels
    widget.epochs.value = 50
    widget.output.value = tmp_path / "tuned.pt"
    widget.run()
    qtbot.waitUntil(lambda: widget.progress.value >= 1, timeout=120_000)
    asked = time.perf_counter()
    widget.cancel()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=30_000)
    assert time.perf_counter() - asked < 15
    assert not (tmp_path / "tuned.pt").exists()
    assert "cancelled" in widget.status.value


def test_empty_labels_are_refused_by_name(make_napari_viewer, monkeypatch, tmp_path):
    from napari_xlstm_unet.widgets import FinetuneWidget

    errors = []
    monkeypatch.setattr("napari.utils.notifications.show_error", errors.append)
    viewer = make_napari_viewer()
    widget = FinetuneWidget(viewer)
    widget.image.value = viewer.add_image(np.zeros((32, 32), np.uint8), name="img")
    widget.labels.value = viewer.add_labels(np.zeros((32, 32), np.uint16), name="lab")
    widget.output.value = tmp_path / "x.pt"
    widget.run()
    assert errors == ["pair 1: the labels layer is empty; draw or correct some objects first"]
    assert widget._worker is None
