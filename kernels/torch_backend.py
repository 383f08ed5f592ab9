"""The torch backend of the ``bitnet_ao`` ops (registered as ``"torch"``): exact int8 matmuls plus fused
elementwise work, for CPU tensors and for any device without a backend of its own (CUDA without Triton), and the
RMSNorm bodies the Triton backend reuses.

The int8 matmuls on CPU take the route ``cpu_matmul.py`` chose for the CPU (``torch._int_mm``, oneDNN's u8 x s8
linear, or exact FP32 GEMMs); on other devices ``torch._int_mm`` where it applies, else the float64 reference.

On CPU an eager chain of elementwise ops is as slow as the matmul it feeds (a 4096x2048 row-wise
quantization: 20x the compiled time, docs/benchmarks.md), so tensors of ``COMPILE_MIN_NUMEL`` elements or more run the
reference bodies compiled by inductor (``dynamic=True``: one compile per dtype and op variant, not per
shape). Smaller tensors run the same bodies eagerly, where compiling would cost more than it saves.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch
from torch import Tensor

from . import cpu_gemv, cpu_matmul, cpu_passes, cpu_vnni_gemm, reference
from .private_api import int_mm, with_own_code_object
from .reference import ACTIVATION_EPS

#: Tensors with at least this many elements take the compiled path. ``BITNET_AO_COMPILE_MIN_NUMEL``
#: overrides it (0: always compile; a huge number: never).
COMPILE_MIN_NUMEL = int(os.environ.get("BITNET_AO_COMPILE_MIN_NUMEL", 1 << 16))


def right_operand_k_contiguous(t: Tensor) -> bool:
    """Layout of the right operand ``b`` (``(K, N)``) the matmul for ``t``'s device is fastest with: oneDNN, the
    signadd kernel and FP32 GEMMs want it contiguous along K."""
    return t.device.type == "cpu" and cpu_matmul.right_operand_k_contiguous()


def right_operand_either_layout(t: Tensor) -> bool:
    """Whether the matmul for ``t``'s device is as fast with either layout of ``b`` (``torch._int_mm`` on CPU)."""
    return t.device.type == "cpu" and cpu_matmul.right_operand_either_layout()


@functools.cache
def _compiled(fn: Callable, variant: tuple, keep_narrowing_casts: bool) -> Callable:
    # Dynamo keeps at most `recompile_limit` (8) graphs per code object, and one body can meet more variants in a
    # process (three dtypes, two eps values, transposed or not, which optional scales...): past the limit a
    # fullgraph compile fails. A private copy of the code object per variant gives each variant its own cache.
    copy = with_own_code_object(fn)
    # fx_graph_cache off: in torch 2.13.0 inductor's FX graph cache hands a graph compiled where two sizes were
    # equal (a 1024 x 1024 activation, one "duck-shaped" symbol) to a later compile where they differ, and the
    # kernel writes out of bounds (heap corruption in float32 training; tests/test_ops.py). Compiling each body
    # afresh per process costs a few seconds once. emulate_precision_casts: inductor skips a cast to a narrower
    # dtype that is cast straight back up unless it is on; only bodies that round on purpose ask for it.
    options: dict[str, bool] = {"fx_graph_cache": False}
    if keep_narrowing_casts:
        options["emulate_precision_casts"] = True
    return torch.compile(copy, dynamic=True, fullgraph=True, options=options)


def _variant(args: tuple) -> tuple:
    """What a compiled graph specializes on, besides sizes: dtypes, ranks, layouts, inference tensors (their
    dispatch keys differ), the non-tensor args, and whether inference mode is on."""
    tensors = tuple(
        (a.dtype, a.dim(), a.is_contiguous(), a.is_inference()) if isinstance(a, Tensor) else a for a in args
    )
    return (*tensors, torch.is_inference_mode_enabled())


def run_fused(fn: Callable, numel: int, *args, keep_narrowing_casts: bool = False):
    """Run the elementwise/reduction body ``fn`` compiled by inductor when ``numel`` (the size of the work) is
    at least ``COMPILE_MIN_NUMEL``, else eagerly.
    ``keep_narrowing_casts``: the body rounds to a narrower dtype on purpose and the compiled code must too.

    The bodies are called from autograd functions and custom ops that do their own backward, so the compiled
    ones get detached tensors under ``no_grad``: dynamo would otherwise guard on each input's ``requires_grad``,
    on grad mode and on the static shape of an ``nn.Parameter`` (a norm gain pins the activation's width), and one
    fine-tuning process (training, evaluation, a frozen LoRA base; widths 1024 and 2816) met more than the 8
    graphs a code object may hold, which fails a fullgraph compile."""
    if numel >= COMPILE_MIN_NUMEL:
        args = tuple(a.detach() if isinstance(a, Tensor) else a for a in args)
        with torch.no_grad():
            return _compiled(fn, _variant(args), keep_narrowing_casts)(*args)
    return fn(*args)


