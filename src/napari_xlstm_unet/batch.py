"""Batch segmentation of many files: one engine behind ``xlstm-unet segment`` and the Batch widget.

Rules:

- Each file is isolated: a file that cannot be read or segmented is reported
  with the reason, and the run goes on.
- Outputs are ``<stem>_labels.tif`` in the output folder (mirroring
  subfolders in a recursive run), written atomically. An existing output is
  skipped unless ``overwrite`` is set, so rerunning a stopped run resumes it.
  Inputs are never written.
- The model is loaded once. A reader thread loads the next file and a writer
  thread saves the previous result while the network runs.
- ``run.json`` beside the outputs records the arguments and the model's
  identity (path, SHA-256, task, model card name and date). ``results.csv``
  has one row per file.
- Under ``torchrun`` the files are dealt out to the processes by index
  (file i goes to rank i mod N). Each rank writes its own outputs and
  ``results.rank<r>.csv``, and rank 0 merges them into ``results.csv``.
"""

from __future__ import annotations

import csv
import datetime
import fnmatch
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Generator, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from itertools import chain
from pathlib import Path

import numpy as np

from . import __version__
from .io import IMAGE_SUFFIXES, LABELS_SUFFIX, labels_output_path, read_image, strip_labels_suffix, write_labels

__all__ = [
    "BatchOptions",
    "FileResult",
    "find_images",
    "iter_batch",
    "iter_run_batch",
    "plan_outputs",
    "run_batch",
]

logger = logging.getLogger(__name__)

RESULT_FIELDS = ("input", "output", "status", "reason", "shape", "objects", "class_areas", "seconds",
                 "f1", "precision", "recall", "dice", "nsd")


@dataclass
class BatchOptions:
    """Settings of a batch run.

    Attributes
    ----------
    out_dir : pathlib.Path
        Output folder; created when missing.
    task : {"cells", "endoscopy"}
        Instance labels or class maps.
    model : str, optional
        Shipped model name or checkpoint path; the task's default when None.
    recursive : bool
        Also take images from subfolders (outputs mirror them).
    pattern : str
        Shell pattern the file names must match, for example ``"*.tif"``.
    gt_dir : pathlib.Path, optional
        Ground truth matched by stem (``_labels``/``_label`` suffixes
        ignored); adds metrics to each row.
    overwrite : bool
        Replace existing outputs instead of skipping them.
    prob_threshold, min_size, split_depth, tile_size, overlap, precision, device
        As in :func:`~napari_xlstm_unet.inference.predict.segment_image`.
    mirror : bool
        Test-time mirroring: 4 network passes per window.
    """

    out_dir: Path
    task: str = "cells"
    model: str | None = None
    recursive: bool = False
    pattern: str = "*"
    gt_dir: Path | None = None
    overwrite: bool = False
    prob_threshold: float | None = None
    min_size: int | None = None
    split_depth: float | None = None
    tile_size: int = 512
    overlap: float = 0.125
    precision: str = "float32"
    device: str | None = None
    mirror: bool = False


@dataclass
class FileResult:
    """The outcome of one file: status ``ok``, ``failed`` or ``skipped``, with the reason."""

    input: str
    output: str
    status: str
    reason: str = ""
    shape: str = ""
    objects: int | str = ""
    class_areas: str = ""
    seconds: float | str = ""
    metrics: dict[str, float] = field(default_factory=dict)

    def row(self) -> dict:
        """Return the CSV row of this result."""
        values = {k: v for k, v in asdict(self).items() if k != "metrics"}
        values.update({k: round(v, 6) for k, v in self.metrics.items()})
        return values


