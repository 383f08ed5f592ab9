"""The multiply-free ternary GEMM on CPU (``cpu_sign_gemm.c``): the ``"signadd"`` int8 matmul route.

``a (M, K) @ b (K, N)`` with ``b`` ternary, exactly in int32, by sign application and additions only (the C file
says how). It exists for CPUs where int8 multiplies are no faster than FP32 FMAs (AMD Zen 1's 128-bit datapaths);
``cpu_matmul.py`` offers it as a route candidate on every AVX2 CPU and keeps it where it measures fastest. Built for
the machine on first use (``cpu_build.py``); without a compiler or without AVX2 it is not available.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
from torch import Tensor

from . import cpu_build

SOURCE = Path(__file__).with_name("cpu_sign_gemm.c")


@functools.cache
def _library() -> ctypes.CDLL | None:
    library = cpu_build.load(SOURCE)
    if library is None or not library.bitnet_sign_gemm_available():
        return None
    library.bitnet_sign_gemm.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64]
    library.bitnet_sign_gemm.argtypes += [ctypes.c_void_p] + [ctypes.c_int64] * 4
    library.bitnet_sign_gemm.restype = ctypes.c_int
    return library


def available() -> bool:
    """Whether the kernel is built for this CPU (AVX2 and a C compiler; building it on the first call)."""
    return _library() is not None


def ternary_mm(a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
    """Exact ``a (M, K) @ b (K, N)`` in int32 for int8 ``a`` and ternary int8 ``b``, into ``out`` (a contiguous
    ``(M, N)`` int32 tensor) where given. Fastest with ``b`` contiguous along K (a ``.t()`` view of a row-major
    ``(N, K)``); other layouts are copied to it first."""
    library = _library()
    if library is None:
        raise RuntimeError("bitnet_ao: the signadd route needs an x86 CPU with AVX2 and a working C compiler")
    if a.stride(1) != 1:
        a = a.contiguous()
    bt = b.t()
    if bt.stride(1) != 1:
        bt = bt.contiguous()
    m, k = a.shape
    n = bt.shape[0]
    if out is None:
        out = torch.empty((m, n), dtype=torch.int32)
    failed = library.bitnet_sign_gemm(
        a.data_ptr(), a.stride(0), bt.data_ptr(), bt.stride(0), out.data_ptr(), m, n, k, torch.get_num_threads()
    )
    if failed:
        raise MemoryError(f"bitnet_ao signadd matmul: out of memory for ({m}, {k}) @ ({k}, {n})")
    return out
