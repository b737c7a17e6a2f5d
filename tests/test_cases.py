"""Every input case in the shared ``cases`` folder gives the values its ``expected.json`` lists.

One section per case folder, each reading the expected values from the
folder's JSON file. Cases whose values are asserted in another module are
listed in ``TESTED_ELSEWHERE``; ``test_every_case_folder_is_tested`` checks
that no folder is left without a test.

The shipped cell model segments these small synthetic images exactly, so it
is used where an image has at most 256 x 256 pixels. Larger images (512 x 512
and 4096 x 4096) run on ``ThresholdModel``, a stand-in that marks bright
pixels as cell interior, so the reading, tiling and widget paths are tested
without the cost of the network.
"""

from __future__ import annotations

import importlib.metadata
import itertools
import json
import logging
import re
import shutil
import time

import numpy as np
import pytest
import tifffile
import torch
from test_tiling import ThresholdModel, stub_model

from conftest import CASES, REPO
from napari_xlstm_unet.cli import main
from napari_xlstm_unet.inference.normalize import prepare_image
from napari_xlstm_unet.inference.predict import segment_image
from napari_xlstm_unet.inference.tiling import (
    count_windows,
    predict_tiled,
    select_precision,
    tile_to_device,
)
from napari_xlstm_unet.io import (
    needs_bigtiff,
    read_image,
    standardize_axes,
    write_labels,
)
from napari_xlstm_unet.metrics import match_instances
from napari_xlstm_unet.pretrained import load_model

# Case folder -> tests in other modules that assert its expected values.
TESTED_ELSEWHERE = {
    "BR-02": ["test_io.py::test_png_alpha_detected"],
    "BR-03": ["test_widget.py::test_singleton_leading_axis_layer_segments"],
    "BR-06": ["test_tiling.py::test_br06_constant_images_give_empty_labels"],
    "BR-07": ["test_training.py::test_non_finite_training_image_is_refused_by_name",
              "test_training_runs.py::test_split_csv_run_leaves_out_non_finite_pair"],
    "BR-08": ["test_tiling.py::test_br08_objects_on_seams_are_not_split"],
    "BR-09": ["test_tiling.py::test_br09_any_size_keeps_shape"],
    "BR-14": ["test_metrics.py::test_br14_empty_cases",
              "test_metrics.py::test_br14_empty_vs_empty_is_true_negative",
              "test_metrics.py::test_br14_folder_mean_is_finite"],
    "BR-16": ["test_metrics.py::test_br16_binary_gt_merges_touching_cells",
              "test_training.py::test_binary_mask_with_touching_cells_warns_with_name"],
    "BR-17": ["test_training.py::test_semantic_mask_png_and_jpeg",
              "test_training.py::test_semantic_mask_ignore_band"],
    "BR-18": ["test_training_runs.py::test_br18_three_one_cell_pairs_all_train"],
    "BR-20": ["test_checkpoint_files.py::test_broken_checkpoint_names_file",
              "test_training_runs.py::test_transfer_weights_names_the_differing_setting"],
    "BR-21": ["test_io.py::test_br21_resolution_survives_round_trip",
              "test_widget.py::test_segment_widget_adds_scaled_labels"],
    "BR-25": ["test_io.py::test_br25_unicode_names_and_collisions",
              "test_cli.py::test_segment_keeps_existing_outputs"],
}


def case_json(case: str) -> dict:
    return json.loads((CASES / case / "expected.json").read_text())


@pytest.fixture(scope="module")
def cells():
    return load_model("cells", device="cpu")


def object_mask(labels: np.ndarray, truth: np.ndarray, truth_id: int) -> np.ndarray:
    """Return the predicted object that covers most of ground-truth object ``truth_id``."""
    covering = labels[truth == truth_id]
    return labels == np.bincount(covering[covering > 0]).argmax()


