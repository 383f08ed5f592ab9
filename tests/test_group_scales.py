"""Group scales (``scale_groups``, ``group_dim``): the BitNet paper's group quantization on a single device.

Checked against the group fake-quant linear of tests/spec_reference.py, and for the property tensor parallelism
rests on: a grouped layer equals its column blocks (``group_dim=0``) or the sum of its row blocks (``group_dim=1``)
computed as separate one-group layers, exactly in float32, forward and backward.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchao.quantization import quantize_

from bitnet_ao import BitNetPackedLinearWeight, bitnet_inference, bitnet_training
from tests import spec_reference
from tests.conftest import save_load_roundtrip

IN, OUT = 30, 21  # not multiples of 8; G = 3 divides both


def _layers(groups: int, group_dim: int, weights: str = "ternary", bias: bool = False, **config):
    torch.manual_seed(0)
    plain = nn.Linear(IN, OUT, bias=bias)
    spec = spec_reference.FakeQuantGroupBitLinear(
        IN, OUT, bias=bias, groups=groups, group_dim=group_dim, weights=weights
    )
    spec.load_state_dict(plain.state_dict())
    quantize_(plain, bitnet_training(weights=weights, scale_groups=groups, group_dim=group_dim, **config))
    return plain, spec


@pytest.mark.parametrize("weights", ["ternary", "binary"])
@pytest.mark.parametrize("group_dim", [0, 1])
@pytest.mark.parametrize("groups", [1, 3])
def test_forward_matches_the_group_fake_quant_spec(weights, group_dim, groups):
    bitnet, spec = _layers(groups, group_dim, weights, bias=True)
    x = torch.randn(7, IN) * torch.linspace(0.1, 10, IN)  # per-column magnitudes: group scales differ
    torch.testing.assert_close(bitnet(x), spec(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("group_dim", [0, 1])
def test_high_precision_backward_matches_the_spec_gradients(group_dim):
    bitnet, spec = _layers(3, group_dim, int8_grad_input=False, int8_grad_weight=False)
    x = torch.randn(9, IN, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    grad = torch.randn(9, OUT)
    bitnet(x).backward(grad)
    spec(x2).backward(grad)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bitnet.weight.grad, spec.weight.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("group_dim", [0, 1])
def test_int8_backward_approximates_the_spec_gradients(group_dim):
    bitnet, spec = _layers(3, group_dim)
    x = torch.randn(64, IN, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    grad = torch.randn(64, OUT)
    bitnet(x).backward(grad)
    spec(x2).backward(grad)
    assert spec_reference.snr_db(x.grad, x2.grad) > 30
    assert spec_reference.snr_db(bitnet.weight.grad, spec.weight.grad) > 30


def _blocks(layer: nn.Linear, groups: int, group_dim: int) -> list[nn.Linear]:
    """The layer cut into ``groups`` one-group layers along ``group_dim``: what tensor-parallel ranks hold."""
    parts = []
    for w in layer.weight._data.chunk(groups, dim=group_dim):
        part = nn.Linear(w.shape[1], w.shape[0], bias=False)
        part.weight = nn.Parameter(w.clone())
        quantize_(part, bitnet_training(weights=layer.weight.config.weights))
        parts.append(part)
    return parts


@pytest.mark.parametrize("weights", ["ternary", "binary"])
@pytest.mark.parametrize("group_dim", [0, 1])
def test_a_grouped_layer_equals_its_shards_forward_and_backward(cpu_route, weights, group_dim):
    """The layout-independence property: column blocks concatenate (group_dim 0) and row blocks sum (group_dim 1)
    to the grouped layer's output, input gradient and weight gradient, exactly in float32."""
    layer, _ = _layers(3, group_dim, weights)
    parts = _blocks(layer, 3, group_dim)
    x = torch.randn(11, IN, requires_grad=True)
    xs = x.detach().clone().requires_grad_(True)
    grad = torch.randn(11, OUT)
    y = layer(x)
    if group_dim == 0:
        y_parts = torch.cat([p(xs) for p in parts], dim=1)
        (y_parts * grad).sum().backward()
    else:
        y_parts = sum(p(x_g) for p, x_g in zip(parts, xs.chunk(3, dim=1), strict=True))
        y_parts.backward(grad)
    y.backward(grad)
    assert torch.equal(y, y_parts)
    torch.testing.assert_close(x.grad, xs.grad, rtol=1e-6, atol=1e-7)  # shards' input gradients: a float sum
    assert torch.equal(layer.weight.grad, torch.cat([p.weight.grad for p in parts], dim=group_dim))


def test_groups_must_divide_the_grouped_dimension():
    with pytest.raises(ValueError, match=r"scale_groups=4 with group_dim=1 must divide in_features=30"):
        quantize_(nn.Sequential(nn.Linear(IN, OUT)), bitnet_training(scale_groups=4, group_dim=1))


@pytest.mark.parametrize("group_dim", [0, 1])
def test_packed_inference_with_groups_equals_training(cpu_route, group_dim):
    layer, _ = _layers(3, group_dim, bias=True)
    packed = copy.deepcopy(layer)
    quantize_(packed, bitnet_inference())
    assert isinstance(packed.weight, BitNetPackedLinearWeight)
    assert packed.weight.scale.shape == ((OUT, 1) if group_dim == 0 else (1, IN))
    for m in (1, 40):
        x = torch.randn(m, IN)
        with torch.no_grad():
            assert torch.equal(packed(x), layer(x))
    fresh = copy.deepcopy(layer)
    quantize_(fresh, bitnet_inference())
    fresh.load_state_dict(save_load_roundtrip(packed.state_dict()))
    assert torch.equal(fresh.weight.scale, packed.weight.scale)


def test_quantize_for_tensor_parallel_groups_each_linear_along_its_tp_dimension():
    from benchmarks.model import ModelConfig, Transformer
    from bitnet_ao.surgery import apply_bitnet_norms
    from bitnet_ao.tensor_parallel import quantize_for_tensor_parallel, tensor_parallel_group_dim

    model = Transformer(ModelConfig(vocab_size=16, dim=32, n_layers=1, n_heads=4, hidden_dim=64, max_seq_len=8))
    apply_bitnet_norms(model)
    quantize_for_tensor_parallel(model, bitnet_training(), scale_groups=4)
    configs = {
        name: m.weight.config for name, m in model.named_modules() if isinstance(m, nn.Linear) and name != "output"
    }
    assert {name: c.group_dim for name, c in configs.items()} == {
        "layers.0.attention.wq": 0,
        "layers.0.attention.wk": 0,
        "layers.0.attention.wv": 0,
        "layers.0.attention.wo": 1,
        "layers.0.feed_forward.w1": 0,
        "layers.0.feed_forward.w2": 1,
        "layers.0.feed_forward.w3": 0,
    }
    assert {c.scale_groups for c in configs.values()} == {4}
    assert not isinstance(model.output.weight, type(model.layers[0].attention.wq.weight))
    assert tensor_parallel_group_dim("model.layers.3.self_attn.o_proj") == 1
    assert tensor_parallel_group_dim("model.layers.3.mlp.up_proj") == 0
    tokens = torch.randint(0, 16, (2, 8))
    model(tokens, tokens).backward()  # the grouped model trains (the fused norm falls back where it must)
