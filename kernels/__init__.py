"""Quantization and scaled INT8 matmul primitives for BitNet training (installed as ``bitnet_ao.kernels``).

The ops live under ``torch.ops.bitnet_ao``; the Python names below call the same ops.
When Triton is installed (the ``triton`` extra), its kernels register as the default backend for CUDA tensors.
"""

import importlib.util

from . import reference
from .ops import (
    backend_for,
    binarize,
    quantize_colwise_scaled,
    quantize_rowwise,
    register_backend,
    right_operand_k_contiguous,
    scaled_int8_mm,
    scaled_int8_mm_packed,
    ternarize,
    use_backend,
    weight_stats,
)

# Triton is optional: without it every device uses the torch backend. find_spec rather than try/except so a
# genuine error inside the Triton backend is not mistaken for "Triton is not installed".
if importlib.util.find_spec("triton") is not None:
    from . import triton_backend

    register_backend("triton", triton_backend, default_for=("cuda",))

__all__ = [
    "backend_for",
    "binarize",
    "quantize_colwise_scaled",
    "quantize_rowwise",
    "reference",
    "register_backend",
    "right_operand_k_contiguous",
    "scaled_int8_mm",
    "scaled_int8_mm_packed",
    "ternarize",
    "use_backend",
    "weight_stats",
]
