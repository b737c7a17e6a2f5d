"""mLSTM cell: parallel, chunkwise and recurrent forms of the same maths.

Shapes use B (batch), NH (heads), S (tokens), DH (head dimension), NC
(chunks) and L (chunk size).

The maths follows the xLSTM paper (Beck et al., 2024, arXiv:2405.04517) as
implemented in NX-AI's vision-lstm (Apache-2.0): exponential input gate,
log-sigmoid forget gate, keys scaled by 1/sqrt(DH), and a running maximum m
that keeps every exponent at or below zero. With the cumulative log forget
gate F_t, every form computes

    D_ts = exp(F_t - F_s + i_s - m_t) for s <= t,  m_t = max_{s <= t} (F_t - F_s + i_s)
    w_ts = (q_t . k_s / sqrt(DH)) * D_ts
    h_t  = sum_s w_ts v_s / (max(|sum_s w_ts|, exp(-m_t)) + eps)

so the forms differ only by float rounding. (Where exp(-m_t) would overflow,
it is clamped, see ``_normaliser_floor``.) All of them compute in float32
(float64 inputs stay float64), also under autocast, and return the input dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "AUTO_PARALLEL_MAX_TOKENS",
    "KERNELS",
    "check_kernel_name",
    "mlstm",
    "mlstm_chunkwise",
    "mlstm_parallel",
    "mlstm_recurrent",
]

KERNELS = ("auto", "parallel", "chunkwise", "recurrent", "triton")

# "auto" runs the parallel form up to this many tokens and the chunkwise form
# (chunk size 64) above. Measured on an idle 2-core AMD EPYC (torch
# 2.13.0+cpu, 2 threads, B=1, NH=4, DH=96, minimum of 5 runs): the parallel
# form was faster up to about 192 tokens, the two were within noise at 224,
# and from 256 tokens on the chunkwise form was faster, about 6x in
# forward+backward at 1,024 tokens. benchmarks/mlstm.py --tokens 128 192 256
# repeats the comparison.
AUTO_PARALLEL_MAX_TOKENS = 192

# The chunkwise form works through the sequence in groups of this many
# chunks (1,024 tokens at chunk size 64), carrying the state from group to
# group. Batching all chunks at once builds tensors of NC * (L^2 + DH^2)
# floats per head, which outgrow the CPU caches at long sequences. On a
# 2-core AMD EPYC (1 thread, DH=96, L=64, forward+backward, another job
# running) 16 chunks per group took 2.35 s at 65,536 tokens against 3.83 s
# for one group of all chunks, and was no slower at 4,096 tokens.
CHUNKS_PER_GROUP = 16


def check_kernel_name(kernel: str) -> None:
    """Raise ValueError unless ``kernel`` is one of :data:`KERNELS`."""
    if kernel not in KERNELS:
        raise ValueError(
            f"invalid mLSTM kernel {kernel!r}. Expected one of {', '.join(map(repr, KERNELS))}."
        )


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # At least float32, because the exponential gates overflow in half precision.
    return torch.promote_types(dtype, torch.float32)


def _cast_inputs(*tensors: torch.Tensor) -> list[torch.Tensor]:
    dtype = _compute_dtype(tensors[0].dtype)
    return [tensor.to(dtype) for tensor in tensors]


def _normaliser_floor(m: torch.Tensor) -> torch.Tensor:
    """Return exp(-m), the lower bound of the normaliser, without overflow.

    An input gate below about -88 makes exp(-m) overflow float32. The output
    is then 0 either way, but the backward pass would multiply inf by 0 and
    return NaN. Clamping -m just below the overflow point changes only values
    that would otherwise be within a factor e of overflowing.
    """
    limit = math.log(torch.finfo(m.dtype).max) - 1.0
    return torch.exp(torch.clamp(-m, max=limit))


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
        Hidden states h_t, in the dtype of ``q``.

    Notes
    -----
    Time and memory are O(S^2) per head, so this form suits short sequences
    (a few hundred tokens). :func:`mlstm_chunkwise` is linear in S.

    The cumulative sum of log forget gates runs over the whole sequence. With
    small forget gates over thousands of tokens it grows to 1e4 or more, and
    float32 differences of such sums lose digits. The chunkwise form sums
    within a chunk only, so it is the more accurate one there.
    """
    dtype = q.dtype
    with torch.autocast(device_type=q.device.type, enabled=False):
        q, k, v, input_gate, forget_gate = _cast_inputs(q, k, v, input_gate, forget_gate)
        h = _parallel(q, k, v, input_gate, forget_gate, eps)
    return h.to(dtype)