def find_images(inputs: Iterable[str | os.PathLike], recursive: bool = False, pattern: str = "*",
                exclude: Path | None = None) -> list[tuple[Path, Path]]:
    """Return ``(file, folder it was found under)`` for every input image, sorted per input.

    Files whose stem ends in ``_labels`` (this package's outputs) and files
    inside ``exclude`` (the output folder) are left out. A missing input
    raises ``FileNotFoundError``.
    """
    found: list[tuple[Path, Path]] = []
    exclude = exclude.resolve() if exclude is not None else None
    for item in inputs:
        root = Path(item)
        if root.is_file():
            found.append((root, root.parent))
            continue
        if not root.is_dir():
            raise FileNotFoundError(f"input not found: {root}")
        candidates = root.rglob("*") if recursive else root.iterdir()
        for path in sorted(candidates):
            if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            if path.stem.endswith(LABELS_SUFFIX) or not fnmatch.fnmatch(path.name, pattern):
                continue
            # The output folder's contents are outputs, unless it is the input folder itself.
            if exclude is not None and exclude != root.resolve() and exclude in path.resolve().parents:
                continue
            found.append((path, root))
    return found


def plan_outputs(found: list[tuple[Path, Path]], out_dir: Path, recursive: bool) -> list[tuple[Path, Path]]:
    """Return ``(input, output)`` pairs; the plan is the same in every process of a run."""
    used: set[Path] = set()
    plan = []
    for path, root in found:
        folder = out_dir / path.parent.relative_to(root) if recursive and path.parent != root else out_dir
        plan.append((path, labels_output_path(path, folder, used)))
    return plan


def _ground_truth(gt_dir: Path | None) -> dict[str, Path]:
    if gt_dir is None:
        return {}
    if not gt_dir.is_dir():
        raise FileNotFoundError(f"ground-truth folder not found: {gt_dir}")
    return {strip_labels_suffix(p.stem): p for p in sorted(gt_dir.iterdir())
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES}


def _metrics(task: str, labels: np.ndarray, truth_path: Path) -> dict[str, float]:
    truth = np.squeeze(read_image(truth_path).data)
    if truth.shape != labels.shape:
        raise ValueError(f"ground truth {truth_path} has shape {truth.shape}, the labels {labels.shape}")
    if task == "cells":
        from .metrics import match_instances

        result = match_instances(truth, labels)
        return {"f1": result.f1, "precision": result.precision, "recall": result.recall}
    from .masks import IGNORE_INDEX, ground_truth_classes
    from .metrics import semantic_scores

    classes = ground_truth_classes(truth, truth_path, labels)
    result = semantic_scores(classes, labels, ignore=classes == IGNORE_INDEX)
    return {"dice": result.dice, "nsd": result.nsd}


def _describe(labels: np.ndarray, task: str) -> tuple[int | str, str]:
    if task == "cells":
        per_plane = labels.reshape((-1,) + labels.shape[-2:]).max(axis=(1, 2))
        return int(per_plane.sum()), ""
    values, counts = np.unique(labels, return_counts=True)
    return "", " ".join(f"{int(v)}:{c / labels.size:.4f}" for v, c in zip(values, counts))


