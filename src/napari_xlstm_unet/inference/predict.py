"""Image in, labels out: normalisation, tiled network, post-processing.

A ``cells`` model gives instance labels (interior seeds grown by watershed);
a ``semantic`` model, such as the endoscopy models, gives class indices
(the most probable class of each pixel).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from ..io import standardize_axes
from ..model.checkpoint import LoadedModel
from .normalize import prepare_image
from .postprocess import probabilities_to_labels
from .tiling import ProgressCallback, count_windows, drive, iter_predict_tiled

__all__ = [
    "Segmentation",
    "class_map",
    "default_device",
    "iter_segment_image",
    "predict_probabilities",
    "segment_image",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")


def default_device() -> torch.device:
    """Return CUDA when available, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@dataclass
class Segmentation:
    """Result of :func:`segment_image`.

    Attributes
    ----------
    labels : numpy.ndarray, shape (H, W) or (*planes, H, W)
        Instance labels for a cell model, 0 for background, each plane of a
        stack numbered on its own from 1. Class indices for a semantic model.
    probabilities : numpy.ndarray, shape (K, H, W) or (*planes, K, H, W)
        Class probabilities, kept so thresholds can change without rerunning the network.
    seconds : float
        Wall time of the whole call.
    axes : str
        tifffile letters of the axes of ``labels``: ``"YX"``, or the stack
        axes first, for example ``"TYX"``.
    """

    labels: np.ndarray
    probabilities: np.ndarray
    seconds: float
    axes: str = "YX"


def predict_probabilities(
    image: np.ndarray,
    loaded: LoadedModel,
    tile_size: int = 512,
    overlap: float = 0.125,
    has_alpha: bool = False,
    progress: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    mirror: bool = False,
) -> np.ndarray:
    """Return class probabilities, shape (K, H, W), for one 2D image."""
    tile_size = window_side(loaded, tile_size)
    prepared = prepare_image(image, loaded.config.in_channels, loaded.normalization, has_alpha)
    device = next(loaded.model.parameters()).device
    steps = iter_predict_tiled(
        loaded.model, prepared, loaded.config.num_classes, tile_size, overlap, device, mirror=mirror
    )
    return drive(steps, progress, should_stop)


def window_side(loaded: LoadedModel, tile_size: int) -> int:
    """Return the sliding-window side to use for ``loaded``, given the requested ``tile_size``.

    Channel-token ViL layers accept inputs up to ``config.patch_size`` only,
    so larger windows shrink to its shorter side. Windows smaller than the
    training patches (from the model card) log a warning, because the network
    then gets less context than in training and splits or invents objects.
    """
    config = loaded.config
    if config.channel_token_grids and tile_size > min(config.patch_size):
        logger.info("tile size %d is larger than the %s patch this network was built for; using %d",
                    tile_size, "x".join(map(str, config.patch_size)), min(config.patch_size))
        tile_size = min(config.patch_size)
    train = loaded.model_card.get("config", {}).get("train", {}) if loaded.model_card else {}
    patch = train.get("patch_size")
    if isinstance(patch, int) and tile_size < patch:
        logger.warning("tile size %d is smaller than the %d-pixel patches this model was trained on; "
                       "results may get worse. Use a tile size of at least %d", tile_size, patch, patch)
    return tile_size


def _offset_progress(
    steps: Generator[tuple[int, int], None, T], offset: int, total: int
) -> Generator[tuple[int, int], None, T]:
    """Re-yield a plane's ``(done, plane_total)`` as progress through the whole stack."""
    while True:
        try:
            done, _ = next(steps)
        except StopIteration as stop:
            return stop.value
        yield offset + done, total


