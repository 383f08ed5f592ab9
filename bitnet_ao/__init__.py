"""bitnet_ao: BitNet b1.58 training for PyTorch/torchao, INT8 matmuls in the forward and the backward pass.

from torchao.quantization import quantize_
from bitnet_ao import bitnet_training
quantize_(model, bitnet_training())
"""

from .config import BitNetTrainingConfig, bitnet_training
from .tensor import BitNetTrainingLinearWeight
from .utils import unquantize_

__all__ = ["BitNetTrainingConfig", "BitNetTrainingLinearWeight", "bitnet_training", "unquantize_"]
