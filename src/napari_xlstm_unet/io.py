"""Read images and write label images that other tools (Fiji, QuPath, napari) open."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

from ._atomic import write_atomically

__all__ = [
    "IMAGE_SUFFIXES",
    "ImageFile",
    "labels_output_path",
    "list_images",
    "read_image",
    "strip_labels_suffix",
    "write_labels",
]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")
LABELS_SUFFIX = "_labels"
# Suffixes of ground-truth files in common datasets (the NeurIPS 2022 cell
# challenge names them <name>_label.tiff); evaluate ignores them when pairing.
MATCH_SUFFIXES = ("_labels", "_label")


@dataclass
class ImageFile:
    """An image read from disk.

    Attributes
    ----------
    data : numpy.ndarray
        Pixel data as stored: (H, W), (H, W, C) or (C, H, W).
    path : pathlib.Path
        Source file.
    has_alpha : bool
        The last channel is transparency (RGBA or grey + alpha PNG).
    resolution : tuple of float, optional
        Pixels per unit along (y, x), read from TIFF tags.
    resolution_unit : str, optional
        Unit of ``resolution``, for example ``"CENTIMETER"``, ``"INCH"`` or
        ``"micron"`` (ImageJ).
    """

    data: np.ndarray
    path: Path
    has_alpha: bool = False
    resolution: tuple[float, float] | None = None
    resolution_unit: str | None = None


def _read_tiff(path: Path) -> ImageFile:
    with tifffile.TiffFile(path) as tif:
        if not tif.series:
            raise ValueError("no image data found (empty or truncated TIFF)")
        series = tif.series[0]
        data = series.levels[0].asarray() if series.levels else series.asarray()
        page = tif.pages.first
        resolution = unit = None
        x_tag, y_tag = page.tags.get("XResolution"), page.tags.get("YResolution")
        if x_tag is not None and y_tag is not None:
            x_res = x_tag.value[0] / x_tag.value[1] if x_tag.value[1] else 0.0
            y_res = y_tag.value[0] / y_tag.value[1] if y_tag.value[1] else 0.0
            if x_res > 0 and y_res > 0:
                resolution = (float(y_res), float(x_res))
                unit = page.resolutionunit.name
                if tif.is_imagej and (tif.imagej_metadata or {}).get("unit"):
                    unit = tif.imagej_metadata["unit"]
        # ExtraSamples 1 and 2 mark associated and unassociated alpha; 0
        # (unspecified) is an ordinary extra channel, as tifffile writes for
        # multi-channel images.
        extra = page.tags.get("ExtraSamples")
        extra_values = extra.value if extra is not None else ()
        if isinstance(extra_values, int):
            extra_values = (extra_values,)
        has_alpha = bool(extra_values) and int(extra_values[-1]) in (1, 2) and data.ndim == 3
    return ImageFile(data, path, has_alpha, resolution, unit)


def _read_pil(path: Path) -> ImageFile:
    from PIL import Image

    with Image.open(path) as image:
        mode = image.mode
        has_alpha = mode in ("RGBA", "LA", "PA")
        if mode == "P":
            image = image.convert("RGBA" if "transparency" in image.info else "RGB")
            has_alpha = image.mode == "RGBA"
        data = np.asarray(image)
    return ImageFile(data, path, has_alpha)


def read_image(path: str | os.PathLike) -> ImageFile:
    """Read a 2D image from a TIFF, PNG, JPEG or BMP file.

    TIFF files are read with tifffile (series 0, full resolution); compressed
    TIFFs need the ``imagecodecs`` package, a dependency of this package.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file cannot be decoded, naming the file and the reason.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            return _read_tiff(path)
        return _read_pil(path)
    except (OSError, ValueError, tifffile.TiffFileError) as error:
        raise ValueError(f"cannot read image {path}: {error}") from error


