"""The BitNet linear: the autograd function of docs/numerics.md (#forward, #backward), and the weight interface it
talks to.

Forward: ``y = (x_q @ W_q.T) * s_x[:, None] * s_w + b`` with ``x_q`` the per-token int8 activation and ``W_q``
the ternary (or binary) weight, accumulated exactly in int32.

Backward (straight-through estimator, reference: the fake-quant module ``y = x_fq @ W_fq.T``):
- ``grad_x = grad_y @ W_fq``: INT8 with ``grad_y`` quantized per row when ``config.int8_grad_input``.
- ``grad_W = grad_y.T @ x_fq``: INT8 with ``grad_y * s_x`` quantized per column when ``config.int8_grad_weight``,
  reusing the saved ``x_q`` exactly.

The function never looks at what kind of weight it got: every weight kind (the master-weight subclass, the FSDP2
packed all-gather output, ...) implements :class:`BitNetWeight`, and the function only calls its methods.
Saved for backward (docs/numerics.md#saved-for-backward, :class:`_Saved`): ``x_q`` (int8; packed for grad_weight's
matmul where the device's matmul takes it packed), ``s_x``, the weight's :class:`WeightQuantization` and the weight
object itself (the parameter, no copy).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple, Protocol, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from . import kernels
from .config import BitNetTrainingConfig
from .group_scales import dequantize_groups, quantize_groups
from .kernels.ranges import LINEAR_RANGE, kernel_range
from .kernels.reference import ACTIVATION_EPS, GRADIENT_EPS
from .weight_quant import WeightQuantization


class InputNorm(NamedTuple):
    """An RMSNorm applied to the linear's input inside the linear: fused with the activation quantization."""

    weight: Tensor
    eps: float


class BitNetWeight(Protocol):
    """What the BitNet autograd function needs from a weight of shape ``(N, K)``. Every weight kind implements it."""

    shape: torch.Size
    dtype: torch.dtype
    config: BitNetTrainingConfig
    #: ``lambda`` of quantization warmup (:class:`bitnet_ao.warmup.QuantizationWarmup`): ``None`` is ``lambda =
    #: 1``, the BitNet linear; a 0-d tensor below 1 makes the linear blend full precision and fake quantization
    #: (:func:`warmup_linear`). Which of the two is decided by whether it is set, never by its value, so neither
    #: eager nor compiled code reads it on the host.
    quantization_strength: Tensor | None

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
        *,
        transpose: bool,
        row_scale: Tensor,
        bias: Tensor | None,
        out_dtype: torch.dtype,
    ) -> Tensor:
        """``a @ W_q.T`` (``transpose``, the forward) or ``a @ W_q`` (``grad_input``) from int8 ``a``, accumulated
        exactly in int32, times ``row_scale[:, None] * q.scale``, cast to ``out_dtype``, plus ``bias``."""
        ...

    def bitnet_forward(
        self, x2: Tensor, *, norm: InputNorm | None, bias: Tensor | None, out_dtype: torch.dtype
    ) -> Tensor | None:
        """The optional fast path when nothing needs a gradient: the whole forward of the flattened ``(M, K)``
        input (through ``norm`` first when given) in one fused step, with the numbers of the general path
        (quantize the input, :meth:`bitnet_mm`). ``None`` where this weight has no fused forward for this call:
        :func:`bitnet_linear` then takes the general path."""
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


def dequantize_weight(weight: BitNetWeight, q: WeightQuantization, dtype: torch.dtype) -> Tensor:
    """``W_q * s_w`` in ``dtype``: the weight the INT8 path multiplies by, as high-precision values."""
    return weight.bitnet_int8(q).to(dtype) * q.scale.to(dtype)


class _Forward(NamedTuple):
    """The forward on the flattened input: the output and what the backward needs of it."""

    y: Tensor
    #: The int8 input and its per-token (per token and group) scales; the whole sequence's with a gather.
    x_q: Tensor
    s_x: Tensor
    q: WeightQuantization
    #: The fused norm's reciprocal RMS per token; ``None`` without a norm.
    rstd: Tensor | None


