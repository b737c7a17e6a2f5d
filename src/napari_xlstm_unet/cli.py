"""Command line: ``xlstm-unet segment`` and ``xlstm-unet evaluate``, for cells and endoscopy."""

from __future__ import annotations

import argparse
import csv
import logging
import os
import sys
from pathlib import Path

import numpy as np

from . import __version__
from .io import read_image, strip_labels_suffix

__all__ = ["main"]

logger = logging.getLogger(__name__)


def _in_range(low: float, high: float):
    # argparse puts "argument --NAME: " before these messages.
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number from {low:g} to {high:g}, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must lie in [{low:g}, {high:g}], got {value:g}")
        return value
    return parse


def _integer_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number of at least {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


def _build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="log progress and timings")

    parser = argparse.ArgumentParser(
        prog="xlstm-unet", description="Segment cells, nuclei and endoscopy frames with a 2D xLSTM-UNet.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    formatter = _DefaultsFormatter

    segment = commands.add_parser(
        "segment", parents=[common], formatter_class=formatter,
        help="write <stem>_labels.tif labels (cell instances or endoscopy classes) for each input image",
    )
    segment.add_argument("--task", choices=["cells", "endoscopy"], default="cells",
                         help="cells: instance labels of nuclei and cells; endoscopy: class maps of RGB frames")
    segment.add_argument("inputs", nargs="+", type=Path, help="image files or folders of images")
    segment.add_argument("--out", type=Path, required=True, help="output folder")
    segment.add_argument("--model", default=None,
                         help="shipped model name (cells, polyps, instruments) or checkpoint file (.pt); "
                              "default: cells, or polyps for --task endoscopy")
    segment.add_argument("--prob-threshold", type=_in_range(0.0, 1.0),
                         default=None,
                         help="interior probability (0 to 1) that seeds an object; default: the model's tuned value")
    segment.add_argument("--min-size", type=_integer_at_least(0), default=None,
                         help="smallest object kept, in pixels; default: the model's tuned value")
    segment.add_argument("--split-depth", type=_in_range(0.0, 50.0), default=None,
                         help="split seeds holding several touching nuclei: the smallest dip, in pixels, of "
                              "the seed's distance map between two nuclei; larger splits less, 0 never "
                              "splits (0 to 50); default: the model's tuned value")
    segment.add_argument("--tile-size", type=_integer_at_least(16), default=512,
                         help="sliding-window side in pixels")
    segment.add_argument("--overlap", type=_in_range(0.0, 0.9), default=0.125,
                         help="fraction of a window shared with its neighbour")
    segment.add_argument("--device", default=None,
                         help="cpu, cuda or mps (Apple GPUs, always float32); None picks cuda when "
                              "PyTorch sees a CUDA GPU, else cpu")
    segment.add_argument("--precision", choices=["float32", "bfloat16"], default="float32",
                         help="arithmetic of the convolutions; bfloat16 is faster on CPUs with "
                              "native bfloat16 (AVX512-BF16, AMX) and on recent GPUs")
    segment.add_argument("--mirror", action="store_true",
                         help="test-time mirroring: average over the 4 mirror images of each window "
                              "(4 network passes; about 5 times slower on 2 CPU cores)")
    segment.add_argument("--overwrite", action="store_true", help="replace existing output files")
    segment.add_argument("--recursive", action="store_true", help="also segment images in subfolders")
    segment.add_argument("--pattern", default="*", help="only files whose name matches, for example '*.tif'")
    segment.add_argument("--gt-dir", type=Path, default=None,
                         help="ground-truth folder matched by stem: adds F1 (cells) or Dice and NSD to results.csv")

    evaluate = commands.add_parser(
        "evaluate", parents=[common], formatter_class=formatter,
        help="score predictions against ground truth: F1 at an IoU threshold (cells), Dice and NSD (endoscopy)",
    )
    evaluate.add_argument("--task", choices=["cells", "endoscopy"], default="cells",
                          help="cells: instance matching; endoscopy: per-class Dice and NSD of class maps")
    evaluate.add_argument("pred_dir", type=Path, help="folder of predicted label images")
    evaluate.add_argument("gt_dir", type=Path, help="folder of ground-truth label images")
    evaluate.add_argument("--csv", type=Path, default=None, help="write per-image rows to this CSV file")
    evaluate.add_argument("--iou", type=_in_range(0.0, 1.0), default=0.5,
                          help="IoU threshold of a true positive")
    evaluate.add_argument("--border-width", type=_integer_at_least(0), default=2,
                          help="cells: ignore objects touching this many edge pixels (0 keeps all)")
    evaluate.add_argument("--tolerance", type=float, default=2.0,
                          help="endoscopy: NSD tolerance in pixels")
    evaluate.add_argument("--ignore-value", type=int, default=None,
                          help="endoscopy: ground-truth value left out of the scores, for example 255")
    return parser


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults in the help, except for required options, which have none."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required:
            return action.help
        return super()._get_help_string(action)


def _check_device(device: str | None) -> None:
    # Only a requested GPU is checked, so --device cpu makes no CUDA call.
    if device is None or not device.startswith(("cuda", "mps")):
        return
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"--device {device} was requested but this PyTorch build sees no CUDA GPU; "
            "use --device cpu, or install a CUDA build of PyTorch"
        )
    if device.startswith("mps") and not torch.backends.mps.is_available():
        raise ValueError(
            f"--device {device} was requested but PyTorch sees no Apple MPS device; use --device cpu"
        )


