"""The training loop: one process or many (torchrun), resumable, with logs and checkpoints.

Files in the run folder (``--out``):

- ``config.yaml``: the resolved configuration;
- ``last.pt``: weights plus optimiser, scheduler, random-number and epoch
  state, rewritten atomically after every epoch; ``--resume`` continues from it;
- ``best.pt``: the weights of the best validation epoch (the moving average
  of the weights when ``train.ema_decay`` is set);
- ``model.pt``: the final checkpoint (best weights, tuned post-processing,
  model card), ready for napari and ``xlstm-unet segment``;
- ``log.csv`` (loss, learning rate, validation score per epoch),
  ``tensorboard/`` when tensorboard is installed, and ``eval/`` with the
  per-image CSV and summary of the validation (and test) images.

Under torchrun every process trains on its own share of the patches
(DistributedSampler) and DistributedDataParallel averages the gradients;
only rank 0 validates, logs and writes files.
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import logging
import math
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from ..model import build_model, preset
from ..model.checkpoint import (
    DEFAULT_NORMALIZATION,
    DEFAULT_POSTPROCESS,
    LoadedModel,
    load_checkpoint,
    save_checkpoint,
    transfer_weights,
)
from ..pretrained import resolve_model_path
from .augment import PatchDataset, group_weights
from .config import TrainConfig, save_config
from .data import RejectedPair, load_sample, resolve_splits
from .evaluation import cell_scores, class_scores, predict_all, tune_postprocess, validation_score, write_report
from .losses import deep_supervision_loss

logger = logging.getLogger(__name__)

ENCODER_PREFIXES = ("stem.", "encoder.", "vil.")


class TrainingError(RuntimeError):
    """A run that cannot continue, with the reason and what to do."""


def learning_rate_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then polynomial decay with exponent 0.9 (nnU-Net's schedule)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 1 - progress) ** 0.9


def _distributed() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    if world > 1:
        return dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0"))
    return 0, 1, 0


def _device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if name == "cuda":
        return torch.device(f"cuda:{local_rank}")
    return torch.device(name)


def _all_finite(model: torch.nn.Module) -> bool:
    return all(torch.isfinite(p).all().item() for p in model.state_dict().values() if p.is_floating_point())


def weights_digest(state_dict: dict[str, torch.Tensor]) -> str:
    """Return a SHA-256 over the names and bytes of every tensor, in key order."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        digest.update(key.encode())
        digest.update(state_dict[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def build_network(config: TrainConfig, n_classes: int) -> tuple[torch.nn.Module, object, dict, str | None, dict]:
    """Return (model, model config, normalisation, init source, starting post-processing) for a run.

    With ``model.init`` the architecture and normalisation come from that
    checkpoint. Rule for a different number of classes: every tensor is
    copied except the output heads (``heads.*``), which are re-initialised.
    """
    if not config.model.init:
        model_config = preset(config.model.preset, in_channels=3, num_classes=n_classes, xlstm=config.model.xlstm,
                              vil_directions=config.model.vil_directions)
        return build_model(model_config), model_config, dict(DEFAULT_NORMALIZATION), None, dict(DEFAULT_POSTPROCESS)
    path = resolve_model_path(config.model.init)
    source = load_checkpoint(path)
    model_config = source.config
    if model_config.num_classes != n_classes:
        logger.info("init %s has %d classes, this task %d: output heads re-initialised",
                    path, model_config.num_classes, n_classes)
        values = model_config.to_dict()
        values["num_classes"] = n_classes
        model_config = type(model_config).from_dict(values)
    model = build_model(model_config)
    transfer_weights(model, source, skip_prefixes=("heads.",) if source.config.num_classes != n_classes else ())
    logger.info("starting from %s (%s, xlstm=%s); model.preset and model.xlstm are ignored",
                path, model_config.widths, model_config.xlstm)
    start = dict(source.postprocess) if source.task == "cells" and source.postprocess else dict(DEFAULT_POSTPROCESS)
    return model, model_config, dict(source.normalization), str(path), start


def _optimizer(config: TrainConfig, params) -> torch.optim.Optimizer:
    if config.train.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.train.momentum,
                               nesterov=True, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


class _Logs:
    """CSV log, optional TensorBoard writer and console lines; active on rank 0 only."""

    FIELDS = ("epoch", "step", "loss", "lr", "val_score", "skipped_steps", "seconds")

    def __init__(self, out: Path, active: bool) -> None:
        self.active = active
        self.path = out / "log.csv"
        self.tensorboard = None
        if not active:
            return
        if not self.path.exists():
            with open(self.path, "w", newline="", encoding="utf-8") as handle:
                csv.writer(handle).writerow(self.FIELDS)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            logger.info("tensorboard not installed: no TensorBoard log (pip install tensorboard)")
        else:
            self.tensorboard = SummaryWriter(str(out / "tensorboard"))

    def epoch(self, row: dict) -> None:
        if not self.active:
            return
        with open(self.path, "a", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerow([row[f] for f in self.FIELDS])
        if self.tensorboard is not None:
            for key in ("loss", "lr", "val_score"):
                if not math.isnan(row[key]):
                    self.tensorboard.add_scalar(key, row[key], row["step"])
            self.tensorboard.flush()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def run(config: TrainConfig, out: Path, resume: bool = False, command: str = "") -> Path | None:
    """Train according to ``config`` in the run folder ``out``; return ``out/model.pt`` (rank 0).

    This drains :func:`iter_run`, the generator form that reports progress.

    Raises
    ------
    TrainingError
        If the run folder already contains a run and ``resume`` is false, or the
        model's weights become non-finite.
    """
    steps = iter_run(config, out, resume, command)
    while True:
        try:
            next(steps)
        except StopIteration as stop:
            return stop.value


def iter_run(config: TrainConfig, out: Path, resume: bool = False, command: str = ""):
    """Generator form of :func:`run`: yields a progress dict after every step and epoch.

    Step events are ``{"kind": "step", "step": n, "total_steps": N, "loss": x}``;
    epoch events add ``"epoch"``, ``"val_score"`` and ``"kind": "epoch"``.
    Closing the generator (a cancelled napari worker) stops the run between
    steps; ``last.pt`` then contains the last finished epoch and ``model.pt`` is
    not written. The return value is the path of ``model.pt`` (rank 0).
    """
    rank, world, local_rank = _distributed()
    is_main = rank == 0
    device = _device(config.train.device, local_rank)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    last_path = out / "last.pt"
    if resume and not last_path.is_file():
        raise TrainingError(f"--resume given but {last_path} does not exist; start without --resume")
    if not resume and last_path.exists():
        raise TrainingError(
            f"{out} already contains a run ({last_path.name}); continue it with --resume or choose another --out"
        )
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(config, out / "config.yaml")

    torch.manual_seed(config.train.seed)
    task = config.task
    class_names = list(config.data.classes)
    model, model_config, normalization, init_source, start_postprocess = build_network(config, len(class_names))
    model.to(device).train()
    if config.model.freeze_encoder:
        for name, parameter in model.named_parameters():
            if name.startswith(ENCODER_PREFIXES):
                parameter.requires_grad_(False)
        logger.info("encoder frozen: only the decoder and heads train")
    trainable = [p for p in model.parameters() if p.requires_grad]

    splits = resolve_splits(config.data)
    load = lambda pair: load_sample(pair, task, model_config.in_channels, normalization,  # noqa: E731
                                    len(class_names), config.data.ignore_value, config.data.scale)
    train_samples, val_samples = _load_all(load, splits["train"]), _load_all(load, splits.get("val", []))
    if not train_samples:
        raise TrainingError("every training pair was left out; see the warnings above")
    if config.val.max_images:
        val_samples = val_samples[: config.val.max_images]
    test_pairs = splits.get("test", [])
    if not val_samples:
        logger.warning("validation skipped: no validation images (give data.val_dir or data.val_fraction > 0 "
                       "with at least 2 pairs); the last epoch's weights are kept")
    batch_size = config.train.batch_size
    if batch_size > len(train_samples):
        logger.info("batch size %d clipped to the %d training images", batch_size, len(train_samples))
        batch_size = len(train_samples)
    logger.info("%d training, %d validation, %d test images; device %s; %d process(es)",
                len(train_samples), len(val_samples), len(test_pairs), device, world)

    groups = [s.group for s in train_samples]
    weights = group_weights(groups) if config.data.group_sampling == "sqrt" and len(set(groups)) > 1 else None
    steps_per_epoch = config.train.iters_per_epoch
    dataset = PatchDataset(train_samples, config.train.patch_size, steps_per_epoch * batch_size * world,
                           config.train.seed, config.train.foreground_fraction, weights,
                           config.train.colour_jitter, config.train.stain_jitter)
    sampler = DistributedSampler(dataset, world, rank, shuffle=False) if world > 1 else None
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=config.train.num_workers,
                        drop_last=True)

    optimizer = _optimizer(config, trainable)
    total_steps = config.train.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, total_steps, config.train.warmup_iters))
    use_amp = config.train.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

    state = {"epoch": 0, "step": 0, "best_score": -math.inf, "history": [], "seconds": 0.0, "command": command}
    ema = _moving_average(model, config.train.ema_decay)
    if resume:
        payload = torch.load(last_path, map_location="cpu", weights_only=True)
        model.load_state_dict(payload["state_dict"])
        training = payload["training_state"]
        if ema is not None:
            if "ema" not in training:
                raise TrainingError(f"{last_path} was written without train.ema_decay; resume it with "
                                    "--set train.ema_decay=0 or start a new run")
            ema.load_state_dict(training["ema"])
        optimizer.load_state_dict(training["optimizer"])
        scheduler.load_state_dict(training["scheduler"])
        scaler.load_state_dict(training["scaler"])
        torch.set_rng_state(training["torch_rng"])
        first_command = training.get("command", "")
        state = {k: training.get(k, state[k]) for k in state}
        state["command"] = f"{first_command}; resumed with: {command}" if first_command else command
        if state["epoch"] >= config.train.epochs and (out / "model.pt").is_file():
            logger.info("%s is already complete (epoch %d of %d); nothing to do. Raise train.epochs "
                        "with --set to train longer", out, state["epoch"], config.train.epochs)
            return out / "model.pt"
        logger.info("resumed %s at epoch %d (step %d)", last_path, state["epoch"], state["step"])

    network = model
    if world > 1:
        network = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    logs = _Logs(out, is_main)
    start = time.time() - state["seconds"]
    postprocess = dict(start_postprocess)
    try:
        from tqdm import tqdm
    except ImportError:  # progress bars are optional
        tqdm = None

    try:
        for epoch in range(state["epoch"], config.train.epochs):
            dataset.set_epoch(epoch)
            losses, skipped = [], 0
            batches = loader
            if tqdm is not None and is_main:
                batches = tqdm(loader, desc=f"epoch {epoch + 1}/{config.train.epochs}", leave=False,
                               mininterval=1.0 if sys.stderr.isatty() else 30.0)
            for images, targets in batches:
                images, targets = images.to(device), targets.to(device)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                    outputs = network(images)
                loss = deep_supervision_loss(outputs, targets)
                finite = torch.isfinite(loss.detach()).float()
                if world > 1:
                    dist.all_reduce(finite, op=dist.ReduceOp.MIN)  # every rank must skip together
                optimizer.zero_grad(set_to_none=True)
                if finite.item() < 1:
                    logger.warning("step %d: non-finite loss (%s), step skipped", state["step"], loss.item())
                    skipped += 1
                    with warnings.catch_warnings():
                        # The schedule follows the step count, skipped steps included.
                        warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
                        scheduler.step()
                    state["step"] += 1
                    yield {"kind": "step", "step": state["step"], "total_steps": total_steps, "loss": float("nan")}
                    continue
                else:
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(trainable, config.train.grad_clip)
                    scaler.step(optimizer)
                    scaler.update()
                    if ema is not None:
                        ema.update_parameters(model)
                    losses.append(loss.item())
                scheduler.step()
                state["step"] += 1
                yield {"kind": "step", "step": state["step"], "total_steps": total_steps,
                       "loss": losses[-1] if losses else float("nan")}

            scored = model if ema is None else ema.module
            if not _all_finite(model):
                raise TrainingError(
                    f"weights became non-finite in epoch {epoch + 1}; nothing was saved for this epoch. "
                    f"Lower train.lr (now {config.lr}) and resume from {last_path}"
                )
            val_score = float("nan")
            last_epoch = epoch + 1 == config.train.epochs
            if is_main and val_samples and ((epoch + 1) % config.val.every == 0 or last_epoch):
                probabilities = predict_all(scored, val_samples, model_config.num_classes, device,
                                            config.val.tile_size)
                val_score = validation_score(task, probabilities, val_samples, postprocess,
                                             config.val.nsd_tolerance, class_names)
                if val_score > state["best_score"]:
                    state["best_score"] = val_score
                    _save(out / "best.pt", scored, model_config, task, class_names, normalization, postprocess, {},
                          input_scale=config.data.scale)
            state["epoch"] = epoch + 1
            state["seconds"] = time.time() - start
            mean_loss = float(np.mean(losses)) if losses else float("nan")
            row = {"epoch": epoch + 1, "step": state["step"], "loss": mean_loss, "lr": scheduler.get_last_lr()[0],
                   "val_score": val_score, "skipped_steps": skipped,
                   "seconds": round(state["seconds"], 1)}
            state["history"].append(row)
            logs.epoch(row)
            yield {"kind": "epoch", "total_steps": total_steps, **row}
            if is_main:
                logger.info("epoch %d/%d loss %.4f val %.4f (best %.4f) %.0f s", epoch + 1, config.train.epochs,
                            row["loss"], val_score, state["best_score"], state["seconds"])
                training_state = {
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(), "torch_rng": torch.get_rng_state(), **state,
                }
                if ema is not None:
                    training_state["ema"] = ema.state_dict()
                _save(last_path, model, model_config, task, class_names, normalization, postprocess, {},
                      extra={"training_state": training_state}, input_scale=config.data.scale)
            if world > 1:
                dist.barrier()
            if config.train.stop_after_epoch and epoch + 1 >= config.train.stop_after_epoch and not last_epoch:
                logger.info("stopped after epoch %d as asked; continue with --resume", epoch + 1)
                return None
    finally:
        # Also when the generator is closed early (a cancelled napari worker).
        logs.close()

    _check_ranks_agree(model, out, world, is_main)
    if not is_main:
        return None
    if val_samples and (out / "best.pt").is_file():
        model.load_state_dict(load_checkpoint(out / "best.pt").model.state_dict())
    elif ema is not None:
        model.load_state_dict(ema.module.state_dict())
    return _finish(config, out, model, model_config, device, task, class_names, normalization,
                   len(train_samples), val_samples, test_pairs, state, init_source, command, start_postprocess)