def _iter_segment_plane(
    channels: np.ndarray,
    loaded: LoadedModel,
    params: dict,
    tile_size: int,
    overlap: float,
    has_alpha: bool,
    precision: str,
    name: str,
    mirror: bool = False,
) -> Generator[tuple[int, int], None, tuple[np.ndarray, np.ndarray]]:
    """Segment one (C, H, W) plane, yielding ``(done, total)`` per window."""
    prepared = prepare_image(
        channels, loaded.config.in_channels, loaded.normalization, has_alpha, axes="CYX", name=name
    )
    if not prepared.any():
        # Normalisation maps constant (or all non-finite) images to zeros. They
        # hold nothing to segment, and the network invents edge objects there.
        logger.warning("image %s has no contrast; returning empty labels", name)
        windows = count_windows(prepared.shape[1], prepared.shape[2], tile_size, overlap)
        yield windows, windows
        probabilities = np.zeros((loaded.config.num_classes,) + prepared.shape[1:], np.float32)
        probabilities[0] = 1.0
        return np.zeros(prepared.shape[1:], np.uint16 if loaded.task == "cells" else np.uint8), probabilities

    device = next(loaded.model.parameters()).device
    full_size = prepared.shape[1:]
    if loaded.input_scale != 1.0:
        prepared = zoom_channels(prepared, loaded.input_scale)
    probabilities = yield from iter_predict_tiled(
        loaded.model, prepared, loaded.config.num_classes, tile_size, overlap, device, precision,
        mirror,
    )
    if probabilities.shape[1:] != full_size:
        probabilities = resize_channels(probabilities, full_size)
    if loaded.task == "semantic":
        return class_map(probabilities), probabilities
    labels = probabilities_to_labels(
        probabilities, prob_threshold=params["prob_threshold"], min_size=params["min_size"],
        split_depth=params.get("split_depth", 0.0),
    )
    return labels, probabilities


def zoom_channels(image: np.ndarray, scale: float) -> np.ndarray:
    """Return a (C, H, W) float32 image zoomed by ``scale`` (bilinear, antialiased when shrinking)."""
    height, width = image.shape[1:]
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    return resize_channels(image, size)


