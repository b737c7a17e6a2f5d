"""Sliding-window prediction with overlap and Gaussian blending, in bounded memory."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Generator
from typing import TypeVar

import numpy as np
import torch

__all__ = [
    "Cancelled",
    "count_windows",
    "drive",
    "fitted_side",
    "gaussian_weights",
    "iter_predict_tiled",
    "mirrored_softmax",
    "predict_tiled",
    "select_precision",
    "tile_starts",
    "tile_to_device",
]

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]
T = TypeVar("T")

# bfloat16 runs the convolutions under autocast (the ViL block stays in
# float32). On CPUs with native bfloat16 it is about 1.8 times faster; on
# others it can be slower, so float32 is the default.
PRECISIONS = ("float32", "bfloat16")


class Cancelled(Exception):
    """Raised inside a prediction when the caller asked it to stop."""


def tile_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Return window starts covering ``[0, length)`` with windows of ``tile`` pixels.

    Consecutive windows overlap by at least ``overlap * tile`` pixels; the last
    window ends exactly at ``length``. A side shorter than ``tile`` gets one
    window at 0.
    """
    if length <= tile:
        return [0]
    step = max(1, int(tile * (1.0 - overlap)))
    starts = list(range(0, length - tile, step))
    starts.append(length - tile)
    return starts


