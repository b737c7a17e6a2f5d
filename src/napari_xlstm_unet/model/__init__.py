"""2D xLSTM-UNet network, its configuration and checkpoints (no napari, no Qt)."""

from .config import PRESETS, XLSTM_PLACEMENTS, ModelConfig, preset
from .unet import XLSTMUNet, build_model

__all__ = ["PRESETS", "XLSTM_PLACEMENTS", "ModelConfig", "XLSTMUNet", "build_model", "preset"]
