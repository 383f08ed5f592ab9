"""``quantize_(model, bitnet_inference())``: packed weights give the training forward's outputs bit for bit, on
every CPU route and through the decode kernel; checkpoints, ``.to``, ``deepcopy`` and ``torch.compile`` work; bad
input gets a clear error."""

from __future__ import annotations

import copy
import gc
import io
import logging
import weakref

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torchao.quantization import quantize_

from bitnet_ao import (
    BitNetPackedLinearWeight,
    bitnet_inference,
    bitnet_training,
)
from bitnet_ao.kernels import cpu_build, cpu_gemv, cpu_ops, reference
from bitnet_ao.surgery import apply_bitnet_norms
from tests import spec_reference
from tests.conftest import not_lm_head, save_load_roundtrip, tiny_llama

IN, HIDDEN, OUT = 70, 45, 33  # not multiples of 8: the packed rows end in padding


def _mlp(dtype: torch.dtype = torch.float32, bias: bool = True) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN, HIDDEN, bias=bias), nn.ReLU(), nn.Linear(HIDDEN, OUT, bias=False)).to(dtype)


def _trained_and_packed(kind: str, dtype: torch.dtype) -> tuple[nn.Module, nn.Module]:
    trained = _mlp(dtype)
    quantize_(trained, bitnet_training(weights=kind))
    packed = copy.deepcopy(trained)
    quantize_(packed, bitnet_inference())
    return trained, packed