def _parallel(q, k, v, input_gate, forget_gate, eps):
    seq_len, head_dim = q.shape[-2], q.shape[-1]

    # Cumulative log forget gates: F_t = sum_{r<=t} log f_r.
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
        weights.sum(dim=-1, keepdim=True).abs(), _normaliser_floor(max_log_d)
    )  # (B, NH, S, 1)
    return (weights / (normaliser + eps)) @ v  # (B, NH, S, DH)


def mlstm_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    input_gate: torch.Tensor,
    forget_gate: torch.Tensor,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Run the causal mLSTM one token at a time, as a reference.

    The state per head is the matrix memory C (DH x DH), the normaliser n (DH)
    and the stabiliser m (a scalar), all kept divided by exp(m).

    Parameters
    ----------
    q, k, v : torch.Tensor, shape (B, NH, S, DH)
        Queries, keys and values.
    input_gate, forget_gate : torch.Tensor, shape (B, NH, S)
        Gate pre-activations, as in :func:`mlstm_parallel`.
    eps : float
        Added to the normaliser before dividing.

    Returns
    -------
    torch.Tensor, shape (B, NH, S, DH)
        Hidden states h_t, in the dtype of ``q``.

    Notes
    -----
    S sequential steps of O(DH^2) each: slow in Python, but memory stays
    O(S * DH) apart from what autograd keeps.
    """
    dtype = q.dtype
    with torch.autocast(device_type=q.device.type, enabled=False):
        q, k, v, input_gate, forget_gate = _cast_inputs(q, k, v, input_gate, forget_gate)
        h = _recurrent(q, k, v, input_gate, forget_gate, eps)
    return h.to(dtype)


def _recurrent(q, k, v, input_gate, forget_gate, eps):
    batch, heads, seq_len, head_dim = q.shape
    c_state = q.new_zeros(batch, heads, head_dim, head_dim)
    n_state = q.new_zeros(batch, heads, head_dim)
    # m starts at -inf, so the first stabiliser is the first input gate, as in
    # the parallel form's row-wise maximum.
    m_state = q.new_full((batch, heads), float("-inf"))
    log_f = F.logsigmoid(forget_gate)  # (B, NH, S)
    k = k / math.sqrt(head_dim)

    outputs = []
    for t in range(seq_len):
        m_new = torch.maximum(log_f[..., t] + m_state, input_gate[..., t])  # (B, NH)
        f_scaled = torch.exp(log_f[..., t] + m_state - m_new)[..., None]  # (B, NH, 1)
        i_scaled = torch.exp(input_gate[..., t] - m_new)[..., None]
        k_t, v_t, q_t = k[..., t, :], v[..., t, :], q[..., t, :]  # (B, NH, DH)

        c_state = f_scaled[..., None] * c_state + i_scaled[..., None] * (
            k_t[..., :, None] * v_t[..., None, :]
        )  # (B, NH, DH, DH)
        n_state = f_scaled * n_state + i_scaled * k_t  # (B, NH, DH)

        numerator = (q_t[..., None, :] @ c_state).squeeze(-2)  # (B, NH, DH)
        denominator = torch.maximum((n_state * q_t).sum(-1).abs(), _normaliser_floor(m_new))
        outputs.append(numerator / (denominator[..., None] + eps))
        m_state = m_new
    return torch.stack(outputs, dim=2)  # (B, NH, S, DH)


def mlstm_chunkwise(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    input_gate: torch.Tensor,
    forget_gate: torch.Tensor,
    chunk_size: int = 64,
    eps: float = 1e-6,
    chunks_per_group: int = CHUNKS_PER_GROUP,
) -> torch.Tensor:
    """Run the causal mLSTM chunk by chunk, in time and memory linear in S.

    Inside a chunk of L tokens the parallel form runs on an L x L matrix. The
    tokens of earlier chunks enter through the recurrent state (C, n, m),
    carried from chunk to chunk.

    Parameters
    ----------
    q, k, v : torch.Tensor, shape (B, NH, S, DH)
        Queries, keys and values.
    input_gate, forget_gate : torch.Tensor, shape (B, NH, S)
        Gate pre-activations, as in :func:`mlstm_parallel`.
    chunk_size : int
        Tokens per chunk, L. Sequences shorter than L run as one chunk of S
        tokens; longer ones are padded at the end to a multiple of L.
    eps : float
        Added to the normaliser before dividing.
    chunks_per_group : int
        Chunks batched together; longer sequences run group after group,
        which keeps the working set of each step small.

    Returns
    -------
    torch.Tensor, shape (B, NH, S, DH)
        Hidden states h_t, in the dtype of ``q``.

    Notes
    -----
    Time and memory are O(S * L) for the intra-chunk matrices plus
    O(S / L * DH^2) for the states. The states are computed in a Python loop
    over the S / L chunks; everything else is batched over the chunks of a group.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
    if chunks_per_group < 1:
        raise ValueError(f"chunks_per_group must be a positive number of chunks, got {chunks_per_group}")
    dtype = q.dtype
    with torch.autocast(device_type=q.device.type, enabled=False):
        q, k, v, input_gate, forget_gate = _cast_inputs(q, k, v, input_gate, forget_gate)
        h = _chunkwise(q, k, v, input_gate, forget_gate, chunk_size, eps, chunks_per_group)
    return h.to(dtype)


