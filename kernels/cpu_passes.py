"""The elementwise passes of a BitNet linear on CPU in C (``cpu_passes.c``), compiled for this CPU on first use.

Around its int8 matmuls a BitNet linear quantizes the activation per row (through the RMSNorm the surgery adds),
the output gradient per row and per column, scales the int32 products, and ternarizes the weight. inductor's code
for these reference bodies makes a pass over the whole tensor per reduction and per output, at 16-45% of the
bandwidth of a plain copy on a Zen 4 (``benchmarks/bench_kernels.py``); the C kernels read each row once, and
every float operation is the reference's, so the results are the same bits (``tests/test_cpu_passes.py``).

Each function returns ``None`` where it does not apply (a dtype without a code, an empty tensor, no compiler):
the caller then takes the inductor-compiled reference body.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
from torch import Tensor

from . import cpu_build
from .reference import WEIGHT_EPS

SOURCE = Path(__file__).with_name("cpu_passes.c")
#: The dtype codes of cpu_rows.h.
_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@functools.cache
def _library() -> ctypes.CDLL | None:
    library = cpu_build.load(SOURCE)
    if library is None:
        return None
    p, i, d = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
    signatures = {
        "bitnet_quantize_rows": [p, i, p, d, i, i, i, d, p, p, p, i, i],
        "bitnet_quantize_grad_output": [p, i, p, i, i, d, p, p, p, p, i, i],
        "bitnet_scale_output": [p, i, p, p, p, p, i, p, i, i, i],
        "bitnet_ternarize": [p, i, ctypes.c_float, d, i, p, i, i, i],
        "bitnet_rms_norm": [p, i, p, d, i, i, p, p, i],
        "bitnet_rms_norm_backward": [p, i, p, i, p, p, i, i, p, p, i],
        "bitnet_weight_stats": [p, i, i, p, i],
    }
    for name, argtypes in signatures.items():
        getattr(library, name).argtypes = argtypes
        getattr(library, name).restype = ctypes.c_int
    return library


@functools.cache
def _last_level_cache_bytes() -> int:
    """The size of the CPU's largest cache, from sysfs (what lscpu reads); 0 where unknown. glibc's
    ``sysconf(_SC_LEVEL3_CACHE_SIZE)`` said 320 MB on a Zen 4 virtual machine whose L3 is 32 MB."""
    sizes = [0]
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip().upper()
        except OSError:
            continue
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes)


def streams(nbytes: int) -> bool:
    """Whether a pass should write its ``nbytes`` of int8 outputs around the caches (non-temporal stores, as memcpy
    does for large copies): where they outnumber the last-level cache, whose lines each output line would otherwise
    be read into from memory first, only to push out what the next op reads. quantize_grad_output at 4096 x 5632
    bfloat16 (46 MB written): 1.35x from memory on a Zen 4 with 32 MB of L3 (benchmarks.md)."""
    cache = _last_level_cache_bytes()
    return 0 < cache <= nbytes


def _usable(*tensors: Tensor) -> ctypes.CDLL | None:
    """The library, where every tensor is a non-empty CPU tensor of a dtype with a code."""
    if not all(t.device.type == "cpu" and t.dtype in _CODES and t.numel() > 0 for t in tensors):
        return None
    return _library()


def _ptr(t: Tensor | None) -> int | None:
    return t.data_ptr() if t is not None else None


def _check(failed: int, what: str) -> None:
    if failed:
        raise MemoryError(f"bitnet_ao {what}: out of memory for the per-thread row buffers")


def quantize_rows(
    x: Tensor, eps: float, norm: tuple[Tensor, float, torch.dtype] | None = None
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor] | None:
    """``reference.quantize_rowwise(x, eps)``: ``(x_q, s)``; with ``norm = (gain, norm_eps, norm_dtype)``
    ``reference.rms_norm_quantize_rowwise(x, gain, norm_eps, norm_dtype, eps)``: ``(x_q, s, rstd)``. ``None`` where
    the kernel does not apply."""
    library = _usable(x)
    if library is None or (norm is not None and norm[2] not in _CODES):
        return None
    x = x.contiguous()
    m, k = x.shape
    q, scale = torch.empty((m, k), dtype=torch.int8), torch.empty(m, dtype=torch.float32)
    gain = rstd = None
    norm_eps, norm_code = 0.0, 0
    if norm is not None:
        gain, norm_eps, norm_code = norm[0].float().contiguous(), norm[1], _CODES[norm[2]]
        rstd = torch.empty((m, 1), dtype=torch.float32)
    failed = library.bitnet_quantize_rows(
        x.data_ptr(), _CODES[x.dtype], _ptr(gain), norm_eps, norm_code, m, k, eps, q.data_ptr(), scale.data_ptr(),
        _ptr(rstd), streams(q.nbytes), torch.get_num_threads(),
    )  # fmt: skip
    _check(failed, "quantize_rowwise")
    return (q, scale) if rstd is None else (q, scale, rstd)


def quantize_grad_output(g: Tensor, row_scale: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """``reference.quantize_grad_output(g, row_scale, eps)``, or ``None`` where the kernel does not apply."""
    library = _usable(g)
    if library is None or row_scale.dtype != torch.float32:
        return None
    g, row_scale = g.contiguous(), row_scale.contiguous()
    m, n = g.shape
    g_q, s_g = torch.empty((m, n), dtype=torch.int8), torch.empty(m, dtype=torch.float32)
    g_qc, s_gc = torch.empty((m, n), dtype=torch.int8), torch.empty(n, dtype=torch.float32)
    failed = library.bitnet_quantize_grad_output(
        g.data_ptr(), _CODES[g.dtype], row_scale.data_ptr(), m, n, eps, g_q.data_ptr(), s_g.data_ptr(),
        g_qc.data_ptr(), s_gc.data_ptr(), streams(g_q.nbytes + g_qc.nbytes), torch.get_num_threads(),
    )  # fmt: skip
    _check(failed, "quantize_grad_output")
    return g_q, s_g, g_qc, s_gc


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor] | None:
    """``reference.rms_norm(x, weight, eps)``: ``(y, rstd)``, or ``None`` where the kernel does not apply."""
    library = _usable(x)
    if library is None:
        return None
    x, gain = x.contiguous(), weight.float().contiguous()
    m, k = x.shape
    y, rstd = torch.empty((m, k), dtype=x.dtype), torch.empty((m, 1), dtype=torch.float32)
    failed = library.bitnet_rms_norm(
        x.data_ptr(), _CODES[x.dtype], gain.data_ptr(), eps, m, k, y.data_ptr(), rstd.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    _check(failed, "rms_norm")
    return y, rstd


def rms_norm_backward(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor] | None:
    """``reference.rms_norm_backward(dy, x, weight, rstd)``: the same elementwise operations, the two sums in the
    kernel's order; ``None`` where the kernel does not apply."""
    library = _usable(dy, x)
    if library is None or weight.dtype not in _CODES:
        return None
    dy, x = dy.contiguous(), x.contiguous()
    gain, rstd = weight.float().contiguous(), rstd.float().contiguous()
    m, k = x.shape
    dx, dw = torch.empty((m, k), dtype=x.dtype), torch.empty(k, dtype=torch.float32)
    failed = library.bitnet_rms_norm_backward(
        dy.data_ptr(), _CODES[dy.dtype], x.data_ptr(), _CODES[x.dtype], gain.data_ptr(), rstd.data_ptr(), m, k,
        dx.data_ptr(), dw.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    _check(failed, "rms_norm_backward")
    return dx, dw.to(weight.dtype)


def scale_output(
    acc: Tensor,
    row_scale: Tensor | None,
    col_scale: Tensor | None,
    scale: Tensor | None,
    bias: Tensor | None,
    out_dtype: torch.dtype,
) -> Tensor | None:
    """``reference.scale_output`` of an int32 (or integer-valued float32) product, or ``None`` where the kernel
    does not apply."""
    library = _library() if acc.device.type == "cpu" and acc.numel() > 0 else None
    scales = [s for s in (row_scale, col_scale, scale) if s is not None]
    if (
        library is None
        or acc.dtype not in (torch.int32, torch.float32)
        or out_dtype not in _CODES
        or any(s.dtype != torch.float32 for s in scales)
        or (scale is not None and scale.numel() != 1)
    ):
        return None
    acc = acc.contiguous()
    row_scale, col_scale, scale = (s.contiguous() if s is not None else None for s in (row_scale, col_scale, scale))
    bias = bias.to(out_dtype).contiguous() if bias is not None else None
    m, n = acc.shape
    out = torch.empty((m, n), dtype=out_dtype)
    failed = library.bitnet_scale_output(
        acc.data_ptr(), int(acc.dtype == torch.float32), _ptr(row_scale), _ptr(col_scale), _ptr(scale), _ptr(bias),
        _CODES[out_dtype], out.data_ptr(), m, n, torch.get_num_threads(),
    )  # fmt: skip
    _check(failed, "scale_output")
    return out


def weight_stats(w: Tensor) -> Tensor | None:
    """``reference.weight_stats(w)``: ``(sum |w|, sum w)`` in float64, or ``None`` where the kernel does not apply."""
    library = _usable(w)
    if library is None:
        return None
    w = w.contiguous()
    stats = torch.empty(2, dtype=torch.float64)
    _check(library.bitnet_weight_stats(w.data_ptr(), _CODES[w.dtype], w.numel(), stats.data_ptr(),
                                       torch.get_num_threads()), "weight_stats")  # fmt: skip
    return stats


def ternarize(w: Tensor, scale: Tensor, transpose: bool) -> Tensor | None:
    """``reference.ternarize(w, scale, transpose)`` for a scalar ``scale``, or ``None`` where the kernel does not
    apply (group scales take the compiled reference)."""
    library = _usable(w)
    if library is None or scale.numel() != 1 or scale.dtype != torch.float32:
        return None
    w = w.contiguous()
    n, k = w.shape
    q = torch.empty((k, n) if transpose else (n, k), dtype=torch.int8)
    failed = library.bitnet_ternarize(
        w.data_ptr(),
        _CODES[w.dtype],
        float(scale),
        WEIGHT_EPS,
        int(transpose),
        q.data_ptr(),
        n,
        k,
        torch.get_num_threads(),
    )
    _check(failed, "ternarize")
    return q
