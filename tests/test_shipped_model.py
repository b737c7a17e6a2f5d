"""The shipped cell model on real images it never saw in training."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import tifffile

from conftest import DATA, REPO
from napari_xlstm_unet.inference.predict import segment_image
from napari_xlstm_unet.metrics import match_instances
from napari_xlstm_unet.pretrained import load_model

# F1 measured with the shipped weights and post-processing (seed splitting
# included): 0.763 on the dense sample (273 nuclei) and 0.868 on the
# stained-tissue tile. The floors sit a little lower
# to absorb numeric differences between machines, not model changes.
SAMPLE_NAME = "dsb2018s1test_432f367a4c5b"
SAMPLE_MIN_F1 = 0.75
STAINED_NAME = "dsb2018s1train_5c6eb9a47852"
STAINED_MIN_F1 = 0.85
CASES_TO_SCORE = [
    ("microscopy", SAMPLE_NAME, SAMPLE_MIN_F1),
    ("microscopy-extra", STAINED_NAME, STAINED_MIN_F1),
]


def test_scored_images_are_in_test_split():
    with open(REPO / "training" / "splits" / "dsb2018.csv", newline="") as handle:
        splits = {row["name"]: row["split"] for row in csv.DictReader(handle)}
    assert splits[SAMPLE_NAME] == "test"
    assert splits[STAINED_NAME] == "test"


def test_model_card_records_training():
    card = load_model("cells", device="cpu").model_card
    for key in ("command", "training_seconds", "data", "date", "test_f1_at_0.5"):
        assert key in card, key
    assert card["test_f1_at_0.5"] > 0.5


@pytest.mark.parametrize("dataset, name, floor", CASES_TO_SCORE)
def test_shipped_model_reaches_recorded_f1(dataset, name, floor):
    image = tifffile.imread(DATA / dataset / "images" / f"{name}.tif")
    truth = tifffile.imread(DATA / dataset / "masks" / f"{name}.tif")
    labels = segment_image(image, load_model("cells", device="cpu")).labels
    assert labels.shape == truth.shape
    assert labels.dtype == np.uint16
    assert match_instances(truth, labels).f1 >= floor


def test_sample_image_is_the_shipped_test_image():
    from napari_xlstm_unet._sample_data import nuclei_sample

    data, meta, kind = nuclei_sample()[0]
    original = tifffile.imread(DATA / "microscopy" / "images" / f"{SAMPLE_NAME}.tif")
    assert kind == "image"
    np.testing.assert_array_equal(data, original)


# The shipped polyp model on its sample frame and on another test frame: Dice
# measured at shipping 0.887 and 0.881 (benchmarks/endoscopy_test_split.sh).
POLYP_FRAMES = [("endotect2020_1c4ef1bec550", 0.85), ("endotect2020_0a3f577c5f57", 0.85)]


@pytest.mark.parametrize("name, floor", POLYP_FRAMES)
def test_shipped_polyp_model_reaches_recorded_dice(name, floor):
    from PIL import Image

    from napari_xlstm_unet.metrics import semantic_scores

    with open(REPO / "training" / "splits" / "polyps.csv", newline="") as handle:
        assert {row["name"]: row["split"] for row in csv.DictReader(handle)}[name] == "test"
    frame = np.asarray(Image.open(DATA / "endoscopy" / "images" / f"{name}.png"))
    truth = np.asarray(Image.open(DATA / "endoscopy" / "masks" / f"{name}.png"))
    loaded = load_model("polyps", device="cpu")
    assert loaded.task == "semantic"
    labels = segment_image(frame, loaded).labels
    assert labels.shape == truth.shape
    assert labels.dtype == np.uint8
    assert semantic_scores(truth, labels).dice >= floor


def test_shipped_instrument_model_finds_the_laparoscopic_tool():
    from PIL import Image

    from napari_xlstm_unet.metrics import semantic_scores

    name = "cholecinstseg_VID03_000150"  # a test frame; Dice 0.799 when the model shipped
    with open(REPO / "training" / "splits" / "instruments.csv", newline="") as handle:
        assert {row["name"]: row["split"] for row in csv.DictReader(handle)}[name] == "test"
    frame = np.asarray(Image.open(DATA / "endoscopy-instruments" / "images" / f"{name}.png"))
    truth = np.asarray(Image.open(DATA / "endoscopy-instruments" / "masks" / f"{name}.png"))
    labels = segment_image(frame, load_model("instruments", device="cpu")).labels
    assert semantic_scores(truth, labels).dice >= 0.75
