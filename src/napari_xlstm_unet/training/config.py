"""Training configuration: nested dataclasses read from YAML, with command-line overrides.

A run is described by one YAML file (see ``training/configs/``), for example::

    task: cells
    data:
      split_csv: training/splits/dsb2018.csv
      data_root: ../shared/data
    train:
      epochs: 28

and ``--set section.key=value`` overrides on the command line. The fully
resolved configuration is written as ``config.yaml`` into the run folder.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

TASKS = ("cells", "semantic")
OPTIMIZERS = ("adamw", "sgd")


@dataclass
class DataConfig:
    """Sources of the image/mask pairs.

    Either ``split_csv`` (columns dataset, name, split, optional modality)
    with ``data_root``, or ``train_dir`` (a folder with ``images/`` and
    ``masks/``, pairs matched by file stem) with ``val_dir`` or
    ``val_fraction``.
    """

    split_csv: str | None = None
    data_root: str | None = None
    train_dir: str | None = None
    val_dir: str | None = None
    test_dir: str | None = None
    val_fraction: float = 0.1
    split_seed: int = 0
    # Class names, background first. Cells always use the three classes below.
    classes: list[str] = field(default_factory=lambda: ["background", "interior", "boundary"])
    # A mask value excluded from the loss and the metrics (semantic task only).
    ignore_value: int | None = None
    # Draw images with probability ~ 1 / sqrt(size of their modality group).
    group_sampling: str = "sqrt"
    # Zoom images (bilinear) and masks (nearest) by this factor before training;
    # stored in the checkpoint, so inference zooms alike and resizes the output back.
    scale: float = 1.0


@dataclass
class ModelSection:
    """Network shape, or the checkpoint to start from."""

    preset: str = "small"
    xlstm: str = "bot"  # none, bot, enc or full
    vil_directions: int = 1  # 2: a second ViL block reads the tokens from the bottom right
    # A checkpoint path or a shipped model name ("cells"): fine-tuning.
    init: str | None = None
    freeze_encoder: bool = False


@dataclass
class TrainSection:
    """Optimisation settings."""

    epochs: int = 28
    iters_per_epoch: int = 60
    batch_size: int = 8
    patch_size: int = 192
    optimizer: str = "adamw"
    lr: float | None = None  # None: 3e-3 for AdamW, 1e-2 for SGD (the reference code's value)
    weight_decay: float | None = None  # None: 1e-4 for AdamW, 3e-5 for SGD
    momentum: float = 0.99
    warmup_iters: int = 30
    grad_clip: float = 12.0
    foreground_fraction: float = 0.33
    # Probability of a per-channel gain and offset (colour) change of a patch
    # with more than one channel; 0 keeps the patches of earlier runs.
    colour_jitter: float = 0.0
    # Probability of a haematoxylin-eosin-DAB stain change of a colour patch
    # (see augment.stain_augment); 0 keeps the patches of earlier runs.
    stain_jitter: float = 0.0
    # Validate and keep an exponential moving average of the weights, updated
    # every step (about 1 / (1 - decay) steps of memory); 0 = off.
    ema_decay: float = 0.0
    amp: bool = True  # used on CUDA only
    seed: int = 0
    num_workers: int = 0
    threads: int = 0  # torch CPU threads per process, 0 = torch's default
    device: str = "auto"
    # Stop after this epoch with the resumable state saved (0 = run to the end);
    # for clusters with wall-time limits.
    stop_after_epoch: int = 0


@dataclass
class ValSection:
    """Validation during training and the report after it."""

    tile_size: int = 512
    max_images: int = 0
    every: int = 1  # validate every N epochs (and after the last)
    tune_postprocess: bool = True
    nsd_tolerance: float = 2.0


@dataclass
class TrainConfig:
    """A whole training run."""

    task: str = "cells"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelSection = field(default_factory=ModelSection)
    train: TrainSection = field(default_factory=TrainSection)
    val: ValSection = field(default_factory=ValSection)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first setting that cannot work."""
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.train.optimizer not in OPTIMIZERS:
            raise ValueError(f"train.optimizer must be one of {OPTIMIZERS}, got {self.train.optimizer!r}")
        if (self.data.split_csv is None) == (self.data.train_dir is None):
            raise ValueError(
                "give exactly one data source: data.split_csv (with data.data_root) or data.train_dir"
            )
        if self.data.split_csv and not self.data.data_root:
            raise ValueError("data.split_csv needs data.data_root, the folder holding the dataset folders")
        if len(self.data.classes) < 2:
            raise ValueError(f"data.classes needs background and at least one class, got {self.data.classes}")
        if self.task == "cells" and len(self.data.classes) != 3:
            raise ValueError(
                f"task cells uses exactly 3 classes (background, interior, boundary), got {self.data.classes}; "
                "use task semantic for class-index masks"
            )
        if not 0.0 <= self.data.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {self.data.val_fraction}")
        for name in ("epochs", "iters_per_epoch", "batch_size"):
            if getattr(self.train, name) < 1:
                raise ValueError(f"train.{name} must be at least 1, got {getattr(self.train, name)}")
        if not 0.05 <= self.data.scale <= 4.0:
            raise ValueError(f"data.scale must lie in [0.05, 4], got {self.data.scale}")
        for name in ("colour_jitter", "stain_jitter"):
            if not 0.0 <= getattr(self.train, name) <= 1.0:
                raise ValueError(f"train.{name} is a probability in [0, 1], got {getattr(self.train, name)}")
        if not 0.0 <= self.train.ema_decay < 1.0:
            raise ValueError(f"train.ema_decay must lie in [0, 1) (0 = off, 0.998 is typical), "
                             f"got {self.train.ema_decay}")
        if self.train.patch_size < 16:
            raise ValueError(f"train.patch_size must be at least 16 pixels, got {self.train.patch_size}")

    @property
    def lr(self) -> float:
        """Peak learning rate, with the optimiser's default when unset."""
        if self.train.lr is not None:
            return self.train.lr
        return 3e-3 if self.train.optimizer == "adamw" else 1e-2

    @property
    def weight_decay(self) -> float:
        """Weight decay, with the optimiser's default when unset."""
        if self.train.weight_decay is not None:
            return self.train.weight_decay
        return 1e-4 if self.train.optimizer == "adamw" else 3e-5

    def to_dict(self) -> dict[str, Any]:
        """Return plain values for YAML and checkpoints."""
        return dataclasses.asdict(self)


