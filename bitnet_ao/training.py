"""``quantize_(model, bitnet_training())``: each selected linear's weight becomes a trainable
:class:`~bitnet_ao.tensor.BitNetTrainingLinearWeight` over its own values (the master weight); and
:func:`unquantize_`, the inverse. The steps both recipes share are ``conversion.py``'s."""

from __future__ import annotations

import warnings

from torch import Tensor, nn
from torchao.quantization.transform_module import register_quantize_module_handler

from .checkpoint_hooks import MASTER_WEIGHT_HOOKS
from .config import BitNetTrainingConfig
from .conversion import LinearConversion
from .module_helpers import describe_module, replace_parameter
from .packed import BitNetPackedLinearWeight
from .tensor import BitNetTrainingLinearWeight


class _TrainingConversion(LinearConversion):
    recipe = "bitnet_training"
    hooks = MASTER_WEIGHT_HOOKS
    trainable = True

    def converted(self, module: nn.Module, weight: Tensor, config: BitNetTrainingConfig) -> bool:
        if isinstance(weight, BitNetPackedLinearWeight):
            raise TypeError(
                f"bitnet_training: {describe_module(module)} holds a packed inference weight (bitnet_inference): "
                "its high-precision values are gone and cannot be trained. Quantize for training before packing, "
                "or load a training checkpoint (plain master weights) into a fresh model"
            )
        if not isinstance(weight, BitNetTrainingLinearWeight):
            return False
        if weight.config != config:
            raise ValueError(
                f"bitnet_training: {describe_module(module)} already trains as BitNet with {weight.config}; "
                f"quantize_ with {config} would silently replace its recipe. To change it, call "
                "bitnet_ao.unquantize_(model) first, then quantize_ with the new config"
            )
        return True  # the same recipe again: nothing to do, the parameter (and its optimizer state) stays

    def new_weight(self, module: nn.Module, weight: Tensor, data: Tensor, config: BitNetTrainingConfig) -> Tensor:
        config.check_shape(tuple(data.shape), f"bitnet_training: {describe_module(module)}")
        if not weight.requires_grad:
            # transformers' TorchAoConfig loads every weight it quantizes with requires_grad=False: kept, that would
            # train only the embeddings, norms and head, without a word.
            warnings.warn(
                "bitnet_training: weights loaded with requires_grad=False (as transformers' TorchAoConfig loads "
                "them) become trainable BitNet master weights; to freeze some, call requires_grad_(False) after "
                "quantize_",
                stacklevel=3,  # the handler's caller: torchao's module walk
            )
        return BitNetTrainingLinearWeight(data, config)


register_quantize_module_handler(BitNetTrainingConfig)(_TrainingConversion())


def unquantize_(model: nn.Module) -> nn.Module:
    """Replace every ``BitNetTrainingLinearWeight`` in ``model`` by a plain ``nn.Parameter`` holding its master
    weight (in place, the same parameter objects; returns ``model``). The inverse of ``quantize_(model,
    bitnet_training())``. Packed inference weights have no master weight left: a clear error."""
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if isinstance(param, BitNetTrainingLinearWeight):
                replace_parameter(module, name, nn.Parameter(param._data, requires_grad=param.requires_grad))
            elif isinstance(param, BitNetPackedLinearWeight):
                raise TypeError(
                    f"unquantize_: {describe_module(module)} holds a packed inference weight (bitnet_inference); "
                    "its high-precision values were freed when it was packed. Load the training checkpoint "
                    "(master weights) into a fresh model instead"
                )
    return model
