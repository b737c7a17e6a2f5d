"""Checkpoint files: weights plus everything needed to use them, loaded without pickle code.

A checkpoint is a ``torch.save`` dictionary of tensors and plain Python values,
read back with ``torch.load(weights_only=True)`` so that opening a file never
runs code from it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._atomic import write_atomically
from .config import ModelConfig
from .unet import XLSTMUNet, build_model

__all__ = ["CHECKPOINT_FORMAT", "LoadedModel", "load_checkpoint", "save_checkpoint", "transfer_weights"]

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "napari-xlstm-unet/1"

DEFAULT_NORMALIZATION = {"kind": "percentile", "low": 1.0, "high": 99.8}
DEFAULT_POSTPROCESS = {"prob_threshold": 0.5, "min_size": 16, "split_depth": 0.0}


@dataclass
class LoadedModel:
    """A network in eval mode together with the metadata of its checkpoint.

    Attributes
    ----------
    model : XLSTMUNet
        The network, on the CPU unless moved.
    config : ModelConfig
        Its shape.
    task : str
        ``"cells"`` (3 classes turned into instances) or ``"semantic"``.
    class_names : list of str
        Meaning of each output channel, background first.
    normalization : dict
        Input normalisation: ``{"kind": "percentile", "low": 1.0, "high": 99.8}``.
    postprocess : dict
        Post-processing parameters, for cells ``prob_threshold``, ``min_size``
        and ``split_depth``.
    model_card : dict
        Free-form description: data, command, date, metrics.
    input_scale : float
        Zoom applied to images before the network (0.5 halves height and
        width); the outputs are resized back. 1.0 for models trained at the
        images' own resolution.
    source : str
        Path the checkpoint was read from.
    """

    model: XLSTMUNet
    config: ModelConfig
    task: str = "cells"
    class_names: list[str] = field(default_factory=lambda: ["background", "interior", "boundary"])
    normalization: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_NORMALIZATION))
    postprocess: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_POSTPROCESS))
    model_card: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    input_scale: float = 1.0


def save_checkpoint(path: str | os.PathLike, loaded: LoadedModel, extra: dict[str, Any] | None = None) -> Path:
    """Write ``loaded`` to ``path`` atomically (temporary file, then rename).

    Parameters
    ----------
    path : path-like
        Destination file, conventionally ``*.pt``.
    loaded : LoadedModel
        Network and metadata to store.
    extra : dict, optional
        More plain values or tensors to store, for example optimiser state.

    Returns
    -------
    pathlib.Path
        The written path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "state_dict": {k: v.detach().cpu() for k, v in loaded.model.state_dict().items()},
        "model_config": loaded.config.to_dict(),
        "task": loaded.task,
        "class_names": list(loaded.class_names),
        "normalization": dict(loaded.normalization),
        "postprocess": dict(loaded.postprocess),
        "model_card": dict(loaded.model_card),
        "input_scale": float(loaded.input_scale),
    }
    if extra:
        payload.update(extra)

    write_atomically(path, lambda tmp_name: torch.save(payload, tmp_name))
    logger.info("saved checkpoint %s", path)
    return path


def _load_error_detail(error: Exception) -> str:
    """Return the line of a ``torch.load`` error that names the fault in the file.

    For files that are not pickles of tensors (an image, random bytes),
    PyTorch's message opens with advice to rerun with ``weights_only=False``,
    which would not help here and could run code from the file. The line
    naming the unpickling fault is kept instead.
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return "no detail"
    if "weights_only" in lines[0]:
        faults = [line for line in lines[1:] if "weights_only" not in line and "error:" not in line]
        return faults[0] if faults else "the file holds objects other than tensors"
    return lines[0]


def _read_payload(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise FileNotFoundError(
            f"{path} is a folder, not a checkpoint file; give a .pt file, such as the model.pt a "
            "training run writes (the final model with tuned post-processing)"
        )
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for corrupt files
        raise ValueError(
            f"{path} is not a readable napari-xlstm-unet checkpoint ({type(error).__name__}: "
            f"{_load_error_detail(error)}); choose a .pt file written by the training script"
        ) from error
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(
            f"{path} is not a napari-xlstm-unet checkpoint: expected format "
            f"{CHECKPOINT_FORMAT!r}, found {found!r}; choose a .pt file written by the training script"
        )
    return payload


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> LoadedModel:
    """Read a checkpoint and rebuild its network in eval mode.

    Parameters
    ----------
    path : path-like
        A file written by :func:`save_checkpoint`.
    device : str or torch.device
        Where to put the network. Weights are always read onto the CPU first,
        so a file saved on a GPU opens on a CPU-only machine.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file is not a readable checkpoint of this package, or its
        weights do not fit its stored configuration.
    """
    path = Path(path)
    payload = _read_payload(path)
    config = ModelConfig.from_dict(payload["model_config"])
    model = build_model(config)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as error:
        raise ValueError(
            f"weights in {path} do not fit its model config {config}: {error}"
        ) from error
    model.to(device).eval()
    return LoadedModel(
        model=model,
        config=config,
        task=payload.get("task", "cells"),
        class_names=list(payload.get("class_names", [])),
        normalization=dict(payload.get("normalization", DEFAULT_NORMALIZATION)),
        postprocess=_postprocess(payload),
        model_card=dict(payload.get("model_card", {})),
        source=str(path),
        input_scale=float(payload.get("input_scale", 1.0)),
    )


def transfer_weights(model: XLSTMUNet, source: LoadedModel, skip_prefixes: tuple[str, ...] = ()) -> list[str]:
    """Copy ``source``'s weights into ``model``, which may differ only in skipped tensors.

    Parameters
    ----------
    model : XLSTMUNet
        The network to fill.
    source : LoadedModel
        A loaded checkpoint.
    skip_prefixes : tuple of str
        Parameter-name prefixes left as initialised in ``model``, for example
        ``("heads.",)`` when the number of classes changes.

    Returns
    -------
    list of str
        Names of the tensors left out.

    Raises
    ------
    ValueError
        If the two configurations differ in anything that changes a copied
        tensor; the message names each differing setting with both values.
    """
    ours, theirs = model.config.to_dict(), source.config.to_dict()
    allowed = {"num_classes"} if "heads." in skip_prefixes else set()
    allowed |= {"deep_supervision"}  # changes no tensor shape
    differing = [k for k in ours if ours[k] != theirs.get(k) and k not in allowed]
    if differing:
        details = ", ".join(f"{k} {theirs.get(k)} vs {ours[k]}" for k in differing)
        raise ValueError(
            f"weights in {source.source or 'the checkpoint'} do not fit this network ({details}; "
            "checkpoint value first); build the network from the checkpoint's own config, or train a new model"
        )
    state = {k: v for k, v in source.model.state_dict().items() if not k.startswith(skip_prefixes)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    unexplained = [k for k in missing if not k.startswith(skip_prefixes)]
    if unexpected or unexplained:
        raise ValueError(
            f"weights in {source.source or 'the checkpoint'} do not match this network: "
            f"missing {unexplained[:5]}, unexpected {unexpected[:5]}"
        )
    return list(missing)


def _postprocess(payload: dict) -> dict[str, Any]:
    postprocess = dict(payload.get("postprocess", DEFAULT_POSTPROCESS))
    if "prob_threshold" in postprocess:
        # Cell checkpoints written before seed splitting existed keep their behaviour.
        postprocess.setdefault("split_depth", 0.0)
    return postprocess