def _coerce(value: Any, annotation: Any, name: str) -> Any:
    # YAML 1.1 reads "5e-4" as a string (it needs a dot); numbers given that
    # way, and ints where floats are expected, are converted here.
    allowed = set(typing.get_args(annotation)) or {annotation}
    if value is None and type(None) in allowed:
        return None
    if float in allowed and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{name} must be a number, got {value!r}") from None
    if int in allowed and not isinstance(value, int) or bool in allowed and not isinstance(value, bool):
        kind = "true or false" if bool in allowed else "an integer"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return value


def _build(cls, values: dict[str, Any], where: str):
    if not isinstance(values, dict):
        raise ValueError(f"{where or 'the config'} must be a mapping, got {values!r}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(
            f"unknown setting(s) {', '.join(where + k for k in unknown)}; "
            f"accepted in this section: {', '.join(sorted(known))}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        default = getattr(cls(), name)
        if dataclasses.is_dataclass(default):
            kwargs[name] = _build(type(default), value or {}, f"{where}{name}.")
        else:
            kwargs[name] = _coerce(value, hints[name], where + name)
    return cls(**kwargs)


def _apply_override(values: dict[str, Any], override: str) -> None:
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise ValueError(f"override {override!r} is not of the form section.key=value")
    parts = key.strip().split(".")
    node = values
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {override!r}: {part} is not a section")
    # YAML parsing turns "0.003" into a float, "null" into None and "[a, b]" into a
    # list. _coerce converts the numbers YAML leaves as text, such as "3e-3".
    node[parts[-1]] = yaml.safe_load(raw)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config (or start from the defaults) and apply ``key=value`` overrides.

    Parameters
    ----------
    path : path-like, optional
        YAML file whose sections mirror :class:`TrainConfig`.
    overrides : list of str, optional
        ``section.key=value`` strings, applied in order; values are parsed as YAML.

    Raises
    ------
    ValueError
        For unknown keys, malformed overrides or settings that cannot work.
    """
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} not found")
        with open(path, encoding="utf-8") as handle:
            values = yaml.safe_load(handle) or {}
    for override in overrides or []:
        _apply_override(values, override)
    config = _build(TrainConfig, values, "")
    config.validate()
    return config


def save_config(config: TrainConfig, path: Path) -> None:
    """Write the resolved configuration as YAML."""
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(config.to_dict(), handle, sort_keys=False)