def iter_batch(
    plan: list[tuple[Path, Path]],
    loaded,
    options: BatchOptions,
    should_stop: Callable[[], bool] | None = None,
) -> Generator[FileResult, None, None]:
    """Segment the planned files one by one, yielding a :class:`FileResult` per file.

    Reading the next file and writing the previous result run in background
    threads while the network works. ``should_stop`` is checked before each
    file. A stop finishes the file in progress and writes it. Because each
    result arrives one file late, a stopped run may complete one more file
    than it had reported when the stop came.
    """
    from .inference.predict import segment_image

    truths = _ground_truth(options.gt_dir)
    todo = []
    for path, out_path in plan:
        if out_path.exists() and not options.overwrite:
            yield FileResult(str(path), str(out_path), "skipped", "output exists (overwrite to replace it)")
        else:
            todo.append((path, out_path))

    def read(path: Path):
        return read_image(path)

    with ThreadPoolExecutor(1, "reader") as reader, ThreadPoolExecutor(1, "writer") as writer:
        pending_read: Future | None = reader.submit(read, todo[0][0]) if todo else None
        pending_write: tuple[FileResult, Future] | None = None
        for index, (path, out_path) in enumerate(todo):
            if should_stop is not None and should_stop():
                break
            start = time.perf_counter()
            current, pending_read = pending_read, (reader.submit(read, todo[index + 1][0])
                                                   if index + 1 < len(todo) else None)
            result = FileResult(str(path), str(out_path), "ok")
            try:
                image = current.result()
                segmentation = segment_image(
                    image.data, loaded, options.prob_threshold, options.min_size, options.tile_size,
                    options.overlap, image.has_alpha, precision=options.precision, axes=image.axes,
                    name=str(path), mirror=options.mirror, split_depth=options.split_depth,
                )
                labels = segmentation.labels
                result.shape = "x".join(map(str, labels.shape))
                result.objects, result.class_areas = _describe(labels, options.task)
                truth = truths.get(strip_labels_suffix(path.stem))
                if truth is not None:
                    result.metrics = _metrics(options.task, labels, truth)
                out_path.parent.mkdir(parents=True, exist_ok=True)
                write = writer.submit(write_labels, out_path, labels, image.resolution,
                                      image.resolution_unit, options.overwrite, segmentation.axes)
            except MemoryError as error:
                result.status, result.reason = "failed", (
                    f"out of memory ({error or 'no detail'}); retry with a smaller tile size "
                    "(--tile-size on the command line), for example 256")
                write = None
            except (ValueError, OSError, TypeError, RuntimeError) as error:
                # RuntimeError covers torch failures, torch.OutOfMemoryError among them.
                reason = str(error).splitlines()[0] if str(error) else type(error).__name__
                result.status, result.reason = "failed", reason
                write = None
            if write is None:
                result.output = ""  # nothing was written
            result.seconds = round(time.perf_counter() - start, 3)
            if pending_write is not None:
                yield _finish_write(*pending_write)
            pending_write = (result, write) if write is not None else None
            if write is None:
                yield result
        if pending_write is not None:
            yield _finish_write(*pending_write)


def _finish_write(result: FileResult, write: Future) -> FileResult:
    try:
        write.result()
    except (OSError, ValueError, TypeError) as error:
        result.status, result.reason = "failed", f"could not write {result.output}: {error}"
    return result


def model_identity(loaded) -> dict:
    """Return what identifies a loaded model: path, SHA-256 of its file, task, card name and date, post-processing.

    The post-processing values are the checkpoint's; options given for the
    run (``--prob-threshold`` and the like) replace them and are recorded
    with the options.
    """
    digest = ""
    if loaded.source and Path(loaded.source).is_file():
        digest = hashlib.sha256(Path(loaded.source).read_bytes()).hexdigest()
    card = loaded.model_card or {}
    return {"path": loaded.source, "sha256": digest, "task": loaded.task, "name": card.get("name"),
            "date": card.get("date"), "input_scale": loaded.input_scale, "postprocess": dict(loaded.postprocess)}


def _earlier_rows(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8") as handle:
        return {row["input"]: row for row in csv.DictReader(handle)}


def _write_csv(path: Path, rows: list[dict]) -> None:
    fields = list(RESULT_FIELDS) + sorted({k for r in rows for k in r} - set(RESULT_FIELDS))
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)


def run_batch(inputs: list[str | os.PathLike], options: BatchOptions,
              on_result: Callable[[FileResult, int, int], None] | None = None,
              should_stop: Callable[[], bool] | None = None) -> dict:
    """Segment every image under ``inputs`` into ``options.out_dir``; return the summary.

    Parameters
    ----------
    inputs : list of path-like
        Files and folders.
    options : BatchOptions
        Where and how.
    on_result : callable, optional
        Called as ``on_result(result, done, total)`` after each file.
    should_stop : callable, optional
        Checked between files; a stopped run keeps the outputs it wrote.

    Returns
    -------
    dict
        ``{"ok": n, "failed": n, "skipped": n, "total": n, "results_csv": path}``.
    """
    steps = iter_run_batch(inputs, options, should_stop)
    while True:
        try:
            result, done, total = next(steps)
        except StopIteration as stop:
            return stop.value
        if on_result is not None:
            on_result(result, done, total)


