"""The command line: segment folders, evaluate against ground truth."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import tifffile

from conftest import CASES, DATA, REPO
from napari_xlstm_unet.cli import main
from napari_xlstm_unet.io import read_image

SAMPLE = DATA / "microscopy" / "images" / "dsb2018s1test_191b2b2205f2.tif"


def test_segment_writes_labels_per_input(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(SAMPLE, inputs / "a.tif")
    shutil.copy(CASES / "BR-21" / "br21_scaled_imagej.tif", inputs / "b.tif")
    out = tmp_path / "out"

    assert main(["segment", str(inputs), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a_labels.tif", "b_labels.tif", "results.csv", "run.json"]
    labels = read_image(out / "a_labels.tif")
    assert labels.data.shape == tifffile.imread(SAMPLE).shape
    assert labels.data.dtype == np.uint16
    assert labels.data.max() > 0
    assert read_image(out / "b_labels.tif").resolution == (2.0, 2.0)


def test_segment_keeps_existing_outputs(tmp_path, capsys):
    folder = tmp_path / "données é"
    shutil.copytree(CASES / "BR-25" / "br25_naming" / "données é", folder)
    before = tifffile.imread(folder / "sample_labels.tif")

    assert main(["segment", str(folder), "--out", str(folder)]) == 0
    after = tifffile.imread(folder / "sample_labels.tif")
    np.testing.assert_array_equal(before, after)  # still all 7
    names = sorted(p.name for p in folder.iterdir())
    assert "细胞 α_labels.tif" in names
    assert "skipped" in capsys.readouterr().out


def test_segment_reports_bad_file_and_continues(tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "broken.tif").write_bytes(b"not a tiff")
    shutil.copy(SAMPLE, inputs / "good.tif")
    out = tmp_path / "out"
    assert main(["segment", str(inputs), "--out", str(out)]) == 1
    assert (out / "good_labels.tif").is_file()
    assert "broken.tif" in capsys.readouterr().err


def test_segment_unknown_model_is_clear_error(tmp_path, capsys):
    assert main(["segment", str(SAMPLE), "--out", str(tmp_path), "--model", "nope.pt"]) == 2
    assert "nope.pt" in capsys.readouterr().err


def test_evaluate_matches_stems_and_writes_csv(tmp_path):
    gt = tmp_path / "gt"
    pred = tmp_path / "pred"
    gt.mkdir()
    pred.mkdir()
    truth = np.zeros((40, 40), np.uint16)
    truth[5:15, 5:15] = 1
    truth[20:30, 20:30] = 2
    tifffile.imwrite(gt / "img1.tif", truth)
    tifffile.imwrite(pred / "img1_labels.tif", truth)
    half = truth.copy()
    half[20:30, 20:30] = 0
    tifffile.imwrite(gt / "img2_label.tif", truth)  # the NeurIPS challenge's naming
    tifffile.imwrite(pred / "img2_labels.tif", half)

    csv_path = tmp_path / "scores.csv"
    assert main(["evaluate", str(pred), str(gt), "--csv", str(csv_path)]) == 0
    with open(csv_path) as handle:
        rows = list(csv.DictReader(handle))
    assert [r["name"] for r in rows] == ["img1", "img2"]
    assert {"name", "precision", "recall", "f1"} <= set(rows[0])
    assert float(rows[0]["f1"]) == 1.0
    assert float(rows[1]["f1"]) == pytest.approx(2 / 3)
    assert float(rows[1]["precision"]) == 1.0
    assert float(rows[1]["recall"]) == 0.5


def test_missing_input_reported_and_run_continues(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["segment", str(tmp_path / "nope.tif"), str(SAMPLE), "--out", str(out)])
    assert code == 1
    assert (out / f"{SAMPLE.stem}_labels.tif").is_file()
    assert "nope.tif" in capsys.readouterr().err
    with open(out / "results.csv", newline="") as handle:
        rows = {row["input"]: row for row in csv.DictReader(handle)}
    missing = rows[str(tmp_path / "nope.tif")]
    assert (missing["status"], missing["reason"], missing["output"]) == ("failed", "file or folder not found", "")
    assert rows[str(SAMPLE)]["status"] == "ok"


@pytest.mark.parametrize(
    "option, value, message",
    [("--prob-threshold", "2", "must lie in [0, 1], got 2"), ("--min-size", "-5", "must be at least 0, got -5"),
     ("--tile-size", "7", "must be at least 16, got 7"), ("--overlap", "1.5", "must lie in [0, 0.9], got 1.5"),
     ("--split-depth", "-1", "must lie in [0, 50], got -1"),
     ("--split-depth", "abc", "expected a number from 0 to 50, got 'abc'"),
     ("--min-size", "1.5", "expected a whole number of at least 0, got '1.5'")],
)
def test_invalid_settings_rejected_up_front(tmp_path, option, value, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(["segment", str(SAMPLE), "--out", str(tmp_path), option, value])
    assert info.value.code == 2
    assert f"argument {option}: {message}" in capsys.readouterr().err


def test_cell_flags_warn_for_endoscopy(tmp_path, capsys):
    code = main(["segment", str(tmp_path / "nope.png"), "--out", str(tmp_path / "out"), "--task", "endoscopy",
                 "--split-depth", "3", "--min-size", "5"])
    assert code == 2  # the input does not exist; the warning comes first
    assert "warning: --min-size, --split-depth apply only to cell models; --task endoscopy ignores them" \
        in capsys.readouterr().err


def test_out_is_a_file_is_clear_error(tmp_path, capsys):
    target = tmp_path / "x.tif"
    target.write_bytes(b"")
    assert main(["segment", str(SAMPLE), "--out", str(target)]) == 2
    assert "is an existing file" in capsys.readouterr().err


def test_evaluate_names_file_on_shape_mismatch(tmp_path, capsys):
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    tifffile.imwrite(tmp_path / "gt" / "a.tif", np.zeros((8, 8), np.uint16))
    tifffile.imwrite(tmp_path / "pred" / "a_labels.tif", np.zeros((8, 9), np.uint16))
    assert main(["evaluate", str(tmp_path / "pred"), str(tmp_path / "gt")]) == 1
    assert "a_labels.tif" in capsys.readouterr().err


def test_evaluate_scores_rest_after_bad_file(tmp_path, capsys):
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    truth = np.zeros((20, 20), np.uint16)
    truth[5:10, 5:10] = 1
    for name in ("a", "b", "c"):
        tifffile.imwrite(tmp_path / "gt" / f"{name}.tif", truth)
    tifffile.imwrite(tmp_path / "pred" / "a_labels.tif", truth)
    (tmp_path / "pred" / "b_labels.tif").write_text("not a TIFF")
    # Fiji saves labels as 32-bit float: whole numbers are read as labels.
    tifffile.imwrite(tmp_path / "pred" / "c_labels.tif", truth.astype(np.float32))
    out_csv = tmp_path / "scores.csv"
    code = main(["evaluate", str(tmp_path / "pred"), str(tmp_path / "gt"), "--csv", str(out_csv)])
    assert code == 1
    err = capsys.readouterr().err
    assert "failed b:" in err
    assert "1 of 3 image pairs failed" in err
    with open(out_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["name"] for row in rows] == ["a", "c"]
    assert [float(row["f1"]) for row in rows] == [1.0, 1.0]


def test_evaluate_rejects_fractional_labels_and_file_args(tmp_path, capsys):
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    tifffile.imwrite(tmp_path / "gt" / "a.tif", np.zeros((8, 8), np.uint16))
    tifffile.imwrite(tmp_path / "pred" / "a_labels.tif", np.full((8, 8), 0.5, np.float32))
    assert main(["evaluate", str(tmp_path / "pred"), str(tmp_path / "gt")]) == 1
    assert "non-integer or negative values" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "pred"), str(tmp_path / "gt" / "a.tif")]) == 2
    assert "is a file; evaluate compares two folders" in capsys.readouterr().err


def test_segment_mirror_recorded_and_applied(tmp_path):
    from napari_xlstm_unet.inference.predict import segment_image
    from napari_xlstm_unet.pretrained import load_model

    inputs = tmp_path / "in"
    inputs.mkdir()
    crop = tifffile.imread(SAMPLE)[:128, :160]
    tifffile.imwrite(inputs / "crop.tif", crop)
    out = tmp_path / "out"

    assert main(["segment", str(inputs), "--out", str(out), "--mirror"]) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["options"]["mirror"] is True
    labels = tifffile.imread(out / "crop_labels.tif")
    loaded = load_model("cells")
    np.testing.assert_array_equal(labels, segment_image(crop, loaded, mirror=True).labels)
    # One pass of the same network gives a different map on this crop.
    plain = segment_image(crop, loaded).probabilities
    assert not np.allclose(segment_image(crop, loaded, mirror=True).probabilities, plain, atol=1e-4)


def test_missing_inputs_exit_with_2(tmp_path, capsys):
    assert main(["segment", str(tmp_path / "nope.tif"), "--out", str(tmp_path / "out")]) == 2
    assert "none of the inputs exist" in capsys.readouterr().err
    (tmp_path / "in").mkdir()
    shutil.copy(SAMPLE, tmp_path / "in" / "a.tif")
    assert main(["segment", str(tmp_path / "in"), "--pattern", "*.png", "--out", str(tmp_path / "out")]) == 2


def test_help_omits_required_default(capsys):
    with pytest.raises(SystemExit):
        main(["segment", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--out OUT output folder --model" in text
    assert "sliding-window side in pixels (default: 512)" in text


class _ClosedPipe:
    """Stands for stdout after the reader of a pipe (``| head``) has exited."""

    def __init__(self, path):
        self._file = open(path, "w")  # noqa: SIM115 - closed by the test

    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self):
        pass

    def fileno(self):
        return self._file.fileno()


def test_closed_pipe_finishes_the_run(tmp_path, monkeypatch, capsys):
    for folder in ("pred", "gt"):
        (tmp_path / folder).mkdir()
        for name in ("a", "b", "c"):
            tifffile.imwrite(tmp_path / folder / f"{name}.tif", np.ones((8, 8), np.uint16))
    pipe = _ClosedPipe(tmp_path / "stdout.txt")
    monkeypatch.setattr("sys.stdout", pipe)
    try:
        code = main(["evaluate", str(tmp_path / "pred"), str(tmp_path / "gt"), "--csv", str(tmp_path / "s.csv")])
    finally:
        pipe._file.close()
    assert code == 0
    with open(tmp_path / "s.csv", newline="") as handle:
        assert [row["name"] for row in csv.DictReader(handle)] == ["a", "b", "c"]
    assert "Traceback" not in capsys.readouterr().err


def test_evaluate_warns_on_raw_images(tmp_path, capsys):
    for folder in ("pred", "gt"):
        (tmp_path / folder).mkdir()
    truth = np.zeros((40, 40), np.uint16)
    truth[10:20, 10:20] = 1
    tifffile.imwrite(tmp_path / "gt" / "a.tif", truth)
    raw = np.random.default_rng(0).integers(1, 255, (40, 40)).astype(np.uint8)  # grey values, no zeros
    tifffile.imwrite(tmp_path / "pred" / "a.tif", raw)
    assert main(["evaluate", str(tmp_path / "pred"), str(tmp_path / "gt")]) == 0
    err = capsys.readouterr().err
    assert "100.0% of the pixels" in err
    assert "looks like an image" in err
    tifffile.imwrite(tmp_path / "pred" / "a.tif", truth)  # real labels: no warning
    assert main(["evaluate", str(tmp_path / "pred"), str(tmp_path / "gt")]) == 0
    assert "looks like an image" not in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "pred"), str(tmp_path)]) == 2  # no names in common


def test_split_depth_flag_reaches_labels(tmp_path):
    from napari_xlstm_unet.inference.predict import segment_image
    from napari_xlstm_unet.pretrained import load_model

    dense = REPO / "src" / "napari_xlstm_unet" / "sample_data" / "nuclei_dsb2018.tif"  # 273 nuclei, many touching
    image = read_image(dense)
    whole = segment_image(image.data, load_model("cells"), split_depth=0.0, axes=image.axes).labels
    default = segment_image(image.data, load_model("cells"), axes=image.axes).labels
    assert load_model("cells").postprocess["split_depth"] > 0
    assert default.max() > whole.max()  # the shipped model's splitting finds more nuclei here
    assert main(["segment", str(dense), "--out", str(tmp_path), "--split-depth", "0"]) == 0
    np.testing.assert_array_equal(tifffile.imread(tmp_path / f"{dense.stem}_labels.tif"), whole)
