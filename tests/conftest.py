"""Shared fixtures: paths to the shared data, a tiny network and a pass-through model for fast tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("XLSTM_UNET_SHARED", REPO.parent / "shared"))
CASES = SHARED / "cases"
DATA = SHARED / "data"


def pytest_collection_modifyitems(config, items):
    # Tests that read the shared data fail loudly when it is missing, rather
    # than skipping: CI always has it beside the clone.
    if not SHARED.is_dir():
        raise pytest.UsageError(
            f"shared data folder not found at {SHARED}; set XLSTM_UNET_SHARED to its path"
        )


class LogModel(torch.nn.Module):
    """Returns log(x), so softmax gives back an input that already sums to 1."""

    def forward(self, x):
        return torch.log(x)


@pytest.fixture
def tiny_config():
    """A 3-stage network with 4-8-16 channels: fast enough for many small tests."""
    from napari_xlstm_unet.model import ModelConfig

    return ModelConfig(
        in_channels=3,
        num_classes=3,
        widths=(4, 8, 16),
        strides=(1, 2, 2),
        encoder_blocks=(1, 1, 1),
        decoder_blocks=(1, 1),
        xlstm="bot",
    )
