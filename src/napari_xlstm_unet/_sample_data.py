"""Sample data contributed to napari's File > Open Sample menu."""

from __future__ import annotations

from importlib import resources

import numpy as np
import tifffile


def nuclei_sample() -> list[tuple]:
    """Return the shipped DSB2018 nuclei image as napari layer data."""
    path = resources.files("napari_xlstm_unet") / "sample_data" / "nuclei_dsb2018.tif"
    with resources.as_file(path) as file:
        data = tifffile.imread(file)
    return [(data, {"name": "nuclei (DSB2018)"}, "image")]


def polyp_sample() -> list[tuple]:
    """Return the shipped EndoTect 2020 colonoscopy frame as an RGB napari layer."""
    from PIL import Image

    path = resources.files("napari_xlstm_unet") / "sample_data" / "polyp_endotect2020.png"
    with resources.as_file(path) as file, Image.open(file) as image:
        data = np.asarray(image.convert("RGB"))
    return [(data, {"name": "polyp (EndoTect 2020)", "rgb": True}, "image")]