def resize_channels(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Return a (C, H, W) float32 image resized to ``size`` (bilinear, antialiased when shrinking)."""
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
    shrink = size[0] < image.shape[1] or size[1] < image.shape[2]
    resized = torch.nn.functional.interpolate(tensor, size=size, mode="bilinear", align_corners=False,
                                              antialias=shrink)
    return resized[0].numpy()


def class_map(probabilities: np.ndarray) -> np.ndarray:
    """Return the most probable class per pixel of (K, H, W) probabilities, as uint8 (uint16 past 255 classes)."""
    dtype = np.uint8 if probabilities.shape[0] <= 256 else np.uint16
    return probabilities.argmax(axis=0).astype(dtype)


def iter_segment_image(
    image: np.ndarray,
    loaded: LoadedModel,
    prob_threshold: float | None = None,
    min_size: int | None = None,
    tile_size: int = 512,
    overlap: float = 0.125,
    has_alpha: bool = False,
    channels_last: bool | None = None,
    precision: str = "float32",
    axes: str | None = None,
    name: str | None = None,
    mirror: bool = False,
    split_depth: float | None = None,
) -> Generator[tuple[int, int], None, Segmentation]:
    """Generator form of :func:`segment_image`: yields ``(done, total)`` per window.

    Its return value is the :class:`Segmentation`. napari's ``thread_worker``
    runs it directly, which gives progress and cancel between windows. For a
    stack, ``done`` and ``total`` count the windows of all planes.
    """
    if loaded.task not in ("cells", "semantic"):
        raise ValueError(
            f"model {loaded.source or '(in memory)'} has the unknown task {loaded.task!r}; "
            "expected 'cells' or 'semantic'. Retrain it with training/train.py"
        )
    start = time.perf_counter()
    name = name or f"of shape {np.shape(image)}"
    planes, plane_axes = standardize_axes(image, axes, channels_last)
    plane_shape = planes.shape[:-3]
    flat = planes.reshape((-1,) + planes.shape[-3:])
    tile_size = window_side(loaded, tile_size)
    params = dict(loaded.postprocess)
    if prob_threshold is not None:
        params["prob_threshold"] = prob_threshold
    if min_size is not None:
        params["min_size"] = min_size
    if split_depth is not None:
        params["split_depth"] = split_depth

    n_planes = flat.shape[0]
    if n_planes > 1:
        logger.info("image %s is a stack of %d planes (axes %s); segmenting each plane on its own",
                    name, n_planes, plane_axes)
    windows = count_windows(flat.shape[2], flat.shape[3], tile_size, overlap)
    all_labels, all_probabilities = [], []
    for index in range(n_planes):
        plane_name = name if n_planes == 1 else f"{name}, plane {index + 1} of {n_planes}"
        steps = _iter_segment_plane(
            flat[index], loaded, params, tile_size, overlap, has_alpha, precision, plane_name, mirror
        )
        labels, probabilities = yield from _offset_progress(steps, index * windows, n_planes * windows)
        all_labels.append(labels)
        all_probabilities.append(probabilities)

    if n_planes == 1:
        labels, probabilities = all_labels[0], all_probabilities[0]
    else:
        dtype = max((plane.dtype for plane in all_labels), key=lambda dtype: dtype.itemsize)
        labels = np.stack(all_labels).astype(dtype, copy=False).reshape(plane_shape + flat.shape[2:])
        probabilities = np.stack(all_probabilities).reshape(
            plane_shape + all_probabilities[0].shape
        )
    seconds = time.perf_counter() - start
    if loaded.task == "semantic":
        logger.info("segmented image %s: %.1f %% of pixels in foreground classes, %.2f s",
                    name, 100 * np.count_nonzero(labels) / max(labels.size, 1), seconds)
    elif n_planes == 1:
        logger.info("segmented image %s: %d objects in %.2f s", name, labels.max(), seconds)
    else:
        logger.info("segmented image %s: %d planes, up to %d objects per plane in %.2f s",
                    name, n_planes, labels.max(), seconds)
    return Segmentation(labels=labels, probabilities=probabilities, seconds=seconds,
                        axes=plane_axes + "YX")


def segment_image(
    image: np.ndarray,
    loaded: LoadedModel,
    prob_threshold: float | None = None,
    min_size: int | None = None,
    tile_size: int = 512,
    overlap: float = 0.125,
    has_alpha: bool = False,
    channels_last: bool | None = None,
    progress: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    precision: str = "float32",
    axes: str | None = None,
    name: str | None = None,
    mirror: bool = False,
    split_depth: float | None = None,
) -> Segmentation:
    """Segment one 2D image, or each plane of a stack: cells into instances, other tasks into classes.

    Parameters
    ----------
    image : numpy.ndarray
        (H, W), (H, W, C) or (C, H, W) with C <= 4, any integer or float
        dtype; or a stack of those, such as (T, H, W). Which axis is which
        comes from ``axes``, else from the shape; see
        :func:`~napari_xlstm_unet.io.standardize_axes`.
    loaded : LoadedModel
        A model from :func:`~napari_xlstm_unet.pretrained.load_model` or
        :func:`~napari_xlstm_unet.model.checkpoint.load_checkpoint`.
    prob_threshold, min_size : optional
        Cell post-processing parameters; the checkpoint's tuned values by
        default. Semantic models ignore them.
    tile_size, overlap : optional
        Sliding-window settings; see :func:`~napari_xlstm_unet.inference.tiling.predict_tiled`.
    has_alpha : bool
        The last channel is transparency and is dropped.
    channels_last : bool, optional
        The layout of a 3-axis image without ``axes`` when known; guessed when None.
    progress, should_stop : callable, optional
        Progress report ``progress(done, total)`` and cancellation check; a
        cancel raises :class:`~napari_xlstm_unet.inference.tiling.Cancelled`.
    precision : {"float32", "bfloat16"}
        Arithmetic of the convolutions; bfloat16 is faster on CPUs with native
        support and gave the same validation F1 to 3 decimals. Apple MPS
        always runs in float32; see
        :func:`~napari_xlstm_unet.inference.tiling.select_precision`.
    axes : str, optional
        One tifffile letter per axis of ``image``, as
        :attr:`~napari_xlstm_unet.io.ImageFile.axes` gives: ``"CYX"`` and
        ``"YXS"`` are channels, ``"TYX"`` and ``"ZYX"`` are stacks.
    name : str, optional
        The file or layer the image came from, named in warnings and logs.
    mirror : bool
        Test-time mirroring: average the network over the 4 mirror images of
        each window, at 4 network passes per window. For the shipped cell
        model it raised the mean F1 on the DSB2018 validation split by
        0.002 only, within noise (docs/models.md gives the figures).
    split_depth : float, optional
        Cell post-processing: split seeds holding several nuclei; see
        :func:`~napari_xlstm_unet.inference.postprocess.split_seeds`. The
        checkpoint's value by default, 0 (no splitting) for checkpoints
        that predate it.

    Returns
    -------
    Segmentation
        Labels (H, W), probabilities (K, H, W) and timing; a stack gives
        labels (*planes, H, W), each plane normalised and segmented exactly
        as it would be alone.
    """
    steps = iter_segment_image(
        image, loaded, prob_threshold, min_size, tile_size, overlap, has_alpha, channels_last,
        precision, axes, name, mirror, split_depth,
    )
    return drive(steps, progress, should_stop)