def _forward(
    x2: Tensor,
    weight: BitNetWeight,
    *,
    bias: Tensor | None,
    out_dtype: torch.dtype,
    norm: InputNorm | None,
    gather: SequenceGather | None,
) -> _Forward:
    """The forward on the flattened ``(M, K)`` input."""
    config = weight.config
    rstd = None
    if norm is None:
        # Row-parallel groups: one activation scale per (token, group of K / G inputs).
        x_q, s_x = quantize_groups(x2, config.scale_groups if config.group_dim == 1 else 1, ACTIVATION_EPS)
    else:
        x_q, s_x, rstd = kernels.rms_norm_quantize_rowwise(x2, norm.weight, norm.eps, out_dtype, ACTIVATION_EPS)
    if gather is not None:
        x_q, s_x = gather.gather(x_q, s_x)
    q = weight.bitnet_quantization()
    y = weight.bitnet_mm(x_q, q, transpose=True, row_scale=s_x, bias=bias, out_dtype=out_dtype)
    return _Forward(y=y, x_q=x_q, s_x=s_x, q=q, rstd=rstd)


class _Options(NamedTuple):
    """The arguments of :class:`_BitNetLinearFunction` that are not tensors. ``Function.apply`` takes positional
    arguments only, and only positional tensors get gradients: the tensors come one by one, these in one record."""

    out_dtype: torch.dtype
    norm_eps: float
    gather: SequenceGather | None


class _Saved(NamedTuple):
    """What the forward saves for the backward (docs/numerics.md#saved-for-backward), in ``save_for_backward``'s
    order. Tensors only (or ``None``), so that saved-tensor hooks (offloading, checkpointing) see all of them."""

    #: The int8 input, or, where grad_weight's matmul takes its right operand packed ahead of time
    #: (``kernels.prepacks_operand``), that operand packed in the forward, while ``x_q`` is in cache: read again
    #: in the backward, ``x_q`` came from memory, and packing it there cost twice the packing here.
    x_q: Tensor
    s_x: Tensor
    #: The parameter itself, no copy: the backward quantizes it again with the saved scale.
    weight: BitNetWeight
    #: The fields of the forward's :class:`WeightQuantization` that are tensors.
    scale: Tensor
    center: Tensor | None
    #: The fused norm's input, gain and reciprocal RMS, for its backward; ``None`` without a norm.
    x2: Tensor | None
    norm_weight: Tensor | None
    rstd: Tensor | None


_Fn = TypeVar("_Fn", bound=Callable)


def _in_linear_range(fn: _Fn) -> _Fn:
    """``fn`` inside the BitNet linear's range (``kernels/ranges.py``), outside a torch.compile trace: a step profile
    counts the time in it that is not an int8 GEMM as BitNet's passes."""

    @functools.wraps(fn)
    def ranged(*args):
        if torch.compiler.is_compiling():
            return fn(*args)
        with kernel_range(LINEAR_RANGE):
            return fn(*args)

    return ranged  # type: ignore[return-value]


