"""The Batch dock widget in a real napari viewer."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import tifffile

from conftest import DATA

pytestmark = pytest.mark.napari

SAMPLE = DATA / "microscopy" / "images" / "dsb2018s1test_191b2b2205f2.tif"


@pytest.fixture
def folder(tmp_path):
    images = tmp_path / "in"
    images.mkdir()
    image = tifffile.imread(SAMPLE)
    tifffile.imwrite(images / "a.tif", image[:96, :96])
    tifffile.imwrite(images / "b.tif", image[96:160, :128])
    (images / "broken.tif").write_text("not a TIFF")
    return images


def test_batch_widget_runs_a_folder_and_opens_results(make_napari_viewer, qtbot, folder, tmp_path):
    from napari.layers import Image, Labels

    from napari_xlstm_unet.widgets import BatchWidget

    viewer = make_napari_viewer()
    widget = BatchWidget(viewer)
    widget.input_dir.value = folder
    widget.output_dir.value = tmp_path / "out"
    widget.run()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=120_000)

    assert widget.progress.value == widget.progress.max == 3
    assert "2 ok, 1 failed, 0 skipped" in widget.current.value
    table = widget.table.data.to_list()
    assert [row[0].rsplit("/", 1)[-1] for row in table] == ["a.tif", "b.tif", "broken.tif"]
    assert [row[1] for row in table] == ["ok", "ok", "failed"]
    with open(tmp_path / "out" / "results.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 3

    widget.open_selected(rows=[1, 2])  # the failed row opens nothing
    assert [type(layer) for layer in viewer.layers] == [Image, Labels]
    np.testing.assert_array_equal(viewer.layers[1].data, tifffile.imread(tmp_path / "out" / "b_labels.tif"))


def test_batch_widget_names_missing_folders(make_napari_viewer, monkeypatch):
    from napari_xlstm_unet.widgets import BatchWidget

    errors = []
    monkeypatch.setattr("napari.utils.notifications.show_error", errors.append)
    widget = BatchWidget(make_napari_viewer())
    widget.run()
    assert errors == ["no input folder chosen; pick the folder of images to segment"]
    assert widget._worker is None


def test_batch_widget_cancel_keeps_finished_files(make_napari_viewer, qtbot, folder, tmp_path):
    from napari_xlstm_unet.widgets import BatchWidget

    for index in range(6):
        tifffile.imwrite(folder / f"extra{index}.tif", tifffile.imread(SAMPLE)[:128, :128])
    widget = BatchWidget(make_napari_viewer())
    widget.input_dir.value = folder
    widget.output_dir.value = tmp_path / "out"
    widget.run()
    qtbot.waitUntil(lambda: widget.progress.value >= 1, timeout=60_000)
    widget.cancel()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=60_000)
    assert widget.current.value == "cancelled"
    written = list((tmp_path / "out").glob("*_labels.tif"))
    assert 1 <= len(written) < 8
    assert len(widget.table.data.to_list()) == widget.progress.value


def test_batch_widget_mirror_option(make_napari_viewer, folder, tmp_path):
    from napari_xlstm_unet.widgets import BatchWidget

    widget = BatchWidget(make_napari_viewer())
    widget.input_dir.value = folder
    widget.output_dir.value = tmp_path / "out"
    assert widget.options().mirror is False
    widget.mirror.value = True
    assert widget.options().mirror is True
