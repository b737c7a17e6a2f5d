"""Network shapes, gradients, configuration and checkpoints."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from napari_xlstm_unet.model import ModelConfig, build_model, preset
from napari_xlstm_unet.model.checkpoint import LoadedModel, load_checkpoint, save_checkpoint
from napari_xlstm_unet.model.vil import ViLLayer2d


@pytest.mark.parametrize("xlstm", ["none", "bot", "enc"])
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


def test_none_model_has_no_vil(tiny_config):
    model = build_model(dataclasses.replace(tiny_config, xlstm="none"))
    assert not any(isinstance(m, ViLLayer2d) for m in model.modules())


def test_config_round_trip(tiny_config):
    assert ModelConfig.from_dict(tiny_config.to_dict()) == tiny_config


@pytest.mark.parametrize(
    "bad",
    [
        {"xlstm": "middle"},
        {"strides": (1, 2)},
        {"decoder_blocks": (1, 1, 1)},
        {"num_classes": 1},
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
    assert restored.postprocess == {"prob_threshold": 0.4, "min_size": 8}
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