def intersection_over_union(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def segment_folder(files, out, *options) -> int:
    return main(["segment", *map(str, files), "--out", str(out), *options])


def test_every_case_folder_is_tested():
    source = (REPO / "tests" / "test_cases.py").read_text()
    folders = sorted(p.name for p in CASES.iterdir() if p.is_dir() and p.name.startswith("BR-"))
    assert folders
    for case in folders:
        prefix = case.replace("-", "").lower()  # BR-04 -> br04
        here = re.search(rf"^def test_{prefix}_", source, re.MULTILINE) is not None
        assert here or case in TESTED_ELSEWHERE, f"{case} has no test"
    for case, tests in TESTED_ELSEWHERE.items():
        for test in tests:
            file_name, function = test.split("::")
            text = (REPO / "tests" / file_name).read_text()
            assert f"def {function}(" in text, f"{case}: {test} not found"


# BR-01: a channel-first ImageJ image (CYX) and its channel-last twin (YXC).

BR01 = CASES / "BR-01"
BR01_FILES = ["br01_cyx_imagej.tif", "br01_yxc_plain.tif"]


@pytest.mark.parametrize("name", BR01_FILES)
def test_br01_channels_are_not_planes(name):
    expected = case_json("BR-01")
    readback = expected["tifffile_readback"][name]
    image = read_image(BR01 / name)
    assert list(image.data.shape) == readback["shape"]
    assert image.axes == readback["axes"]
    assert image.data.dtype == np.dtype(readback["dtype"])

    planes, plane_axes = standardize_axes(image.data, image.axes)
    assert plane_axes == ""  # one 2D image, not 2 slices or frames
    assert planes.shape == (2, *expected["output_labels_shape"])


def test_br01_both_layouts_give_identical_labels(tmp_path):
    expected = case_json("BR-01")
    assert segment_folder([BR01 / name for name in BR01_FILES], tmp_path) == 0
    cyx = tifffile.imread(tmp_path / "br01_cyx_imagej_labels.tif")
    yxc = tifffile.imread(tmp_path / "br01_yxc_plain_labels.tif")
    truth = tifffile.imread(BR01 / "br01_gt_labels.tif")

    assert list(cyx.shape) == expected["output_labels_shape"]
    assert cyx.max() == expected["n_objects_gt"]
    assert expected["cyx_and_yxc_give_identical_labels"]
    np.testing.assert_array_equal(cyx, yxc)
    assert match_instances(truth, cyx, border_width=0).f1 == 1.0


# BR-02: RGBA, partly transparent RGBA and grey + alpha PNGs.

BR02 = CASES / "BR-02"


def test_br02_alpha_is_dropped(tmp_path):
    expected = case_json("BR-02")
    names = ["br02_rgb.png", "br02_rgba.png", "br02_rgba_partial_alpha.png", "br02_la.png"]
    assert segment_folder([BR02 / name for name in names], tmp_path) == 0
    reference = tifffile.imread(tmp_path / "br02_rgb_labels.tif")
    assert list(reference.shape) == expected["output_labels_shape"]
    assert reference.max() == expected["n_objects_gt"]
    assert expected["rgba_and_la_labels_equal_rgb_or_grey_labels"]
    for name in ["br02_rgba.png", "br02_rgba_partial_alpha.png"]:
        labels = tifffile.imread(tmp_path / name.replace(".png", "_labels.tif"))
        np.testing.assert_array_equal(labels, reference, err_msg=name)

    # The grey + alpha file reaches the network exactly as its grey channel
    # alone would, so its labels are the grey result.
    grey_alpha = read_image(BR02 / "br02_la.png")
    assert grey_alpha.has_alpha
    network_input = prepare_image(grey_alpha.data, 3, has_alpha=True, axes=grey_alpha.axes)
    np.testing.assert_array_equal(network_input, prepare_image(grey_alpha.data[..., 0], 3))
    assert tifffile.imread(tmp_path / "br02_la_labels.tif").max() == expected["n_objects_gt"]


# BR-03: singleton axes before or after the image plane.

BR03 = CASES / "BR-03"


def test_br03_singleton_axes_are_squeezed(tmp_path):
    expected = case_json("BR-03")
    variants = ["br03_1yx.tif", "br03_yx1.tif", "br03_11yx.tif"]
    for name in variants:
        image = read_image(BR03 / name)
        readback = expected["tifffile_readback"][name]
        assert list(image.data.shape) == readback["shape"]
        assert image.axes == readback["axes"]

    assert segment_folder([BR03 / "br03_plain_yx.tif"] + [BR03 / n for n in variants], tmp_path) == 0
    plain = tifffile.imread(tmp_path / "br03_plain_yx_labels.tif")
    assert list(plain.shape) == expected["output_labels_shape"]
    assert plain.max() == expected["n_objects_gt"]
    assert expected["all_variants_equal_plain_yx_result"]
    for name in variants:
        labels = tifffile.imread(tmp_path / name.replace(".tif", "_labels.tif"))
        np.testing.assert_array_equal(labels, plain, err_msg=name)
    # The napari layer data reaches the network as the plain image does.
    layer_data = np.load(BR03 / "br03_1yx_layer_data.npy")
    plain_image = read_image(BR03 / "br03_plain_yx.tif").data
    np.testing.assert_array_equal(standardize_axes(layer_data)[0], standardize_axes(plain_image)[0])


# BR-04: an ImageJ time series (TYX) is segmented frame by frame.

BR04 = CASES / "BR-04"


def test_br04_frames_are_not_channels():
    readback = case_json("BR-04")["tifffile_readback"]
    image = read_image(BR04 / "br04_tyx_imagej.tif")
    assert list(image.data.shape) == readback["shape"]
    assert image.axes == readback["axes"]

    planes, plane_axes = standardize_axes(image.data, image.axes)
    assert plane_axes == "T"
    assert planes.shape == (3, 1, 128, 128)  # 3 frames of 1 channel, never 1 frame of RGB


def test_br04_cli_writes_labels_per_frame(tmp_path, cells):
    expected = case_json("BR-04")["either"]
    stack = tifffile.imread(BR04 / "br04_tyx_imagej.tif")
    assert segment_folder([BR04 / "br04_tyx_imagej.tif"], tmp_path) == 0

    written = read_image(tmp_path / "br04_tyx_imagej_labels.tif")
    assert list(written.data.shape) == expected["per_frame_labels_shape"]
    assert written.axes == "TYX"
    objects = [int(frame.max()) for frame in written.data]
    assert objects == expected["objects_per_frame"]
    assert expected["frame_t_equals_frame_processed_alone"]
    for t, frame in enumerate(stack):
        np.testing.assert_array_equal(written.data[t], segment_image(frame, cells).labels)


@pytest.mark.napari
def test_br04_widget_adds_labels_per_frame(make_napari_viewer, qtbot, cells):
    from napari_xlstm_unet.widgets import SegmentWidget

    expected = case_json("BR-04")["either"]
    stack = tifffile.imread(BR04 / "br04_tyx_imagej.tif")
    viewer = make_napari_viewer()
    widget = SegmentWidget(viewer)
    widget._image.value = viewer.add_image(stack, name="movie", scale=(1.0, 0.5, 0.5))
    widget.run()
    qtbot.waitUntil(lambda: len(viewer.layers) == 2, timeout=60_000)

    labels = viewer.layers[-1]
    assert list(labels.data.shape) == expected["per_frame_labels_shape"]
    assert tuple(labels.scale) == (1.0, 0.5, 0.5)
    assert [int(frame.max()) for frame in labels.data] == expected["objects_per_frame"]
    np.testing.assert_array_equal(labels.data[2], segment_image(stack[2], cells).labels)


# BR-05: one scene in five dtypes and value ranges.

def test_br05_dtypes_and_ranges_agree(cells):
    expected = case_json("BR-05")
    labels = {}
    for name in expected["all_variants"]:
        image = read_image(CASES / "BR-05" / name)
        labels[name] = segment_image(image.data, cells, axes=image.axes).labels
        assert labels[name].max() == expected["n_objects_each"], name
    for first, second in itertools.combinations(expected["all_variants"], 2):
        score = match_instances(labels[first], labels[second], border_width=0)
        assert score.f1 == expected["pairwise_F1_at_0.5_between_variants"], (first, second)


# BR-06: constant images in a batch (values per image: test_tiling.py).

def test_br06_batch_continues_past_constant_images(tmp_path):
    expected = case_json("BR-06")
    folder = tmp_path / "in"
    shutil.copytree(CASES / "BR-06", folder, ignore=shutil.ignore_patterns("*.json"))
    shutil.copy(CASES / "BR-05" / "br05_uint8.tif", folder / "zz_cells.tif")  # sorted last
    assert segment_folder([folder], tmp_path / "out") == 0

    assert expected["batch_continues_after_these_files"]
    assert tifffile.imread(tmp_path / "out" / "zz_cells_labels.tif").max() > 0
    for path in sorted((CASES / "BR-06").glob("*.tif")):
        labels = tifffile.imread(tmp_path / "out" / f"{path.stem}_labels.tif")
        assert list(labels.shape) == expected["labels_shape"], path.name
        assert labels.dtype.kind in "ui"
        assert labels.max() == expected["n_objects"], path.name


# BR-07: NaN and infinite pixels at inference (training part: TESTED_ELSEWHERE).

BR07 = CASES / "BR-07"


def test_br07_nonfinite_pixels_warn_with_file_and_count(tmp_path, caplog):
    expected = case_json("BR-07")
    with caplog.at_level(logging.WARNING):
        assert segment_folder([BR07 / "br07_nonfinite.tif"], tmp_path) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    naming_file = [message for message in warnings if "br07_nonfinite.tif" in message]
    assert naming_file, warnings
    assert f" {expected['n_nonfinite_pixels']} non-finite pixels" in naming_file[0]
    assert (tmp_path / "br07_nonfinite_labels.tif").is_file()


def test_br07_objects_away_from_nonfinite_pixels_unchanged(cells):
    expected = case_json("BR-07")
    clean = tifffile.imread(BR07 / "br07_clean.tif")
    spoiled = tifffile.imread(BR07 / "br07_nonfinite.tif")
    truth = tifffile.imread(BR07 / "br07_gt_labels.tif")
    assert (~np.isfinite(spoiled)).sum() == expected["n_nonfinite_pixels"]

    # The stand-in model thresholds the normalised pixels, so any leak of
    # NaN or infinity through normalisation or tiling would change its labels.
    stand_in_clean = segment_image(clean, stub_model()).labels
    stand_in_spoiled = segment_image(spoiled, stub_model())
    assert np.isfinite(stand_in_spoiled.probabilities).all()
    for truth_id in expected["gt_ids_not_touching_nonfinite"]:
        np.testing.assert_array_equal(object_mask(stand_in_spoiled.labels, truth, truth_id),
                                      object_mask(stand_in_clean, truth, truth_id))

    # Normalisation takes percentiles of the finite pixels only, which shift by
    # about 0.05 % when the 1026 pixels are left out. That moves 1 or 2
    # boundary pixels of these objects in the network's output, so the check
    # is IoU, not identity.
    network_clean = segment_image(clean, cells).labels
    network_spoiled = segment_image(spoiled, cells)
    assert np.isfinite(network_spoiled.probabilities).all()
    assert network_spoiled.labels.max() == network_clean.max()
    for truth_id in expected["gt_ids_not_touching_nonfinite"]:
        iou = intersection_over_union(object_mask(network_spoiled.labels, truth, truth_id),
                                      object_mask(network_clean, truth, truth_id))
        assert iou >= 0.99, (truth_id, iou)


# BR-11: compressed TIFFs (LZW, JPEG, zlib, deflate, packbits).

BR11 = CASES / "BR-11"
BR11_LOSSLESS = ["br11_zlib_tifffile.tif", "br11_lzw_pil.tif", "br11_packbits_pil.tif",
                 "br11_deflate_pil.tif"]
BR11_JPEG = "br11_jpeg_rgb_pil.tif"


@pytest.fixture(scope="module")
def br11_reference(cells):
    image = read_image(BR11 / "br11_uncompressed.tif").data
    return image, segment_image(image, cells).labels


@pytest.mark.parametrize("name", BR11_LOSSLESS + [BR11_JPEG])
def test_br11_compressed_tiff_reads_and_segments(name, br11_reference, cells):
    expected = case_json("BR-11")
    reference_image, reference_labels = br11_reference
    image = read_image(BR11 / name)
    labels = segment_image(image.data, cells, axes=image.axes).labels
    if name == BR11_JPEG:
        # JPEG at its default quality: 8-pixel blocks shift grey values by a few levels.
        grey = image.data.astype(np.float64).mean(axis=-1)
        assert np.abs(grey - reference_image).mean() < 0.03 * np.ptp(reference_image)
        assert match_instances(reference_labels, labels, border_width=0).f1 >= 0.99
    else:
        assert expected["lossless_files_decode_equal_to_uncompressed"]
        np.testing.assert_array_equal(image.data, reference_image)
        np.testing.assert_array_equal(labels, reference_labels)


class MissingCodecs:
    """tifffile's decompressor table as it is without imagecodecs: LZW and JPEG raise."""

    def __init__(self, table):
        self.table = table

    def __getitem__(self, key):
        if key in (tifffile.COMPRESSION.LZW, tifffile.COMPRESSION.JPEG):
            raise KeyError(f"{tifffile.COMPRESSION(key)!r} requires the 'imagecodecs' package")
        return self.table[key]

    def __contains__(self, key):
        try:
            self[key]
        except KeyError:
            return False
        return True


def test_br11_missing_codec_error_and_batch_continues(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(tifffile.TIFF, "DECOMPRESSORS", MissingCodecs(tifffile.TIFF.DECOMPRESSORS))
    with pytest.raises(ValueError) as info:
        read_image(BR11 / "br11_lzw_pil.tif")
    message = str(info.value)
    assert "br11_lzw_pil.tif" in message
    assert "LZW" in message
    assert "pip install imagecodecs" in message

    files = [BR11 / "br11_lzw_pil.tif", BR11 / "br11_uncompressed.tif"]
    assert segment_folder(files, tmp_path) == 1
    assert (tmp_path / "br11_uncompressed_labels.tif").is_file()
    assert not (tmp_path / "br11_lzw_pil_labels.tif").exists()
    assert "imagecodecs" in capsys.readouterr().err


def test_br11_imagecodecs_is_a_dependency():
    requirements = importlib.metadata.requires("napari-xlstm-unet") or []
    assert any(re.match(r"imagecodecs\b", requirement) for requirement in requirements)


# BR-12: pyramidal and multi-series OME-TIFF and BigTIFF; labels written back.
# 512 x 512 images, so the stand-in model segments them.

BR12 = CASES / "BR-12"


@pytest.mark.parametrize("name", ["br12_pyramid.ome.tif", "br12_two_series.ome.tif", "br12_bigtiff.tif"])
def test_br12_full_resolution_series_zero(name, tmp_path):
    expected = case_json("BR-12")
    readback = expected["tifffile_readback"][name]
    image = read_image(BR12 / name)
    assert list(image.data.shape) == readback["shape"]
    assert image.axes == readback["axes"]

    labels = segment_image(image.data, stub_model(), axes=image.axes).labels
    assert list(labels.shape) == expected["output_labels_shape_for_all_three"]
    assert labels.max() == expected["n_objects"]
    path = write_labels(tmp_path / "labels.tif", labels, image.resolution, image.resolution_unit)
    np.testing.assert_array_equal(read_image(path).data, labels)


def test_br12_label_writer_switches_to_bigtiff(tmp_path, monkeypatch):
    assert needs_bigtiff(2**32 - 1)  # just under 4 GiB of pixels
    assert not needs_bigtiff(512 * 512 * 2)

    # A 1000-byte threshold replaces 2 GiB, so the switch is tested on a small file.
    monkeypatch.setattr("napari_xlstm_unet.io.BIGTIFF_THRESHOLD_BYTES", 1000)
    labels = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)
    path = write_labels(tmp_path / "big_labels.tif", labels, (2.0, 2.0), "um")
    with tifffile.TiffFile(path) as tif:
        assert tif.is_bigtiff
        np.testing.assert_array_equal(tif.asarray(), labels)


def test_br12_stack_labels_keep_axes_and_shape(tmp_path):
    labels = np.arange(3 * 5 * 7, dtype=np.uint16).reshape(3, 5, 7)
    path = write_labels(tmp_path / "stack_labels.tif", labels, (2.0, 2.0), "um", axes="TYX")
    back = read_image(path)
    assert back.axes == "TYX"
    np.testing.assert_array_equal(back.data, labels)


# BR-22: a 4096 x 4096 image in the Segment widget must not freeze napari.
# The stand-in model makes a whole run take seconds; SlowThresholdModel
# sleeps per window so that Cancel arrives mid-run.

class SlowThresholdModel(ThresholdModel):
    def forward(self, x):
        time.sleep(0.05)
        return super().forward(x)


TIMER_INTERVAL_S = 0.05
MAX_TIMER_LATENESS_S = 0.2


def max_lateness(ticks: list[float], start: float, until: float) -> float:
    """Return how late the timer fired at worst, in seconds, between ``start`` and ``until``."""
    times = [start] + [t for t in ticks if start < t < until] + [until]
    return float(np.max(np.diff(times))) - TIMER_INTERVAL_S


@pytest.mark.napari
def test_br22_large_image_keeps_viewer_responsive(make_napari_viewer, qtbot, monkeypatch):
    from napari.layers import Labels
    from qtpy.QtCore import QTimer

    from napari_xlstm_unet.widgets import SegmentWidget

    expected = case_json("BR-22")
    image = tifffile.imread(CASES / "BR-22" / "br22_large_4096.tif")
    assert list(image.shape) == expected["image_shape"]
    viewer = make_napari_viewer()
    widget = SegmentWidget(viewer)
    widget._image.value = viewer.add_image(image, name="large")

    added_at: list[float] = []
    add_labels = SegmentWidget._add_labels

    def timed_add_labels(self, result, layer_kwargs):
        added_at.append(time.perf_counter())
        add_labels(self, result, layer_kwargs)

    monkeypatch.setattr(SegmentWidget, "_add_labels", timed_add_labels)
    ticks: list[float] = []
    timer = QTimer()
    timer.setInterval(int(TIMER_INTERVAL_S * 1000))
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start()

    # A run cancelled after two windows stops soon and adds no layer.
    slow = stub_model()
    slow.model = SlowThresholdModel()
    monkeypatch.setattr("napari_xlstm_unet.pretrained.load_model", lambda spec: slow)
    started_at = time.perf_counter()
    widget.run()
    qtbot.waitUntil(lambda: widget._progress.value >= 2, timeout=30_000)
    cancelled_at = time.perf_counter()
    widget.cancel()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=10_000)
    assert time.perf_counter() - cancelled_at < 5
    assert len(viewer.layers) == 1
    assert "cancelled" in widget._status.value
    assert widget._progress.value < widget._progress.max
    assert max_lateness(ticks, started_at, time.perf_counter()) < MAX_TIMER_LATENESS_S

    # A whole run shows progress to the end and adds one Labels layer.
    fast = stub_model()
    monkeypatch.setattr("napari_xlstm_unet.pretrained.load_model", lambda spec: fast)
    started_at = time.perf_counter()
    widget.run()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=60_000)
    timer.stop()
    assert len(viewer.layers) == 2
    labels = viewer.layers[-1]
    assert isinstance(labels, Labels)
    assert labels.name == "large_labels"
    assert list(labels.data.shape) == expected["image_shape"]
    assert labels.data.max() > 0
    assert widget._progress.value == widget._progress.max == count_windows(*image.shape, 512, 0.125)
    # napari builds the layer on the GUI thread, so lateness counts until then.
    assert max_lateness(ticks, started_at, added_at[-1]) < MAX_TIMER_LATENESS_S


