"""Evaluation and generation on training weights: without a gradient, a master weight is quantized and packed once
and reused (``BitNetTrainingLinearWeight.prepared``) until the weight changes, and it must never be stale: every
way a weight changes is tried here, each followed by a no-grad forward that must equal the spec's numbers."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchao.quantization import quantize_

from bitnet_ao import bitnet_training, tensor
from tests.spec_reference import act_quant, ternary_weight


def _spec_forward(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """The BitNet forward written out from the spec in float64: per-token int8 input, ternary weight, both scales."""
    xq, sx = act_quant(x)
    wq, sw = ternary_weight(layer.weight._data)
    return (xq.double() @ wq.double().t()) * sx.double()[:, None] * sw.double() + layer.bias.double()


def _layer() -> nn.Linear:
    torch.manual_seed(0)
    layer = nn.Linear(96, 40)
    quantize_(layer, bitnet_training())
    return layer


def _train_step(layer: nn.Linear, optimizer: torch.optim.Optimizer) -> None:
    layer(torch.randn(8, 96)).square().sum().backward()
    optimizer.step()
    optimizer.zero_grad()


def _low_bit(name: str):
    from torchao.optim import AdamW4bit, AdamW8bit

    return {"AdamW8bit": AdamW8bit, "AdamW4bit": AdamW4bit}[name]


CHANGES = {
    "SGD": lambda layer: _train_step(layer, torch.optim.SGD(layer.parameters(), lr=0.5)),
    "SGD foreach": lambda layer: _train_step(layer, torch.optim.SGD(layer.parameters(), lr=0.5, foreach=True)),
    "Adam fused": lambda layer: _train_step(layer, torch.optim.Adam(layer.parameters(), lr=0.1, fused=True)),
    "Adam foreach": lambda layer: _train_step(layer, torch.optim.Adam(layer.parameters(), lr=0.1, foreach=True)),
    "AdamW fused": lambda layer: _train_step(layer, torch.optim.AdamW(layer.parameters(), lr=0.1, fused=True)),
    "AdamW for-loop": lambda layer: _train_step(layer, torch.optim.AdamW(layer.parameters(), lr=0.1, foreach=False)),
    "torchao AdamW8bit": lambda layer: _train_step(layer, _low_bit("AdamW8bit")(layer.parameters(), lr=0.1)),
    "load_state_dict": lambda layer: layer.load_state_dict({k: v * -1.5 for k, v in layer.state_dict().items()}),
    "load_state_dict assign": lambda layer: layer.load_state_dict(
        {k: v.clone() * 3 for k, v in layer.state_dict().items()}, assign=True
    ),
    "in-place mul_": lambda layer: torch.no_grad()(layer.weight.mul_)(-2),
    ".data.mul_": lambda layer: layer.weight.data.mul_(-2),
    "master tensor mul_": lambda layer: layer.weight._data.mul_(-2),
    "nn.init": lambda layer: nn.init.normal_(layer.weight),
    "copy_": lambda layer: torch.no_grad()(layer.weight.copy_)(torch.randn(40, 96)),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_no_grad_forward_sees_every_change_of_the_weight(change):
    layer = _layer()
    x = torch.randn(5, 96)
    with torch.no_grad():
        before = layer(x)
    torch.testing.assert_close(before.double(), _spec_forward(x, layer), rtol=1e-5, atol=1e-5)
    CHANGES[change](layer)
    with torch.no_grad():
        after = layer(x)
    assert not torch.equal(after, before), f"{change}: the weight changed, the output did not (a stale weight)"
    torch.testing.assert_close(after.double(), _spec_forward(x, layer), rtol=1e-5, atol=1e-5)
    assert torch.equal(after, layer(x.requires_grad_()).detach()), "no-grad and training forwards differ"


def test_the_weight_is_packed_once_while_it_does_not_change(monkeypatch):
    layer = _layer()
    packs = []
    original = tensor.pack_linear_weight
    monkeypatch.setattr(tensor, "pack_linear_weight", lambda *a, **k: packs.append(1) or original(*a, **k))
    x = torch.randn(1, 96)
    with torch.inference_mode():
        outputs = [layer(x) for _ in range(4)]
    assert len(packs) == 1 and all(torch.equal(o, outputs[0]) for o in outputs)
    _train_step(layer, torch.optim.AdamW(layer.parameters(), lr=0.1, fused=True))
    with torch.no_grad():
        layer(x)
        layer(x)
    assert len(packs) == 2, "one new packing after the optimizer step, reused after that"


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_training_step_sees_every_change_of_the_weight(change, force_routes):
    """Training forwards and grad_input share one ternarization per weight version on a route that takes either
    layout (torch._int_mm): after every kind of change the next training forward is the spec's again."""
    force_routes("int_mm", "int_mm")
    layer = _layer()
    x = torch.randn(5, 96)
    layer(x).sum().backward()
    CHANGES[change](layer)
    layer.zero_grad()
    y = layer(x)
    torch.testing.assert_close(y.detach().double(), _spec_forward(x, layer), rtol=1e-5, atol=1e-5)


def test_forward_and_grad_input_share_one_ternarization_per_step(monkeypatch, force_routes):
    force_routes("int_mm", "int_mm")
    layer = _layer()
    calls = []
    original = tensor.quantize_weight
    monkeypatch.setattr(tensor, "quantize_weight", lambda *a, **k: calls.append(1) or original(*a, **k))
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1, fused=True)
    x = torch.randn(4, 96, requires_grad=True)
    for _ in range(2):  # gradient accumulation: two forwards and backwards on one weight version
        y = layer(x)
        y.square().sum().backward()
    assert len(calls) == 1, "one ternarization for two forwards and two grad_inputs"
    # Each grad_input is the spec's INT8 one: the per-row int8 output gradient times the ternary weight, both scaled.
    g_q, s_g = act_quant(2 * y.detach(), eps=1e-30)
    w_q, s_w = ternary_weight(layer.weight._data)
    expected = 2 * (g_q.double() * s_g.double()[:, None]) @ (w_q.double() * s_w.double())
    torch.testing.assert_close(x.grad.double(), expected, rtol=1e-5, atol=1e-6)
    optimizer.step()
    layer(x).square().sum().backward()
    assert len(calls) == 2, "a new one after the optimizer step"
