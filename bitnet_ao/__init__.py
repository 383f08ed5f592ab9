"""bitnet_ao: BitNet b1.58 training for PyTorch/torchao, INT8 matmuls in the forward and the backward pass.

from torchao.quantization import quantize_
from bitnet_ao import bitnet_training
quantize_(model, bitnet_training())

Importing the package registers the ``quantize_`` handler (``tensor.py``) and installs the FSDP2 all-gather
extension (``fsdp.py``). The modules import one way only; docs/design.md draws the order.
"""

from .config import BitNetTrainingConfig, bitnet_training
from .fsdp import precompute_bitnet_scale_for_fsdp
from .packed import BitNetPackedLinearWeight
from .packing import pack_i2_in_i8, unpack_i2_in_i8
from .tensor import BitNetTrainingLinearWeight, unquantize_

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