# BR-23: float64, uint16, uint32 and signed int16; CPU-only and MPS rules.

BR23 = CASES / "BR-23"
BR23_FILES = ["br23_float64.tif", "br23_uint16.tif", "br23_uint32.tif", "br23_int16_signed.tif"]


@pytest.fixture(scope="module")
def br23_reference(cells):
    return segment_image(tifffile.imread(BR23 / "br23_uint16.tif"), cells).labels


@pytest.mark.parametrize("name", BR23_FILES)
def test_br23_every_dtype_same_labels(name, br23_reference, cells):
    expected = case_json("BR-23")
    reference = br23_reference
    image = read_image(BR23 / name)
    labels = segment_image(image.data, cells, axes=image.axes).labels
    assert labels.max() == expected["n_objects"]
    assert expected["all_dtypes_same_labels"]
    np.testing.assert_array_equal(labels, reference)


def forbid_cuda(monkeypatch, allow_is_available: bool) -> list[str]:
    """Make every CUDA entry point fail, as on a machine without a GPU; return the calls seen."""
    calls: list[str] = []

    def forbidden(*args, **kwargs):
        raise AssertionError("a CUDA function was called on a CPU-only run")

    def is_available():
        calls.append("is_available")
        if not allow_is_available:
            forbidden()
        return False

    monkeypatch.setattr(torch.cuda, "is_available", is_available)
    for name in ("current_device", "device_count", "synchronize", "empty_cache", "set_device",
                 "init", "_lazy_init", "is_bf16_supported", "get_device_properties", "mem_get_info"):
        monkeypatch.setattr(torch.cuda, name, forbidden)
    monkeypatch.setattr(torch.Tensor, "cuda", forbidden)
    return calls


