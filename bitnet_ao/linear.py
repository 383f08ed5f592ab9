"""The BitNet linear: the autograd function of docs/numerics.md (#forward, #backward), and the weight interface it
talks to.

Forward: ``y = (x_q @ W_q.T) * s_x[:, None] * s_w + b`` with ``x_q`` the per-token int8 activation and ``W_q``
the ternary (or binary) weight, accumulated exactly in int32.

Backward (straight-through estimator, reference: the fake-quant module ``y = x_fq @ W_fq.T``):
- ``grad_x = grad_y @ W_fq``: INT8 with ``grad_y`` quantized per row when ``config.int8_grad_input``.
- ``grad_W = grad_y.T @ x_fq``: INT8 with ``grad_y * s_x`` quantized per column when ``config.int8_grad_weight``,
  reusing the saved ``x_q`` exactly.

The function never looks at what kind of weight it got: every weight kind (the master-weight subclass, the FSDP2
packed all-gather output, ...) implements :class:`BitNetWeight`, and the function only calls those three methods.
Saved for backward (docs/numerics.md#saved-for-backward): ``x_q`` (int8), ``s_x``, the weight's
:class:`WeightQuantization` and the weight object itself (the parameter, no copy).
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from . import kernels
from .config import BitNetTrainingConfig
from .kernels.reference import ACTIVATION_EPS, GRADIENT_EPS
from .weight_quant import WeightQuantization


class BitNetWeight(Protocol):
    """What the BitNet autograd function needs from a weight of shape ``(N, K)``. Every weight kind implements it."""

    shape: torch.Size
    dtype: torch.dtype
    config: BitNetTrainingConfig

    def bitnet_quantization(self) -> WeightQuantization:
        """The scale (and binary centre) this forward quantizes the weight with; saved for the backward."""
        ...

    def bitnet_int8(self, q: WeightQuantization) -> Tensor:
        """The ``(N, K)`` int8 weight, for the high-precision ``grad_input``."""
        ...

    def bitnet_mm(
        self,
        a: Tensor,
        q: WeightQuantization,
        transpose: bool,
        row_scale: Tensor,
        bias: Tensor | None,
        out_dtype: torch.dtype,
    ) -> Tensor:
        """``a @ W_q.T`` (``transpose``, the forward) or ``a @ W_q`` (``grad_input``) from int8 ``a``, accumulated
        exactly in int32, times ``row_scale[:, None] * q.scale``, cast to ``out_dtype``, plus ``bias``."""
        ...


def is_bitnet_weight(weight: Tensor) -> bool:
    """Whether ``weight`` is a BitNet weight of any kind (implements :class:`BitNetWeight`). A check on the class,
    which torch.compile folds to a constant (it cannot trace ``isinstance`` against a protocol)."""
    return callable(getattr(type(weight), "bitnet_mm", None))


class SequenceGather(Protocol):
    """Sequence parallelism (``bitnet_ao.tensor_parallel``): the input arrives sharded along the sequence (dim -2
    of ``x``). The linear quantizes its shard, which per-token scales allow exactly, and gathers the int8 values and
    scales instead of the high-precision activation; in the backward the input gradient, a partial sum over the
    tensor-parallel ranks, goes back to the shard."""

    def gather(self, x_q: Tensor, s_x: Tensor) -> tuple[Tensor, Tensor]:
        """``(M_local, K)`` int8 and ``(M_local,)`` scales -> the whole sequence's, ``(M, K)`` and ``(M,)``."""
        ...

    def scatter(self, grad_x: Tensor) -> Tensor:
        """``(M, K)`` partial input gradient -> this rank's ``(M_local, K)``, summed over the ranks."""
        ...


class InputNorm(NamedTuple):
    """An RMSNorm applied to the linear's input inside the linear: fused with the activation quantization."""

    weight: Tensor
    eps: float


