"""Exact int8 x int8 matmuls on CPU: one route per kind of matmul, chosen by measuring the candidates on this CPU.

Two kinds: ``"ternary"`` (the right operand holds only {-1, 0, 1}: the forward and ``grad_input`` of a BitNet
linear) and ``"full"`` (full-range int8 on both sides: ``grad_weight = g'_q.T @ x_q``). The exact routes:

- ``"int_mm"``: ``torch._int_mm``, oneDNN's s8 x s8 GEMM. Fast only with int8 dot-product instructions (AVX-512
  VNNI, AVX-VNNI, AMX); elsewhere it is scalar code (~2 GOPS, 30-60x slower than FP32), so it is a candidate only
  on CPUs that have them.
- ``"vnni"``: the GEMM of ``cpu_vnni_gemm.c`` (AVX-512 VNNI), whose scaled form fuses the epilogue: the int32 sums
  never reach memory. Both kinds (the right operand shifted to unsigned bytes, by one or by 128).
- ``"amx"``: the same kernel, operand packing and epilogue with the sums computed by Intel AMX tiles (Sapphire
  Rapids and later, where the OS grants the tile state). Both kinds; where ``torch._int_mm`` leaves AMX mostly idle
  (torch 2.13.0: 1.7-1.9 TOPS on 2 cores of a Sapphire Rapids without its epilogue, 3.2-4.0 here with it).
- ``"onednn"``: oneDNN's u8 x s8 linear (``torch.ops.onednn.qlinear_pointwise``) with the int8 left operand
  shifted to u8 (``a + 128``, zero point 128). Without VNNI it multiplies with ``vpmaddubsw``, whose int16 pair
  sums saturate unless the s8 operand is small: exact for ternary right operands only. Its float32 output holds
  the integer sums exactly (``|sum| <= 128 K``, below 2**24 for K up to 131072).
- ``"signadd"``: the multiply-free ternary GEMM of ``cpu_sign_gemm.c`` (sign application and additions), for
  CPUs whose int8 multiplies are no faster than FP32 FMAs (AMD Zen 1). Ternary only; x86 with AVX2.
- ``"fp32"``: an FP32 GEMM of the integer values, exact while every partial sum stays below 2**24: products are
  at most 2**14, so a full-range reduction is cut into blocks of 1024 and the blocks are added in int32. Always a
  candidate, so the chosen route is never slower than an FP32 GEMM of the same shape.
- ``"reference"``: float64, the contract itself; slow, for tests. Never chosen.

:func:`routes` measures the candidates once per machine (a fraction of a second to a few seconds, at first use) on
the shapes of :data:`PROBE_SHAPES`, keeps the fastest of each kind and caches the choice on disk, keyed by the CPU
model, the thread count, the torch and kernel versions (``BITNET_AO_CACHE_DIR``). ``BITNET_AO_CPU_INT8_ROUTE``
forces a route: one name for every kind it computes exactly (``onednn`` and ``signadd`` leave the
full-range matmul to measurement), or ``ternary=ROUTE,full=ROUTE``. :func:`route_report` says what was chosen and why.

Every route runs with autocast disabled: an enclosing ``torch.autocast("cpu", dtype=torch.bfloat16)`` would
otherwise run the FP32 route's ``torch.mm`` in BF16, and the sums would no longer be exact.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import cpu_build, cpu_passes, cpu_sign_gemm, cpu_vnni_gemm, reference
from .private_api import (
    cpu_has_int8_dot_product,
    int_mm,
    onednn_int8_linear,
    onednn_int8_linear_available,
    onednn_int8_prepack,
    onednn_isa_below_vnni,
    outside_dispatch_modes,
)
from .ranges import GEMM_RANGE_PREFIX, kernel_range
from .scratch import ThreadScratch

ROUTES = ("int_mm", "vnni", "amx", "onednn", "signadd", "fp32", "reference")
#: The routes exact for each kind of matmul, on any CPU.
EXACT_ROUTES = {"ternary": ROUTES, "full": ("int_mm", "vnni", "amx", "fp32", "reference")}
#: The routes that can write their int32 product into a given tensor (the scratch :func:`accumulator`).
INT32_OUT_ROUTES = ("int_mm", "vnni", "amx", "signadd")
#: The routes whose right operand is best contiguous along the reduction (a ``.t()`` view of ``(N, K)``).
K_CONTIGUOUS_ROUTES = ("onednn", "signadd", "fp32", "reference")
#: The routes as fast with either layout of the right operand.
EITHER_LAYOUT_ROUTES = ("int_mm", "vnni", "amx")

#: Largest reduction an FP32 GEMM of full-range int8 values sums exactly: 1024 products of at most 2**14.
FP32_EXACT_BLOCK = 1 << 10
#: Largest reduction with a ternary operand whose sum (at most 128 per term) stays exact in float32.
FP32_EXACT_TERNARY = 1 << 17

ENV_VAR = "BITNET_AO_CPU_INT8_ROUTE"

#: ``(M, K, N)`` of the matmuls each kind is measured on: the forward and grad_input of a 1024 x 2816 linear (an MLP
#: of the main job's model) at 2048 tokens, a training step's worth of tokens for a micro-batch, and its grad_weight.
#: Each route is timed the way training calls it, with its conversions and oneDNN's per-call prepack included.
#: At 1024 tokens oneDNN and torch._int_mm were within a few percent on a Zen 4 and the order flipped between runs,
#: while at 2048-4096 tokens torch._int_mm is 1.25-1.3x faster there; at 512 tokens the order of two AVX2 routes
#: could differ from the order at training sizes (Zen 3: signadd ahead at 512, oneDNN at 1024+).
PROBE_SHAPES = {
    "ternary": ((2048, 1024, 2816), (2048, 2816, 1024)),
    "full": ((2816, 2048, 1024),),
}
#: Timed runs of each candidate on each probe shape (after one warm-up); the median counts.
PROBE_REPEATS = 3
#: Routes whose scaled matmul never writes its int32 product (the epilogue in registers), and the margin within
#: which one of them wins against a faster measured route (:func:`fastest`); the probe's run-to-run spread on a
#: Zen 4 is a few percent.
FUSED_ROUTES = ("vnni", "amx")
PROBE_TIE = 0.05


def _onednn_available() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64") and onednn_int8_linear_available()


def available_routes(kind: str) -> tuple[str, ...]:
    """The exact routes of ``kind`` this machine can run."""
    usable = {
        "int_mm": kind == "ternary" or not onednn_isa_below_vnni(),
        "vnni": cpu_vnni_gemm.available(),
        "amx": cpu_vnni_gemm.amx_available(),
        "onednn": _onednn_available(),
        "signadd": cpu_sign_gemm.available(),
        "fp32": True,
        "reference": True,
    }
    return tuple(r for r in EXACT_ROUTES[kind] if usable[r])


def candidates(kind: str) -> tuple[str, ...]:
    """The routes :func:`routes` measures for ``kind``: every exact route this machine runs fast enough to time
    (not the float64 reference; ``int_mm`` only with int8 dot-product instructions)."""
    skip = {"reference"} | (set() if cpu_has_int8_dot_product() else {"int_mm"})
    return tuple(r for r in available_routes(kind) if r not in skip)


def routes() -> dict[str, str]:
    """``{"ternary": route, "full": route}``, chosen once per process (see the module docstring)."""
    return {kind: entry["route"] for kind, entry in route_report().items()}


@functools.cache
def route_report() -> dict[str, dict]:
    """For each kind: ``{"route": chosen, "how": "forced" | "measured" | "cached", "gops": {candidate: measured
    GOPS}}`` (``gops`` empty for a forced route)."""
    forced = _parse_forced(os.environ.get(ENV_VAR, ""))
    report = {kind: {"route": route, "how": "forced", "gops": {}} for kind, route in forced.items()}
    missing = [kind for kind in EXACT_ROUTES if kind not in report]
    if missing:
        report.update({kind: _measured_choice(kind) for kind in missing})
    if report["ternary"]["route"] == "fp32" and report["ternary"]["how"] != "forced":
        warnings.warn(
            f"bitnet_ao: on this CPU ({platform.machine()}, torch capability "
            f"{torch.backends.cpu.get_cpu_capability()}) no int8 matmul route measured faster than an FP32 GEMM; "
            "BitNet's INT8 matmuls run as exact FP32 GEMMs, about as fast as FP32 training.",
            stacklevel=2,
        )
    return report


def _parse_forced(value: str) -> dict[str, str]:
    """``BITNET_AO_CPU_INT8_ROUTE``: one route for every kind it is exact for, or ``ternary=ROUTE,full=ROUTE``."""
    if not value:
        return {}
    if "=" in value:
        chosen = dict(item.split("=", 1) for item in value.split(","))
        valid = set(chosen) == set(EXACT_ROUTES) and all(chosen[k] in EXACT_ROUTES[k] for k in chosen)
    else:
        chosen = {kind: value for kind in EXACT_ROUTES if value in EXACT_ROUTES[kind]}
        valid = value in ROUTES
    if not valid:
        raise ValueError(
            f"{ENV_VAR}={value!r}: expected one of {', '.join(ROUTES)}, or ternary=ROUTE,full=ROUTE "
            f"(full: {', '.join(EXACT_ROUTES['full'])}; onednn and signadd are exact only for ternary operands)"
        )
    for kind, route in chosen.items():
        if route not in available_routes(kind):
            raise ValueError(f"{ENV_VAR}={value!r}: route {route!r} is not available on this machine")
    return chosen


# --- measuring the candidates --------------------------------------------------------------------------------


def _cache_key() -> str:
    parts = [
        cpu_build.cpu_signature(),
        f"threads={torch.get_num_threads()}",
        f"torch={torch.__version__}",
        f"capability={torch.backends.cpu.get_cpu_capability()}",
        f"onednn_isa={os.environ.get('ONEDNN_MAX_CPU_ISA', '')}",
        cpu_sign_gemm.SOURCE.read_text(),
        cpu_vnni_gemm.SOURCE.read_text(),
        # This file: a change to a route or to the probe invalidates the choice.
        Path(__file__).read_text(),
    ]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:20]


def _cache_file() -> Path:
    return cpu_build.cache_dir() / "cpu_int8_routes.json"


def _measured_choice(kind: str) -> dict:
    key = f"{kind}-{_cache_key()}"
    try:
        cached = json.loads(_cache_file().read_text()).get(key)
    except (OSError, ValueError):
        cached = None
    if cached is not None and cached["route"] in available_routes(kind):
        return {**cached, "how": "cached"}
    with outside_dispatch_modes():  # real tensors, also when a torch.compile trace asks first
        gops = measure(kind)
    entry = {"route": fastest(gops), "gops": gops}
    _store(key, entry)
    return {**entry, "how": "measured"}


def fastest(gops: dict[str, float]) -> str:
    """The route to take from measured GOPS: the fastest, except that a route fusing its epilogue (:data:`FUSED_ROUTES`)
    wins a tie within :data:`PROBE_TIE`. The probe keeps its operands, output and int32 scratch in cache from run to
    run, where training finds them out of cache and pays for the int32 product a route writes and its epilogue reads
    back; the fused route also lets training pack grad_weight's operand in the forward (``pack_operand``)."""
    best = max(gops, key=gops.get)
    fused = [r for r in FUSED_ROUTES if r in gops and gops[r] >= gops[best] * (1 - PROBE_TIE)]
    return fused[0] if fused else best


