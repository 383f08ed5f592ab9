"""What the ``quantize_`` handlers do to an ``nn.Module`` besides quantizing: name it in a message, check that it is
a linear before anything changes, and replace its weight in place so that tied modules keep sharing it."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn


def describe_module(module: nn.Module) -> str:
    """A module in a few words for an error message: a linear's own repr, else its class and weight shape (the
    repr of a model or block is the whole model)."""
    if isinstance(module, nn.Linear) and not module._modules:
        return repr(module)
    weight = getattr(module, "weight", None)
    shape = f" with a weight of shape {tuple(weight.shape)}" if isinstance(weight, Tensor) else ""
    return f"{type(module).__name__}{shape}"


def checked_linear_weight(module: nn.Module, recipe: str) -> Tensor:
    """The weight of the ``nn.Linear`` ``module`` that ``recipe`` (a config's name, for the message) quantizes;
    a clear error for anything else, before anything changes."""
    if not isinstance(module, nn.Linear):
        raise TypeError(
            f"{recipe}: {describe_module(module)} is not an nn.Linear. BitNet quantizes linear layers (it replaces "
            "F.linear; an embedding lookup or a convolution would keep using the high-precision weight). Select "
            "linears only, e.g. quantize_(model, config, filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) "
            "and 'lm_head' not in fqn), or bitnet_ao.surgery.quantize_filter"
        )
    return module.weight


def replace_parameter(module: nn.Module, name: str, new: nn.Parameter) -> None:
    """Make the parameter ``module.<name>`` become ``new`` in place (``torch.utils.swap_tensors``) rather than
    registering a new object on one module: every module sharing it (an output head tied to the input embedding)
    keeps sharing one parameter, optimized once, and an optimizer built before ``quantize_`` steps it. A parameter
    still referenced by a live autograd graph cannot be swapped: it is replaced on ``module`` alone, with a warning,
    since a module tied to it would keep the old object."""
    old = getattr(module, name)
    try:
        torch.utils.swap_tensors(old, new)
    except RuntimeError as e:
        warnings.warn(
            f"bitnet_ao: {describe_module(module)}.{name} could not be replaced in place ({e}); a new parameter is "
            "registered on this module only, so a module sharing the old one (tied weights) no longer shares it. "
            "Quantize before running the model, or drop the tensors computed from it first",
            stacklevel=3,
        )
        setattr(module, name, new)
