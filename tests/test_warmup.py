"""Quantization warmup (bitnet_ao/warmup.py, linear.warmup_linear) against the blend written out with the
spec's fake quantization (tests/spec_reference.py), and bit for bit against the INT8 path at lambda = 1; compiled,
after the model's parameters are replaced, cast or moved, and on a model FSDP2 shards (tests/test_fsdp.py runs it
on 2 ranks)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._dynamo.testing import CompileCounterWithBackend
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


def _spec_blend(linear: nn.Linear, x: Tensor, strength: float, weights: str = "ternary") -> Tensor:
    """The warmup linear written out with the spec's fake quantization, in ``x``'s dtype: ``F.linear(x + l (fq(x)
    - x), W + l (fq(W) - W), b)`` with straight-through gradients."""
    x_int, s_x = act_quant(x.detach())
    x_fq = (x_int * s_x.unsqueeze(-1)).to(x.dtype)
    w = linear.weight
    w_int, s_w = (ternary_weight if weights == "ternary" else binary_weight)(w.detach())
    w_fq = (w_int * s_w).to(w.dtype)
    x_b = x + strength * (x_fq - x).detach()
    w_b = w + strength * (w_fq - w).detach()
    return F.linear(x_b, w_b, linear.bias)


def _mlp() -> tuple[nn.Sequential, nn.Sequential]:
    """A plain two-layer MLP and its BitNet copy (same weights)."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(48, 32), nn.GELU(), nn.Linear(32, 24))
    bitnet = copy.deepcopy(plain)
    quantize_(bitnet, bitnet_training())
    return plain, bitnet


def _spec_mlp(plain: nn.Sequential, x: Tensor, strength: float) -> Tensor:
    return _spec_blend(plain[2], F.gelu(_spec_blend(plain[0], x, strength)), strength)


@pytest.mark.parametrize("weights", ["ternary", "binary"])
@pytest.mark.parametrize("strength", [0.0, 0.25, 0.5])
def test_blend_is_the_straight_through_mix_of_full_precision_and_fake_quantization(weights, strength):
    plain, bitnet = _pair(weights)
    warmup = QuantizationWarmup(bitnet, warmup_steps=4, last_step=int(strength * 4))
    assert warmup.strength == strength
    x = torch.randn(3, 5, 48, requires_grad=True)
    y = bitnet(x)
    y.backward(torch.ones_like(y))

    xr = x.detach().clone().requires_grad_(True)
    expected = _spec_blend(plain, xr, strength, weights)
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
    assert resumed.strength == 0.5 and other.weight.quantization_strength.item() == 0.5
    assert QuantizationWarmup(other, warmup_steps=0).strength == 1.0
    assert other.weight.quantization_strength is None, "lambda = 1 is the INT8 path, no tensor to read"


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


