"""``quantize_(model, bitnet_training(...))``: the config and the handler torchao calls for each selected module."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torchao.core.config import AOBaseConfig
from torchao.quantization.transform_module import register_quantize_module_handler

WeightKind = Literal["ternary", "binary"]


@dataclass(frozen=True)
class BitNetTrainingConfig(AOBaseConfig):
    """BitNet training of ``nn.Linear`` layers: int8 activations, ternary (or binary) weights, INT8 matmuls.

    Args:
        int8_grad_input: compute ``grad_input`` with an INT8 matmul (``grad_output`` quantized per row, the
            ternary weight exact). ``False`` runs it in the activation dtype.
        int8_grad_weight: compute ``grad_weight`` with an INT8 matmul (``grad_output * s_x`` quantized per
            column, the saved int8 activation reused). ``False`` runs it in the activation dtype.
        weights: ``"ternary"`` for BitNet b1.58 ({-1, 0, 1}, abs-mean scale) or ``"binary"`` for the original
            1-bit BitNet ({-1, 1} around the mean).

    The defaults come from the convergence measurement in docs/benchmarks.md.
    """

    int8_grad_input: bool = True
    int8_grad_weight: bool = True
    weights: WeightKind = "ternary"

    def __post_init__(self) -> None:
        if self.weights not in ("ternary", "binary"):
            raise ValueError(f"BitNetTrainingConfig.weights must be 'ternary' or 'binary', got {self.weights!r}")


#: Lower-case alias for the ``quantize_`` call, as torchao names its configs.
bitnet_training = BitNetTrainingConfig


@register_quantize_module_handler(BitNetTrainingConfig)
def _bitnet_training_transform(module: nn.Module, config: BitNetTrainingConfig) -> nn.Module:
    # Imported here so that importing the config does not pull in the tensor subclass machinery.
    from .tensor import BitNetTrainingLinearWeight, register_checkpoint_hooks

    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TypeError(f"bitnet_training: {module!r} has no 2-D weight; only nn.Linear-like modules are supported")
    data = weight._data if isinstance(weight, BitNetTrainingLinearWeight) else weight.detach()
    if not data.dtype.is_floating_point:
        raise TypeError(
            f"bitnet_training: {module!r} has a {data.dtype} weight; BitNet training needs a floating-point "
            "master weight (float32, bfloat16 or float16)"
        )
    module.weight = nn.Parameter(BitNetTrainingLinearWeight(data, config), requires_grad=weight.requires_grad)
    register_checkpoint_hooks(module)
    return module
