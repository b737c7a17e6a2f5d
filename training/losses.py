"""Cross-entropy plus soft Dice, summed over deep-supervision outputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dataset import deep_supervision_weights


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
    """Return CE + (1 - soft Dice) for logits (B, K, H, W) and class targets (B, H, W).

    Dice is computed over the whole batch per foreground class (background
    excluded) and averaged over those classes, as nnU-Net does in 2D.
    """
    ce = F.cross_entropy(logits, target)
    probabilities = logits.softmax(dim=1)[:, 1:]  # (B, K-1, H, W)
    one_hot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].float()
    intersection = (probabilities * one_hot).sum(dim=(0, 2, 3))
    denominator = probabilities.sum(dim=(0, 2, 3)) + one_hot.sum(dim=(0, 2, 3))
    dice = (2 * intersection + smooth) / (denominator + smooth)
    return ce + (1 - dice.mean())


def deep_supervision_loss(outputs: list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """Weight :func:`dice_ce_loss` over outputs (full resolution first).

    Targets are downsampled by nearest-neighbour slicing to each output's size.
    """
    weights = deep_supervision_weights(len(outputs))
    total = outputs[0].new_zeros(())
    for weight, logits in zip(weights, outputs):
        if weight == 0.0:
            continue
        factor = target.shape[-1] // logits.shape[-1]
        scaled_target = target[:, ::factor, ::factor] if factor > 1 else target
        total = total + weight * dice_ce_loss(logits, scaled_target)
    return total
