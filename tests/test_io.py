"""Reading images, writing labels, naming outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from conftest import CASES
from napari_xlstm_unet.io import labels_output_path, list_images, read_image, write_labels


def test_labels_round_trip_keeps_dtype_and_values(tmp_path):
    labels = np.arange(12, dtype=np.uint16).reshape(3, 4)
    path = write_labels(tmp_path / "a_labels.tif", labels)
    back = read_image(path)
    assert back.data.dtype == np.uint16
    np.testing.assert_array_equal(back.data, labels)


def test_write_refuses_to_overwrite(tmp_path):
    path = tmp_path / "x_labels.tif"
    write_labels(path, np.ones((4, 4), np.uint16))
    with pytest.raises(FileExistsError, match="overwrite"):
        write_labels(path, np.zeros((4, 4), np.uint16))
    assert read_image(path).data.max() == 1
    write_labels(path, np.zeros((4, 4), np.uint16), overwrite=True)
    assert read_image(path).data.max() == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x_labels.tif"]


def test_write_rejects_signed_labels(tmp_path):
    with pytest.raises(TypeError, match="unsigned"):
        write_labels(tmp_path / "s.tif", np.zeros((2, 2), np.int32))


def test_br21_resolution_survives_round_trip(tmp_path):
    expected = json.loads((CASES / "BR-21" / "expected.json").read_text())
    image = read_image(CASES / "BR-21" / "br21_scaled_imagej.tif")
    assert image.resolution == (2.0, 2.0)
    path = write_labels(tmp_path / "out.tif", np.zeros(image.data.shape, np.uint16),
                        image.resolution, image.resolution_unit)
    back = read_image(path)
    assert back.resolution == (expected["saved_labels_resolution_px_per_um"],) * 2
    assert back.resolution_unit == "um"


def test_uint32_labels_keep_resolution_in_centimetres(tmp_path):
    # ImageJ TIFFs cannot hold uint32, so 2 pixels per micron become 20,000 per cm.
    labels = np.full((4, 4), 70000, dtype=np.uint32)
    path = write_labels(tmp_path / "big.tif", labels, (2.0, 2.0), "um")
    back = read_image(path)
    assert back.data.dtype == np.uint32
    assert back.resolution == (20000.0, 20000.0)
    assert back.resolution_unit == "CENTIMETER"


def test_written_files_readable_by_others(tmp_path):
    import os
    import stat

    umask = os.umask(0o022)
    try:
        path = write_labels(tmp_path / "perm.tif", np.zeros((2, 2), np.uint16))
    finally:
        os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_two_channel_tiff_is_not_alpha(tmp_path):
    data = np.zeros((16, 16, 2), np.uint16)
    tifffile.imwrite(tmp_path / "two.tif", data, photometric="minisblack", planarconfig="contig")
    assert not read_image(tmp_path / "two.tif").has_alpha
    tifffile.imwrite(tmp_path / "rgba.tif", np.zeros((16, 16, 4), np.uint8), photometric="rgb",
                     extrasamples=["unassalpha"])
    assert read_image(tmp_path / "rgba.tif").has_alpha


def test_png_alpha_detected():
    rgba = read_image(CASES / "BR-02" / "br02_rgba.png")
    grey_alpha = read_image(CASES / "BR-02" / "br02_la.png")
    rgb = read_image(CASES / "BR-02" / "br02_rgb.png")
    assert rgba.has_alpha and rgba.data.shape == (256, 256, 4)
    assert grey_alpha.has_alpha and grey_alpha.data.shape == (256, 256, 2)
    assert not rgb.has_alpha


def test_unreadable_file_names_it(tmp_path):
    bad = tmp_path / "broken.tif"
    bad.write_bytes(b"II*\x00garbage")
    with pytest.raises(ValueError, match="broken.tif"):
        read_image(bad)


def test_br25_unicode_names_and_collisions(tmp_path):
    folder = CASES / "BR-25" / "br25_naming" / "données é"
    files = list_images([folder])
    names = [p.name for p in files]
    assert "sample_labels.tif" not in names  # an earlier output is not an input
    assert sorted(names) == sorted(["sample.png", "sample.tif", "细胞 α.tif"])
    assert read_image(folder / "细胞 α.tif").data.ndim >= 2

    used_paths: set = set()
    outputs = [labels_output_path(p, tmp_path, used_paths) for p in files]
    assert len(set(outputs)) == 3
    assert tmp_path / "细胞 α_labels.tif" in outputs


def test_missing_input_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        list_images([tmp_path / "nope"])


@pytest.mark.parametrize(
    "shape, axes, expected_shape, expected_planes",
    [
        ((2, 16, 16), "CYX", (2, 16, 16), ""),
        ((16, 16, 3), "YXS", (3, 16, 16), ""),
        ((3, 16, 16), "TYX", (3, 1, 16, 16), "T"),
        ((2, 1, 3, 16, 16), "TZCYX", (2, 3, 16, 16), "T"),
        ((4, 5, 16, 16), "ZTYX", (4, 5, 1, 16, 16), "ZT"),
        ((3, 16, 16), "QYX", (3, 16, 16), ""),  # a short unnamed axis is channels
        ((6, 16, 16), "IYX", (6, 1, 16, 16), "I"),  # a long one is a stack
        ((1, 1, 16, 16), "QQYX", (1, 16, 16), ""),
        ((5, 16, 16), None, (5, 1, 16, 16), "Q"),
        ((16, 16, 4), None, (4, 16, 16), ""),
    ],
)
def test_standardize_axes_layouts(shape, axes, expected_shape, expected_planes):
    from napari_xlstm_unet.io import standardize_axes

    planes, plane_axes = standardize_axes(np.zeros(shape, np.uint8), axes)
    assert planes.shape == expected_shape
    assert plane_axes == expected_planes


@pytest.mark.parametrize(
    "shape, axes, message",
    [
        ((3, 16, 16), "YX", "one letter per axis"),
        ((3, 16, 16), "TYY", "one Y and one X"),
        ((2, 3, 16, 16), "CSYX", "channel axes"),
        ((16,), None, "at least 2 axes"),
    ],
)
def test_standardize_axes_errors_name_shape(shape, axes, message):
    from napari_xlstm_unet.io import standardize_axes

    with pytest.raises(ValueError, match=message) as info:
        standardize_axes(np.zeros(shape, np.uint8), axes)
    assert str(shape) in str(info.value)
