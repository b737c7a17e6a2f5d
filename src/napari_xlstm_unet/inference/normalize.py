"""Bring an image array into the (C, H, W) float32 layout the network reads."""

from __future__ import annotations

import logging

import numpy as np

__all__ = ["to_channels_first", "normalize_percentile", "prepare_image"]

logger = logging.getLogger(__name__)

MAX_CHANNELS = 4


def to_channels_first(
    image: np.ndarray, has_alpha: bool = False, channels_last: bool | None = None
) -> np.ndarray:
    """Return a 2D image as (C, H, W).

    Accepted layouts: (H, W); (H, W, C) and (C, H, W) with C <= 4; and any of
    these with extra leading length-1 axes, as napari projections leave them.
    A 3-axis array is read as channels-last when its last axis has at most 4
    entries and its first more than 4, and as channels-first in the opposite
    case. When both are short it is read as channels-last (the RGB
    convention), unless ``channels_last`` overrides the guess.

    Parameters
    ----------
    image : numpy.ndarray
        The pixels.
    has_alpha : bool
        The last channel is transparency (an RGBA or grey + alpha file or
        layer) and is dropped, because the network segments only what was imaged.
    channels_last : bool, optional
        The layout, when the caller knows it (napari's ``layer.rgb``, a file's
        photometric tag); guessed as above when None.

    Raises
    ------
    ValueError
        For a stack (3 or more axes that are not channels), naming the shape.
    """
    array = np.asarray(image)
    squeezed = array
    while squeezed.ndim > 3 and squeezed.shape[0] == 1:
        squeezed = squeezed[0]
    if squeezed.ndim == 3 and squeezed.shape[0] == 1 and squeezed.shape[-1] > MAX_CHANNELS:
        squeezed = squeezed[0]  # (1, H, W)
    if squeezed.ndim < 2:
        raise ValueError(f"expected a 2D image, got an array of shape {array.shape}")
    if squeezed.ndim == 2:
        return squeezed[np.newaxis]
    if squeezed.ndim > 3:
        raise ValueError(
            f"image of shape {array.shape} has {squeezed.ndim} axes that are not singletons; "
            f"accepted layouts are (H, W), (H, W, C) and (C, H, W) with C <= {MAX_CHANNELS}; "
            "select a single 2D plane first"
        )

    first, last = squeezed.shape[0], squeezed.shape[-1]
    if channels_last is None:
        if last <= MAX_CHANNELS:
            channels_last = True
        elif first <= MAX_CHANNELS:
            channels_last = False
        else:
            raise ValueError(
                f"image of shape {array.shape} looks like a stack of {first} planes, not one 2D "
                f"image; accepted layouts are (H, W), (H, W, C) and (C, H, W) with "
                f"C <= {MAX_CHANNELS}; select a single plane first"
            )
    channels = np.moveaxis(squeezed, -1, 0) if channels_last else squeezed
    if channels.shape[0] > MAX_CHANNELS:
        raise ValueError(
            f"image of shape {array.shape} has {channels.shape[0]} channels; at most "
            f"{MAX_CHANNELS} are accepted"
        )
    if has_alpha and channels.shape[0] in (2, 4):
        channels = channels[:-1]
    return channels


def match_channels(image: np.ndarray, in_channels: int) -> np.ndarray:
    """Adapt a (C, H, W) image to the network's channel count.

    Grey is repeated (1 -> 3), a missing third channel is zero-filled (2 -> 3),
    and several channels are averaged when the network reads one.
    """
    channels = image.shape[0]
    if channels == in_channels:
        return image
    if in_channels == 1:
        return image.mean(axis=0, keepdims=True)
    if channels == 1:
        return np.repeat(image, in_channels, axis=0)
    if channels < in_channels:
        filler = np.zeros((in_channels - channels,) + image.shape[1:], dtype=image.dtype)
        return np.concatenate([image, filler], axis=0)
    return image[:in_channels]


def normalize_percentile(image: np.ndarray, low: float = 1.0, high: float = 99.8) -> np.ndarray:
    """Scale each channel of a (C, H, W) image so its percentiles ``low`` and ``high`` map to 0 and 1.

    Non-finite pixels are ignored when computing the percentiles and set to 0
    afterwards. A channel whose two percentiles are equal (a constant image)
    becomes all zeros, never NaN.
    """
    image = np.asarray(image, dtype=np.float32)
    result = np.zeros_like(image, dtype=np.float32)
    for c in range(image.shape[0]):
        channel = image[c]
        finite = np.isfinite(channel)
        if not finite.any():
            continue
        values = channel[finite] if not finite.all() else channel
        lo, hi = np.percentile(values, [low, high])
        if not hi > lo:
            continue
        scaled = (channel - lo) / (hi - lo)
        result[c] = np.where(finite, scaled, 0.0)
    return result


def prepare_image(
    image: np.ndarray,
    in_channels: int,
    normalization: dict | None = None,
    has_alpha: bool = False,
    channels_last: bool | None = None,
) -> np.ndarray:
    """Return the normalised (in_channels, H, W) float32 array the network reads.

    Parameters
    ----------
    image : numpy.ndarray
        A 2D image in any layout :func:`to_channels_first` accepts, any
        integer or float dtype.
    in_channels : int
        The network's input channel count.
    normalization : dict, optional
        ``{"kind": "percentile", "low": ..., "high": ...}``; defaults to 1 and 99.8.
    has_alpha : bool
        Drop the last channel as alpha; see :func:`to_channels_first`.
    channels_last : bool, optional
        The layout of a 3-axis image when known; see :func:`to_channels_first`.
    """
    normalization = normalization or {}
    kind = normalization.get("kind", "percentile")
    if kind != "percentile":
        raise ValueError(f"unknown normalization kind {kind!r}; expected 'percentile'")
    channels = to_channels_first(image, has_alpha=has_alpha, channels_last=channels_last)
    nonfinite = int(channels.size - np.isfinite(channels.astype(np.float32, copy=False)).sum()) \
        if np.issubdtype(channels.dtype, np.floating) else 0
    if nonfinite:
        logger.warning("image contains %d non-finite pixels (NaN or infinity); they are treated as background", nonfinite)
    normalized = normalize_percentile(
        channels, normalization.get("low", 1.0), normalization.get("high", 99.8)
    )
    return match_channels(normalized, in_channels)