def _moving_average(model: torch.nn.Module, decay: float):
    """Return an exponential moving average of ``model``'s weights, or None when ``decay`` is 0.

    Buffers are averaged with the parameters. The networks keep no running
    statistics (InstanceNorm, LayerNorm, GroupNorm), so the average is a complete model.
    """
    if not decay:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def _load_all(load, pairs) -> list:
    samples = []
    for pair in pairs:
        try:
            samples.append(load(pair))
        except RejectedPair as error:
            logger.warning("%s", error)
    return samples


def _check_ranks_agree(model: torch.nn.Module, out: Path, world: int, is_main: bool) -> None:
    """Record every rank's weight digest in ``ranks.json``; log an error if they differ."""
    digest = weights_digest(model.state_dict())
    digests = [digest]
    if world > 1:
        digests = [None] * world
        dist.all_gather_object(digests, digest)
    if is_main:
        import json

        with open(out / "ranks.json", "w", encoding="utf-8") as handle:
            json.dump({"world_size": world, "digests": digests}, handle, indent=2)
        if len(set(digests)) > 1:
            logger.error("processes ended with different weights: %s", digests)


def _save(path, model, model_config, task, class_names, normalization, postprocess, card, extra=None,
          input_scale: float = 1.0) -> None:
    if not _all_finite(model):
        raise TrainingError(f"refusing to write {path}: the weights are not finite")
    loaded = LoadedModel(model=model, config=model_config, task=task, class_names=class_names,
                         normalization=normalization, postprocess=postprocess, model_card=card,
                         input_scale=input_scale)
    save_checkpoint(path, loaded, extra=extra)


