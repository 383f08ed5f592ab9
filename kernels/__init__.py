"""Quantization and scaled INT8 matmul primitives for BitNet training (installed as ``bitnet_ao.kernels``).

The ops live under ``torch.ops.bitnet_ao``; the Python names below call the same ops.
When Triton is installed (the ``triton`` extra), its kernels register as the default backend for CUDA tensors.
"""

# This folder is also importable as a top-level ``kernels`` when a checkout's root is on sys.path (running from the
# repository, pytest's rootdir), and other libraries probe that name: transformers imports any ``kernels`` it finds
# without package metadata, looking for the Hub kernels package. A second copy would register every torch.library
# op again, silently replacing the real package's implementations with its own (with a backend registry of its own,
# which register_backend / use_backend of the real package do not reach). So under any name but the installed one
# this package defines and registers nothing (tests/test_packaging.py).
if __name__ == "bitnet_ao.kernels":
    import importlib.util

    from . import reference
    from .ops import (
        OPS,
        backend_for,
        binarize,
        packed_linear,
        quantize_colwise_scaled,
        quantize_grad_output,
        quantize_rowwise,
        register_backend,
        right_operand_k_contiguous,
        rms_norm,
        rms_norm_backward,
        rms_norm_quantize_rowwise,
        run_packed_linear,
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
        "OPS",
        "backend_for",
        "binarize",
        "packed_linear",
        "quantize_colwise_scaled",
        "quantize_grad_output",
        "quantize_rowwise",
        "reference",
        "register_backend",
        "right_operand_k_contiguous",
        "rms_norm",
        "rms_norm_backward",
        "rms_norm_quantize_rowwise",
        "run_packed_linear",
        "scaled_int8_mm",
        "scaled_int8_mm_packed",
        "ternarize",
        "use_backend",
        "weight_stats",
    ]