class _BitNetLinearFunction(torch.autograd.Function):
    @staticmethod
    @_in_linear_range
    def forward(
        ctx,
        x: Tensor,
        weight: BitNetWeight,
        bias: Tensor | None,
        norm_weight: Tensor | None,
        options: _Options,
    ) -> Tensor:
        x2 = x.reshape(-1, weight.shape[1])
        norm = InputNorm(norm_weight, options.norm_eps) if norm_weight is not None else None
        fwd = _forward(x2, weight, bias=bias, out_dtype=options.out_dtype, norm=norm, gather=options.gather)
        config = weight.config
        # One scale per token (no groups), an INT8 grad_weight to come, and a matmul that takes its operand packed.
        prepacked = (
            ctx.needs_input_grad[1]
            and config.int8_grad_weight
            and fwd.s_x.dim() == 1
            and kernels.prepacks_operand(fwd.x_q, b_ternary=False)
        )
        saved = _Saved(
            x_q=kernels.pack_operand(fwd.x_q, False) if prepacked else fwd.x_q,
            s_x=fwd.s_x,
            weight=weight,
            scale=fwd.q.scale,
            center=fwd.q.center,
            x2=x2 if norm is not None else None,
            norm_weight=norm_weight,
            rstd=fwd.rstd,
        )
        ctx.save_for_backward(*saved)
        ctx.config = config
        ctx.x_prepacked = prepacked
        ctx.x_shape = x.shape
        ctx.norm = norm is not None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.gather = options.gather
        return _unflatten(fwd.y, x.shape, options.gather is not None)

    @staticmethod
    @_in_linear_range
    def backward(ctx, grad_y: Tensor):
        saved = _Saved(*ctx.saved_tensors)
        x_q, s_x, weight = saved.x_q, saved.s_x, saved.weight
        q = WeightQuantization(scale=saved.scale, center=saved.center)
        config: BitNetTrainingConfig = ctx.config
        needs_grad_input, needs_grad_weight, needs_grad_bias, needs_grad_norm = ctx.needs_input_grad[:4]
        g = grad_y.reshape(-1, weight.shape[0])
        grad_x = grad_w = grad_b = grad_norm = None
        needs_grad_x = needs_grad_input or (ctx.norm and needs_grad_norm)
        # Both INT8 products quantize g (per row, and per column after folding s_x in): one op for both.
        both = config.int8_grad_input and config.int8_grad_weight and not config.grouped
        g_rows = g_cols = None
        if both and needs_grad_x and needs_grad_weight:
            g_q, s_g, g_q_cols, s_g_cols = kernels.quantize_grad_output(g, s_x, GRADIENT_EPS)
            g_rows, g_cols = (g_q, s_g), (g_q_cols, s_g_cols)

        if needs_grad_x:
            if config.int8_grad_input:
                # Column-parallel groups: one gradient scale per (token, group of N / G outputs).
                groups = config.scale_groups if config.group_dim == 0 else 1
                g_q, s_g = g_rows or quantize_groups(g, groups, GRADIENT_EPS)
                grad_x = weight.bitnet_mm(g_q, q, transpose=False, row_scale=s_g, bias=None, out_dtype=g.dtype)
            elif config.grouped:
                grad_x = g @ dequantize_weight(weight, q, g.dtype)
            else:
                grad_x = (g @ weight.bitnet_int8(q).to(g.dtype)) * q.scale.to(g.dtype)
            if ctx.gather is not None:
                grad_x = ctx.gather.scatter(grad_x)
            if ctx.norm:
                # grad_x is the gradient of the normalized input; the norm's backward takes it to x. It reaches the
                # norm in x's dtype, as through the cast between an unfused norm and linear: the same numbers. A
                # widening cast (bfloat16 into a float32 residual stream) changes no value, and the norm's backward
                # reads its input as float32 anyway: it is skipped (a whole pass over grad_x).
                x2 = saved.x2
                widening = x2.dtype == torch.float32 and grad_x.dtype in (torch.bfloat16, torch.float16)
                dy = grad_x if widening else grad_x.to(x2.dtype)
                grad_x, grad_norm = kernels.rms_norm_backward(dy, x2, saved.norm_weight, saved.rstd)
            grad_x = grad_x.reshape(ctx.x_shape)

        if needs_grad_weight:
            # s_x is (M,), or (M, G) for row-parallel groups: then each block of K / G columns has its own.
            groups = s_x.shape[1] if s_x.dim() == 2 else 1
            if ctx.x_prepacked:
                g_q, s_g = g_cols or kernels.quantize_colwise_scaled(g, s_x, GRADIENT_EPS)
                grad_w = kernels.scaled_int8_mm_prepacked(
                    g_q.t(), x_q, weight.shape[1], row_scale=s_g, col_scale=None, scale=None, bias=None,
                    out_dtype=weight.dtype, b_ternary=False,
                )  # fmt: skip
            elif config.int8_grad_weight:
                blocks = []
                per_group = zip(x_q.chunk(groups, dim=1), s_x.reshape(s_x.shape[0], groups).unbind(1), strict=True)
                for x_q_g, s_x_g in per_group:
                    g_q, s_g = g_cols or kernels.quantize_colwise_scaled(g, s_x_g.contiguous(), GRADIENT_EPS)
                    blocks.append(
                        kernels.scaled_int8_mm(
                            g_q.t(),
                            x_q_g.contiguous(),
                            row_scale=s_g,
                            col_scale=None,
                            scale=None,
                            bias=None,
                            out_dtype=weight.dtype,
                        )
                    )
                grad_w = blocks[0] if groups == 1 else torch.cat(blocks, dim=1)
            else:
                x_fq = dequantize_groups(x_q, s_x).to(g.dtype)
                grad_w = (g.t() @ x_fq).to(weight.dtype)

        if needs_grad_bias:
            grad_b = g.sum(0).to(ctx.bias_dtype)

        return grad_x, grad_w, grad_b, grad_norm, None


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
    if weight.quantization_strength is not None:
        if sequence_gather is not None:
            raise NotImplementedError(
                f"{_describe(weight)}: quantization warmup runs without sequence parallelism; warm up first, or "
                "parallelize without sequence parallelism"
            )
        return warmup_linear(input, weight, bias, input_norm, dtype)
    norm_weight, norm_eps = input_norm if input_norm is not None else (None, 0.0)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input, weight, bias, norm_weight)):
        options = _Options(out_dtype=dtype, norm_eps=norm_eps, gather=sequence_gather)
        return _BitNetLinearFunction.apply(input, weight, bias, norm_weight, options)
    # Nothing to differentiate (inference, frozen weights): skip the autograd function and what it saves, and take
    # the weight's fused forward where it has one (BitNetWeight.bitnet_forward; not across a sequence gather).
    x2 = input.reshape(-1, weight.shape[1])
    y = None
    if sequence_gather is None:
        y = weight.bitnet_forward(x2, norm=input_norm, bias=bias, out_dtype=dtype)
    if y is None:
        fwd = _forward(x2, weight, bias=bias, out_dtype=dtype, norm=input_norm, gather=sequence_gather)
        y = fwd.y
    return _unflatten(y, input.shape, sequence_gather is not None)