def _finish(config, out, model, model_config, device, task, class_names, normalization, n_train,
            val_samples, test_pairs, state, init_source, command, start_postprocess) -> Path:
    """Tune post-processing on validation, write the reports and ``model.pt``."""
    postprocess = dict(start_postprocess) if task == "cells" else {}
    card_scores = {}
    report_dir = out / "eval"
    for name, samples in (("val", val_samples), ("test", None)):
        if name == "test":
            if not test_pairs:
                continue
            samples = [load_sample(p, task, model_config.in_channels, normalization, len(class_names),
                                   config.data.ignore_value, config.data.scale) for p in test_pairs]
        probabilities = predict_all(model, samples, model_config.num_classes, device, config.val.tile_size)
        if task == "cells":
            if name == "val" and config.val.tune_postprocess and len(samples) < 3:
                logger.warning("only %d validation image(s): post-processing kept at %s instead of tuning",
                               len(samples), postprocess)
            elif name == "val" and config.val.tune_postprocess:
                postprocess, tuned = tune_postprocess(probabilities, samples, postprocess)
                logger.info("post-processing tuned on validation: %s (F1 %.4f)", postprocess, tuned)
            rows = cell_scores(probabilities, samples, postprocess["prob_threshold"], postprocess["min_size"],
                               postprocess.get("split_depth", 0.0))
            summary = write_report(rows, report_dir, name)
            card_scores[f"{name}_f1_at_0.5"] = round(summary.get("mean_f1", float("nan")), 4)
        else:
            rows = class_scores(probabilities, samples, config.val.nsd_tolerance, class_names)
            summary = write_report(rows, report_dir, name)
            card_scores[f"{name}_dice"] = round(summary.get("mean_dice", float("nan")), 4)
            card_scores[f"{name}_nsd"] = round(summary.get("mean_nsd", float("nan")), 4)
        logger.info("%s report: %s", name, {k: round(v, 4) for k, v in summary.items()})

    card = {
        "name": out.name,
        "task": task,
        "data": (f"{config.data.split_csv or config.data.train_dir}: {n_train} training and "
                 f"{len(val_samples)} validation images"),
        "command": state.get("command", command),
        "date": datetime.date.today().isoformat(),
        "training_seconds": round(state["seconds"]),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, device {device}",
        "init": init_source,
        "config": config.to_dict(),
        "history": state["history"],
        **card_scores,
    }
    final = out / "model.pt"
    _save(final, model.cpu().eval(), model_config, task, class_names, normalization, postprocess, card,
          input_scale=config.data.scale)
    logger.info("wrote %s", final)
    return final
