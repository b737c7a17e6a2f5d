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
    "MAX_CHANNELS",
    "ImageFile",
    "labels_output_path",
    "list_images",
    "needs_bigtiff",
    "read_image",
    "standardize_axes",
    "strip_labels_suffix",
    "write_labels",
]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")
LABELS_SUFFIX = "_labels"
# Suffixes of ground-truth files in common datasets (the NeurIPS 2022 cell
# challenge names them <name>_label.tiff); evaluate ignores them when pairing.
MATCH_SUFFIXES = ("_labels", "_label")

# Maximum channel count of one 2D image (RGBA). A longer unnamed axis is a stack.
MAX_CHANNELS = 4
# Axis letters follow tifffile. Y and X span the image plane, and C (ImageJ,
# OME) and S (samples per pixel, as in RGB) are channels. Q (unknown) and I (a
# plain sequence of pages) carry no meaning, so a short one is read as
# channels, as for arrays without axes. Every other letter (T, Z and the rest)
# is a stack axis, segmented plane by plane.
CHANNEL_LETTERS = "CS"
UNKNOWN_LETTERS = "QI"
ACCEPTED_LAYOUTS = (
    f"accepted layouts are (H, W), (H, W, C) and (C, H, W) with C <= {MAX_CHANNELS}, "
    "plus stack axes (T, Z) that are segmented plane by plane"
)

# Classic TIFF stores 32-bit offsets, so a file must stay below 4 GiB.
# Switching at 2 GiB of pixels leaves room for tags and for zlib output that
# is larger than its input (incompressible data).
BIGTIFF_THRESHOLD_BYTES = 2**31


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
    axes : str, optional
        One letter per axis of ``data`` in tifffile's notation, for example
        ``"YX"``, ``"YXS"`` (RGB), ``"CYX"`` or ``"TYX"``; see
        :func:`standardize_axes`. None when unknown.
    """

    data: np.ndarray
    path: Path
    has_alpha: bool = False
    resolution: tuple[float, float] | None = None
    resolution_unit: str | None = None
    axes: str | None = None


def _read_tiff(path: Path) -> ImageFile:
    with tifffile.TiffFile(path) as tif:
        if not tif.series:
            raise ValueError("no image data found (empty or truncated TIFF)")
        series = tif.series[0]
        if len(tif.series) > 1:
            # OME files from slide scanners add label and macro images as
            # further series. Series 0 is the image itself.
            logger.info(
                "%s contains %d image series; reading series 0 of shape %s and skipping %s",
                path, len(tif.series), series.shape, [s.shape for s in tif.series[1:]],
            )
        level = series.levels[0] if series.levels else series
        try:
            data = level.asarray()
        except ValueError as error:
            if "imagecodecs" not in str(error):
                raise
            compression = tif.pages.first.compression.name
            raise ValueError(
                f"the pixels are {compression}-compressed and decoding them needs the imagecodecs "
                "package, which is missing or lacks that codec; install it with "
                "'pip install imagecodecs' (a dependency of napari-xlstm-unet), or save the image "
                "uncompressed"
            ) from error
        axes = level.axes
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
    return ImageFile(data, path, has_alpha, resolution, unit, axes)


def _read_pil(path: Path) -> ImageFile:
    from PIL import Image

    with Image.open(path) as image:
        mode = image.mode
        has_alpha = mode in ("RGBA", "LA", "PA")
        if mode == "P":
            image = image.convert("RGBA" if "transparency" in image.info else "RGB")
            has_alpha = image.mode == "RGBA"
        data = np.asarray(image)
    return ImageFile(data, path, has_alpha, axes="YX" if data.ndim == 2 else "YXC")


def read_image(path: str | os.PathLike) -> ImageFile:
    """Read an image from a TIFF, PNG, JPEG or BMP file, with the meaning of its axes.

    TIFF files are read with tifffile: series 0 (the image, not a label or
    macro image of a slide scanner) at full resolution (pyramid level 0).
    Compressed TIFFs need the ``imagecodecs`` package, a dependency of this
    package. :func:`standardize_axes` turns the result into planes of
    (C, H, W) images.

    Parameters
    ----------
    path : path-like
        The image file.

    Returns
    -------
    ImageFile
        The pixels as stored, with their axes, alpha flag and resolution.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file cannot be decoded, naming the file and the reason; for a
        missing codec also the compression and the package to install.
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


