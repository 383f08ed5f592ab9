"""``BitNetPackedLinearWeight`` (bitnet_ao/packed.py): a weight built here from the spec's values
(tests/spec_reference.py) and the public packing gives the training forward's outputs bit for bit, checks its
inputs, and survives what a frozen parameter meets (``.to``, ``clone``, ``copy_``, pickling) exactly."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from bitnet_ao import (
    BitNetPackedLinearWeight,
    BitNetTrainingConfig,
    BitNetTrainingLinearWeight,
    pack_i1_in_i8,
    pack_i2_in_i8,
    unpack_i1_in_i8,
    unpack_i2_in_i8,
)
from tests import spec_reference
from tests.conftest import save_load_roundtrip

N, K = 21, 30  # K not a multiple of 8: the packed rows end in padding


def _master(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (torch.randn(N, K, generator=torch.Generator().manual_seed(0)) * 0.02 + 0.002).to(dtype)


def _packed(kind: str = "ternary", dtype: torch.dtype = torch.float32, requires_grad: bool = False):
    """The packed weight of :func:`_master` from the spec's values, and the master weight."""
    w = _master(dtype)
    if kind == "ternary":
        values, scale = spec_reference.ternary_weight(w)
        packed = pack_i2_in_i8(values.to(torch.int8))
    else:
        values, scale = spec_reference.binary_weight(w)
        packed = pack_i1_in_i8(values.to(torch.int8))
    config = BitNetTrainingConfig(weights=kind)
    return BitNetPackedLinearWeight(packed, scale, K, dtype, config, requires_grad), w


def _assert_same(a: BitNetPackedLinearWeight, b: BitNetPackedLinearWeight) -> None:
    assert type(a) is type(b) is BitNetPackedLinearWeight
    assert a.shape == b.shape and a.dtype == b.dtype and a.config == b.config and a.requires_grad == b.requires_grad
    assert torch.equal(a.packed, b.packed) and torch.equal(a.scale, b.scale) and a.scale.dtype == b.scale.dtype


# --- construction -------------------------------------------------------------------------------------------


def test_shape_dtype_bits_and_the_values_it_holds():
    weight, w = _packed("ternary", torch.bfloat16)
    assert weight.shape == (N, K) and weight.dtype == torch.bfloat16 and weight.bits == 2
    assert weight.packed.shape == (N, 8)  # ceil(30 / 4)
    values, scale = spec_reference.ternary_weight(w)
    q = weight.bitnet_quantization()
    assert q.center is None and torch.equal(q.scale, scale)
    assert torch.equal(weight.bitnet_int8(q).float(), values)

    binary, w = _packed("binary")
    assert binary.bits == 1 and binary.packed.shape == (N, 4)  # ceil(30 / 8)
    q = binary.bitnet_quantization()
    assert q.center is None  # the centre was spent when packing
    assert torch.equal(binary.bitnet_int8(q).float(), spec_reference.binary_weight(w)[0])


def test_invalid_packed_values_and_scales_name_what_is_expected():
    weight, _ = _packed()
    config = weight.config
    with pytest.raises(ValueError, match=r"in_features=30 needs int8 packed values of shape \(N, 8\).*torch\.uint8"):
        BitNetPackedLinearWeight(weight.packed.view(torch.uint8), weight.scale, K, torch.float32, config)
    with pytest.raises(ValueError, match=r"shape \(N, 8\) \(2 bits per value\), got torch\.int8 \(21, 7\)"):
        BitNetPackedLinearWeight(weight.packed[:, :7], weight.scale, K, torch.float32, config)
    with pytest.raises(ValueError, match=r"binary weight .* shape \(N, 4\) \(1 bits per value\)"):
        BitNetPackedLinearWeight(weight.packed, weight.scale, K, torch.float32, BitNetTrainingConfig(weights="binary"))
    with pytest.raises(ValueError, match=r"scale must be float32 of shape \(\).*got torch\.float64 \(\)"):
        BitNetPackedLinearWeight(weight.packed, weight.scale.double(), K, torch.float32, config)
    grouped = BitNetTrainingConfig(scale_groups=3, group_dim=0)
    with pytest.raises(ValueError, match=r"shape \(21, 1\) \(scale_groups=3, group_dim=0\), got torch\.float32 \(\)"):
        BitNetPackedLinearWeight(weight.packed, weight.scale, K, torch.float32, grouped)


# --- F.linear -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ternary", "binary"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 40])  # the fused decode path (small M) and the unpacking matmul
def test_linear_equals_the_training_forward_bit_for_bit(kind, dtype, m):
    weight, w = _packed(kind, dtype)
    master = BitNetTrainingLinearWeight(w, weight.config)
    x = torch.randn(m, K, dtype=dtype)
    bias = torch.randn(N, dtype=dtype)
    with torch.no_grad():
        expected = F.linear(x, master, bias)
        assert torch.equal(F.linear(x, weight, bias), expected)
    # With a gradient to compute, through the autograd function: the same forward, and the input gradient.
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y = F.linear(x1, weight, bias)
    assert torch.equal(y, expected)
    y.square().sum().backward()
    F.linear(x2, master.detach(), bias).square().sum().backward()
    assert torch.equal(x1.grad, x2.grad)


