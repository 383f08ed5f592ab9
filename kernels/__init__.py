"""Quantization and scaled INT8 matmul primitives for BitNet training (installed as ``bitnet_ao.kernels``).

The ops live under ``torch.ops.bitnet_ao``; the Python names below call the same ops.
When Triton is installed (the ``triton`` extra), its kernels register as the default backend for CUDA tensors.
"""

# This folder is also importable as a top-level ``kernels`` whenever a checkout's root is on sys.path ahead of
# site-packages: `python -c` / `python -m` / a notebook started in the checkout. That name belongs to the Hugging Face
# Hub ``kernels`` package, which transformers requires and imports. So:
# - under the name ``kernels``, this module hands the import over to the Hub package when one is installed (the
#   rest of sys.path is searched, this checkout excluded), so ``import transformers`` works from the checkout;
# - under any name but the installed ``bitnet_ao.kernels`` it defines and registers nothing of its own: a second copy
#   would register every torch.library op again, silently replacing the real package's implementations with its own
#   (tests/test_packaging.py).
if __name__ == "kernels":
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    def _hand_over_to_the_hub_package() -> None:
        """Replace this module in ``sys.modules`` by the Hub ``kernels`` package, if another ``kernels`` is installed:
        the import machinery returns whatever ``sys.modules["kernels"]`` holds once this body has run."""
        checkout = _os.path.dirname(_os.path.dirname(_os.path.realpath(__file__)))
        others = [p for p in _sys.path if _os.path.realpath(p or _os.curdir) != checkout]
        spec = _machinery.PathFinder.find_spec("kernels", others)
        if spec is None or spec.loader is None:
            return  # no Hub package: stay an empty module, as transformers then never imports it anyway
        module = _util.module_from_spec(spec)
        _sys.modules["kernels"] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del _sys.modules["kernels"]
            raise

    _hand_over_to_the_hub_package()
    del _hand_over_to_the_hub_package, _machinery, _util, _os, _sys  # an empty module where no Hub package is
elif __name__ == "bitnet_ao.kernels":
    import importlib.util

    from . import reference
    from .ops import (
        OPS,
        backend_for,
        binarize,
        pack_operand,
        packed_linear,
        prepacks_operand,
        quantize_colwise_scaled,
        quantize_grad_output,
        quantize_rowwise,
        register_backend,
        right_operand_either_layout,
        right_operand_k_contiguous,
        rms_norm,
        rms_norm_backward,
        rms_norm_quantize_rowwise,
        run_packed_linear,
        scaled_int8_mm,
        scaled_int8_mm_packed,
        scaled_int8_mm_prepacked,
        ternarize,
        ternarize_packed,
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
        "pack_operand",
        "packed_linear",
        "prepacks_operand",
        "quantize_colwise_scaled",
        "quantize_grad_output",
        "quantize_rowwise",
        "reference",
        "register_backend",
        "right_operand_either_layout",
        "right_operand_k_contiguous",
        "rms_norm",
        "rms_norm_backward",
        "rms_norm_quantize_rowwise",
        "run_packed_linear",
        "scaled_int8_mm",
        "scaled_int8_mm_packed",
        "scaled_int8_mm_prepacked",
        "ternarize",
        "ternarize_packed",
        "use_backend",
        "weight_stats",
    ]
