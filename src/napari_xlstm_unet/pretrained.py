"""Models shipped inside the package, and loading by name or path."""

from __future__ import annotations

import logging
import os
import threading
from importlib import resources
from pathlib import Path

__all__ = ["DEFAULT_MODEL", "SHIPPED_MODELS", "TASK_MODELS", "available_models", "load_model", "resolve_model_path"]

logger = logging.getLogger(__name__)

# Name -> file in napari_xlstm_unet/weights/. Weights ship with the package,
# so nothing is downloaded at run time.
SHIPPED_MODELS = {
    "cells": "cells_small.pt",
    "polyps": "polyps_small.pt",
    "instruments": "instruments_small.pt",
}
DEFAULT_MODEL = "cells"
# The default model of each task the command line and the widget offer, and
# the checkpoint task ("cells" or "semantic") its models must have.
TASK_MODELS = {"cells": "cells", "endoscopy": "polyps"}
TASK_CHECKPOINT = {"cells": "cells", "endoscopy": "semantic"}

_cache: dict[tuple[str, float, str], object] = {}
_cache_lock = threading.Lock()


def available_models() -> list[str]:
    """Return the names of the shipped models present in this installation."""
    folder = resources.files("napari_xlstm_unet") / "weights"
    return [name for name, file in SHIPPED_MODELS.items() if (folder / file).is_file()]


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
        path = Path(str(resources.files("napari_xlstm_unet") / "weights" / SHIPPED_MODELS[model]))
        if not path.is_file():
            raise FileNotFoundError(
                f"shipped model {model!r} is missing from this installation ({path}); "
                f"available: {', '.join(available_models()) or 'none'}. Reinstall the package"
            )
        return path
    path = Path(model)
    if path.is_dir():
        raise FileNotFoundError(
            f"model {str(model)!r} is a folder, not a checkpoint file; give a .pt file, such as "
            "the model.pt a training run writes (the final model with tuned post-processing)"
        )
    if not path.is_file():
        raise FileNotFoundError(
            f"model {str(model)!r} is neither a shipped model ({', '.join(available_models())}) "
            "nor an existing checkpoint file"
        )
    return path


def load_model(model: str | os.PathLike | None = None, device: str | None = None):
    """Load a shipped model or checkpoint file, reusing an earlier load of the same file.

    Parameters
    ----------
    model : str or path-like, optional
        A shipped model name (``"cells"``, ``"polyps"``, ``"instruments"``) or
        a checkpoint path; the default cell model when omitted.
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