def test_br23_cpu_only_run_makes_no_cuda_call(tmp_path, monkeypatch):
    from napari_xlstm_unet.inference.predict import default_device
    from napari_xlstm_unet.model.checkpoint import load_checkpoint
    from napari_xlstm_unet.pretrained import resolve_model_path

    expected = case_json("BR-23")
    calls = forbid_cuda(monkeypatch, allow_is_available=True)
    # Without a device, only the check for a GPU is allowed.
    loaded = load_checkpoint(resolve_model_path("cells"), device=default_device())
    assert calls == ["is_available"]
    assert {p.device.type for p in loaded.model.parameters()} == {"cpu"}
    result = segment_image(tifffile.imread(BR23 / "br23_float64.tif"), loaded, precision="bfloat16")
    assert result.labels.max() == expected["n_objects"]
    assert calls == ["is_available"]

    # With --device cpu, not even that check runs.
    forbid_cuda(monkeypatch, allow_is_available=False)
    assert segment_folder([BR23 / "br23_uint16.tif"], tmp_path, "--device", "cpu") == 0
    assert tifffile.imread(tmp_path / "br23_uint16_labels.tif").max() == expected["n_objects"]


def test_br23_precision_rule_per_device():
    assert select_precision("mps", "bfloat16") == "float32"
    assert select_precision("mps", "float32") == "float32"
    assert select_precision("cpu", "bfloat16") == "bfloat16"
    assert select_precision("cpu", "float32") == "float32"
    with pytest.raises(ValueError, match="float16"):
        select_precision("cpu", "float16")


