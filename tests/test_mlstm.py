"""The parallel mLSTM against a step-by-step recurrent form written here."""

from __future__ import annotations

import math

import pytest
import torch

from napari_xlstm_unet.model.mlstm import mlstm_parallel


def recurrent_mlstm(q, k, v, input_gate, forget_gate, eps=1e-6):
    """Stabilised recurrent mLSTM, one token at a time (xLSTM paper, eqs. 19-27)."""
    batch, heads, seq_len, head_dim = q.shape
    c_state = q.new_zeros(batch, heads, head_dim, head_dim)
    n_state = q.new_zeros(batch, heads, head_dim)
    # m starts at -inf so the first stabiliser is the first input gate, as in
    # the parallel form's row-wise maximum.
    m_state = q.new_full((batch, heads), float("-inf"))
    log_f = torch.nn.functional.logsigmoid(forget_gate)
    outputs = []
    for t in range(seq_len):
        m_new = torch.maximum(log_f[..., t] + m_state, input_gate[..., t])
        f_scaled = torch.exp(log_f[..., t] + m_state - m_new)
        i_scaled = torch.exp(input_gate[..., t] - m_new)
        k_t = k[..., t, :] / math.sqrt(head_dim)
        c_state = f_scaled[..., None, None] * c_state + i_scaled[..., None, None] * (
            k_t[..., :, None] * v[..., t, None, :]
        )
        n_state = f_scaled[..., None] * n_state + i_scaled[..., None] * k_t
        q_t = q[..., t, :]
        numerator = torch.einsum("bhkv,bhk->bhv", c_state, q_t)
        denominator = torch.maximum((n_state * q_t).sum(-1).abs(), torch.exp(-m_new))
        outputs.append(numerator / (denominator[..., None] + eps))
        m_state = m_new
    return torch.stack(outputs, dim=2)


def relative_error(actual, expected):
    return ((actual - expected).norm() / expected.norm()).item()


def make_inputs(seq_len, dtype, input_scale=1.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shape = (2, 4, seq_len, 8)
    q, k, v = (torch.randn(shape, generator=generator, dtype=dtype) for _ in range(3))
    input_gate = input_scale * torch.randn(shape[:3], generator=generator, dtype=dtype)
    forget_gate = 3.0 + torch.randn(shape[:3], generator=generator, dtype=dtype)
    return q, k, v, input_gate, forget_gate


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seq_len", [1, 7, 64])
def test_parallel_matches_recurrent(dtype, seq_len):
    inputs = make_inputs(seq_len, dtype)
    assert relative_error(mlstm_parallel(*inputs), recurrent_mlstm(*inputs)) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_parallel_stable_with_huge_input_gates(dtype):
    q, k, v, input_gate, forget_gate = make_inputs(48, dtype)
    input_gate = input_gate.abs() * 40 + 20  # pre-activations from 20 up to about 100+
    input_gate[..., 5] = 100.0

    # Without stabilisation exp(100) overflows float32 (max about exp(88.7)).
    assert torch.isinf(torch.exp(torch.tensor(100.0, dtype=torch.float32)))

    expected = recurrent_mlstm(q, k, v, input_gate, forget_gate)
    actual = mlstm_parallel(q, k, v, input_gate, forget_gate)
    assert torch.isfinite(actual).all()
    assert relative_error(actual, expected) < 1e-4


def test_parallel_is_causal():
    q, k, v, input_gate, forget_gate = make_inputs(16, torch.float64)
    before = mlstm_parallel(q, k, v, input_gate, forget_gate)
    v_changed = v.clone()
    v_changed[..., 10:, :] += 5.0
    after = mlstm_parallel(q, k, v_changed, input_gate, forget_gate)
    assert torch.equal(before[..., :10, :], after[..., :10, :])
    assert not torch.allclose(before[..., 10:, :], after[..., 10:, :])


def test_parallel_gradients_finite():
    inputs = [t.requires_grad_() for t in make_inputs(32, torch.float32, input_scale=10.0)]
    mlstm_parallel(*inputs).square().mean().backward()
    for tensor in inputs:
        assert torch.isfinite(tensor.grad).all()
