"""Every CPU int8 matmul route gives the exact integer product, on whatever CPU the tests run on.

The exact product of int8 operands is computed here in float64 (every such sum with fewer than 2**39 terms is an
integer float64 holds exactly), independently of the routes under test.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest
import torch
from torch import Tensor, nn
from torchao.quantization import quantize_

from bitnet_ao import bitnet_training, kernels, pack_i2_in_i8
from bitnet_ao.kernels import cpu_gemv, cpu_matmul
from tests.conftest import random_int8
from tests.spec_reference import act_quant, ternary_weight


def _full_route(route: str) -> str:
    """``route`` for the full-range matmul too where this machine runs it exactly for full-range operands, else the
    float64 reference (``int_mm`` is not, where ``ONEDNN_MAX_CPU_ISA`` keeps a VNNI CPU's oneDNN at AVX2)."""
    return route if route in cpu_matmul.available_routes("full") else "reference"


def _skip_unless_available(route: str, kind: str) -> None:
    if route not in cpu_matmul.available_routes(kind):
        pytest.skip(f"route {route} is not available for {kind} operands on this machine")


def _exact(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.double() @ b.double()


def _operands(m: int, k: int, n: int, ternary: bool, extreme: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if extreme:
        # Large odd products (127 * 127): partial sums pass 2**24 with odd values, which float32 cannot hold, so
        # a route that lets one FP32 sum run past 1024 terms rounds (an unblocked FP32 GEMM is off by ~2000 here).
        a = torch.full((m, k), -127, dtype=torch.int8)
        b = torch.full((k, n), -1 if ternary else -127, dtype=torch.int8)
        return a, b
    a = random_int8(m, k, generator=g)
    b = random_int8(k, n, low=-1, high=2, generator=g) if ternary else random_int8(k, n, generator=g)
    return a, b


@pytest.mark.parametrize("route", cpu_matmul.ROUTES)
@pytest.mark.parametrize("extreme", [False, True], ids=["random", "extreme"])
@pytest.mark.parametrize("k", [7, 1500])
def test_ternary_right_operand_is_exact_on_every_route(force_routes, route, extreme, k):
    _skip_unless_available(route, "ternary")
    force_routes(route, "reference")
    a, b = _operands(37, k, 29, ternary=True, extreme=extreme)
    for b_layout in (b, b.t().contiguous().t()):  # row-major and K-contiguous
        out = cpu_matmul.int8_mm(a, b_layout, b_ternary=True)
        assert torch.equal(out.double(), _exact(a, b)), (route, b_layout.stride())


@pytest.mark.parametrize("route", cpu_matmul.EXACT_ROUTES["full"])
@pytest.mark.parametrize("extreme", [False, True], ids=["random", "extreme"])
def test_full_range_operands_are_exact_beyond_one_fp32_block(force_routes, route, extreme):
    """K = 3000 > 1024, so the FP32 route must split the reduction (the extreme case fails without it)."""
    _skip_unless_available(route, "full")
    force_routes("reference", route)
    a, b = _operands(9, 3000, 11, ternary=False, extreme=extreme)
    out = cpu_matmul.int8_mm(a.t().contiguous().t(), b, b_ternary=False)  # a as the TN layout's transposed view
    assert torch.equal(out.double(), _exact(a, b)), route


@pytest.mark.parametrize("route", cpu_matmul.ROUTES)
def test_empty_shapes(force_routes, route):
    _skip_unless_available(route, "ternary")
    force_routes(route, _full_route(route))
    for m, k, n in ((0, 8, 4), (3, 0, 4), (3, 8, 0)):
        out = cpu_matmul.int8_mm(torch.zeros(m, k, dtype=torch.int8), torch.zeros(k, n, dtype=torch.int8), True)
        assert out.shape == (m, n) and not out.any()


@pytest.mark.parametrize("route", cpu_matmul.ROUTES)
def test_bitnet_linear_training_step_is_identical_on_every_route(force_routes, route):
    """Forward, grad_input and grad_weight of a BitNet linear, bit for bit the float64 reference route's."""

    def step(ternary: str, full: str):
        force_routes(ternary, full)
        torch.manual_seed(0)
        layer = nn.Linear(40, 24)
        quantize_(layer, bitnet_training())
        x = torch.randn(3, 11, 40, requires_grad=True)
        y = layer(x)
        y.square().sum().backward()
        return y.detach(), x.grad, layer.weight.grad, layer.bias.grad

    _skip_unless_available(route, "ternary")
    expected = step("reference", "reference")
    got = step(route, _full_route(route))
    for e, g in zip(expected, got, strict=True):
        assert torch.equal(e, g), route


@pytest.fixture
def fresh_routes(monkeypatch, tmp_path):
    """Route choices made afresh in this test, with an empty on-disk cache, and forgotten after it."""
    monkeypatch.setenv("BITNET_AO_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(cpu_matmul.ENV_VAR, raising=False)
    cpu_matmul.route_report.cache_clear()
    yield
    cpu_matmul.route_report.cache_clear()


def test_env_var_forces_a_route(monkeypatch, fresh_routes):
    monkeypatch.setenv(cpu_matmul.ENV_VAR, "fp32")
    assert cpu_matmul.routes() == {"ternary": "fp32", "full": "fp32"}
    assert cpu_matmul.route_report()["ternary"]["how"] == "forced"
    if "vnni" in cpu_matmul.available_routes("ternary"):
        cpu_matmul.route_report.cache_clear()
        monkeypatch.setenv(cpu_matmul.ENV_VAR, "vnni")
        assert cpu_matmul.routes() == {"ternary": "vnni", "full": "vnni"}  # exact for both kinds
    for ternary_only in ("onednn", "signadd"):
        if ternary_only not in cpu_matmul.available_routes("ternary"):
            continue
        cpu_matmul.route_report.cache_clear()
        monkeypatch.setenv(cpu_matmul.ENV_VAR, ternary_only)
        # Not exact for the full-range grad_weight: that one is measured among the exact routes.
        assert cpu_matmul.routes()["ternary"] == ternary_only
        assert cpu_matmul.routes()["full"] in cpu_matmul.candidates("full")
        assert cpu_matmul.route_report()["full"]["how"] in ("measured", "cached")
    cpu_matmul.route_report.cache_clear()
    monkeypatch.setenv(cpu_matmul.ENV_VAR, "ternary=reference,full=fp32")
    assert cpu_matmul.routes() == {"ternary": "reference", "full": "fp32"}
    for bad in ("int4", "ternary=int_mm", "ternary=int_mm,full=onednn", "ternary=fp32,full=signadd"):
        cpu_matmul.route_report.cache_clear()
        monkeypatch.setenv(cpu_matmul.ENV_VAR, bad)
        with pytest.raises(ValueError, match=f"BITNET_AO_CPU_INT8_ROUTE='{bad}': expected one of"):
            cpu_matmul.routes()


def test_routes_are_measured_and_the_fastest_kept_and_cached(monkeypatch, fresh_routes, tmp_path):
    """The choice is the fastest candidate as measured (here: made up), FP32 is always a candidate, and a later
    process on the same machine reads the choice from disk instead of measuring again."""
    made_up = {"ternary": {"fp32": 50.0, "onednn": 10.0, "signadd": 20.0}, "full": {"fp32": 50.0}}
    calls = []

    def fake_measure(kind):
        calls.append(kind)
        return {r: made_up[kind].get(r, 1.0) for r in cpu_matmul.candidates(kind)}

    monkeypatch.setattr(cpu_matmul, "measure", fake_measure)
    assert "fp32" in cpu_matmul.candidates("ternary") and "fp32" in cpu_matmul.candidates("full")
    with pytest.warns(UserWarning, match="no int8 matmul route measured faster than an FP32 GEMM"):
        assert cpu_matmul.routes() == {"ternary": "fp32", "full": "fp32"}
    assert sorted(calls) == ["full", "ternary"]
    assert (tmp_path / "cpu_int8_routes.json").exists()
    cpu_matmul.route_report.cache_clear()
    with pytest.warns(UserWarning, match="FP32"):
        report = cpu_matmul.route_report()
    assert len(calls) == 2 and {e["how"] for e in report.values()} == {"cached"}
    # Exact whatever was chosen: the FP32 route on a full-range product past one exact block.
    a, b = _operands(5, 2000, 6, ternary=False, extreme=True)
    assert torch.equal(cpu_matmul.int8_mm(a, b, b_ternary=False).double(), _exact(a, b))


def test_a_route_that_fuses_its_epilogue_wins_a_near_tie():
    """Within PROBE_TIE of the fastest, vnni is taken (the probe's cached operands cannot show the int32 round trip
    it saves); beyond it, the fastest."""
    tie = 1 - cpu_matmul.PROBE_TIE
    assert cpu_matmul.fastest({"int_mm": 800.0, "vnni": 800.0 * tie + 1, "fp32": 150.0}) == "vnni"
    assert cpu_matmul.fastest({"int_mm": 800.0, "vnni": 800.0 * tie - 1, "fp32": 150.0}) == "int_mm"
    assert cpu_matmul.fastest({"int_mm": 700.0, "vnni": 800.0}) == "vnni"
    assert cpu_matmul.fastest({"onednn": 400.0, "fp32": 150.0}) == "onednn"


def test_measuring_times_every_candidate(fresh_routes):
    """The real measurement, on small shapes: a speed for every candidate, and the choice is one of them."""
    for kind, shape in (("ternary", (64, 256, 128)), ("full", (128, 64, 256))):
        gops = cpu_matmul.measure(kind, (shape,))
        assert set(gops) == set(cpu_matmul.candidates(kind)) and all(v > 0 for v in gops.values())


_FIRST_USE_UNDER_COMPILE = """
import torch
from torch import nn
from torchao.quantization import quantize_
from bitnet_ao import bitnet_training
from bitnet_ao.kernels import cpu_matmul
model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))
quantize_(model, bitnet_training())
x = torch.randn(8, 64)
y = torch.compile(model, fullgraph=True)(x)
y.sum().backward()
assert torch.equal(y, model(x))
print(cpu_matmul.route_report()["ternary"]["how"])
"""


@pytest.mark.slow
def test_the_first_route_choice_may_happen_inside_a_fullgraph_compile(tmp_path):
    """A fresh machine whose first BitNet matmul is traced by torch.compile(fullgraph=True): the routes are measured
    on real tensors outside the graph, and the compiled model gives the eager outputs."""
    env = {**os.environ, "BITNET_AO_CACHE_DIR": str(tmp_path)}
    env.pop(cpu_matmul.ENV_VAR, None)
    out = subprocess.run([sys.executable, "-c", _FIRST_USE_UNDER_COMPILE], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip().endswith("measured"), out.stderr[-3000:]


_AVX2_ONEDNN = """
import torch
from bitnet_ao.kernels import cpu_matmul
torch.manual_seed(0)
a = torch.randint(-128, 128, (64, 512), dtype=torch.int8)
for name, b in (("ternary", torch.randint(-1, 2, (512, 48), dtype=torch.int8)),
                ("full", torch.randint(-128, 128, (512, 48), dtype=torch.int8))):
    err = (cpu_matmul._onednn_mm(a, b).double() - a.double() @ b.double()).abs().max().item()
    print(name, err)
"""


@pytest.mark.slow
@pytest.mark.skipif(not cpu_matmul._onednn_available(), reason="oneDNN's int8 linear needs an x86 CPU")
def test_onednn_on_avx2_is_exact_for_ternary_weights_only():
    """oneDNN limited to AVX2 (as on a CPU without VNNI): u8 x s8 pair sums saturate in int16, so only a ternary
    right operand is exact. This is why the full-range grad_weight never takes the oneDNN route."""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", _AVX2_ONEDNN], env=env, capture_output=True, text=True, check=True)
    errors = dict(line.split() for line in out.stdout.strip().splitlines())
    assert float(errors["ternary"]) == 0.0
    assert float(errors["full"]) > 0.0, "oneDNN's AVX2 kernel no longer saturates: the full route could use it"


def test_every_route_is_exact_inside_autocast(cpu_route):
    """An enclosing BF16 autocast must not reach a route's matmul: the FP32 route's torch.mm would run in BF16."""
    a, b = _operands(64, 2048, 96, ternary=False, extreme=False)
    ternary_b = b.clamp(-1, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = cpu_matmul.int8_mm(a, b, b_ternary=False)
        ternary = cpu_matmul.int8_mm(a, ternary_b.t().contiguous().t(), b_ternary=True)
    assert torch.equal(full.double(), _exact(a, b))
    assert torch.equal(ternary.double(), _exact(a, ternary_b))


def test_backward_inside_autocast_gives_the_same_gradients(cpu_route):
    """A loop that calls backward() inside its autocast block gets the gradients of one that calls it outside."""

    def grads(backward_in_autocast: bool):
        torch.manual_seed(0)
        layer = nn.Linear(2048, 96)
        quantize_(layer, bitnet_training())
        x = torch.randn(64, 2048, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = layer(x).float().square().sum()
            if backward_in_autocast:
                loss.backward()
        if not backward_in_autocast:
            loss.backward()
        return x.grad, layer.weight.grad, layer.bias.grad

    for inside, outside in zip(grads(True), grads(False), strict=True):
        assert torch.equal(inside, outside)


# --- every route on every small shape ----------------------------------------------------------------------------

#: M, K and N of the shape grid: empty, one (a linear with one input or output, a one-token batch), and sizes below,
#: at and past the vector widths and tiles of the kernels.
GRID_SIZES = (0, 1, 2, 3, 15, 16, 17, 33, 64)
#: docs/numerics.md#backward: the floor of a gradient scale.
GRADIENT_EPS = 1e-30


def _laid_out(t: Tensor, transposed: bool) -> Tensor:
    """``t``'s values in a fresh row-major tensor, or (``transposed``) as the ``.t()`` view of a fresh row-major
    ``t.T``, as the linear passes ``W_q.T`` and ``g'_q.T``. With a size-1 dimension the view's strides are
    ``(1, 1)`` (``.contiguous()`` would keep such a view: it counts as contiguous, hence the clones)."""
    if transposed:
        return t.t().clone(memory_format=torch.contiguous_format).t()
    return t.clone(memory_format=torch.contiguous_format)


@pytest.mark.parametrize("route", cpu_matmul.ROUTES)
def test_every_route_is_exact_on_every_small_shape_and_layout(force_routes, route):
    """Every (M, K, N) of the grid, each operand row-major or a transposed view: the forward (NT), grad_input (NN,
    either layout of the weight) and grad_weight (TN) layouts and the fourth, ternary and (where the route is exact
    for it) full-range. torch._int_mm returned uninitialised memory for a (1, 1)-stride operand (docs/kernels.md)."""
    _skip_unless_available(route, "ternary")
    force_routes(route, _full_route(route))
    kinds = (True, False) if route == _full_route(route) else (True,)
    g = torch.Generator().manual_seed(0)
    wrong = []
    for (m, k, n), ternary in itertools.product(itertools.product(GRID_SIZES, repeat=3), kinds):
        a = random_int8(m, k, generator=g)
        b = random_int8(k, n, low=-1, high=2, generator=g) if ternary else random_int8(k, n, generator=g)
        exact = _exact(a, b)
        for a_t, b_t in itertools.product((False, True), repeat=2):
            out = cpu_matmul.int8_mm(_laid_out(a, a_t), _laid_out(b, b_t), b_ternary=ternary)
            if out.shape != (m, n) or not torch.equal(out.double(), exact):
                wrong.append((m, k, n, "ternary" if ternary else "full", "a.T" if a_t else "a", "b.T" if b_t else "b"))
    assert not wrong, f"{len(wrong)} wrong products, e.g. {wrong[:8]}"


def test_packed_weight_matmuls_are_exact_on_every_small_shape(cpu_route):
    """A packed BitNet weight ``B`` of N rows and K values, wherever the route computes its product: ``a @ B.T``
    past the decode kernel's rows (the unpacked ``B.T`` is a ``.t()`` view, with strides ``(1, 1)`` where K = 1)
    and ``a @ B`` (the input gradient through frozen packed weights). The degenerate sizes of the grid and two past
    the decode kernel's 16 rows: the routes themselves are tested on the whole grid above, the decode kernel in
    ``tests/test_cpu_gemv.py``."""
    g = torch.Generator().manual_seed(0)
    wrong = []
    for m, k, n in itertools.product((0, 1, 2, 3, 17, 33), repeat=3):
        w = random_int8(n, k, low=-1, high=2, generator=g)
        packed = pack_i2_in_i8(w)
        for transpose_b in (True, False) if m > cpu_gemv.MAX_M else (False,):
            a = random_int8(m, k if transpose_b else n, generator=g)
            out = kernels.scaled_int8_mm_packed(a, packed, k, transpose_b, None, None, None, None, torch.float32)
            if not torch.equal(out.double(), _exact(a, w.t() if transpose_b else w)):
                wrong.append((m, k, n, "a @ B.T" if transpose_b else "a @ B"))
    assert not wrong, f"{len(wrong)} wrong products, e.g. {wrong[:8]}"


@pytest.mark.parametrize("features", [(64, 1), (1, 64)], ids=["out_features=1", "in_features=1"])
def test_a_linear_with_one_input_or_one_output_is_the_spec(cpu_route, features):
    """A value head (out_features=1) and its transpose (in_features=1): forward and INT8 backward equal spec §1's
    formulas (docs/numerics.md#backward) computed here in float64 from ``tests/spec_reference.py``. On the
    ``torch._int_mm`` route the head's weight gradient was garbage (relative error ~1e5), and so was the forward
    of ``in_features=1``."""
    torch.manual_seed(0)
    layer = nn.Linear(*features)
    w, bias = layer.weight.detach().clone(), layer.bias.detach().clone()
    quantize_(layer, bitnet_training())
    x = torch.randn(40, features[0], requires_grad=True)
    grad_y = torch.randn(40, features[1])
    y = layer(x)
    y.backward(grad_y)

    x_q, s_x = act_quant(x.detach())
    w_q, s_w = ternary_weight(w)
    g_q, s_g = act_quant(grad_y, eps=GRADIENT_EPS)  # per token
    gs_q, s_gs = act_quant((grad_y * s_x[:, None]).t(), eps=GRADIENT_EPS)  # per output, s_x folded in
    expected_y = (x_q.double() @ w_q.double().t()) * s_x.double()[:, None] * s_w.double() + bias.double()
    expected_grad_x = (g_q.double() @ w_q.double()) * s_g.double()[:, None] * s_w.double()
    expected_grad_w = (gs_q.double() @ x_q.double()) * s_gs.double()[:, None]
    torch.testing.assert_close(y.double(), expected_y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), expected_grad_x, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.weight.grad.double(), expected_grad_w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.bias.grad, grad_y.sum(0))


def test_onednn_limited_below_vnni_takes_int_mm_off_the_full_range_matmul(monkeypatch):
    """docs/kernels.md: with ONEDNN_MAX_CPU_ISA=AVX2 on a VNNI CPU, torch._int_mm runs oneDNN's AVX2 kernel, whose
    16-bit pair sums saturate on full-range operands; int_mm must then be neither measured nor forceable there."""
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert "int_mm" not in cpu_matmul.available_routes("full") and "int_mm" not in cpu_matmul.candidates("full")
    assert "int_mm" in cpu_matmul.available_routes("ternary")  # ternary sums stay far below 2**15
    with pytest.raises(ValueError, match="not available"):
        cpu_matmul._parse_forced("ternary=int_mm,full=int_mm")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert "int_mm" in cpu_matmul.available_routes("full")


def test_scaled_products_never_share_the_scratch_accumulator(cpu_route):
    """The int32 routes write a scaled matmul's product into one reused buffer per thread: a result must not alias
    it, whatever size, thread or inference mode comes next (float64 products of the same operands as reference)."""
    import threading

    def scaled(m: int, k: int, n: int, seed: int) -> tuple[Tensor, Tensor]:
        g = torch.Generator().manual_seed(seed)
        a, b = random_int8(m, k, generator=g), torch.randint(-1, 2, (k, n), dtype=torch.int8, generator=g)
        out = kernels.scaled_int8_mm(a, b, torch.ones(m), None, None, None, torch.float32, True)
        return out, (a.double() @ b.double()).float()

    big = scaled(96, 64, 80, 0)
    with torch.inference_mode():
        small = scaled(8, 64, 16, 1)
    bigger = scaled(128, 64, 96, 2)  # grows the buffer outside inference mode after it was used inside
    results: list[tuple[Tensor, Tensor]] = []
    threads = [threading.Thread(target=lambda s=s: results.append(scaled(64, 32, 48, s))) for s in (3, 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for out, expected in (big, small, bigger, *results):
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert len(results) == 2