def test_br23_windows_cast_to_float32_before_transfer(monkeypatch):
    assert tile_to_device(np.ones((1, 4, 4), np.float64), "cpu").dtype == torch.float32

    moved: list[torch.dtype] = []
    to = torch.Tensor.to

    def recording_to(self, *args, **kwargs):
        moved.append(self.dtype)
        return to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", recording_to)
    image = np.random.default_rng(0).random((1, 40, 40))  # float64
    predict_tiled(ThresholdModel(), image, 3, tile_size=32, overlap=0.25)
    assert moved
    assert set(moved) == {torch.float32}


class OutOfMemoryModel(ThresholdModel):
    def forward(self, x):
        raise MemoryError("Unable to allocate 64.0 GiB for an array")


def test_br23_out_of_memory_is_a_clear_error(tmp_path, monkeypatch, capsys):
    loaded = stub_model()
    loaded.model = OutOfMemoryModel()
    monkeypatch.setattr("napari_xlstm_unet.pretrained.load_model", lambda spec, device=None: loaded)
    assert segment_folder([BR23 / "br23_uint16.tif"], tmp_path) == 1
    error = capsys.readouterr().err
    assert "br23_uint16.tif" in error
    assert "out of memory" in error
    assert "--tile-size" in error
    assert not (tmp_path / "br23_uint16_labels.tif").exists()
