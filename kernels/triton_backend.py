"""The Triton backend of the ``bitnet_ao`` ops: the module ``kernels/__init__.py`` registers for CUDA tensors.

It holds the same function names and signatures as ``torch_backend.py`` (``ops.py`` dispatches by name); the
kernels and their launchers live in ``triton_quant.py`` (quantization, memory-bound) and ``triton_mm.py`` (the
scaled INT8 matmuls). The RMSNorm functions have no Triton kernel of their own: they are the torch backend's, the
reference bodies fused by inductor (which writes Triton code for CUDA tensors). Forcing the backend on CPU tensors
(``ops.use_backend("triton")``) needs ``TRITON_INTERPRET=1`` set before ``bitnet_ao.kernels`` is first imported;
that is how the kernels are tested without a GPU.
"""

from torch import Tensor

from .torch_backend import rms_norm, rms_norm_backward, rms_norm_quantize_rowwise
from .triton_mm import scaled_int8_mm, scaled_int8_mm_packed
from .triton_quant import binarize, quantize_colwise_scaled, quantize_rowwise, ternarize, weight_stats


def quantize_grad_output(g: Tensor, row_scale: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The two gradient quantizations by their own kernels (a single-read kernel is not written yet)."""
    return (*quantize_rowwise(g, eps), *quantize_colwise_scaled(g, row_scale, eps))


def right_operand_k_contiguous(t: Tensor) -> bool:
    """Layout of the right operand ``b`` (``(K, N)``) that the matmul is fastest with: 8-bit tensor-core MMAs on
    Hopper take only operands contiguous along the reduction dimension (see docs/kernels.md), so ``b`` should be a
    transposed view of a row-major ``(N, K)``."""
    return True


def right_operand_either_layout(t: Tensor) -> bool:
    """Never: see :func:`right_operand_k_contiguous`."""
    return False


def prepacks_operand(t: Tensor, b_ternary: bool) -> bool:
    """Never: the Triton matmuls read their operands as they are."""
    return False


__all__ = [
    "binarize",
    "prepacks_operand",
    "quantize_colwise_scaled",
    "quantize_grad_output",
    "quantize_rowwise",
    "right_operand_k_contiguous",
    "rms_norm",
    "rms_norm_backward",
    "rms_norm_quantize_rowwise",
    "scaled_int8_mm",
    "scaled_int8_mm_packed",
    "ternarize",
    "weight_stats",
]
