"""Quantization and scaled INT8 matmul primitives for BitNet training (installed as ``bitnet_ao.kernels``).

The ops live under ``torch.ops.bitnet_ao``; the Python names below call the same ops.
"""

from . import reference
from .ops import (
    backend_for,
    binarize,
    quantize_colwise_scaled,
    quantize_rowwise,
    register_backend,
    scaled_int8_mm,
    scaled_int8_mm_packed,
    ternarize,
    use_backend,
    weight_stats,
)

__all__ = [
    "backend_for",
    "binarize",
    "quantize_colwise_scaled",
    "quantize_rowwise",
    "reference",
    "register_backend",
    "scaled_int8_mm",
    "scaled_int8_mm_packed",
    "ternarize",
    "use_backend",
    "weight_stats",
]
