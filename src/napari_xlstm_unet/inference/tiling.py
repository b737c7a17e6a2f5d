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
    "axis_shares",
    "count_windows",
    "drive",
    "fitted_side",
    "gaussian_axis",
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


def gaussian_axis(n: int, sigma_scale: float = 0.125) -> np.ndarray:
    """Return the 1D blending weight of a window side of ``n`` pixels, peak 1.

    The standard deviation is ``sigma_scale`` times ``n``. Values are clipped
    below at 1e-3 of the peak. The floor has to stay below most of the
    overlap band: with the default 1/8 overlap and ``sigma_scale`` 1/8, a
    window's edge band lies 3 to 4 standard deviations from its centre
    (weights 0.011 to 0.0003). A floor above all of it would average the
    two windows 50/50 there instead of fading one into the other. At 1e-3,
    the outer quarter of the band sits on the floor.
    """
    sigma = max(n * sigma_scale, 1e-6)
    coords = np.arange(n, dtype=np.float64) - (n - 1) / 2
    axis = np.exp(-0.5 * (coords / sigma) ** 2)
    return np.maximum(axis / axis.max(), 1e-3)


def gaussian_weights(height: int, width: int, sigma_scale: float = 0.125) -> np.ndarray:
    """Return a (height, width) float32 blending weight peaking at the window centre.

    It is the outer product of two :func:`gaussian_axis` weights, so its
    minimum is 1e-6 of the peak, in the corners.
    """
    return np.outer(gaussian_axis(height, sigma_scale), gaussian_axis(width, sigma_scale)).astype(np.float32)


def axis_shares(length: int, starts: list[int], side: int) -> list[np.ndarray]:
    """Return each window's 1D weight divided by the sum of all windows' weights along one axis.

    The windows form a grid and the 2D weight of a window is the product of
    its row and column weights, so the sum over all windows at a pixel is the
    product of the two axis sums. The share of window (i, j) at (y, x) is
    therefore ``rows[i][y - y_i] * cols[j][x - x_j]``, and the shares at a
    pixel add up to 1. This replaces a full-size weight-sum image (4 bytes
    per pixel) by two vectors.

    Parameters
    ----------
    length : int
        Image side in pixels.
    starts : list of int
        Window starts along that side, from :func:`tile_starts`.
    side : int
        Window side in pixels.

    Returns
    -------
    list of numpy.ndarray
        One float64 vector of ``side`` values per start.
    """
    weight = gaussian_axis(side) if len(starts) > 1 else np.ones(side)
    total = np.zeros(length)
    for start in starts:
        total[start:start + side] += weight
    return [weight / total[start:start + side] for start in starts]


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
    starts_y = tile_starts(height, tile_h, overlap)
    starts_x = tile_starts(width, tile_w, overlap)
    shares_y = axis_shares(height, starts_y, tile_h)
    shares_x = axis_shares(width, starts_x, tile_w)
    windows = [(i, j) for i in range(len(starts_y)) for j in range(len(starts_x))]

    # The output is the only full-size array: each window adds its
    # probabilities times its share of the blend (see axis_shares), so no
    # weight image and no final division are needed.
    probabilities = np.zeros((num_classes, height, width), dtype=np.float32)
    for index, (i, j) in enumerate(windows):
        y, x = starts_y[i], starts_x[j]
        with torch.inference_mode(), torch.autocast(
            device.type, dtype=torch.bfloat16, enabled=precision == "bfloat16"
        ):
            tile = tile_to_device(image[:, y:y + tile_h, x:x + tile_w], device)
            tile_prob = mirrored_softmax(model, tile, mirror)[0].cpu().numpy()  # (K, tile_h, tile_w)
        tile_prob *= np.outer(shares_y[i], shares_x[j]).astype(np.float32)
        probabilities[:, y:y + tile_h, x:x + tile_w] += tile_prob
        yield index + 1, len(windows)

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
