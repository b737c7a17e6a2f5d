"""Training targets, losses, configs and augmentation (no training loop; see test_training_runs.py)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import CASES, REPO
from napari_xlstm_unet.training.augment import PatchDataset, group_weights, intensity_augment, stain_augment
from napari_xlstm_unet.training.config import load_config
from napari_xlstm_unet.training.data import (
    IGNORE_INDEX,
    Pair,
    Sample,
    load_sample,
    pairs_in_folder,
    semantic_classes,
    split_pairs,
)
from napari_xlstm_unet.training.losses import deep_supervision_weights, dice_ce_loss
from napari_xlstm_unet.training.targets import check_instance_mask, instances_to_classes

BR17 = CASES / "BR-17"


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


def test_ignored_pixels_do_not_change_the_loss():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 8, 8, generator=generator)
    target = torch.randint(0, 3, (2, 8, 8), generator=generator)
    with_ignore = target.clone()
    with_ignore[:, :, :4] = IGNORE_INDEX
    changed_logits = logits.clone()
    changed_logits[:, :, :, :4] = 50.0  # only where the target is ignored
    assert torch.isclose(dice_ce_loss(logits, with_ignore), dice_ce_loss(changed_logits, with_ignore))
    assert not torch.isclose(dice_ce_loss(logits, target), dice_ce_loss(changed_logits, target))
    # Everything ignored: finite, not NaN.
    assert torch.isfinite(dice_ce_loss(logits, torch.full_like(target, IGNORE_INDEX)))


# --- configuration ---------------------------------------------------------------------------


def test_config_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("task: semantic\ndata:\n  train_dir: somewhere\n  classes: [bg, polyp]\ntrain:\n  epochs: 3\n")
    config = load_config(path, ["train.lr=5e-4", "train.optimizer=sgd", "data.ignore_value=255"])
    assert config.task == "semantic"
    assert config.train.epochs == 3
    assert config.lr == 5e-4
    assert config.weight_decay == 3e-5  # the SGD default
    assert config.data.ignore_value == 255
    assert config.data.classes == ["bg", "polyp"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.epoch=3"], "unknown setting.*train.epoch.*accepted in this section"),
        (["train.epochs"], "not of the form section.key=value"),
        (["task=detect"], "task must be one of"),
        (["train.optimizer=adam"], "train.optimizer must be one of"),
        (["data.split_csv=a.csv"], "give exactly one data source"),
        (["data.classes=[bg, a, b, c]", "task=cells"], "exactly 3 classes"),
    ],
)
def test_config_errors_name_the_setting(overrides, message):
    base = [] if any(o.startswith("data.split_csv") for o in overrides) else ["data.train_dir=x"]
    if overrides == ["data.split_csv=a.csv"]:
        base = ["data.train_dir=x", "data.data_root=y"]
    with pytest.raises(ValueError, match=message):
        load_config(None, base + overrides)


def test_shipped_configs_load():
    for path in sorted((REPO / "training" / "configs").glob("*.yaml")):
        values = yaml.safe_load(path.read_text())
        overrides = ["data.train_dir=x"] if values.get("data", {}).get("train_dir", "") is None else []
        load_config(path, overrides)


# --- data and masks ---------------------------------------------------------------------------


def test_folder_pairs_match_by_stem_and_report_orphans(tmp_path, caplog):
    for sub in ("images", "masks"):
        (tmp_path / sub).mkdir()
    for name in ("a.tif", "b.png", "orphan.tif"):
        (tmp_path / "images" / name).write_bytes(b"")
    for name in ("a_labels.tif", "b_mask.png", "lonely.tif"):
        (tmp_path / "masks" / name).write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        pairs = pairs_in_folder(tmp_path)
    assert [(p.image.name, p.mask.name) for p in pairs] == [("a.tif", "a_labels.tif"), ("b.png", "b_mask.png")]
    assert "orphan" in caplog.text
    assert "lonely" in caplog.text


def test_seeded_split_keeps_one_validation_image():
    pairs = [Pair(REPO / f"{i}.tif", REPO / f"{i}_m.tif") for i in range(3)]
    train, val = split_pairs(pairs, 0.2, seed=0)
    assert len(val) == 1
    assert len(train) == 2
    assert set(train) | set(val) == set(pairs)
    assert split_pairs(pairs, 0.2, seed=0) == (train, val)
    assert split_pairs(pairs[:1], 0.2, seed=0) == (pairs[:1], [])


def test_semantic_mask_png_and_jpeg(caplog):
    png = np.asarray(Image.open(BR17 / "br17_mask_0_255.png"))
    jpeg = np.asarray(Image.open(BR17 / "br17_mask_0_255.jpg").convert("L"))
    from_png = semantic_classes(png, BR17 / "br17_mask_0_255.png", 2, None)
    with caplog.at_level(logging.WARNING):
        from_jpeg = semantic_classes(jpeg, BR17 / "br17_mask_0_255.jpg", 2, None)
    expected = json.loads((BR17 / "expected.json").read_text())
    assert set(np.unique(from_png)) <= {0, 1}
    assert set(np.unique(from_jpeg)) <= {0, 1}
    assert "br17_mask_0_255.jpg" in caplog.text
    assert "thresholded at 128" in caplog.text
    dice = 2 * np.sum(from_png & from_jpeg) / (from_png.sum() + from_jpeg.sum())
    assert dice >= 0.99
    assert dice == pytest.approx(expected["dice_jpeg_thresholded_at_128_vs_png"], abs=1e-9)
    assert from_png.mean() == pytest.approx(expected["foreground_fraction_png"], abs=5e-4)


def test_semantic_mask_ignore_band():
    path = BR17 / "br17_mask_0_1_ignore255.png"
    mask = np.asarray(Image.open(path))
    with pytest.raises(ValueError, match=r"br17_mask_0_1_ignore255.png.*\[255\].*data.ignore_value: 255"):
        semantic_classes(mask, path, 2, None)
    classes = semantic_classes(mask, path, 2, 255)
    np.testing.assert_array_equal(classes == IGNORE_INDEX, mask == 255)
    assert set(np.unique(classes[mask != 255])) == {0, 1}


def test_semantic_mask_value_outside_classes_is_an_error():
    mask = np.array([[0, 1], [2, 3]], np.uint8)
    with pytest.raises(ValueError, match=r"m.png contains values \[3\] outside the declared classes 0..2"):
        semantic_classes(mask, "m.png", 3, None)


def test_mask_of_another_size_names_both_files(tmp_path):
    import tifffile

    (tmp_path / "img.tif").write_bytes(b"")
    tifffile.imwrite(tmp_path / "img.tif", np.zeros((20, 30), np.uint8))
    tifffile.imwrite(tmp_path / "mask.tif", np.zeros((20, 31), np.uint16))
    with pytest.raises(ValueError, match=r"mask .*mask.tif is 20 x 31 .* image .*img.tif is 20 x 30"):
        load_sample(Pair(tmp_path / "img.tif", tmp_path / "mask.tif"), "cells", 3, {})


def test_binary_instance_mask_becomes_components(tmp_path, caplog):
    import tifffile

    mask = np.zeros((32, 32), np.uint8)
    mask[2:8, 2:8] = 255
    mask[20:28, 20:28] = 255
    tifffile.imwrite(tmp_path / "i.tif", np.random.default_rng(0).integers(0, 255, (32, 32), dtype=np.uint8))
    tifffile.imwrite(tmp_path / "m.tif", mask)
    with caplog.at_level(logging.WARNING):
        sample = load_sample(Pair(tmp_path / "i.tif", tmp_path / "m.tif"), "cells", 3, {})
    assert "m.tif" in caplog.text
    assert sorted(np.unique(sample.labels).tolist()) == [0, 1, 2]
    assert sample.image.shape == (3, 32, 32)


# --- augmentation ------------------------------------------------------------------------------


def _disk_sample(size: int = 60) -> Sample:
    yy, xx = np.mgrid[:size, :size]
    labels = ((yy - 30) ** 2 + (xx - 30) ** 2 < 100).astype(np.int32)
    image = np.stack([labels.astype(np.float32)] * 3) + 0.1
    return Sample("disk", image, instances_to_classes(labels), labels)


def test_patches_depend_only_on_seed_epoch_and_index():
    dataset = PatchDataset([_disk_sample()], patch_size=32, epoch_length=16, seed=3)
    first = [dataset[i] for i in range(16)]
    again = PatchDataset([_disk_sample()], patch_size=32, epoch_length=16, seed=3)
    for i in (0, 7, 15):
        torch.testing.assert_close(again[i][0], first[i][0], rtol=0, atol=0)
    dataset.set_epoch(1)
    assert any(not torch.equal(dataset[i][0], first[i][0]) for i in range(16))
    image, classes = first[0]
    assert image.shape == (3, 32, 32)
    assert image.dtype == torch.float32
    assert classes.shape == (32, 32)
    assert classes.dtype == torch.int64


def test_augmented_classes_stay_classes_and_foreground_is_oversampled():
    dataset = PatchDataset([_disk_sample(200)], patch_size=24, epoch_length=64, seed=0, foreground_fraction=1.0)
    patches = [dataset[i][1] for i in range(64)]
    assert all(set(torch.unique(p).tolist()) <= {0, 1, 2} for p in patches)
    # Every patch is centred on the disk, which covers 0.8 % of the image.
    assert all((p > 0).any() for p in patches)
    background_only = PatchDataset([_disk_sample(200)], patch_size=24, epoch_length=64, seed=0,
                                   foreground_fraction=0.0)
    assert sum(bool((background_only[i][1] > 0).any()) for i in range(64)) < 32


def test_colour_jitter_affine_per_channel():
    ramp = np.linspace(0, 1, 64, dtype=np.float32).reshape(1, 8, 8)
    image = np.concatenate([ramp, ramp, ramp])
    for seed in range(20):
        # Off: the same draws and the same patch as before the option existed.
        plain = intensity_augment(np.random.default_rng(seed), image)
        np.testing.assert_array_equal(intensity_augment(np.random.default_rng(seed), image, 0.0), plain)
        jittered = intensity_augment(np.random.default_rng(seed), image, 1.0)
        for c in range(3):
            gain, offset = np.polyfit(plain[c].ravel(), jittered[c].ravel(), 1)
            assert 0.8 <= gain <= 1.2
            assert -0.1 <= offset <= 0.1
            np.testing.assert_allclose(jittered[c], gain * plain[c] + offset, atol=1e-5)
        assert not np.allclose(jittered[0], jittered[1])
    grey = ramp.copy()
    np.testing.assert_array_equal(intensity_augment(np.random.default_rng(0), grey, 1.0),
                                  intensity_augment(np.random.default_rng(0), grey))


def test_stain_augment_pure_haematoxylin_gain():
    from skimage.color import rgb_from_hed

    # Pixels of pure haematoxylin at concentrations 0.02 to 0.2 (skimage's
    # rgb2hed units), plus an unstained white one: RGB = 1e-6 ** (c * H row).
    concentration = np.array([0.0, 0.02, 0.05, 0.1, 0.2])
    rgb = (1e-6 ** (concentration[:, None] * rgb_from_hed[0])).T.reshape(3, 1, 5).astype(np.float32)
    gains = np.random.default_rng(7).uniform(0.9, 1.1, 3)
    out = stain_augment(np.random.default_rng(7), rgb, gain=0.1, offset=0.0)
    expected = (1e-6 ** (gains[0] * concentration[:, None] * rgb_from_hed[0])).T.reshape(3, 1, 5)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-6)
    # The change is not a per-channel gain, which normalisation would undo:
    # the white pixel stays white while the stained ones change.
    np.testing.assert_allclose(out[:, 0, 0], 1.0, atol=1e-6)
    assert np.abs(out - rgb).max() > 1e-3


def test_stain_augment_keeps_grey_and_outliers():
    ramp = np.linspace(-0.2, 1.3, 64, dtype=np.float32).reshape(1, 8, 8)
    grey = np.concatenate([ramp, ramp, ramp])
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(stain_augment(rng, grey), grey)
    assert rng.random() == np.random.default_rng(0).random()  # nothing drawn
    colour = np.concatenate([ramp, ramp * 0.5 + 0.3, ramp[:, ::-1]])
    # No change drawn: an exact round trip through the stain space.
    np.testing.assert_allclose(stain_augment(rng, colour, gain=0.0, offset=0.0), colour, atol=1e-5)
    changed = stain_augment(np.random.default_rng(3), colour)
    # Only the part inside [0.01, 1] changes; the rest passes through.
    inside = np.clip(colour, 0.01, 1.0)
    np.testing.assert_allclose(changed, stain_augment(np.random.default_rng(3), inside) + (colour - inside),
                               atol=1e-6)
    assert np.abs(changed - colour).max() > 1e-3
    assert np.isfinite(changed).all()
    assert changed.dtype == np.float32


def test_stain_jitter_off_keeps_patches():
    image = np.random.default_rng(0).random((3, 40, 40)).astype(np.float32)
    sample = _disk_sample(40)
    sample.image = image
    plain = PatchDataset([sample], patch_size=24, epoch_length=4, seed=0)
    off = PatchDataset([sample], patch_size=24, epoch_length=4, seed=0, stain_jitter=0.0)
    on = PatchDataset([sample], patch_size=24, epoch_length=4, seed=0, stain_jitter=1.0)
    for i in range(4):
        torch.testing.assert_close(plain[i][0], off[i][0])
    assert any(not torch.allclose(plain[i][0], on[i][0]) for i in range(4))
    with pytest.raises(ValueError, match=r"train.stain_jitter is a probability in \[0, 1\], got 1.5"):
        load_config(None, ["data.train_dir=x", "train.stain_jitter=1.5"])


def test_group_weights_favour_small_groups():
    weights = group_weights(["a"] * 4 + ["b"])
    assert weights.sum() == pytest.approx(1.0)
    assert weights[4] == pytest.approx(2 * weights[0])  # 1/sqrt(1) vs 1/sqrt(4)


@pytest.mark.parametrize(("override", "message"), [
    ("train.epochs=ten", "train.epochs must be an integer, got 'ten'"),
    ("train.lr=fast", "train.lr must be a number, got 'fast'"),
    ("model.freeze_encoder=maybe", "model.freeze_encoder must be true or false"),
])
def test_config_type_errors_name_the_setting(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, ["data.train_dir=x", override])


def test_non_finite_training_image_is_refused_by_name(tmp_path):
    from napari_xlstm_unet.training.data import RejectedPair

    case = CASES / "BR-07"
    gt = sorted(case.glob("*gt*"))[0]
    with pytest.raises(RejectedPair, match=r"br07_nonfinite.tif contains 1026 non-finite pixels"):
        load_sample(Pair(case / "br07_nonfinite.tif", gt), "cells", 3, {})
    clean = load_sample(Pair(case / "br07_clean.tif", gt), "cells", 3, {})
    assert np.isfinite(clean.image).all()


def test_time_stack_training_image_is_rejected_by_name(tmp_path):
    import tifffile

    case = CASES / "BR-04"
    tifffile.imwrite(tmp_path / "frame0_mask.tif", tifffile.imread(case / "br04_gt_labels_tyx.tif")[0])
    with pytest.raises(ValueError, match=r"training image .*br04_tyx_imagej.tif: .*axes TYX.*its own mask"):
        load_sample(Pair(case / "br04_tyx_imagej.tif", tmp_path / "frame0_mask.tif"), "cells", 3, {})


def test_tuning_picks_split_depth_by_f1():
    from napari_xlstm_unet.training.evaluation import tune_postprocess

    yy, xx = np.mgrid[:48, :72]
    first, second = [(yy - 24) ** 2 + (xx - cx) ** 2 <= 144 for cx in (24, 44)]
    truth = np.where(first, 1, np.where(second, 2, 0)).astype(np.int32)
    interior = (first | second).astype(np.float32) * 0.9
    probabilities = np.stack([1 - interior, interior, np.zeros_like(interior)])
    sample = Sample("pair", np.zeros((3, 48, 72), np.float32), instances_to_classes(truth), truth)
    start = {"prob_threshold": 0.5, "min_size": 16, "split_depth": 0.0}
    tuned, f1 = tune_postprocess([probabilities], [sample], start)
    # Two touching disks: only a split depth of 2 finds both (F1 1 against 0).
    assert tuned["split_depth"] == 2.0
    assert f1 == 1.0
    # One disk alone: every split depth scores 1, so the tie keeps the start value.
    alone = np.where(truth == 1, 1, 0).astype(np.int32)
    single = np.stack([1 - first * 0.9, first * 0.9, np.zeros_like(interior)]).astype(np.float32)
    tuned, f1 = tune_postprocess([single], [Sample("one", sample.image, instances_to_classes(alone), alone)], start)
    assert tuned == start
    assert f1 == 1.0
