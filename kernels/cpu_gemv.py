"""The C kernels of packed inference on CPU (``cpu_gemv.c``), compiled for this CPU on first use: the decode-sized
matmul and linear, and unpacking.

Decoding one token multiplies a single activation row by every weight: the time goes into reading the weights.
A BF16 weight is 2 bytes per value; the packed ternary weight is 1/4 byte, but only a kernel that reads it packed
gains from that (unpacking to int8 first writes and reads a full byte per value, and inductor's code for the
fused expression is compute-bound at about BF16's speed). ``cpu_gemv.c`` is that kernel, in plain C that the
compiler vectorizes (VNNI dot products on AVX-512), plus a hand-written AVX2 dot product for CPUs without VNNI,
where the compiler's own code is ~3x slower (docs/kernels.md and docs/benchmarks.md have the measurements).

The source is built once per machine by ``cpu_build.py``. Without a working compiler every function here returns
``None`` (after a one-time warning) and the caller takes the torch path instead.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
from torch import Tensor

from . import cpu_build
from .reference import packed_columns

SOURCE = Path(__file__).with_name("cpu_gemv.c")
#: Largest M the decode kernel takes; larger matmuls unpack the weight and use the CPU's int8 matmul route.
MAX_M = 16
#: Largest K the kernel's int32 sums hold exactly (each term ``|u a| <= 2 * 128``).
MAX_K = 1 << 22


@functools.cache
def _library() -> ctypes.CDLL | None:
    library = cpu_build.load(SOURCE)
    if library is None:
        return None
    library.bitnet_packed_gemv.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 6
    library.bitnet_packed_gemv.restype = ctypes.c_int
    library.bitnet_unpack.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 5
    library.bitnet_unpack.restype = None
    f = library.bitnet_packed_linear
    f.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_double, ctypes.c_int64]
    f.argtypes += [ctypes.c_double, ctypes.c_void_p, ctypes.c_float]
    f.argtypes += [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p] + [ctypes.c_int64] * 6
    f.restype = ctypes.c_int
    return library


#: The dtype codes of cpu_gemv.c.
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def has_codes(*dtypes: torch.dtype) -> bool:
    """Whether :func:`packed_linear` takes inputs and outputs of these dtypes (each has a code)."""
    return all(d in _DTYPE_CODES for d in dtypes)


def available() -> bool:
    """Whether the decode kernel is built (building it on the first call)."""
    return _library() is not None


def applies(a: Tensor, k: int, transpose_b: bool) -> bool:
    """Whether :func:`packed_gemv` takes ``a @ B.T``: a forward on CPU with at most :data:`MAX_M` rows."""
    return a.device.type == "cpu" and transpose_b and 0 < a.shape[0] <= MAX_M and 0 < k <= MAX_K


def packed_gemv(a: Tensor, b_packed: Tensor, k: int, bits: int) -> Tensor | None:
    """Exact ``a (M, k) @ B.T`` in int32 for int8 ``a`` and ``B`` packed ``(N, packed_columns(k, bits))``
    (ternary or binary values), or ``None`` when the kernel could not be built."""
    library = _library()
    if library is None:
        return None
    a = a.contiguous()
    b_packed = b_packed.contiguous()
    m, n = a.shape[0], b_packed.shape[0]
    acc = torch.empty((m, n), dtype=torch.int32)
    failed = library.bitnet_packed_gemv(
        a.data_ptr(), b_packed.data_ptr(), acc.data_ptr(), m, n, k, packed_columns(k, bits), bits,
        torch.get_num_threads(),
    )  # fmt: skip
    if failed:
        raise MemoryError(f"bitnet_ao packed decode matmul: out of memory for a ({m}, {k}) @ ({n}, {k}).T")
    return acc


def unpack(b_packed: Tensor, k: int, bits: int) -> Tensor | None:
    """The ``(N, k)`` int8 values of ``B`` packed ``(N, packed_columns(k, bits))``, or ``None`` when the kernel
    could not be built (about 7x faster than inductor's code for ``reference.unpack_weight``)."""
    library = _library()
    if library is None or b_packed.device.type != "cpu":
        return None
    b_packed = b_packed.contiguous()
    n = b_packed.shape[0]
    out = torch.empty((n, k), dtype=torch.int8)
    library.bitnet_unpack(
        b_packed.data_ptr(), out.data_ptr(), n, k, packed_columns(k, bits), bits, torch.get_num_threads()
    )
    return out


def packed_linear(
    x: Tensor,
    norm_weight: Tensor | None,
    norm_eps: float,
    norm_dtype: torch.dtype,
    eps: float,
    b_packed: Tensor,
    k: int,
    bits: int,
    scale: Tensor,
    bias: Tensor | None,
    out_dtype: torch.dtype,
) -> Tensor | None:
    """The inference forward of a packed linear in one call (``cpu_gemv.c`` ``bitnet_packed_linear``): ``x``
    (normalized with ``norm_weight`` and ``norm_eps``, rounded to ``x``'s dtype then ``norm_dtype``, when given),
    quantized per row, times ``B``, scaled, plus ``bias``. ``None`` when the kernel could not be built or a dtype
    has no code."""
    library = _library()
    codes = [_DTYPE_CODES.get(d) for d in (x.dtype, norm_dtype, out_dtype)]
    if library is None or None in codes:
        return None
    x = x.contiguous()
    b_packed = b_packed.contiguous()
    m, n = x.shape[0], b_packed.shape[0]
    out = torch.empty((m, n), dtype=out_dtype)
    norm_weight = norm_weight.float().contiguous() if norm_weight is not None else None
    bias = bias.float().contiguous() if bias is not None else None
    failed = library.bitnet_packed_linear(
        x.data_ptr(), codes[0], _ptr(norm_weight), norm_eps, codes[1], eps, b_packed.data_ptr(), float(scale),
        _ptr(bias), codes[2], out.data_ptr(), m, n, k, packed_columns(k, bits), bits, torch.get_num_threads(),
    )  # fmt: skip
    if failed:
        raise MemoryError(f"bitnet_ao packed linear: out of memory for ({m}, {k}) @ ({n}, {k}).T")
    return out


def _ptr(t: Tensor | None) -> int | None:
    return t.data_ptr() if t is not None else None
