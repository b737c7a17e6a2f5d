"""mLSTM cell: the stabilised parallel form used inside ViL blocks.

Shapes use B (batch), NH (heads), S (tokens) and DH (head dimension).

The maths follows the xLSTM paper (Beck et al., 2024, arXiv:2405.04517) as
implemented in NX-AI's vision-lstm (Apache-2.0): exponential input gate,
log-sigmoid forget gate, and a row-wise maximum that keeps every exponent at
or below zero.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["mlstm_parallel"]


def mlstm_parallel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    input_gate: torch.Tensor,
    forget_gate: torch.Tensor,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Run the causal mLSTM over a whole sequence at once.

    Parameters
    ----------
    q, k, v : torch.Tensor, shape (B, NH, S, DH)
        Queries, keys and values.
    input_gate, forget_gate : torch.Tensor, shape (B, NH, S)
        Gate pre-activations. The input gate is ``exp(input_gate)`` and the
        forget gate ``sigmoid(forget_gate)``, both applied in log space.
    eps : float
        Added to the normaliser before dividing.

    Returns
    -------
    torch.Tensor, shape (B, NH, S, DH)
        Hidden states h_t.

    Notes
    -----
    Time and memory are O(S^2) per head, so this form suits the short
    sequences of a U-Net bottleneck (a few hundred to about a thousand tokens).
    """
    seq_len, head_dim = q.shape[-2], q.shape[-1]
    dtype = q.dtype

    # Cumulative log forget gates, with a leading zero: F_t = sum_{r<=t} log f_r.
    log_f = F.logsigmoid(forget_gate)  # (B, NH, S)
    log_f_cumsum = torch.cumsum(log_f, dim=-1)  # (B, NH, S)

    # log D_ts = F_t - F_s + i_s for s <= t, -inf above the diagonal.
    log_decay = log_f_cumsum.unsqueeze(-1) - log_f_cumsum.unsqueeze(-2)  # (B, NH, S, S)
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=q.device).tril()
    log_d = log_decay + input_gate.unsqueeze(-2)  # (B, NH, S, S)
    log_d = log_d.masked_fill(~causal, float("-inf"))

    # Row-wise stabiliser m_t, so that every exponent is <= 0.
    max_log_d = log_d.amax(dim=-1, keepdim=True)  # (B, NH, S, 1)
    decay = torch.exp(log_d - max_log_d)  # (B, NH, S, S)

    scores = (q @ k.transpose(-2, -1)) / math.sqrt(head_dim)  # (B, NH, S, S)
    weights = scores * decay  # (B, NH, S, S)

    normaliser = torch.maximum(
        weights.sum(dim=-1, keepdim=True).abs(), torch.exp(-max_log_d)
    )  # (B, NH, S, 1)
    h = (weights / (normaliser + eps)) @ v  # (B, NH, S, DH)
    return h.to(dtype)
