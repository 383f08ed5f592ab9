"""Every CPU int8 matmul route gives the exact integer product, on whatever CPU the tests run on.

The exact product of int8 operands is computed here in float64 (every such sum with fewer than 2**39 terms is an
integer float64 holds exactly), independently of the routes under test.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torchao.quantization import quantize_

from bitnet_ao import bitnet_training
from bitnet_ao.kernels import cpu_matmul
from tests.conftest import random_int8

FULL_RANGE_ROUTES = ("int_mm", "fp32", "reference")  # exact for any int8 operands on every CPU


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
    force_routes(route, "reference")
    a, b = _operands(37, k, 29, ternary=True, extreme=extreme)
    for b_layout in (b, b.t().contiguous().t()):  # row-major and K-contiguous
        out = cpu_matmul.int8_mm(a, b_layout, b_ternary=True)
        assert torch.equal(out.double(), _exact(a, b)), (route, b_layout.stride())


@pytest.mark.parametrize("route", FULL_RANGE_ROUTES)
@pytest.mark.parametrize("extreme", [False, True], ids=["random", "extreme"])
def test_full_range_operands_are_exact_beyond_one_fp32_block(force_routes, route, extreme):
    """K = 3000 > 1024, so the FP32 route must split the reduction (the extreme case fails without it)."""
    force_routes("reference", route)
    a, b = _operands(9, 3000, 11, ternary=False, extreme=extreme)
    out = cpu_matmul.int8_mm(a.t().contiguous().t(), b, b_ternary=False)  # a as the TN layout's transposed view
    assert torch.equal(out.double(), _exact(a, b)), route


@pytest.mark.parametrize("route", cpu_matmul.ROUTES)
def test_empty_shapes(force_routes, route):
    force_routes(route, route if route != "onednn" else "reference")
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

    expected = step("reference", "reference")
    got = step(route, route if route != "onednn" else "reference")
    for e, g in zip(expected, got, strict=True):
        assert torch.equal(e, g), route


def test_env_var_forces_a_route(monkeypatch):
    cpu_matmul.routes.cache_clear()
    try:
        monkeypatch.setenv(cpu_matmul.ENV_VAR, "fp32")
        assert cpu_matmul.routes() == {"ternary": "fp32", "full": "fp32"}
        cpu_matmul.routes.cache_clear()
        monkeypatch.setenv(cpu_matmul.ENV_VAR, "onednn")
        if cpu_matmul._onednn_available():
            # oneDNN is not exact for the full-range grad_weight without VNNI: that one keeps the CPU's default.
            assert cpu_matmul.routes()["ternary"] == "onednn"
            assert cpu_matmul.routes()["full"] in ("int_mm", "fp32")
        cpu_matmul.routes.cache_clear()
        monkeypatch.setenv(cpu_matmul.ENV_VAR, "ternary=reference,full=fp32")
        assert cpu_matmul.routes() == {"ternary": "reference", "full": "fp32"}
        for bad in ("int4", "ternary=int_mm", "ternary=int_mm,full=onednn"):
            cpu_matmul.routes.cache_clear()
            monkeypatch.setenv(cpu_matmul.ENV_VAR, bad)
            with pytest.raises(ValueError, match=f"BITNET_AO_CPU_INT8_ROUTE='{bad}': expected one of"):
                cpu_matmul.routes()
    finally:
        cpu_matmul.routes.cache_clear()


def test_cpu_without_fast_int8_warns_once_and_stays_exact(monkeypatch):
    monkeypatch.delenv(cpu_matmul.ENV_VAR, raising=False)
    monkeypatch.setattr(cpu_matmul, "cpu_has_int8_dot_product", lambda: False)
    monkeypatch.setattr(cpu_matmul, "_onednn_available", lambda: False)
    cpu_matmul.routes.cache_clear()
    try:
        with pytest.warns(UserWarning, match="no fast int8 matmul.*FP32"):
            assert cpu_matmul.routes() == {"ternary": "fp32", "full": "fp32"}
        a, b = _operands(5, 2000, 6, ternary=False, extreme=True)
        assert torch.equal(cpu_matmul.int8_mm(a, b, b_ternary=False).double(), _exact(a, b))
    finally:
        cpu_matmul.routes.cache_clear()


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
