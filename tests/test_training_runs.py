"""The training script end to end: folders, resume, fine-tuning, non-finite steps and torchrun."""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tifffile
import torch

from conftest import CASES, DATA, REPO

sys.path.insert(0, str(REPO / "training"))

import train  # noqa: E402
import tune_postprocess  # noqa: E402

from napari_xlstm_unet.model import ModelConfig, build_model  # noqa: E402
from napari_xlstm_unet.model.checkpoint import LoadedModel, load_checkpoint, save_checkpoint, transfer_weights  # noqa: E402
from napari_xlstm_unet.training import engine  # noqa: E402
from napari_xlstm_unet.training.engine import weights_digest  # noqa: E402

BR18 = CASES / "BR-18" / "br18_train"
QUICK = ["--set", "train.iters_per_epoch=2", "--set", "train.patch_size=64", "--set", "train.threads=2",
         "--set", "val.tile_size=128"]


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_br18_three_one_cell_pairs_all_train(tmp_path, caplog):
    expected = json.loads((CASES / "BR-18" / "expected.json").read_text())
    suggested = expected["suggested_config"]
    with caplog.at_level(logging.INFO):
        code = train.main([
            "--out", str(tmp_path / "run"), "--set", f"data.train_dir={BR18}",
            "--set", f"data.val_fraction={suggested['val_fraction']}",
            "--set", f"train.batch_size={suggested['batch_size']}", "--epochs", str(suggested["epochs"]), *QUICK,
        ])
    assert code == 0
    assert "2 training, 1 validation" in caplog.text  # all 3 pairs used
    assert "batch size 8 clipped to the 2 training images" in caplog.text
    loaded = load_checkpoint(tmp_path / "run" / "model.pt")
    assert loaded.task == "cells"
    assert len(loaded.model_card["history"]) == suggested["epochs"]
    with open(tmp_path / "run" / "eval" / "val.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1
    assert {"image", "f1", "tp", "fp", "fn"} <= set(rows[0])
    with open(tmp_path / "run" / "log.csv", newline="") as handle:
        log = list(csv.DictReader(handle))
    assert [int(r["epoch"]) for r in log] == [1, 2]
    assert [int(r["step"]) for r in log] == [2, 4]
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert f"train_dir: {BR18}" in saved
    assert "batch_size: 8" in saved


def test_existing_run_is_not_overwritten(tmp_path, caplog):
    args = ["--out", str(tmp_path / "run"), "--set", f"data.train_dir={BR18}", "--epochs", "1", *QUICK]
    assert train.main(args) == 0
    before = (tmp_path / "run" / "model.pt").read_bytes()
    with caplog.at_level(logging.ERROR):
        assert train.main(args) == 2
    assert "already contains a run" in caplog.text
    assert "--resume" in caplog.text
    assert (tmp_path / "run" / "model.pt").read_bytes() == before
    assert train.main(["--out", str(tmp_path / "other"), "--resume"]) == 2


def test_resume_gives_the_same_weights_as_one_run(tmp_path):
    common = ["--set", f"data.train_dir={BR18}", "--epochs", "2", *QUICK, "--set", "train.batch_size=2"]
    assert train.main(["--out", str(tmp_path / "whole"), *common]) == 0
    assert train.main(["--out", str(tmp_path / "parts"), *common, "--set", "train.stop_after_epoch=1"]) == 0
    stopped = _state(tmp_path / "parts" / "last.pt")["training_state"]
    assert stopped["epoch"] == 1
    assert stopped["step"] == 2
    assert not (tmp_path / "parts" / "model.pt").exists()
    assert train.main(["--out", str(tmp_path / "parts"), "--resume", "--set", "train.stop_after_epoch=0"]) == 0

    finished = (tmp_path / "parts" / "model.pt").stat().st_mtime_ns
    assert train.main(["--out", str(tmp_path / "parts"), "--resume"]) == 0  # complete: nothing to do
    assert (tmp_path / "parts" / "model.pt").stat().st_mtime_ns == finished
    whole, parts = _state(tmp_path / "whole" / "last.pt"), _state(tmp_path / "parts" / "last.pt")
    for key, value in whole["state_dict"].items():
        torch.testing.assert_close(parts["state_dict"][key], value, rtol=0, atol=0)
    # The optimiser's moments and the scheduler's position were restored, not restarted.
    assert parts["training_state"]["scheduler"]["last_epoch"] == 4
    moments_whole = whole["training_state"]["optimizer"]["state"]
    moments_parts = parts["training_state"]["optimizer"]["state"]
    for index, values in moments_whole.items():
        torch.testing.assert_close(moments_parts[index]["exp_avg"], values["exp_avg"], rtol=0, atol=0)
        assert int(moments_parts[index]["step"]) == 4


def _tiny_checkpoint(path, num_classes=3, in_channels=3):
    config = ModelConfig(in_channels=in_channels, num_classes=num_classes, widths=(4, 8, 16), strides=(1, 2, 2),
                         encoder_blocks=(1, 1, 1), decoder_blocks=(1, 1), xlstm="bot")
    torch.manual_seed(1)
    loaded = LoadedModel(model=build_model(config), config=config, task="cells")
    save_checkpoint(path, loaded)
    return loaded


def test_fine_tune_new_classes(tmp_path):
    source = _tiny_checkpoint(tmp_path / "init.pt")
    folder = tmp_path / "semantic"
    for sub in ("images", "masks"):
        (folder / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        mask = np.zeros((64, 64), np.uint8)
        mask[10 + i:30, 20:40] = 1
        mask[40:50, 5:25] = 2
        tifffile.imwrite(folder / "images" / f"f{i}.tif", rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
        tifffile.imwrite(folder / "masks" / f"f{i}.tif", mask)

    out = tmp_path / "run"
    assert train.main([
        "--out", str(out), "--set", "task=semantic", "--set", f"data.train_dir={folder}",
        "--set", "data.classes=[background, tool, tissue]", "--set", "data.val_fraction=0.34",
        "--init", str(tmp_path / "init.pt"), "--freeze-encoder", "--epochs", "1", *QUICK,
        "--set", "train.lr=0.05", "--set", "train.warmup_iters=1",
    ]) == 0
    tuned = load_checkpoint(out / "model.pt")
    assert tuned.config.num_classes == 3
    assert tuned.class_names == ["background", "tool", "tissue"]
    assert tuned.model_card["init"] == str(tmp_path / "init.pt")
    before, after = source.model.state_dict(), tuned.model.state_dict()
    # Frozen encoder: identical; decoder: trained.
    for key in before:
        if key.startswith(("stem.", "encoder.", "vil.")):
            torch.testing.assert_close(after[key], before[key], rtol=0, atol=0)
    assert any(not torch.equal(after[k], before[k]) for k in before if k.startswith("decoder."))
    with open(out / "eval" / "val.csv", newline="") as handle:
        row = next(csv.DictReader(handle))
    assert {"dice", "nsd", "dice_tool", "nsd_tissue"} <= set(row)


def test_transfer_weights_names_the_differing_setting(tmp_path):
    source = _tiny_checkpoint(tmp_path / "rgb.pt", in_channels=3)
    source.source = "rgb.pt"
    target = build_model(ModelConfig(in_channels=1, num_classes=3, widths=(4, 8, 16), strides=(1, 2, 2),
                                     encoder_blocks=(1, 1, 1), decoder_blocks=(1, 1), xlstm="bot"))
    with pytest.raises(ValueError, match=r"rgb.pt do not fit this network \(in_channels 3 vs 1"):
        transfer_weights(target, source)
    five_classes = build_model(ModelConfig(in_channels=3, num_classes=5, widths=(4, 8, 16), strides=(1, 2, 2),
                                           encoder_blocks=(1, 1, 1), decoder_blocks=(1, 1), xlstm="bot"))
    skipped = transfer_weights(five_classes, source, skip_prefixes=("heads.",))
    assert skipped and all(k.startswith("heads.") for k in skipped)
    copied = source.model.state_dict()
    for key, value in five_classes.state_dict().items():
        if not key.startswith("heads."):
            torch.testing.assert_close(value, copied[key], rtol=0, atol=0)
    assert five_classes.heads[0].weight.shape[0] == 5


def test_non_finite_loss_skips_the_step(tmp_path, monkeypatch, caplog):
    real_loss = engine.deep_supervision_loss
    calls = {"n": 0}

    def loss_with_one_nan(outputs, targets):
        calls["n"] += 1
        loss = real_loss(outputs, targets)
        return loss * float("nan") if calls["n"] == 1 else loss

    monkeypatch.setattr(engine, "deep_supervision_loss", loss_with_one_nan)
    with caplog.at_level(logging.WARNING):
        assert train.main(["--out", str(tmp_path / "run"), "--set", f"data.train_dir={BR18}", "--epochs", "1",
                           *QUICK]) == 0
    assert "step 0: non-finite loss" in caplog.text
    with open(tmp_path / "run" / "log.csv", newline="") as handle:
        assert next(csv.DictReader(handle))["skipped_steps"] == "1"
    assert all(torch.isfinite(v).all() for v in _state(tmp_path / "run" / "model.pt")["state_dict"].values()
               if v.is_floating_point())


def test_non_finite_weights_are_never_checkpointed(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(engine, "_all_finite", lambda model: False)
    with caplog.at_level(logging.ERROR):
        assert train.main(["--out", str(tmp_path / "run"), "--set", f"data.train_dir={BR18}", "--epochs", "1",
                           *QUICK]) == 2
    assert "weights became non-finite in epoch 1" in caplog.text
    assert not (tmp_path / "run" / "last.pt").exists()
    assert not (tmp_path / "run" / "model.pt").exists()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed support")
def test_torchrun_two_processes_end_with_identical_weights(tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    command = [torchrun or "torchrun", "--nproc_per_node=2", "--master_port=0", "--standalone",
               str(REPO / "training" / "train.py"), "--out", str(tmp_path / "run"),
               "--set", f"data.train_dir={BR18}", "--set", "train.batch_size=1", "--epochs", "2",
               "--set", "train.iters_per_epoch=2", "--set", "train.patch_size=64", "--set", "train.threads=1",
               "--set", "val.tile_size=128"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = json.loads((tmp_path / "run" / "ranks.json").read_text())
    assert ranks["world_size"] == 2
    last = _state(tmp_path / "run" / "last.pt")["state_dict"]
    assert ranks["digests"] == [weights_digest(last)] * 2
    # Both processes trained: the 2 steps per epoch used 2 patches each (global batch 2).
    assert "2 process(es)" in result.stderr


def test_split_csv_run_leaves_out_non_finite_pair(tmp_path, caplog):
    root = tmp_path / "root"
    shutil.copytree(BR18, root / "cells")
    shutil.copy(CASES / "BR-07" / "br07_nonfinite.tif", root / "cells" / "images" / "nan.tif")
    shutil.copy(CASES / "BR-07" / "br07_gt_labels.tif", root / "cells" / "masks" / "nan.tif")
    split = tmp_path / "split.csv"
    split.write_text(
        "dataset,name,modality,split\n"
        "cells,img_0,fluorescence,train\ncells,img_1,stained,train\ncells,nan,stained,train\n"
        "cells,img_2,fluorescence,val\n"
    )
    with caplog.at_level(logging.INFO):
        code = train.main(["--out", str(tmp_path / "run"), "--set", f"data.split_csv={split}",
                           "--set", f"data.data_root={root}", "--epochs", "1", *QUICK])
    assert code == 0
    assert "nan.tif contains 1026 non-finite pixels" in caplog.text
    assert "2 training, 1 validation, 0 test images" in caplog.text
    assert (tmp_path / "run" / "model.pt").is_file()


def test_data_scale_is_stored_in_the_checkpoint(tmp_path):
    assert train.main(["--out", str(tmp_path / "run"), "--set", f"data.train_dir={BR18}", "--epochs", "1",
                       "--set", "data.scale=0.5", *QUICK]) == 0
    loaded = load_checkpoint(tmp_path / "run" / "model.pt")
    assert loaded.input_scale == 0.5
    assert load_checkpoint(tmp_path / "run" / "last.pt").input_scale == 0.5


def test_sgd_uses_nesterov_momentum(tmp_path):
    assert train.main(["--out", str(tmp_path / "run"), "--set", f"data.train_dir={BR18}", "--epochs", "1",
                       "--set", "train.optimizer=sgd", *QUICK]) == 0
    optimizer = _state(tmp_path / "run" / "last.pt")["training_state"]["optimizer"]
    group = optimizer["param_groups"][0]
    assert group["nesterov"] is True
    assert group["momentum"] == 0.99
    assert group["weight_decay"] == 3e-5
    assert all("momentum_buffer" in state for state in optimizer["state"].values())


def test_moving_average_saved_and_resumed(tmp_path):
    common = ["--set", f"data.train_dir={BR18}", "--epochs", "2", *QUICK, "--set", "train.batch_size=2",
              "--set", "data.val_fraction=0", "--set", "train.ema_decay=0.5"]
    assert train.main(["--out", str(tmp_path / "whole"), *common]) == 0
    assert train.main(["--out", str(tmp_path / "parts"), *common, "--set", "train.stop_after_epoch=1"]) == 0
    assert train.main(["--out", str(tmp_path / "parts"), "--resume", "--set", "train.stop_after_epoch=0"]) == 0
    whole, parts = _state(tmp_path / "whole" / "last.pt"), _state(tmp_path / "parts" / "last.pt")
    averaged = whole["training_state"]["ema"]
    assert int(averaged["n_averaged"]) == 4  # one update per optimiser step
    for key, value in averaged.items():
        torch.testing.assert_close(parts["training_state"]["ema"][key], value, rtol=0, atol=0)
    # Without validation images the final model contains the averaged weights, not the last step's.
    final = load_checkpoint(tmp_path / "whole" / "model.pt").model.state_dict()
    raw = whole["state_dict"]
    differs = False
    for key, value in final.items():
        torch.testing.assert_close(value, averaged[f"module.{key}"], rtol=0, atol=0)
        differs |= not torch.equal(value, raw[key])
    assert differs


def test_resume_without_average_fails(tmp_path, caplog):
    common = ["--set", f"data.train_dir={BR18}", "--epochs", "2", *QUICK, "--set", "train.batch_size=2"]
    assert train.main(["--out", str(tmp_path / "run"), *common, "--set", "train.stop_after_epoch=1"]) == 0
    with caplog.at_level(logging.ERROR):
        code = train.main(["--out", str(tmp_path / "run"), "--resume", "--set", "train.ema_decay=0.9"])
    assert code == 2
    assert "train.ema_decay=0" in caplog.text


def test_tune_script_rewrites_postprocess(tmp_path, capsys):
    from napari_xlstm_unet.pretrained import resolve_model_path
    from napari_xlstm_unet.training.data import load_sample, resolve_splits
    from napari_xlstm_unet.training.evaluation import cell_scores, predict_all

    with open(REPO / "training" / "splits" / "dsb2018.csv", newline="") as handle:
        every = list(csv.DictReader(handle))
    # The split needs a training row to load; only the 3 validation rows are used.
    rows = [row for row in every if row["split"] == "train"][:1] + [row for row in every if row["split"] == "val"][:3]
    split = tmp_path / "split.csv"
    with open(split, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    config = tmp_path / "config.yaml"
    config.write_text(f"task: cells\ndata:\n  split_csv: {split}\n  data_root: {DATA}\nval:\n  tile_size: 512\n")
    checkpoint = tmp_path / "cells.pt"
    loaded = load_checkpoint(resolve_model_path("cells"))
    before = {"prob_threshold": 0.5, "min_size": 16, "split_depth": 0.0}
    loaded.postprocess = dict(before)
    save_checkpoint(checkpoint, loaded)

    assert tune_postprocess.main([str(checkpoint), "--config", str(config), "--threads", "2"]) == 0
    tuned = load_checkpoint(checkpoint)
    # The shipped card already contains the values from before its first tuning.
    # A second tuning keeps them.
    assert set(loaded.model_card["postprocess_before"]) == {"prob_threshold", "min_size", "split_depth"}
    assert tuned.model_card["postprocess_before"] == loaded.model_card["postprocess_before"]
    assert set(tuned.postprocess) == set(before)
    for name, value in loaded.model.state_dict().items():
        assert torch.equal(tuned.model.state_dict()[name], value)
    # The stored F1 is what the stored parameters score on those 3 images.
    samples = [load_sample(pair, "cells", 3, tuned.normalization) for pair in resolve_splits(
        train.load_config(config).data)["val"]]
    probabilities = predict_all(tuned.model, samples, 3, torch.device("cpu"), 512)
    scores = cell_scores(probabilities, samples, tuned.postprocess["prob_threshold"], tuned.postprocess["min_size"],
                         tuned.postprocess["split_depth"])
    assert tuned.model_card["val_f1_at_0.5"] == round(float(np.mean([r["f1"] for r in scores])), 4)
    assert str(checkpoint) in capsys.readouterr().out
    # Tuning again finds the same values and leaves the file as it is.
    written = checkpoint.read_bytes()
    assert tune_postprocess.main([str(checkpoint), "--config", str(config), "--threads", "2"]) == 0
    assert "unchanged" in capsys.readouterr().out
    assert checkpoint.read_bytes() == written


def test_tune_script_rejects_bad_inputs(tmp_path, capsys):
    from napari_xlstm_unet.pretrained import resolve_model_path

    config = tmp_path / "config.yaml"
    config.write_text("task: cells\ndata:\n  train_dir: nowhere\n")
    assert tune_postprocess.main([str(resolve_model_path("polyps")), "--config", str(config)]) == 2
    assert "is a 'semantic' model" in capsys.readouterr().err
    text = tmp_path / "x.pt"
    text.write_text("not a checkpoint")
    assert tune_postprocess.main([str(text), "--config", str(config)]) == 2
    assert f"error: {text}" in capsys.readouterr().err
    assert tune_postprocess.main([str(resolve_model_path("cells")), "--config", str(config)]) == 2
    assert "nowhere" in capsys.readouterr().err