def iter_run_batch(inputs: list[str | os.PathLike], options: BatchOptions,
                   should_stop: Callable[[], bool] | None = None,
                   ) -> Generator[tuple[FileResult, int, int], None, dict]:
    """Generator form of :func:`run_batch`: yields ``(result, done, total)`` per file, returns the summary.

    napari's ``thread_worker`` runs it directly; quitting the worker stops
    the run between files. The results CSV is written when the generator
    finishes, also after a stop requested through ``should_stop``.
    """
    from .pretrained import TASK_CHECKPOINT, TASK_MODELS, load_model

    rank, world = _distributed_rank()
    out_dir = Path(options.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output folder {out_dir} is an existing file; give a folder")
    # A missing input fails on its own, with a row in the results CSV, and the rest still run.
    present = [Path(item) for item in inputs if Path(item).exists()]
    missing = [Path(item) for item in inputs if not Path(item).exists()]
    if not present:
        raise FileNotFoundError(f"none of the inputs exist ({', '.join(map(str, missing))}); check the paths")
    found = find_images(present, options.recursive, options.pattern, exclude=out_dir)
    plan = plan_outputs(found, out_dir, options.recursive)
    if not plan:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) matching {options.pattern!r} "
                                f"found in {', '.join(map(str, inputs))}")
    device = options.device
    if world > 1 and device in (None, "cuda"):
        import torch

        if torch.cuda.is_available():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"  # one GPU per process
    loaded = load_model(options.model or TASK_MODELS[options.task], device=device)
    if loaded.task != TASK_CHECKPOINT[options.task]:
        raise ValueError(
            f"model {loaded.source} is a {loaded.task!r} model, which does not fit the task {options.task!r}; "
            f"choose a {TASK_CHECKPOINT[options.task]!r} model or the matching task"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    mine = plan[rank::world]
    if rank == 0:
        record = {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "package_version": __version__,
            "inputs": [str(p) for p in inputs],
            "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()},
            "model": model_identity(loaded),
            "processes": world,
        }
        (out_dir / "run.json").write_text(json.dumps(record, indent=2), encoding="utf-8")

    rows = []
    csv_path = out_dir / (f"results.rank{rank}.csv" if world > 1 else "results.csv")
    earlier = _earlier_rows(csv_path)
    not_found = [FileResult(str(path), "", "failed", "file or folder not found") for path in missing] \
        if rank == 0 else []
    total = len(not_found) + len(mine)
    try:
        for done, result in enumerate(chain(not_found, iter_batch(mine, loaded, options, should_stop)), start=1):
            row = result.row()
            # A file skipped because an earlier run segmented it keeps that run's details.
            if result.status == "skipped" and earlier.get(row["input"], {}).get("status") == "ok":
                row = {**earlier[row["input"]], "status": "skipped", "reason": "segmented by an earlier run"}
            rows.append(row)
            yield result, done, total
    finally:
        # Also when the consumer stops early (a quit worker closes the generator).
        _write_csv(csv_path, rows)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        if rank == 0:
            for other in range(1, world):
                part = out_dir / f"results.rank{other}.csv"
                with open(part, newline="", encoding="utf-8") as handle:
                    rows += list(csv.DictReader(handle))
            rows.sort(key=lambda r: r["input"])
            _write_csv(out_dir / "results.csv", rows)
        dist.barrier()
    summary = {status: sum(r["status"] == status for r in rows) for status in ("ok", "failed", "skipped")}
    summary.update(total=len(rows), results_csv=str(out_dir / "results.csv"))
    return summary


def _distributed_rank() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        import torch

        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world
