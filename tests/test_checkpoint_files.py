"""Broken checkpoint files give an error naming the file (case BR-20)."""

from __future__ import annotations

import pytest

from conftest import CASES
from napari_xlstm_unet.model.checkpoint import load_checkpoint

BROKEN = ["br20_empty.pt", "br20_truncated.pt", "br20_random_bytes.pt", "br20_not_a_checkpoint.pt"]


@pytest.mark.parametrize("name", BROKEN)
def test_broken_checkpoint_names_file(name):
    path = CASES / "BR-20" / name
    assert path.is_file()
    with pytest.raises(ValueError, match="not a readable napari-xlstm-unet checkpoint") as info:
        load_checkpoint(path)
    assert name in str(info.value)


def test_missing_checkpoint_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        load_checkpoint(tmp_path / "nothing.pt")


def test_plain_dict_is_not_a_checkpoint(tmp_path):
    import torch

    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="expected format"):
        load_checkpoint(path)


def test_folder_checkpoint_says_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="is a folder, not a checkpoint file"):
        load_checkpoint(tmp_path)


def test_folder_model_says_folder(tmp_path):
    from napari_xlstm_unet.pretrained import resolve_model_path

    with pytest.raises(FileNotFoundError, match="such as the model.pt"):
        resolve_model_path(tmp_path)


def test_image_file_gets_no_weights_only_advice():
    from napari_xlstm_unet.pretrained import resolve_model_path

    tiff = resolve_model_path("cells").parent.parent / "sample_data" / "nuclei_dsb2018.tif"
    with pytest.raises(ValueError, match="Unsupported operand") as info:
        load_checkpoint(tiff)
    assert "weights_only" not in str(info.value)