def fitted_side(length: int, tile: int, overlap: float, multiple: int = 1) -> int:
    """Return the smallest window side that covers ``length`` with as many windows as ``tile`` does.

    With fixed windows an image a little larger than ``tile`` pays for two
    nearly full windows: a 600-pixel side needs two 512-pixel windows, 1,024
    pixels of work for 600. Shrinking the windows to 320 pixels keeps the
    count and the overlap fraction and does 640. The fitted side is never
    below ``tile / (2 - overlap)``: fewer windows of ``tile`` would cover the
    side otherwise.

    Parameters
    ----------
    length : int
        Image side in pixels.
    tile : int
        Largest window side in pixels.
    overlap : float
        Fraction of a window shared with its neighbour.
    multiple : int
        The side is rounded up to a multiple of this (the network's total
        stride, to which it pads its input), unless that exceeds ``tile``.

    Returns
    -------
    int
        ``length`` when it fits in one window, else a side in ``(tile / 2, tile]``.
    """
    if length <= tile:
        return length
    count = len(tile_starts(length, tile, overlap))
    side = math.ceil(length / (count - (count - 1) * overlap))
    side = -(-side // multiple) * multiple
    # tile_starts truncates the step to whole pixels, which can cost a window.
    while side < tile and len(tile_starts(length, side, overlap)) > count:
        side += multiple
    return min(side, tile)


def count_windows(height: int, width: int, tile: int, overlap: float) -> int:
    """Return how many windows :func:`iter_predict_tiled` runs on a (height, width) image.

    Parameters
    ----------
    height, width : int
        Image size in pixels.
    tile : int
        Window side in pixels.
    overlap : float
        Fraction of a window shared with its neighbour.
    """
    return len(tile_starts(height, tile, overlap)) * len(tile_starts(width, tile, overlap))


def select_precision(device: torch.device | str, precision: str) -> str:
    """Return the precision to run on ``device``: ``precision``, or float32 without bfloat16 support.

    Apple's MPS backend rejects float64 tensors, and bfloat16 works there only
    on recent macOS versions, so MPS always runs in float32. A CUDA GPU for
    which ``torch.cuda.is_bf16_supported()`` is False also falls back to
    float32. Only a CUDA device is asked about CUDA, so a CPU run makes no
    CUDA call.

    Parameters
    ----------
    device : torch.device or str
        Where the network runs.
    precision : {"float32", "bfloat16"}
        The requested arithmetic of the convolutions.

    Returns
    -------
    str
        ``"float32"`` or ``"bfloat16"``.

    Raises
    ------
    ValueError
        If ``precision`` is not one of ``PRECISIONS``.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    device = torch.device(device)
    if precision != "bfloat16":
        return precision
    if device.type == "mps":
        # NOTE: no MPS run has been tested; the rule follows PyTorch's MPS dtype limits.
        logger.warning("bfloat16 is not used on Apple MPS; running in float32")
        return "float32"
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        logger.warning("this CUDA GPU does not support bfloat16; running in float32")
        return "float32"
    return precision


def tile_to_device(tile: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """Return a (1, C, h, w) float32 tensor of a (C, h, w) window on ``device``.

    The cast to float32 happens on the CPU, before the transfer, because MPS
    has no float64 and a float64 tensor would double the transfer size.

    Parameters
    ----------
    tile : numpy.ndarray, shape (C, h, w)
        One window of the normalised image, any float dtype.
    device : torch.device or str
        Where the network runs.
    """
    array = np.ascontiguousarray(tile, dtype=np.float32)
    return torch.from_numpy(array).unsqueeze(0).to(device)


def gaussian_weights(height: int, width: int, sigma_scale: float = 0.125) -> np.ndarray:
    """Return a (height, width) blending weight peaking at the window centre.

    The standard deviation is ``sigma_scale`` times each side. Weights are
    clipped below at 1e-3 of the peak, so borders still count where only one
    window covers a pixel.
    """
    def axis(n: int) -> np.ndarray:
        sigma = max(n * sigma_scale, 1e-6)
        coords = np.arange(n, dtype=np.float32) - (n - 1) / 2
        return np.exp(-0.5 * (coords / sigma) ** 2)

    weights = np.outer(axis(height), axis(width))
    weights /= weights.max()
    return np.maximum(weights, 1e-3).astype(np.float32)


# Axis sets of the four mirror images of a (1, C, h, w) window: as is,
# upside down, left-right, and both.
MIRROR_AXES = ((), (2,), (3,), (2, 3))


def mirrored_softmax(model: torch.nn.Module, tile: torch.Tensor, mirror: bool) -> torch.Tensor:
    """Return softmax probabilities (1, K, h, w) for one window, averaged over mirror images.

    With ``mirror``, the window and its three mirror images run as one batch
    of 4, and each output is mirrored back before the mean. This is nnU-Net's
    test-time mirroring. It runs the network on 4 times the pixels.
    """
    if not mirror:
        return torch.softmax(model(tile).float(), dim=1)
    batch = torch.cat([tile.flip(axes) if axes else tile for axes in MIRROR_AXES])
    probabilities = torch.softmax(model(batch).float(), dim=1)
    restored = [
        probabilities[i:i + 1].flip(axes) if axes else probabilities[i:i + 1]
        for i, axes in enumerate(MIRROR_AXES)
    ]
    return torch.cat(restored).mean(dim=0, keepdim=True)


def iter_predict_tiled(
    model: torch.nn.Module,
    image: np.ndarray,
    num_classes: int,
    tile_size: int = 512,
    overlap: float = 0.125,
    device: torch.device | str = "cpu",
    precision: str = "float32",
    mirror: bool = False,
    fit_windows: bool = True,
    multiple: int | None = None,
) -> Generator[tuple[int, int], None, np.ndarray]:
    """Predict window by window, yielding ``(done, total)`` after each window.

    The generator's return value (``StopIteration.value``) is the blended
    probability map; see :func:`predict_tiled` for the parameters. Stopping
    the iteration early (a cancel) leaves nothing behind.
    """
    if not 0.0 <= overlap <= 0.9:
        raise ValueError(f"overlap must be a fraction in [0, 0.9], got {overlap}")
    if tile_size < 16:
        raise ValueError(f"tile_size must be at least 16 pixels, got {tile_size}")
    device = torch.device(device)
    precision = select_precision(device, precision)
    _, height, width = image.shape
    if multiple is None:
        config = getattr(model, "config", None)
        multiple = getattr(config, "total_stride", 1)
    if fit_windows:
        tile_h, tile_w = (fitted_side(side, tile_size, overlap, multiple) for side in (height, width))
    else:
        tile_h, tile_w = min(tile_size, height), min(tile_size, width)
    windows = [
        (y, x)
        for y in tile_starts(height, tile_h, overlap)
        for x in tile_starts(width, tile_w, overlap)
    ]
    if len(windows) > 1:
        weights = gaussian_weights(tile_h, tile_w)
    else:
        weights = np.ones((tile_h, tile_w), np.float32)

    # NOTE: these full-size accumulators make peak memory grow with the image
    # (16 bytes per pixel for 3 classes); a memory-mapped file would keep it flat.
    probabilities = np.zeros((num_classes, height, width), dtype=np.float32)
    weight_sum = np.zeros((height, width), dtype=np.float32)
    for index, (y, x) in enumerate(windows):
        with torch.inference_mode(), torch.autocast(
            device.type, dtype=torch.bfloat16, enabled=precision == "bfloat16"
        ):
            tile = tile_to_device(image[:, y:y + tile_h, x:x + tile_w], device)
            tile_prob = mirrored_softmax(model, tile, mirror)[0].cpu().numpy()  # (K, tile_h, tile_w)
        probabilities[:, y:y + tile_h, x:x + tile_w] += tile_prob * weights
        weight_sum[y:y + tile_h, x:x + tile_w] += weights
        yield index + 1, len(windows)

    probabilities /= weight_sum
    return probabilities


def drive(
    steps: Generator[tuple[int, int], None, T],
    progress: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> T:
    """Run a progress generator to its end and return its value.

    ``progress(done, total)`` is called after each step; when ``should_stop()``
    returns True between steps, :class:`Cancelled` is raised.
    """
    while True:
        if should_stop is not None and should_stop():
            steps.close()
            raise Cancelled("cancelled by the caller")
        try:
            done, total = next(steps)
        except StopIteration as stop:
            return stop.value
        if progress is not None:
            progress(done, total)


def predict_tiled(
    model: torch.nn.Module,
    image: np.ndarray,
    num_classes: int,
    tile_size: int = 512,
    overlap: float = 0.125,
    device: torch.device | str = "cpu",
    progress: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    precision: str = "float32",
    mirror: bool = False,
    fit_windows: bool = True,
    multiple: int | None = None,
) -> np.ndarray:
    """Predict class probabilities for a whole image, window by window.

    Parameters
    ----------
    model : torch.nn.Module
        Network in eval mode returning logits of shape (1, num_classes, h, w).
    image : numpy.ndarray, shape (C, H, W)
        Normalised input; windows are cast to float32 before they move to
        ``device``.
    num_classes : int
        Output channels of the network.
    tile_size : int
        Window side in pixels. Images no larger than this run in one pass.
    overlap : float
        Fraction of a window shared with its neighbour, in [0, 0.9].
    device : torch.device or str
        Where the network runs.
    progress : callable, optional
        Called as ``progress(done, total)`` after each window.
    should_stop : callable, optional
        Checked before each window; when it returns True, :class:`Cancelled`
        is raised and nothing is returned.
    precision : {"float32", "bfloat16"}
        Arithmetic of the convolutions; see ``PRECISIONS``.
    mirror : bool
        Average each window over its 4 mirror images (test-time mirroring,
        4 network passes); see :func:`mirrored_softmax`.
    fit_windows : bool
        Shrink the windows along each side to the smallest size that keeps
        the number of windows (:func:`fitted_side`). False runs every window
        at ``tile_size``, capped at the image side.
    multiple : int, optional
        Round fitted window sides up to a multiple of this. None takes the
        network's total stride (``model.config.total_stride``), or 1 for a
        model without a config.

    Returns
    -------
    numpy.ndarray, shape (num_classes, H, W), float32
        Softmax probabilities, blended where windows overlap.
    """
    steps = iter_predict_tiled(model, image, num_classes, tile_size, overlap, device, precision,
                               mirror, fit_windows, multiple)
    return drive(steps, progress, should_stop)
