"""``BitNetTrainingConfig``: the BitNet recipe of a linear layer, as the config ``quantize_`` takes.

Only the dataclass lives here, below everything else; the handler ``quantize_`` calls for it is registered
beside the weight class it builds (``bitnet_ao/tensor.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torchao.core.config import AOBaseConfig

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

    The defaults come from the convergence measurement in docs/benchmarks.md; the math is docs/numerics.md.
    """

    int8_grad_input: bool = True
    int8_grad_weight: bool = True
    weights: WeightKind = "ternary"

    def __post_init__(self) -> None:
        if self.weights not in ("ternary", "binary"):
            raise ValueError(f"BitNetTrainingConfig.weights must be 'ternary' or 'binary', got {self.weights!r}")


#: Lower-case alias for the ``quantize_`` call, as torchao names its configs.
bitnet_training = BitNetTrainingConfig