def _guess_roles(shape: tuple[int, ...], channels_last: bool | None) -> list[str]:
    """Return the role of each axis of an array without axis names (see standardize_axes)."""
    ndim = len(shape)
    dropped = 0
    # Leading length-1 axes, as napari projections leave them.
    while ndim - dropped > 3 and shape[dropped] == 1:
        dropped += 1
    rest = shape[dropped:]
    if len(rest) == 3 and rest[0] == 1 and rest[-1] > MAX_CHANNELS:
        dropped += 1  # (1, H, W)
        rest = rest[1:]
    roles = ["drop"] * dropped
    if len(rest) == 2:
        return roles + ["Y", "X"]

    first, last = rest[0], rest[-1]
    if channels_last is None:
        if last <= MAX_CHANNELS:
            channels_last = True
        elif first <= MAX_CHANNELS and len(rest) == 3:
            channels_last = False
    if channels_last:
        return roles + ["plane"] * (len(rest) - 3) + ["Y", "X", "channel"]
    if channels_last is False and len(rest) == 3:
        return roles + ["channel", "Y", "X"]
    # Every leading axis is a stack axis, as napari shows a grey layer.
    return roles + ["plane"] * (len(rest) - 2) + ["Y", "X"]


def _named_roles(shape: tuple[int, ...], axes: str) -> list[str]:
    """Return the role of each axis from its tifffile letter (see standardize_axes)."""
    if len(axes) != len(shape):
        raise ValueError(
            f"axes {axes!r} have {len(axes)} letters but the image has shape {shape}; "
            "give one letter per axis"
        )
    if axes.count("Y") != 1 or axes.count("X") != 1:
        raise ValueError(
            f"axes {axes!r} of an image of shape {shape} need exactly one Y and one X axis; "
            f"{ACCEPTED_LAYOUTS}"
        )
    roles = []
    for letter, length in zip(axes, shape):
        if letter in "YX":
            roles.append(letter)
        elif length == 1:
            roles.append("drop")
        elif letter in CHANNEL_LETTERS:
            roles.append("channel")
        elif letter in UNKNOWN_LETTERS:
            roles.append("unknown")
        else:
            roles.append("plane")

    unknown = [i for i, role in enumerate(roles) if role == "unknown"]
    if "channel" not in roles and len(unknown) == 1 and shape[unknown[0]] <= MAX_CHANNELS:
        roles[unknown[0]] = "channel"
        logger.info("axis %s of length %d in an image of shape %s is read as channels",
                    axes[unknown[0]], shape[unknown[0]], shape)
    roles = ["plane" if role == "unknown" else role for role in roles]
    channel_axes = [axes[i] for i, role in enumerate(roles) if role == "channel"]
    if len(channel_axes) > 1:
        raise ValueError(
            f"image of shape {shape} with axes {axes} has {len(channel_axes)} channel axes "
            f"({''.join(channel_axes)}); at most one is accepted; merge or select channels first"
        )
    return roles


def standardize_axes(
    data: np.ndarray, axes: str | None = None, channels_last: bool | None = None
) -> tuple[np.ndarray, str]:
    """Reorder an image to (planes..., C, H, W) and name its stack axes.

    This is the one place that decides what each axis of an image is, for the
    command line, the napari widget and training alike. Axes of length 1
    other than Y and X are removed. Where ``axes`` names the channel and
    stack axes, channels are never taken as planes, nor planes as channels.

    Parameters
    ----------
    data : numpy.ndarray
        The pixels.
    axes : str, optional
        One letter per axis of ``data`` in tifffile's notation
        (:attr:`ImageFile.axes`): ``"YX"``, ``"YXS"``, ``"CYX"``, ``"TYX"``,
        ``"TZCYX"`` and so on. C and S are channels, and every other letter
        except Q and I is a stack axis. Q and I (unnamed) are channels when
        there is one of at most 4 entries and no other channel axis, else
        stack axes.
    channels_last : bool, optional
        Used only without ``axes``: the layout of the last three axes when the
        caller knows it (napari's ``layer.rgb``). When None, the last axis
        is channels if it has at most 4 entries, else a 3-axis array whose
        first axis has at most 4 entries is channels-first, else every axis
        before the last two is a stack axis.

    Returns
    -------
    numpy.ndarray
        Shape (*plane_shape, C, H, W), a view of ``data`` where possible; C is
        1 for a grey image.
    str
        The letters of the stack axes, one per plane axis: ``""`` for one 2D
        image, ``"T"`` for a time series. Unnamed stack axes are ``"Q"``.

    Raises
    ------
    ValueError
        If the image has fewer than 2 axes, ``axes`` does not fit its shape,
        or it has more than one channel axis.
    """
    array = np.asarray(data)
    shape = tuple(array.shape)
    if array.ndim < 2:
        raise ValueError(f"expected an image with at least 2 axes, got an array of shape {shape}")
    if axes is None:
        roles = _guess_roles(shape, channels_last)
        letters = "Q" * len(shape)
    else:
        letters = axes.upper()
        roles = _named_roles(shape, letters)

    kept = [i for i, role in enumerate(roles) if role != "drop"]
    array = array[tuple(0 if role == "drop" else slice(None) for role in roles)]
    roles = [roles[i] for i in kept]
    letters = "".join(letters[i] for i in kept)

    planes = [i for i, role in enumerate(roles) if role == "plane"]
    channels = [i for i, role in enumerate(roles) if role == "channel"]
    order = planes + channels + [roles.index("Y"), roles.index("X")]
    array = np.transpose(array, order)
    if not channels:
        array = np.expand_dims(array, -3)
    return array, "".join(letters[i] for i in planes)


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
                       unit: str | None, bigtiff: bool, axes: str | None) -> dict:
    y_res, x_res = resolution
    if unit in ("CENTIMETER", "INCH", "NONE", "MILLIMETER", "MICROMETER"):
        return {"resolution": (x_res, y_res), "resolutionunit": unit}
    # ImageJ's own unit tag exists only for 8- and 16-bit ImageJ TIFFs, and
    # ImageJ hyperstacks name their stack axes only with T and Z, in that order.
    imagej_axes = axes is None or axes in ("YX", "TYX", "ZYX", "TZYX")
    if unit and labels.dtype.itemsize <= 2 and not bigtiff and imagej_axes:
        metadata = {"unit": unit}
        if axes is not None and labels.ndim > 2:
            metadata["axes"] = axes
        return {"resolution": (x_res, y_res), "imagej": True, "metadata": metadata}
    if unit in _CENTIMETRES_PER_UNIT:
        factor = 1.0 / _CENTIMETRES_PER_UNIT[unit]  # pixels per unit -> pixels per cm
        return {"resolution": (x_res * factor, y_res * factor), "resolutionunit": "CENTIMETER"}
    return {"resolution": (x_res, y_res), "resolutionunit": "NONE"}


