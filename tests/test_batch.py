"""The batch engine: isolated failures, resume, recursive folders, metrics, run record and torchrun."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tifffile
from PIL import Image

from conftest import CASES, DATA
from napari_xlstm_unet.batch import BatchOptions, find_images, run_batch
from napari_xlstm_unet.model.checkpoint import load_checkpoint
from napari_xlstm_unet.pretrained import resolve_model_path

SAMPLE = DATA / "microscopy" / "images" / "dsb2018s1test_191b2b2205f2.tif"
SAMPLE_GT = DATA / "microscopy" / "masks" / "dsb2018s1test_191b2b2205f2.tif"


def _rows(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return {os.path.basename(r["input"]): r for r in csv.DictReader(handle)}


@pytest.fixture
def mixed_folder(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    image = tifffile.imread(SAMPLE)
    tifffile.imwrite(folder / "crop_uint8.tif", image[:96, :128])
    tifffile.imwrite(folder / "crop_uint16.tif", image[100:164, :80].astype(np.uint16) * 200)
    Image.fromarray(np.stack([image[:72, :72]] * 3, axis=-1)).save(folder / "rgb.png")
    (folder / "junk.tif").write_text("this is not an image")
    (folder / "empty.png").write_bytes(b"")
    (folder / "truncated.tif").write_bytes((folder / "crop_uint8.tif").read_bytes()[:300])
    (folder / "notes.txt").write_text("not an image suffix, never an input")
    return folder


def test_batch_bad_files_isolated(mixed_folder, tmp_path):
    out = tmp_path / "out"
    summary = run_batch([mixed_folder], BatchOptions(out_dir=out))
    assert summary == {"ok": 3, "failed": 3, "skipped": 0, "total": 6, "results_csv": str(out / "results.csv")}
    rows = _rows(out / "results.csv")
    assert set(rows) == {"crop_uint8.tif", "crop_uint16.tif", "rgb.png", "junk.tif", "empty.png", "truncated.tif"}
    for name in ("junk.tif", "empty.png", "truncated.tif"):
        assert rows[name]["status"] == "failed"
        assert rows[name]["reason"]
        assert rows[name]["output"] == ""
        assert not (out / f"{name.rsplit('.', 1)[0]}_labels.tif").exists()
    assert rows["crop_uint16.tif"]["shape"] == "64x80"
    assert int(rows["crop_uint8.tif"]["objects"]) > 0
    labels = tifffile.imread(out / "rgb_labels.tif")
    assert labels.shape == (72, 72)
    assert labels.dtype == np.uint16


def test_stopped_run_resumes_without_redoing_files(mixed_folder, tmp_path):
    for name in ("junk.tif", "empty.png", "truncated.tif"):
        (mixed_folder / name).unlink()
    out = tmp_path / "out"
    calls = []
    first = run_batch([mixed_folder], BatchOptions(out_dir=out), should_stop=lambda: len(calls) >= 1,
                      on_result=lambda result, done, total: calls.append(result))
    # The file in flight when the stop came is finished and written, the rest is not started.
    assert 1 <= first["ok"] < 3
    written = {p.name: p.stat().st_mtime_ns for p in out.glob("*_labels.tif")}
    assert len(written) == first["ok"]
    first_rows = _rows(out / "results.csv")
    second = run_batch([mixed_folder], BatchOptions(out_dir=out))
    assert second["skipped"] == first["ok"]
    # Files done by the first run keep its row (object counts, seconds) in results.csv.
    for name, row in _rows(out / "results.csv").items():
        if name in first_rows:
            assert row["objects"] == first_rows[name]["objects"]
            assert row["reason"] == "segmented by an earlier run"
    assert second["ok"] == 3 - first["ok"]
    for name, mtime in written.items():
        assert (out / name).stat().st_mtime_ns == mtime  # left alone
    assert len(list(out.glob("*_labels.tif"))) == 3


def test_recursive_pattern_mirrors_subfolders(tmp_path):
    root = tmp_path / "in"
    for sub in ("a", "b"):
        (root / sub).mkdir(parents=True)
        tifffile.imwrite(root / sub / "x.tif", tifffile.imread(SAMPLE)[:64, :64])
    tifffile.imwrite(root / "top.png", np.zeros((8, 8), np.uint8))
    assert [p.name for p, _ in find_images([root], recursive=False)] == ["top.png"]
    found = find_images([root], recursive=True, pattern="*.tif")
    assert [str(p.relative_to(root)) for p, _ in found] == ["a/x.tif", "b/x.tif"]
    out = tmp_path / "out"
    summary = run_batch([root], BatchOptions(out_dir=out, recursive=True, pattern="*.tif"))
    assert summary["ok"] == 2
    assert (out / "a" / "x_labels.tif").is_file()
    assert (out / "b" / "x_labels.tif").is_file()


def test_batch_ground_truth_and_run_json(tmp_path):
    folder, gt = tmp_path / "in", tmp_path / "gt"
    folder.mkdir()
    gt.mkdir()
    shutil.copy(SAMPLE, folder / "nuclei.tif")
    shutil.copy(SAMPLE_GT, gt / "nuclei_labels.tif")
    out = tmp_path / "out"
    run_batch([folder], BatchOptions(out_dir=out, gt_dir=gt))
    row = _rows(out / "results.csv")["nuclei.tif"]
    assert 0.5 < float(row["f1"]) <= 1.0
    record = json.loads((out / "run.json").read_text())
    weights = resolve_model_path("cells")
    assert record["model"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert record["model"]["task"] == "cells"
    assert record["model"]["postprocess"] == load_checkpoint(weights).postprocess
    assert record["options"]["gt_dir"] == str(gt)
    assert record["inputs"] == [str(folder)]


def test_br25_names_through_the_engine(tmp_path):
    folder = tmp_path / "données é"
    shutil.copytree(CASES / "BR-25" / "br25_naming" / "données é", folder)
    expected = json.loads((CASES / "BR-25" / "expected.json").read_text())
    before = tifffile.imread(folder / "sample_labels.tif").copy()
    summary = run_batch([folder], BatchOptions(out_dir=folder))
    outputs = {os.path.basename(r["input"]): os.path.basename(r["output"])
               for r in _rows(folder / "results.csv").values()}
    assert outputs["细胞 α.tif"] == "细胞 α_labels.tif"
    assert outputs["sample.tif"] != outputs["sample.png"]
    assert "sample_labels.tif" not in outputs  # an earlier output is never an input
    np.testing.assert_array_equal(tifffile.imread(folder / "sample_labels.tif"), before)
    assert summary["skipped"] == 1  # sample.tif's output exists, so it is not replaced
    assert expected  # the case's own description travels with the folder


def test_torchrun_splits_files_across_two_processes(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    image = tifffile.imread(SAMPLE)
    for index in range(4):
        tifffile.imwrite(folder / f"img{index}.tif", image[index * 40:index * 40 + 64, :64])
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    out = tmp_path / "out"
    result = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node=2", "-m", "napari_xlstm_unet", "segment", str(folder),
         "--out", str(out)],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _rows(out / "results.csv")
    assert sorted(rows) == [f"img{i}.tif" for i in range(4)]
    assert all(r["status"] == "ok" for r in rows.values())
    assert len(_rows(out / "results.rank0.csv")) == 2
    assert len(_rows(out / "results.rank1.csv")) == 2
    assert json.loads((out / "run.json").read_text())["processes"] == 2


def test_batch_all_inputs_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"none of the inputs exist \(.*a\.tif, .*b\.tif\)"):
        run_batch([tmp_path / "a.tif", tmp_path / "b.tif"], BatchOptions(out_dir=tmp_path / "out"))
    assert not (tmp_path / "out").exists()