# --- packed linears equal the training forward ------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ternary", "binary"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 16, 40])  # decode kernel (M <= 16) and unpack + int8 matmul route
def test_packed_forward_equals_training_forward(kind, dtype, m):
    trained, packed = _trained_and_packed(kind, dtype)
    x = torch.randn(m, IN, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(packed(x), trained(x))


@pytest.mark.parametrize("decode_kernel", [True, False])
def test_every_cpu_route_gives_the_same_bits(force_routes, monkeypatch, cpu_route, decode_kernel):
    trained, packed = _trained_and_packed("ternary", torch.float32)
    x = torch.randn(3, 5, IN)
    with torch.no_grad():
        force_routes("reference", "reference")
        expected = trained(x)
        force_routes(*cpu_route)
        if not decode_kernel:
            monkeypatch.setattr(cpu_gemv, "applies", lambda *args: False)
        assert torch.equal(packed(x), expected)


def test_without_the_c_kernel_the_weight_is_unpacked_and_exact(monkeypatch, tmp_path):
    """A machine whose C compiler fails: one warning naming the failure, then the unpacking path, same bits."""
    monkeypatch.setenv("BITNET_AO_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_build, "compiler", lambda: "false")  # a "compiler" that always fails
    monkeypatch.setattr(cpu_ops, "available", lambda: False)  # nor is the C++ operator library built
    cpu_build.load.cache_clear()
    cpu_gemv._library.cache_clear()
    try:
        with pytest.warns(UserWarning, match="building cpu_gemv.c failed"):
            assert not cpu_gemv.available()
        trained, packed = _trained_and_packed("ternary", torch.bfloat16)
        x = torch.randn(1, IN, dtype=torch.bfloat16)
        with torch.no_grad():
            assert torch.equal(packed(x), trained(x))
    finally:
        cpu_build.load.cache_clear()
        cpu_gemv._library.cache_clear()


def test_packed_forward_matches_the_spec():
    """The packed model against the FAQ's fake-quant linear (tests/spec_reference.py), not our own code."""
    dtype = torch.float32
    _, packed = _trained_and_packed("ternary", dtype)
    plain = _mlp(dtype)
    spec = nn.Sequential(
        spec_reference.FakeQuantBitLinear(IN, HIDDEN),
        nn.ReLU(),
        spec_reference.FakeQuantBitLinear(HIDDEN, OUT, bias=False),
    )
    spec.load_state_dict(plain.state_dict())
    x = torch.randn(6, IN)
    with torch.no_grad():
        torch.testing.assert_close(packed(x), spec(x), rtol=1e-5, atol=1e-5)


def test_plain_linear_is_ternarized_with_the_abs_mean_rule():
    model = _mlp()
    w = model[0].weight.detach().clone()
    quantize_(model, bitnet_inference())
    values, scale = spec_reference.ternary_weight(w)
    weight = model[0].weight
    assert isinstance(weight, BitNetPackedLinearWeight) and not weight.requires_grad
    assert torch.equal(reference.unpack_i2_in_i8(weight.packed, IN).float(), values)
    assert weight.scale.item() == scale.item()


def test_binary_plain_linear_and_recipe_conflicts():
    model = _mlp()
    w = model[0].weight.detach().clone()
    quantize_(model, bitnet_inference(weights="binary"))
    values, scale = spec_reference.binary_weight(w)
    assert torch.equal(reference.unpack_i1_in_i8(model[0].weight.packed, IN).float(), values)
    assert model[0].weight.packed.shape == (HIDDEN, (IN + 7) // 8)
    assert model[0].weight.scale.item() == scale.item()

    trained = _mlp()
    quantize_(trained, bitnet_training(weights="ternary"))
    with pytest.raises(ValueError, match="trained with ternary weights"):
        quantize_(trained, bitnet_inference(weights="binary"))


def test_gradient_through_frozen_packed_weights_equals_training():
    trained, packed = _trained_and_packed("ternary", torch.float32)
    x = torch.randn(20, IN, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    trained(x).square().sum().backward()
    packed(x2).square().sum().backward()
    assert torch.equal(x.grad, x2.grad)
    assert packed[0].weight.grad is None


def test_fused_norm_model_equals_training(tmp_path):
    """An HF Llama after the FAQ surgery: the packed weights sit behind the fused RMSNorm + quantization."""
    model = tiny_llama()
    apply_bitnet_norms(model)
    quantize_(model, bitnet_training(), filter_fn=not_lm_head)
    packed = copy.deepcopy(model)
    quantize_(packed, bitnet_inference(), filter_fn=not_lm_head)
    ids = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        assert torch.equal(packed(ids).logits, model(ids).logits)
        # One decode step (M = 1 per linear) through the KV cache equals the full forward's last position.
        cache = packed(ids[:, :-1], use_cache=True).past_key_values
        last = packed(ids[:, -1:], past_key_values=cache).logits[:, -1]
        torch.testing.assert_close(last, model(ids).logits[:, -1], rtol=1e-4, atol=1e-4)


# --- memory ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "limit"), [("ternary", 0.13), ("binary", 0.07)])
def test_weight_bytes_and_the_high_precision_weight_is_freed(kind, limit):
    linear = nn.Linear(256, 128, bias=False, dtype=torch.bfloat16)
    old = weakref.ref(linear.weight.untyped_storage())  # the parameter object itself stays (it is packed in place)
    quantize_(linear, bitnet_inference(weights=kind))
    gc.collect()
    assert old() is None
    w = linear.weight
    stored = w.packed.numel() * w.packed.element_size() + w.scale.numel() * w.scale.element_size()
    assert stored <= limit * 256 * 128 * 2


# --- torch.compile, no_grad / inference_mode ---------------------------------------------------------------


def _compiled_inference_equals_training(kind: str) -> None:
    trained, packed = _trained_and_packed(kind, torch.float32)
    compiled = torch.compile(packed, fullgraph=True)
    for m in (1, 24):
        x = torch.randn(m, IN)
        with torch.inference_mode():
            out = compiled(x)
        with torch.no_grad():
            assert torch.equal(out, trained(x))


@pytest.mark.slow
def test_compile_fullgraph_inference_mode_on_every_route(cpu_route):
    _compiled_inference_equals_training("ternary")


@pytest.mark.slow
def test_compile_fullgraph_inference_mode_binary_with_dynamo_debug_logs():
    """Dynamo's debug logs format the fake weights they trace: repr must not read a fake scale's value (that left
    pending unbacked symbols behind and failed the compile, PendingUnbackedSymbolNotFound)."""
    torch._logging.set_logs(dynamo=logging.DEBUG)
    try:
        _compiled_inference_equals_training("binary")
    finally:
        torch._logging.set_logs()


# --- checkpoints, .to(), deepcopy -----------------------------------------------------------------------------


def test_state_dict_holds_plain_packed_tensors_and_loads_exactly(tmp_path):
    _, packed = _trained_and_packed("ternary", torch.bfloat16)
    sd = packed.state_dict()
    assert all(type(v) is torch.Tensor for v in sd.values())
    assert sd["0.weight"].dtype == torch.int8 and sd["0.weight"].shape == (HIDDEN, (IN + 3) // 4)
    assert sd["0.weight_scale"].dtype == torch.float32
    save_file(sd, tmp_path / "model.safetensors")

    fresh = _mlp(torch.bfloat16)
    torch.nn.init.normal_(fresh[0].weight)  # different weights: the load must overwrite everything
    quantize_(fresh, bitnet_inference())
    missing, unexpected = fresh.load_state_dict(load_file(tmp_path / "model.safetensors"))
    assert not missing and not unexpected
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, sd[key]), key
    x = torch.randn(4, IN, dtype=torch.bfloat16)
    assert torch.equal(fresh(x), packed(x))

    assign = _mlp(torch.bfloat16)
    quantize_(assign, bitnet_inference())
    assign.load_state_dict(save_load_roundtrip(sd), assign=True)
    assert isinstance(assign[0].weight, BitNetPackedLinearWeight)
    assert torch.equal(assign(x), packed(x))


def test_loading_a_training_checkpoint_into_a_packed_model_quantizes_it():
    trained, packed = _trained_and_packed("ternary", torch.float32)
    target = _mlp()
    torch.nn.init.normal_(target[0].weight)
    quantize_(target, bitnet_inference())
    target.load_state_dict(trained.state_dict())  # plain master weights
    x = torch.randn(4, IN)
    assert torch.equal(target(x), packed(x))


def test_bad_checkpoints_raise_clear_errors():
    _, packed = _trained_and_packed("ternary", torch.float32)
    sd = packed.state_dict()
    target = _mlp()
    quantize_(target, bitnet_inference())
    no_scale = {k: v for k, v in sd.items() if k != "0.weight_scale"}
    with pytest.raises(ValueError, match=r"0\.weight.*0\.weight_scale.*no scale"):
        target.load_state_dict(no_scale)
    wrong = dict(sd, **{"0.weight": sd["0.weight"][:, :-1]})
    with pytest.raises(ValueError, match=r"in_features=70, out_features=45.*expected int8 \(45, 18\)"):
        target.load_state_dict(wrong)


def test_packed_model_to_deepcopy_and_torch_save():
    """The module-level round trips (the weight's own: tests/test_packed.py)."""
    _, packed = _trained_and_packed("binary", torch.float32)
    x = torch.randn(3, IN)
    expected = packed(x)
    half = copy.deepcopy(packed).to(torch.bfloat16)
    assert half[0].weight.dtype == torch.bfloat16 and isinstance(half[0].weight, BitNetPackedLinearWeight)
    assert torch.equal(half[0].weight.packed, packed[0].weight.packed)
    assert half(x.bfloat16()).dtype == torch.bfloat16
    buf = io.BytesIO()
    torch.save(packed, buf)  # the whole module (weights_only=False: nn.Sequential is no tensor)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False)(x), expected)
    moved = copy.deepcopy(packed).to("meta")
    assert moved[0].weight.packed.device.type == "meta"


def test_bad_inputs_name_the_layer():
    _, packed = _trained_and_packed("ternary", torch.float32)
    with pytest.raises(TypeError, match="floating-point weight"):
        quantize_(_int_linear(), bitnet_inference())
    with pytest.raises(ValueError, match="in_features=70"):
        F.linear(torch.randn(2, 69), packed[0].weight)


def _int_linear() -> nn.Module:
    linear = nn.Linear(4, 4)
    linear.weight = nn.Parameter(torch.ones(4, 4, dtype=torch.int8), requires_grad=False)
    return linear