def warmup_linear(
    input: Tensor, weight: BitNetWeight, bias: Tensor | None, input_norm: InputNorm | None, dtype: torch.dtype
) -> Tensor:
    """The linear during quantization warmup (docs/finetuning.md): with ``lambda = weight.quantization_strength``
    (a 0-d tensor) it computes ``F.linear(x + lambda (fq(x) - x), W + lambda (fq(W) - W), b)`` in ``dtype``, where
    ``fq`` is the BitNet fake quantization (the int8 values times their scales, exactly what the INT8 path
    multiplies) and the blends are straight-through: the gradient reaches ``x`` and the master weight as if they
    were not there.

    ``lambda = 0`` is the full-precision linear the model was pretrained with, and moving it to 1 over a few
    hundred steps lets a pretrained model adapt to the quantization gradually instead of all at once (Hugging
    Face's "Fine-tuning LLMs to 1.58bit"). The matmuls run in ``dtype`` (the cost of the baseline linear plus one
    quantization pass over ``x`` and ``W``); at ``lambda = 1`` (``None``) :func:`bitnet_linear` takes the INT8
    path instead. ``lambda`` enters as a tensor, so a compiled graph takes each new value as an input.
    """
    strength = weight.quantization_strength
    if input_norm is not None:
        input = F.rms_norm(input.float(), (input.shape[-1],), input_norm.weight.float(), input_norm.eps)
    x2 = input.to(dtype).reshape(-1, weight.shape[1])
    config = weight.config
    with torch.no_grad():
        groups = config.scale_groups if config.group_dim == 1 else 1
        x_step = (dequantize_groups(*quantize_groups(x2, groups, ACTIVATION_EPS)).to(dtype) - x2) * strength
        w_step = (dequantize_weight(weight, weight.bitnet_quantization(), weight.dtype) - weight) * strength
    w = (weight + w_step).to(dtype)
    y = F.linear(x2 + x_step, w, bias)
    return _unflatten(y, input.shape, gathered=False)


def _unflatten(y: Tensor, x_shape: torch.Size, gathered: bool) -> Tensor:
    """The ``(M, N)`` output in the input's leading shape; gathered along the sequence (dim -2) it is longer."""
    return y.reshape(*x_shape[:-2], -1, y.shape[1]) if gathered else y.reshape(*x_shape[:-1], y.shape[1])
