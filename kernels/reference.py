"""The BitNet b1.58 numerics contract as plain torch code.

Every implementation of a ``bitnet_ao`` op (the compiled CPU path, the Triton kernels) must produce the same
int8 values and int32 accumulations as these functions, bit for bit, and allclose scales and outputs.

The functions are written so they can also be handed to ``torch.compile``: the CPU backend compiles exactly
these bodies, so the fast path and the contract cannot drift apart.

Conventions (see docs/design.md):
- ``round`` is round-half-to-even (``torch.round``), all quantization math runs in float32.
- Scales are float32: one per row for activations and ``grad_output``, one per column for the folded
  ``grad_output * s_x`` of the weight gradient, one scalar for the weight.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Lower bound on the activation absmax before dividing by 127 (docs/numerics.md#forward).
ACTIVATION_EPS = 1e-5
#: Lower bound on the weight abs-mean before dividing by it (docs/numerics.md#forward).
WEIGHT_EPS = 1e-5
#: Lower bound on a gradient absmax. Gradients are routinely far below 1e-5 (a mean loss over many tokens),
#: so the activation bound would flush them to zero; this one only avoids 0/0 on all-zero rows.
GRADIENT_EPS = 1e-30

INT8_MAX = 127


def quantize_rowwise(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Per-row symmetric int8 quantization of a 2-D float tensor.

    ``s[m] = max(max_k |x[m, k]|, eps) / 127`` and ``x_q = clamp(round(x / s[m]), -128, 127)``.
    Returns ``(x_q int8 (M, K), s float32 (M,))``.
    """
    xf = x.float()
    scale = xf.abs().amax(dim=1).clamp(min=eps) / INT8_MAX
    x_q = (xf / scale[:, None]).round().clamp(-128, 127).to(torch.int8)
    return x_q, scale


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """RMSNorm over the last dimension of a 2-D ``x``: ``x / rms(x) * weight`` computed in float32 and cast back to
    ``x.dtype``, and ``rstd = 1 / rms(x)`` per row, shape ``(M, 1)`` float32, for the backward."""
    xf = x.float()
    rstd = rms_norm_rstd(xf, eps)
    return (xf * rstd * weight.float()).to(x.dtype), rstd


def rms_norm_rstd(xf: Tensor, eps: float) -> Tensor:
    """``1 / rms`` of each row of the float32 ``xf``, shape ``(M, 1)``: the one reduction of :func:`rms_norm`.
    The squares (exact in float64) are summed in float64, so that the order of the sum, which every implementation
    picks for itself, does not reach the float32 mean (docs/numerics.md#rmsnorm)."""
    mean_square = (xf.double().pow(2).sum(-1, keepdim=True) / xf.shape[-1]).float()
    return torch.rsqrt(mean_square + eps)


