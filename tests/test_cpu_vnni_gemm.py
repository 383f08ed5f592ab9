"""The fused GEMM of routes ``vnni`` and ``amx`` (``kernels/cpu_vnni_gemm.c``): exact int32 sums against float64
products and the epilogue's float operations written out (docs/numerics.md#forward), on every small shape and layout
of both kinds of right operand (ternary, full-range), each test once per kernel (``vnni``: AVX-512 VNNI; ``amx``: AMX
tiles with the VNNI kernel's packing, tails and epilogue). Skips on CPUs without AVX-512 VNNI, and the ``amx`` cases on
CPUs without AMX-INT8 (the other routes' tests cover them)."""

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


@pytest.fixture(params=["vnni", "amx"])
def amx(request) -> bool:
    """Which kernel multiplies: ``False`` the AVX-512 VNNI one, ``True`` AMX (skipped without AMX-INT8)."""
    if request.param == "amx" and not cpu_vnni_gemm.amx_available():
        pytest.skip("no AMX-INT8 on this CPU (or the OS does not grant the tile state): route amx is not offered")
    return request.param == "amx"


def _operands(
    m: int, k: int, n: int, b_layout: str, seed: int, ternary: bool = True, a_layout: str = "row-major"
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = random_int8(m, k, generator=g)
    if a_layout == "transposed":  # grad_weight's g.T: the transposed view of a row-major (K, M) tensor
        a = a.t().contiguous().t()
    b = torch.randint(-1, 2, (n, k), dtype=torch.int8, generator=g) if ternary else random_int8(n, k, generator=g)
    b = b.t() if b_layout == "weight.T" else b.t().contiguous()  # the forward's (and grad_input's, grad_weight's)
    return a, b


@pytest.mark.parametrize("a_layout", ["row-major", "transposed"])
@pytest.mark.parametrize("ternary", [True, False], ids=["ternary", "full-range"])
@pytest.mark.parametrize("b_layout", ["weight.T", "row-major"])
def test_sums_are_exact_on_every_small_shape(b_layout, ternary, a_layout, amx):
    """Rows past a 6-row block (VNNI) and a 32-row block (AMX), columns past a 64-column panel, reductions past a
    4-byte group and a 64-byte tile step, and no reduction at all (grad_weight of an empty batch: zeros); both shifts
    of ``b`` and both ways ``a`` is read (its rows, or packed / transposed from a transposed view)."""
    for m, k, n in itertools.product((1, 5, 6, 7, 13, 32, 33, 70), (0, 1, 3, 4, 5, 64, 67, 131), (1, 63, 64, 65, 130)):
        a, b = _operands(m, k, n, b_layout, m * 1000 + k * 10 + n, ternary, a_layout)
        out = cpu_vnni_gemm.scaled_mm(a, b, b_ternary=ternary, amx=amx)
        assert out.dtype == torch.int32 and torch.equal(out.long(), (a.double() @ b.double()).long()), (m, k, n)


@pytest.mark.parametrize("a_layout", ["row-major", "transposed"])
def test_full_range_sums_are_exact_where_the_shifted_ones_overflow(a_layout, amx):
    """127 against 127 over 70001 terms: the exact sum (1.13e9) fits in int32, the shifted one (255 * 127 per term,
    2.27e9) does not, and the shift must still come back out exactly; and -128 against -128, whose shifted b is 0."""
    k = 70001
    a = torch.full((7, k), 127, dtype=torch.int8)
    a[3] = -128
    b = torch.full((k, 66), 127, dtype=torch.int8)
    b[:, 1::2] = -128
    if a_layout == "transposed":
        a = a.t().contiguous().t()
    out = cpu_vnni_gemm.scaled_mm(a, b, b_ternary=False, amx=amx)
    assert torch.equal(out.long(), (a.double() @ b.double()).long())


@pytest.mark.parametrize("a_layout", ["row-major", "transposed"])
@pytest.mark.parametrize("ternary", [True, False], ids=["ternary", "full-range"])
def test_sums_are_exact_across_spans_of_panels(ternary, a_layout, amx):
    """A reduction of 4096 makes each packed panel 256 KiB, so AMX runs 5 panels in 3 spans (2 + 2 + 1), each against
    every block of rows (the last one short), and reuses the row sums of the first span in the later ones."""
    a, b = _operands(70, 4096, 320, "row-major", 11, ternary, a_layout)
    out = cpu_vnni_gemm.scaled_mm(a, b, b_ternary=ternary, amx=amx)
    assert torch.equal(out.long(), (a.double() @ b.double()).long())


def test_sums_are_exact_at_the_extremes(amx):
    """-128 against -1 and 127 against 1 over a long reduction: the largest sums the shift by one must undo."""
    k = 4099
    a = torch.full((7, k), -128, dtype=torch.int8)
    a[1::2] = 127
    b = torch.ones(k, 70, dtype=torch.int8)
    b[:, ::3] = -1
    assert torch.equal(cpu_vnni_gemm.scaled_mm(a, b, amx=amx).long(), (a.double() @ b.double()).long())


def test_a_strided_left_operand_is_read_correctly(amx):
    a, b = _operands(35, 140, 70, "weight.T", 1)
    wide = torch.zeros(35, 200, dtype=torch.int8)
    wide[:, :140] = a
    out = cpu_vnni_gemm.scaled_mm(wide[:, :140], b, amx=amx)
    assert torch.equal(out.long(), (a.double() @ b.double()).long())


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("factors", ["row+scale", "row+col", "row+scale+bias", "scale"])
@pytest.mark.parametrize("a_layout", ["row-major", "transposed"])
def test_the_fused_epilogue_is_the_reference_one(out_dtype, factors, a_layout, amx):
    """((acc * row) * col) * scale in float32, rounded to the output dtype, then + bias in that dtype."""
    m, k, n = 37, 200, 130
    a, b = _operands(m, k, n, "weight.T", 7, a_layout=a_layout)
    g = torch.Generator().manual_seed(8)
    row = torch.rand(m, generator=g) if "row" in factors else None
    col = torch.rand(n, generator=g) if "col" in factors else None
    scale = torch.rand(1, generator=g) if "scale" in factors else None
    bias = torch.randn(n, generator=g) if "bias" in factors else None
    out = cpu_vnni_gemm.scaled_mm(a, b, row, col, scale, bias, out_dtype, amx=amx)
    expected = (a.double() @ b.double()).float()  # exact: |sums| < 2**24
    for factor, shape in ((row, (m, 1)), (col, (1, n)), (scale, (1, 1))):
        if factor is not None:
            expected = expected * factor.reshape(shape)
    expected = expected.to(out_dtype)
    if bias is not None:
        expected = expected + bias.to(out_dtype)
    assert out.dtype == out_dtype and torch.equal(out, expected)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_the_two_bit_weight_is_read_packed_exactly(out_dtype, amx):
    """``scaled_mm_i2`` of a weight packed by the reference packer (independent of the kernel's own expansion) equals
    the scaled float64 product, on shapes past a panel, a row block and a 4-value byte, with bias; the last two
    through the transposed expansion of full panels (blocks of 16 bytes x 16 rows, then the bytes left); the last one
    past two 32-row AMX blocks and five 64-byte steps."""
    from bitnet_ao.kernels import reference

    for m, k, n in ((1, 1, 1), (7, 5, 65), (13, 67, 130), (6, 256, 64), (5, 1001, 200), (70, 320, 130)):
        g = torch.Generator().manual_seed(m * 100 + k + n)
        a = random_int8(m, k, generator=g)
        w = torch.randint(-1, 2, (n, k), dtype=torch.int8, generator=g)
        row, scale, bias = torch.rand(m, generator=g), torch.rand(1, generator=g), torch.randn(n, generator=g)
        out = cpu_vnni_gemm.scaled_mm_i2(a, reference.pack_weight(w, 2), row, None, scale, bias, out_dtype, amx=amx)
        expected = ((a.double() @ w.double().t()).float() * row[:, None] * scale).to(out_dtype) + bias.to(out_dtype)
        assert torch.equal(out, expected), (m, k, n)