def _segment(args: argparse.Namespace) -> int:
    from .batch import BatchOptions, run_batch

    _check_device(args.device)
    cell_flags = [flag for flag, value in (("--prob-threshold", args.prob_threshold), ("--min-size", args.min_size),
                                           ("--split-depth", args.split_depth)) if value is not None]
    if cell_flags and args.task != "cells":
        verb = "applies" if len(cell_flags) == 1 else "apply"
        print(f"warning: {', '.join(cell_flags)} {verb} only to cell models; --task {args.task} ignores "
              f"{'it' if len(cell_flags) == 1 else 'them'}", file=sys.stderr)
    options = BatchOptions(
        out_dir=args.out, task=args.task, model=args.model, recursive=args.recursive, pattern=args.pattern,
        gt_dir=args.gt_dir, overwrite=args.overwrite, prob_threshold=args.prob_threshold,
        min_size=args.min_size, split_depth=args.split_depth, tile_size=args.tile_size, overlap=args.overlap,
        precision=args.precision, device=args.device, mirror=args.mirror,
    )

    def report(result, done: int, total: int) -> None:
        if result.status == "ok":
            found = (f"{result.objects} objects" if args.task == "cells" else f"class areas {result.class_areas}")
            scores = "".join(f", {k} {v:.3f}" for k, v in result.metrics.items())
            print(f"[{done}/{total}] {result.input} -> {result.output}: {found}{scores}, {result.seconds:.2f} s")
        elif result.status == "skipped":
            print(f"[{done}/{total}] skipped {result.input}: {result.output} exists (use --overwrite to replace it)")
        else:
            print(f"[{done}/{total}] failed {result.input}: {result.reason}", file=sys.stderr)

    summary = run_batch(args.inputs, options, on_result=report)
    print(f"done: {summary['ok']} segmented, {summary['skipped']} skipped, {summary['failed']} failed; "
          f"details in {summary['results_csv']}")
    return 1 if summary["failed"] else 0


def _label_files(folder: Path) -> dict[str, Path]:
    if folder.is_file():
        raise ValueError(f"{folder} is a file; evaluate compares two folders of label images")
    if not folder.is_dir():
        raise FileNotFoundError(f"folder not found: {folder}")
    return {
        strip_labels_suffix(p.stem): p
        for p in sorted(folder.iterdir())
        if p.is_file() and p.suffix.lower() in (".tif", ".tiff", ".png")
        and not p.name.startswith(".")
    }


def _read_labels(path: Path) -> np.ndarray:
    labels = np.squeeze(read_image(path).data)
    if labels.ndim != 2:
        raise ValueError(f"{path} has shape {labels.shape}; expected a 2D label image")
    if labels.dtype.kind == "f":
        # Fiji and other tools often save label images as 32-bit float.
        if not (np.isfinite(labels).all() and (labels >= 0).all() and (labels == np.round(labels)).all()):
            raise ValueError(f"{path} is a {labels.dtype} image with non-integer or negative values; "
                             "expected a label image (0 background, 1..N objects). Save labels as integers")
        labels = labels.astype(np.int64)
    return labels


def _warn_if_not_labels(path: Path, labels: np.ndarray) -> None:
    # A folder of raw images passed as predictions reads as labels whose
    # grey values are object ids, and scores F1 near 0 with no other sign.
    foreground = np.count_nonzero(labels) / max(labels.size, 1)
    if labels.size >= 1024 and foreground > 0.99:
        print(f"warning: {foreground:.1%} of the pixels of {path} are non-zero; it looks like an image "
              "rather than instance labels (0 = background). Give evaluate the folder of label images "
              "that `xlstm-unet segment` wrote", file=sys.stderr)


def _read_pair(name: str, predictions: dict, truths: dict) -> tuple[np.ndarray, np.ndarray]:
    """Return (ground truth, prediction) of ``name``, raising ValueError or OSError naming the file."""
    true, pred = _read_labels(truths[name]), _read_labels(predictions[name])
    if true.shape != pred.shape:
        raise ValueError(f"{predictions[name]} has shape {pred.shape} but its ground truth "
                         f"{truths[name]} has {true.shape}")
    return true, pred