def rms_norm_backward(dy: Tensor, x: Tensor, weight: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`rms_norm` for the input (in ``x.dtype``) and the gain (in ``weight.dtype``)."""
    xhat = x.float() * rstd
    dxhat = dy.float() * weight.float()
    dx = rstd * (dxhat - xhat * (dxhat * xhat).mean(-1, keepdim=True))
    return dx.to(x.dtype), (dy.float() * xhat).sum(0).to(weight.dtype)


def rms_norm_quantize_rowwise(
    x: Tensor, weight: Tensor, norm_eps: float, norm_dtype: torch.dtype, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`rms_norm` then :func:`quantize_rowwise` in one pass: ``(x_q, s, rstd)``.

    The normalized row is rounded to ``norm_dtype`` (the dtype the linear would have received: the autocast dtype,
    or ``x.dtype``) before it is quantized, so the int8 values are exactly those of the norm followed by the
    quantization; fusing only saves writing and reading the normalized activation."""
    y, rstd = rms_norm(x, weight, norm_eps)
    x_q, scale = quantize_rowwise(y.to(norm_dtype), eps)
    return x_q, scale, rstd


def quantize_colwise_scaled(g: Tensor, row_scale: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Fold ``row_scale`` into ``g`` and quantize per column (the INT8 weight-gradient operand).

    ``g' = g * row_scale[:, None]``, ``s[n] = max(max_m |g'[m, n]|, eps) / 127``,
    ``g'_q = clamp(round(g' / s[n]), -128, 127)``. Returns ``(g'_q int8 (M, N), s float32 (N,))``.
    With ``row_scale = s_x`` this makes ``g'_q.T @ x_q * s[:, None]`` approximate ``g.T @ (x_q * s_x)``
    with a single quantization of the gradient.
    """
    gs = g.float() * row_scale[:, None]
    absmax = gs.new_zeros(gs.shape[1]) if gs.shape[0] == 0 else gs.abs().amax(dim=0)
    scale = absmax.clamp(min=eps) / INT8_MAX
    g_q = (gs / scale[None, :]).round().clamp(-128, 127).to(torch.int8)
    return g_q, scale


def quantize_grad_output(g: Tensor, row_scale: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Both quantizations of the output gradient that the INT8 backward needs, as one op (the CPU kernel reads
    ``g`` twice, not four times): :func:`quantize_rowwise` (the ``grad_input`` operand) and
    :func:`quantize_colwise_scaled` with ``row_scale`` (the ``grad_weight`` operand). Returns
    ``(g_q, s_g, g'_q, s_g')``, the same values as the two functions."""
    return (*quantize_rowwise(g, eps), *quantize_colwise_scaled(g, row_scale, eps))


def weight_stats(w: Tensor) -> Tensor:
    """``(sum |w|, sum w)`` accumulated in float64, shape ``(2,)``.

    Sums (not means) so that shards can be all-reduced and divided by the global element count: the
    sharded scale then equals the single-device scale (docs/numerics.md#weight-scales-under-fsdp2).
    """
    return torch.stack([w.abs().sum(dtype=torch.float64), w.sum(dtype=torch.float64)])


def weight_scales_from_stats(stats: Tensor, numel: int) -> tuple[Tensor, Tensor]:
    """``(s_w, alpha)`` as float32: the abs-mean scale and the mean (the binary-weight centre); scalars from
    ``(2,)`` stats, one per group from ``(G, 2)``."""
    means = stats / numel
    return means[..., 0].float(), means[..., 1].float()


def ternarize(w: Tensor, scale: Tensor, transpose: bool) -> Tensor:
    """BitNet b1.58 weight: ``clamp(round(w / max(scale, 1e-5)), -1, 1)`` as int8.

    ``transpose=True`` writes ``W_q.T`` contiguous, the ``(K, N)`` layout the forward matmul wants.
    """
    q = (w.float() / scale.clamp(min=WEIGHT_EPS)).round().clamp(-1, 1).to(torch.int8)
    return q.t().contiguous() if transpose else q


def binarize(w: Tensor, center: Tensor, transpose: bool) -> Tensor:
    """Original 1-bit BitNet weight: ``sign(w - center)`` with 0 mapped to +1, as int8 in {-1, +1}."""
    q = torch.where(w.float() - center >= 0, 1, -1).to(torch.int8)
    return q.t().contiguous() if transpose else q


def int8_mm(a: Tensor, b: Tensor) -> Tensor:
    """Exact integer ``a @ b`` for int8 operands, returned as int32.

    Computed in float64, which every device implements: each product is at most 2**14 in magnitude, so any sum
    of them with K < 2**39 terms is an integer float64 holds exactly.
    """
    return torch.mm(a.double(), b.double()).to(torch.int32)


def scale_output(
    acc: Tensor,
    row_scale: Tensor | None,
    col_scale: Tensor | None,
    scale: Tensor | None,
    bias: Tensor | None,
    out_dtype: torch.dtype,
) -> Tensor:
    """Epilogue of every scaled int8 matmul: ``acc * row[:, None] * col[None, :] * scale`` in float32, cast to
    ``out_dtype``, then ``+ bias`` in ``out_dtype`` (docs/numerics.md#forward)."""
    out = acc.float()
    if row_scale is not None:
        out = out * row_scale[:, None]
    if col_scale is not None:
        out = out * col_scale[None, :]
    if scale is not None:
        out = out * scale
    out = out.to(out_dtype)
    if bias is not None:
        out = out + bias.to(out_dtype)
    return out


def scaled_int8_mm(
    a: Tensor,
    b: Tensor,
    row_scale: Tensor | None,
    col_scale: Tensor | None,
    scale: Tensor | None,
    bias: Tensor | None,
    out_dtype: torch.dtype,
) -> Tensor:
    """``scale_output(int8_mm(a, b), ...)``: the reference for all three layouts (NT, NN, TN are just strides)."""
    return scale_output(int8_mm(a, b), row_scale, col_scale, scale, bias, out_dtype)


# --- packing: four 2-bit values (ternary) or eight 1-bit values (binary) per int8 byte ----------------------


def values_per_byte(bits: int) -> int:
    """4 for 2-bit (ternary) packing, 8 for 1-bit (binary) packing."""
    if bits not in (1, 2):
        raise ValueError(f"bitnet_ao packing: bits must be 1 (binary weights) or 2 (ternary weights), got {bits}")
    return 8 // bits


def packed_columns(k: int, bits: int) -> int:
    """Bytes per packed row of ``k`` values: ``ceil(k / values_per_byte(bits))``."""
    per = values_per_byte(bits)
    return (k + per - 1) // per


def _pack_fields(fields: Tensor, bits: int) -> Tensor:
    # fields: int32 codes in [0, 2**bits); code 4 j + i (2-bit) or 8 j + i (1-bit) of a row -> bits i*bits.. of byte j.
    per = values_per_byte(bits)
    pad = (-fields.shape[-1]) % per
    if pad:
        fields = torch.nn.functional.pad(fields, (0, pad))
    # Explicit sizes: a -1 is ambiguous for a tensor with no rows (an FSDP2 shard of a 1-row weight has none).
    v = fields.reshape(*fields.shape[:-1], fields.shape[-1] // per, per)
    packed = v[..., 0]
    for i in range(1, per):
        packed = packed | (v[..., i] << (bits * i))
    return packed.to(torch.uint8).view(torch.int8)


def _unpack_fields(packed: Tensor, bits: int) -> Tensor:
    # The int8 codes of every value, in row order; the arithmetic shift's sign bits are masked away.
    mask = (1 << bits) - 1
    fields = torch.stack([(packed >> (bits * i)) & mask for i in range(values_per_byte(bits))], dim=-1)
    return fields.reshape(*packed.shape[:-1], packed.shape[-1] * values_per_byte(bits))


def pack_i2_in_i8(x: Tensor) -> Tensor:
    """Pack int8 values in ``{-2, -1, 0, 1}`` four to a byte along the last dimension.

    Value ``4 j + i`` of a row goes to bits ``2 i .. 2 i + 1`` of byte ``j`` as 2-bit two's complement
    (``-1 -> 0b11``, ``0 -> 0b00``, ``1 -> 0b01``, ``-2 -> 0b10``). A last dimension that is not a multiple of
    4 is zero-padded, so the result has ``ceil(K / 4)`` bytes per row.
    """
    return _pack_fields(x.to(torch.int32) & 0b11, 2)


def unpack_i2_in_i8(packed: Tensor, k: int) -> Tensor:
    """Inverse of :func:`pack_i2_in_i8`: int8 values in ``{-2, -1, 0, 1}``, last dimension trimmed to ``k``."""
    codes = _unpack_fields(packed, 2)
    return (codes - 2 * (codes & 0b10))[..., :k]


def pack_i1_in_i8(x: Tensor) -> Tensor:
    """Pack int8 values in ``{-1, 1}`` (binary weights) eight to a byte along the last dimension.

    Value ``8 j + i`` of a row goes to bit ``i`` of byte ``j``: 1 for ``+1``, 0 for ``-1``. A last dimension
    that is not a multiple of 8 is padded with 0 bits, so the result has ``ceil(K / 8)`` bytes per row.
    """
    return _pack_fields((x > 0).to(torch.int32), 1)


def unpack_i1_in_i8(packed: Tensor, k: int) -> Tensor:
    """Inverse of :func:`pack_i1_in_i8`: int8 values in ``{-1, 1}``, last dimension trimmed to ``k``."""
    return (2 * _unpack_fields(packed, 1) - 1)[..., :k]


def pack_weight(q: Tensor, bits: int) -> Tensor:
    """A ternary (``bits=2``) or binary (``bits=1``) int8 weight packed along its last dimension."""
    return pack_i2_in_i8(q) if values_per_byte(bits) == 4 else pack_i1_in_i8(q)


def unpack_weight(packed: Tensor, k: int, bits: int) -> Tensor:
    """Inverse of :func:`pack_weight`: the int8 weight with last dimension ``k``."""
    return unpack_i2_in_i8(packed, k) if values_per_byte(bits) == 4 else unpack_i1_in_i8(packed, k)


def packed_matmul_dims(b_packed: Tensor, k: int, transpose_b: bool) -> tuple[int, int]:
    """``(out_columns, inner)`` of :func:`scaled_int8_mm_packed` for a ``(N, packed_columns(k, bits))`` ``B``:
    ``(N, k)`` for ``a @ B.T``, ``(k, N)`` for ``a @ B``."""
    n = b_packed.shape[0]
    return (n, k) if transpose_b else (k, n)


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
    """Scaled int8 matmul with a packed ``(N, packed_columns(k, bits))`` weight ``B`` (:func:`pack_weight`: the
    FSDP2 all-gather output and the inference weight).

    ``transpose_b=True``: ``a (M, k) @ B.T`` (forward, NT). ``transpose_b=False``: ``a (M, N) @ B`` (grad_input, NN).
    """
    b = unpack_weight(b_packed, k, bits)
    return scaled_int8_mm(a, b.t() if transpose_b else b, row_scale, col_scale, scale, bias, out_dtype)
