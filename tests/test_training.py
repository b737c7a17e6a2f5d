"""Training targets, mask checks and a short run of the training script."""

from __future__ import annotations

import logging
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CASES, REPO

sys.path.insert(0, str(REPO / "training"))

from dataset import PatchSampler, deep_supervision_weights  # noqa: E402
from losses import dice_ce_loss  # noqa: E402
from targets import check_instance_mask, instances_to_classes  # noqa: E402


def test_targets_of_two_touching_rectangles():
    labels = np.zeros((10, 14), np.uint16)
    labels[1:9, 1:7] = 1
    labels[1:9, 7:13] = 2
    classes = instances_to_classes(labels)

    interior = np.zeros_like(classes, dtype=bool)
    interior[3:7, 3:5] = True  # two pixels inside the dilated inner boundary
    interior[3:7, 9:11] = True
    np.testing.assert_array_equal(classes == 1, interior)
    # The shared wall (columns 6 and 7) and one pixel either side are boundary.
    assert (classes[1:9, 5:9] == 2).all()
    # Dilation by the radius-1 disk reaches edge neighbours but not corners.
    assert classes[0, 0] == 0
    assert classes[0, 1] == 2
    assert classes[1, 0] == 2
    assert (classes[:, 13] == 2).sum() == 8


def test_binary_mask_with_touching_cells_warns_with_name(caplog):
    path = CASES / "BR-16" / "br16_gt_binary_0_255.png"
    mask = np.asarray(Image.open(path))
    two_blobs = mask.copy()
    two_blobs[5:10, 5:10] = 255  # a second, separate component
    with caplog.at_level(logging.WARNING):
        check_instance_mask(two_blobs, path)
    assert "br16_gt_binary_0_255.png" in caplog.text
    assert "binary mask" in caplog.text


def test_instance_mask_passes_silently(caplog):
    labels = np.zeros((10, 10), np.uint16)
    labels[1:4, 1:4] = 1
    labels[6:9, 6:9] = 2
    with caplog.at_level(logging.WARNING):
        check_instance_mask(labels, "ok.tif")
    assert caplog.text == ""


def test_negative_mask_rejected():
    with pytest.raises(ValueError, match="neg.tif"):
        check_instance_mask(np.full((3, 3), -1, np.int16), "neg.tif")


def test_deep_supervision_weights():
    assert deep_supervision_weights(1) == [1.0]
    np.testing.assert_allclose(deep_supervision_weights(3), [2 / 3, 1 / 3, 0.0])


def test_dice_ce_loss_small_for_confident_correct_logits():
    target = torch.tensor([[[0, 1], [2, 1]]])
    logits = torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float() * 20
    assert dice_ce_loss(logits, target).item() < 1e-3
    assert dice_ce_loss(-logits, target).item() > 1.0


def test_patch_sampler_shapes_and_classes():
    from dataset import Sample

    image = np.random.default_rng(0).random((3, 50, 40), dtype=np.float32)
    classes = np.zeros((50, 40), np.uint8)
    classes[10:20, 10:20] = 1
    sampler = PatchSampler([Sample("s", image, classes, classes.astype(np.int32))], patch_size=64, seed=0)
    images, targets = sampler.batch(3)
    assert images.shape == (3, 3, 64, 64)
    assert targets.shape == (3, 64, 64)
    assert set(torch.unique(targets).tolist()) <= {0, 1}


def test_training_script_writes_loadable_checkpoint(tmp_path):
    import train

    from napari_xlstm_unet.model.checkpoint import load_checkpoint

    split = tmp_path / "split.csv"
    split.write_text(
        "dataset,name,modality,split\n"
        "br18_train,img_0,fluorescence,train\n"
        "br18_train,img_1,fluorescence,train\n"
        "br18_train,img_2,fluorescence,val\n"
    )
    out = tmp_path / "model.pt"
    code = train.main([
        "--split", str(split), "--data-root", str(CASES / "BR-18"), "--out", str(out),
        "--epochs", "1", "--iters-per-epoch", "2", "--batch-size", "2", "--patch-size", "64",
        "--threads", "2",
    ])
    assert code == 0
    loaded = load_checkpoint(out)
    assert loaded.task == "cells"
    assert set(loaded.postprocess) == {"prob_threshold", "min_size"}
    assert loaded.model_card["data"].startswith("split split.csv: 2 training and 1 validation")
    assert len(loaded.model_card["history"]) == 1
