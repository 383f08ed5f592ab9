"""Group scales as maths (docs/numerics.md#group-scales-for-tensor-parallelism): per-row int8 quantization of
column blocks, its dequantization, and the scaled int8 matmul of a BitNet weight whose scale is one value, one per
output row or one per input column.

Below the autograd function (``linear.py``, which quantizes activations and gradients with them) and below every
weight kind (``packed.py``, ``tensor.py``, whose ``bitnet_mm`` ends in :func:`scaled_mm_groups`): the one place
that turns a recipe's ``scale_groups`` / ``group_dim`` into matmuls.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import kernels
from .config import BitNetTrainingConfig
from .weight_quant import WeightQuantization


def quantize_groups(t: Tensor, groups: int, eps: float) -> tuple[Tensor, Tensor]:
    """Per-row int8 quantization of each of ``groups`` equal column blocks of ``t (M, C)``: ``(t_q (M, C), s (M,
    groups))``; the plain per-row quantization, scale ``(M,)``, for one group."""
    if groups == 1:
        return kernels.quantize_rowwise(t, eps)
    m, c = t.shape
    t_q, s = kernels.quantize_rowwise(t.reshape(m * groups, c // groups), eps)
    return t_q.view(m, c), s.view(m, groups)


def dequantize_groups(t_q: Tensor, s: Tensor) -> Tensor:
    """``t_q * s`` in float32, the fake-quantized values :func:`quantize_groups` stands for: ``s`` is ``(M,)``, or
    ``(M, G)`` with one scale per row of each of ``G`` equal column blocks."""
    if s.dim() == 1:
        return t_q * s[:, None]
    m, c = t_q.shape
    return (t_q.reshape(m, s.shape[1], c // s.shape[1]) * s[:, :, None]).reshape(m, c)


def scaled_mm_groups(
    a: Tensor,
    b: Tensor,
    *,
    row_scale: Tensor,
    q: WeightQuantization,
    config: BitNetTrainingConfig,
    transpose: bool,
    bias: Tensor | None,
    out_dtype: torch.dtype,
) -> Tensor:
    """``a @ b`` for the int8 BitNet weight operand ``b`` (``W_q.T`` when ``transpose``, else ``W_q``), scaled by the
    row scales and the weight's scale(s) (docs/numerics.md#group-scales-for-tensor-parallelism): the shared body of
    every weight kind's ``bitnet_mm`` once it has ``b``.

    - One scale: one matmul, ``* row_scale[:, None] * s_w``.
    - Groups along ``b``'s columns (column-parallel forward, row-parallel ``grad_input``): one matmul, the group
      scales as per-column scales.
    - Groups along the reduction (row-parallel forward, column-parallel ``grad_input``; ``row_scale`` is then
      ``(M, G)``): one matmul per group, ``(a_g @ b_g) * row_scale[:, g] * s_w[g]`` summed in float32.
    """
    if not config.grouped:
        return kernels.scaled_int8_mm(
            a, b, row_scale=row_scale, col_scale=None, scale=q.scale, bias=bias, out_dtype=out_dtype, b_ternary=True
        )
    if (config.group_dim == 0) == transpose:
        return kernels.scaled_int8_mm(
            a,
            b,
            row_scale=row_scale,
            col_scale=q.scale.flatten(),
            scale=None,
            bias=bias,
            out_dtype=out_dtype,
            b_ternary=True,
        )
    groups = row_scale.shape[1]
    size = b.shape[0] // groups
    per_group = q.scale.flatten()[::size]
    out = None
    for g in range(groups):
        blocks = slice(g * size, (g + 1) * size)
        b_g = b[blocks]
        if not (b_g.is_contiguous() or b_g.t().is_contiguous()):
            b_g = b_g.contiguous()
        part = kernels.scaled_int8_mm(
            a[:, blocks].contiguous(),
            b_g,
            row_scale=row_scale[:, g].contiguous(),
            col_scale=None,
            scale=per_group[g],
            bias=None,
            out_dtype=torch.float32,
            b_ternary=True,
        )
        out = part if out is None else out + part
    out = out.to(out_dtype)
    return out + bias.to(out_dtype) if bias is not None else out
