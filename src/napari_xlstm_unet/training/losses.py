"""Cross-entropy plus soft Dice, summed over deep-supervision outputs."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX


def deep_supervision_weights(n_outputs: int) -> list[float]:
    """Return weights 2^-i, the lowest resolution set to 0, normalised to sum 1 (nnU-Net's rule)."""
    weights = [0.5**i for i in range(n_outputs)]
    if n_outputs > 1:
        weights[-1] = 0.0
    total = math.fsum(weights)
    return [w / total for w in weights]


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5,
                 ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Return CE + (1 - soft Dice) for logits (B, K, H, W) and class targets (B, H, W).

    Dice is computed over the whole batch per foreground class (background
    excluded) and averaged over those classes, as nnU-Net does in 2D. Pixels
    equal to ``ignore_index`` count in neither term.
    """
    logits = logits.float()  # the loss runs in float32 under autocast too
    ce = F.cross_entropy(logits, target, ignore_index=ignore_index)
    valid = (target != ignore_index).unsqueeze(1)  # (B, 1, H, W)
    safe_target = torch.where(valid[:, 0], target, torch.zeros_like(target))
    probabilities = logits.softmax(dim=1)[:, 1:] * valid  # (B, K-1, H, W)
    one_hot = F.one_hot(safe_target, logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].float() * valid
    intersection = (probabilities * one_hot).sum(dim=(0, 2, 3))
    denominator = probabilities.sum(dim=(0, 2, 3)) + one_hot.sum(dim=(0, 2, 3))
    dice = (2 * intersection + smooth) / (denominator + smooth)
    if not valid.any():
        ce = logits.sum() * 0.0  # cross_entropy gives NaN when every pixel is ignored
    return ce + (1 - dice.mean())


def deep_supervision_loss(outputs: list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """Weight :func:`dice_ce_loss` over outputs (full resolution first).

    Targets are downsampled by nearest-neighbour slicing to each output's
    size. Outputs of weight 0 still enter with a zero factor, so that every
    parameter takes part in the graph, which DistributedDataParallel needs.
    """
    weights = deep_supervision_weights(len(outputs))
    total = outputs[0].new_zeros((), dtype=torch.float32)
    for weight, logits in zip(weights, outputs):
        if weight == 0.0:
            total = total + logits.float().sum() * 0.0
            continue
        factor = target.shape[-1] // logits.shape[-1]
        scaled_target = target[:, ::factor, ::factor] if factor > 1 else target
        total = total + weight * dice_ce_loss(logits, scaled_target)
    return total