def _store(key: str, entry: dict) -> None:
    path = _cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            table = json.loads(path.read_text())
        except (OSError, ValueError):
            table = {}
        table[key] = entry
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
            json.dump(table, f, indent=1)
        os.replace(f.name, path)  # atomic: ranks measuring at once never read half a file
    except OSError:
        pass  # an unwritable cache: measure again next time


def measure(kind: str, shapes: tuple[tuple[int, int, int], ...] | None = None) -> dict[str, float]:
    """GOPS of each candidate route of ``kind`` on ``shapes`` (default :data:`PROBE_SHAPES`), each operand in the
    layout the route gets in training; the median of :data:`PROBE_REPEATS` runs, the candidates interleaved so that
    a slower moment of the machine hurts all of them alike."""
    shapes = shapes or PROBE_SHAPES[kind]
    names = candidates(kind)
    g = torch.Generator().manual_seed(0)
    problems = []
    for m, k, n in shapes:
        if kind == "ternary":
            a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
            b_nk = torch.randint(-1, 2, (n, k), dtype=torch.int8, generator=g)
            layouts = {r: ternary_layout(b_nk.t(), r) for r in names}
            problems.append((a, layouts, 2 * m * k * n))
        else:  # grad_weight: a = g'_q.T, the transposed view of a row-major (K_red, M) tensor
            a = torch.randint(-127, 128, (k, m), dtype=torch.int8, generator=g).t()
            b = torch.randint(-127, 128, (k, n), dtype=torch.int8, generator=g)
            problems.append((a, dict.fromkeys(names, b), 2 * m * k * n))
    seconds: dict[str, list[float]] = {r: [0.0] * PROBE_REPEATS for r in names}
    ternary = kind == "ternary"
    for a, layouts, _ in problems:
        row_scale, scale = torch.rand(a.shape[0], generator=g), torch.rand(1, generator=g)
        for r in names:
            _probe_scaled_mm(r, a, layouts[r], ternary, row_scale, scale)  # warm-up: oneDNN builds its kernels
        for rep in range(PROBE_REPEATS):
            for r in names:
                start = time.perf_counter()
                _probe_scaled_mm(r, a, layouts[r], ternary, row_scale, scale)
                seconds[r][rep] += time.perf_counter() - start
    ops = sum(p[2] for p in problems)
    return {r: round(ops / statistics.median(seconds[r]) / 1e9, 1) for r in names}


