"""Train a cell-segmentation xLSTM-UNet from image/mask folders.

Example (the shipped model's command):

    python training/train.py --split training/splits/dsb2018.csv \
        --data-root ../shared/data --out runs/cells_small.pt

The model comes from the package (``napari_xlstm_unet.model``), so a
checkpoint written here opens in napari and in ``xlstm-unet segment``.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dataset import PatchSampler, load_sample, read_split  # noqa: E402
from losses import deep_supervision_loss  # noqa: E402

from napari_xlstm_unet.inference.postprocess import probabilities_to_labels  # noqa: E402
from napari_xlstm_unet.inference.tiling import predict_tiled  # noqa: E402
from napari_xlstm_unet.metrics import match_instances  # noqa: E402
from napari_xlstm_unet.model import build_model, preset  # noqa: E402
from napari_xlstm_unet.model.checkpoint import (  # noqa: E402
    DEFAULT_NORMALIZATION,
    LoadedModel,
    save_checkpoint,
)

logger = logging.getLogger("train")

THRESHOLD_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
MIN_SIZE_GRID = (0, 8, 16, 32, 48, 64)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", type=Path, required=True,
                        help="CSV with columns dataset, name, split (train / val / test)")
    parser.add_argument("--data-root", type=Path, required=True,
                        help="folder holding the dataset folders named in the split CSV")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint file to write (.pt)")
    parser.add_argument("--preset", default="small", help="model preset: small or reference")
    parser.add_argument("--xlstm", default="bot", choices=["none", "bot", "enc"],
                        help="where the ViL blocks go")
    parser.add_argument("--epochs", type=int, default=28)
    parser.add_argument("--iters-per-epoch", type=int, default=60, help="optimiser steps per epoch")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--patch-size", type=int, default=192, help="training patch side in pixels")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate")
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--warmup-iters", type=int, default=30)
    parser.add_argument("--grad-clip", type=float, default=12.0, help="gradient-norm clip")
    parser.add_argument("--val-tile-size", type=int, default=512,
                        help="sliding-window side for validation; lower it for --xlstm enc")
    parser.add_argument("--max-val-images", type=int, default=0,
                        help="validate on at most this many images (0 = all)")
    parser.add_argument("--group-sampling", choices=["uniform", "sqrt"], default="sqrt",
                        help="draw images uniformly, or weighted by 1/sqrt(size of their modality group)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    return parser.parse_args(argv)


def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then polynomial decay with exponent 0.9 (nnU-Net's schedule)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (1 - progress) ** 0.9


def validation_probabilities(model, samples, device, tile_size: int) -> list[np.ndarray]:
    model.eval()
    with torch.inference_mode():
        probs = [predict_tiled(model, s.image, 3, tile_size=tile_size, device=device) for s in samples]
    model.train()
    return probs


def mean_f1(probabilities, samples, threshold: float, min_size: int) -> float:
    scores = [
        match_instances(s.instances, probabilities_to_labels(p, threshold, min_size)).f1
        for p, s in zip(probabilities, samples)
    ]
    return float(np.mean(scores))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))

    config = preset(args.preset, in_channels=3, num_classes=3, xlstm=args.xlstm)
    normalization = dict(DEFAULT_NORMALIZATION)
    pairs = read_split(args.split, args.data_root)
    train = [load_sample(i, m, config.in_channels, normalization) for i, m, _ in pairs["train"]]
    val = [load_sample(i, m, config.in_channels, normalization) for i, m, _ in pairs.get("val", [])]
    groups = [g for _, _, g in pairs["train"]] if args.group_sampling == "sqrt" else None
    if args.max_val_images:
        val = val[: args.max_val_images]
    logger.info("train %d images, validation %d images, device %s", len(train), len(val), device)

    model = build_model(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    sampler = PatchSampler(train, args.patch_size, seed=args.seed, groups=groups)
    total_steps = args.epochs * args.iters_per_epoch

    best_f1, best_state, history = -1.0, None, []
    start = time.time()
    step = 0
    for epoch in range(args.epochs):
        losses = []
        for _ in range(args.iters_per_epoch):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, total_steps, args.lr, args.warmup_iters)
            images, targets = sampler.batch(args.batch_size)
            outputs = model(images.to(device))
            loss = deep_supervision_loss(outputs, targets.to(device))
            if not torch.isfinite(loss):
                logger.warning("step %d: non-finite loss %s, step skipped", step, loss.item())
                optimizer.zero_grad(set_to_none=True)
                step += 1
                continue
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            optimizer.step()
            losses.append(loss.item())
            step += 1

        val_f1 = float("nan")
        if val:
            probabilities = validation_probabilities(model, val, device, args.val_tile_size)
            val_f1 = mean_f1(probabilities, val, 0.5, 16)
            if val_f1 > best_f1:
                best_f1 = val_f1
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "val_f1": val_f1})
        logger.info("epoch %d/%d loss %.4f val F1@0.5 %.4f (best %.4f) %.0f s",
                    epoch + 1, args.epochs, np.mean(losses), val_f1, best_f1, time.time() - start)

    if best_state is not None:
        model.load_state_dict(best_state)
    train_seconds = time.time() - start

    postprocess = {"prob_threshold": 0.5, "min_size": 16}
    if val:
        probabilities = validation_probabilities(model, val, device, args.val_tile_size)
        grid = {(t, m): mean_f1(probabilities, val, t, m) for t in THRESHOLD_GRID for m in MIN_SIZE_GRID}
        (threshold, min_size), tuned_f1 = max(grid.items(), key=lambda item: item[1])
        postprocess = {"prob_threshold": threshold, "min_size": min_size}
        logger.info("tuned post-processing on validation: %s, F1 %.4f", postprocess, tuned_f1)

    model_card = {
        "name": args.out.stem,
        "task": "cells: nuclei and cells, 3 classes turned into instances",
        "data": f"split {args.split.name}: {len(train)} training and {len(val)} validation images",
        "command": "python training/train.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.date.today().isoformat(),
        "training_seconds": round(train_seconds),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, device {device}",
        "validation_f1_at_0.5": round(best_f1, 4),
        "history": history,
    }
    loaded = LoadedModel(
        model=model.cpu().eval(), config=config, task="cells",
        class_names=["background", "interior", "boundary"],
        normalization=normalization, postprocess=postprocess, model_card=model_card,
    )
    save_checkpoint(args.out, loaded)
    logger.info("wrote %s after %.0f s", args.out, train_seconds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