def _run(model: nn.Module, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    """Output, and the gradients of the input and every parameter of a backward of ``y.square().sum()``."""
    x = x.clone().requires_grad_(True)
    y = model(x)
    y.square().sum().backward()
    grads = [x.grad, *(p.grad for p in model.parameters())]
    model.zero_grad(set_to_none=True)
    return y.detach(), grads


@pytest.mark.parametrize("fullgraph", [True, False], ids=["fullgraph", "graph_breaks_allowed"])
@pytest.mark.parametrize(
    "backend",
    [
        "aot_eager",
        pytest.param("inductor", marks=pytest.mark.slow),  # torch.compile: 8 to 25 s on 2 cores, cold cache
    ],
)
def test_compiled_warmup_equals_eager_at_every_strength_without_a_recompile_per_step(backend, fullgraph):
    """lambda is a graph input: a compiled model blends like the eager one at each lambda (against the spec's
    fake quantization too) and compiles once for the warmup, once more for the INT8 path at lambda = 1."""
    # Earlier tests compiled other nn.Sequential / nn.Linear forwards (the same code objects): past dynamo's
    # recompile limit a new variant would run eagerly and never count as a compile.
    torch._dynamo.reset()
    plain, bitnet = _mlp()
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(bitnet, backend=counter, fullgraph=fullgraph)
    warmup = QuantizationWarmup(bitnet, warmup_steps=4)
    x = torch.randn(6, 48)
    compiles = []
    for strength in (0.0, 0.25, 0.5, 0.75, 1.0, 1.0):
        assert warmup.strength == strength
        y, grads = _run(bitnet, x)
        y_c, grads_c = _run(compiled, x)
        if backend == "aot_eager":  # the same ops as eager
            assert torch.equal(y_c, y)
            assert all(torch.equal(a, b) for a, b in zip(grads_c, grads, strict=True))
        else:
            torch.testing.assert_close(y_c, y, rtol=1e-5, atol=1e-5)
            for a, b in zip(grads_c, grads, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(y_c, _spec_mlp(plain, x, strength), rtol=1e-5, atol=1e-5)
        compiles.append(counter.frame_count)
        warmup.step()
    assert compiles == [1, 1, 1, 1, 2, 2], compiles


def test_outside_warmup_a_weight_carries_no_strength():
    """Outside warmup (never started, or finished) the weight is the INT8 path's alone: no lambda tensor for the
    linear to read, nothing extra in what torch.compile traces."""
    _, bitnet = _pair()
    assert bitnet.weight.quantization_strength is None
    assert bitnet.weight.__tensor_flatten__()[0] == ["_data"]
    warmup = QuantizationWarmup(bitnet, warmup_steps=1)
    assert bitnet.weight.__tensor_flatten__()[0] == ["_data", "quantization_strength"]
    warmup.step()
    assert bitnet.weight.quantization_strength is None
    assert bitnet.weight.__tensor_flatten__()[0] == ["_data"]


def test_strength_follows_parameters_loaded_with_assign():
    """``load_state_dict(assign=True)`` mid-warmup replaces every parameter: the new ones blend at the warmup's
    lambda at once, and follow its next steps."""
    _, bitnet = _mlp()
    warmup = QuantizationWarmup(bitnet, warmup_steps=4, last_step=2)
    torch.manual_seed(1)
    new = nn.Sequential(nn.Linear(48, 32), nn.GELU(), nn.Linear(32, 24))
    old_weight = bitnet[0].weight
    bitnet.load_state_dict(new.state_dict(), assign=True)
    assert bitnet[0].weight is not old_weight
    x = torch.randn(6, 48)
    torch.testing.assert_close(bitnet(x), _spec_mlp(new, x, 0.5), rtol=1e-5, atol=1e-5)
    warmup.step()
    torch.testing.assert_close(bitnet(x), _spec_mlp(new, x, 0.75), rtol=1e-5, atol=1e-5)
    warmup.step()
    torch.testing.assert_close(bitnet(x), _spec_mlp(new, x, 1.0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cast", [lambda m: m.to(torch.bfloat16), lambda m: m.half()], ids=["to_bfloat16", "half"])
def test_strength_survives_a_dtype_cast_mid_warmup(cast):
    """``model.to(dtype)`` / ``.half()`` mid-warmup: the cast weights blend at the warmup's lambda right away (not
    only after the next step), and lambda stays a float32 tensor, not rounded to the model's dtype."""
    plain, bitnet = _mlp()
    warmup = QuantizationWarmup(bitnet, warmup_steps=3, last_step=1)
    cast(bitnet)
    cast(plain)
    dtype = bitnet[0].weight.dtype
    x = torch.randn(6, 48).to(dtype)
    y = bitnet(x)
    torch.testing.assert_close(y, _spec_mlp(plain, x, 1 / 3))  # lambda = 1 is 0.26 away here
    assert y.dtype == dtype
    assert bitnet[0].weight.quantization_strength.dtype == torch.float32
    warmup.step()
    torch.testing.assert_close(bitnet(x), _spec_mlp(plain, x, 2 / 3))


def test_a_warmup_under_fsdp2_is_refused_clearly_and_its_end_is_plain_bitnet(tmp_path):
    """FSDP2 all-gathers the weight packed ternary: lambda < 1 raises (when the warmup starts on the sharded
    model, and at the all-gather when the warmup started before ``fully_shard``), never trains at lambda = 1
    silently; lambda = 1 (a run resumed past its warmup) is plain BitNet. One rank here; tests/test_fsdp.py
    compares the losses on two."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        _, sharded = _mlp()
        fully_shard(sharded, mesh=mesh)
        with pytest.raises(NotImplementedError, match="sharded with FSDP2.*Warm up on one device"):
            QuantizationWarmup(sharded, warmup_steps=4)
        resumed = QuantizationWarmup(sharded, warmup_steps=4, last_step=4)
        assert resumed.strength == 1.0
        x = torch.randn(6, 48)
        _, reference = _mlp()
        assert torch.equal(sharded(x), reference(x))

        _, early = _mlp()
        warmup = QuantizationWarmup(early, warmup_steps=4, last_step=2)
        fully_shard(early, mesh=mesh)
        with pytest.raises(NotImplementedError, match="in quantization warmup.*then shard"):
            early(x)
        with pytest.raises(NotImplementedError, match="sharded with FSDP2"):
            warmup.step()
    finally:
        dist.destroy_process_group()
