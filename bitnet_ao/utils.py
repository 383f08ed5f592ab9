"""Leaving BitNet training: turn BitNet weights back into plain parameters."""

from __future__ import annotations

from torch import nn

from .tensor import BitNetTrainingLinearWeight


def unquantize_(model: nn.Module) -> nn.Module:
    """Replace every ``BitNetTrainingLinearWeight`` in ``model`` by a plain ``nn.Parameter`` holding its master
    weight (in place; returns ``model``). The inverse of ``quantize_(model, bitnet_training())``."""
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if isinstance(param, BitNetTrainingLinearWeight):
                setattr(module, name, nn.Parameter(param._data, requires_grad=param.requires_grad))
    return model
