"""Exact int8 x int8 matmuls on CPU: one route per CPU, chosen once.

``torch._int_mm`` is fast only where oneDNN has int8 dot-product instructions (AVX-512 VNNI, AVX-VNNI, AMX); on
an AVX2-only CPU it falls back to scalar code (~2 GOPS, 60x slower than an FP32 matmul). Three exact routes cover
the rest (docs/benchmarks.md has the measurements):

- ``"int_mm"``: ``torch._int_mm``. The default where the CPU has VNNI or AMX.
- ``"onednn"``: oneDNN's u8 x s8 linear (``torch.ops.onednn.qlinear_pointwise``) with the int8 left operand
  shifted to u8 (``a + 128``, zero point 128). On CPUs without VNNI it multiplies with ``vpmaddubsw``, whose
  int16 pair sums saturate unless the s8 operand is small, so it is exact only when ``b`` is ternary: the
  forward and ``grad_input`` matmuls. Its float32 output holds the integer sums exactly (``|sum| <= 128 K``,
  below 2**24 for K up to 131072). The default for ternary operands on CPUs without VNNI/AMX.
- ``"fp32"``: an FP32 GEMM of the integer values, exact while every partial sum stays below 2**24: products are
  at most 2**14, so the reduction is cut into blocks of 1024 and the blocks are added in int32. The default for
  the full-range ``grad_weight`` matmul (``g_q.T @ x_q``) on CPUs without VNNI/AMX, and for everything on CPUs
  with neither route (then it runs at about FP32 speed: a one-time warning says so).
- ``"reference"``: float64, the contract itself; slow, for tests.

``BITNET_AO_CPU_INT8_ROUTE`` forces a route: one name for every matmul it can compute exactly (``onednn`` leaves
the full-range matmul to the CPU's default), or ``ternary=ROUTE,full=ROUTE``. :func:`routes` reports the choice.
"""

from __future__ import annotations

import functools
import os
import platform
import warnings

import torch
from torch import Tensor

from ..private_api import cpu_has_int8_dot_product, int_mm, onednn_int8_linear, onednn_int8_linear_available
from . import reference

ROUTES = ("int_mm", "onednn", "fp32", "reference")

#: Largest reduction an FP32 GEMM of full-range int8 values sums exactly: 1024 products of at most 2**14.
FP32_EXACT_BLOCK = 1 << 10
#: Largest reduction with a ternary operand whose sum (at most 128 per term) stays exact in float32.
FP32_EXACT_TERNARY = 1 << 17

ENV_VAR = "BITNET_AO_CPU_INT8_ROUTE"


def _onednn_available() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64") and onednn_int8_linear_available()


@functools.cache
def routes() -> dict[str, str]:
    """``{"ternary": route, "full": route}``: the route for matmuls whose right operand is ternary (forward,
    ``grad_input``) and for full-range ones (``grad_weight``). Chosen once per process, from the CPU's
    capabilities or ``BITNET_AO_CPU_INT8_ROUTE``."""
    if cpu_has_int8_dot_product():
        default = {"ternary": "int_mm", "full": "int_mm"}
    elif _onednn_available():
        default = {"ternary": "onednn", "full": "fp32"}
    else:
        default = {"ternary": "fp32", "full": "fp32"}
    forced = os.environ.get(ENV_VAR)
    if forced:
        return _forced_routes(forced, default)
    if default["ternary"] == "fp32":
        warnings.warn(
            f"bitnet_ao: this CPU ({platform.machine()}, torch capability "
            f"{torch.backends.cpu.get_cpu_capability()}) has no fast int8 matmul (no VNNI/AMX, no oneDNN u8s8 "
            "kernels); BitNet's INT8 matmuls run as exact FP32 GEMMs, about as fast as FP32 training.",
            stacklevel=2,
        )
    return default


def _forced_routes(value: str, default: dict[str, str]) -> dict[str, str]:
    """``BITNET_AO_CPU_INT8_ROUTE``: one route for both kinds of matmul, or ``ternary=ROUTE,full=ROUTE``."""
    if "=" in value:
        chosen = dict(item.split("=", 1) for item in value.split(","))
    else:
        # oneDNN is exact for a full-range right operand only with VNNI's int32 dot products.
        chosen = {"ternary": value, "full": value if value != "onednn" else default["full"]}
    if set(chosen) != {"ternary", "full"} or not set(chosen.values()) <= set(ROUTES) or chosen["full"] == "onednn":
        raise ValueError(
            f"{ENV_VAR}={value!r}: expected one of {', '.join(ROUTES)}, or ternary=ROUTE,full=ROUTE "
            "(full: int_mm, fp32 or reference; oneDNN is exact only for ternary operands on every CPU)"
        )
    if chosen["ternary"] == "onednn" and not _onednn_available():
        raise ValueError(f"{ENV_VAR}={value!r}: oneDNN's int8 linear is not available on {platform.machine()}")
    return chosen


def right_operand_k_contiguous() -> bool:
    """Whether the ternary-operand route wants ``b`` contiguous along the reduction (oneDNN's ``(N, K)`` weight)
    rather than row-major ``(K, N)`` (``torch._int_mm``, ~1.7x faster that way)."""
    return routes()["ternary"] == "onednn"


def int8_mm(a: Tensor, b: Tensor, b_ternary: bool) -> Tensor:
    """Exact ``a (M, K) @ b (K, N)`` of int8 operands through this CPU's route: int32, or float32 holding the
    exact integer values. ``b_ternary`` says ``b`` only holds {-1, 0, 1}, which the oneDNN route needs."""
    route = routes()["ternary" if b_ternary else "full"]
    m, k = a.shape
    n = b.shape[1]
    if m == 0 or n == 0 or k == 0:
        return a.new_zeros((m, n), dtype=torch.int32)
    if route == "int_mm":
        return int_mm(a, b)
    if route == "onednn" and k <= FP32_EXACT_TERNARY:
        return _onednn_mm(a, b)
    if route == "reference":
        return reference.int8_mm(a, b)
    return _fp32_mm(a, b, FP32_EXACT_TERNARY if b_ternary else FP32_EXACT_BLOCK)


def _onednn_mm(a: Tensor, b: Tensor) -> Tensor:
    # int8 -> uint8 + 128 is flipping the sign bit; oneDNN subtracts the zero point 128 back.
    a_u8 = a.contiguous().view(torch.uint8).bitwise_xor(0x80)
    return onednn_int8_linear(a_u8, 128, b.t().contiguous())


def _fp32_mm(a: Tensor, b: Tensor, block: int) -> Tensor:
    k = a.shape[1]
    if k <= block:
        return torch.mm(a.float(), b.float())
    out = torch.zeros((a.shape[0], b.shape[1]), dtype=torch.int32)
    for start in range(0, k, block):
        part = torch.mm(a[:, start : start + block].float(), b[start : start + block].float())
        out += part.to(torch.int32)
    return out
