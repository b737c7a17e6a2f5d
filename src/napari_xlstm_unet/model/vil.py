"""Vision-LSTM (ViL) block and the layer that applies it to a feature map.

The block follows NX-AI's ``vision_lstm.py`` (v1, Apache-2.0), the variant the
xLSTM-UNet reference code uses. Its steps are pre-LayerNorm, up-projection to
twice the width, causal depthwise convolution, block-diagonal q/k/v, an mLSTM
cell with per-head normalisation, a learnable skip, a SiLU output gate and a
down-projection, all inside a residual connection.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .mlstm import check_kernel_name, mlstm

__all__ = ["ViLBlock", "ViLLayer2d"]


class HeadwiseLinear(nn.Module):
    """Block-diagonal linear map: ``dim / block_size`` independent square blocks."""

    def __init__(self, dim: int, block_size: int) -> None:
        super().__init__()
        if dim % block_size:
            raise ValueError(f"dim {dim} must be divisible by block_size {block_size}")
        self.num_blocks = dim // block_size
        self.block_size = block_size
        self.weight = nn.Parameter(torch.empty(self.num_blocks, block_size, block_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(*shape[:-1], self.num_blocks, self.block_size)  # (..., NB, BS)
        x = torch.einsum("...hi,hoi->...ho", x, self.weight)
        return x.reshape(shape)


class CausalDepthwiseConv1d(nn.Module):
    """Depthwise 1D convolution over the current and earlier tokens only."""

    def __init__(self, channels: int, kernel_size: int) -> None:
        super().__init__()
        self.pad = kernel_size - 1
        self.conv = nn.Conv1d(channels, channels, kernel_size, groups=channels, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, S, C); pad on the left of the token axis only.
        x = F.pad(x.transpose(1, 2), (self.pad, 0))  # (B, C, S + pad)
        return self.conv(x).transpose(1, 2)  # (B, S, C)


class MultiHeadNorm(nn.Module):
    """Layer normalisation of each head's features, per token, with a shared scale."""

    def __init__(self, num_heads: int, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # h: (B, NH, S, DH) -> (B, S, NH * DH)
        batch, num_heads, seq_len, head_dim = h.shape
        h = F.layer_norm(h, (head_dim,), eps=self.eps)
        h = h.transpose(1, 2).reshape(batch, seq_len, num_heads * head_dim)
        return h * self.weight


class ViLBlock(nn.Module):
    """One residual ViL block over a token sequence of shape (B, S, D).

    Parameters
    ----------
    dim : int
        Token width D.
    expansion : int
        Inner width E = expansion * D.
    num_heads : int
        mLSTM heads; E must be divisible by it.
    qkv_block_size : int
        Block size of the block-diagonal q, k and v projections.
    conv_kernel_size : int
        Kernel of the causal depthwise convolution.
    kernel : str
        mLSTM kernel, one of :data:`napari_xlstm_unet.model.mlstm.KERNELS`.
        "auto" picks the parallel form for short sequences and the chunkwise
        form for long ones. The choice changes no parameter.
    chunk_size : int
        Tokens per chunk for the chunkwise kernels.
    """

    def __init__(
        self,
        dim: int,
        expansion: int = 2,
        num_heads: int = 4,
        qkv_block_size: int = 4,
        conv_kernel_size: int = 4,
        kernel: str = "auto",
        chunk_size: int = 64,
    ) -> None:
        super().__init__()
        inner = expansion * dim
        if inner % num_heads:
            raise ValueError(f"inner width {inner} must be divisible by num_heads {num_heads}")
        check_kernel_name(kernel)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
        self.dim = dim
        self.inner = inner
        self.num_heads = num_heads
        self.kernel = kernel
        self.chunk_size = chunk_size

        self.norm = nn.LayerNorm(dim, bias=False)
        self.up_proj = nn.Linear(dim, 2 * inner, bias=False)
        self.conv = CausalDepthwiseConv1d(inner, conv_kernel_size)
        self.q_proj = HeadwiseLinear(inner, qkv_block_size)
        self.k_proj = HeadwiseLinear(inner, qkv_block_size)
        self.v_proj = HeadwiseLinear(inner, qkv_block_size)
        self.input_gate = nn.Linear(3 * inner, num_heads)
        self.forget_gate = nn.Linear(3 * inner, num_heads)
        self.cell_norm = MultiHeadNorm(num_heads, inner)
        self.skip_scale = nn.Parameter(torch.ones(inner))
        self.down_proj = nn.Linear(inner, dim, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise as vision-lstm v1: small init, wang init for the output."""
        small_std = math.sqrt(2 / (5 * self.dim))
        nn.init.normal_(self.up_proj.weight, std=small_std)
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.normal_(proj.weight, std=small_std)
        nn.init.normal_(self.down_proj.weight, std=2 / math.sqrt(self.dim))
        nn.init.zeros_(self.input_gate.weight)
        nn.init.normal_(self.input_gate.bias, std=0.1)
        nn.init.zeros_(self.forget_gate.weight)
        # Forget-gate biases 3..6 across heads start the cell with long memory.
        with torch.no_grad():
            self.forget_gate.bias.copy_(torch.linspace(3.0, 6.0, self.num_heads))

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        return x.reshape(batch, seq_len, self.num_heads, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        x = self.norm(x)  # (B, S, D)

        x_mlstm, z = self.up_proj(x).chunk(2, dim=-1)  # 2 x (B, S, E)
        conv_act = F.silu(self.conv(x_mlstm))  # (B, S, E)
        q = self.q_proj(conv_act)  # (B, S, E)
        k = self.k_proj(conv_act)
        v = self.v_proj(x_mlstm)  # values skip the convolution, as in vision-lstm

        gate_input = torch.cat([q, k, v], dim=-1)  # (B, S, 3E)
        input_gate = self.input_gate(gate_input).transpose(1, 2)  # (B, NH, S)
        forget_gate = self.forget_gate(gate_input).transpose(1, 2)  # (B, NH, S)

        h = mlstm(
            self._split_heads(q), self._split_heads(k), self._split_heads(v),
            input_gate, forget_gate, kernel=self.kernel, chunk_size=self.chunk_size,
        )  # (B, NH, S, DH)
        h = self.cell_norm(h)  # (B, S, E)
        h = (h + self.skip_scale * conv_act) * F.silu(z)
        return residual + self.down_proj(h)  # (B, S, D)


# The parallel mLSTM keeps several (B, 4, S, S) float32 tensors alive. At
# 4,096 tokens each is 268 MB per image, about 2 GB in all. The limit applies
# only where the parallel kernel is forced: "auto" runs long sequences with
# the chunkwise kernel, whose memory is linear in the token count.
MAX_PARALLEL_TOKENS = 4096


class ViLLayer2d(nn.Module):
    """Apply one or two ViL blocks to a feature map of shape (B, C, H, W).

    By default the tokens are the pixels, in row-major order from the top
    left, each C wide. The blocks always run in float32, also under
    autocast, as the reference code does: the exponential gates overflow in
    half precision.

    Parameters
    ----------
    channels : int
        Channels C of the feature map.
    kernel, chunk_size
        mLSTM kernel choice, passed to :class:`ViLBlock`.
    directions : {1, 2}
        1 runs one block from the top-left token. 2 adds a second block that
        reads the sequence from the bottom-right token: the tokens are
        flipped before it and flipped back after it, as in Vision-LSTM v2's
        block pair. The second block's parameters are ``reverse_block.*``.
    channel_token_grid : tuple of int, optional
        (height, width) of the feature map for channel-token mode, the
        reference ``enc`` network's mode for stages with few pixels. The
        tokens are then the C channels in index order, each H*W wide, and
        the layer accepts only feature maps of this size. Where H*W is not a
        multiple of 4, the q/k/v blocks and the mLSTM heads drop to 2, as in
        the reference code.
    """

    def __init__(
        self,
        channels: int,
        kernel: str = "auto",
        chunk_size: int = 64,
        directions: int = 1,
        channel_token_grid: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        if directions not in (1, 2):
            raise ValueError(f"directions must be 1 or 2, got {directions!r}")
        self.channels = channels
        self.directions = directions
        self.channel_token_grid = tuple(channel_token_grid) if channel_token_grid else None

        block_options: dict = dict(kernel=kernel, chunk_size=chunk_size)
        if self.channel_token_grid is None:
            dim = channels
        else:
            dim = self.channel_token_grid[0] * self.channel_token_grid[1]
            block_size = 4 if dim % 4 == 0 else 2
            block_options.update(num_heads=block_size, qkv_block_size=block_size)
        self.block = ViLBlock(dim, **block_options)
        self.reverse_block = ViLBlock(dim, **block_options) if directions == 2 else None

    def _check_size(self, channels: int, height: int, width: int) -> None:
        if channels != self.channels:
            raise ValueError(f"expected a feature map with {self.channels} channels, got {channels}")
        if self.channel_token_grid is not None and (height, width) != self.channel_token_grid:
            expected_h, expected_w = self.channel_token_grid
            raise ValueError(
                f"this ViL layer uses channel tokens {expected_h * expected_w} wide, so it needs a "
                f"{expected_h} x {expected_w} feature map, got {height} x {width}"
            )
        tokens = channels if self.channel_token_grid is not None else height * width
        if self.block.kernel == "parallel" and tokens > MAX_PARALLEL_TOKENS:
            raise ValueError(
                f"a ViL block got {tokens} tokens from a {channels} x {height} x {width} feature "
                f"map; the parallel mLSTM needs memory quadratic in the token count and accepts "
                f"at most {MAX_PARALLEL_TOKENS}. Use kernel 'auto' or 'chunkwise', or a smaller "
                f"tile size (--tile-size) or patch size."
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        self._check_size(channels, height, width)
        dtype = x.dtype
        with torch.autocast(device_type=x.device.type, enabled=False):
            if self.channel_token_grid is None:
                tokens = x.float().flatten(2).transpose(1, 2)  # (B, H*W, C)
            else:
                tokens = x.float().flatten(2)  # (B, C, H*W): channels are the tokens
            tokens = self.block(tokens)
            if self.reverse_block is not None:
                # Flipping the token axis makes the block read from the bottom right.
                tokens = self.reverse_block(tokens.flip(1)).flip(1)
            if self.channel_token_grid is None:
                out = tokens.transpose(1, 2).reshape(batch, channels, height, width)
            else:
                out = tokens.reshape(batch, channels, height, width)
        return out.to(dtype)
