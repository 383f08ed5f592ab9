"""Triton quantization kernels: per-row and per-column int8, weight statistics, ternary and binary weights.

All of them are memory-bound, so each reads its input as few times as possible and picks block sizes by a
heuristic instead of autotuning. The math is ``reference.py`` line by line, in float32, with the same order of
operations (``x / (max(absmax, eps) / 127)``, a true division, not a multiply by a reciprocal) so the int8 values
are bit-identical. Rounding is half-to-even by an explicit formula (:func:`_round_half_even`): libdevice
``rint`` would do on a GPU but does not exist in the interpreter, and one formula for both keeps the tested code
the shipped code.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .reference import WEIGHT_EPS
from .triton_common import check_tensors

#: ``reference.WEIGHT_EPS`` as a compile-time constant of the kernels (a global a Triton kernel reads must be one).
_WEIGHT_EPS = tl.constexpr(WEIGHT_EPS)

#: Rows up to this many elements are quantized in one pass (the row stays in registers between the absmax and
#: the rounding); longer rows are read twice.
ONE_PASS_MAX_K = 16384
#: Elements per program that the elementwise kernels aim for.
TILE_ELEMS = 4096
#: Column-wise absmax: aim for about this many programs, splitting the token dimension when columns are few.
COLWISE_TARGET_PROGRAMS = 512
COLWISE_MAX_SPLIT = 64
#: Partial sums the second stage of :func:`weight_stats` adds per step.
STATS_CHUNK = 1024


@triton.jit
def _round_half_even(y):
    """``torch.round`` for float32: nearest integer, ties to even. Exact: ``y - floor(y)`` is representable."""
    r = tl.floor(y)
    frac = y - r
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where((frac > 0.5) | ((frac == 0.5) & odd), r + 1.0, r)


@triton.jit
def _to_int8(y, lo: tl.constexpr, hi: tl.constexpr):
    """``clamp(round(y), lo, hi)`` as int8. Clamping first is equivalent (round is monotone, lo/hi integers)
    and keeps the rounding formula in a small range."""
    return _round_half_even(tl.minimum(tl.maximum(y, lo), hi)).to(tl.int8)


def _num_warps(tile_elems: int) -> int:
    """About 16 elements per thread, 1 to 16 warps."""
    return max(1, min(16, tile_elems // 512))


# --- per-row int8 (activations, grad_output) --------------------------------------------------------------


@triton.jit
def _quantize_rowwise_kernel(
    x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_xk, eps,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, ONE_PASS: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    cols = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rows[:, None].to(tl.int64) * stride_xm
    q_rows = q_ptr + rows[:, None].to(tl.int64) * K
    if ONE_PASS:
        mask = row_ok[:, None] & (cols[None, :] < K)
        x = tl.load(x_rows + cols[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(x), axis=1), eps) / 127.0
        tl.store(q_rows + cols[None, :], _to_int8(x / scale[:, None], -128.0, 127.0), mask=mask)
    else:
        absmax = tl.zeros((BLOCK_M,), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            mask = row_ok[:, None] & (k0 + cols[None, :] < K)
            x = tl.load(x_rows + (k0 + cols[None, :]) * stride_xk, mask=mask, other=0.0).to(tl.float32)
            absmax = tl.maximum(absmax, tl.max(tl.abs(x), axis=1))
        scale = tl.maximum(absmax, eps) / 127.0
        for k0 in range(0, K, BLOCK_K):
            mask = row_ok[:, None] & (k0 + cols[None, :] < K)
            x = tl.load(x_rows + (k0 + cols[None, :]) * stride_xk, mask=mask, other=0.0).to(tl.float32)
            tl.store(q_rows + k0 + cols[None, :], _to_int8(x / scale[:, None], -128.0, 127.0), mask=mask)
    tl.store(s_ptr + rows, scale, mask=row_ok)


def quantize_rowwise(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``reference.quantize_rowwise`` for a 2-D float tensor of any strides: ``(x_q int8 (M, K), s fp32 (M,))``."""
    check_tensors("quantize_rowwise", x)
    m, k = x.shape
    x_q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    scale = torch.empty(m, dtype=torch.float32, device=x.device)
    if m == 0:
        return x_q, scale
    one_pass = k <= ONE_PASS_MAX_K
    block_k = triton.next_power_of_2(k) if one_pass else TILE_ELEMS
    block_m = max(1, min(TILE_ELEMS // block_k, triton.next_power_of_2(m)))
    _quantize_rowwise_kernel[(triton.cdiv(m, block_m),)](
        x, x_q, scale, m, k, x.stride(0), x.stride(1), eps,
        BLOCK_M=block_m, BLOCK_K=block_k, ONE_PASS=one_pass, num_warps=_num_warps(block_m * block_k),
    )  # fmt: skip
    return x_q, scale


# --- per-column int8 of grad_output * s_x (the weight-gradient operand) --------------------------------------


@triton.jit
def _colwise_absmax_kernel(
    g_ptr, rs_ptr, part_ptr, M, N, stride_gm, stride_gn, rows_per_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Stage 1: absmax of ``g * rs[:, None]`` over one slice of rows, for one block of columns."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    absmax = tl.zeros((BLOCK_N,), tl.float32)
    row_end = tl.minimum(M, (split + 1) * rows_per_split)
    for m0 in range(split * rows_per_split, row_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        g = tl.load(
            g_ptr + rows[:, None].to(tl.int64) * stride_gm + cols[None, :] * stride_gn,
            mask=row_ok[:, None] & col_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        rs = tl.load(rs_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        absmax = tl.maximum(absmax, tl.max(tl.abs(g * rs[:, None]), axis=0))
    tl.store(part_ptr + split * N + cols, absmax, mask=col_ok)


@triton.jit
def _colwise_quantize_kernel(
    g_ptr, rs_ptr, part_ptr, q_ptr, s_ptr, M, N, stride_gm, stride_gn, eps, num_splits,
    SPLIT_POW2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Stage 2: reduce the ``num_splits`` partial absmaxes of these columns, then quantize one tile."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    splits = tl.arange(0, SPLIT_POW2)
    part = tl.load(
        part_ptr + splits[:, None] * N + cols[None, :],
        mask=(splits[:, None] < num_splits) & col_ok[None, :],
        other=0.0,
    )
    scale = tl.maximum(tl.max(part, axis=0), eps) / 127.0
    if pid_m == 0:
        tl.store(s_ptr + cols, scale, mask=col_ok)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    mask = row_ok[:, None] & col_ok[None, :]
    g_ptrs = g_ptr + rows[:, None].to(tl.int64) * stride_gm + cols[None, :] * stride_gn
    g = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
    rs = tl.load(rs_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    q = _to_int8((g * rs[:, None]) / scale[None, :], -128.0, 127.0)
    tl.store(q_ptr + rows[:, None].to(tl.int64) * N + cols[None, :], q, mask=mask)


def quantize_colwise_scaled(g: Tensor, row_scale: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``reference.quantize_colwise_scaled``: ``(g'_q int8 (M, N) row-major, s fp32 (N,))``.

    ``g'_q`` is written row-major, so the ``g'_q.T`` the weight gradient passes as ``a`` is the column-major
    ("TN") operand the matmul reads directly. Two launches: per-slice column absmaxes (the token dimension is
    split so that few columns still fill the GPU; max is exact, so the split changes nothing), then the
    quantization, which reduces the few partials of its columns itself.
    """
    check_tensors("quantize_colwise_scaled", g, row_scale)
    m, n = g.shape
    if row_scale.shape != (m,):
        raise ValueError(
            f"bitnet_ao.quantize_colwise_scaled: row_scale must have shape ({m},) for g {tuple(g.shape)}, "
            f"got {tuple(row_scale.shape)}"
        )
    g_q = torch.empty((m, n), dtype=torch.int8, device=g.device)
    scale = torch.empty(n, dtype=torch.float32, device=g.device)
    if n == 0:
        return g_q, scale
    block_n = min(64, triton.next_power_of_2(n))
    block_m = max(1, min(TILE_ELEMS // block_n, triton.next_power_of_2(max(m, 1))))
    col_blocks = triton.cdiv(n, block_n)
    split = max(1, min(triton.cdiv(m, block_m), triton.cdiv(COLWISE_TARGET_PROGRAMS, col_blocks), COLWISE_MAX_SPLIT))
    rows_per_split = max(1, triton.cdiv(triton.cdiv(m, split), block_m)) * block_m
    split = max(1, triton.cdiv(m, rows_per_split))
    partial = torch.empty((split, n), dtype=torch.float32, device=g.device)
    warps = _num_warps(block_m * block_n)
    _colwise_absmax_kernel[(col_blocks, split)](
        g, row_scale, partial, m, n, g.stride(0), g.stride(1), rows_per_split,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
    )  # fmt: skip
    _colwise_quantize_kernel[(max(1, triton.cdiv(m, block_m)), col_blocks)](
        g, row_scale, partial, g_q, scale, m, n, g.stride(0), g.stride(1), eps, split,
        SPLIT_POW2=triton.next_power_of_2(split), BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
    )  # fmt: skip
    return g_q, scale


# --- weight statistics: deterministic float64 sums ------------------------------------------------------------


@triton.jit
def _weight_stats_partial_kernel(
    w_ptr, part_ptr, R, C, stride_r, stride_c, num_parts,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Stage 1: ``(sum |w|, sum w)`` of one tile in float64, written to its own slot (no atomics)."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    w = tl.load(w_ptr + rows[:, None].to(tl.int64) * stride_r + cols[None, :] * stride_c, mask=mask, other=0.0)
    w = w.to(tl.float64)
    part = pid_r * tl.num_programs(1) + pid_c
    tl.store(part_ptr + part, tl.sum(tl.sum(tl.abs(w), axis=1), axis=0))
    tl.store(part_ptr + num_parts + part, tl.sum(tl.sum(w, axis=1), axis=0))


@triton.jit
def _weight_stats_final_kernel(part_ptr, out_ptr, num_parts, CHUNK: tl.constexpr):
    """Stage 2: one program adds the partials in a fixed order, so the result is the same on every run."""
    offs = tl.arange(0, CHUNK)
    abs_acc = tl.zeros((CHUNK,), tl.float64)
    sum_acc = tl.zeros((CHUNK,), tl.float64)
    for p0 in range(0, num_parts, CHUNK):
        mask = p0 + offs < num_parts
        abs_acc += tl.load(part_ptr + p0 + offs, mask=mask, other=0.0)
        sum_acc += tl.load(part_ptr + num_parts + p0 + offs, mask=mask, other=0.0)
    tl.store(out_ptr, tl.sum(abs_acc, axis=0))
    tl.store(out_ptr + 1, tl.sum(sum_acc, axis=0))


def weight_stats(w: Tensor) -> Tensor:
    """``reference.weight_stats``: ``(sum |w|, sum w)`` float64 ``(2,)``, deterministic and without host sync.

    Fixed tiles each write a float64 partial to their own slot; one program then adds them in order. No atomics,
    so the same weight gives the same bits on every run: sharded and single-device scales must agree
    (docs/numerics.md#weight-scales-under-fsdp2).
    """
    check_tensors("weight_stats", w)
    w2 = w if w.dim() == 2 else w.reshape(-1, w.shape[-1] if w.dim() else 1)
    r, c = w2.shape
    out = torch.zeros(2, dtype=torch.float64, device=w.device)
    if w2.numel() == 0:
        return out
    block_c = min(1024, triton.next_power_of_2(c))
    block_r = max(1, min(TILE_ELEMS // block_c, triton.next_power_of_2(r)))
    grid = (triton.cdiv(r, block_r), triton.cdiv(c, block_c))
    num_parts = grid[0] * grid[1]
    partial = torch.empty(2 * num_parts, dtype=torch.float64, device=w.device)
    _weight_stats_partial_kernel[grid](
        w2, partial, r, c, w2.stride(0), w2.stride(1), num_parts,
        BLOCK_R=block_r, BLOCK_C=block_c, num_warps=_num_warps(block_r * block_c),
    )  # fmt: skip
    _weight_stats_final_kernel[(1,)](partial, out, num_parts, CHUNK=STATS_CHUNK, num_warps=4)
    return out


# --- ternary / binary int8 weights, optionally written transposed ----------------------------------------------


@triton.jit
def _weight_to_int8_kernel(
    w_ptr, p_ptr, out_ptr, R, C, stride_wr, stride_wc, stride_or, stride_oc,
    BINARY: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Ternary ``clamp(round(w / max(p, WEIGHT_EPS)), -1, 1)`` or binary ``w - p >= 0 ? 1 : -1``, elementwise.

    ``p`` (the scale or the centre) is read from device memory: no host sync. The output strides decide whether
    ``(R, C)`` or its transpose is written."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    w_ptrs = w_ptr + rows[:, None].to(tl.int64) * stride_wr + cols[None, :] * stride_wc
    w = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)
    p = tl.load(p_ptr).to(tl.float32)
    q = tl.where(w - p >= 0.0, 1, -1).to(tl.int8) if BINARY else _to_int8(w / tl.maximum(p, _WEIGHT_EPS), -1.0, 1.0)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * stride_or + cols[None, :] * stride_oc, q, mask=mask)


def _weight_to_int8(op: str, w: Tensor, param: Tensor, transpose: bool, binary: bool) -> Tensor:
    check_tensors(op, w, param)
    if param.numel() != 1:
        raise ValueError(f"bitnet_ao.{op}: expected a one-element tensor, got shape {tuple(param.shape)}")
    r, c = w.shape
    out = torch.empty((c, r) if transpose else (r, c), dtype=torch.int8, device=w.device)
    if out.numel() == 0:
        return out
    stride_or, stride_oc = (1, r) if transpose else (c, 1)
    block_c = min(128, triton.next_power_of_2(c))
    block_r = max(1, min(TILE_ELEMS // block_c, triton.next_power_of_2(r)))
    _weight_to_int8_kernel[(triton.cdiv(r, block_r), triton.cdiv(c, block_c))](
        w, param, out, r, c, w.stride(0), w.stride(1), stride_or, stride_oc,
        BINARY=binary, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=_num_warps(block_r * block_c),
    )  # fmt: skip
    return out


def ternarize(w: Tensor, scale: Tensor, transpose: bool) -> Tensor:
    """``reference.ternarize``; ``transpose=True`` writes the ``(K, N)`` layout directly (no extra copy)."""
    return _weight_to_int8("ternarize", w, scale, transpose, binary=False)


def binarize(w: Tensor, center: Tensor, transpose: bool) -> Tensor:
    """``reference.binarize``; ``transpose=True`` writes the ``(K, N)`` layout directly (no extra copy)."""
    return _weight_to_int8("binarize", w, center, transpose, binary=True)
