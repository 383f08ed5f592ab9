"""The fused ternary GEMM of route ``vnni`` (``kernels/cpu_vnni_gemm.c``): exact int32 sums against float64 products
and the epilogue's float operations written out (docs/numerics.md#forward), on every small shape and layout, and the
route itself in a BitNet linear. Skips on CPUs without AVX-512 VNNI (the other routes' tests cover them)."""

from __future__ import annotations

import itertools

import pytest
import torch

from bitnet_ao.kernels import cpu_vnni_gemm
from tests.conftest import random_int8


@pytest.fixture(autouse=True)
def _needs_vnni():
    if not cpu_vnni_gemm.available():
        pytest.skip("no AVX-512 VNNI on this CPU (or no C compiler): route vnni is not offered")


def _operands(m: int, k: int, n: int, b_layout: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = random_int8(m, k, generator=g)
    b = torch.randint(-1, 2, (n, k), dtype=torch.int8, generator=g)
    b = b.t() if b_layout == "weight.T" else b.t().contiguous()  # the forward's and grad_input's layouts
    return a, b


@pytest.mark.parametrize("b_layout", ["weight.T", "row-major"])
def test_sums_are_exact_on_every_small_shape(b_layout):
    """Rows past a 6-row block, columns past a 64-column panel, reductions past a 4-byte group."""
    for m, k, n in itertools.product((1, 5, 6, 7, 13), (1, 3, 4, 5, 67), (1, 63, 64, 65, 130)):
        a, b = _operands(m, k, n, b_layout, m * 1000 + k * 10 + n)
        out = cpu_vnni_gemm.scaled_mm(a, b)
        assert out.dtype == torch.int32 and torch.equal(out.long(), (a.double() @ b.double()).long()), (m, k, n)


def test_sums_are_exact_at_the_extremes():
    """-128 against -1 and 127 against 1 over a long reduction: the largest sums the shift by one must undo."""
    k = 4099
    a = torch.full((7, k), -128, dtype=torch.int8)
    a[1::2] = 127
    b = torch.ones(k, 70, dtype=torch.int8)
    b[:, ::3] = -1
    assert torch.equal(cpu_vnni_gemm.scaled_mm(a, b).long(), (a.double() @ b.double()).long())


def test_a_strided_left_operand_is_read_correctly():
    a, b = _operands(9, 40, 70, "weight.T", 1)
    wide = torch.zeros(9, 64, dtype=torch.int8)
    wide[:, :40] = a
    assert torch.equal(cpu_vnni_gemm.scaled_mm(wide[:, :40], b), cpu_vnni_gemm.scaled_mm(a, b))


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("factors", ["row+scale", "row+col", "row+scale+bias", "scale"])
def test_the_fused_epilogue_is_the_reference_one(out_dtype, factors):
    """((acc * row) * col) * scale in float32, rounded to the output dtype, then + bias in that dtype."""
    m, k, n = 13, 200, 130
    a, b = _operands(m, k, n, "weight.T", 7)
    g = torch.Generator().manual_seed(8)
    row = torch.rand(m, generator=g) if "row" in factors else None
    col = torch.rand(n, generator=g) if "col" in factors else None
    scale = torch.rand(1, generator=g) if "scale" in factors else None
    bias = torch.randn(n, generator=g) if "bias" in factors else None
    out = cpu_vnni_gemm.scaled_mm(a, b, row, col, scale, bias, out_dtype)
    expected = (a.double() @ b.double()).float()  # exact: |sums| < 2**24
    for factor, shape in ((row, (m, 1)), (col, (1, n)), (scale, (1, 1))):
        if factor is not None:
            expected = expected * factor.reshape(shape)
    expected = expected.to(out_dtype)
    if bias is not None:
        expected = expected + bias.to(out_dtype)
    assert out.dtype == out_dtype and torch.equal(out, expected)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_the_two_bit_weight_is_read_packed_exactly(out_dtype):
    """``scaled_mm_i2`` of a weight packed by the reference packer (independent of the kernel's own expansion) equals
    the scaled float64 product, on shapes past a panel, a row block and a 4-value byte, with bias."""
    from bitnet_ao.kernels import reference

    for m, k, n in ((1, 1, 1), (7, 5, 65), (13, 67, 130), (6, 256, 64)):
        g = torch.Generator().manual_seed(m * 100 + k + n)
        a = random_int8(m, k, generator=g)
        w = torch.randint(-1, 2, (n, k), dtype=torch.int8, generator=g)
        row, scale, bias = torch.rand(m, generator=g), torch.rand(1, generator=g), torch.randn(n, generator=g)
        out = cpu_vnni_gemm.scaled_mm_i2(a, reference.pack_weight(w, 2), row, None, scale, bias, out_dtype)
        expected = ((a.double() @ w.double().t()).float() * row[:, None] * scale).to(out_dtype) + bias.to(out_dtype)
        assert torch.equal(out, expected), (m, k, n)
