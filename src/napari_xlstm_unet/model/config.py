"""Model configuration: one frozen dataclass that travels with the weights."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

__all__ = ["ModelConfig", "PRESETS", "XLSTM_PLACEMENTS", "preset"]

XLSTM_PLACEMENTS = ("none", "bot", "enc", "full")
VIL_DIRECTIONS = (1, 2)


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a 2D xLSTM-UNet.

    The fields from ``stem_blocks`` on were added later. Their defaults give
    the network that existed before them, so configs saved in older
    checkpoints load unchanged.

    Parameters
    ----------
    in_channels : int
        Number of image channels the network reads.
    num_classes : int
        Number of output classes, background included.
    widths : tuple of int
        Feature channels of each encoder stage, highest resolution first.
    strides : tuple of int
        Downsampling factor of each stage; the first is usually 1.
    encoder_blocks : tuple of int
        Residual blocks per encoder stage (at least 1).
    decoder_blocks : tuple of int
        Residual blocks per decoder stage, one entry per stage except the
        bottleneck, highest resolution first.
    xlstm : {"none", "bot", "enc", "full"}
        Where Vision-LSTM (ViL) layers go. "none" gives a plain residual
        U-Net. "bot" puts one after the bottleneck stage. "enc" puts them
        after the encoder stages chosen by the reference rule
        ``(s odd) XOR (n_stages odd)`` and ``s > 1``. "full" puts one after
        every encoder stage, stage 0 at full resolution included.
    full_resolution_skip : bool
        Concatenate the full-resolution encoder output into the last decoder
        stage. The reference code drops this skip; keeping it helps thin cell
        boundaries.
    deep_supervision : bool
        Return one logits map per decoder stage in training mode.
    stem_blocks : int
        Residual blocks in the stem: one projecting block from the input
        channels, then ``stem_blocks - 1`` identity blocks. The reference
        code uses ``encoder_blocks[0]``.
    vil_directions : {1, 2}
        ViL blocks per ViL layer. 1 runs one block over the tokens in
        row-major order from the top left. 2 follows it with a second block
        that reads the tokens from the bottom right (the sequence is flipped
        before and after it), as Vision-LSTM v2's block pair does. Every
        output token then depends on every input token.
    vil_channel_tokens : bool
        Channel-token mode of the reference ``enc`` network. Where a ViL
        stage has at most as many pixels as channels at ``patch_size``, the
        channels become the tokens and the H*W pixels the token width. Such
        a network accepts only inputs that pad to ``patch_size``.
    patch_size : tuple of int or None
        Input (height, width) the network is planned for. Only channel-token
        mode uses it, and there both sides must be multiples of
        :attr:`total_stride` and at least twice it.
    """

    in_channels: int = 3
    num_classes: int = 3
    widths: tuple[int, ...] = (16, 32, 64, 128, 192)
    strides: tuple[int, ...] = (1, 2, 2, 2, 2)
    encoder_blocks: tuple[int, ...] = (1, 1, 2, 2, 2)
    decoder_blocks: tuple[int, ...] = (1, 1, 1, 1)
    xlstm: str = "bot"
    full_resolution_skip: bool = True
    deep_supervision: bool = True
    stem_blocks: int = 1
    vil_directions: int = 1
    vil_channel_tokens: bool = False
    patch_size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        n_stages = len(self.widths)
        if n_stages < 2:
            raise ValueError(f"widths must list at least 2 stages, got {self.widths!r}")
        for name in ("strides", "encoder_blocks"):
            value = getattr(self, name)
            if len(value) != n_stages:
                raise ValueError(
                    f"{name} must have one entry per stage ({n_stages}), got {value!r}"
                )
        if len(self.decoder_blocks) != n_stages - 1:
            raise ValueError(
                f"decoder_blocks must have {n_stages - 1} entries (one per stage "
                f"except the bottleneck), got {self.decoder_blocks!r}"
            )
        if self.xlstm not in XLSTM_PLACEMENTS:
            raise ValueError(
                f"xlstm must be one of {XLSTM_PLACEMENTS}, got {self.xlstm!r}"
            )
        if min(self.encoder_blocks) < 1 or min(self.decoder_blocks) < 1 or self.stem_blocks < 1:
            raise ValueError(
                f"the stem and every stage need at least one residual block, got stem_blocks="
                f"{self.stem_blocks}, encoder_blocks={self.encoder_blocks}, "
                f"decoder_blocks={self.decoder_blocks}"
            )
        if self.in_channels < 1 or self.num_classes < 2:
            raise ValueError(
                f"expected in_channels >= 1 and num_classes >= 2, got "
                f"{self.in_channels} and {self.num_classes}"
            )
        if self.vil_directions not in VIL_DIRECTIONS:
            raise ValueError(f"vil_directions must be 1 or 2, got {self.vil_directions!r}")
        self._check_patch_size()

    def _check_patch_size(self) -> None:
        if self.patch_size is not None:
            if len(self.patch_size) != 2 or min(self.patch_size) < 1:
                raise ValueError(
                    f"patch_size must be (height, width) in pixels, got {self.patch_size!r}"
                )
        if not self.vil_channel_tokens:
            return
        if self.patch_size is None:
            raise ValueError(
                "vil_channel_tokens requires patch_size, the input size that the token widths "
                "are computed from. Set it, for example patch_size=(512, 512)."
            )
        # The network pads inputs to a multiple of the total stride, at least
        # twice it, so a padded input can only ever match such a patch size.
        stride = self.total_stride
        if any(side % stride or side < 2 * stride for side in self.patch_size):
            raise ValueError(
                f"with vil_channel_tokens, both sides of patch_size must be multiples of the "
                f"total stride {stride} and at least {2 * stride}, got {self.patch_size!r}"
            )

    @property
    def total_stride(self) -> int:
        """Product of all strides: input sides are padded to a multiple of it."""
        total = 1
        for stride in self.strides:
            total *= stride
        return total

    @property
    def vil_stages(self) -> tuple[int, ...]:
        """Indices of the encoder stages followed by a ViL layer."""
        n_stages = len(self.widths)
        if self.xlstm == "bot":
            return (n_stages - 1,)
        if self.xlstm == "enc":
            return tuple(
                s for s in range(n_stages) if ((s % 2 == 1) != (n_stages % 2 == 1)) and s > 1
            )
        if self.xlstm == "full":
            return tuple(range(n_stages))
        return ()

    @property
    def channel_token_grids(self) -> dict[int, tuple[int, int]]:
        """Feature-map (height, width) at ``patch_size`` of each channel-token ViL stage.

        Empty unless ``vil_channel_tokens`` is set. A ViL stage uses channel
        tokens where its height times width is at most its channel count.
        """
        if not self.vil_channel_tokens:
            return {}
        grids = {}
        height, width = self.patch_size
        for s, stride in enumerate(self.strides):
            height, width = height // stride, width // stride
            if s in self.vil_stages and height * width <= self.widths[s]:
                grids[s] = (height, width)
        return grids

    def to_dict(self) -> dict[str, Any]:
        """Return plain Python values, safe for JSON and ``weights_only`` loading."""
        values = asdict(self)
        for key, value in values.items():
            if isinstance(value, tuple):
                values[key] = list(value)
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        """Build a config from :meth:`to_dict` output; unknown keys raise.

        Missing keys take their defaults, so dicts saved before a field
        existed still load.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown model config keys {unknown}; expected a subset of {sorted(known)}"
            )
        converted = {
            key: tuple(value) if isinstance(value, list) else value
            for key, value in values.items()
        }
        return cls(**converted)


def _reference_widths(n_stages: int) -> tuple[int, ...]:
    # nnU-Net v2 planner rule: 32 * 2**s channels, capped at 512.
    return tuple(min(32 * 2**s, 512) for s in range(n_stages))


def _reference_encoder_blocks(n_stages: int, planned: int = 2) -> tuple[int, ...]:
    # The plan gives every stage 2 blocks; the reference networks then cut
    # stages s >= ceil(n / 2) to 1.
    return tuple(1 if s >= math.ceil(n_stages / 2) else planned for s in range(n_stages))


def _reference_decoder_blocks(n_stages: int, planned: int = 2) -> tuple[int, ...]:
    # The reference code lists decoder stages lowest resolution first and cuts
    # those with index k >= ceil((n - 1) / 2 + 0.5) to 1 block. Returned here
    # highest resolution first, so for 8 stages the three highest get 1.
    first_cut = math.ceil((n_stages - 1) / 2 + 0.5)
    lowest_first = [1 if k >= first_cut else planned for k in range(n_stages - 1)]
    return tuple(reversed(lowest_first))


_REFERENCE_STAGES = 8
_REFERENCE_ENCODER_BLOCKS = _reference_encoder_blocks(_REFERENCE_STAGES)

PRESETS: dict[str, dict[str, Any]] = {
    # The shipped cell model's shape. It trains on 2 CPU cores in under an
    # hour and segments a 512 x 512 image in under a second. One ViL
    # direction, because the shipped models' training recipes build this
    # preset and must keep training the network they describe.
    "small": dict(
        widths=(16, 32, 64, 128, 192),
        strides=(1, 2, 2, 2, 2),
        encoder_blocks=(1, 1, 2, 2, 2),
        decoder_blocks=(1, 1, 1, 1),
    ),
    # The reference code's 8-stage topology for a 512 x 512 patch, with its
    # choices: stem of encoder_blocks[0] blocks, one ViL direction, and no
    # full-resolution skip. Meant for GPUs.
    "reference": dict(
        widths=_reference_widths(_REFERENCE_STAGES),
        strides=(1,) + (2,) * (_REFERENCE_STAGES - 1),
        encoder_blocks=_REFERENCE_ENCODER_BLOCKS,
        decoder_blocks=_reference_decoder_blocks(_REFERENCE_STAGES),
        stem_blocks=_REFERENCE_ENCODER_BLOCKS[0],
        full_resolution_skip=False,
        vil_directions=1,
    ),
}

# Changes of the reference code's Enc network relative to the "reference"
# preset. It follows stage 1 with one more identity residual block (where the
# placement rule's s > 1 excludes a ViL), which computes the same as one more
# block in that stage, and it runs channel-token ViLs sized for the planned
# 512 x 512 patch.
_REFERENCE_ENC_CHANGES: dict[str, Any] = dict(
    encoder_blocks=tuple(
        blocks + 1 if s == 1 else blocks for s, blocks in enumerate(_REFERENCE_ENCODER_BLOCKS)
    ),
    vil_channel_tokens=True,
    patch_size=(512, 512),
)


def preset(name: str, **overrides: Any) -> ModelConfig:
    """Return the config of a named preset, with fields replaced by ``overrides``.

    Parameters
    ----------
    name : {"small", "reference"}
        Preset name. With ``xlstm="enc"``, "reference" also takes the
        reference Enc network's changes: one more block in encoder stage 1,
        channel-token mode and ``patch_size=(512, 512)``.
    **overrides
        Any :class:`ModelConfig` field, for example ``xlstm="enc"``. They are
        applied last, so they win over every preset value.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    values = dict(PRESETS[name])
    placement = overrides.get("xlstm", values.get("xlstm", ModelConfig.xlstm))
    if name == "reference" and placement == "enc":
        values.update(_REFERENCE_ENC_CHANGES)
    values.update(overrides)
    return ModelConfig(**values)
