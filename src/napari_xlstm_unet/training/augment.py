"""Random training patches with nnU-Net-style augmentation.

Every patch is drawn from a random generator seeded by (seed, epoch, index).
A patch therefore depends neither on the process nor on the data-loader
worker, nor on how many epochs ran before a resume. So a resumed or
distributed run trains on the same patches as one uninterrupted run.

Augmentations and their probabilities, close to nnU-Net's 2D defaults:

| step | probability | range |
|---|---|---|
| rotation | 0.2 | -180 to 180 degrees |
| scaling | 0.2 | 0.7 to 1.4 |
| mirroring | 0.5 per axis | |
| Gaussian noise | 0.1 | variance 0 to 0.1 |
| Gaussian blur | 0.2 (each channel 0.5) | sigma 0.5 to 1 pixel |
| brightness (multiplicative) | 0.15 | 0.75 to 1.25 |
| contrast | 0.15 | 0.75 to 1.25, range kept |
| low-resolution simulation | 0.25 (each channel 0.5) | zoom 0.5 to 1 |
| gamma | 0.3 (inverted first with 0.1) | 0.7 to 1.5 |
| colour (off by default) | ``colour_jitter`` | gain 0.8 to 1.2 and offset -0.1 to 0.1 per channel |
| stain (off by default) | ``stain_jitter`` | gain 0.9 to 1.1 and offset -0.02 to 0.02 per H, E, D channel |

A share ``foreground_fraction`` of the patches is centred on a random
foreground pixel (nnU-Net's foreground oversampling).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import ndimage as ndi
from skimage.color import hed_from_rgb, rgb_from_hed
from torch.utils.data import Dataset

from .data import IGNORE_INDEX, Sample

_MIN_RGB = 1e-6  # skimage.color's floor of RGB values; sets the optical-density unit
_DARKEST = 0.01  # darkest RGB value the stain change acts on


def group_weights(groups: list[str]) -> np.ndarray:
    """Return sampling probabilities proportional to 1 / sqrt(size of each sample's group).

    A group of n images then gets a share proportional to sqrt(n): rare
    modalities are drawn more often than their count alone would give, but
    not so often that their few images are memorised.
    """
    _, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    weights = 1.0 / np.sqrt(counts[inverse].astype(float))
    return weights / weights.sum()


class PatchDataset(Dataset):
    """``epoch_length`` augmented patches per epoch from in-memory samples.

    Parameters
    ----------
    samples : list of Sample
        Prepared training images.
    patch_size : int
        Side of the square patches, in pixels.
    epoch_length : int
        Patches per epoch (all processes together).
    seed : int
        Base seed; call :meth:`set_epoch` before each epoch.
    foreground_fraction : float
        Share of patches centred on a foreground pixel.
    weights : numpy.ndarray, optional
        Probability of drawing each sample; uniform when omitted.
    colour_jitter : float
        Probability of the per-channel colour change of :func:`intensity_augment`.
    stain_jitter : float
        Probability of the stain change of :func:`stain_augment`.
    """

    def __init__(self, samples: list[Sample], patch_size: int, epoch_length: int, seed: int,
                 foreground_fraction: float = 0.33, weights: np.ndarray | None = None,
                 colour_jitter: float = 0.0, stain_jitter: float = 0.0) -> None:
        self.samples = samples
        self.patch_size = patch_size
        self.epoch_length = epoch_length
        self.seed = seed
        self.epoch = 0
        self.foreground_fraction = foreground_fraction
        self.weights = weights
        self.colour_jitter = colour_jitter
        self.stain_jitter = stain_jitter
        self.foreground = [
            np.flatnonzero((s.classes > 0) & (s.classes != IGNORE_INDEX)) for s in samples
        ]

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose patches ``__getitem__`` returns."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.epoch_length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        which = int(rng.choice(len(self.samples), p=self.weights))
        image, classes = self._spatial(rng, which)
        if self.stain_jitter > 0 and rng.random() < self.stain_jitter:
            image = stain_augment(rng, image)
        image = intensity_augment(rng, image, self.colour_jitter)
        return torch.from_numpy(image), torch.from_numpy(classes.astype(np.int64))

    def _centre(self, rng: np.random.Generator, which: int) -> tuple[float, float]:
        height, width = self.samples[which].classes.shape
        foreground = self.foreground[which]
        if len(foreground) and rng.random() < self.foreground_fraction:
            cy, cx = divmod(int(rng.choice(foreground)), width)
            return float(cy), float(cx)
        # Uniform over positions that keep an unrotated patch inside the
        # image where it fits; small images are centred and mirrored.
        half = self.patch_size / 2
        cy = rng.uniform(half, height - half) if height > self.patch_size else (height - 1) / 2
        cx = rng.uniform(half, width - half) if width > self.patch_size else (width - 1) / 2
        return float(cy), float(cx)

    def _spatial(self, rng: np.random.Generator, which: int) -> tuple[np.ndarray, np.ndarray]:
        sample = self.samples[which]
        cy, cx = self._centre(rng, which)
        angle = rng.uniform(-math.pi, math.pi) if rng.random() < 0.2 else 0.0
        scale = rng.uniform(0.7, 1.4) if rng.random() < 0.2 else 1.0
        size = self.patch_size
        offsets = np.arange(size, dtype=np.float64) - (size - 1) / 2
        oy, ox = np.meshgrid(offsets, offsets, indexing="ij")
        if angle == 0.0 and scale == 1.0:
            y0 = int(round(cy - (size - 1) / 2))
            x0 = int(round(cx - (size - 1) / 2))
            rows = _mirror_index(np.arange(y0, y0 + size), sample.classes.shape[0])
            cols = _mirror_index(np.arange(x0, x0 + size), sample.classes.shape[1])
            image = sample.image[:, rows][:, :, cols]
            classes = sample.classes[rows][:, cols]
        else:
            # Scale > 1 zooms in: a patch pixel covers 1 / scale source pixels.
            cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
            coords = np.stack([cy + cos * oy - sin * ox, cx + sin * oy + cos * ox])
            image = np.stack([
                ndi.map_coordinates(channel, coords, order=1, mode="mirror") for channel in sample.image
            ])
            classes = ndi.map_coordinates(sample.classes, coords, order=0, mode="mirror")
        for axis in (0, 1):
            if rng.random() < 0.5:
                image = np.flip(image, axis + 1)
                classes = np.flip(classes, axis)
        return np.ascontiguousarray(image, dtype=np.float32), np.ascontiguousarray(classes)


def _mirror_index(index: np.ndarray, length: int) -> np.ndarray:
    # Reflect indices outside [0, length) back inside (period 2 * length - 2).
    if length == 1:
        return np.zeros_like(index)
    period = 2 * length - 2
    index = np.mod(index, period)
    return np.where(index >= length, period - index, index)


def intensity_augment(rng: np.random.Generator, image: np.ndarray, colour_jitter: float = 0.0) -> np.ndarray:
    """Apply the intensity augmentations of the module table to a (C, H, W) patch.

    ``colour_jitter`` is the probability of the colour step; it draws from
    ``rng`` only when above 0, so patches without it match earlier runs.
    """
    image = image.astype(np.float32, copy=True)
    if rng.random() < 0.1:
        variance = rng.uniform(0.0, 0.1)
        image += rng.normal(0.0, math.sqrt(variance), image.shape).astype(np.float32)
    if rng.random() < 0.2:
        for c in range(image.shape[0]):
            if rng.random() < 0.5:
                image[c] = ndi.gaussian_filter(image[c], rng.uniform(0.5, 1.0))
    if rng.random() < 0.15:
        image *= rng.uniform(0.75, 1.25)
    if rng.random() < 0.15:
        factor = rng.uniform(0.75, 1.25)
        for c in range(image.shape[0]):
            low, high, mean = image[c].min(), image[c].max(), image[c].mean()
            image[c] = np.clip((image[c] - mean) * factor + mean, low, high)
    if rng.random() < 0.25:
        for c in range(image.shape[0]):
            if rng.random() < 0.5:
                image[c] = _low_resolution(image[c], rng.uniform(0.5, 1.0))
    if rng.random() < 0.3:
        invert = rng.random() < 0.1
        gamma = rng.uniform(0.7, 1.5)
        for c in range(image.shape[0]):
            channel = -image[c] if invert else image[c]
            low, high = channel.min(), channel.max()
            span = max(float(high - low), 1e-6)
            channel = ((channel - low) / span) ** gamma * span + low
            image[c] = -channel if invert else channel
    if colour_jitter > 0 and image.shape[0] > 1 and rng.random() < colour_jitter:
        # Stains and filter sets differ in colour balance, not in shape: each
        # channel of the (percentile-normalised, about 0 to 1) patch gets its own gain and offset.
        gain = rng.uniform(0.8, 1.2, image.shape[0]).astype(np.float32)
        offset = rng.uniform(-0.1, 0.1, image.shape[0]).astype(np.float32)
        image = image * gain[:, None, None] + offset[:, None, None]
    return image


def stain_augment(rng: np.random.Generator, image: np.ndarray, gain: float = 0.1,
                  offset: float = 0.02) -> np.ndarray:
    """Vary the stain of a colour (3, H, W) patch in haematoxylin-eosin-DAB space.

    The patch is split into haematoxylin, eosin and DAB concentrations with
    skimage's ``hed_from_rgb`` stain matrix (Ruifrok and Johnston 2001). Each
    concentration is scaled by a gain drawn from 1 +- ``gain`` and shifted by
    an offset drawn from +- ``offset``. (In the DSB2018 H&E tiles they span
    about 0 to 0.2.) Then the patch goes back to RGB. Unlike a per-channel
    gain, this mixes the RGB channels, so the per-channel percentile
    normalisation at inference does not undo it. Values outside [0.01, 1]
    pass through unchanged. Patches that are not 3-channel colour (all
    channels equal, as for grey images read as RGB) are returned unchanged
    without drawing from ``rng``.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of the gains and offsets.
    image : numpy.ndarray, shape (C, H, W)
        A percentile-normalised patch, about 0 to 1.
    gain, offset : float
        Half-widths of the uniform ranges of the gain around 1 and the offset around 0.

    Returns
    -------
    numpy.ndarray, shape (C, H, W), float32
    """
    if image.shape[0] != 3 or np.ptp(image, axis=0).max() < 1e-3:
        return image
    # The floor of 0.01 keeps pixels at or below the 1st percentile (0 after
    # normalisation, an optical density of infinity) from taking extreme colours.
    inside = np.clip(image, _DARKEST, 1.0)
    # Optical density per RGB channel, in the units of skimage's rgb2hed
    # (divided by -log(1e-6)). skimage's own functions clip negative
    # concentrations to 0, which loses colour; this round trip is exact.
    density = np.log(np.moveaxis(inside, 0, -1)) / np.log(_MIN_RGB)
    hed = density @ hed_from_rgb
    hed = hed * rng.uniform(1.0 - gain, 1.0 + gain, 3) + rng.uniform(-offset, offset, 3)
    rgb = np.exp((hed @ rgb_from_hed) * np.log(_MIN_RGB))
    return (np.clip(np.moveaxis(rgb, -1, 0), _DARKEST, 1.0) + (image - inside)).astype(np.float32)


def _low_resolution(channel: np.ndarray, zoom: float) -> np.ndarray:
    # Nearest-neighbour down, cubic back up: blocky, slightly blurred detail.
    small = ndi.zoom(channel, zoom, order=0)
    factors = (channel.shape[0] / small.shape[0], channel.shape[1] / small.shape[1])
    restored = ndi.zoom(small, factors, order=3)
    out = np.zeros_like(channel)
    h, w = min(out.shape[0], restored.shape[0]), min(out.shape[1], restored.shape[1])
    out[:h, :w] = restored[:h, :w]
    if h < out.shape[0]:
        out[h:, :w] = restored[h - 1:h, :w]
    if w < out.shape[1]:
        out[:, w:] = out[:, w - 1:w]
    return out