def quantize_groups(t: Tensor, groups: int, eps: float) -> tuple[Tensor, Tensor]:
    """Per-row int8 quantization of each of ``groups`` equal column blocks of ``t (M, C)``: ``(t_q (M, C), s (M,
    groups))``; the plain per-row quantization, scale ``(M,)``, for one group."""
    if groups == 1:
        return kernels.quantize_rowwise(t, eps)
    m, c = t.shape
    t_q, s = kernels.quantize_rowwise(t.reshape(m * groups, c // groups), eps)
    return t_q.view(m, c), s.view(m, groups)


def scaled_mm_groups(
    a: Tensor,
    b: Tensor,
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
        return kernels.scaled_int8_mm(a, b, row_scale, None, q.scale, bias, out_dtype, b_ternary=True)
    if (config.group_dim == 0) == transpose:
        return kernels.scaled_int8_mm(a, b, row_scale, q.scale.flatten(), None, bias, out_dtype, b_ternary=True)
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
            a[:, blocks].contiguous(), b_g, row_scale[:, g].contiguous(), None, per_group[g], None, torch.float32, True
        )
        out = part if out is None else out + part
    out = out.to(out_dtype)
    return out + bias.to(out_dtype) if bias is not None else out


def _forward(
    x2: Tensor,
    weight: BitNetWeight,
    bias: Tensor | None,
    out_dtype: torch.dtype,
    norm_weight: Tensor | None,
    norm_eps: float,
    gather: SequenceGather | None = None,
) -> tuple[Tensor, Tensor, Tensor, WeightQuantization, Tensor | None]:
    """The forward on the flattened ``(M, K)`` input: ``(y, x_q, s_x, q, rstd)``, rstd ``None`` without a norm;
    ``x_q`` and ``s_x`` are the whole sequence's with ``gather``."""
    rstd = None
    config = weight.config
    if norm_weight is None:
        # Row-parallel groups: one activation scale per (token, group of K / G inputs).
        x_q, s_x = quantize_groups(x2, config.scale_groups if config.group_dim == 1 else 1, ACTIVATION_EPS)
    else:
        x_q, s_x, rstd = kernels.rms_norm_quantize_rowwise(x2, norm_weight, norm_eps, out_dtype, ACTIVATION_EPS)
    if gather is not None:
        x_q, s_x = gather.gather(x_q, s_x)
    q = weight.bitnet_quantization()
    return weight.bitnet_mm(x_q, q, True, s_x, bias, out_dtype), x_q, s_x, q, rstd


class _BitNetLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x: Tensor,
        weight: BitNetWeight,
        bias: Tensor | None,
        config: BitNetTrainingConfig,
        out_dtype: torch.dtype,
        norm_weight: Tensor | None,
        norm_eps: float,
        gather: SequenceGather | None,
    ) -> Tensor:
        x2 = x.reshape(-1, weight.shape[1])
        y, x_q, s_x, q, rstd = _forward(x2, weight, bias, out_dtype, norm_weight, norm_eps, gather)
        saved_norm = (x2, norm_weight, rstd) if norm_weight is not None else ()
        ctx.save_for_backward(x_q, s_x, weight, *saved_norm, *q)
        ctx.config = config
        ctx.x_shape = x.shape
        ctx.norm = norm_weight is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.gather = gather
        return _unflatten(y, x.shape, gather is not None)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x_q, s_x, weight, *saved = ctx.saved_tensors
        x2, norm_weight, rstd = saved[:3] if ctx.norm else (None, None, None)
        q = WeightQuantization(*saved[3:] if ctx.norm else saved)
        config: BitNetTrainingConfig = ctx.config
        g = grad_y.reshape(-1, weight.shape[0])
        grad_x = grad_w = grad_b = grad_norm = None
        needs_grad_x = ctx.needs_input_grad[0] or (ctx.norm and ctx.needs_input_grad[5])
        # Both INT8 products quantize g (per row, and per column after folding s_x in): one read of g for both.
        both = config.int8_grad_input and config.int8_grad_weight and not config.grouped
        g_rows = g_cols = None
        if both and needs_grad_x and ctx.needs_input_grad[1]:
            g_q, s_g, g_q_cols, s_g_cols = kernels.quantize_grad_output(g, s_x, GRADIENT_EPS)
            g_rows, g_cols = (g_q, s_g), (g_q_cols, s_g_cols)

        if needs_grad_x:
            if config.int8_grad_input:
                # Column-parallel groups: one gradient scale per (token, group of N / G outputs).
                groups = config.scale_groups if config.group_dim == 0 else 1
                g_q, s_g = g_rows or quantize_groups(g, groups, GRADIENT_EPS)
                grad_x = weight.bitnet_mm(g_q, q, False, s_g, None, g.dtype)
            elif config.grouped:
                grad_x = g @ (weight.bitnet_int8(q).to(g.dtype) * q.scale.to(g.dtype))
            else:
                grad_x = (g @ weight.bitnet_int8(q).to(g.dtype)) * q.scale.to(g.dtype)
            if ctx.gather is not None:
                grad_x = ctx.gather.scatter(grad_x)
            if ctx.norm:
                # grad_x is the gradient of the normalized input; the norm's backward takes it to x. It reaches the
                # norm in x's dtype, as through the cast between an unfused norm and linear: the same numbers.
                grad_x, grad_norm = kernels.rms_norm_backward(grad_x.to(x2.dtype), x2, norm_weight, rstd)
            grad_x = grad_x.reshape(ctx.x_shape)

        if ctx.needs_input_grad[1]:
            # s_x is (M,), or (M, G) for row-parallel groups: then each block of K / G columns has its own.
            groups = s_x.shape[1] if s_x.dim() == 2 else 1
            if config.int8_grad_weight:
                blocks = []
                per_group = zip(x_q.chunk(groups, dim=1), s_x.reshape(s_x.shape[0], groups).unbind(1), strict=True)
                for x_q_g, s_x_g in per_group:
                    g_q, s_g = g_cols or kernels.quantize_colwise_scaled(g, s_x_g.contiguous(), GRADIENT_EPS)
                    blocks.append(
                        kernels.scaled_int8_mm(g_q.t(), x_q_g.contiguous(), s_g, None, None, None, weight.dtype)
                    )
                grad_w = blocks[0] if groups == 1 else torch.cat(blocks, dim=1)
            else:
                s_cols = s_x[:, None] if groups == 1 else s_x.repeat_interleave(x_q.shape[1] // groups, dim=1)
                x_fq = (x_q * s_cols).to(g.dtype)
                grad_w = (g.t() @ x_fq).to(weight.dtype)

        if ctx.needs_input_grad[2]:
            grad_b = g.sum(0).to(ctx.bias_dtype)

        return grad_x, grad_w, grad_b, None, None, grad_norm, None, None


def _describe(weight: BitNetWeight) -> str:
    n, k = weight.shape
    return f"BitNet linear (nn.Linear(in_features={k}, out_features={n}), {type(weight).__name__})"


def _check_inputs(x: Tensor, weight: BitNetWeight, bias: Tensor | None) -> None:
    n, k = weight.shape
    if not x.dtype.is_floating_point:
        raise TypeError(f"{_describe(weight)}: input must be floating point, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(f"{_describe(weight)}: input of shape {tuple(x.shape)} does not end in in_features={k}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"{_describe(weight)}: bias of shape {tuple(bias.shape)}, expected ({n},)")


def bitnet_linear(
    input: Tensor,
    weight: BitNetWeight,
    bias: Tensor | None = None,
    input_norm: InputNorm | None = None,
    sequence_gather: SequenceGather | None = None,
) -> Tensor:
    """``F.linear`` for a BitNet weight. Under autocast the input and bias are cast to the autocast dtype first,
    as autocast would for a plain linear; the output has the (cast) input's dtype.

    ``input_norm``: ``F.linear(rms_norm(input), ...)`` with the norm fused into the activation quantization (one
    pass over the input instead of three), the same int8 values as the norm followed by the linear. The norm runs
    in float32 on the input as it is (like ``bitnet_ao.norm.RMSNorm``, not under autocast), and its output is
    rounded to the dtype the linear computes in before it is quantized.

    ``sequence_gather``: sequence parallelism, see :class:`SequenceGather`; the output covers the whole sequence."""
    _check_inputs(input, weight, bias)
    device_type = input.device.type
    # Devices without autocast (meta: shape inference and model sizing) cannot even be asked about it.
    autocast = torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
    dtype = torch.get_autocast_dtype(device_type) if autocast else input.dtype
    if input_norm is None:
        input = input.to(dtype)
    if bias is not None:
        bias = bias.to(dtype)
    norm_weight, norm_eps = input_norm if input_norm is not None else (None, 0.0)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input, weight, bias, norm_weight)):
        return _BitNetLinearFunction.apply(
            input, weight, bias, weight.config, dtype, norm_weight, norm_eps, sequence_gather
        )
    # Nothing to differentiate (inference, frozen weights): skip the autograd function and what it saves, and take
    # the weight's fused forward where it has one (the optional BitNetWeight.bitnet_forward).
    x2 = input.reshape(-1, weight.shape[1])
    fused = getattr(type(weight), "bitnet_forward", None) if sequence_gather is None else None
    y = fused(weight, x2, norm_weight, norm_eps, bias, dtype) if fused is not None else None
    if y is None:
        y = _forward(x2, weight, bias, dtype, norm_weight, norm_eps, sequence_gather)[0]
    return _unflatten(y, input.shape, sequence_gather is not None)


def _unflatten(y: Tensor, x_shape: torch.Size, gathered: bool) -> Tensor:
    """The ``(M, N)`` output in the input's leading shape; gathered along the sequence (dim -2) it is longer."""
    return y.reshape(*x_shape[:-2], -1, y.shape[1]) if gathered else y.reshape(*x_shape[:-1], y.shape[1])