def test_linear_matches_the_fake_quant_spec():
    weight, w = _packed()
    spec = spec_reference.FakeQuantBitLinear(K, N, bias=False)
    spec.weight.data.copy_(w)
    x = torch.randn(6, 3, K)
    with torch.no_grad():
        torch.testing.assert_close(F.linear(x, weight), spec(x), rtol=1e-5, atol=1e-6)


# --- what a frozen parameter meets ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ternary", "binary"])
def test_pickle_and_deepcopy_round_trip_exactly(kind):
    weight, _ = _packed(kind, torch.bfloat16, requires_grad=True)
    _assert_same(save_load_roundtrip(weight), weight)  # torch.load(weights_only=True)
    copied = copy.deepcopy(weight)
    _assert_same(copied, weight)
    assert copied.packed.data_ptr() != weight.packed.data_ptr()


def test_to_changes_the_dtype_it_stands_for_or_the_device_never_the_values():
    weight, _ = _packed("binary")
    half = weight.to(torch.bfloat16)
    assert half.dtype == torch.bfloat16 and isinstance(half, BitNetPackedLinearWeight)
    assert torch.equal(half.packed, weight.packed) and torch.equal(half.scale, weight.scale)
    x = torch.randn(3, K, dtype=torch.bfloat16)
    assert torch.equal(F.linear(x, half), F.linear(x, weight))  # the output follows the input's dtype
    meta = weight.to("meta")
    assert meta.packed.device.type == "meta" and meta.scale.device.type == "meta" and meta.dtype == weight.dtype


def test_clone_detach_and_copy_into_another_packed_weight():
    weight, _ = _packed()
    clone = weight.clone()
    _assert_same(clone, weight)
    assert clone.packed.data_ptr() != weight.packed.data_ptr()
    detached = weight.detach()
    assert detached.packed.data_ptr() == weight.packed.data_ptr()

    target, _ = _packed()
    target.packed.zero_()
    target.scale.fill_(3.0)
    packed_ptr = target.packed.data_ptr()
    assert target.copy_(weight) is target  # load_state_dict: written in place
    _assert_same(target, weight)
    assert target.packed.data_ptr() == packed_ptr
    binary, _ = _packed("binary")
    with pytest.raises(NotImplementedError, match="copy_"):
        target.copy_(binary)  # a different layout (1-bit rows) cannot be copied into 2-bit rows


def test_unsupported_ops_name_the_weight():
    weight, _ = _packed()
    with pytest.raises(NotImplementedError, match=r"packed ternary BitNet weight, shape \(21, 30\).*aten\.add"):
        weight + 1


def test_repr_shows_the_scale_and_reads_no_data_from_fake_or_meta_weights():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    weight, _ = _packed()
    assert repr(weight) == (
        f"BitNetPackedLinearWeight(shape=(21, 30), ternary, 2-bit values, dtype=torch.float32, "
        f"scale={weight.scale.item()})"
    )
    assert "scale=?" in repr(weight.to("meta"))
    shape_env = ShapeEnv()
    with FakeTensorMode(shape_env=shape_env) as mode:
        fake = mode.from_tensor(weight)
        assert "scale=?" in repr(fake)
    assert not shape_env.pending_fresh_unbacked_symbols


def test_packing_is_the_public_layout():
    """The values the weight holds are exactly the public packing of the spec's values, both widths."""
    weight, w = _packed()
    assert torch.equal(unpack_i2_in_i8(weight.packed, K).float(), spec_reference.ternary_weight(w)[0])
    binary, w = _packed("binary")
    assert torch.equal(unpack_i1_in_i8(binary.packed, K).float(), spec_reference.binary_weight(w)[0])


def test_a_compiled_graph_cached_by_another_version_of_the_code_is_not_loaded(monkeypatch, tmp_path):
    """torch.compile's on-disk AOT autograd cache keys a graph on the dynamo graph, which says only ``F.linear``, and
    on the weight's ``_stable_hash_for_caching``: the same model compiled again hits the cache, and with bitnet_ao's
    code changed (its fingerprint) misses it, instead of running what the old code traced."""
    from torch._dynamo.utils import counters

    from bitnet_ao import weight_base

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    weight, _ = _packed()
    x = torch.randn(3, K)

    def compile_and_count() -> tuple[int, int]:
        torch._dynamo.reset()
        counters.clear()
        with torch.no_grad():
            out = torch.compile(lambda x: F.linear(x, weight), fullgraph=True)(x)
            assert torch.equal(out, F.linear(x, weight))
        return counters["aot_autograd"]["autograd_cache_hit"], counters["aot_autograd"]["autograd_cache_miss"]

    # config.patch, not monkeypatch: undoing a monkeypatched config entry deletes it for every later test
    with torch._functorch.config.patch(enable_autograd_cache=True):
        assert compile_and_count() == (0, 1)
        assert compile_and_count() == (1, 0)
        monkeypatch.setattr(weight_base, "implementation_fingerprint", lambda: "another version of bitnet_ao")
        assert compile_and_count() == (0, 1)
    torch._dynamo.reset()
