"""The ``quantize_`` handler body both BitNet recipes share: ``bitnet_training`` (``training.py``) and
``bitnet_inference`` (``inference.py``) each say only what differs (:class:`LinearConversion`).

Converting one ``nn.Linear``: check that it is a linear; ask the recipe whether its weight is already converted
(nothing to do) or cannot be (the recipe raises, before anything changes); take the high-precision weight (a master
weight's own tensor), which must be floating point; let the recipe build the new weight; make it the parameter in
place, so tied modules and an optimizer built before ``quantize_`` keep it; register the recipe's checkpoint hooks.
After the walk, a ``quantize_`` that converted nothing warns (a ``filter_fn`` with a typo).
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod

from torch import Tensor, nn

from .checkpoint_hooks import CheckpointHooks, register_checkpoint_hooks
from .config import BitNetInferenceConfig, BitNetTrainingConfig
from .module_helpers import checked_linear_weight, describe_module, replace_parameter
from .private_api import observe_quantize_
from .tensor import BitNetTrainingLinearWeight

Config = BitNetTrainingConfig | BitNetInferenceConfig


class LinearConversion(ABC):
    """One recipe's conversion of an ``nn.Linear``; an instance is that recipe's ``quantize_`` handler
    (``register_quantize_module_handler(Config)(Conversion())``). A subclass names the recipe, its checkpoint
    hooks and whether the new weight trains, and implements :meth:`converted` and :meth:`new_weight`."""

    #: The recipe's name in messages (``bitnet_training``).
    recipe: str
    #: The checkpoint hooks of a module holding the new weight (``checkpoint_hooks.py``).
    hooks: CheckpointHooks
    #: Whether the new weight is a trainable parameter.
    trainable: bool

    @abstractmethod
    def converted(self, module: nn.Module, weight: Tensor, config: Config) -> bool:
        """Whether ``module``'s ``weight`` is already this recipe's (nothing to do); raises, naming the module,
        where it cannot be converted."""

    @abstractmethod
    def new_weight(self, module: nn.Module, weight: Tensor, data: Tensor, config: Config) -> Tensor:
        """The weight replacing ``weight``, from its high-precision values ``data``."""

    def __call__(self, module: nn.Module, config: Config) -> nn.Module:
        weight = checked_linear_weight(module, self.recipe)
        if self.converted(module, weight, config):
            return module
        # The high-precision values: a master weight's own tensor (packing it), else the weight itself.
        data = weight._data if isinstance(weight, BitNetTrainingLinearWeight) else weight.detach()
        if not data.dtype.is_floating_point:
            raise TypeError(
                f"{self.recipe}: {describe_module(module)} has a {data.dtype} weight; BitNet quantizes a "
                "floating-point weight (float32, bfloat16 or float16)"
            )
        new = nn.Parameter(self.new_weight(module, weight, data, config), requires_grad=self.trainable)
        if isinstance(weight, nn.Parameter):
            replace_parameter(module, "weight", new)  # a tied module sees the new weight too
        else:
            module.weight = new
        register_checkpoint_hooks(module, self.hooks)
        return module


def _warn_if_nothing_converted(model: nn.Module, config: Config, n: int) -> None:
    """A ``filter_fn`` that selects nothing (a typo in a module name) would leave a plain model to train without
    a word: say so, with how many linears the model has."""
    if n:
        return
    linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    recipe = "bitnet_training" if isinstance(config, BitNetTrainingConfig) else "bitnet_inference"
    warnings.warn(
        f"quantize_(model, {recipe}(...)) converted no module of {type(model).__name__}: its filter_fn selected "
        f"none of its {linears} nn.Linear modules, so nothing runs as BitNet. Check the names the filter looks for "
        "(bitnet_ao.surgery.quantize_filter selects every linear but the output head)",
        stacklevel=4,  # the caller of quantize_
    )


observe_quantize_((BitNetTrainingConfig, BitNetInferenceConfig), _warn_if_nothing_converted)
