"""Convolutional building blocks of the residual U-Net.

Each conv has a bias, each norm is an affine InstanceNorm (eps 1e-5) and each
activation a LeakyReLU with slope 0.01, as in nnU-Net's residual encoder.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ResidualBlock", "IdentityResidualBlock", "UpsampleProject", "make_stage"]


def _conv_norm(in_channels: int, out_channels: int, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=True),
        nn.InstanceNorm2d(out_channels, eps=1e-5, affine=True),
    ]


class ResidualBlock(nn.Module):
    """conv-norm-act-conv-norm plus a 1x1 projection skip, then act.

    Used where the channel count or resolution changes.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *_conv_norm(in_channels, out_channels, stride),
            nn.LeakyReLU(0.01, inplace=True),
            *_conv_norm(out_channels, out_channels),
        )
        self.skip = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=True)
        self.act = nn.LeakyReLU(0.01, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.skip(x))


class IdentityResidualBlock(nn.Module):
    """conv-norm-act-conv-norm plus an identity skip, then act."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *_conv_norm(channels, channels),
            nn.LeakyReLU(0.01, inplace=True),
            *_conv_norm(channels, channels),
        )
        self.act = nn.LeakyReLU(0.01, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + x)


def make_stage(in_channels: int, out_channels: int, stride: int, num_blocks: int) -> nn.Sequential:
    """Build one projecting residual block followed by ``num_blocks - 1`` identity blocks."""
    blocks: list[nn.Module] = [ResidualBlock(in_channels, out_channels, stride)]
    blocks += [IdentityResidualBlock(out_channels) for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


class UpsampleProject(nn.Module):
    """Nearest-neighbour upsampling by ``scale`` followed by a 1x1 conv."""

    def __init__(self, in_channels: int, out_channels: int, scale: int) -> None:
        super().__init__()
        self.scale = scale
        self.proj = nn.Conv2d(in_channels, out_channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale != 1:
            x = nn.functional.interpolate(x, scale_factor=self.scale, mode="nearest")
        return self.proj(x)
