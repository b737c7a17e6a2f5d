"""Model configuration: one frozen dataclass that travels with the weights."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

__all__ = ["ModelConfig", "PRESETS", "preset"]

XLSTM_PLACEMENTS = ("none", "bot", "enc")


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a 2D xLSTM-UNet.

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
    xlstm : {"none", "bot", "enc"}
        Where Vision-LSTM blocks go: nowhere (plain residual U-Net), after the
        bottleneck stage, or after the encoder stages chosen by the reference
        rule (``(s odd) XOR (n_stages odd)`` and ``s > 1``).
    full_resolution_skip : bool
        Concatenate the full-resolution encoder output into the last decoder
        stage. The reference code drops this skip; keeping it helps thin cell
        boundaries.
    deep_supervision : bool
        Return one logits map per decoder stage in training mode.
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
        if min(self.encoder_blocks) < 1 or min(self.decoder_blocks) < 1:
            raise ValueError("every stage needs at least one residual block")
        if self.in_channels < 1 or self.num_classes < 2:
            raise ValueError(
                f"expected in_channels >= 1 and num_classes >= 2, got "
                f"{self.in_channels} and {self.num_classes}"
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
        """Indices of the encoder stages followed by a ViL block."""
        n_stages = len(self.widths)
        if self.xlstm == "bot":
            return (n_stages - 1,)
        if self.xlstm == "enc":
            return tuple(
                s for s in range(n_stages) if ((s % 2 == 1) != (n_stages % 2 == 1)) and s > 1
            )
        return ()

    def to_dict(self) -> dict[str, Any]:
        """Return plain Python values, safe for JSON and ``weights_only`` loading."""
        values = asdict(self)
        for key, value in values.items():
            if isinstance(value, tuple):
                values[key] = list(value)
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        """Build a config from :meth:`to_dict` output; unknown keys raise."""
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


PRESETS: dict[str, dict[str, Any]] = {
    # The shipped cell model's shape. It trains on 2 CPU cores in under an
    # hour and segments a 512 x 512 image in under a second.
    "small": dict(
        widths=(16, 32, 64, 128, 192),
        strides=(1, 2, 2, 2, 2),
        encoder_blocks=(1, 1, 2, 2, 2),
        decoder_blocks=(1, 1, 1, 1),
    ),
    # The reference code's 8-stage topology for a 512 x 512 patch; meant for GPUs.
    "reference": dict(
        widths=_reference_widths(8),
        strides=(1, 2, 2, 2, 2, 2, 2, 2),
        encoder_blocks=(2, 2, 2, 2, 1, 1, 1, 1),
        decoder_blocks=(1, 1, 1, 2, 2, 2, 2),
    ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """Return the config of a named preset, with fields replaced by ``overrides``.

    Parameters
    ----------
    name : {"small", "reference"}
        Preset name.
    **overrides
        Any :class:`ModelConfig` field, for example ``xlstm="enc"``.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    values = dict(PRESETS[name])
    values.update(overrides)
    return ModelConfig(**values)
