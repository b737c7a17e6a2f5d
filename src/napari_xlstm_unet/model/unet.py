"""The 2D xLSTM-UNet: residual encoder, optional ViL blocks, residual decoder."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import IdentityResidualBlock, ResidualBlock, UpsampleProject, make_stage
from .config import ModelConfig
from .vil import ViLLayer2d

__all__ = ["XLSTMUNet", "build_model"]


class XLSTMUNet(nn.Module):
    """Residual U-Net whose encoder may carry Vision-LSTM blocks.

    Any input height and width works: the input is padded (reflect where
    possible, else replicate) to a multiple of the total stride, and at least
    two pixels at the bottleneck, and the logits are cropped back. The
    exception is channel-token mode (``config.vil_channel_tokens``): its
    inputs may be no larger than ``config.patch_size`` and are padded to it.

    Parameters
    ----------
    config : ModelConfig
        Network shape; see :class:`~napari_xlstm_unet.model.config.ModelConfig`.

    Notes
    -----
    In training mode with ``deep_supervision`` the forward pass returns a list
    of logits maps, full resolution first, one per decoder stage. In eval mode
    (or without deep supervision) it returns the full-resolution logits only,
    shape (B, num_classes, H, W).
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        widths, strides = config.widths, config.strides
        n_stages = len(widths)

        # The stem's identity blocks live in their own container, so that
        # checkpoints of one-block stems keep their parameter names.
        self.stem = ResidualBlock(config.in_channels, widths[0])
        self.stem_identity = nn.Sequential(
            *[IdentityResidualBlock(widths[0]) for _ in range(config.stem_blocks - 1)]
        )
        self.encoder = nn.ModuleList()
        previous = widths[0]
        for s in range(n_stages):
            self.encoder.append(make_stage(previous, widths[s], strides[s], config.encoder_blocks[s]))
            previous = widths[s]
        channel_token_grids = config.channel_token_grids
        self.vil = nn.ModuleDict({
            str(s): ViLLayer2d(
                widths[s],
                directions=config.vil_directions,
                channel_token_grid=channel_token_grids.get(s),
            )
            for s in config.vil_stages
        })

        # Decoder stage s (0 = full resolution) takes stage s + 1's output.
        self.upsample = nn.ModuleList()
        self.decoder = nn.ModuleList()
        self.heads = nn.ModuleList()
        for s in range(n_stages - 1):
            self.upsample.append(UpsampleProject(widths[s + 1], widths[s], strides[s + 1]))
            uses_skip = s > 0 or config.full_resolution_skip
            in_channels = 2 * widths[s] if uses_skip else widths[s]
            self.decoder.append(make_stage(in_channels, widths[s], 1, config.decoder_blocks[s]))
            self.heads.append(nn.Conv2d(widths[s], config.num_classes, 1, bias=True))
        self._init_conv_weights()

    def _init_conv_weights(self) -> None:
        # He initialisation with LeakyReLU slope 0.01 for convs; ViL keeps its own.
        for name, module in self.named_modules():
            if name.startswith("vil"):
                continue
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, a=0.01)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def _pad(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        height, width = x.shape[-2:]
        stride = self.config.total_stride
        target_h = max(math.ceil(height / stride) * stride, 2 * stride)
        target_w = max(math.ceil(width / stride) * stride, 2 * stride)
        if self.config.channel_token_grids:
            # Channel-token ViLs only take the planned size: smaller inputs grow to it.
            patch_h, patch_w = self.config.patch_size
            target_h, target_w = max(target_h, patch_h), max(target_w, patch_w)
        pad_h, pad_w = target_h - height, target_w - width
        if pad_h or pad_w:
            mode = "reflect" if pad_h < height and pad_w < width else "replicate"
            x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
        return x, height, width

    def _check_channel_token_size(self, padded_height: int, padded_width: int, height: int, width: int) -> None:
        # Channel-token ViLs have weights sized for one feature-map size, so
        # the padded input must equal the planned patch size.
        if not self.config.channel_token_grids:
            return
        patch_h, patch_w = self.config.patch_size
        if (padded_height, padded_width) == (patch_h, patch_w):
            return
        raise ValueError(
            f"this network uses channel-token ViL layers built for {patch_h} x {patch_w} inputs, "
            f"so an input may be at most {patch_h} pixels high and {patch_w} wide (smaller ones are "
            f"padded); got {height} x {width}. Predict in windows of at most that size (tile size), "
            f"or build the network without vil_channel_tokens."
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        x, height, width = self._pad(x)
        self._check_channel_token_size(x.shape[-2], x.shape[-1], height, width)

        skips = []
        x = self.stem_identity(self.stem(x))
        for s, stage in enumerate(self.encoder):
            x = stage(x)
            if str(s) in self.vil:
                x = self.vil[str(s)](x)  # the ViL output replaces the stage output
            skips.append(x)

        outputs = []
        x = skips[-1]
        for s in reversed(range(len(self.decoder))):
            x = self.upsample[s](x)
            if s > 0 or self.config.full_resolution_skip:
                x = torch.cat([x, skips[s]], dim=1)
            x = self.decoder[s](x)
            if self.training and self.config.deep_supervision or s == 0:
                outputs.append(self.heads[s](x))

        outputs.reverse()  # full resolution first
        outputs[0] = outputs[0][..., :height, :width]
        if self.training and self.config.deep_supervision:
            return outputs
        return outputs[0]


def build_model(config: ModelConfig) -> XLSTMUNet:
    """Build an :class:`XLSTMUNet` from a config."""
    return XLSTMUNet(config)
