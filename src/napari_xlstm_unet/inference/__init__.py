"""Inference: normalisation, tiled prediction and post-processing (no napari, no Qt)."""

from .postprocess import probabilities_to_labels
from .predict import Segmentation, default_device, predict_probabilities, segment_image
from .tiling import Cancelled

__all__ = [
    "Cancelled",
    "Segmentation",
    "default_device",
    "predict_probabilities",
    "probabilities_to_labels",
    "segment_image",
]
