"""Fine-tune dock widget: train the current model further on corrected labels, inside napari.

A thin shell over :func:`prepare_finetune` and the training engine
(:func:`~napari_xlstm_unet.training.engine.iter_run`), the same code as
``training/train.py``. The image/labels pairs are written to a temporary
run folder. The run goes in a ``thread_worker``, with a live plot of the loss
and the validation score, a progress bar and Cancel. Only a finished run
writes the chosen checkpoint path, so a cancelled run leaves the previous
model in place. Open Segment widgets then switch to the new checkpoint.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import (
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    Label,
    ProgressBar,
    PushButton,
    SpinBox,
    create_widget,
)

if TYPE_CHECKING:
    import napari

__all__ = ["FinetuneWidget", "prepare_finetune"]

logger = logging.getLogger(__name__)

# Segment widgets alive in this session, so a finished fine-tune can switch them.
SEGMENT_WIDGETS: weakref.WeakSet = weakref.WeakSet()


def prepare_finetune(pairs: list[tuple[np.ndarray, np.ndarray]], folder: Path, base_model: str,
                     epochs: int, lr: float, pairs_dir: Path | None = None, task: str = "cells"):
    """Write the pairs under ``folder/data`` and return the training config of the fine-tune.

    Parameters
    ----------
    pairs : list of (image, labels)
        Image arrays as napari stores them (2D grey or (H, W, 3) RGB) and their
        corrected labels (instance ids for cells, classes for endoscopy).
    folder : pathlib.Path
        An empty working folder.
    base_model : str
        Shipped model name or checkpoint path to start from.
    epochs : int
        Epochs of 10 steps each.
    lr : float
        Peak learning rate (AdamW).
    pairs_dir : pathlib.Path, optional
        A folder with ``images/`` and ``masks/`` whose pairs are added.
    """
    import tifffile

    from ..training.config import load_config

    images, masks = folder / "data" / "images", folder / "data" / "masks"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    for index, (image, labels) in enumerate(pairs):
        image, labels = np.asarray(image), np.asarray(labels)
        if labels.shape != image.shape[:2]:
            raise ValueError(f"pair {index + 1}: labels {labels.shape} do not match the image {image.shape}; "
                             "choose the labels drawn on this image")
        if not labels.any():
            raise ValueError(f"pair {index + 1}: the labels layer is empty; draw or correct some objects first")
        tifffile.imwrite(images / f"layer{index:03d}.tif", image)
        tifffile.imwrite(masks / f"layer{index:03d}.tif", labels.astype(np.uint32))
    if pairs_dir is not None:
        from ..training.data import pairs_in_folder

        for pair in pairs_in_folder(pairs_dir):
            shutil.copy(pair.image, images / f"folder_{pair.image.name}")
            shutil.copy(pair.mask, masks / f"folder_{pair.image.stem}{pair.mask.suffix}")
    n_pairs = len(list(images.iterdir()))
    if n_pairs == 0:
        raise ValueError("no training pairs: add an image with its corrected labels, or a folder of pairs")
    overrides = [
        f"task={'cells' if task == 'cells' else 'semantic'}",
        f"data.train_dir={folder / 'data'}",
        "data.val_fraction=0.2",
        f"model.init={base_model}",
        f"train.epochs={epochs}",
        "train.iters_per_epoch=10",
        "train.batch_size=4",
        "train.patch_size=128",
        f"train.lr={lr}",
        "train.warmup_iters=5",
        "val.tile_size=512",
    ]
    if task != "cells":
        overrides.append("data.classes=[background, foreground]")
    return load_config(None, overrides)


class LossPlot:
    """Plot of the training loss and the validation score: a small matplotlib figure embedded in Qt."""

    def __init__(self) -> None:
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(3.5, 2.2), tight_layout=True)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.loss_axes = self.figure.add_subplot(111)
        self.score_axes = self.loss_axes.twinx()
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.epochs: list[int] = []
        self.scores: list[float] = []

    def add(self, event: dict) -> None:
        """Add one progress event of the engine and redraw."""
        if event["kind"] == "step":
            self.steps.append(event["step"])
            self.losses.append(event["loss"])
        elif not np.isnan(event["val_score"]):
            self.epochs.append(event["step"])
            self.scores.append(event["val_score"])
        self.loss_axes.clear()
        self.score_axes.clear()
        self.loss_axes.plot(self.steps, self.losses, color="tab:blue", linewidth=1)
        self.loss_axes.set_xlabel("step")
        self.loss_axes.set_ylabel("loss", color="tab:blue")
        self.score_axes.plot(self.epochs, self.scores, "o-", color="tab:orange", markersize=3)
        self.score_axes.set_ylabel("validation", color="tab:orange")
        self.canvas.draw_idle()


class FinetuneWidget(Container):
    """Dock widget: pairs of Image and corrected Labels layers in, a fine-tuned checkpoint out."""

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=True)
        import napari.layers

        from ..pretrained import available_models

        self._viewer = viewer
        self._worker = None
        self._workdir: Path | None = None
        self._pairs: list[tuple] = []
        self.image = create_widget(annotation=napari.layers.Image, label="Image")
        self.labels = create_widget(annotation=napari.layers.Labels, label="Corrected labels")
        self.add_pair = PushButton(text="Add pair")
        self.clear_pairs = PushButton(text="Clear pairs")
        self.pairs_label = Label(label="Pairs", value="none")
        self.pairs_dir = FileEdit(label="Folder of pairs (optional)", mode="d", nullable=True, value=None)
        self.task = ComboBox(label="Task", choices=["cells", "endoscopy"], value="cells")
        self.base = ComboBox(label="Start from", choices=[*available_models(), "checkpoint file…"],
                             value=available_models()[0] if available_models() else "checkpoint file…")
        self.base_file = FileEdit(label="Start checkpoint", mode="r", filter="*.pt")
        self.epochs = SpinBox(label="Epochs", min=1, max=1000, value=10)
        self.lr = FloatSpinBox(label="Learning rate", min=1e-6, max=1e-1, step=1e-4, value=5e-4)
        self.output = FileEdit(label="Save as", mode="w", filter="*.pt")
        self.run_button = PushButton(text="Fine-tune")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="Steps", min=0, max=1, value=0)
        self.status = Label(label="Status", value="ready")
        self.plot = None
        self.extend([self.image, self.labels, self.add_pair, self.clear_pairs, self.pairs_label, self.pairs_dir,
                     self.task, self.base, self.base_file, self.epochs, self.lr, self.output, self.run_button,
                     self.cancel_button, self.progress, self.status])
        try:
            self.plot = LossPlot()
            self.native.layout().addWidget(self.plot.canvas)
        except ImportError:
            self.status.value = "ready (install matplotlib for a live plot)"
        self.add_pair.changed.connect(self._add_pair)
        self.clear_pairs.changed.connect(self._clear_pairs)
        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        viewer.layers.events.inserted.connect(self.reset_choices)
        viewer.layers.events.removed.connect(self.reset_choices)

    def _add_pair(self) -> None:
        if self.image.value is None or self.labels.value is None:
            return
        self._pairs.append((self.image.value, self.labels.value))
        self.pairs_label.value = ", ".join(f"{i.name} + {lab.name}" for i, lab in self._pairs)

    def _clear_pairs(self) -> None:
        self._pairs = []
        self.pairs_label.value = "none"

    def _base_model(self) -> str:
        if self.base.value != "checkpoint file…":
            return self.base.value
        if not str(self.base_file.value) or str(self.base_file.value) == ".":
            raise ValueError("no start checkpoint chosen; pick a .pt file or a shipped model")
        return str(self.base_file.value)

    def run(self) -> None:
        """Write the pairs, then fine-tune in a background thread."""
        from napari.qt.threading import thread_worker
        from napari.utils.notifications import show_error

        from ..training.engine import iter_run

        output = str(self.output.value)
        if not output or output == ".":
            show_error("Choose where to save the fine-tuned checkpoint (Save as).")
            return
        pairs = self._pairs or ([(self.image.value, self.labels.value)]
                                if self.image.value is not None and self.labels.value is not None else [])
        pairs_dir = Path(self.pairs_dir.value) if self.pairs_dir.value is not None else None
        self._workdir = Path(tempfile.mkdtemp(prefix="xlstm-unet-finetune-"))
        try:
            config = prepare_finetune([(i.data, lab.data) for i, lab in pairs], self._workdir, self._base_model(),
                                      self.epochs.value, self.lr.value, pairs_dir, self.task.value)
        except (ValueError, FileNotFoundError) as error:
            shutil.rmtree(self._workdir, ignore_errors=True)
            show_error(str(error))
            return
        worker = thread_worker(iter_run)(config, self._workdir / "run", False, "napari Fine-tune widget")
        worker.yielded.connect(self._on_event)
        worker.returned.connect(lambda path: self._on_done(path, Path(output)))
        worker.errored.connect(self._on_error)
        worker.aborted.connect(lambda: self._set_status("cancelled; the previous model is unchanged"))
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self.run_button.enabled, self.cancel_button.enabled = False, True
        self.progress.value = 0
        self._set_status("fine-tuning…")
        worker.start()

    def cancel(self) -> None:
        """Stop the run after the current step; nothing is saved."""
        if self._worker is not None:
            self._set_status("cancelling…")
            self._worker.quit()

    def _on_event(self, event: dict) -> None:
        self.progress.max = event["total_steps"]
        self.progress.value = event["step"]
        if self.plot is not None:
            self.plot.add(event)
        if event["kind"] == "epoch":
            self._set_status(f"epoch {event['epoch']}: loss {event['loss']:.3f}, validation {event['val_score']:.3f}")

    def _on_done(self, model_path: Path, output: Path) -> None:
        from .._atomic import write_atomically

        output.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(output, lambda tmp: shutil.copyfile(model_path, tmp))
        for widget in list(SEGMENT_WIDGETS):
            if widget.viewer is self._viewer:
                widget.use_checkpoint(output)
        self._set_status(f"saved {output}; the Segment widget now uses it")

    def _on_error(self, error: Exception) -> None:
        from napari.utils.notifications import show_error

        logger.error("fine-tuning failed: %s", error)
        self._set_status("failed; the previous model is unchanged")
        show_error(f"Fine-tuning failed: {error}")

    def _on_finished(self) -> None:
        self._worker = None
        self.run_button.enabled, self.cancel_button.enabled = True, False
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def _set_status(self, text: str) -> None:
        self.status.value = text
