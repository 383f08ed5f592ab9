"""The RMSNorm fused into the BitNet linear's activation quantization (``NormedLinear`` after ``quantize_``) gives
the same numbers as the norm followed by the linear: forward output, input gradient and both weight gradients."""

from __future__ import annotations

import contextlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchao.quantization import quantize_

from bitnet_ao import bitnet_training
from bitnet_ao.kernels import reference, torch_backend
from bitnet_ao.norm import RMSNorm
from bitnet_ao.surgery import NormedLinear
from tests.spec_reference import act_quant, rms_norm_rstd


def _normed_bitnet_linear(k: int, n: int, dtype: torch.dtype) -> NormedLinear:
    torch.manual_seed(0)
    layer = NormedLinear.from_linear(nn.Linear(k, n, dtype=dtype), eps=1e-5)
    with torch.no_grad():
        layer.norm.weight.uniform_(0.5, 1.5)  # a trained gain, not the unit one
    quantize_(layer, bitnet_training(), filter_fn=lambda m, fqn: isinstance(m, nn.Linear))
    return layer


def _step(layer: NormedLinear, x: torch.Tensor, fused: bool, autocast: torch.dtype | None):
    x = x.detach().requires_grad_()
    ctx = torch.autocast("cpu", dtype=autocast) if autocast else contextlib.nullcontext()
    with ctx:
        y = layer(x) if fused else F.linear(layer.norm(x), layer.weight, layer.bias)
    y.float().square().sum().backward()
    grads = (x.grad, layer.weight.grad, layer.bias.grad, layer.norm.weight.grad)
    layer.zero_grad()
    return (y.detach(), *grads)


@pytest.mark.parametrize(
    "dtype,autocast", [(torch.float32, None), (torch.float32, torch.bfloat16), (torch.bfloat16, None)]
)
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "inductor"])
def test_fused_equals_norm_then_linear(monkeypatch, dtype, autocast, compiled):
    monkeypatch.setattr(torch_backend, "COMPILE_MIN_NUMEL", 0 if compiled else 1 << 60)
    layer = _normed_bitnet_linear(96, 40, dtype)
    x = torch.randn(3, 17, 96, dtype=dtype) * 3
    fused = _step(layer, x, fused=True, autocast=autocast)
    unfused = _step(layer, x, fused=False, autocast=autocast)
    names = ("output", "grad_input", "grad_weight", "grad_bias", "grad_norm_weight")
    for name, a, b in zip(names, fused, unfused, strict=True):
        assert a.dtype == b.dtype, name
        assert torch.equal(a, b), f"{name}: max diff {(a.float() - b.float()).abs().max().item()}"


def test_fused_int8_activation_is_the_quantized_norm_output():
    """The int8 values are those of the norm's output, rounded to the linear's dtype, quantized per token
    (checked against the independent quantizer of tests/spec_reference.py)."""
    torch.manual_seed(1)
    x, gain = torch.randn(8, 64), torch.rand(64) + 0.5
    for norm_dtype in (torch.float32, torch.bfloat16):
        x_q, s, rstd = reference.rms_norm_quantize_rowwise(x, gain, 1e-5, norm_dtype, 1e-5)
        normed = (x * rms_norm_rstd(x, 1e-5) * gain).to(norm_dtype)
        q_ref, s_ref = act_quant(normed)
        assert torch.equal(x_q, q_ref.to(torch.int8)) and torch.equal(s, s_ref)
        assert torch.equal(rstd, rms_norm_rstd(x, 1e-5))


