"""``bitnet_ao.weight_quant``: weight scales and ternary / binary values (docs/numerics.md#forward), checked
against the independent reference of tests/spec_reference.py, bit for bit."""

from __future__ import annotations

import pytest
import torch

from bitnet_ao.config import BitNetTrainingConfig
from bitnet_ao.weight_quant import (
    WeightQuantization,
    master_weight_for,
    quantization_from_stats,
    quantize_weight,
    weight_quantization,
)
from tests import spec_reference
from tests.conftest import random_int8

TERNARY, BINARY = BitNetTrainingConfig(weights="ternary"), BitNetTrainingConfig(weights="binary")


def _weight(n: int, k: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    return (torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.02).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("n", "k"), [(1, 1), (21, 30), (64, 257)])
def test_ternary_scale_is_the_abs_mean_and_values_round_and_clamp(dtype, n, k):
    w = _weight(n, k, dtype)
    q = weight_quantization(w, TERNARY)
    values, scale = spec_reference.ternary_weight(w)
    assert q.center is None
    assert q.scale.dtype == torch.float32 and torch.equal(q.scale, scale)
    w_q = quantize_weight(w, q, weights="ternary", transpose=False)
    assert w_q.dtype == torch.int8 and torch.equal(w_q.float(), values)
    assert torch.equal(quantize_weight(w, q, weights="ternary", transpose=True).float(), values.t())


def test_ternary_ties_round_half_to_even():
    # mean |w| = 8 / 8 = 1, so w / s_w is w itself: 0.5 -> 0, -0.5 -> 0, 1.5 -> 2 -> 1, 2.0 -> 1 (clamped).
    w = torch.tensor([[0.5, -0.5, 1.5, -1.5, 1.0, -1.0, 0.0, 2.0]])
    q = weight_quantization(w, TERNARY)
    assert q.scale.item() == 1.0
    expected = torch.tensor([[0, 0, 1, -1, 1, -1, 0, 1]], dtype=torch.int8)
    assert torch.equal(quantize_weight(w, q, weights="ternary", transpose=False), expected)
    assert torch.equal(spec_reference.ternary_weight(w)[0], expected.float())


@pytest.mark.parametrize("magnitude", [0.0, 1e-7])
def test_degenerate_weights_divide_by_the_eps_floor_and_store_the_scale_unclamped(magnitude):
    w = torch.full((4, 6), magnitude)
    w[0, 0] = -magnitude
    q = weight_quantization(w, TERNARY)
    values, scale = spec_reference.ternary_weight(w)
    assert torch.equal(q.scale, scale) and q.scale.item() < 1e-5  # unclamped: it multiplies the output
    w_q = quantize_weight(w, q, weights="ternary", transpose=False)
    assert torch.equal(w_q.float(), values) and not w_q.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_binary_centre_is_the_mean_and_values_are_signs_around_it(dtype):
    w = _weight(21, 30, dtype) + 0.01  # a nonzero mean: the centre matters
    q = weight_quantization(w, BINARY)
    values, scale = spec_reference.binary_weight(w)
    assert torch.equal(q.center, w.double().mean().float())
    assert torch.equal(q.scale, scale)  # the abs-mean, not centred
    assert torch.equal(quantize_weight(w, q, weights="binary", transpose=False).float(), values)
    assert torch.equal(quantize_weight(w, q, weights="binary", transpose=True).float(), values.t())


def test_a_binary_weight_at_its_centre_maps_to_plus_one():
    w = torch.tensor([[1.0, 2.0, 3.0]])  # mean 2: the middle value is exactly the centre
    q = weight_quantization(w, BINARY)
    assert q.center.item() == 2.0
    assert quantize_weight(w, q, weights="binary", transpose=False).tolist() == [[-1, 1, 1]]


@pytest.mark.parametrize("kind", ["ternary", "binary"])
@pytest.mark.parametrize("group_dim", [0, 1])
def test_group_scales_are_per_block_and_broadcast_against_the_weight(kind, group_dim):
    w = _weight(21, 30) + torch.linspace(-0.05, 0.05, 30)  # groups with different scales and means
    config = BitNetTrainingConfig(weights=kind, scale_groups=3, group_dim=group_dim)
    q = weight_quantization(w, config)
    fn = spec_reference.ternary_weight if kind == "ternary" else spec_reference.binary_weight
    values, scales = spec_reference.grouped(fn, w, 3, group_dim)
    assert q.scale.shape == ((21, 1) if group_dim == 0 else (1, 30))
    assert torch.equal(q.scale.expand(w.shape), scales)
    assert torch.equal(quantize_weight(w, q, weights=kind, transpose=False).float(), values)
    if kind == "binary":
        centres = torch.cat([b.double().mean().float().expand(b.shape) for b in w.chunk(3, dim=group_dim)], group_dim)
        assert torch.equal(q.center.expand(w.shape), centres)
    else:
        assert q.center is None


@pytest.mark.parametrize("kind", ["ternary", "binary"])
def test_quantization_from_all_reducible_sums_equals_the_spec(kind):
    """The FSDP2 path: float64 (sum |W|, sum W) of the whole weight, as shards all-reduce them."""
    w = _weight(33, 36) + 0.003
    stats = torch.stack([w.double().abs().sum(), w.double().sum()])
    q = quantization_from_stats(stats, (33, 36), BitNetTrainingConfig(weights=kind))
    fn = spec_reference.ternary_weight if kind == "ternary" else spec_reference.binary_weight
    values, scale = fn(w)
    assert torch.equal(q.scale, scale)
    assert torch.equal(quantize_weight(w, q, weights=kind, transpose=False).float(), values)


def test_binary_values_without_a_centre_are_refused():
    """A packed binary weight's quantization has no centre (it was spent when packing): it cannot binarize."""
    q = WeightQuantization(scale=torch.tensor(0.1))
    with pytest.raises(ValueError, match="binary values need the centre"):
        quantize_weight(torch.randn(2, 3), q, weights="binary", transpose=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_master_weight_for_quantizes_back_to_the_values_and_scale(dtype):
    values = random_int8(16, 64, low=-1, high=2, generator=torch.Generator().manual_seed(1))
    scale = torch.tensor(0.0375)
    w = master_weight_for(values, scale, dtype)
    assert w.dtype == dtype and w.shape == values.shape
    spec_values, spec_scale = spec_reference.ternary_weight(w)
    assert torch.equal(spec_values, values.float()) and spec_scale.item() == scale.item()


def test_master_weight_for_rejects_what_no_weight_can_reproduce():
    values = torch.tensor([[1, 0, -1]], dtype=torch.int8)
    with pytest.raises(TypeError, match="2-D int8"):
        master_weight_for(values.float(), torch.tensor(0.1), torch.float32)
    with pytest.raises(ValueError, match="clamped at 1e-05"):
        master_weight_for(values, torch.tensor(1e-6), torch.float32)
    with pytest.raises(ValueError, match="0 nonzero values"):
        master_weight_for(torch.zeros(2, 2, dtype=torch.int8), torch.tensor(0.1), torch.float32)
