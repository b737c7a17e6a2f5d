"""Network shapes, gradients, configuration and checkpoints."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import REPO
from napari_xlstm_unet.model import ModelConfig, build_model, preset
from napari_xlstm_unet.model.checkpoint import LoadedModel, load_checkpoint, save_checkpoint
from napari_xlstm_unet.model.vil import ViLLayer2d

SHIPPED_CELLS = REPO / "src" / "napari_xlstm_unet" / "weights" / "cells_small.pt"

# Fields added after the first checkpoints were written, with the values
# that reproduce the network those checkpoints were trained as.
LEGACY_DEFAULTS = {"stem_blocks": 1, "vil_directions": 1, "vil_channel_tokens": False, "patch_size": None}


def count_parameters(module: torch.nn.Module, prefix: str = "") -> int:
    return sum(p.numel() for name, p in module.named_parameters() if name.startswith(prefix))


@pytest.mark.parametrize("xlstm", ["none", "bot", "enc", "full"])
@pytest.mark.parametrize("size", [(1, 1), (7, 7), (31, 50), (33, 64)])
def test_output_shape_matches_input(tiny_config, xlstm, size):
    config = dataclasses.replace(tiny_config, xlstm=xlstm)
    model = build_model(config).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, *size))
    assert logits.shape == (2, 3, *size)
    assert torch.isfinite(logits).all()


def test_deep_supervision_outputs_in_training(tiny_config):
    model = build_model(tiny_config).train()
    outputs = model(torch.randn(2, 3, 32, 32))
    assert [tuple(o.shape) for o in outputs] == [(2, 3, 32, 32), (2, 3, 16, 16)]


def test_backward_reaches_every_parameter(tiny_config):
    model = build_model(tiny_config).train()
    outputs = model(torch.randn(2, 3, 32, 32))
    sum(o.square().mean() for o in outputs).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert missing == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_vil_placement_follows_reference_rule():
    # (s odd) XOR (n_stages odd), and s > 1: stages 3, 5, 7 of 8 and 2, 4 of 5.
    assert preset("reference", xlstm="enc").vil_stages == (3, 5, 7)
    assert preset("small", xlstm="enc").vil_stages == (2, 4)
    assert preset("small", xlstm="bot").vil_stages == (4,)
    assert preset("small", xlstm="none").vil_stages == ()


def test_full_placement_covers_every_stage():
    assert preset("small", xlstm="full").vil_stages == (0, 1, 2, 3, 4)
    assert preset("reference", xlstm="full").vil_stages == tuple(range(8))


@pytest.mark.parametrize("directions", [1, 2])
def test_full_placement_forward_backward_odd_size(tiny_config, directions):
    config = dataclasses.replace(tiny_config, xlstm="full", vil_directions=directions)
    model = build_model(config).train()
    outputs = model(torch.randn(2, 3, 37, 53))
    assert [tuple(o.shape) for o in outputs] == [(2, 3, 37, 53), (2, 3, 20, 28)]
    sum(o.square().mean() for o in outputs).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert missing == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_bidirectional_bot_forward_backward_odd_size(tiny_config):
    model = build_model(dataclasses.replace(tiny_config, vil_directions=2)).train()
    outputs = model(torch.randn(1, 3, 37, 53))
    outputs[0].square().mean().backward()
    reverse_grads = [p.grad for name, p in model.named_parameters() if ".reverse_block." in name]
    assert reverse_grads
    assert all(g is not None and torch.isfinite(g).all() for g in reverse_grads)


def test_bidirectional_adds_reverse_block(tiny_config):
    one_direction = build_model(tiny_config)
    two_directions = build_model(dataclasses.replace(tiny_config, vil_directions=2))
    assert two_directions.vil["2"].reverse_block is not None
    assert count_parameters(two_directions, "vil") == 2 * count_parameters(one_direction, "vil")
    convs_one = count_parameters(one_direction) - count_parameters(one_direction, "vil")
    convs_two = count_parameters(two_directions) - count_parameters(two_directions, "vil")
    assert convs_two == convs_one


def first_token_input_gradient(layer: ViLLayer2d, x: torch.Tensor) -> torch.Tensor:
    # Gradient of the top-left output pixel with respect to every input pixel, (H, W).
    x = x.clone().requires_grad_(True)
    layer(x)[..., 0, 0].sum().backward()
    return x.grad.abs().sum(dim=(0, 1))


def test_one_direction_first_token_sees_only_itself():
    torch.manual_seed(0)
    grad = first_token_input_gradient(ViLLayer2d(8, directions=1), torch.randn(1, 8, 3, 5))
    assert grad[0, 0] > 0
    later = grad.flatten()[1:]
    assert torch.count_nonzero(later) == 0


def test_two_directions_first_token_sees_later_tokens():
    torch.manual_seed(0)
    grad = first_token_input_gradient(ViLLayer2d(8, directions=2), torch.randn(1, 8, 3, 5))
    assert grad[-1, -1] > 0  # the bottom-right pixel reaches the top-left output
    assert torch.all(grad > 0)


def test_second_block_reads_from_bottom_right():
    # With the first block made an identity (zero down-projection), the layer
    # is the second block alone: its bottom-right output must depend on the
    # bottom-right input only, and its top-left output on every input.
    torch.manual_seed(0)
    layer = ViLLayer2d(8, directions=2)
    with torch.no_grad():
        layer.block.down_proj.weight.zero_()
    x = torch.randn(1, 8, 3, 5, requires_grad=True)
    layer(x)[..., -1, -1].sum().backward()
    grad = x.grad.abs().sum(dim=(0, 1))
    assert grad[-1, -1] > 0
    assert torch.count_nonzero(grad.flatten()[:-1]) == 0

    x.grad = None
    layer(x)[..., 0, 0].sum().backward()
    assert torch.all(x.grad.abs().sum(dim=(0, 1)) > 0)


def test_reference_bot_parameter_count():
    # The reference code's UXlstmBot for 8 stages, a 512 x 512 patch, 3
    # channels and 3 classes has 64.72 M parameters, 1.62 M in its ViL.
    model = build_model(preset("reference", xlstm="bot", in_channels=3, num_classes=3))
    assert count_parameters(model) == pytest.approx(64.72e6, rel=0.01)
    assert count_parameters(model, "vil") == pytest.approx(1.62e6, rel=0.01)


def test_reference_enc_parameter_count():
    # UXlstmEnc, same plan: 64.01 M parameters, 0.83 M in its three ViLs.
    model = build_model(preset("reference", xlstm="enc", in_channels=3, num_classes=3))
    assert count_parameters(model) == pytest.approx(64.01e6, rel=0.01)
    assert count_parameters(model, "vil") == pytest.approx(0.83e6, rel=0.01)


def test_reference_preset_choices():
    config = preset("reference", xlstm="bot")
    assert config.vil_directions == 1
    assert config.full_resolution_skip is False
    assert config.stem_blocks == 2
    assert config.encoder_blocks == (2, 2, 2, 2, 1, 1, 1, 1)
    assert config.decoder_blocks == (1, 1, 1, 2, 2, 2, 2)
    assert config.vil_channel_tokens is False
    assert config.patch_size is None


def test_reference_enc_layout():
    config = preset("reference", xlstm="enc")
    assert config.vil_stages == (3, 5, 7)
    assert config.encoder_blocks == (2, 3, 2, 2, 1, 1, 1, 1)  # the extra block after stage 1
    assert config.patch_size == (512, 512)
    assert config.channel_token_grids == {5: (16, 16), 7: (4, 4)}

    model = build_model(config)
    assert model.vil["3"].block.dim == 256  # 64 x 64 pixels as tokens, 256 channels wide
    assert model.vil["5"].block.dim == 256  # 512 channels as tokens, 16 x 16 pixels wide
    assert model.vil["7"].block.dim == 16  # 512 channels as tokens, 4 x 4 pixels wide
    assert len(model.stem_identity) == 1


def test_reference_enc_overrides_win():
    config = preset("reference", xlstm="enc", vil_channel_tokens=False, encoder_blocks=(2,) * 8)
    assert config.channel_token_grids == {}
    assert config.encoder_blocks == (2,) * 8


def channel_token_config(tiny_config, patch_size):
    # 3 stages: "enc" puts a ViL at stage 2, a patch_size / 4 grid with 16 channels.
    return dataclasses.replace(tiny_config, xlstm="enc", vil_channel_tokens=True, patch_size=patch_size)


def test_channel_tokens_tiny_network(tiny_config):
    config = channel_token_config(tiny_config, (8, 8))
    assert config.channel_token_grids == {2: (2, 2)}
    model = build_model(config).train()
    assert model.vil["2"].block.dim == 4
    outputs = model(torch.randn(2, 3, 5, 7))  # pads to 8 x 8
    assert tuple(outputs[0].shape) == (2, 3, 5, 7)
    assert tuple(model.eval()(torch.randn(1, 3, 2, 3)).shape) == (1, 3, 2, 3)  # far below the stride
    model.train()
    sum(o.square().mean() for o in outputs).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_channel_tokens_reject_other_sizes(tiny_config):
    model = build_model(channel_token_config(tiny_config, (8, 8))).eval()
    with pytest.raises(ValueError, match="at most 8 pixels high and 8 wide .* got 12 x 8"):
        model(torch.randn(1, 3, 12, 8))


def test_channel_tokens_block_size_fallback(tiny_config):
    model = build_model(channel_token_config(tiny_config, (8, 12)))
    block = model.vil["2"].block
    assert block.dim == 6
    assert block.num_heads == 2
    assert block.q_proj.block_size == 2


def test_channel_token_layer_tokens_are_channels():
    # One direction: the first channel's output cannot depend on later channels.
    torch.manual_seed(0)
    layer = ViLLayer2d(5, channel_token_grid=(2, 2))
    x = torch.randn(1, 5, 2, 2, requires_grad=True)
    layer(x)[:, 0].sum().backward()
    grad = x.grad.abs().sum(dim=(0, 2, 3))
    assert grad[0] > 0
    assert torch.count_nonzero(grad[1:]) == 0
    with pytest.raises(ValueError, match="2 x 2 feature map"):
        layer(torch.randn(1, 5, 3, 2))


def test_none_model_has_no_vil(tiny_config):
    model = build_model(dataclasses.replace(tiny_config, xlstm="none"))
    assert not any(isinstance(m, ViLLayer2d) for m in model.modules())


def test_config_round_trip(tiny_config):
    assert ModelConfig.from_dict(tiny_config.to_dict()) == tiny_config
    changed = dataclasses.replace(tiny_config, stem_blocks=2, vil_directions=2, xlstm="enc",
                                  vil_channel_tokens=True, patch_size=(8, 8))
    assert ModelConfig.from_dict(changed.to_dict()) == changed


def test_config_from_dict_without_new_keys(tiny_config):
    values = {k: v for k, v in tiny_config.to_dict().items() if k not in LEGACY_DEFAULTS}
    assert ModelConfig.from_dict(values) == tiny_config


def test_checkpoint_without_new_fields_loads(tmp_path):
    # The shipped cell checkpoint with the later config fields removed, as
    # checkpoints written before those fields existed look.
    stored = torch.load(SHIPPED_CELLS, map_location="cpu", weights_only=True)
    for key in LEGACY_DEFAULTS:
        stored["model_config"].pop(key)
    torch.save(stored, tmp_path / "legacy.pt")
    loaded = load_checkpoint(tmp_path / "legacy.pt")
    for key, value in LEGACY_DEFAULTS.items():
        assert getattr(loaded.config, key) == value, key
    assert ModelConfig.from_dict(loaded.config.to_dict()) == loaded.config
    assert loaded.model.vil["4"].reverse_block is None
    image = torch.randn(1, 3, 40, 56)
    with torch.no_grad():
        logits = loaded.model(image)
        expected = load_checkpoint(SHIPPED_CELLS).model(image)
    assert logits.shape == (1, 3, 40, 56)
    torch.testing.assert_close(logits, expected)


@pytest.mark.parametrize(
    "bad",
    [
        {"xlstm": "middle"},
        {"strides": (1, 2)},
        {"decoder_blocks": (1, 1, 1)},
        {"num_classes": 1},
        {"vil_directions": 3},
        {"stem_blocks": 0},
        {"vil_channel_tokens": True},
        {"vil_channel_tokens": True, "patch_size": (8, 10)},
        {"vil_channel_tokens": True, "patch_size": (4, 8)},
        {"patch_size": (8,)},
    ],
)
def test_config_rejects_invalid_values(tiny_config, bad):
    with pytest.raises(ValueError):
        dataclasses.replace(tiny_config, **bad)


def test_vil_layer_runs_float32_under_autocast():
    layer = ViLLayer2d(8)
    x = torch.randn(1, 8, 4, 5, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert y.shape == x.shape


def test_checkpoint_round_trip(tmp_path, tiny_config):
    model = build_model(tiny_config).eval()
    loaded = LoadedModel(model=model, config=tiny_config, postprocess={"prob_threshold": 0.4, "min_size": 8},
                         model_card={"data": "synthetic"})
    path = save_checkpoint(tmp_path / "model.pt", loaded)
    restored = load_checkpoint(path)

    x = torch.randn(1, 3, 24, 24)
    with torch.no_grad():
        assert torch.equal(model(x), restored.model(x))
    assert restored.config == tiny_config
    # Written without a split depth, as before seed splitting existed: read as 0 (seeds kept whole).
    assert restored.postprocess == {"prob_threshold": 0.4, "min_size": 8, "split_depth": 0.0}
    loaded.postprocess["split_depth"] = 2.5
    assert load_checkpoint(save_checkpoint(tmp_path / "model.pt", loaded)).postprocess["split_depth"] == 2.5
    assert restored.model_card == {"data": "synthetic"}
    assert not restored.model.training
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_checkpoint_with_wrong_weights_names_file(tmp_path, tiny_config):
    loaded = LoadedModel(model=build_model(tiny_config), config=tiny_config)
    path = save_checkpoint(tmp_path / "model.pt", loaded)
    payload = torch.load(path, weights_only=True)
    payload["model_config"]["in_channels"] = 1
    torch.save(payload, path)
    with pytest.raises(ValueError, match="model.pt"):
        load_checkpoint(path)