def _probe_scaled_mm(route: str, a: Tensor, b: Tensor, b_ternary: bool, row_scale: Tensor, scale: Tensor) -> Tensor:
    """A scaled matmul as training runs it by ``route``: the product and then the epilogue (the product in the
    scratch accumulator where the route writes int32), or the one fused kernel; to bfloat16 activations for a
    ternary ``b``, to a float32 weight gradient for a full-range one."""
    out_dtype = torch.bfloat16 if b_ternary else torch.float32
    if route in FUSED_ROUTES:
        return cpu_vnni_gemm.scaled_mm(a, b, row_scale, None, scale, None, out_dtype, b_ternary=b_ternary,
                                       amx=route == "amx")  # fmt: skip
    out = accumulator(a.shape[0], b.shape[1]) if route in INT32_OUT_ROUTES else None
    acc = _route_mm(route, a, b, b_ternary, out)
    return cpu_passes.scale_output(acc, row_scale, None, scale, None, out_dtype)


# --- the matmul ------------------------------------------------------------------------------------------------


def fused_scaled_mm(
    a: Tensor,
    b: Tensor,
    b_ternary: bool,
    row_scale: Tensor | None,
    col_scale: Tensor | None,
    scale: Tensor | None,
    bias: Tensor | None,
    out_dtype: torch.dtype,
    b_packed: bool = False,
) -> Tensor | None:
    """``reference.scale_output(a @ b, ...)`` in one kernel where this CPU's route for ``b``'s kind fuses the
    epilogue (:data:`FUSED_ROUTES`), else ``None``: the caller then runs :func:`int8_mm` and the epilogue.
    ``b_packed``: ``b`` is a ternary weight ``B (N, K)`` packed two bits per value and the product is ``a @ B.T``,
    read packed (``cpu_vnni_gemm.scaled_mm_i2``)."""
    n = b.shape[0] if b_packed else b.shape[1]
    route = routes()["ternary" if b_ternary else "full"]
    if (
        route not in FUSED_ROUTES
        or not cpu_vnni_gemm.epilogue_applies(row_scale, col_scale, scale, out_dtype)
        or 0 in (*a.shape, n)
    ):
        return None
    with torch.autocast("cpu", enabled=False):
        if b_packed:
            return cpu_vnni_gemm.scaled_mm_i2(a, b, row_scale, col_scale, scale, bias, out_dtype, amx=route == "amx")
        return cpu_vnni_gemm.scaled_mm(a, b, row_scale, col_scale, scale, bias, out_dtype, b_ternary=b_ternary,
                                       amx=route == "amx")  # fmt: skip


