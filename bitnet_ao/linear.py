"""The BitNet linear: spec §1 forward and backward, written only in terms of the ``bitnet_ao`` ops.

Forward: ``y = (x_q @ W_q.T) * s_x[:, None] * s_w + b`` with ``x_q`` the per-token int8 activation and ``W_q``
the ternary (or binary) weight, accumulated exactly in int32.

Backward (straight-through estimator, reference: the fake-quant module ``y = x_fq @ W_fq.T``):
- ``grad_x = grad_y @ W_fq``: INT8 with ``grad_y`` quantized per row when ``config.int8_grad_input``.
- ``grad_W = grad_y.T @ x_fq``: INT8 with ``grad_y * s_x`` quantized per column when ``config.int8_grad_weight``,
  reusing the saved ``x_q`` exactly.

Saved for backward: ``x_q`` (int8), ``s_x`` and the weight scale. The master weight is saved too, but it is
the parameter itself (no copy); the ternary weight is recomputed from it rather than kept as an int8 copy.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import fsdp, kernels
from .config import BitNetTrainingConfig
from .kernels.reference import ACTIVATION_EPS, GRADIENT_EPS, weight_scales_from_stats


def weight_scales(w: Tensor, config: BitNetTrainingConfig) -> tuple[Tensor, Tensor | None]:
    """``(s_w, alpha)``: the abs-mean scale and, for binary weights only, the centre ``mean(w)``."""
    s_w, alpha = weight_scales_from_stats(kernels.weight_stats(w), w.numel())
    return s_w, (alpha if config.weights == "binary" else None)


def quantize_weight(w: Tensor, s_w: Tensor, alpha: Tensor | None, transpose: bool) -> Tensor:
    """The int8 ternary (``alpha is None``) or binary weight, ``(K, N)`` when ``transpose`` else ``(N, K)``."""
    if alpha is None:
        return kernels.ternarize(w, s_w, transpose)
    return kernels.binarize(w, alpha, transpose)


# --- the weight operand ---------------------------------------------------------------------------------
# The autograd function reaches the weight only through these three functions, so a weight that arrives
# already quantized (the FSDP2 all-gather output) only needs a branch here.


def _operand_scales(weight: Tensor, config: BitNetTrainingConfig) -> tuple[Tensor, Tensor | None]:
    if isinstance(weight, fsdp.BitNetPackedLinearWeight):
        # Quantized with the global scale before the all-gather; a binary weight's centre is already spent.
        return weight.scale, None
    return weight_scales(weight._data, config)


def _operand_int8(weight: Tensor, s_w: Tensor, alpha: Tensor | None) -> Tensor:
    """The ``(N, K)`` int8 weight, for the high-precision ``grad_input``."""
    if isinstance(weight, fsdp.BitNetPackedLinearWeight):
        return weight.unpack()
    return quantize_weight(weight._data, s_w, alpha, transpose=False)


def _operand_mm(
    a: Tensor,
    weight: Tensor,
    s_w: Tensor,
    alpha: Tensor | None,
    transpose: bool,
    row_scale: Tensor,
    bias: Tensor | None,
    out_dtype: torch.dtype,
) -> Tensor:
    """``a @ W_q.T`` (``transpose``, the forward) or ``a @ W_q`` (``grad_input``), scaled by ``row_scale * s_w``."""
    if isinstance(weight, fsdp.BitNetPackedLinearWeight):
        k = weight.shape[1]
        return kernels.scaled_int8_mm_packed(a, weight.packed, k, transpose, row_scale, None, s_w, bias, out_dtype)
    # The right operand b is W_q.T (forward) or W_q (grad_input). Write it straight in the layout the backend's
    # matmul is fastest with: row-major for torch._int_mm on CPU, a transposed view of a row-major tensor
    # (contiguous along the reduction dim) for the Triton kernels.
    w = weight._data
    if kernels.right_operand_k_contiguous(w):
        b = quantize_weight(w, s_w, alpha, not transpose).t()
    else:
        b = quantize_weight(w, s_w, alpha, transpose)
    return kernels.scaled_int8_mm(a, b, row_scale, None, s_w, bias, out_dtype)


class _BitNetLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, config: BitNetTrainingConfig) -> Tensor:
        n, k = weight.shape
        x_q, s_x = kernels.quantize_rowwise(x.reshape(-1, k), ACTIVATION_EPS)
        s_w, alpha = _operand_scales(weight, config)
        y = _operand_mm(x_q, weight, s_w, alpha, True, s_x, bias, x.dtype)

        ctx.save_for_backward(x_q, s_x, weight, s_w, alpha)
        ctx.config = config
        ctx.x_shape = x.shape
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y.reshape(*x.shape[:-1], n)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x_q, s_x, weight, s_w, alpha = ctx.saved_tensors
        config: BitNetTrainingConfig = ctx.config
        g = grad_y.reshape(-1, weight.shape[0])
        grad_x = grad_w = grad_b = None

        if ctx.needs_input_grad[0]:
            if config.int8_grad_input:
                g_q, s_g = kernels.quantize_rowwise(g, GRADIENT_EPS)
                grad_x = _operand_mm(g_q, weight, s_w, alpha, False, s_g, None, g.dtype)
            else:
                grad_x = (g @ _operand_int8(weight, s_w, alpha).to(g.dtype)) * s_w.to(g.dtype)
            grad_x = grad_x.reshape(ctx.x_shape)

        if ctx.needs_input_grad[1]:
            if config.int8_grad_weight:
                g_q, s_g = kernels.quantize_colwise_scaled(g, s_x, GRADIENT_EPS)
                grad_w = kernels.scaled_int8_mm(g_q.t(), x_q, s_g, None, None, None, weight.dtype)
            else:
                x_fq = (x_q * s_x[:, None]).to(g.dtype)
                grad_w = (g.t() @ x_fq).to(weight.dtype)

        if ctx.needs_input_grad[2]:
            grad_b = g.sum(0).to(ctx.bias_dtype)

        return grad_x, grad_w, grad_b, None


def _describe(weight: Tensor) -> str:
    n, k = weight.shape
    return f"BitNet linear (nn.Linear(in_features={k}, out_features={n}), {type(weight).__name__})"


def _check_inputs(x: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    n, k = weight.shape
    if not x.dtype.is_floating_point:
        raise TypeError(f"{_describe(weight)}: input must be floating point, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(f"{_describe(weight)}: input of shape {tuple(x.shape)} does not end in in_features={k}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"{_describe(weight)}: bias of shape {tuple(bias.shape)}, expected ({n},)")


def bitnet_linear(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear`` for a BitNet weight. Under autocast the input and bias are cast to the autocast dtype first,
    as autocast would for a plain linear; the output has the (cast) input's dtype."""
    _check_inputs(input, weight, bias)
    device_type = input.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        input = input.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    return _BitNetLinearFunction.apply(input, weight, bias, weight.config)
