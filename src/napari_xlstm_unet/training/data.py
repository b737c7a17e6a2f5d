"""Image/mask pairs for training: discovery, splits, reading and mask checks.

Two sources:

- a split CSV with the columns ``dataset``, ``name``, ``split`` (train, val
  or test) and optionally ``modality``, resolved under a data root that contains
  ``<dataset>/images/<name>.<ext>`` and ``<dataset>/masks/<name>.<ext>``;
- folders holding ``images/`` and ``masks/``, pairs matched by file stem (a
  mask may add ``_labels``, ``_label`` or ``_mask`` to the image's stem).
  Validation comes from its own folder or a seeded fraction of the pairs.

Mask rules, by task:

- ``cells``: integer instance labels, 0 = background, one id per object.
  A mask containing only {0, 1} or {0, 255} is binary; its connected components
  become the objects and a warning names the file, since touching cells merge.
- ``semantic``: class indices 0..K-1, with ``ignore_value`` (if declared)
  left out of the loss and the metrics. With K = 2 (background plus one
  class) a {0, 255} mask is read as background/foreground, and a mask with
  many grey levels (a binary mask saved as JPEG) is thresholded at 128 with a
  warning. Any other value outside the declared classes is an error.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from ..inference.normalize import prepare_image
from ..inference.predict import zoom_channels
from ..io import IMAGE_SUFFIXES, read_image
from ..masks import IGNORE_INDEX, semantic_classes  # noqa: F401 (re-exported)
from .targets import check_instance_mask, instances_to_classes

logger = logging.getLogger(__name__)

MASK_SUFFIXES = ("_labels", "_label", "_mask")


class RejectedPair(ValueError):
    """Error for a pair that cannot train, for example because of non-finite pixels. The run goes on without it."""


@dataclass(frozen=True)
class Pair:
    """One image file, its mask file and its sampling group (modality)."""

    image: Path
    mask: Path
    group: str = "all"


@dataclass
class Sample:
    """One prepared training image.

    Attributes
    ----------
    image : numpy.ndarray, float32, shape (C, H, W)
        Normalised image.
    classes : numpy.ndarray, uint8, shape (H, W)
        Training target; ``IGNORE_INDEX`` marks ignored pixels.
    labels : numpy.ndarray, int32, shape (H, W)
        What the metrics compare against: instance ids for cells, class
        indices for semantic tasks.
    """

    name: str
    image: np.ndarray
    classes: np.ndarray
    labels: np.ndarray
    group: str = "all"


def read_split_csv(split_csv: Path, data_root: Path) -> dict[str, list[Pair]]:
    """Return the pairs of each split named in a CSV."""
    splits: dict[str, list[Pair]] = {}
    with open(split_csv, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            folder = data_root / row["dataset"]
            image = _named_file(folder / "images", row["name"], split_csv)
            mask = _named_file(folder / "masks", row["name"], split_csv)
            splits.setdefault(row["split"], []).append(Pair(image, mask, row.get("modality") or "all"))
    return splits


def _named_file(folder: Path, name: str, split_csv: Path) -> Path:
    for suffix in IMAGE_SUFFIXES:
        if (folder / f"{name}{suffix}").is_file():
            return folder / f"{name}{suffix}"
    raise FileNotFoundError(
        f"{folder / name}.* listed in {split_csv} not found (tried {', '.join(IMAGE_SUFFIXES)}); check data.data_root"
    )


def _mask_key(stem: str) -> str:
    for suffix in MASK_SUFFIXES:
        if stem.endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def pairs_in_folder(folder: str | Path) -> list[Pair]:
    """Return the image/mask pairs of ``folder/images`` and ``folder/masks``, matched by stem.

    Raises
    ------
    FileNotFoundError
        If either subfolder is missing or no pair matches.
    """
    folder = Path(folder)
    image_dir, mask_dir = folder / "images", folder / "masks"
    for sub in (image_dir, mask_dir):
        if not sub.is_dir():
            raise FileNotFoundError(f"{sub} not found: a training folder must contain images/ and masks/ subfolders")

    def files(directory: Path) -> list[Path]:
        return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)

    images = {p.stem: p for p in files(image_dir)}
    masks = {_mask_key(p.stem): p for p in files(mask_dir)}
    pairs = [Pair(images[k], masks[k]) for k in sorted(images) if k in masks]
    for kind, unmatched in (("images", sorted(set(images) - set(masks))), ("masks", sorted(set(masks) - set(images)))):
        if unmatched:
            logger.warning("%d %s in %s have no partner and are left out, e.g. %s",
                           len(unmatched), kind, folder, unmatched[0])
    if not pairs:
        raise FileNotFoundError(
            f"no image/mask pairs in {folder}: masks must share the image's file stem "
            f"(optionally with one of {MASK_SUFFIXES})"
        )
    return pairs


def split_pairs(pairs: list[Pair], val_fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """Split pairs into training and validation by a seeded permutation.

    At least one pair goes to validation when ``val_fraction > 0`` and there
    are two pairs or more; with a single pair validation is skipped.
    """
    if val_fraction <= 0 or len(pairs) < 2:
        return list(pairs), []
    order = np.random.default_rng(seed).permutation(len(pairs))
    n_val = min(len(pairs) - 1, max(1, round(val_fraction * len(pairs))))
    val = [pairs[i] for i in sorted(order[:n_val])]
    train = [pairs[i] for i in sorted(order[n_val:])]
    return train, val


def resolve_splits(data) -> dict[str, list[Pair]]:
    """Return ``{"train": [...], "val": [...], "test": [...]}`` from a :class:`DataConfig`."""
    if data.split_csv:
        splits = read_split_csv(Path(data.split_csv), Path(data.data_root))
    else:
        all_train = pairs_in_folder(data.train_dir)
        if data.val_dir:
            splits = {"train": all_train, "val": pairs_in_folder(data.val_dir)}
        else:
            train, val = split_pairs(all_train, data.val_fraction, data.split_seed)
            splits = {"train": train, "val": val}
        if data.test_dir:
            splits["test"] = pairs_in_folder(data.test_dir)
    if not splits.get("train"):
        raise ValueError("no training pairs found; check the data section of the config")
    return splits


def _read_mask(path: Path) -> np.ndarray:
    data = np.squeeze(read_image(path).data)
    if data.ndim != 2:
        raise ValueError(
            f"mask {path} has shape {data.shape}; expected one 2D (H, W) label or class image, "
            "not a colour-coded or multi-page mask"
        )
    return data


def load_sample(pair: Pair, task: str, in_channels: int, normalization: dict,
                n_classes: int = 3, ignore_value: int | None = None, scale: float = 1.0) -> Sample:
    """Read one pair, check its mask and build the training target.

    With ``scale`` != 1 the image is zoomed bilinearly and the mask by
    nearest neighbour, so that mask values stay labels.
    """
    image_file = read_image(pair.image)
    if np.issubdtype(image_file.data.dtype, np.floating):
        n_bad = int(image_file.data.size - np.isfinite(image_file.data).sum())
        if n_bad:
            raise RejectedPair(
                f"image {pair.image} contains {n_bad} non-finite pixels (NaN or infinity); a training image "
                "must be finite, so this pair is left out. Replace those pixels to train on it."
            )
    mask = _read_mask(pair.mask)
    try:
        image = prepare_image(image_file.data, in_channels, normalization, has_alpha=image_file.has_alpha,
                              axes=image_file.axes, name=str(pair.image))
    except ValueError as error:
        raise ValueError(
            f"training image {pair.image}: {str(error).split('; ')[0]}. Training takes one 2D image per mask: "
            "save each frame or slice as its own file with its own mask"
        ) from error
    if mask.shape != image.shape[1:]:
        raise ValueError(
            f"mask {pair.mask} is {mask.shape[0]} x {mask.shape[1]} pixels but image {pair.image} is "
            f"{image.shape[1]} x {image.shape[2]}; a mask must match its image's height and width"
        )
    if scale != 1.0:
        image = zoom_channels(image, scale)
        rows = np.minimum((np.arange(image.shape[1]) + 0.5) / scale, mask.shape[0] - 1).astype(int)
        cols = np.minimum((np.arange(image.shape[2]) + 0.5) / scale, mask.shape[1] - 1).astype(int)
        mask = mask[rows][:, cols]
    if task == "cells":
        check_instance_mask(mask, pair.mask)
        values = np.unique(mask)
        if len(values) == 2 and values[1] in (1, 255):
            mask = ndi.label(mask > 0)[0]
        labels = mask.astype(np.int32)
        classes = instances_to_classes(labels)
    else:
        classes = semantic_classes(mask, pair.mask, n_classes, ignore_value)
        labels = classes.astype(np.int32)
    return Sample(pair.image.stem, image, classes, labels, pair.group)
