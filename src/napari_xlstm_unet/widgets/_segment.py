"""Segment dock widget: a thin shell over :func:`~napari_xlstm_unet.inference.predict.iter_segment_image`.

The network runs in a napari ``thread_worker``. Progress arrives after each
sliding window, and Cancel stops the worker at the next window, so the
viewer stays responsive and a cancelled run adds no layer.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
from magicgui.widgets import (
    CheckBox,
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

__all__ = ["SegmentWidget", "labels_layer_kwargs", "layer_image_data"]

logger = logging.getLogger(__name__)

FILE_CHOICE = "checkpoint file…"
# Shipped models by combo-box text, and whether they need an RGB layer.
SHIPPED_CHOICES = {
    "cells: nuclei and cells (shipped)": ("cells", False),
    "polyps: endoscopy frames (shipped)": ("polyps", True),
    "instruments: surgical frames (shipped)": ("instruments", True),
}
SHIPPED_CHOICE = next(iter(SHIPPED_CHOICES))


def model_choices(layer) -> list[str]:
    """Return the model choices for ``layer``: endoscopy models only for RGB layers."""
    from ..pretrained import available_models

    present = set(available_models())
    rgb = bool(layer is not None and getattr(layer, "rgb", False))
    shipped = [text for text, (name, needs_rgb) in SHIPPED_CHOICES.items()
               if name in present and (rgb or not needs_rgb)]
    return shipped + [FILE_CHOICE]


def layer_image_data(layer: napari.layers.Image) -> tuple[object, bool, str]:
    """Return the pixels to segment, whether they have alpha, and their tifffile axes.

    The pixels may be a lazy dask or zarr array. Multiscale layers give their
    full-resolution level. RGB layers keep their channel-last layout, and an
    RGBA layer reports ``has_alpha``. Every axis before the displayed two (and
    before the colour axis of an RGB layer) is a stack axis, as napari's dims
    slider shows it, so a stack is segmented plane by plane. Those axes get
    the tifffile letter Z, because time and depth are handled alike.
    """
    data = layer.data[0] if layer.multiscale else layer.data
    spatial = 3 if layer.rgb else 2
    n_stack_axes = data.ndim - spatial
    axes = "Z" * n_stack_axes + ("YXC" if layer.rgb else "YX")
    has_alpha = bool(layer.rgb and data.shape[-1] == 4)
    return data, has_alpha, axes


def labels_layer_kwargs(image_layer: napari.layers.Image) -> dict:
    """Return name, scale and translate for a Labels layer that overlays ``image_layer``.

    The labels keep the layer's two displayed axes and its stack axes of more
    than one plane. Length-1 stack axes are dropped with their scale and
    translate, because the segmentation drops them too.
    """
    data = image_layer.data[0] if image_layer.multiscale else image_layer.data
    shape = data.shape[:-1] if image_layer.rgb else data.shape  # scale has one entry per axis here
    kept = [i for i, n in enumerate(shape[:-2]) if n != 1] + [len(shape) - 2, len(shape) - 1]
    return {
        "name": f"{image_layer.name}_labels",
        "scale": tuple(image_layer.scale[i] for i in kept),
        "translate": tuple(image_layer.translate[i] for i in kept),
    }


class SegmentWidget(Container):
    """Dock widget: pick an Image layer and a model, press Run, get a Labels layer.

    Cell models give instance labels, endoscopy models a class map. The
    endoscopy models are offered for RGB layers only.
    """

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=True)
        import napari.layers

        self._viewer = viewer
        self._worker = None
        self._image = create_widget(annotation=napari.layers.Image, label="Image")
        self._model = ComboBox(label="Model", choices=lambda _widget: model_choices(self._image.value),
                               value=SHIPPED_CHOICE)
        self._checkpoint = FileEdit(label="Checkpoint", mode="r", filter="*.pt", visible=False)
        self._mirror = mirror_checkbox()
        self._run = PushButton(text="Run")
        self._cancel = PushButton(text="Cancel", enabled=False)
        self._progress = ProgressBar(label="Progress", min=0, max=1, value=0)
        self._status = Label(label="Status", value="ready")
        # Cell post-processing: changing any of these redraws the last labels from
        # the kept probabilities, without running the network again.
        self._threshold = FloatSpinBox(label="Seed threshold", min=0.0, max=1.0, step=0.05, value=0.5,
                                       enabled=False)
        self._min_size = SpinBox(label="Min size (px)", min=0, max=100_000, value=16, enabled=False)
        self._split_depth = FloatSpinBox(label="Split depth (px)", min=0.0, max=50.0, step=0.5, value=0.0,
                                         enabled=False,
                                         tooltip="Split seeds that hold several touching nuclei. "
                                                 "Larger values split less; 0 never splits.")
        self._last = None  # (probabilities, labels layer) of the last cell run
        self.extend([self._image, self._model, self._checkpoint, self._mirror, self._run, self._cancel,
                     self._progress, self._status, self._threshold, self._min_size, self._split_depth])
        for control in (self._threshold, self._min_size, self._split_depth):
            control.changed.connect(self._relabel)
        from ._finetune import SEGMENT_WIDGETS

        SEGMENT_WIDGETS.add(self)
        self._model.changed.connect(self._on_model_changed)
        self._run.changed.connect(self.run)
        self._cancel.changed.connect(self.cancel)
        self._image.changed.connect(lambda _layer: self._model.reset_choices())
        viewer.layers.events.inserted.connect(self._image.reset_choices)
        viewer.layers.events.removed.connect(self._image.reset_choices)

    @property
    def viewer(self) -> napari.viewer.Viewer:
        """The viewer this widget belongs to."""
        return self._viewer

    def use_checkpoint(self, path) -> None:
        """Switch the model to the checkpoint file ``path``, for example a fine-tuned model."""
        self._model.value = FILE_CHOICE
        self._checkpoint.value = path
        self._set_status(f"model: {path}")

    def _on_model_changed(self, value: str) -> None:
        self._checkpoint.visible = value == FILE_CHOICE

    def _model_spec(self) -> str:
        if self._model.value in SHIPPED_CHOICES:
            return SHIPPED_CHOICES[self._model.value][0]
        path = self._checkpoint.value
        if path is None or not str(path) or str(path) == ".":
            raise ValueError("no checkpoint file chosen; pick a .pt file or the shipped model")
        return str(path)

    def run(self) -> None:
        """Start segmenting the chosen layer in a background thread."""
        from napari.qt.threading import thread_worker
        from napari.utils.notifications import show_error

        layer = self._image.value
        if layer is None:
            show_error("No Image layer chosen: open an image, then press Run.")
            return
        try:
            model_spec = self._model_spec()
        except ValueError as error:
            show_error(str(error))
            return
        image, has_alpha, axes = layer_image_data(layer)
        layer_kwargs = labels_layer_kwargs(layer)

        worker = thread_worker(_segment_steps)(image, model_spec, has_alpha, axes, layer.name,
                                               self._mirror.value)
        worker.yielded.connect(self._on_progress)
        worker.returned.connect(lambda result: self._add_labels(result, layer_kwargs))
        worker.errored.connect(self._on_error)
        worker.aborted.connect(lambda: self._set_status("cancelled; no layer added"))
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self._run.enabled, self._cancel.enabled = False, True
        self._progress.value = 0
        self._set_status(f"segmenting {layer.name}…")
        worker.start()

    def cancel(self) -> None:
        """Ask the running worker to stop after the current window."""
        if self._worker is not None:
            self._set_status("cancelling…")
            self._worker.quit()

    def _on_progress(self, step: tuple[int, int]) -> None:
        done, total = step
        self._progress.max = total
        self._progress.value = done

    def _on_error(self, error: Exception) -> None:
        from napari.utils.notifications import show_error

        logger.error("segmentation failed: %s", error)
        self._set_status("failed; see the notification")
        show_error(f"Segmentation failed: {error}")

    def _add_labels(self, result: tuple, layer_kwargs: dict) -> None:
        labels, task, probabilities, postprocess = result
        # NOTE: napari builds the layer on the GUI thread. For 4096 x 4096
        # labels that blocked the event loop for about 0.8 s on a shared 2-core
        # CPU, most of it importing pandas for the session's first Labels layer.
        layer = self._viewer.add_labels(labels, **layer_kwargs)
        self._last = (probabilities, layer) if task == "cells" else None
        self._threshold.enabled = self._min_size.enabled = self._split_depth.enabled = task == "cells"
        if task == "cells":
            with self._threshold.changed.blocked(), self._min_size.changed.blocked(), \
                    self._split_depth.changed.blocked():
                self._threshold.value = postprocess["prob_threshold"]
                self._min_size.value = postprocess["min_size"]
                self._split_depth.value = postprocess.get("split_depth", 0.0)
        if task == "semantic":
            share = 100 * np.count_nonzero(labels) / max(labels.size, 1)
            self._set_status(f"classes: {share:.1f} % of pixels in foreground classes")
        elif labels.ndim == 2:
            self._set_status(f"{int(labels.max())} objects")
        else:
            self._set_status(f"{labels.shape[0]} planes, up to {int(labels.max())} objects per plane")

    def _relabel(self, _value=None) -> None:
        """Redraw the last cell labels with the current threshold, minimum size and split depth."""
        from ..inference.postprocess import relabel_planes

        if self._last is None:
            return
        probabilities, layer = self._last
        if layer not in self._viewer.layers:
            self._last = None  # the user deleted the layer
            return
        layer.data = relabel_planes(probabilities, self._threshold.value, self._min_size.value,
                                    self._split_depth.value)
        self._set_status(f"{int(layer.data.max())} objects (threshold {self._threshold.value:.2f}, "
                         f"min size {self._min_size.value}, split depth {self._split_depth.value:g})")

    def _on_finished(self) -> None:
        self._worker = None
        self._run.enabled, self._cancel.enabled = True, False

    def _set_status(self, text: str) -> None:
        self._status.value = text


def mirror_checkbox() -> CheckBox:
    """Return the *Test-time mirroring* box of the Segment and Batch widgets, unticked."""
    return CheckBox(label="Test-time mirroring", value=False,
                    tooltip="Average over 4 mirror images of each window: 4 to 7 times slower")


def _segment_steps(data, model_spec: str, has_alpha: bool, axes: str, name: str, mirror: bool = False):
    """Worker body: read the pixels, load the model, yield (done, total), return labels and probabilities."""
    from ..inference.predict import iter_segment_image
    from ..pretrained import load_model

    image = np.asarray(data)  # reads lazy (dask, zarr) data here, off the GUI thread
    loaded = load_model(model_spec)
    result = yield from iter_segment_image(image, loaded, has_alpha=has_alpha, axes=axes,
                                           name=f"layer {name!r}", mirror=mirror)
    postprocess = dict(loaded.postprocess)
    return result.labels, loaded.task, result.probabilities, postprocess
