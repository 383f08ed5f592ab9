"""The configs ``quantize_`` takes: ``BitNetTrainingConfig`` (train with INT8 matmuls) and
``BitNetInferenceConfig`` (run frozen, packed weights).

Only the dataclasses live here, below everything else; the handler ``quantize_`` calls for each is registered
in ``bitnet_ao/training.py`` and ``bitnet_ao/inference.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from torchao.core.config import AOBaseConfig

WeightKind = Literal["ternary", "binary"]


@dataclass(frozen=True)
class BitNetTrainingConfig(AOBaseConfig):
    """BitNet training of ``nn.Linear`` layers: int8 activations, ternary (or binary) weights, INT8 matmuls.

    Each field's ``help`` metadata says what it does: the one description, which the benchmark's command line
    (``benchmarks/pretrain.py``) and the torchtitan converter's options show too, as they take their fields from
    this class. The defaults come from the convergence measurement in docs/benchmarks.md; the math is
    docs/numerics.md.
    """

    int8_grad_input: bool = field(
        default=True,
        metadata={
            "help": "compute grad_input with an INT8 matmul (grad_output quantized per row, the ternary weight "
            "exact); False runs it in the activation dtype"
        },
    )
    int8_grad_weight: bool = field(
        default=True,
        metadata={
            "help": "compute grad_weight with an INT8 matmul (grad_output * s_x quantized per column, the saved int8 "
            "activation reused); False runs it in the activation dtype"
        },
    )
    weights: WeightKind = field(
        default="ternary",
        metadata={
            "help": "'ternary' for BitNet b1.58 ({-1, 0, 1}, abs-mean scale) or 'binary' for the original 1-bit "
            "BitNet ({-1, 1} around the mean)"
        },
    )
    scale_groups: int = field(
        default=1,
        metadata={
            "help": "G, the number of groups the weight scale (and, with group_dim=1, the activation scale) is "
            "computed over: the BitNet paper's group quantization for tensor parallelism "
            "(docs/numerics.md#group-scales-for-tensor-parallelism); 1: one scale per weight"
        },
    )
    group_dim: int = field(
        default=0,
        metadata={
            "help": "0: groups of out_features / G rows (column-parallel layers); 1: groups of in_features / G "
            "columns (row-parallel layers); G must divide that dimension"
        },
    )

    def __post_init__(self) -> None:
        if self.weights not in ("ternary", "binary"):
            raise ValueError(f"BitNetTrainingConfig.weights must be 'ternary' or 'binary', got {self.weights!r}")
        if not isinstance(self.scale_groups, int) or self.scale_groups < 1:
            raise ValueError(f"BitNetTrainingConfig.scale_groups must be a positive int, got {self.scale_groups!r}")
        if self.group_dim not in (0, 1):
            raise ValueError(
                f"BitNetTrainingConfig.group_dim must be 0 (groups of output rows) or 1 (groups of input columns), "
                f"got {self.group_dim!r}"
            )

    @property
    def grouped(self) -> bool:
        """Whether the scales are per group (``scale_groups > 1``)."""
        return self.scale_groups > 1

    def check_shape(self, shape: tuple[int, ...], where: str) -> None:
        """Raise naming ``where`` for an empty weight, or unless ``scale_groups`` divides the grouped dimension of a
        weight of ``shape``."""
        n, k = shape
        if n == 0 or k == 0:
            raise ValueError(
                f"{where}: nn.Linear(in_features={k}, out_features={n}) has no weights to quantize; leave it out of "
                "the filter_fn"
            )
        size, name = (n, "out_features") if self.group_dim == 0 else (k, "in_features")
        if size % self.scale_groups:
            raise ValueError(
                f"{where}: scale_groups={self.scale_groups} with group_dim={self.group_dim} must divide {name}={size} "
                f"(nn.Linear(in_features={k}, out_features={n}))"
            )


#: Lower-case alias for the ``quantize_`` call, as torchao names its configs.
bitnet_training = BitNetTrainingConfig


@dataclass(frozen=True)
class BitNetInferenceConfig(AOBaseConfig):
    """Frozen BitNet linears with packed weights, for inference (docs/inference.md).

    Each selected weight becomes a ``BitNetPackedLinearWeight``: its ternary values 2 bits each (binary values
    1 bit each) plus the float32 scale; the high-precision weight is dropped. ``F.linear`` on it quantizes the
    activation per token and runs the exact INT8 matmul on the packed values: the same outputs as the training
    forward, bit for bit.

    Args:
        weights: how to quantize a plain (not BitNet-trained) weight: ``"ternary"`` (abs-mean rule, the default)
            or ``"binary"``. ``None`` (the default) means ternary for plain weights and the recipe it was trained
            with for a BitNet training weight; naming a kind that contradicts the training recipe is an error.
    """

    weights: WeightKind | None = None

    def __post_init__(self) -> None:
        if self.weights not in (None, "ternary", "binary"):
            raise ValueError(f"BitNetInferenceConfig.weights must be 'ternary', 'binary' or None, got {self.weights!r}")


#: Lower-case alias, as torchao names its configs.
bitnet_inference = BitNetInferenceConfig
