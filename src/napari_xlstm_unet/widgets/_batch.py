"""Batch dock widget: a thin shell over :func:`~napari_xlstm_unet.batch.iter_run_batch`.

The run goes in a napari ``thread_worker``; progress arrives after each file
and Cancel stops between files. When the run ends, a table lists every file,
and the selected rows open in the viewer as image and label layers.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    Label,
    LineEdit,
    ProgressBar,
    PushButton,
    Table,
)

from ._segment import mirror_checkbox

if TYPE_CHECKING:
    import napari

__all__ = ["BatchWidget"]

logger = logging.getLogger(__name__)

TABLE_COLUMNS = ("input", "status", "objects", "class_areas", "seconds", "reason")
DEFAULT_MODEL = "task default"
FILE_CHOICE = "checkpoint file…"


class BatchWidget(Container):
    """Dock widget: segment every image of a folder into an output folder."""

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        super().__init__(labels=True)
        from ..pretrained import available_models

        self._viewer = viewer
        self._worker = None
        self._results: list[dict] = []
        self.input_dir = FileEdit(label="Input folder", mode="d")
        self.output_dir = FileEdit(label="Output folder", mode="d")
        self.task = ComboBox(label="Task", choices=["cells", "endoscopy"], value="cells")
        self.model = ComboBox(label="Model", choices=[DEFAULT_MODEL, *available_models(), FILE_CHOICE],
                              value=DEFAULT_MODEL)
        self.checkpoint = FileEdit(label="Checkpoint", mode="r", filter="*.pt", visible=False)
        self.recursive = CheckBox(label="Subfolders", value=False)
        self.pattern = LineEdit(label="File pattern", value="*")
        self.gt_dir = FileEdit(label="Ground truth (optional)", mode="d", nullable=True, value=None)
        self.overwrite = CheckBox(label="Overwrite outputs", value=False)
        self.mirror = mirror_checkbox()
        self.run_button = PushButton(text="Run")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="Files", min=0, max=1, value=0)
        self.current = Label(label="Current", value="")
        self.table = Table(value=_table_value([]))
        self.open_button = PushButton(text="Open selected in viewer")
        self.extend([self.input_dir, self.output_dir, self.task, self.model, self.checkpoint, self.recursive,
                     self.pattern, self.gt_dir, self.overwrite, self.mirror, self.run_button, self.cancel_button,
                     self.progress, self.current, self.table, self.open_button])
        self.model.changed.connect(lambda value: setattr(self.checkpoint, "visible", value == FILE_CHOICE))
        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        self.open_button.changed.connect(self.open_selected)

    def options(self):
        """Return the :class:`~napari_xlstm_unet.batch.BatchOptions` the fields describe."""
        from ..batch import BatchOptions

        if not _chosen(self.input_dir.value):
            raise ValueError("no input folder chosen; pick the folder of images to segment")
        if not _chosen(self.output_dir.value):
            raise ValueError("no output folder chosen; pick where the label images go")
        model = None
        if self.model.value == FILE_CHOICE:
            if not _chosen(self.checkpoint.value):
                raise ValueError("no checkpoint file chosen; pick a .pt file or a shipped model")
            model = str(self.checkpoint.value)
        elif self.model.value != DEFAULT_MODEL:
            model = self.model.value
        return BatchOptions(
            out_dir=Path(self.output_dir.value), task=self.task.value, model=model,
            recursive=self.recursive.value, pattern=self.pattern.value or "*",
            gt_dir=Path(self.gt_dir.value) if self.gt_dir.value is not None else None,
            overwrite=self.overwrite.value, mirror=self.mirror.value,
        )

    def run(self) -> None:
        """Start the batch in a background thread."""
        from napari.qt.threading import thread_worker
        from napari.utils.notifications import show_error

        from ..batch import iter_run_batch

        try:
            options = self.options()
        except ValueError as error:
            show_error(str(error))
            return
        self._results = []
        self.table.value = _table_value([])
        worker = thread_worker(iter_run_batch)([Path(self.input_dir.value)], options)
        worker.yielded.connect(self._on_file)
        worker.returned.connect(self._on_summary)
        worker.errored.connect(self._on_error)
        worker.aborted.connect(lambda: self._finish_table("cancelled"))
        worker.finished.connect(self._on_finished)
        self._worker = worker
        self.run_button.enabled, self.cancel_button.enabled = False, True
        self.progress.value = 0
        self.current.value = "starting…"
        worker.start()

    def cancel(self) -> None:
        """Stop the run after the file in progress."""
        if self._worker is not None:
            self.current.value = "cancelling after the current file…"
            self._worker.quit()

    def _on_file(self, step) -> None:
        result, done, total = step
        self._results.append(result.row())
        self.progress.max = total
        self.progress.value = done
        self.current.value = f"{done} of {total}: {Path(result.input).name} ({result.status})"

    def _on_summary(self, summary: dict) -> None:
        self._finish_table(f"{summary['ok']} ok, {summary['failed']} failed, {summary['skipped']} skipped; "
                           f"{summary['results_csv']}")

    def _finish_table(self, message: str) -> None:
        self.table.value = _table_value(self._results)
        self.current.value = message

    def _on_error(self, error: Exception) -> None:
        from napari.utils.notifications import show_error

        logger.error("batch run failed: %s", error)
        self.current.value = "failed; see the notification"
        show_error(f"Batch run failed: {error}")

    def _on_finished(self) -> None:
        self._worker = None
        self.run_button.enabled, self.cancel_button.enabled = True, False

    def selected_rows(self) -> list[int]:
        """Return the indices of the table rows the user selected."""
        native = self.table.native
        return sorted({index.row() for index in native.selectedIndexes()})

    def open_selected(self, rows: list[int] | None = None) -> None:
        """Open the input and the labels of the chosen (or selected) rows as layers."""
        from ..io import read_image

        for index in self.selected_rows() if rows is None else rows:
            row = self._results[index]
            if row["status"] == "failed":
                continue
            image = read_image(row["input"])
            self._viewer.add_image(image.data, name=Path(row["input"]).stem,
                                   rgb=image.data.ndim == 3 and image.data.shape[-1] in (3, 4))
            self._viewer.add_labels(read_image(row["output"]).data, name=Path(row["output"]).stem)


def _table_value(rows: list[dict]) -> dict:
    # magicgui's "split" form: data, index and columns.
    return {"data": [[str(row.get(c, "")) for c in TABLE_COLUMNS] for row in rows],
            "index": [str(i + 1) for i in range(len(rows))], "columns": list(TABLE_COLUMNS)}


def _chosen(value) -> bool:
    return value is not None and str(value) not in ("", ".")