def list_images(inputs: list[str | os.PathLike]) -> list[Path]:
    """Expand files and folders into a sorted list of image files.

    Folders contribute their files with an image suffix (not recursively),
    except files whose stem ends in ``_labels``, which are this package's own
    outputs.
    """
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files += sorted(
                p for p in path.iterdir()
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.stem.endswith(LABELS_SUFFIX)
            )
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"input not found: {path}")
    return files


def strip_labels_suffix(stem: str) -> str:
    """Return ``stem`` without a trailing ``_labels`` or ``_label``."""
    for suffix in MATCH_SUFFIXES:
        if stem.endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def labels_output_path(image_path: Path, out_dir: Path, used_paths: set[Path] | None = None) -> Path:
    """Return ``out_dir / <stem>_labels.tif``, or ``<stem>_<ext>_labels.tif`` when that is in use.

    ``used_paths`` contains the outputs already assigned in this run, so ``a.tif``
    and ``a.png`` get distinct files.
    """
    candidate = out_dir / f"{image_path.stem}{LABELS_SUFFIX}.tif"
    if used_paths is not None and candidate in used_paths:
        suffix = image_path.suffix.lower().lstrip(".")
        candidate = out_dir / f"{image_path.stem}_{suffix}{LABELS_SUFFIX}.tif"
    if used_paths is not None:
        used_paths.add(candidate)
    return candidate


# Length units ImageJ writes, as a factor to centimetres (the TIFF unit).
_CENTIMETRES_PER_UNIT = {"um": 1e-4, "µm": 1e-4, "micron": 1e-4, "microns": 1e-4,
                         "mm": 0.1, "nm": 1e-7, "cm": 1.0}


def _resolution_kwargs(labels: np.ndarray, resolution: tuple[float, float],
                       unit: str | None, bigtiff: bool) -> dict:
    y_res, x_res = resolution
    if unit in ("CENTIMETER", "INCH", "NONE", "MILLIMETER", "MICROMETER"):
        return {"resolution": (x_res, y_res), "resolutionunit": unit}
    if unit and labels.dtype.itemsize <= 2 and not bigtiff:
        # ImageJ's own unit tag exists only for 8- and 16-bit ImageJ TIFFs.
        return {"resolution": (x_res, y_res), "imagej": True, "metadata": {"unit": unit}}
    if unit in _CENTIMETRES_PER_UNIT:
        factor = 1.0 / _CENTIMETRES_PER_UNIT[unit]  # pixels per unit -> pixels per cm
        return {"resolution": (x_res * factor, y_res * factor), "resolutionunit": "CENTIMETER"}
    return {"resolution": (x_res, y_res), "resolutionunit": "NONE"}


def write_labels(
    path: str | os.PathLike,
    labels: np.ndarray,
    resolution: tuple[float, float] | None = None,
    resolution_unit: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a label image as a zlib-compressed TIFF, atomically.

    Parameters
    ----------
    path : path-like
        Destination ``.tif``.
    labels : numpy.ndarray, shape (H, W)
        Unsigned integer labels (uint8, uint16 or uint32).
    resolution : (float, float), optional
        Pixels per unit along (y, x), copied from the input image.
    resolution_unit : str, optional
        TIFF unit name (``"CENTIMETER"``, ``"INCH"``) or an ImageJ unit such as
        ``"micron"``.
    overwrite : bool
        Replace an existing file. Without it, an existing file raises
        ``FileExistsError`` and is left untouched.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    labels = np.asarray(labels)
    if labels.dtype.kind not in "ub":
        raise TypeError(f"labels must have an unsigned integer dtype, got {labels.dtype}")
    path.parent.mkdir(parents=True, exist_ok=True)

    kwargs: dict = {"compression": "zlib", "photometric": "minisblack"}
    if labels.nbytes > 2**31:
        kwargs["bigtiff"] = True
    if resolution is not None:
        kwargs.update(_resolution_kwargs(labels, resolution, resolution_unit, kwargs.get("bigtiff", False)))
        if kwargs.get("imagej"):
            kwargs.pop("compression")

    write_atomically(path, lambda tmp_name: tifffile.imwrite(tmp_name, labels, **kwargs), ".tmp.tif")
    return path