def _pad_tokens(tensor: torch.Tensor, token_dim: int, pad: int) -> torch.Tensor:
    # Zeros at the end: by causality they cannot change earlier outputs, and
    # zero gates (i = 0, f = sigmoid(0)) keep the padded outputs finite.
    widths = [0, 0] * (tensor.dim() - 1 - token_dim) + [0, pad]
    return F.pad(tensor, widths)


def _chunkwise(q, k, v, input_gate, forget_gate, chunk_size, eps, chunks_per_group=CHUNKS_PER_GROUP):
    batch, heads, seq_len, head_dim = q.shape
    chunk = min(chunk_size, seq_len)
    num_chunks = -(-seq_len // chunk)
    pad = num_chunks * chunk - seq_len
    if pad:
        q, k, v = (_pad_tokens(t, 2, pad) for t in (q, k, v))
        input_gate, forget_gate = (_pad_tokens(t, 2, pad) for t in (input_gate, forget_gate))

    # Split the token axis into chunks: (B, NH, NC, L, DH) and (B, NH, NC, L).
    q = q.reshape(batch, heads, num_chunks, chunk, head_dim)
    k = k.reshape(batch, heads, num_chunks, chunk, head_dim)
    v = v.reshape(batch, heads, num_chunks, chunk, head_dim)
    input_gate = input_gate.reshape(batch, heads, num_chunks, chunk)
    log_f = F.logsigmoid(forget_gate).reshape(batch, heads, num_chunks, chunk)

    # split rather than slicing, because the backward of a slice allocates a
    # gradient the size of the whole tensor, once per group.
    groups = zip(*(t.split(chunks_per_group, dim=2) for t in (q, k, v, input_gate, log_f)))
    state = None
    outputs = []
    for q_group, k_group, v_group, i_group, f_group in groups:
        h, state = _chunk_group(q_group, k_group, v_group, i_group, f_group, state, eps)
        outputs.append(h)
    h = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
    h = h.reshape(batch, heads, num_chunks * chunk, head_dim)
    return h[:, :, :seq_len]


def _chunk_group(q, k, v, input_gate, log_f, state, eps):
    """Return h (B, NH, NC, L, DH) for a run of chunks that starts from ``state``.

    k is not yet scaled by 1/sqrt(DH). ``state`` is the (C, n, m) left by the
    previous group, or None at the start of the sequence. The state after
    the group's last chunk is returned with h.
    """
    chunk = q.shape[3]
    # Scaled here, group by group: one division of the whole sequence would
    # allocate a full-size copy, and fresh large buffers cost page faults.
    k = k / math.sqrt(k.shape[-1])
    # b_j: log forget gates summed from the start of the chunk up to token j.
    # Local sums stay small, unlike the global cumulative sum of the parallel form.
    log_f_cumsum = torch.cumsum(log_f, dim=-1)  # (B, NH, NC, L)
    c_states, n_states, m_states, last_state = _chunk_states(k, v, input_gate, log_f_cumsum, state)

    # Log weight of token j for token t of the same chunk, -inf for j > t.
    log_d = log_f_cumsum.unsqueeze(-1) - log_f_cumsum.unsqueeze(-2) + input_gate.unsqueeze(-2)
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    log_d = log_d.masked_fill(~causal, float("-inf"))  # (B, NH, NC, L, L)

    # Log weight of the carried state for token t, and the stabiliser m_t over
    # both parts: exactly the parallel form's row-wise maximum.
    log_state = log_f_cumsum + m_states.unsqueeze(-1)  # (B, NH, NC, L)
    m_t = torch.maximum(log_state, log_d.amax(dim=-1))  # (B, NH, NC, L)
    state_scale = torch.exp(log_state - m_t)  # (B, NH, NC, L), zero in the sequence's first chunk
    weights = (q @ k.transpose(-2, -1)) * torch.exp(log_d - m_t.unsqueeze(-1))  # (B, NH, NC, L, L)

    numerator = weights @ v + state_scale.unsqueeze(-1) * (q @ c_states)  # (B, NH, NC, L, DH)
    denominator = weights.sum(dim=-1) + state_scale * (q @ n_states.unsqueeze(-1)).squeeze(-1)
    normaliser = torch.maximum(denominator.abs(), _normaliser_floor(m_t)) + eps  # (B, NH, NC, L)
    return numerator / normaliser.unsqueeze(-1), last_state


def _chunk_states(k, v, input_gate, log_f_cumsum, state=None):
    """Return the state (C, n, m) that enters each chunk, stacked over chunks, and the final state.

    k and v are (B, NH, NC, L, DH), with k already scaled by 1/sqrt(DH);
    input_gate and log_f_cumsum are (B, NH, NC, L). The results are C
    (B, NH, NC, DH, DH), n (B, NH, NC, DH) and m (B, NH, NC), with C and n
    divided by exp(m), then the tuple (C, n, m) after the last chunk. The
    first chunk gets ``state``, or C = 0, n = 0 and m = -inf when it is None.
    """
    batch, heads, _, _, head_dim = k.shape

    # Each chunk's own contribution to the state at its last token, stabilised
    # by its own maximum: token j enters with log weight b_L - b_j + i_j.
    log_f_total = log_f_cumsum[..., -1]  # (B, NH, NC)
    log_weight = log_f_total.unsqueeze(-1) - log_f_cumsum + input_gate  # (B, NH, NC, L)
    chunk_m = log_weight.amax(dim=-1)  # (B, NH, NC)
    token_scale = torch.exp(log_weight - chunk_m.unsqueeze(-1))  # (B, NH, NC, L)
    k_weighted = k * token_scale.unsqueeze(-1)  # (B, NH, NC, L, DH)
    chunk_c = k_weighted.transpose(-2, -1) @ v  # (B, NH, NC, DH, DH)
    chunk_n = k_weighted.sum(dim=-2)  # (B, NH, NC, DH)

    if state is None:
        state = (k.new_zeros(batch, heads, head_dim, head_dim), k.new_zeros(batch, heads, head_dim),
                 k.new_full((batch, heads), float("-inf")))
    c_state, n_state, m_state = state
    c_states, n_states, m_states = [c_state], [n_state], [m_state]
    # Unbind instead of indexing in the loop, because the backward of each
    # slice allocates a gradient the size of the whole tensor: O(NC^2) in all.
    chunks = zip(*(t.unbind(dim=2) for t in (chunk_c, chunk_n, chunk_m, log_f_total)))
    for c_chunk, n_chunk, m_chunk, f_chunk in chunks:
        m_next = torch.maximum(f_chunk + m_state, m_chunk)  # (B, NH)
        state_decay = torch.exp(f_chunk + m_state - m_next)  # (B, NH)
        chunk_scale = torch.exp(m_chunk - m_next)
        c_state = state_decay[..., None, None] * c_state + chunk_scale[..., None, None] * c_chunk
        n_state = state_decay[..., None] * n_state + chunk_scale[..., None] * n_chunk
        m_state = m_next
        c_states.append(c_state)
        n_states.append(n_state)
        m_states.append(m_state)
    # The last entries are the state after the final chunk, which no chunk of this group reads.
    stacked = (torch.stack(c_states[:-1], dim=2), torch.stack(n_states[:-1], dim=2),
               torch.stack(m_states[:-1], dim=2))
    return (*stacked, (c_state, n_state, m_state))


def _mlstm_triton(q, k, v, input_gate, forget_gate, chunk_size, eps):
    # NOTE: this path has not been run on a GPU. Compare it with
    # mlstm_chunkwise on CUDA before relying on it.
    if not q.is_cuda:
        raise ValueError(
            f"kernel 'triton' requires CUDA tensors, got tensors on {q.device}. "
            "Use kernel 'chunkwise' or 'auto' on this device."
        )
    try:
        from mlstm_kernels.torch import get_mlstm_kernel
    except ImportError as error:
        raise ImportError(
            "kernel 'triton' requires the optional packages mlstm_kernels (Python >= 3.11) "
            "and triton. Install both, or use kernel 'chunkwise'."
        ) from error
    try:
        kernel_fn = get_mlstm_kernel("chunkwise--triton_xl_chunk")
    except ValueError as error:
        raise ImportError(
            "mlstm_kernels is installed but registers no Triton chunkwise kernel, "
            "because triton failed to import. Install triton, or use kernel 'chunkwise'."
        ) from error

    seq_len = q.shape[2]
    dtype = q.dtype
    with torch.autocast(device_type=q.device.type, enabled=False):
        q, k, v, input_gate, forget_gate = _cast_inputs(q, k, v, input_gate, forget_gate)
        # The Triton kernel needs S to be a multiple of the chunk size.
        pad = -seq_len % chunk_size
        if pad:
            q, k, v = (_pad_tokens(t, 2, pad) for t in (q, k, v))
            input_gate, forget_gate = (_pad_tokens(t, 2, pad) for t in (input_gate, forget_gate))
        h = kernel_fn(
            q.contiguous(), k.contiguous(), v.contiguous(),
            input_gate.contiguous(), forget_gate.contiguous(),
            eps=eps, chunk_size=chunk_size, autocast_kernel_dtype=torch.float32,
        )
    return h[:, :, :seq_len].to(dtype)


def mlstm(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    input_gate: torch.Tensor,
    forget_gate: torch.Tensor,
    kernel: str = "auto",
    chunk_size: int = 64,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Run the causal mLSTM with the chosen kernel.

    Parameters
    ----------
    q, k, v : torch.Tensor, shape (B, NH, S, DH)
        Queries, keys and values.
    input_gate, forget_gate : torch.Tensor, shape (B, NH, S)
        Gate pre-activations, as in :func:`mlstm_parallel`.
    kernel : {"auto", "parallel", "chunkwise", "recurrent", "triton"}
        "auto" runs :func:`mlstm_parallel` for S up to
        :data:`AUTO_PARALLEL_MAX_TOKENS` and :func:`mlstm_chunkwise` above.
        "triton" runs the chunkwise Triton kernel of the optional package
        ``mlstm_kernels`` on CUDA tensors.
    chunk_size : int
        Tokens per chunk for the chunkwise kernels.
    eps : float
        Added to the normaliser before dividing.

    Returns
    -------
    torch.Tensor, shape (B, NH, S, DH)
        Hidden states h_t, in the dtype of ``q``.

    Raises
    ------
    ValueError
        If ``kernel`` is not one of :data:`KERNELS`.
    """
    check_kernel_name(kernel)
    if kernel == "auto":
        kernel = "parallel" if q.shape[-2] <= AUTO_PARALLEL_MAX_TOKENS else "chunkwise"

    if kernel == "parallel":
        return mlstm_parallel(q, k, v, input_gate, forget_gate, eps=eps)
    if kernel == "chunkwise":
        return mlstm_chunkwise(q, k, v, input_gate, forget_gate, chunk_size=chunk_size, eps=eps)
    if kernel == "recurrent":
        return mlstm_recurrent(q, k, v, input_gate, forget_gate, eps=eps)
    return _mlstm_triton(q, k, v, input_gate, forget_gate, chunk_size, eps)
