"""bitnet_ao: BitNet b1.58 training for PyTorch/torchao, INT8 matmuls in the forward and the backward pass.

from torchao.quantization import quantize_
from bitnet_ao import bitnet_training
quantize_(model, bitnet_training())

For inference, ``quantize_(model, bitnet_inference())`` freezes the weights packed (2 bits per value).

Importing the package registers the ``quantize_`` handlers (``training.py``, ``inference.py``); the FSDP2
all-gather extension is part of the master-weight class (``tensor.py``, its math in ``fsdp_gather.py``).
The modules import one way only; docs/design.md draws the order.
"""

from . import inference  # noqa: F401  (registers bitnet_inference's quantize_ handler)
from .config import BitNetInferenceConfig, BitNetTrainingConfig, bitnet_inference, bitnet_training
from .fsdp import precompute_bitnet_scale_for_fsdp
from .inference import packed_weights
from .packed import BitNetPackedLinearWeight, pack_linear_weight
from .packing import pack_i1_in_i8, pack_i2_in_i8, unpack_i1_in_i8, unpack_i2_in_i8
from .tensor import BitNetTrainingLinearWeight
from .training import unquantize_

__all__ = [
    "BitNetInferenceConfig",
    "BitNetPackedLinearWeight",
    "BitNetTrainingConfig",
    "BitNetTrainingLinearWeight",
    "bitnet_inference",
    "bitnet_training",
    "pack_i1_in_i8",
    "pack_i2_in_i8",
    "pack_linear_weight",
    "packed_weights",
    "precompute_bitnet_scale_for_fsdp",
    "unpack_i1_in_i8",
    "unpack_i2_in_i8",
    "unquantize_",
]
