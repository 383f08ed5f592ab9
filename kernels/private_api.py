"""Every private torch / Triton API the kernels rely on, in one place, each with the version it was checked on.

The custom ops, the CPU int8 matmul routes and the Triton launchers need a few internals that carry no stability
promise. Keeping them here means an upgrade is reviewed in one file, and ``tests/test_private_api.py`` checks each
behaviour the kernels depend on, so a torch or Triton release that changes one fails there, by name, instead of
deep inside a training step. This module imports nothing from bitnet_ao: ``kernels/`` is self-contained, and
``bitnet_ao/private_api.py`` holds the wrappers the rest of the package needs.

Checked on torch 2.13.0 and Triton 3.9.0 (:data:`CHECKED_ON`).
"""

from __future__ import annotations

import functools
import os
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

#: The releases every entry below was checked on.
CHECKED_ON = {"torch": "2.13.0", "triton": "3.9.0"}


def check(cond: Any, message: Callable[[], str]) -> None:
    """``torch._check(cond, message)`` (torch 2.13.0): raises ``RuntimeError`` with ``message()`` when ``cond`` is
    false, and records the condition as a guard on symbolic sizes, so the ops' input checks also hold inside a
    torch.compile trace and in the fake implementations (torch.library's guide for custom ops uses it). A plain
    ``True`` returns at once: eager calls check concrete sizes, and ``torch._check`` costs ~3 µs a call."""
    if cond is not True:
        torch._check(cond, message)


def dense_tensor(t: Tensor) -> bool:
    """Whether ``t`` is a plain dense CPU or CUDA tensor, nothing wrapped around or into it: its dispatch keys
    (torch 2.13.0: ``torch._C._dispatch_keys``) are those of a new tensor of its device, in or out of inference
    mode. A functorch wrapper (``vmap``, ``grad``), a functional tensor, a meta tensor or a ``__torch_dispatch__``
    subclass each carry another key, and only the dispatcher handles them."""
    if t.is_cpu:
        plain, inference = _plain_dispatch_keys("cpu")
    elif t.is_cuda:
        plain, inference = _plain_dispatch_keys("cuda")
    else:
        return False
    keys = torch._C._dispatch_keys(t)
    return keys in (plain, inference)


@functools.cache
def _plain_dispatch_keys(device_type: str) -> tuple:
    """The dispatch keys of a new tensor of ``device_type``, outside and inside inference mode (torch 2.13.0)."""
    with torch.inference_mode():
        inference = torch._C._dispatch_keys(torch.empty(0, device=device_type))
    with torch.inference_mode(False):
        return torch._C._dispatch_keys(torch.empty(0, device=device_type)), inference


def profiler_enabled() -> bool:
    """Whether a ``torch.profiler`` (or autograd profiler) session is recording on this thread (torch 2.13.0:
    ``torch.autograd._profiler_enabled``, 0.1 µs): opening a ``record_function`` range costs ~6 µs even with no
    profiler, so the ops that skip the dispatcher name themselves in a profile only when one records."""
    return torch.autograd._profiler_enabled()


def dispatch_mode_active() -> bool:
    """Whether a ``TorchDispatchMode`` (fake tensors, FLOP or communication counters, functionalization) is on the
    stack (torch 2.13.0: ``torch._C._len_torch_dispatch_stack``): such a mode must see a custom op as one op."""
    return torch._C._len_torch_dispatch_stack() > 0


def outside_dispatch_modes() -> Any:
    """Context manager that runs its block on real tensors with every ``TorchDispatchMode`` (fake tensors of a
    torch.compile trace included) taken off the stack (torch 2.13.0: ``torch.utils._python_dispatch.
    _disable_current_modes``): measuring the CPU's int8 routes may first happen while a compile traces."""
    from torch.utils._python_dispatch import _disable_current_modes

    return _disable_current_modes()