def needs_bigtiff(nbytes: int) -> bool:
    """Return whether a label image of ``nbytes`` bytes of pixels must be written as BigTIFF.

    Classic TIFF cannot address more than 4 GiB, so images above
    ``BIGTIFF_THRESHOLD_BYTES`` (2 GiB) are written as BigTIFF, with 64-bit
    offsets.

    Parameters
    ----------
    nbytes : int
        Size of the uncompressed pixels, ``labels.nbytes``.
    """
    return nbytes > BIGTIFF_THRESHOLD_BYTES


def write_labels(
    path: str | os.PathLike,
    labels: np.ndarray,
    resolution: tuple[float, float] | None = None,
    resolution_unit: str | None = None,
    overwrite: bool = False,
    axes: str | None = None,
) -> Path:
    """Write a label image as a zlib-compressed TIFF, atomically.

    Parameters
    ----------
    path : path-like
        Destination ``.tif``.
    labels : numpy.ndarray, shape (H, W) or (*planes, H, W)
        Unsigned integer labels (uint8, uint16 or uint32); a stack holds the
        labels of each plane.
    resolution : (float, float), optional
        Pixels per unit along (y, x), copied from the input image.
    resolution_unit : str, optional
        TIFF unit name (``"CENTIMETER"``, ``"INCH"``) or an ImageJ unit such as
        ``"micron"``.
    overwrite : bool
        Replace an existing file. Without it, an existing file raises
        ``FileExistsError`` and is left untouched.
    axes : str, optional
        One tifffile letter per axis of ``labels`` ending in ``"YX"``, for
        example ``"TYX"``; stored in the file so that readers see the stack
        axes. Files above 2 GiB of pixels are written as BigTIFF (see
        :func:`needs_bigtiff`).

    Returns
    -------
    pathlib.Path
        The written path.

    Raises
    ------
    FileExistsError
        If ``path`` exists and ``overwrite`` is False.
    TypeError
        If ``labels`` is not of an unsigned integer dtype.
    ValueError
        If ``axes`` does not fit the shape of ``labels``.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to replace it")
    labels = np.asarray(labels)
    if labels.dtype.kind not in "ub":
        raise TypeError(f"labels must have an unsigned integer dtype, got {labels.dtype}")
    if axes is not None and (len(axes) != labels.ndim or not axes.endswith("YX")):
        raise ValueError(
            f"axes {axes!r} do not fit labels of shape {labels.shape}; give one letter per axis, "
            "ending in 'YX'"
        )
    path.parent.mkdir(parents=True, exist_ok=True)

    kwargs: dict = {"compression": "zlib", "photometric": "minisblack"}
    if needs_bigtiff(labels.nbytes):
        kwargs["bigtiff"] = True
    if axes is not None and labels.ndim > 2:
        kwargs["metadata"] = {"axes": axes}
    if resolution is not None:
        kwargs.update(_resolution_kwargs(labels, resolution, resolution_unit,
                                         kwargs.get("bigtiff", False), axes))
        if kwargs.get("imagej"):
            kwargs.pop("compression")

    write_atomically(path, lambda tmp_name: tifffile.imwrite(tmp_name, labels, **kwargs), ".tmp.tif")
    return path