@torch.compiler.assume_constant_result
def prepacks(b_ternary: bool) -> bool:
    """Whether this CPU's route for the kind of ``b`` takes a right operand packed ahead of time (``"vnni"`` and
    ``"amx"``: ``cpu_vnni_gemm.pack``), which spares its matmul the packing. A constant of compiled graphs, as
    :func:`right_operand_k_contiguous`."""
    return routes()["ternary" if b_ternary else "full"] in FUSED_ROUTES


def uses_amx(b_ternary: bool) -> bool:
    """Whether this CPU's route for the kind of ``b`` is ``"amx"``: its packed operands are multiplied by AMX."""
    return routes()["ternary" if b_ternary else "full"] == "amx"


def ternary_layout(b: Tensor, route: str) -> Tensor:
    """The ternary right operand ``b (K, N)`` laid out as the BitNet weight writes it for ``route``: contiguous
    along the reduction (a ``.t()`` view of a row-major ``(N, K)``) or row-major."""
    if route in K_CONTIGUOUS_ROUTES:
        return b if b.stride(0) == 1 else b.t().contiguous().t()
    return b.contiguous()


@torch.compiler.assume_constant_result
def right_operand_either_layout() -> bool:
    """Whether the ternary-operand route runs as fast with ``b`` contiguous along the reduction as row-major:
    ``torch._int_mm`` (13.6 ms either way for 2048 x 1024 x 2816 on a Zen 4, torch 2.13.0), so the weight is
    ternarized without a transposition for both the forward and grad_input. A constant of compiled graphs, as
    :func:`right_operand_k_contiguous`."""
    return routes()["ternary"] in EITHER_LAYOUT_ROUTES