def with_own_code_object(fn: Callable) -> Callable:
    """A copy of the function ``fn`` with a code object of its own (``CodeType.replace()``, checked on Python 3.11).
    Dynamo keeps its compiled graphs per code object, at most ``torch._dynamo.config.recompile_limit`` (8) of them
    (torch 2.13.0), so a copy per variant of a body gives each variant its own cache."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def int_mm(a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
    """Exact int8 x int8 -> int32 matmul (torch 2.13.0: ``torch._int_mm``; on CPU fast only where oneDNN has
    VNNI / AMX kernels), into ``out`` (int32, ``(M, N)``) where given."""
    return torch._int_mm(a, b) if out is None else torch._int_mm(a, b, out=out)


def onednn_int8_linear_available() -> bool:
    """Whether oneDNN's int8 linear ops exist in this build (torch 2.13.0 x86 builds: ``torch.ops.onednn``)."""
    return hasattr(torch.ops.onednn, "qlinear_pointwise")


def onednn_int8_prepack(weight_s8: Tensor) -> Tensor:
    """``weight_s8`` (int8, ``(N, K)``) in oneDNN's blocked layout for :func:`onednn_int8_linear` (torch 2.13.0:
    ``torch.ops.onednn.qlinear_prepack``, the op inductor's int8 lowering uses)."""
    return torch.ops.onednn.qlinear_prepack(weight_s8, None)


def onednn_int8_linear(a_u8: Tensor, zero_point: int, packed: Tensor, n: int) -> Tensor:
    """``(a_u8 - zero_point) @ weight_s8.T`` as float32 from ``packed`` = :func:`onednn_int8_prepack` of the
    ``(n, K)`` ``weight_s8``, by oneDNN's u8 x s8 linear (torch 2.13.0: ``torch.ops.onednn.qlinear_pointwise``), with
    unit scales so the output is the integer sum itself."""
    ones, zeros = torch.ones(n), torch.zeros(n, dtype=torch.long)
    return torch.ops.onednn.qlinear_pointwise(
        a_u8, 1.0, zero_point, packed, ones, zeros, None, 1.0, 0, torch.float32, "none", [], ""
    )


def onednn_isa_below_vnni() -> bool:
    """Whether ``ONEDNN_MAX_CPU_ISA`` keeps oneDNN below its int8 dot-product kernels (an AVX2 emulation on an
    AVX-512 machine). On a VNNI CPU torch 2.13.0 still hands ``torch._int_mm`` to oneDNN's s8 x s8 GEMM, which then
    runs an AVX2 kernel whose 16-bit pair sums saturate: inexact for full-range operands (docs/kernels.md)."""
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    return (
        bool(isa)
        and isa != "ALL"
        and not isa.startswith(("AVX512_CORE_VNNI", "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX10"))
    )


def cpu_has_int8_dot_product() -> bool:
    """Whether oneDNN runs ``torch._int_mm`` with int8 dot-product instructions on this CPU (torch 2.13.0:
    ``torch.cpu._is_vnni_supported()`` for AVX-512 VNNI, ``torch.cpu._is_amx_tile_supported()`` for AMX), not kept
    below them by :func:`onednn_isa_below_vnni`."""
    return not onednn_isa_below_vnni() and (torch.cpu._is_vnni_supported() or torch.cpu._is_amx_tile_supported())


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies BF16 natively (torch 2.13.0: ``torch.cpu._is_avx512_bf16_supported()`` or
    AMX); without it a BF16 matmul falls back to scalar code, 30-80x slower than FP32. Next to
    :func:`cpu_has_int8_dot_product`, the other CPU capability the benchmarks report."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def triton_interpreting() -> bool:
    """Whether Triton kernels run in Triton's interpreter (Triton 3.9.0: ``triton.knobs.runtime.interpret``,
    read from ``TRITON_INTERPRET`` when a kernel is decorated)."""
    import triton

    return bool(triton.knobs.runtime.interpret)


def triton_compiler() -> tuple[type, type]:
    """``(ASTSource, GPUTarget)``: Triton's ahead-of-time compiler entry points (Triton 3.9.0), used by
    ``triton_aot_check`` to compile kernels for a GPU on a machine without one."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    return ASTSource, GPUTarget
