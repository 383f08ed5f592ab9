"""The C elementwise passes (``kernels/cpu_passes.c``) give the numbers of the contract bit for bit, against the
spec's formulas written out in torch (``tests/spec_reference.py`` and below), for every dtype, odd and large shapes
(several threads), zero rows and rounding ties."""

from __future__ import annotations

import pytest
import torch

from bitnet_ao.kernels import cpu_passes
from tests.spec_reference import act_quant, rms_norm_rstd, ternary_weight

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 1), (3, 17), (33, 100), (257, 1031)]  # the last one is past COMPILE_MIN_NUMEL: both threads


def _input(shape: tuple[int, int], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Normal values, a zero row, and a row whose scale makes exact halves (round half to even decides them)."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    if shape[0] > 2:
        x[1] = 0
        x[2] = torch.arange(shape[1]).remainder(5).to(dtype) * 0.5  # max 2 -> scale 2/127: k/2 * 127/2 has halves
        x[2, 0] = 2
    return x


@pytest.fixture(autouse=True)
def _needs_the_kernels():
    if cpu_passes._library() is None:
        pytest.skip("no C compiler: the compiled reference runs instead")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_rows_is_act_quant(shape, dtype):
    x = _input(shape, dtype, 0)
    q, s = cpu_passes.quantize_rows(x, 1e-5)
    q_ref, s_ref = act_quant(x)
    assert torch.equal(s, s_ref) and torch.equal(q, q_ref.to(torch.int8))


@pytest.mark.parametrize("norm_dtype", DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_rows_through_the_norm(shape, dtype, norm_dtype):
    x = _input(shape, dtype, 1)
    gain = torch.rand(shape[1]) + 0.5
    q, s, rstd = cpu_passes.quantize_rows(x, 1e-5, norm=(gain, 1e-6, norm_dtype))
    assert torch.equal(rstd, rms_norm_rstd(x, 1e-6))
    normed = (x.float() * rstd * gain).to(dtype).to(norm_dtype)  # the norm, rounded as the linear receives it
    q_ref, s_ref = act_quant(normed)
    assert torch.equal(s, s_ref) and torch.equal(q, q_ref.to(torch.int8))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_is_the_norm_with_the_exact_rstd(shape, dtype):
    x = _input(shape, dtype, 3) * 7
    gain = torch.rand(shape[1]) + 0.5
    y, rstd = cpu_passes.rms_norm(x, gain, 1e-5)
    assert torch.equal(rstd, rms_norm_rstd(x, 1e-5))
    assert y.dtype == dtype and torch.equal(y, (x.float() * rstd * gain).to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_rstd_of_rows_with_inf_nan_zeros_and_subnormals(dtype):
    """The AVX-512 bfloat16 rstd builds each value's double from its bits (cpu_rows.h row_rstd), where a zero or a
    subnormal becomes a tiny nonzero value and an Inf or a NaN a finite one: rows that hold them, against the spec."""
    k = 100  # three blocks of 32 and a tail
    tiny = torch.finfo(dtype).tiny
    rows = torch.zeros(8, k)
    rows[0, 5] = float("inf")
    rows[1, 40] = float("nan")
    rows[2, 70] = -float("inf")
    rows[3, 3] = 2.0**-70  # alone among zeros: its mean square is a float32 subnormal, which the zeros must not move
    rows[4, ::3] = tiny / 4  # subnormals of the dtype (zeros in float32's flush-free arithmetic stay exact too)
    rows[5] = torch.randn(k) * 1e18  # squares near float32's overflow after the mean
    rows[6] = torch.randn(k)
    rows[6, 99] = float("nan")  # in the tail
    x = rows.to(dtype)
    # eps 0: nothing hides a mean square (row 3's is about 2^-147), an all-zero one gives Inf as in the spec
    rstd = cpu_passes.quantize_rows(x, 1e-5, norm=(torch.ones(k), 0.0, dtype))[2]
    torch.testing.assert_close(rstd, rms_norm_rstd(x, 0.0), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_grad_output_is_both_quantizations(shape, dtype):
    g = _input(shape, dtype, 2) * 1e-3
    row_scale = torch.rand(shape[0]) + 0.1
    g_q, s_g, g_qc, s_gc = cpu_passes.quantize_grad_output(g, row_scale, 1e-30)
    q_ref, s_ref = act_quant(g, eps=1e-30)
    assert torch.equal(s_g, s_ref) and torch.equal(g_q, q_ref.to(torch.int8))
    folded = g.float() * row_scale[:, None]
    s_col = folded.abs().amax(dim=0).clamp(min=1e-30) / 127
    assert torch.equal(s_gc, s_col)
    assert torch.equal(g_qc, (folded / s_col).round().clamp(-128, 127).to(torch.int8))


def _near_ties(scale: torch.Tensor, ulps: int = 3) -> torch.Tensor:
    """Values within ``ulps`` float32 steps of every (n + 1/2) * scale, n in -129..128: where a quotient taken as a
    product by the reciprocal, rather than divided, would round the other way."""
    ties = (torch.arange(-129, 129, dtype=torch.float32) + 0.5) * scale
    steps, up, down = [ties], ties, ties
    for _ in range(ulps):
        up, down = torch.nextafter(up, up * 2), torch.nextafter(down, down * 0)
        steps += [up, down]
    return torch.cat(steps)


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantizations_are_exact_at_and_near_every_rounding_tie(dtype):
    """The AVX-512 and AVX2 kernels multiply by the reciprocal of the scale and divide only near a rounding tie
    (``BITNET_NEAR_TIE`` in cpu_rows.h): every value of the dtype in a row against the spec, every half-integer
    quotient, and float32 values a few steps either side of one, on each quantization that divides."""
    finite = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype).float()
    finite = finite[finite.isfinite() & (finite.abs() <= 2.0) & (finite.abs() >= 2.0**-20)]
    rows = []
    for top in (2.0, 1.984375, 1.5, 1.0 + 2**-7, 1.25):  # 1.984375 = 254 / 128: every odd step is a tie
        row = finite[finite.abs() <= top]
        rows.append(torch.cat([row, torch.tensor([top])]))
    width = max(r.numel() for r in rows)
    x = torch.stack([torch.nn.functional.pad(r, (0, width - r.numel())) for r in rows]).to(dtype)
    q, s = cpu_passes.quantize_rows(x, 1e-5)
    q_ref, s_ref = act_quant(x)
    assert torch.equal(s, s_ref) and torch.equal(q, q_ref.to(torch.int8))

    absmax = torch.tensor(1.7)
    near = _near_ties(absmax / 127)
    near = torch.cat([near[near.abs() <= absmax], absmax[None]]).to(dtype)
    q, s = cpu_passes.quantize_rows(near[None], 1e-5)
    q_ref, s_ref = act_quant(near[None])
    assert torch.equal(q, q_ref.to(torch.int8))

    scale = torch.tensor(0.0123)
    w = _near_ties(scale).to(dtype)[None].expand(3, -1).contiguous()
    assert torch.equal(cpu_passes.ternarize(w, scale, False), (w.float() / scale).round().clamp(-1, 1).to(torch.int8))

    g = torch.stack([near, near.abs().max().expand(near.numel())])  # every column's scale is the row's
    _, _, g_qc, s_gc = cpu_passes.quantize_grad_output(g, torch.ones(2), 1e-30)
    s_col = g.float().abs().amax(dim=0).clamp(min=1e-30) / 127
    assert torch.equal(s_gc, s_col) and torch.equal(g_qc, (g.float() / s_col).round().clamp(-128, 127).to(torch.int8))


@pytest.mark.parametrize("k", [1024, 1031])  # every row 64-byte aligned; most rows not
def test_outputs_streamed_around_the_caches_are_the_same(monkeypatch, k):
    """Outputs larger than the last-level cache are written with non-temporal stores (``cpu_passes.streams``):
    made to apply here by a 1 KiB cache, they hold the spec's values."""
    monkeypatch.setattr(cpu_passes, "_last_level_cache_bytes", lambda: 1024)
    assert cpu_passes.streams(1024) and not cpu_passes.streams(1023)
    x = _input((67, k), torch.bfloat16, 4)
    q, s = cpu_passes.quantize_rows(x, 1e-5)
    q_ref, s_ref = act_quant(x)
    assert torch.equal(s, s_ref) and torch.equal(q, q_ref.to(torch.int8))
    gain = torch.rand(k) + 0.5
    q, s, rstd = cpu_passes.quantize_rows(x, 1e-5, norm=(gain, 1e-6, torch.bfloat16))
    q_ref, s_ref = act_quant((x.float() * rstd * gain).to(torch.bfloat16))
    assert torch.equal(s, s_ref) and torch.equal(q, q_ref.to(torch.int8))
    row_scale = torch.rand(67) + 0.1
    g_q, s_g, g_qc, s_gc = cpu_passes.quantize_grad_output(x, row_scale, 1e-30)
    folded = x.float() * row_scale[:, None]
    s_col = folded.abs().amax(dim=0).clamp(min=1e-30) / 127
    assert torch.equal(g_q, act_quant(x, eps=1e-30)[0].to(torch.int8)) and torch.equal(s_gc, s_col)
    assert torch.equal(g_qc, (folded / s_col).round().clamp(-128, 127).to(torch.int8))


@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("factors", ["row+scale+bias", "row+col", "row", "float acc"])
def test_scale_output_is_the_epilogue(shape, out_dtype, factors):
    gen = torch.Generator().manual_seed(3)
    acc = torch.randint(-(2**20), 2**20, shape, generator=gen, dtype=torch.int32)
    row, col, scale = torch.rand(shape[0], generator=gen), torch.rand(shape[1], generator=gen), torch.tensor(0.37)
    bias = torch.randn(shape[1], generator=gen) if "bias" in factors else None
    if factors == "float acc":
        acc = acc.float()
    col = col if "col" in factors else None
    scale = scale if "scale" in factors else None
    out = cpu_passes.scale_output(acc, row, col, scale, bias, out_dtype)
    expected = acc.float() * row[:, None]
    if col is not None:
        expected = expected * col[None, :]
    if scale is not None:
        expected = expected * scale
    expected = expected.to(out_dtype)
    if bias is not None:
        expected = expected + bias.to(out_dtype)
    assert out.dtype == out_dtype and torch.equal(out, expected)


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [*SHAPES, (130, 67)])
def test_ternarize_is_round_clamp(shape, dtype, transpose):
    w = _input(shape, dtype, 4)
    scale = w.float().abs().mean() if shape != (1, 1) else torch.tensor(0.0)  # 0: the 1e-5 floor
    q = cpu_passes.ternarize(w, scale, transpose)
    expected = (w.float() / scale.clamp(min=1e-5)).round().clamp(-1, 1).to(torch.int8)
    assert torch.equal(q, expected.t().contiguous() if transpose else expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [*SHAPES, (130, 67), (300, 1000)])
def test_weight_stats_give_the_spec_scales(shape, dtype):
    """The float64 sums against torch's float64 sums (only their order differs: the last bits), the float32 scales
    made of them exactly the spec's ``mean(|W|)`` and mean, and the same sums with one thread as with two (the
    chunks, not the threads, fix the order; the last shape spans 19 chunks)."""
    w = _input(shape, dtype, 5) * 0.02
    stats = cpu_passes.weight_stats(w)
    expected = torch.stack([w.double().abs().sum(), w.double().sum()])
    torch.testing.assert_close(stats, expected, rtol=1e-12, atol=1e-300)
    _, s_w = ternary_weight(w)
    assert torch.equal((stats[0] / w.numel()).float(), s_w)
    assert torch.equal((stats[1] / w.numel()).float(), w.double().mean().float())
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(cpu_passes.weight_stats(w), stats)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dy_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [*SHAPES, (2100, 96)])
def test_rms_norm_backward_is_the_gradient(shape, dtype, dy_dtype):
    """The gradient of ``x / rms(x) * w``, written out in float64 (independently of the reference body): dx within
    the rounding of x's dtype, dw (a sum over every row; 2100 rows is a long float32 sum) to float32 precision."""
    x, dy = _input(shape, dtype, 4), _input(shape, dy_dtype, 5)
    gain = torch.rand(shape[1], dtype=torch.float64) + 0.5
    rstd = torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5)
    dx, dw = cpu_passes.rms_norm_backward(dy, x, gain.float(), rstd.float())
    xd, dyd = x.double(), dy.double()
    n = shape[1]
    # d/dx_j of sum_k dy_k w_k x_k rstd: rstd (dy_j w_j) - x_j rstd^3 / n * sum_k dy_k w_k x_k
    dx_expected = rstd * dyd * gain - xd * rstd.pow(3) / n * (dyd * gain * xd).sum(-1, keepdim=True)
    dw_expected = (dyd * xd * rstd).sum(0)
    assert dx.dtype == dtype and dw.dtype == torch.float32
    rtol = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[dtype]
    scale = (rstd * dyd * gain).abs().max().item()  # the terms that cancel: an absolute error of their size is rounding
    torch.testing.assert_close(dx.double(), dx_expected, rtol=rtol, atol=rtol * scale)
    torch.testing.assert_close(dw.double(), dw_expected, rtol=1e-5, atol=1e-5 * dw_expected.abs().max().item())