@torch.compiler.assume_constant_result
def right_operand_k_contiguous() -> bool:
    """Whether the ternary-operand route wants ``b`` contiguous along the reduction (a transposed view of a
    row-major ``(N, K)``) rather than row-major ``(K, N)``.

    torch.compile traces the weight's layout choice and may be the first to ask: the route is then measured
    eagerly, outside the graph, and the answer is a constant of the compiled graph (it is one per process)."""
    return routes()["ternary"] in K_CONTIGUOUS_ROUTES


def int8_mm(a: Tensor, b: Tensor, b_ternary: bool, scratch: bool = False) -> Tensor:
    """Exact ``a (M, K) @ b (K, N)`` of int8 operands through this CPU's route: int32, or float32 holding the
    exact integer values. ``b_ternary`` says ``b`` only holds {-1, 0, 1}, which ``onednn`` and ``signadd`` need.

    ``scratch=True``: the caller reads the product before its next call on this thread and keeps nothing of it (the
    epilogue of a scaled matmul), so the int32 routes write it into this thread's :func:`accumulator`."""
    m, k = a.shape
    n = b.shape[1]
    if m == 0 or n == 0 or k == 0:
        return a.new_zeros((m, n), dtype=torch.int32)
    route = routes()["ternary" if b_ternary else "full"]
    out = accumulator(m, n) if scratch and route in INT32_OUT_ROUTES else None  # the others allocate their own
    return _route_mm(route, a, b, b_ternary, out)


_ACCUMULATOR = ThreadScratch(torch.int32)


def accumulator(m: int, n: int) -> Tensor:
    """An ``(m, n)`` int32 view of this thread's scratch product (``kernels/scratch.py``: why, and the rules)."""
    return _ACCUMULATOR.get(m * n).view(m, n)


