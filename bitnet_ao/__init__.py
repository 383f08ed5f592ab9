"""bitnet_ao: BitNet b1.58 training for PyTorch/torchao, INT8 matmuls in the forward and the backward pass.

from torchao.quantization import quantize_
from bitnet_ao import bitnet_training
quantize_(model, bitnet_training())
"""

from .config import BitNetTrainingConfig, bitnet_training
from .fsdp import BitNetPackedLinearWeight, precompute_bitnet_scale_for_fsdp
from .packing import pack_i2_in_i8, unpack_i2_in_i8
from .tensor import BitNetTrainingLinearWeight
from .utils import unquantize_

__all__ = [
    "BitNetPackedLinearWeight",
    "BitNetTrainingConfig",
    "BitNetTrainingLinearWeight",
    "bitnet_training",
    "pack_i2_in_i8",
    "precompute_bitnet_scale_for_fsdp",
    "unpack_i2_in_i8",
    "unquantize_",
]
