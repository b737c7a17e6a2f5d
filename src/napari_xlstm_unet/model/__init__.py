"""2D xLSTM-UNet network, its configuration and checkpoints (no napari, no Qt)."""

from .config import PRESETS, ModelConfig, preset
from .unet import XLSTMUNet, build_model

__all__ = ["PRESETS", "ModelConfig", "XLSTMUNet", "build_model", "preset"]
