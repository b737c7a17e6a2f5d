"""Models shipped inside the package, and loading by name or path."""

from __future__ import annotations

import logging
import os
import threading
from importlib import resources
from pathlib import Path

__all__ = ["DEFAULT_MODEL", "SHIPPED_MODELS", "load_model", "resolve_model_path"]

logger = logging.getLogger(__name__)

# Name -> file in napari_xlstm_unet/weights/. Weights ship with the package,
# so nothing is downloaded at run time.
SHIPPED_MODELS = {"cells": "cells_small.pt"}
DEFAULT_MODEL = "cells"

_cache: dict[tuple[str, float, str], object] = {}
_cache_lock = threading.Lock()


def resolve_model_path(model: str | os.PathLike | None = None) -> Path:
    """Return the checkpoint path of a shipped model name or a file path.

    ``None`` selects the default cell model.

    Raises
    ------
    FileNotFoundError
        If ``model`` is neither a shipped model name nor an existing file.
    """
    if model is None:
        model = DEFAULT_MODEL
    if isinstance(model, str) and model in SHIPPED_MODELS:
        return Path(str(resources.files("napari_xlstm_unet") / "weights" / SHIPPED_MODELS[model]))
    path = Path(model)
    if not path.is_file():
        raise FileNotFoundError(
            f"model {str(model)!r} is neither a shipped model ({', '.join(SHIPPED_MODELS)}) "
            "nor an existing checkpoint file"
        )
    return path


def load_model(model: str | os.PathLike | None = None, device: str | None = None):
    """Load a shipped model or checkpoint file, reusing an earlier load of the same file.

    Parameters
    ----------
    model : str or path-like, optional
        A shipped model name (``"cells"``) or a checkpoint path; the default
        cell model when omitted.
    device : str, optional
        ``"cpu"``, ``"cuda"``; CUDA when available by default.

    Returns
    -------
    napari_xlstm_unet.model.checkpoint.LoadedModel
    """
    from .inference.predict import default_device
    from .model.checkpoint import load_checkpoint

    path = resolve_model_path(model)
    device = device or str(default_device())
    key = (str(path.resolve()), path.stat().st_mtime, device)
    with _cache_lock:
        if key not in _cache:
            logger.info("loading model %s on %s", path, device)
            _cache[key] = load_checkpoint(path, device=device)
        return _cache[key]
