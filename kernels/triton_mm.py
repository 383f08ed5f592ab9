"""Triton scaled INT8 matmul: int32 accumulation, fused epilogue, any layout, optional 2-bit packed ``B``.

One kernel serves all three BitNet matmuls. ``A`` and ``B`` are read through their strides, so the forward
(``x_q @ W_q.T``, "NT"), grad_input (``g_q @ W_q``, "NN") and grad_weight (``g'_q.T @ x_q``, "TN") run without
copying an operand into another layout (cuBLAS INT8 is only fast for NT, docs/numerics.md#matmul-layouts).
``B`` can also be the 2-bit packed ternary weight (``reference.pack_i2_in_i8``: value ``4 j + i`` of a row in
bits ``2 i .. 2 i + 1`` of byte ``j``), unpacked in registers tile by tile, so the FSDP2 all-gather output is used
as is.

The epilogue is ``reference.scale_output`` in the same order: ``acc * row[:, None] * col[None, :] * scale`` in
float32, cast to the output dtype, then ``+ bias`` added in float32 and rounded once more to the output dtype.

Autotuning: a short config list covering H100/A100 (large tiles, deep pipelines) and consumer GPUs (smaller
shared memory; configs that do not fit fail to compile and the autotuner drops them), pruned by the size of
``M``. The key is the next power of two of ``M``, ``N`` and ``K`` plus the layout, so changing the batch size
does not re-tune on every step. Under ``TRITON_INTERPRET=1`` autotuning is bypassed for one small config.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import reference
from .triton_common import INTERPRET, check_tensors

#: How ``B`` is stored, a compile-time switch of the kernel.
B_INT8 = 0  # int8 (K, N), any strides
B_PACKED_T = 1  # packed (N, ceil(K / 4)): the operand is B.T (forward with a packed weight)
B_PACKED = 2  # packed (K, ceil(N / 4)): the operand is B (grad_input with a packed weight)

GROUP_M = 8


def _config(block_m: int, block_n: int, block_k: int, warps: int, stages: int) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k}, num_warps=warps, num_stages=stages
    )


#: (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages). Large tiles for H100/A100 at training shapes; 64-wide tiles for
#: consumer GPUs' smaller shared memory; 16/32-row tiles for small M (decode, M = 1).
AUTOTUNE_CONFIGS = [
    _config(128, 256, 128, 8, 3),
    _config(256, 128, 128, 8, 3),
    _config(128, 128, 128, 8, 4),
    _config(128, 128, 64, 4, 4),
    _config(64, 128, 128, 4, 4),
    _config(128, 64, 128, 4, 4),
    _config(64, 64, 128, 4, 4),
    _config(32, 64, 128, 4, 4),
    _config(16, 64, 256, 4, 3),
]
#: The interpreter runs one small config: edges, several K steps and the group swizzle all show at test sizes.
INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}


def _prune_configs(configs: list[triton.Config], named_args: dict[str, Any], **kwargs: Any) -> list[triton.Config]:
    """Keep tiles no taller than needed for small ``M`` and drop the short ones when ``M`` is large."""
    m = named_args["M_BUCKET"]
    if m >= 256:
        kept = [c for c in configs if c.kwargs["BLOCK_M"] >= 64]
    else:
        kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, m)]
    return kept or configs


@triton.jit
def _unpack_i2(packed):
    """``(R, C)`` packed bytes to ``(R, 4 C)`` values in {-2..1}; byte ``j`` bits ``2 i..2 i+1`` -> column ``4 j + i``.

    Each 2-bit field is shifted to the top of an int32 and shifted back arithmetically, which sign-extends it."""
    x = packed.to(tl.int32)
    v0 = (x << 30) >> 30
    v1 = (x << 28) >> 30
    v2 = (x << 26) >> 30
    v3 = (x << 24) >> 30
    # join(join(v0, v2), join(v1, v3))[..., p, q] = v[2 p + q], so the row-major reshape interleaves 0, 1, 2, 3.
    values = tl.join(tl.join(v0, v2), tl.join(v1, v3))
    return tl.reshape(values, (packed.shape[0], 4 * packed.shape[1])).to(tl.int8)


@triton.jit
def _load_b(
    b_ptr, offs_k, offs_n, k0, n0, K, N, stride_b0, stride_b1,
    B_MODE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """The ``(BLOCK_K, BLOCK_N)`` tile of the ``B`` operand at rows ``offs_k``, columns ``offs_n``.

    Rows past ``K`` are zero (or multiply zero columns of ``A``); columns past ``N`` are never stored."""
    if B_MODE == 0:
        # The K offset in int64: K * stride of a long operand (the TN weight gradient's tokens) can pass 2**31.
        b_rows = b_ptr + tl.cast(k0, tl.int64) * stride_b0 + tl.arange(0, BLOCK_K)[:, None] * stride_b0
        b = tl.load(b_rows + offs_n[None, :] * stride_b1, mask=offs_k[:, None] < K, other=0)
    elif B_MODE == 1:
        # Packed rows are the output columns; bytes along K. Unpack (BLOCK_N, BLOCK_K), then transpose.
        byte = k0 // 4 + tl.arange(0, BLOCK_K // 4)
        packed = tl.load(
            b_ptr + offs_n[:, None] * stride_b0 + byte[None, :] * stride_b1,
            mask=byte[None, :] < (K + 3) // 4,
            other=0,
        )
        b = tl.trans(_unpack_i2(packed))
    else:
        # Packed rows are K; bytes along the output columns.
        byte = n0 // 4 + tl.arange(0, BLOCK_N // 4)
        packed = tl.load(
            b_ptr + offs_k[:, None] * stride_b0 + byte[None, :] * stride_b1,
            mask=(offs_k[:, None] < K) & (byte[None, :] < (N + 3) // 4),
            other=0,
        )
        b = _unpack_i2(packed)
    return b


@triton.jit
def _scaled_mm_kernel(
    a_ptr, b_ptr, c_ptr, row_ptr, col_ptr, scale_ptr, bias_ptr,
    M, N, K, stride_am, stride_ak, stride_b0, stride_b1,
    M_BUCKET, N_BUCKET, K_BUCKET,  # autotune key only
    B_MODE: tl.constexpr, A_K_CONTIGUOUS: tl.constexpr,  # A_K_CONTIGUOUS: autotune key only
    HAS_ROW: tl.constexpr, HAS_COL: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    # Grouped program order (Triton matmul tutorial): GROUP_M row blocks share B tiles while they sit in L2.
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * grid_n
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Wrapping rows/columns past the edge re-reads valid memory instead of masking every load; they are not stored.
    a_rows = (offs_m % M).to(tl.int64)
    b_cols = offs_n % N
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=(k0 + offs_k)[None, :] < K, other=0)
        b = _load_b(
            b_ptr, k0 + offs_k, b_cols, k0, pid_n * BLOCK_N, K, N, stride_b0, stride_b1, B_MODE, BLOCK_K, BLOCK_N
        )
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K * stride_ak

    m_ok = offs_m < M
    n_ok = offs_n < N
    out = acc.to(tl.float32)
    if HAS_ROW:
        out = out * tl.load(row_ptr + offs_m, mask=m_ok, other=0.0).to(tl.float32)[:, None]
    if HAS_COL:
        out = out * tl.load(col_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_SCALE:
        out = out * tl.load(scale_ptr).to(tl.float32)
    out = out.to(c_ptr.dtype.element_ty)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(c_ptr.dtype.element_ty)
        out = (out.to(tl.float32) + bias.to(tl.float32)[None, :]).to(c_ptr.dtype.element_ty)
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    tl.store(c_ptrs, out, mask=m_ok[:, None] & n_ok[None, :])


_scaled_mm_autotuned = triton.autotune(
    configs=AUTOTUNE_CONFIGS,
    key=["M_BUCKET", "N_BUCKET", "K_BUCKET", "B_MODE", "A_K_CONTIGUOUS"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_scaled_mm_kernel)

_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _launch(
    op: str,
    a: Tensor,
    b: Tensor,
    n: int,
    k: int,
    b_mode: int,
    row_scale: Tensor | None,
    col_scale: Tensor | None,
    scale: Tensor | None,
    bias: Tensor | None,
    out_dtype: torch.dtype,
) -> Tensor:
    """Check the epilogue operands, allocate ``C (M, n)`` and run the kernel (tuned, or one config if interpreted)."""
    check_tensors(op, a, b, row_scale, col_scale, scale, bias)
    m = a.shape[0]
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"bitnet_ao.{op} (triton): out_dtype must be one of {_OUT_DTYPES}, got {out_dtype}")
    for name, t, size in (("row_scale", row_scale, m), ("col_scale", col_scale, n), ("bias", bias, n)):
        if t is not None and t.shape != (size,):
            raise ValueError(f"bitnet_ao.{op}: {name} must have shape ({size},), got {tuple(t.shape)}")
    if scale is not None and scale.numel() != 1:
        raise ValueError(f"bitnet_ao.{op}: scale must have one element, got shape {tuple(scale.shape)}")
    c = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return c
    args = (
        a, b, c, row_scale, col_scale, scale, bias, m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        triton.next_power_of_2(m), triton.next_power_of_2(n), triton.next_power_of_2(k),
    )  # fmt: skip
    flags = {
        "B_MODE": b_mode,
        "A_K_CONTIGUOUS": a.stride(1) == 1,
        "HAS_ROW": row_scale is not None,
        "HAS_COL": col_scale is not None,
        "HAS_SCALE": scale is not None,
        "HAS_BIAS": bias is not None,
        "GROUP_M": GROUP_M,
    }

    def grid(meta: dict[str, Any]) -> tuple[int]:
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    if INTERPRET:
        _scaled_mm_kernel[grid](*args, **flags, **INTERPRET_CONFIG)
    else:
        _scaled_mm_autotuned[grid](*args, **flags)
    return c


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
    """``reference.scaled_int8_mm``: ``a (M, K) @ b (K, N)`` in int32 with the fused epilogue, any strides.
    ``b_ternary`` is not needed: int32 accumulation on GPUs is exact for any int8 operands."""
    return _launch("scaled_int8_mm", a, b, b.shape[1], a.shape[1], B_INT8, row_scale, col_scale, scale, bias, out_dtype)


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
    """``reference.scaled_int8_mm_packed``: a 2-bit ``B`` (``(N, ceil(k / 4))``) is never unpacked to memory.
    ``transpose_b=True``: ``a (M, k) @ B.T``; ``False``: ``a (M, N) @ B``, output ``(M, k)``. A 1-bit (binary)
    ``B`` is re-packed to 2 bits first (a pass over ``N k / 4`` bytes): the kernel decodes 2-bit values only."""
    if bits == 1:
        b_packed = reference.pack_i2_in_i8(reference.unpack_i1_in_i8(b_packed, k))
    n, inner = reference.packed_matmul_dims(b_packed, k, transpose_b)
    mode = B_PACKED_T if transpose_b else B_PACKED
    return _launch("scaled_int8_mm_packed", a, b_packed, n, inner, mode, row_scale, col_scale, scale, bias, out_dtype)