def test_what_the_kernels_do_not_take_falls_back():
    assert cpu_passes.quantize_rows(torch.zeros(0, 4), 1e-5) is None
    assert cpu_passes.quantize_rows(torch.zeros(2, 4, dtype=torch.float64), 1e-5) is None
    assert cpu_passes.rms_norm(torch.zeros(2, 4, dtype=torch.float64), torch.ones(4), 1e-5) is None
    assert cpu_passes.ternarize(torch.ones(4, 4), torch.ones(4, 1), False) is None  # group scales
    double = torch.zeros(2, 4, dtype=torch.float64)
    assert cpu_passes.rms_norm_backward(double, double, torch.ones(4), torch.ones(2, 1)) is None


@pytest.mark.slow
@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_the_avx2_and_portable_builds_are_exact_too(capability, tmp_path):
    """The same checks on the kernels built for AVX2 (``x86-64-v3``, what an AVX2 CPU runs) and for baseline
    x86-64, in a subprocess: ``ATEN_CPU_CAPABILITY`` picks the build (``kernels/cpu_build.py``)."""
    import os
    import platform
    import subprocess
    import sys

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86-64 builds")
    # Its own inductor cache too: torch 2.13.0's FX graph cache serves graphs across ATEN_CPU_CAPABILITY values.
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "BITNET_AO_CACHE_DIR": str(tmp_path)}
    env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path / "inductor")
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "not builds"]
    run = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "passed" in run.stdout and any(tmp_path.glob("cpu_passes-*.so")), run.stdout[-3000:]