def test_rms_norm_module_runs_forward_and_backward_on_the_backend(monkeypatch):
    """``bitnet_ao.norm.RMSNorm`` reaches the kernels only through the ops layer, both ways: the backend the ops pick
    for the input (the torch backend on CPU) runs the forward and the backward, with the reference's numbers (the
    backward's sums in the C pass's order: to float32 rounding)."""
    monkeypatch.setattr(torch_backend, "COMPILE_MIN_NUMEL", 1 << 60)  # eager bodies: the reference's exact floats
    calls = []
    for name in ("rms_norm", "rms_norm_backward"):
        original = getattr(torch_backend, name)
        monkeypatch.setattr(torch_backend, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    torch.manual_seed(2)
    norm = RMSNorm(48, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = (torch.randn(2, 5, 48) * 3).requires_grad_()
    dy = torch.randn(2, 5, 48)
    y = norm(x)
    y.backward(dy)
    assert calls == ["rms_norm", "rms_norm_backward"]
    x2, gain = x.detach().reshape(10, 48), norm.weight.detach()
    expected, rstd = reference.rms_norm(x2, gain, 1e-5)
    dx, dgain = reference.rms_norm_backward(dy.reshape(10, 48), x2, gain, rstd)
    assert torch.equal(y.detach().reshape(10, 48), expected)
    torch.testing.assert_close(x.grad.reshape(10, 48), dx, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(norm.weight.grad, dgain, rtol=1e-5, atol=1e-6)


def test_compiled_norm_computes_the_eager_norm():
    """Under torch.compile ``bitnet_ao.norm.RMSNorm`` computes the eager module's numbers (the float64-summed rstd of
    docs/numerics.md#rmsnorm), not ``torch.nn.RMSNorm``'s float32 sum: rows where the two rstds differ give the same
    outputs compiled and eager (a compiled decode step otherwise decoded other tokens than the eager model)."""
    torch.manual_seed(3)
    norm = RMSNorm(1031, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(257, 1031) * 3
    float32_rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    assert (float32_rstd != rms_norm_rstd(x, 1e-5)).any(), "no row where the float32 sum differs: nothing tested"
    with torch.no_grad():
        eager = norm(x)
        compiled = torch.compile(norm, fullgraph=True)(x)
    assert torch.equal(eager, (x * rms_norm_rstd(x, 1e-5) * norm.weight).detach())
    assert torch.equal(compiled, eager)


def test_hooks_see_the_input_before_the_norm():
    layer = _normed_bitnet_linear(32, 16, torch.float32)
    seen = []
    layer.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    x = torch.randn(4, 32) * 5
    y = layer(x)
    assert len(seen) == 1 and seen[0] is x
    assert torch.equal(y, F.linear(layer.norm(x), layer.weight, layer.bias))


def test_plain_linear_is_not_fused():
    torch.manual_seed(0)
    layer = NormedLinear.from_linear(nn.Linear(32, 16), eps=1e-5)
    x = torch.randn(4, 32)
    torch.testing.assert_close(layer(x), F.linear(layer.norm(x), layer.weight, layer.bias), rtol=0, atol=0)


def test_a_linear_subclass_keeps_its_forward_after_the_norm():
    class Doubled(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    torch.manual_seed(0)
    layer = NormedLinear.from_linear(Doubled(32, 16), eps=1e-5)
    assert isinstance(layer, Doubled) and type(layer).__name__ == "NormedDoubled"
    quantize_(layer, bitnet_training(), filter_fn=lambda m, fqn: isinstance(m, nn.Linear))
    x = torch.randn(4, 32)
    assert torch.equal(layer(x), 2 * F.linear(layer.norm(x), layer.weight, layer.bias)), "not fused past its forward"


_FLOAT32_TRAINING = """
import torch
from torch import nn
from torchao.quantization import quantize_
from bitnet_ao import bitnet_training
from bitnet_ao.kernels import reference, torch_backend
from bitnet_ao.surgery import NormedLinear
torch.manual_seed(0)
gain = nn.Parameter(torch.ones(1024))
for _ in range(3):  # the bare trigger: a parameter handed to a compiled body under no_grad
    with torch.no_grad():
        torch_backend.run_fused(reference.rms_norm, 1 << 20, torch.randn(1024, 1024), gain, 1e-5)
layers = nn.Sequential(*[NormedLinear.from_linear(nn.Linear(1024, 1024), 1e-5) for _ in range(3)])
quantize_(layers, bitnet_training(), filter_fn=lambda m, fqn: isinstance(m, nn.Linear))
x = torch.randn(1024, 1024, requires_grad=True)
for _ in range(3):
    layers(x).square().mean().backward()
    assert x.grad.isfinite().all()
print("finite")
"""


@pytest.mark.slow
def test_compiled_float32_norms_train_without_heap_corruption():
    """Regression: with inductor's FX graph cache on, compiled RMSNorm bodies corrupted the heap (``free(): invalid
    size``, torch 2.13.0: a cached graph served to a compile it does not fit, see tests/test_ops.py), which killed
    float32 training of any model with these norms. Run in a subprocess, since the failure kills the process."""
    out = subprocess.run([sys.executable, "-c", _FLOAT32_TRAINING], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "finite" in out.stdout, out.stderr[-2000:]


@pytest.mark.slow
def test_torch_compile_fullgraph_traces_the_fused_norm(cpu_route):
    """Whole-model torch.compile: the fused ops' fake implementations must match the real ones (dtypes, shapes),
    and the compiled forward and backward give the eager numbers."""
    layer = _normed_bitnet_linear(64, 32, torch.float32)
    x = torch.randn(4, 9, 64)
    eager = _step(layer, x, fused=True, autocast=torch.bfloat16)
    compiled_layer = torch.compile(layer, fullgraph=True, backend="aot_eager")
    compiled = _step(compiled_layer, x, fused=True, autocast=torch.bfloat16)
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_compiled_normed_linears_are_bit_identical_to_eager(cpu_route):
    """fullgraph dynamo + AOT autograd through NormedLinears (swapped-class nn.Linears whose forward picks the fused
    path from a class attribute), on every CPU route: forward and every gradient equal to eager bit for bit."""
    import copy

    torch.manual_seed(0)
    model = nn.Sequential(
        NormedLinear.from_linear(nn.Linear(48, 64), eps=1e-5),
        nn.ReLU(),
        NormedLinear.from_linear(nn.Linear(64, 32), 1e-5),
    )
    quantize_(model, bitnet_training(), filter_fn=lambda m, fqn: isinstance(m, nn.Linear))
    compiled = torch.compile(copy.deepcopy(model), fullgraph=True, backend="aot_eager")
    x = torch.randn(5, 48)
    y, y_c = model(x), compiled(x)
    assert torch.equal(y_c, y)
    y.square().sum().backward()
    y_c.square().sum().backward()
    for p, p_c in zip(model.parameters(), compiled._orig_mod.parameters(), strict=True):
        assert torch.equal(p_c.grad, p.grad)


def test_a_gain_of_the_wrong_size_is_refused_by_name():
    """The kernels read one gain per column: a gain of another size is an error naming the op and both shapes,
    never a read past its end."""
    from bitnet_ao import kernels

    x, gain = torch.randn(4, 8), torch.ones(6)
    with pytest.raises(RuntimeError, match=r"rms_norm_quantize_rowwise: the norm weight must be 1-D .* \(4, 8\)"):
        kernels.rms_norm_quantize_rowwise(x, gain, 1e-5, torch.float32, 1e-5)
    with pytest.raises(RuntimeError, match=r"rms_norm: the norm weight .* got torch.float32 \(6,\)"):
        kernels.rms_norm(x, gain, 1e-5)
    with pytest.raises(RuntimeError, match=r"rms_norm_backward: the norm weight"):
        kernels.rms_norm_backward(x, x, gain, torch.ones(4, 1))
    with pytest.raises(RuntimeError, match=r"rms_norm_backward: dy \(4, 7\) must have x's shape"):
        kernels.rms_norm_backward(x[:, :7], x, torch.ones(8), torch.ones(4, 1))
    packed = torch.zeros(3, 2, dtype=torch.int8)  # 3 outputs of 8 two-bit values
    args = (x, gain, 1e-5, packed, 8, 2, torch.tensor(1.0), None, torch.float32)
    with pytest.raises(RuntimeError, match=r"packed_linear: the norm weight must be 1-D"):
        kernels.packed_linear(*args)
    if kernels.cpu_ops.available():  # the kernel registered in C++ checks too
        with pytest.raises(RuntimeError, match=r"packed_linear: the norm weight must be 1-D"):
            torch.ops.bitnet_ao.packed_linear(*args)


def test_a_norm_over_several_dimensions_is_torchs():
    """``normalized_shape`` of two sizes normalizes over both trailing dimensions, as ``torch.nn.RMSNorm`` does."""
    torch.manual_seed(4)
    norm, reference_norm = RMSNorm((3, 8), eps=1e-5), nn.RMSNorm((3, 8), eps=1e-5)
    x = torch.randn(5, 3, 8)
    assert torch.equal(norm(x), reference_norm(x))


def test_the_norm_runs_on_the_meta_device():
    """Model sizing on the meta device (no data, no kernels, no autocast) goes through forward and backward."""
    norm = RMSNorm(8).to("meta")
    x = torch.empty(2, 3, 8, device="meta", requires_grad=True)
    y = norm(x)
    y.sum().backward()
    assert y.shape == x.shape and y.device.type == "meta" and x.grad.shape == x.shape
