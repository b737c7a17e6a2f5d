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
    """Apply a ViL block to a feature map, tokens in row-major order from the top left.

    The block always runs in float32, also under autocast, as the reference
    code does: the exponential gates overflow in half precision.

    Parameters
    ----------
    channels : int
        Channels of the feature map, the token width of the block.
    kernel, chunk_size
        mLSTM kernel choice, passed to :class:`ViLBlock`.
    """

    def __init__(self, channels: int, kernel: str = "auto", chunk_size: int = 64) -> None:
        super().__init__()
        self.block = ViLBlock(channels, kernel=kernel, chunk_size=chunk_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        tokens = height * width
        if self.block.kernel == "parallel" and tokens > MAX_PARALLEL_TOKENS:
            raise ValueError(
                f"a ViL block got a {height} x {width} feature map ({tokens} tokens); the parallel "
                f"mLSTM needs memory quadratic in the token count and accepts at most "
                f"{MAX_PARALLEL_TOKENS}. Use kernel 'auto' or 'chunkwise', or a smaller tile "
                f"size (--tile-size) or patch size."
            )
        dtype = x.dtype
        with torch.autocast(device_type=x.device.type, enabled=False):
            tokens = x.float().flatten(2).transpose(1, 2)  # (B, H*W, C)
            tokens = self.block(tokens)
            out = tokens.transpose(1, 2).reshape(batch, channels, height, width)
        return out.to(dtype)