def _route_mm(route: str, a: Tensor, b: Tensor, b_ternary: bool, out: Tensor | None = None) -> Tensor:
    """``a @ b`` by ``route``; the routes of :data:`INT32_OUT_ROUTES` write into ``out`` where given.

    Each route's GEMM runs in a :func:`_gemm_range`, its packing, conversions and prepacks outside it: a step profile
    (``benchmarks/step_profile.py``) counts the range as the int8 matmul and the rest as BitNet's passes."""
    with torch.autocast("cpu", enabled=False):
        if route == "int_mm":
            a, b = _int_mm_operand(a), _int_mm_operand(b)
            with _gemm_range(route):
                return int_mm(a, b, out)
        if route == "onednn" and a.shape[1] <= FP32_EXACT_TERNARY:
            return _onednn_mm(a, b)
        if route in FUSED_ROUTES:  # the range is the C kernel's, around the GEMM and its fused epilogue
            return cpu_vnni_gemm.scaled_mm(a, b, out=out, b_ternary=b_ternary, amx=route == "amx")
        if route == "signadd":
            with _gemm_range(route):
                return cpu_sign_gemm.ternary_mm(a, b, out)
        if route == "reference":
            return reference.int8_mm(a, b)
        return _fp32_mm(a, b, FP32_EXACT_TERNARY if b_ternary else FP32_EXACT_BLOCK)


def _gemm_range(route: str) -> Any:
    """The range around ``route``'s GEMM (``kernels/ranges.py``)."""
    return kernel_range(f"{GEMM_RANGE_PREFIX}:{route}")


def _int_mm_operand(t: Tensor) -> Tensor:
    """``t`` as ``torch._int_mm`` reads it correctly on CPU: unchanged when its strides are a valid GEMM layout,
    else a row-major copy.

    With VNNI, torch 2.13.0 passes a strided operand to oneDNN's ``gemm_s8s8s32`` as row-major when ``stride(1) ==
    1`` (leading dimension ``stride(0)``), else as column-major (leading dimension ``stride(1)``), whatever the
    sizes. A size-1 dimension may carry any stride: ``w.t()`` of a ``(3, 1)`` weight has strides ``(1, 1)``, the
    leading dimension 1 is shorter than the row of 3, oneDNN refuses the call, and torch ignores the error and
    returns its output buffer unwritten (docs/kernels.md). Such a view already counts as contiguous, so
    ``.contiguous()`` would return it as it is; a clone gets fresh strides. Only operands with a size-1, broadcast
    or otherwise non-dense dimension are copied (a row or a column in a BitNet linear), never a normal one."""
    rows, cols = t.shape
    row_major = t.stride(1) == 1  # how torch reads it; else as column-major
    valid = t.stride(0) >= max(cols, 1) if row_major else t.stride(0) == 1 and t.stride(1) >= max(rows, 1)
    return t if valid else t.clone(memory_format=torch.contiguous_format)


def _onednn_mm(a: Tensor, b: Tensor) -> Tensor:
    # int8 -> uint8 + 128 is flipping the sign bit; oneDNN subtracts the zero point 128 back.
    a_u8 = a.contiguous().view(torch.uint8).bitwise_xor(0x80)
    packed = onednn_int8_prepack(b.t().contiguous())
    with _gemm_range("onednn"):
        return onednn_int8_linear(a_u8, 128, packed, b.shape[1])


def _fp32_mm(a: Tensor, b: Tensor, block: int) -> Tensor:
    k = a.shape[1]
    if k <= block:
        a32, b32 = a.float(), b.float()
        with _gemm_range("fp32"):
            return torch.mm(a32, b32)
    out = torch.zeros((a.shape[0], b.shape[1]), dtype=torch.int32)
    for start in range(0, k, block):
        a32, b32 = a[:, start : start + block].float(), b[start : start + block].float()
        with _gemm_range("fp32"):
            part = torch.mm(a32, b32)
        out += part.to(torch.int32)
    return out
