"""Tune a cell checkpoint's post-processing on its validation images and store it.

    python training/tune_postprocess.py src/napari_xlstm_unet/weights/cells_small.pt \
        --config training/configs/cells_small.yaml

The network runs once over the validation split. The seed threshold, minimum
size and split depth are then searched on the grid that training uses
(``napari_xlstm_unet.training.evaluation``). The checkpoint keeps its weights.
Its ``postprocess`` and the model card's ``val_f1_at_0.5`` are replaced. The
card keeps the values from before the first tuning under ``postprocess_before``
(a second tuning leaves them). When nothing changes, the file is left
untouched. Paths in the config are read from the current folder, as in
training. Use it when the post-processing gains a parameter after a model
was trained.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import yaml

from napari_xlstm_unet.model.checkpoint import load_checkpoint, save_checkpoint
from napari_xlstm_unet.training.config import load_config
from napari_xlstm_unet.training.data import load_sample, resolve_splits
from napari_xlstm_unet.training.evaluation import predict_all, tune_postprocess

logger = logging.getLogger("tune_postprocess")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="cell checkpoint (.pt), rewritten in place")
    parser.add_argument("--config", type=Path, required=True,
                        help="the training YAML, which names the validation split")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        loaded = load_checkpoint(args.checkpoint)
        config = load_config(args.config)
    except (OSError, ValueError, yaml.YAMLError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if loaded.task != "cells":
        print(f"error: {args.checkpoint} is a {loaded.task!r} model; only cell models have post-processing "
              "to tune", file=sys.stderr)
        return 2
    try:
        pairs = resolve_splits(config.data).get("val", [])
    except (OSError, ValueError) as error:
        print(f"error: {error} (paths in {args.config} are read from {Path.cwd()})", file=sys.stderr)
        return 2
    if len(pairs) < 3:
        print(f"error: {len(pairs)} validation image(s) in the config's split; tuning needs at least 3",
              file=sys.stderr)
        return 2
    samples = [load_sample(pair, "cells", loaded.config.in_channels, loaded.normalization, 3,
                           config.data.ignore_value, config.data.scale) for pair in pairs]
    probabilities = predict_all(loaded.model, samples, loaded.config.num_classes, torch.device("cpu"),
                                config.val.tile_size)
    before = dict(loaded.postprocess)
    tuned, f1 = tune_postprocess(probabilities, samples, before)
    logger.info("%d validation images: %s gives mean F1 %.4f (was %s)", len(samples), tuned, f1, before)
    if tuned == before and loaded.model_card.get("val_f1_at_0.5") == round(f1, 4):
        # Nothing to store: leave the file (and its SHA-256) as it is.
        print(f"{args.checkpoint}: post-processing {tuned} unchanged, validation F1 {f1:.4f}")
        return 0
    loaded.postprocess = tuned
    loaded.model_card.setdefault("postprocess_before", before)
    loaded.model_card["val_f1_at_0.5"] = round(f1, 4)
    save_checkpoint(args.checkpoint, loaded)
    print(f"{args.checkpoint}: post-processing {tuned}, validation F1 {f1:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
