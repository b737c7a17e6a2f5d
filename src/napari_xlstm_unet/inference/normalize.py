"""Bring an image array into the (C, H, W) float32 layout the network reads."""

from __future__ import annotations

import logging

import numpy as np

from ..io import ACCEPTED_LAYOUTS, MAX_CHANNELS, standardize_axes

__all__ = ["to_channels_first", "normalize_percentile", "prepare_image"]

logger = logging.getLogger(__name__)

def to_channels_first(
    image: np.ndarray,
    has_alpha: bool = False,
    channels_last: bool | None = None,
    axes: str | None = None,
) -> np.ndarray:
    """Return a 2D image as (C, H, W).

    Accepted layouts: (H, W); (H, W, C) and (C, H, W) with C <= 4; and any of
    these with extra length-1 axes, as napari projections leave them.
    :func:`~napari_xlstm_unet.io.standardize_axes` decides which axis is
    which: from ``axes`` when given, else from the shape (a 3-axis array is
    channels-last when its last axis has at most 4 entries, else
    channels-first when its first has at most 4).

    Parameters
    ----------
    image : numpy.ndarray
        The pixels.
    has_alpha : bool
        The last channel is transparency (an RGBA or grey + alpha file or
        layer) and is dropped, because the network segments only what was imaged.
    channels_last : bool, optional
        The layout, when the caller knows it (napari's ``layer.rgb``); used
        only without ``axes``.
    axes : str, optional
        One tifffile letter per axis, as :attr:`~napari_xlstm_unet.io.ImageFile.axes`.

    Raises
    ------
    ValueError
        For a stack (a time or z axis, or 3 or more axes that are not
        channels), or more than 4 channels, naming the shape and axes.
    """
    array = np.asarray(image)
    planes, plane_axes = standardize_axes(array, axes, channels_last)
    described = f"{array.shape}" + (f" with axes {axes}" if axes else "")
    if planes.ndim > 3:
        raise ValueError(
            f"image of shape {described} is a stack of {int(np.prod(planes.shape[:-3]))} planes "
            f"(stack axes {plane_axes}), not one 2D image; {ACCEPTED_LAYOUTS}. segment_image "
            "segments a stack plane by plane; to_channels_first takes one plane."
        )
    channels = planes
    if channels.shape[0] > MAX_CHANNELS:
        raise ValueError(
            f"image of shape {described} has {channels.shape[0]} channels; at most "
            f"{MAX_CHANNELS} are accepted; select or merge channels first"
        )
    if has_alpha and channels.shape[0] in (2, 4):
        channels = channels[:-1]
    return channels


def match_channels(image: np.ndarray, in_channels: int) -> np.ndarray:
    """Adapt a (C, H, W) image to the network's channel count.

    Grey is repeated (1 -> 3) as a read-only view that stores the pixels
    once, a missing third channel is zero-filled (2 -> 3), and several
    channels are averaged when the network reads one.
    """
    channels = image.shape[0]
    if channels == in_channels:
        return image
    if in_channels == 1:
        return image.mean(axis=0, keepdims=True)
    if channels == 1:
        return np.broadcast_to(image, (in_channels,) + image.shape[1:])
    if channels < in_channels:
        filler = np.zeros((in_channels - channels,) + image.shape[1:], dtype=image.dtype)
        return np.concatenate([image, filler], axis=0)
    return image[:in_channels]


# Band height of normalize_percentile, in rows. Its float64 temporaries cover
# one band, so they grow with the image width only.
NORMALIZE_ROWS = 256


def normalize_percentile(image: np.ndarray, low: float = 1.0, high: float = 99.8) -> np.ndarray:
    """Scale each channel of a (C, H, W) image so its percentiles ``low`` and ``high`` map to 0 and 1.

    Non-finite pixels are ignored when computing the percentiles and set to 0
    afterwards. A channel whose two percentiles are equal (a constant image)
    becomes all zeros, never NaN. Channels are converted to float32 one at a
    time and scaled in bands of rows. Besides the float32 result, the
    full-size arrays are those of one channel: its float32 copy, its finite
    mask (1 byte per pixel) and the partitioned copy ``numpy.percentile``
    makes.
    """
    image = np.asarray(image)
    result = np.zeros(image.shape, dtype=np.float32)
    for c in range(image.shape[0]):
        channel = image[c].astype(np.float32, copy=False)
        finite = np.isfinite(channel)
        if not finite.any():
            continue
        values = channel[finite] if not finite.all() else channel
        lo, hi = np.percentile(values, [low, high])
        del values
        if not hi > lo:
            continue
        for row in range(0, channel.shape[0], NORMALIZE_ROWS):
            rows = slice(row, row + NORMALIZE_ROWS)
            result[c, rows] = np.where(finite[rows], (channel[rows] - lo) / (hi - lo), 0.0)
    return result


def prepare_image(
    image: np.ndarray,
    in_channels: int,
    normalization: dict | None = None,
    has_alpha: bool = False,
    channels_last: bool | None = None,
    axes: str | None = None,
    name: str | None = None,
) -> np.ndarray:
    """Return the normalised (in_channels, H, W) float32 array the network reads.

    Every dtype takes the same path: the pixels become float32 first, then
    percentiles map them to about [0, 1]. No integer cast happens before
    scaling, and no value range is assumed, so float images in [0, 1], in
    [-200, 3000] or around 1e-5 give the same result as 8- or 16-bit ones.

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
    axes : str, optional
        One tifffile letter per axis; see :func:`to_channels_first`.
    name : str, optional
        The file or layer the image came from, named in warnings.

    Returns
    -------
    numpy.ndarray, shape (in_channels, H, W), float32
        Finite values; non-finite pixels become 0 with a warning. A grey
        image read by a multi-channel network comes back as a read-only
        view of one channel (see :func:`match_channels`); copy it before
        writing to it.
    """
    normalization = normalization or {}
    kind = normalization.get("kind", "percentile")
    if kind != "percentile":
        raise ValueError(f"unknown normalization kind {kind!r}; expected 'percentile'")
    channels = to_channels_first(image, has_alpha=has_alpha, channels_last=channels_last, axes=axes)
    if np.iscomplexobj(channels):
        raise ValueError(
            f"image {name or f'of shape {np.shape(image)}'} has complex values ({channels.dtype}); "
            "expected real intensities. Take the magnitude (numpy.abs) or the real part first"
        )
    # A pixel counts once, however many of its channels are non-finite.
    nonfinite = int(np.count_nonzero(~np.isfinite(channels).all(axis=0))) \
        if np.issubdtype(channels.dtype, np.floating) else 0
    if nonfinite:
        logger.warning(
            "image %s contains %d non-finite pixels (NaN or infinity); they are treated as background",
            name or f"of shape {np.shape(image)}", nonfinite,
        )
    normalized = normalize_percentile(
        channels, normalization.get("low", 1.0), normalization.get("high", 99.8)
    )
    return match_channels(normalized, in_channels)
