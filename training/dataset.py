"""Image/mask pairs, random patches and augmentation for cell training."""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

from napari_xlstm_unet.inference.normalize import prepare_image
from targets import check_instance_mask, instances_to_classes

logger = logging.getLogger(__name__)


@dataclass
class Sample:
    """One training image: normalised (C, H, W) float32 and its class map (H, W)."""

    name: str
    image: np.ndarray
    classes: np.ndarray
    instances: np.ndarray


def read_split(split_csv: Path, data_root: Path) -> dict[str, list[tuple[Path, Path, str]]]:
    """Return (image, mask, group) triples per split from a CSV.

    The CSV has the columns dataset, name and split, and optionally modality,
    which becomes the group used for balanced sampling ("all" without it).
    """
    pairs: dict[str, list[tuple[Path, Path, str]]] = {}
    with open(split_csv, newline="") as handle:
        for row in csv.DictReader(handle):
            folder = data_root / row["dataset"]
            image = folder / "images" / f"{row['name']}.tif"
            mask = folder / "masks" / f"{row['name']}.tif"
            for path in (image, mask):
                if not path.is_file():
                    raise FileNotFoundError(
                        f"{path} listed in {split_csv} not found; check --data-root"
                    )
            group = row.get("modality") or "all"
            pairs.setdefault(row["split"], []).append((image, mask, group))
    return pairs


def load_sample(image_path: Path, mask_path: Path, in_channels: int, normalization: dict) -> Sample:
    """Read, check and prepare one pair."""
    raw = tifffile.imread(image_path)
    labels = tifffile.imread(mask_path)
    check_instance_mask(labels, mask_path)
    if labels.shape != raw.shape[:2] and labels.shape != raw.shape[-2:]:
        raise ValueError(
            f"mask {mask_path} has shape {labels.shape} but image {image_path} has {raw.shape}; "
            "they must share height and width"
        )
    if len(np.unique(labels)) == 2 and labels.max() in (1, 255):
        labels = ndi.label(labels > 0)[0]
    image = prepare_image(raw, in_channels, normalization)
    return Sample(image_path.stem, image, instances_to_classes(labels), labels.astype(np.int32))


class PatchSampler:
    """Draw augmented random patches from in-memory samples.

    Augmentation: scaling (0.7-1.4, p 0.2), mirroring and 90-degree rotations,
    multiplicative brightness (0.75-1.25, p 0.15), contrast (p 0.15), gamma
    (0.7-1.5, p 0.3) and Gaussian noise (p 0.1), roughly nnU-Net's defaults.
    A third of the patches are centred on a foreground pixel.
    """

    def __init__(
        self,
        samples: list[Sample],
        patch_size: int,
        seed: int,
        foreground_fraction: float = 0.33,
        groups: list[str] | None = None,
    ):
        self.samples = samples
        self.patch_size = patch_size
        self.rng = np.random.default_rng(seed)
        self.foreground_fraction = foreground_fraction
        self.foreground = [np.flatnonzero(s.classes > 0) for s in samples]
        self.weights = group_weights(groups) if groups else None

    def _crop(self, index: int, size: int) -> tuple[np.ndarray, np.ndarray]:
        sample = self.samples[index]
        _, height, width = sample.image.shape
        pad_h, pad_w = max(0, size - height), max(0, size - width)
        image, classes = sample.image, sample.classes
        if pad_h or pad_w:
            image = np.pad(image, ((0, 0), (0, pad_h), (0, pad_w)), mode="reflect" if pad_h < height and pad_w < width else "edge")
            classes = np.pad(classes, ((0, pad_h), (0, pad_w)), mode="reflect" if pad_h < height and pad_w < width else "edge")
        height, width = classes.shape
        foreground = self.foreground[index]
        if len(foreground) and self.rng.random() < self.foreground_fraction:
            flat = int(self.rng.choice(foreground))
            cy, cx = divmod(flat, sample.classes.shape[1])
            y = int(np.clip(cy - size // 2, 0, height - size))
            x = int(np.clip(cx - size // 2, 0, width - size))
        else:
            y = int(self.rng.integers(0, height - size + 1))
            x = int(self.rng.integers(0, width - size + 1))
        return image[:, y:y + size, x:x + size], classes[y:y + size, x:x + size]

    def _intensity(self, image: np.ndarray) -> np.ndarray:
        rng = self.rng
        if rng.random() < 0.15:
            image = image * rng.uniform(0.75, 1.25)
        if rng.random() < 0.15:
            mean = image.mean()
            image = (image - mean) * rng.uniform(0.75, 1.25) + mean
        if rng.random() < 0.3:
            low, high = image.min(), image.max()
            span = max(high - low, 1e-6)
            image = ((image - low) / span) ** rng.uniform(0.7, 1.5) * span + low
        if rng.random() < 0.1:
            image = image + rng.normal(0, rng.uniform(0, 0.1), image.shape).astype(np.float32)
        return image.astype(np.float32)

    def patch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return one (C, P, P) float32 image patch and its (P, P) int64 class patch."""
        index = int(self.rng.choice(len(self.samples), p=self.weights))
        scale = self.rng.uniform(0.7, 1.4) if self.rng.random() < 0.2 else 1.0
        size = max(8, int(round(self.patch_size / scale)))
        image, classes = self._crop(index, size)
        image_t = torch.from_numpy(np.ascontiguousarray(image))
        classes_t = torch.from_numpy(np.ascontiguousarray(classes)).long()
        if size != self.patch_size:
            image_t = F.interpolate(image_t[None], size=self.patch_size, mode="bilinear", align_corners=False)[0]
            classes_t = F.interpolate(classes_t[None, None].float(), size=self.patch_size, mode="nearest")[0, 0].long()

        k = int(self.rng.integers(4))
        image_t, classes_t = torch.rot90(image_t, k, (1, 2)), torch.rot90(classes_t, k, (0, 1))
        if self.rng.random() < 0.5:
            image_t, classes_t = image_t.flip(2), classes_t.flip(1)
        image_t = torch.from_numpy(self._intensity(image_t.numpy()))
        return image_t.contiguous(), classes_t.contiguous()

    def batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return a batch: images (B, C, P, P) and classes (B, P, P)."""
        pairs = [self.patch() for _ in range(batch_size)]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def group_weights(groups: list[str]) -> np.ndarray:
    """Return sampling probabilities proportional to 1 / sqrt(size of each sample's group).

    A group of n images then gets a share proportional to sqrt(n), so rare
    modalities are drawn more often than their count alone would give, but
    not so often that their few images are memorised.
    """
    names, inverse, counts = np.unique(groups, return_inverse=True, return_counts=True)
    weights = 1.0 / np.sqrt(counts[inverse].astype(float))
    return weights / weights.sum()


def deep_supervision_weights(n_outputs: int) -> list[float]:
    """Return weights 2^-i, the lowest resolution set to 0, normalised to sum 1."""
    weights = [0.5**i for i in range(n_outputs)]
    if n_outputs > 1:
        weights[-1] = 0.0
    total = math.fsum(weights)
    return [w / total for w in weights]
