"""The int8 matmul with AVX-512 VNNI or AMX and its epilogue fused (``cpu_vnni_gemm.c``): routes ``"vnni"`` and
``"amx"``.

``torch._int_mm`` writes its int32 product to memory, and the epilogue reads it back to scale it: 6 bytes of traffic
per output element besides the GEMM, and on a Zen 4 the epilogue of a 2048 x 2816 product cost as much as a copy of
those bytes (~0.7 ms against a ~14 ms GEMM); in a training step, where grad_weight's float32 output is fresh memory,
the epilogues of the weight gradients alone took ~26 ms. This kernel scales each tile while its sums are still in
registers. The right operand is packed for ``vpdpbusd`` on every call, into a per-thread scratch buffer (shifted to
unsigned bytes: by one for a ternary operand, by 128 for a full-range one; the row sums of the left operand undo the
shift exactly), and the epilogue is ``cpu_rows.h``'s, the reference's float operations. A left operand that is the
transposed view of a row-major tensor (grad_weight's ``g.T``) is packed too, four values of its reduction at a time.
:func:`scaled_mm_i2` reads a 2-bit packed inference weight itself.

With ``amx=True`` (where :func:`amx_available`: Intel CPUs with AMX-INT8, Sapphire Rapids and later) the same packed
operand is multiplied by AMX tiles, 2 x 2 tiles of 16 x 16 sums at a time, and the epilogue is the same. On 2 cores
of a Sapphire Rapids this ran 2048 x 1024 x 2816 at 3.2-4.0 TOPS with its epilogue where ``torch._int_mm`` ran 1.7-1.9
without one (and a BF16 GEMM 2.0 TFLOPS). AMX reads the left operand row-major, so grad_weight's ``g.T`` is transposed
into scratch first.

Built for this CPU on first use (``cpu_build.py``); :func:`available` is false where the build has no VNNI.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
from torch import Tensor

from . import cpu_build
from .ranges import GEMM_RANGE_PREFIX, kernel_range
from .scratch import ThreadScratch

SOURCE = Path(__file__).with_name("cpu_vnni_gemm.c")
#: This thread's buffers for ``b`` and for a transposed ``a`` packed for ``vpdpbusd`` (``kernels/scratch.py``).
_PACKED = ThreadScratch(torch.uint8)
_PACKED_A = ThreadScratch(torch.uint8)
#: What ``b`` is shifted by to unsigned bytes: ternary values by one, full-range int8 by 128.
_SHIFT = {True: 1, False: 128}
#: cpu_rows.h's dtype codes, of the outputs (and 3 for the raw int32 sums) and of the weight ternarize_packed reads.
_OUT_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.int32: 3}


@functools.cache
def _library() -> ctypes.CDLL | None:
    library = cpu_build.load(SOURCE)
    if library is None or not library.bitnet_vnni_available():
        return None
    p, i = ctypes.c_void_p, ctypes.c_int64
    library.bitnet_vnni_pack.argtypes = [p, i, i, i, i, i, p, i]
    library.bitnet_vnni_pack.restype = None
    library.bitnet_vnni_pack_columns.argtypes = [p, i, i, i, p, p, i]
    library.bitnet_vnni_pack_columns.restype = ctypes.c_int
    library.bitnet_vnni_ternarize_packed.argtypes = [p, i, ctypes.c_float, ctypes.c_double, i, i, p, p, i]
    library.bitnet_vnni_ternarize_packed.restype = ctypes.c_int
    library.bitnet_vnni_scaled_mm.argtypes = [p, i, p, i, i, p, i, i, i, p, p, p, p, i, p, i]
    library.bitnet_vnni_scaled_mm.restype = ctypes.c_int
    library.bitnet_transpose_i8.argtypes = [p, i, i, i, p, i]
    library.bitnet_transpose_i8.restype = None
    library.bitnet_vnni_scaled_mm_i2.argtypes = [p, i, i, i, p, i, i, i, p, p, p, p, i, p, i]
    library.bitnet_vnni_scaled_mm_i2.restype = ctypes.c_int
    return library


#: The packed layout's blocks (cpu_vnni_gemm.c): panels of 64 columns, groups of 4 reduction rows.
PANEL, GROUP = 64, 4


def packed_size(k: int, n: int) -> int:
    """Bytes of a ``(k, n)`` right operand packed for the kernel (:func:`pack`), padded to whole panels and groups."""
    return -(-n // PANEL) * PANEL * -(-k // GROUP) * GROUP


def available() -> bool:
    """Whether the kernel is built for this CPU (AVX-512 VNNI and a C compiler; building it on the first call)."""
    return _library() is not None


@functools.cache
def amx_available() -> bool:
    """Whether the kernel can multiply with AMX here: built with AMX-INT8, and the OS lets this process use the tile
    registers (asked once per process)."""
    library = _library()
    return library is not None and bool(library.bitnet_amx_available())


def epilogue_applies(
    row_scale: Tensor | None, col_scale: Tensor | None, scale: Tensor | None, out_dtype: torch.dtype
) -> bool:
    """Whether the fused epilogue computes ``reference.scale_output`` for these factors: float32 scales (a scalar
    ``scale``) and a float32 / bfloat16 / float16 output, as ``cpu_passes.scale_output`` takes them."""
    scales = [s for s in (row_scale, col_scale, scale) if s is not None]
    return (
        out_dtype in (torch.float32, torch.bfloat16, torch.float16)
        and all(s.dtype == torch.float32 for s in scales)
        and (scale is None or scale.numel() == 1)
    )


def scaled_mm(
    a: Tensor,
    b: Tensor,
    row_scale: Tensor | None = None,
    col_scale: Tensor | None = None,
    scale: Tensor | None = None,
    bias: Tensor | None = None,
    out_dtype: torch.dtype = torch.int32,
    out: Tensor | None = None,
    b_ternary: bool = True,
    amx: bool = False,
) -> Tensor:
    """``reference.scale_output(a @ b, row_scale, col_scale, scale, bias, out_dtype)`` for int8 ``a (M, K)`` and
    int8 ``b (K, N)`` (any strides), exact wherever each sum fits in int32, as ``torch._int_mm``; ``b_ternary``
    promises ``b`` holds only {-1, 0, 1}. ``out_dtype=torch.int32`` returns the exact sums unscaled (into ``out``
    where given: a contiguous ``(M, N)`` int32 tensor). ``amx``: multiply with AMX (:func:`amx_available`)."""
    packed = _pack_into(_PACKED.get(packed_size(*b.shape)), b, b_ternary)  # read by the GEMM, then free again
    return scaled_mm_prepacked(a, packed, b.shape[1], row_scale, col_scale, scale, bias, out_dtype, out, b_ternary,
                               amx)  # fmt: skip


def pack(b: Tensor, b_ternary: bool) -> Tensor:
    """The right operand ``b (K, N)`` (any strides) packed for :func:`scaled_mm_prepacked`, in a tensor of its own:
    the packing :func:`scaled_mm` does on every call, done once where an operand serves several products or is at
    hand in cache long before its product runs (the weight of a training step, the activations grad_weight reads)."""
    return _pack_into(torch.empty(packed_size(*b.shape), dtype=torch.uint8), b, b_ternary)


def ternarize_packed(w: Tensor, scale: float, eps: float) -> tuple[Tensor, Tensor]:
    """``reference.ternarize(w, scale)`` of a weight ``w (N, K)`` (float32, bfloat16 or float16) packed as
    :func:`pack` packs its two operands: ``(pack(W_q), pack(W_q.T))``, for ``grad_input`` and the forward, in one
    read of ``w``."""
    w = w.contiguous()
    n, k = w.shape
    gi, fwd = torch.empty(packed_size(n, k), dtype=torch.uint8), torch.empty(packed_size(k, n), dtype=torch.uint8)
    failed = _loaded().bitnet_vnni_ternarize_packed(w.data_ptr(), _OUT_CODES[w.dtype], scale, eps, n, k, fwd.data_ptr(),
                                                    gi.data_ptr(), torch.get_num_threads())  # fmt: skip
    if failed:
        raise MemoryError(f"bitnet_ao vnni ternarize: out of memory for a ({n}, {k}) weight")
    return gi, fwd


def _pack_into(packed: Tensor, b: Tensor, b_ternary: bool) -> Tensor:
    k, n = b.shape
    _loaded().bitnet_vnni_pack(b.data_ptr(), b.stride(0), b.stride(1), k, n, _SHIFT[b_ternary], packed.data_ptr(),
                               torch.get_num_threads())  # fmt: skip
    return packed


def scaled_mm_prepacked(
    a: Tensor,
    b_packed: Tensor,
    n: int,
    row_scale: Tensor | None = None,
    col_scale: Tensor | None = None,
    scale: Tensor | None = None,
    bias: Tensor | None = None,
    out_dtype: torch.dtype = torch.int32,
    out: Tensor | None = None,
    b_ternary: bool = True,
    amx: bool = False,
) -> Tensor:
    """:func:`scaled_mm` of ``a (M, K)`` and the ``(K, n)`` operand ``b_packed`` that :func:`pack` made of it."""
    library = _loaded(amx)
    m, k = a.shape
    threads = torch.get_num_threads()
    b_args = (b_packed.data_ptr(), n, _SHIFT[b_ternary], int(amx))
    transposed = a.stride(0) == 1 and a.stride(1) >= m and m > 1
    if amx and transposed:
        # AMX tiles read rows of a: the transposed view of a row-major (K, M) tensor is transposed into scratch.
        rows = _PACKED_A.get(m * k).view(torch.int8).view(m, k)
        library.bitnet_transpose_i8(a.data_ptr(), a.stride(1), k, m, rows.data_ptr(), threads)
        a_args = (rows.data_ptr(), k, None, m, k)
    elif transposed:
        # The transposed view of a row-major (K, M) tensor: packed group-major with its row sums.
        a_packed = _PACKED_A.get(packed_size(k, m))
        a_sums = torch.empty(m, dtype=torch.int32)
        if library.bitnet_vnni_pack_columns(a.data_ptr(), a.stride(1), k, m, a_packed.data_ptr(), a_sums.data_ptr(),
                                            threads):  # fmt: skip
            raise MemoryError(f"bitnet_ao vnni matmul: out of memory packing a ({m}, {k})")
        a_args = (a_packed.data_ptr(), 0, a_sums.data_ptr(), m, k)
    else:
        a = _rows(a)
        a_args = (a.data_ptr(), a.stride(0), None, m, k)
    return _run(library.bitnet_vnni_scaled_mm, a_args, b_args, (m, n), row_scale, col_scale, scale, bias, out_dtype,
                out, amx)  # fmt: skip


def scaled_mm_i2(
    a: Tensor,
    b_packed: Tensor,
    row_scale: Tensor | None,
    col_scale: Tensor | None,
    scale: Tensor | None,
    bias: Tensor | None,
    out_dtype: torch.dtype,
    amx: bool = False,
) -> Tensor:
    """:func:`scaled_mm` of ``a (M, K)`` and ``B.T`` for the ternary weight ``B (N, K)`` packed two bits per value
    (``reference.pack_weight(B, 2)``, ``(N, ceil(K / 4))``), reading the packed bytes: the prefill of a packed
    inference weight, with nothing unpacked or cached. ``amx``: multiply with AMX (:func:`amx_available`)."""
    library = _loaded(amx)
    a = _rows(a)
    b_packed = b_packed.contiguous()
    m, k = a.shape
    n = b_packed.shape[0]
    return _run(library.bitnet_vnni_scaled_mm_i2, (a.data_ptr(), a.stride(0), m, k), (b_packed.data_ptr(),
                b_packed.shape[1], n, int(amx)), (m, n), row_scale, col_scale, scale, bias, out_dtype, None,
                amx)  # fmt: skip


def _loaded(amx: bool = False) -> ctypes.CDLL:
    library = _library()
    if library is None:
        raise RuntimeError("bitnet_ao: the vnni route needs a CPU with AVX-512 VNNI and a working C compiler")
    if amx and not amx_available():
        raise RuntimeError("bitnet_ao: the amx route needs a CPU with AMX-INT8 that the OS lets this process use")
    return library


def _rows(a: Tensor) -> Tensor:
    """``a`` as the kernels read it: rows of contiguous values, any distance apart."""
    return a if a.stride(1) == 1 and a.stride(0) >= a.shape[1] else a.contiguous()


def _run(
    entry,
    a_args: tuple,
    b_args: tuple[int, ...],
    shape: tuple[int, int],
    row_scale: Tensor | None,
    col_scale: Tensor | None,
    scale: Tensor | None,
    bias: Tensor | None,
    out_dtype: torch.dtype,
    out: Tensor | None,
    amx: bool = False,
) -> Tensor:
    """Call a C entry point ``(*a_args, *b_args, row_scale, col_scale, scale, bias, out_code, out, threads)`` and
    return its ``(M, N)`` output, in the GEMM range (``kernels/ranges.py``) of route ``amx`` or ``vnni``."""
    route = "amx" if amx else "vnni"
    m, n = shape
    if out is None:
        out = torch.empty((m, n), dtype=out_dtype)
    scales = [t.float().contiguous() if t is not None else None for t in (row_scale, col_scale, scale)]
    bias = bias.to(out_dtype).contiguous() if bias is not None else None
    # The range lets a step profile (benchmarks/step_profile.py) count the GEMM, with its fused epilogue, apart from
    # the packing.
    with kernel_range(f"{GEMM_RANGE_PREFIX}:{route}"):
        failed = entry(
            *a_args, *b_args,
            *(t.data_ptr() if t is not None else None for t in scales), bias.data_ptr() if bias is not None else None,
            _OUT_CODES[out_dtype], out.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
    if failed:
        raise MemoryError(f"bitnet_ao {route} matmul: out of memory for a ({m}, K) @ b (K, {n})")
    return out