def quantize_rowwise(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return cpu_passes.quantize_rows(x, eps) or run_fused(reference.quantize_rowwise, x.numel(), x, eps)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    # The rows of the fused norm + quantization's C pass, written out: the fused and the unfused norm are one code.
    return cpu_passes.rms_norm(x, weight, eps) or run_fused(reference.rms_norm, x.numel(), x, weight, eps)


def rms_norm_quantize_rowwise(
    x: Tensor, weight: Tensor, norm_eps: float, norm_dtype: torch.dtype, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    # The norm's output is rounded to x.dtype and then to norm_dtype; either may be narrower than float32.
    narrowing = min(x.dtype.itemsize, norm_dtype.itemsize) < torch.float32.itemsize
    # One C pass per row: the rstd, the norm, the absmax, the int8 values.
    return cpu_passes.quantize_rows(x, eps, norm=(weight, norm_eps, norm_dtype)) or run_fused(
        reference.rms_norm_quantize_rowwise,
        x.numel(),
        x,
        weight,
        norm_eps,
        norm_dtype,
        eps,
        keep_narrowing_casts=narrowing,
    )


def rms_norm_backward(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    # One C pass reads each row once (inductor's code: 44-49% of a copy's bandwidth on a Zen 4).
    return cpu_passes.rms_norm_backward(dy, x, weight, rstd) or run_fused(
        reference.rms_norm_backward, x.numel(), dy, x, weight, rstd
    )


def quantize_colwise_scaled(g: Tensor, row_scale: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return run_fused(reference.quantize_colwise_scaled, g.numel(), g, row_scale, eps)


def quantize_grad_output(g: Tensor, row_scale: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    # Both from one C pass (two reads of each row), else one compiled body (inductor reads g once for both).
    return cpu_passes.quantize_grad_output(g, row_scale, eps) or run_fused(
        reference.quantize_grad_output, g.numel(), g, row_scale, eps
    )


def weight_stats(w: Tensor) -> Tensor:
    stats = cpu_passes.weight_stats(w)
    return stats if stats is not None else run_fused(reference.weight_stats, w.numel(), w)


def ternarize(w: Tensor, scale: Tensor, transpose: bool) -> Tensor:
    q = cpu_passes.ternarize(w, scale, transpose)
    return q if q is not None else run_fused(reference.ternarize, w.numel(), w, scale, transpose)


def binarize(w: Tensor, center: Tensor, transpose: bool) -> Tensor:
    return run_fused(reference.binarize, w.numel(), w, center, transpose)


def _int_mm_supported(a: Tensor, b: Tensor) -> bool:
    # cuBLASLt int8 GEMM constraints (CUDA fallback until the Triton kernels take over).
    m, k = a.shape
    n = b.shape[1]
    return m > 16 and k > 0 and n > 0 and k % 8 == 0 and n % 8 == 0


def _int8_mm(a: Tensor, b: Tensor, b_ternary: bool) -> Tensor:
    """The int32 product of a scaled matmul, which its epilogue reads at once: in the CPU's scratch accumulator."""
    if a.device.type == "cpu":
        return cpu_matmul.int8_mm(a, b, b_ternary, scratch=True)
    return int_mm(a, b) if _int_mm_supported(a, b) else reference.int8_mm(a, b)


def scaled_int8_mm(
    a: Tensor,
    b: Tensor,
    row_scale: Tensor | None,
    col_scale: Tensor | None,
    scale: Tensor | None,
    bias: Tensor | None,
    out_dtype: torch.dtype,
    b_ternary: bool = False,
) -> Tensor:
    if a.device.type == "cpu":
        fused = cpu_matmul.fused_scaled_mm(a, b, b_ternary, row_scale, col_scale, scale, bias, out_dtype)
        if fused is not None:
            return fused
    return scale_output(_int8_mm(a, b, b_ternary), row_scale, col_scale, scale, bias, out_dtype)


def prepacks_operand(t: Tensor, b_ternary: bool) -> bool:
    """Whether a right operand of ``t``'s device and kind may be packed ahead of its product
    (:func:`pack_operand`): on CPUs whose route for that kind is ``"vnni"`` or ``"amx"``."""
    return t.device.type == "cpu" and cpu_matmul.prepacks(b_ternary)


def pack_operand(b: Tensor, b_ternary: bool) -> Tensor:
    return cpu_vnni_gemm.pack(b, b_ternary)


def ternarize_packed(w: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    # One read of the master weight where the C kernel takes its dtype and scale; else ternarize, then pack.
    if (
        scale.numel() == 1
        and scale.dtype == torch.float32
        and w.dtype in (torch.float32, torch.bfloat16, torch.float16)
    ):
        return cpu_vnni_gemm.ternarize_packed(w, float(scale), reference.WEIGHT_EPS)
    q = ternarize(w, scale, False)
    return cpu_vnni_gemm.pack(q, True), cpu_vnni_gemm.pack(q.t(), True)


def scaled_int8_mm_prepacked(
    a: Tensor,
    b_packed: Tensor,
    n: int,
    row_scale: Tensor | None,
    col_scale: Tensor | None,
    scale: Tensor | None,
    bias: Tensor | None,
    out_dtype: torch.dtype,
    b_ternary: bool,
) -> Tensor:
    # The fused epilogue where it applies, else the int32 sums from the same kernel and this backend's epilogue.
    amx = cpu_matmul.uses_amx(b_ternary)
    if cpu_vnni_gemm.epilogue_applies(row_scale, col_scale, scale, out_dtype):
        return cpu_vnni_gemm.scaled_mm_prepacked(
            a, b_packed, n, row_scale, col_scale, scale, bias, out_dtype, b_ternary=b_ternary, amx=amx
        )
    acc = cpu_vnni_gemm.scaled_mm_prepacked(a, b_packed, n, out=cpu_matmul.accumulator(a.shape[0], n),
                                            b_ternary=b_ternary, amx=amx)  # fmt: skip
    return scale_output(acc, row_scale, col_scale, scale, bias, out_dtype)


def scale_output(
    acc: Tensor,
    row_scale: Tensor | None,
    col_scale: Tensor | None,
    scale: Tensor | None,
    bias: Tensor | None,
    out_dtype: torch.dtype,
) -> Tensor:
    """``reference.scale_output``, the epilogue of every scaled int8 matmul, as this backend runs it: the C pass on
    CPU, else the compiled reference body."""
    out = cpu_passes.scale_output(acc, row_scale, col_scale, scale, bias, out_dtype)
    if out is not None:
        return out
    return run_fused(reference.scale_output, acc.numel(), acc, row_scale, col_scale, scale, bias, out_dtype)


def scaled_int8_mm_packed(
    a: Tensor,
    b_packed: Tensor,
    k: int,
    transpose_b: bool,
    row_scale: Tensor | None,
    col_scale: Tensor | None,
    scale: Tensor | None,
    bias: Tensor | None,
    out_dtype: torch.dtype,
    bits: int = 2,
) -> Tensor:
    # Decode-sized forwards read the packed weight directly (cpu_gemv.c); everything else unpacks the weight
    # once (cpu_gemv.c too) and runs this CPU's int8 matmul route.
    if cpu_gemv.applies(a, k, transpose_b):
        acc = cpu_gemv.packed_gemv(a, b_packed, k, bits)
        if acc is not None:
            return scale_output(acc, row_scale, col_scale, scale, bias, out_dtype)
    # The forward of a 2-bit weight with the vnni or amx route: one kernel reads the packed bytes (cpu_vnni_gemm.c).
    if transpose_b and bits == 2:
        out = cpu_matmul.fused_scaled_mm(a, b_packed, True, row_scale, col_scale, scale, bias, out_dtype, b_packed=True)
        if out is not None:
            return out
    # Unpacked B is row-major (N, K). The forward's B.T is then a column-major view, which torch._int_mm takes
    # about as fast as a row-major copy (docs/kernels.md) and oneDNN wants anyway; grad_input's B is row-major
    # as torch._int_mm wants, and copied to column-major for oneDNN.
    b = cpu_gemv.unpack(b_packed, k, bits)
    if b is None:
        b = run_fused(reference.unpack_weight, b_packed.numel(), b_packed, k, bits)
    if transpose_b:
        b = b.t()
    elif right_operand_k_contiguous(a) and not right_operand_either_layout(a):
        b = b.t().contiguous().t()
    return scaled_int8_mm(a, b, row_scale, col_scale, scale, bias, out_dtype, b_ternary=True)


def decode_linear_applies(x: Tensor, k: int, out_dtype: torch.dtype) -> bool:
    """Whether the packed linear of ``x`` runs as one C call (:func:`packed_linear`, or the same C behind the
    operator registered in C++, ``cpu_ops.cpp``): a decode-sized CPU input (``cpu_gemv.applies``), in and out of
    dtypes the C code has."""
    return cpu_gemv.applies(x, k, True) and cpu_gemv.has_codes(x.dtype, out_dtype)


def packed_linear(
    x: Tensor,
    norm_weight: Tensor | None,
    norm_eps: float,
    b_packed: Tensor,
    k: int,
    bits: int,
    scale: Tensor,
    bias: Tensor | None,
    out_dtype: torch.dtype,
) -> Tensor | None:
    """``ops.packed_linear`` in one C call for decode-sized inputs, or ``None`` (the op then composes the
    quantization and ``scaled_int8_mm_packed``). The C quantizes each row as the training forward's C pass does
    (``cpu_rows.h``), so the outputs are the training forward's bit for bit."""
    if not decode_linear_applies(x, k, out_dtype):
        return None
    return cpu_gemv.packed_linear(
        x, norm_weight, norm_eps, out_dtype, ACTIVATION_EPS, b_packed, k, bits, scale, bias, out_dtype
    )