def _finish(scored: int, failed: list[str]) -> int:
    """Print the failed files and return the exit code: 1 when any file failed."""
    if failed:
        print(f"{len(failed)} of {scored + len(failed)} image pairs failed and are left out of the "
              f"mean: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def _evaluate(args: argparse.Namespace) -> int:
    from .metrics import match_instances, mean_scores

    predictions, truths = _label_files(args.pred_dir), _label_files(args.gt_dir)
    names = sorted(set(predictions) & set(truths))
    for kind, unmatched in (("ground-truth", set(truths) - set(predictions)),
                            ("predicted", set(predictions) - set(truths))):
        if unmatched:
            print(f"note: {len(unmatched)} {kind} files have no partner and are skipped, "
                  f"e.g. {sorted(unmatched)[0]}", file=sys.stderr)
    if not names:
        print(f"no matching names between {args.pred_dir} and {args.gt_dir}", file=sys.stderr)
        return 2

    if args.task == "endoscopy":
        return _evaluate_classes(args, names, predictions, truths)
    if args.border_width:
        print(f"objects touching a {args.border_width}-pixel band along the image edge are "
              "excluded (--border-width 0 keeps them)")
    rows, results, failed = [], [], []
    print(f"{'name':40s} {'n_true':>6s} {'n_pred':>6s} {'tp':>5s} {'precision':>9s} {'recall':>7s} {'f1':>7s}")
    for name in names:
        try:
            true, pred = _read_pair(name, predictions, truths)
        except (OSError, ValueError) as error:
            print(f"failed {name}: {error}", file=sys.stderr)
            failed.append(name)
            continue
        _warn_if_not_labels(predictions[name], pred)
        result = match_instances(true, pred, args.iou, args.border_width)
        results.append(result)
        rows.append({"name": name, **result.to_dict()})
        print(f"{name:40s} {result.n_true:6d} {result.n_pred:6d} {result.tp:5d} "
              f"{result.precision:9.4f} {result.recall:7.4f} {result.f1:7.4f}")
    if results:
        means = mean_scores(results)
        print(f"{'mean':40s} {'':6s} {'':6s} {'':5s} {means['precision']:9.4f} "
              f"{means['recall']:7.4f} {means['f1']:7.4f}  ({len(results)} images, IoU {args.iou})")
        _write_csv(args.csv, rows)
    return _finish(len(results), failed)


def _write_csv(path: Path | None, rows: list[dict]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")


def _evaluate_classes(args: argparse.Namespace, names: list[str], predictions: dict, truths: dict) -> int:
    from .masks import IGNORE_INDEX, ground_truth_classes
    from .metrics import mean_semantic_scores, semantic_scores

    print(f"Dice and NSD (tolerance {args.tolerance:g} px) per image over the classes present in "
          "the ground truth or the prediction; an image empty in both scores 1.0")
    print(f"{'name':40s} {'classes':>7s} {'dice':>7s} {'nsd':>7s}")
    rows, results, failed = [], [], []
    for name in names:
        try:
            raw, pred = _read_pair(name, predictions, truths)
            true = ground_truth_classes(raw, truths[name], pred, args.ignore_value)
        except (OSError, ValueError) as error:
            print(f"failed {name}: {error}", file=sys.stderr)
            failed.append(name)
            continue
        result = semantic_scores(true, pred, tolerance=args.tolerance, ignore=true == IGNORE_INDEX)
        results.append(result)
        row = {"name": name, "dice": result.dice, "nsd": result.nsd, "n_classes": result.n_classes}
        for class_id, scores in sorted(result.per_class.items()):
            row[f"dice_{class_id}"] = scores["dice"]
            row[f"nsd_{class_id}"] = scores["nsd"]
        rows.append(row)
        print(f"{name:40s} {result.n_classes:7d} {result.dice:7.4f} {result.nsd:7.4f}")
    if results:
        means = mean_semantic_scores(results)
        print(f"{'mean':40s} {'':7s} {means['dice']:7.4f} {means['nsd']:7.4f}  ({len(results)} images)")
        _write_csv(args.csv, rows)
    return _finish(len(results), failed)


class _PipeSafeStdout:
    """Wrap stdout so that a closed pipe (``| head``) silences the output instead of stopping the run.

    After the first ``BrokenPipeError`` the stream's file descriptor points at
    /dev/null, so later writes, and the interpreter's final flush, succeed.
    """

    def __init__(self, stream) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._silence()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._silence()

    def _silence(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())
        os.close(devnull)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    stdout, sys.stdout = sys.stdout, _PipeSafeStdout(sys.stdout)
    try:
        if args.command == "segment":
            return _segment(args)
        return _evaluate(args)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        sys.stdout = stdout


if __name__ == "__main__":
    raise SystemExit(main())
