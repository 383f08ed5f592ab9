"""Quantization warmup (bitnet_ao/warmup.py, linear.warmup_linear) against the blend written out with the
spec's fake quantization (tests/spec_reference.py), and bit for bit against the INT8 path at lambda = 1."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchao.quantization import quantize_

from bitnet_ao import bitnet_training
from bitnet_ao.surgery import NormedLinear
from bitnet_ao.warmup import QuantizationWarmup
from tests.spec_reference import act_quant, binary_weight, ternary_weight


def _pair(weights: str = "ternary", bias: bool = True) -> tuple[nn.Linear, nn.Linear]:
    torch.manual_seed(0)
    plain = nn.Linear(48, 24, bias=bias)
    bitnet = copy.deepcopy(plain)
    quantize_(bitnet, bitnet_training(weights=weights))
    return plain, bitnet


@pytest.mark.parametrize("weights", ["ternary", "binary"])
@pytest.mark.parametrize("strength", [0.0, 0.25, 0.5])
def test_blend_is_the_straight_through_mix_of_full_precision_and_fake_quantization(weights, strength):
    plain, bitnet = _pair(weights)
    warmup = QuantizationWarmup(bitnet, warmup_steps=4, last_step=int(strength * 4))
    assert warmup.strength == strength
    x = torch.randn(3, 5, 48, requires_grad=True)
    y = bitnet(x)
    y.backward(torch.ones_like(y))

    # Independent: x + l (fq(x) - x), W + l (fq(W) - W), straight-through gradients.
    xr = x.detach().clone().requires_grad_(True)
    x_int, s_x = act_quant(xr.detach())
    x_fq = x_int * s_x.unsqueeze(-1)
    w = plain.weight
    w_int, s_w = (ternary_weight if weights == "ternary" else binary_weight)(w.detach())
    x_b = xr + strength * (x_fq - xr).detach()
    w_b = w + strength * (w_int * s_w - w).detach()
    expected = F.linear(x_b, w_b, plain.bias)
    expected.backward(torch.ones_like(expected))
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bitnet.weight.grad, plain.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bitnet.bias.grad, plain.bias.grad)


def test_strength_zero_is_the_pretrained_linear_and_one_is_the_int8_path_bit_for_bit():
    plain, bitnet = _pair()
    reference = copy.deepcopy(bitnet)  # quantized, never warmed up: the INT8 path
    warmup = QuantizationWarmup(bitnet, warmup_steps=2)
    x = torch.randn(4, 48)
    assert torch.equal(bitnet(x), plain(x))
    warmup.step()
    assert not torch.equal(bitnet(x), plain(x))
    warmup.step()
    assert warmup.strength == 1.0
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = bitnet(xa), reference(xb)
    assert torch.equal(ya, yb)
    ya.sum().backward()
    yb.sum().backward()
    assert torch.equal(xa.grad, xb.grad)
    assert torch.equal(bitnet.weight.grad, reference.weight.grad)


def test_schedule_state_dict_and_resume():
    _, bitnet = _pair()
    warmup = QuantizationWarmup(bitnet, warmup_steps=4)
    assert [warmup.strength] + [(warmup.step(), warmup.strength)[1] for _ in range(5)] == [0, 0.25, 0.5, 0.75, 1, 1]
    _, other = _pair()
    resumed = QuantizationWarmup(other, warmup_steps=100)
    resumed.load_state_dict({"warmup_steps": 4, "last_step": 2})
    assert resumed.strength == 0.5 and other.weight.quantization_strength == 0.5
    assert QuantizationWarmup(other, warmup_steps=0).strength == 1.0


def test_clear_errors():
    with pytest.raises(ValueError, match="no BitNet training weight.*quantize_"):
        QuantizationWarmup(nn.Linear(4, 4), warmup_steps=10)
    _, bitnet = _pair()
    with pytest.raises(ValueError, match="warmup_steps must be a non-negative int"):
        QuantizationWarmup(bitnet, warmup_steps=-1)


def test_warmup_through_the_fused_norm_equals_norm_then_linear():
    # apply_bitnet_norms' NormedLinear passes its norm into the linear; at lambda = 0 the pair is the plain
    # RMSNorm followed by the plain linear.
    torch.manual_seed(0)
    plain = nn.Sequential(nn.RMSNorm(48, eps=1e-5), nn.Linear(48, 24))
    nn.init.normal_(plain[0].weight, 1.0, 0.2)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = copy.deepcopy(plain[1])

    block = Block()
    NormedLinear.from_linear(block.proj, eps=1e-5)
    block.proj.norm.weight.data.copy_(plain[0].weight)
    quantize_(block, bitnet_training())
    QuantizationWarmup(block, warmup_steps=3)
    x = torch.randn(2, 48)
    torch.testing.assert_close(block.proj(x), plain(x), rtol=1e-5, atol=1e-6)


def test_a_model_warms_up_and_trains():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
    quantize_(model, bitnet_training())
    warmup = QuantizationWarmup(model, warmup_steps=5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randn(64, 16)
    losses = []
    for _ in range(30):
        loss = F.mse_loss(model(x), x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        warmup.step()
        losses.append(loss.item())
    assert warmup.strength == 1.0
    assert losses[-1] < losses[0]
