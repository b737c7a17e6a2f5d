"""Command line: ``xlstm-unet segment`` and ``xlstm-unet evaluate``."""

from __future__ import annotations

import argparse
import csv
import logging
import sys
from pathlib import Path

import numpy as np

from .io import labels_output_path, list_images, read_image, strip_labels_suffix, write_labels

__all__ = ["main"]

logger = logging.getLogger(__name__)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xlstm-unet", description="Segment cells and nuclei with a 2D xLSTM-UNet."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress and timings")
    commands = parser.add_subparsers(dest="command", required=True)

    segment = commands.add_parser(
        "segment", help="write <stem>_labels.tif instance labels for each input image"
    )
    segment.add_argument("inputs", nargs="+", type=Path, help="image files or folders of images")
    segment.add_argument("--out", type=Path, required=True, help="output folder")
    segment.add_argument("--model", default=None,
                         help="shipped model name ('cells', the default) or checkpoint file (.pt)")
    segment.add_argument("--prob-threshold", type=float, default=None,
                         help="interior probability that seeds an object (default: the model's)")
    segment.add_argument("--min-size", type=int, default=None,
                         help="smallest object kept, in pixels (default: the model's)")
    segment.add_argument("--tile-size", type=int, default=512, help="sliding-window side in pixels")
    segment.add_argument("--overlap", type=float, default=0.125, help="window overlap fraction")
    segment.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    segment.add_argument("--overwrite", action="store_true", help="replace existing output files")

    evaluate = commands.add_parser(
        "evaluate", help="score predicted labels against ground truth (F1 at an IoU threshold)"
    )
    evaluate.add_argument("pred_dir", type=Path, help="folder of predicted label images")
    evaluate.add_argument("gt_dir", type=Path, help="folder of ground-truth label images")
    evaluate.add_argument("--csv", type=Path, default=None, help="write per-image rows to this CSV file")
    evaluate.add_argument("--iou", type=float, default=0.5, help="IoU threshold of a true positive")
    evaluate.add_argument("--border-width", type=int, default=2,
                          help="ignore objects touching this many edge pixels (0 keeps all)")
    return parser


def _segment(args: argparse.Namespace) -> int:
    from .inference.predict import segment_image
    from .pretrained import load_model

    files = list_images(args.inputs)
    if not files:
        print("no image files found in the inputs", file=sys.stderr)
        return 1
    loaded = load_model(args.model, device=args.device)
    args.out.mkdir(parents=True, exist_ok=True)

    taken: set[Path] = set()
    failed = skipped = 0
    for path in files:
        out_path = labels_output_path(path, args.out, taken)
        if out_path.exists() and not args.overwrite:
            print(f"skipped {path}: {out_path} exists (use --overwrite to replace it)")
            skipped += 1
            continue
        try:
            image = read_image(path)
            result = segment_image(
                image.data, loaded, args.prob_threshold, args.min_size,
                args.tile_size, args.overlap, image.has_alpha,
            )
            write_labels(out_path, result.labels, image.resolution, image.resolution_unit,
                         overwrite=args.overwrite)
        except (ValueError, OSError, TypeError, RuntimeError) as error:
            # RuntimeError covers torch failures such as running out of memory.
            print(f"failed {path}: {error}", file=sys.stderr)
            failed += 1
            continue
        print(f"{path} -> {out_path}: {int(result.labels.max())} objects, {result.seconds:.2f} s")

    done = len(files) - failed - skipped
    print(f"done: {done} segmented, {skipped} skipped, {failed} failed")
    return 1 if failed else 0


def _label_files(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"folder not found: {folder}")
    return {
        strip_labels_suffix(p.stem): p
        for p in sorted(folder.iterdir())
        if p.is_file() and p.suffix.lower() in (".tif", ".tiff", ".png")
        and not p.name.startswith(".")
    }


def _evaluate(args: argparse.Namespace) -> int:
    from .metrics import match_instances, mean_scores

    predictions, truths = _label_files(args.pred_dir), _label_files(args.gt_dir)
    names = sorted(set(predictions) & set(truths))
    missing = sorted(set(truths) - set(predictions))
    if missing:
        print(f"warning: {len(missing)} ground-truth files have no prediction, e.g. {missing[0]}",
              file=sys.stderr)
    if not names:
        print(f"no matching names between {args.pred_dir} and {args.gt_dir}", file=sys.stderr)
        return 1

    rows, results = [], []
    print(f"{'name':40s} {'n_true':>6s} {'n_pred':>6s} {'tp':>5s} {'precision':>9s} {'recall':>7s} {'f1':>7s}")
    for name in names:
        true = np.squeeze(read_image(truths[name]).data)
        pred = np.squeeze(read_image(predictions[name]).data)
        result = match_instances(true, pred, args.iou, args.border_width)
        results.append(result)
        rows.append({"name": name, **result.to_dict()})
        print(f"{name:40s} {result.n_true:6d} {result.n_pred:6d} {result.tp:5d} "
              f"{result.precision:9.4f} {result.recall:7.4f} {result.f1:7.4f}")
    means = mean_scores(results)
    print(f"{'mean':40s} {'':6s} {'':6s} {'':5s} {means['precision']:9.4f} "
          f"{means['recall']:7.4f} {means['f1']:7.4f}  ({len(results)} images, IoU {args.iou})")

    if args.csv is not None:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {args.csv}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "segment":
            return _segment(args)
        return _evaluate(args)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
