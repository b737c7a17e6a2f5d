"""The parallel, chunkwise and recurrent mLSTM forms against each other.

The float64 recurrent form, one token at a time, is the reference. Each
float32 form must match it within 1e-4 relative error (norm of the difference
over the norm of the reference), so any two of them agree within 2e-4 at worst.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from napari_xlstm_unet.model import mlstm as mlstm_module
from napari_xlstm_unet.model.mlstm import (
    AUTO_PARALLEL_MAX_TOKENS,
    mlstm,
    mlstm_chunkwise,
    mlstm_parallel,
    mlstm_recurrent,
)
from napari_xlstm_unet.model.vil import MAX_PARALLEL_TOKENS, ViLLayer2d

LENGTHS = [1, 2, 15, 16, 17, 63, 64, 65, 257, 1000, 4097]
CHUNK_SIZES = [16, 64, 256]
TOLERANCE = 1e-4


def relative_error(actual, expected):
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def make_inputs(seq_len, dtype, input_scale=1.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shape = (2, 4, seq_len, 8)
    q, k, v = (torch.randn(shape, generator=generator, dtype=dtype) for _ in range(3))
    input_gate = input_scale * torch.randn(shape[:3], generator=generator, dtype=dtype)
    forget_gate = 3.0 + torch.randn(shape[:3], generator=generator, dtype=dtype)
    return q, k, v, input_gate, forget_gate


@functools.lru_cache(maxsize=None)
def sequence_inputs(seq_len, gates):
    """Return float32 inputs of shape (1, 2, S, 8), small enough for 4,097 tokens.

    ``gates="moderate"``: gate pre-activations N(0, 1) and 3 + N(0, 1), as at
    initialisation. ``gates="extreme"``: input gates uniform in [-100, 100]
    with every 7th set to 100, forget gates uniform in [-30, 30]. There q and
    k are positive. With signed scores a few tokens get a denominator that
    nearly cancels (sum |w| / |sum w| in the hundreds), and float32 rounding
    of exponents near 100 (steps of 8e-6) times that factor exceeds 1e-4 in
    every form, the recurrent one included. The test would then measure that
    conditioning, not the stabilisation.
    """
    generator = torch.Generator().manual_seed(seq_len)
    shape = (1, 2, seq_len, 8)
    q, k, v = (torch.randn(shape, generator=generator) for _ in range(3))
    if gates == "moderate":
        input_gate = torch.randn(shape[:3], generator=generator)
        forget_gate = 3.0 + torch.randn(shape[:3], generator=generator)
    else:
        q, k = q.abs(), k.abs()
        input_gate = torch.rand(shape[:3], generator=generator) * 200 - 100
        input_gate[..., ::7] = 100.0
        forget_gate = torch.rand(shape[:3], generator=generator) * 60 - 30
    return q, k, v, input_gate, forget_gate


@functools.lru_cache(maxsize=None)
def reference_output(seq_len, gates):
    inputs = [tensor.double() for tensor in sequence_inputs(seq_len, gates)]
    return mlstm_recurrent(*inputs)


def gradients(function, inputs, output_weights):
    """Return d(sum(output * output_weights)) / d(each input)."""
    leaves = [tensor.detach().clone().requires_grad_() for tensor in inputs]
    (function(*leaves) * output_weights).sum().backward()
    return [leaf.grad for leaf in leaves]


# Agreement of the forward pass.


@pytest.mark.parametrize("gates", ["moderate", "extreme"])
@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
@pytest.mark.parametrize("seq_len", LENGTHS)
def test_chunkwise_matches_recurrent(seq_len, chunk_size, gates):
    actual = mlstm_chunkwise(*sequence_inputs(seq_len, gates), chunk_size=chunk_size)
    assert actual.shape == (1, 2, seq_len, 8)
    assert torch.isfinite(actual).all()
    assert relative_error(actual, reference_output(seq_len, gates)) < TOLERANCE


@pytest.mark.parametrize("gates", ["moderate", "extreme"])
@pytest.mark.parametrize("chunks_per_group", [1, 2, 3])
@pytest.mark.parametrize("seq_len", [16, 17, 65, 257])
def test_chunk_groups_match_recurrent(seq_len, chunks_per_group, gates):
    # At chunk size 16 these lengths give 1, 2, 5 and 17 chunks, so the last
    # group is full for some and partly empty for others.
    actual = mlstm_chunkwise(*sequence_inputs(seq_len, gates), chunk_size=16,
                             chunks_per_group=chunks_per_group)
    assert torch.isfinite(actual).all()
    assert relative_error(actual, reference_output(seq_len, gates)) < TOLERANCE


@pytest.mark.parametrize("gates", ["moderate", "extreme"])
@pytest.mark.parametrize("seq_len", LENGTHS)
def test_parallel_matches_recurrent(seq_len, gates):
    actual = mlstm_parallel(*sequence_inputs(seq_len, gates))
    assert torch.isfinite(actual).all()
    assert relative_error(actual, reference_output(seq_len, gates)) < TOLERANCE


@pytest.mark.parametrize("gates", ["moderate", "extreme"])
@pytest.mark.parametrize("seq_len", [length for length in LENGTHS if length <= 1000])
def test_recurrent_float32_matches_float64(seq_len, gates):
    actual = mlstm_recurrent(*sequence_inputs(seq_len, gates))
    assert actual.dtype == torch.float32
    assert relative_error(actual, reference_output(seq_len, gates)) < TOLERANCE


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seq_len", [1, 7, 64])
def test_forms_agree_with_batch_and_heads(dtype, seq_len):
    inputs = make_inputs(seq_len, dtype)
    expected = mlstm_recurrent(*inputs)
    assert relative_error(mlstm_parallel(*inputs), expected) < TOLERANCE
    assert relative_error(mlstm_chunkwise(*inputs, chunk_size=16), expected) < TOLERANCE
    assert mlstm_chunkwise(*inputs).dtype == dtype


def test_forms_equal_in_float64():
    # Same maths, so float64 leaves only rounding at the 1e-15 level.
    inputs = [tensor.double() for tensor in sequence_inputs(257, "extreme")]
    expected = reference_output(257, "extreme")
    assert relative_error(mlstm_parallel(*inputs), expected) < 1e-12
    assert relative_error(mlstm_chunkwise(*inputs, chunk_size=16), expected) < 1e-12


def test_recurrent_single_token_closed_form():
    # One token: m = i, C = k v^T / sqrt(DH), n = k / sqrt(DH), so
    # h = s v / (max(|s|, exp(-i)) + eps) with s = q . k / sqrt(DH).
    q, k, v, input_gate, forget_gate = make_inputs(1, torch.float64)
    score = (q * k).sum(-1) / math.sqrt(q.shape[-1])  # (B, NH, 1)
    expected = score[..., None] * v / (
        torch.maximum(score.abs(), torch.exp(-input_gate))[..., None] + 1e-6
    )
    torch.testing.assert_close(mlstm_recurrent(q, k, v, input_gate, forget_gate), expected)


def test_forms_stable_with_huge_input_gates():
    q, k, v, input_gate, forget_gate = make_inputs(48, torch.float32)
    q, k = q.abs(), k.abs()  # no cancelling denominators, see sequence_inputs
    input_gate = input_gate.abs() * 40 + 20  # pre-activations from 20 up to about 100+
    input_gate[..., 5] = 100.0

    # Without stabilisation exp(100) overflows float32 (max about exp(88.7)).
    assert torch.isinf(torch.exp(torch.tensor(100.0, dtype=torch.float32)))

    inputs = (q, k, v, input_gate, forget_gate)
    expected = mlstm_recurrent(*[t.double() for t in inputs])
    for kernel in ("parallel", "chunkwise", "recurrent"):
        actual = mlstm(*inputs, kernel=kernel, chunk_size=16)
        assert torch.isfinite(actual).all(), kernel
        assert relative_error(actual, expected) < TOLERANCE, kernel


@pytest.mark.parametrize("kernel", ["parallel", "chunkwise", "recurrent"])
def test_kernel_is_causal(kernel):
    q, k, v, input_gate, forget_gate = make_inputs(40, torch.float64)
    before = mlstm(q, k, v, input_gate, forget_gate, kernel=kernel, chunk_size=16)
    v_changed = v.clone()
    v_changed[..., 20:, :] += 5.0
    after = mlstm(q, k, v_changed, input_gate, forget_gate, kernel=kernel, chunk_size=16)
    assert torch.equal(before[..., :20, :], after[..., :20, :])
    assert not torch.allclose(before[..., 20:, :], after[..., 20:, :])


def test_chunkwise_padding_leaves_real_tokens_alone():
    # 17 tokens in chunks of 16: the last chunk is padded with 15 tokens.
    # Cropping the input to 16 tokens must give the first 16 outputs exactly.
    inputs = sequence_inputs(17, "moderate")
    cropped = [tensor[:, :, :16] for tensor in inputs]
    full = mlstm_chunkwise(*inputs, chunk_size=16)
    torch.testing.assert_close(full[:, :, :16], mlstm_chunkwise(*cropped, chunk_size=16))


# Gradients.


@pytest.mark.parametrize("gates", ["moderate", "extreme"])
@pytest.mark.parametrize("seq_len, chunk_size", [(17, 16), (65, 16), (257, 64), (1000, 256)])
def test_chunkwise_gradients_match_parallel(seq_len, chunk_size, gates):
    inputs = sequence_inputs(seq_len, gates)
    output_weights = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(1))
    chunkwise = functools.partial(mlstm_chunkwise, chunk_size=chunk_size)
    expected = gradients(mlstm_parallel, [t.double() for t in inputs], output_weights.double())
    from_parallel = gradients(mlstm_parallel, inputs, output_weights)
    from_chunkwise = gradients(chunkwise, inputs, output_weights)
    names = ["q", "k", "v", "input_gate", "forget_gate"]
    for name, grad, parallel_grad, reference in zip(names, from_chunkwise, from_parallel, expected):
        assert torch.isfinite(grad).all(), name
        assert relative_error(grad, reference) < TOLERANCE, name
        assert relative_error(grad, parallel_grad) < 2 * TOLERANCE, name


@pytest.mark.parametrize("gates", ["moderate", "extreme"])
def test_chunk_group_gradients_match_parallel(gates):
    inputs = sequence_inputs(65, gates)
    output_weights = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(2))
    grouped = functools.partial(mlstm_chunkwise, chunk_size=16, chunks_per_group=2)
    expected = gradients(mlstm_parallel, [t.double() for t in inputs], output_weights.double())
    for name, grad, reference in zip(["q", "k", "v", "input_gate", "forget_gate"],
                                     gradients(grouped, inputs, output_weights), expected):
        assert torch.isfinite(grad).all(), name
        assert relative_error(grad, reference) < TOLERANCE, name


@pytest.mark.parametrize("gates", ["moderate", "extreme"])
def test_recurrent_gradients_match_parallel(gates):
    inputs = sequence_inputs(17, gates)
    output_weights = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(2))
    inputs64 = [t.double() for t in inputs]
    from_parallel = gradients(mlstm_parallel, inputs64, output_weights.double())
    from_recurrent = gradients(mlstm_recurrent, inputs64, output_weights.double())
    for name, grad, reference in zip(["q", "k", "v", "i", "f"], from_recurrent, from_parallel):
        assert relative_error(grad, reference) < 1e-10, name


@pytest.mark.parametrize("kernel", ["parallel", "chunkwise", "recurrent"])
def test_gradients_finite_with_very_negative_input_gate(kernel):
    # i = -100 makes exp(-m) overflow float32 unless the normaliser floor is
    # clamped. The output is then about 0, and the gradient must stay finite.
    inputs = list(make_inputs(20, torch.float32))
    inputs[3] = torch.full_like(inputs[3], -100.0)
    leaves = [t.requires_grad_() for t in inputs]
    out = mlstm(*leaves, kernel=kernel, chunk_size=8)
    out.square().sum().backward()
    assert torch.isfinite(out).all()
    for leaf in leaves:
        assert torch.isfinite(leaf.grad).all()


# Autocast and dtypes.


@pytest.mark.parametrize("kernel", ["parallel", "chunkwise", "recurrent"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_finite_under_autocast(kernel, dtype):
    # Inputs come in the autocast dtype, as a Linear layer under autocast
    # returns them. Huge input gates would overflow if computed in that dtype.
    # torch 2.13 supports float16 autocast on CPU as well.
    q, k, v, input_gate, forget_gate = make_inputs(70, torch.float32, input_scale=30.0)
    low = [t.to(dtype) for t in (q, k, v, input_gate, forget_gate)]
    expected = mlstm(*[t.float() for t in low], kernel=kernel, chunk_size=16)
    with torch.autocast("cpu", dtype=dtype):
        actual = mlstm(*low, kernel=kernel, chunk_size=16)
    assert actual.dtype == dtype
    assert torch.isfinite(actual).all()
    # Only the final cast to the low dtype separates the two.
    assert relative_error(actual, expected) < 1e-2


@pytest.mark.parametrize("kernel", ["parallel", "chunkwise", "recurrent"])
def test_kernel_ignores_autocast_for_float32_inputs(kernel):
    inputs = make_inputs(40, torch.float32)
    expected = mlstm(*inputs, kernel=kernel, chunk_size=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        actual = mlstm(*inputs, kernel=kernel, chunk_size=16)
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual, expected)


# Dispatcher.


def test_dispatcher_rejects_unknown_kernel():
    with pytest.raises(ValueError, match=r"'flash'.*'auto', 'parallel', 'chunkwise'"):
        mlstm(*make_inputs(4, torch.float32), kernel="flash")


def test_triton_kernel_rejects_cpu_tensors():
    with pytest.raises(ValueError, match="CUDA"):
        mlstm(*make_inputs(4, torch.float32), kernel="triton")


def test_chunkwise_rejects_nonpositive_chunk_size():
    with pytest.raises(ValueError, match="chunk_size"):
        mlstm_chunkwise(*make_inputs(4, torch.float32), chunk_size=0)
    with pytest.raises(ValueError, match="chunks_per_group must be a positive number of chunks, got 0"):
        mlstm_chunkwise(*make_inputs(4, torch.float32), chunks_per_group=0)


@pytest.mark.parametrize(
    "seq_len, expected",
    [(AUTO_PARALLEL_MAX_TOKENS, "parallel"), (AUTO_PARALLEL_MAX_TOKENS + 1, "chunkwise")],
)
def test_auto_kernel_choice(monkeypatch, seq_len, expected):
    calls = []
    monkeypatch.setattr(mlstm_module, "mlstm_parallel", lambda *a, **kw: calls.append("parallel"))
    monkeypatch.setattr(mlstm_module, "mlstm_chunkwise", lambda *a, **kw: calls.append("chunkwise"))
    mlstm(*make_inputs(seq_len, torch.float32), kernel="auto")
    assert calls == [expected]


# ViL layer.


def test_vil_layer_runs_past_parallel_limit():
    # 72 x 72 = 5,184 tokens, beyond what the parallel kernel accepts.
    layer = ViLLayer2d(4)
    x = torch.randn(1, 4, 72, 72, requires_grad=True)
    assert 72 * 72 > MAX_PARALLEL_TOKENS
    y = layer(x)
    y.square().mean().backward()
    assert y.shape == x.shape
    assert torch.isfinite(y).all()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())


def test_vil_layer_forced_parallel_rejects_long_input():
    layer = ViLLayer2d(4, kernel="parallel")
    with pytest.raises(ValueError, match="5184 tokens.*'chunkwise'"):
        layer(torch.randn(1, 4, 72, 72))


def test_vil_layer_kernels_agree_and_share_parameters():
    torch.manual_seed(0)
    parallel = ViLLayer2d(8, kernel="parallel")
    chunkwise = ViLLayer2d(8, kernel="chunkwise", chunk_size=32)
    assert parallel.state_dict().keys() == chunkwise.state_dict().keys()
    chunkwise.load_state_dict(parallel.state_dict())
    x = torch.randn(2, 8, 20, 20)  # 400 tokens
    with torch.no_grad():
        assert relative_error(chunkwise(x), parallel(x)) < TOLERANCE


def test_vil_layer_rejects_unknown_kernel():
    with pytest.raises(ValueError, match="'fast'"):
        ViLLayer2d(8, kernel="fast")
