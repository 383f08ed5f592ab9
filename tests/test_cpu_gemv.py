"""The C kernels of packed inference on CPU (``kernels/cpu_gemv.py`` + ``cpu_gemv.c``) against an independent
implementation: the packed layout written out bit by bit here, integer products in float64 (exact at these sizes),
and the quantization and output scaling of spec §1 (``tests/spec_reference.py``) in plain torch.

The shapes cover what the vectorized code can get wrong: a reduction not a multiple of the 32-byte AVX2 chunk (odd K,
K below one chunk), 1 row (its own code path) and row counts that are not a multiple of the 4 rows of a pass, rows
whose padding values are not zero, and int8 activations at -128 and 127 against weights that are all +1, all -1 or
all 0 (the largest sums, where an int16 pair sum in the dot product could saturate).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import Tensor

from bitnet_ao.kernels import cpu_gemv, reference
from tests.conftest import random_int8
from tests.spec_reference import act_quant, rms_norm_rstd

#: (M, K, N): one value; M = 1 and M not a multiple of 4; K below, around and above one 32-byte chunk, odd, and
#: multiples of 8 that end in a partial chunk (the scalar tail then holds real values, not padding).
SHAPES = [(1, 1, 1), (1, 31, 5), (1, 40, 6), (1, 70, 33), (2, 33, 3), (4, 72, 5), (5, 257, 19), (7, 95, 9)]
SHAPES += [(16, 1030, 40)]


@pytest.fixture(scope="module", autouse=True)
def _built() -> None:
    assert cpu_gemv.available(), "cpu_gemv.c did not build on this machine (a C compiler is needed)"


def _pack(w: Tensor, bits: int, generator: torch.Generator) -> Tensor:
    """The layout of ``cpu_gemv.c``, written out: value ``per * j + i`` of a row in bits ``bits * i ..`` of byte
    ``j``; 2-bit two's complement for ternary values, 1 for +1 and 0 for -1 for binary ones. The padding values of a
    row's last byte are random codes: the kernels must ignore them."""
    per = 8 // bits
    n, k = w.shape
    kp = -(-k // per)
    codes = torch.randint(0, 1 << bits, (n, kp * per), generator=generator, dtype=torch.int64)
    codes[:, :k] = w.long() & 3 if bits == 2 else (w > 0).long()
    byte = (codes.view(n, kp, per) << (bits * torch.arange(per))).sum(-1)
    return byte.to(torch.uint8).view(torch.int8)


def _weight(n: int, k: int, bits: int, generator: torch.Generator) -> Tensor:
    """Random weight values: ternary {-1, 0, 1} for 2 bits, binary {-1, 1} for 1 bit, with one row all +1, one all
    -1 and (ternary) one all 0 where there are rows enough."""
    if bits == 2:
        w = random_int8(n, k, low=-1, high=2, generator=generator)
    else:
        w = random_int8(n, k, low=0, high=2, generator=generator) * 2 - 1
    extremes = [1, -1] + ([0] if bits == 2 else [])
    for row, value in zip(range(n), extremes, strict=False):
        w[row] = value
    return w


def _activations(m: int, k: int, generator: torch.Generator) -> Tensor:
    """Random int8 rows with the extremes: row 0 all -128, row 1 all 127 (where there are rows enough), and -128 / 127
    at the ends of the last row."""
    a = random_int8(m, k, generator=generator)
    a[0] = -128
    if m > 1:
        a[1] = 127
    a[-1, 0], a[-1, -1] = -128, 127
    return a


def _exact(a: Tensor, w: Tensor) -> Tensor:
    return a.double() @ w.double().t()


@pytest.mark.parametrize("bits", [1, 2], ids=["binary", "ternary"])
@pytest.mark.parametrize(("m", "k", "n"), SHAPES)
def test_packed_gemv_is_the_exact_integer_product(bits, m, k, n):
    g = torch.Generator().manual_seed(m * 1000 + k)
    a, w = _activations(m, k, g), _weight(n, k, bits, g)
    packed = _pack(w, bits, g)
    acc = cpu_gemv.packed_gemv(a, packed, k, bits)
    assert acc.dtype == torch.int32 and acc.shape == (m, n)
    assert torch.equal(acc.double(), _exact(a, w))


@pytest.mark.parametrize("bits", [1, 2], ids=["binary", "ternary"])
def test_packed_gemv_reads_strided_operands(bits):
    g = torch.Generator().manual_seed(3)
    a, w = _activations(4, 45, g), _weight(6, 45, bits, g)
    packed = _pack(w, bits, g)
    a_view = a.t().contiguous().t()  # column-major: the same values, other strides
    packed_view = packed.t().contiguous().t()
    assert torch.equal(cpu_gemv.packed_gemv(a_view, packed_view, 45, bits).double(), _exact(a, w))


@pytest.mark.parametrize("bits", [1, 2], ids=["binary", "ternary"])
@pytest.mark.parametrize("k", [1, 7, 9, 33, 250])
def test_unpack_gives_the_weight_values(bits, k):
    g = torch.Generator().manual_seed(k)
    w = _weight(5, k, bits, g)
    packed = _pack(w, bits, g)
    assert torch.equal(cpu_gemv.unpack(packed, k, bits), w)
    assert torch.equal(cpu_gemv.unpack(packed.t().contiguous().t(), k, bits), w)
    if bits == 2:  # the library's packer writes the same layout (with zero padding)
        assert torch.equal(cpu_gemv.unpack(reference.pack_weight(w, bits), k, bits), w)


def _spec_linear(
    x: Tensor,
    gain: Tensor | None,
    rstd: Tensor | None,
    w: Tensor,
    scale: Tensor,
    bias: Tensor | None,
    norm_dtype: torch.dtype,
    out_dtype: torch.dtype,
) -> Tensor:
    """Spec §1's forward in plain torch: the norm's output rounded to ``x.dtype`` then ``norm_dtype``, per-token
    int8, the exact integer product, ``* s_x * s_w`` in float32, cast to ``out_dtype``, ``+ b``."""
    h = x.float()
    if gain is not None:
        h = (h * rstd * gain.float()).to(x.dtype).to(norm_dtype)
    q, s = act_quant(h)
    y = (_exact(q, w).float() * s[:, None] * scale).to(out_dtype)
    return y + bias.to(out_dtype) if bias is not None else y


@pytest.mark.parametrize("bits", [1, 2], ids=["binary", "ternary"])
@pytest.mark.parametrize("norm", [False, True], ids=["plain", "normed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_packed_linear_is_the_spec_forward(bits, norm, dtype):
    g = torch.Generator().manual_seed(11)
    m, k, n = 3, 75, 21
    x = (torch.randn(m, k, generator=g) * 4).to(dtype)
    x[0, 5] = 0  # a zero: quantizes to 0 whatever the scale
    w = _weight(n, k, bits, g)
    packed = _pack(w, bits, g)
    scale = torch.tensor(0.037)
    bias = torch.randn(n, generator=g)
    gain = torch.rand(k, generator=g) + 0.5 if norm else None
    rstd = rms_norm_rstd(x, 1e-5) if norm else None
    norm_dtype = torch.bfloat16 if norm else dtype  # an autocast dtype other than x's
    for b in (bias, None):
        out = cpu_gemv.packed_linear(x, gain, 1e-5, norm_dtype, 1e-5, packed, k, bits, scale, b, dtype)
        expected = _spec_linear(x, gain, rstd, w, scale, b, norm_dtype, dtype)
        assert out.dtype == dtype and torch.equal(out, expected), (out - expected).abs().max()


def test_every_small_shape_is_exact():
    """The grid of ``tests/test_cpu_matmul.py`` (M, K, N in 0, 1, 2, 3, 15, 16, 17, 33, 64) where the kernels take
    it: decode-sized M (one partial pass of 4 rows, several passes and a partial one, full passes), at least one
    value per row. A value head has N = 1, a linear with one input K = 1; the matmul, unpacking and the whole
    linear against spec §1, for both bit widths."""
    g = torch.Generator().manual_seed(0)
    sizes = (1, 2, 3, 15, 16, 17, 33, 64)
    wrong = []
    for m, k, n, bits in itertools.product((1, 3, 15, 16), sizes, (0, *sizes), (1, 2)):
        w = _weight(n, k, bits, g)
        packed, a, x = _pack(w, bits, g), _activations(m, k, g), torch.randn(m, k, generator=g)
        scale, bias = torch.tensor(0.37), torch.randn(n, generator=g)
        y = cpu_gemv.packed_linear(x, None, 0.0, torch.float32, 1e-5, packed, k, bits, scale, bias, torch.float32)
        checks = {
            "matmul": torch.equal(cpu_gemv.packed_gemv(a, packed, k, bits).double(), _exact(a, w)),
            "unpack": m > 1 or torch.equal(cpu_gemv.unpack(packed, k, bits), w),
            "linear": torch.equal(y, _spec_linear(x, None, None, w, scale, bias, torch.float32, torch.float32)),
        }
        wrong += [(m, k, n, bits, name) for name, exact in checks.items() if not exact]
    assert not wrong, f"{len(wrong)} wrong results, e.g. {wrong[:8]}"


def test_packed_linear_rounds_activations_half_to_even():
    """Activations at exact .5 multiples of their scale (absmax 127 gives the scale 1): 2.5 -> 2 and -0.5 -> 0."""
    g = torch.Generator().manual_seed(5)
    x = torch.tensor([[127.0, 2.5, -0.5, 1.5, -126.5, 0.0, 3.0]])
    w = _weight(4, 7, 2, g)
    out = cpu_gemv.packed_linear(x, None, 0.0, torch.float32, 1e-5, _pack(w, 2, g), 7, 2, torch.tensor(1.0), None,
                                 torch.float32)  # fmt: skip
    q = torch.tensor([[127.0, 2, 0, 2, -126, 0, 3]])
    assert torch.equal(out.double(), _exact(q, w))


def test_applies_to_decode_sized_forwards_on_cpu_only():
    a = torch.zeros(cpu_gemv.MAX_M, 8, dtype=torch.int8)
    assert cpu_gemv.applies(a, 8, True) and cpu_gemv.applies(a[:1], cpu_gemv.MAX_K, True)
    assert not cpu_gemv.applies(a, 8, False), "a @ B (grad_input) is not the kernel's"
    assert not cpu_gemv.applies(torch.zeros(cpu_gemv.MAX_M + 1, 8, dtype=torch.int8), 8, True)
    assert not cpu_gemv.applies(a[:0], 8, True) and not cpu_gemv.applies(a, 0, True)
    assert not cpu_gemv.applies(a, cpu_gemv.MAX_K + 1, True), "int32 sums are exact up to MAX_K only"
    assert not cpu_gemv.applies(a.to("meta"), 8, True)


def test_unbuilt_kernel_and_dtypes_without_a_code_give_none(monkeypatch):
    """The callers' signal to take the torch path: ``None``, never an exception or a wrong result."""
    g = torch.Generator().manual_seed(0)
    w = _weight(3, 10, 2, g)
    packed, x = _pack(w, 2, g), torch.randn(2, 10)
    args = (None, 0.0, torch.float32, 1e-5, packed, 10, 2, torch.tensor(1.0), None)
    assert cpu_gemv.packed_linear(x, *args, torch.float64) is None
    monkeypatch.setattr(cpu_gemv, "_library", lambda: None)
    assert not cpu_gemv.available()
    assert cpu_gemv.packed_gemv(x.to(torch.int8), packed, 10, 2) is None
    assert cpu_gemv.unpack(packed, 10, 2) is None
    assert cpu_gemv.packed_linear(x, *args, torch.float32) is None


_PORTABLE_BUILD = """
import torch
from bitnet_ao.kernels import cpu_build, cpu_gemv
from tests import test_cpu_gemv as t
assert cpu_build.march() == "-march=x86-64", cpu_build.march()
g = torch.Generator().manual_seed(0)
for bits in (1, 2):
    for m, k, n in t.SHAPES:
        w, a = t._weight(n, k, bits, g), t._activations(m, k, g)
        acc = cpu_gemv.packed_gemv(a, t._pack(w, bits, g), k, bits)
        assert torch.equal(acc.double(), t._exact(a, w)), (bits, m, k, n)
print("exact")
"""


def test_the_portable_build_is_exact_too(tmp_path):
    """The plain C path (decode a row, then a u8 x s8 loop), which machines without AVX2 and AVX-512 VNNI builds
    take, and an AVX2 build does not: built for baseline x86-64 in a subprocess (``ATEN_CPU_CAPABILITY=default``)."""
    import os
    import platform
    import subprocess
    import sys

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the x86-64 baseline build")
    # Its own inductor cache too: torch 2.13.0's FX graph cache serves graphs across ATEN_CPU_CAPABILITY values.
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", "BITNET_AO_CACHE_DIR": str(tmp_path)}
    env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "inductor")
    run = subprocess.run([sys.executable, "-c", _PORTABLE_BUILD], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "exact" in run.stdout, run.stderr[-3000:]
