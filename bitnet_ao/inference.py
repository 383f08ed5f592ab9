"""``quantize_(model, bitnet_inference())``: freeze BitNet linears into packed weights for deployment.

Each selected weight, a BitNet training weight or a plain high-precision one, is quantized once with the rule the
training forward uses (abs-mean scale, ternary or binary values) and replaced by a frozen
:class:`~bitnet_ao.packed.BitNetPackedLinearWeight`: 2 bits per ternary value (1 per binary value) plus the float32
scale, 1/8 (1/16) of a BF16 weight's bytes; the high-precision weight is released. ``F.linear`` then gives the
training forward's outputs bit for bit (docs/inference.md). The steps both recipes share are ``conversion.py``'s.

Checkpoints of a packed module hold plain tensors, so ``safetensors`` and ``torch.save`` work as for any model:
``<prefix>weight`` is the packed int8 ``(N, bytes per row)`` and ``<prefix>weight_scale`` the float32 scale
(``checkpoint_hooks.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torchao.quantization.transform_module import register_quantize_module_handler

from .checkpoint_hooks import PACKED_WEIGHT_HOOKS
from .config import BitNetInferenceConfig, BitNetTrainingConfig
from .conversion import LinearConversion
from .module_helpers import describe_module
from .packed import BitNetPackedLinearWeight, pack_linear_weight
from .tensor import BitNetTrainingLinearWeight

# Where whole models pickled before checkpoint_hooks.py existed name these hooks (torch.load(weights_only=False)).
_state_dict_post_hook, _load_state_dict_pre_hook = PACKED_WEIGHT_HOOKS


def _recipe(weight: Tensor, config: BitNetInferenceConfig) -> BitNetTrainingConfig:
    """The training recipe the packed weight keeps: the weight's own, or ``config.weights`` for a plain weight."""
    if isinstance(weight, (BitNetTrainingLinearWeight, BitNetPackedLinearWeight)):
        return weight.config
    return BitNetTrainingConfig(weights=config.weights or "ternary")


class _InferenceConversion(LinearConversion):
    recipe = "bitnet_inference"
    hooks = PACKED_WEIGHT_HOOKS
    trainable = False

    def converted(self, module: nn.Module, weight: Tensor, config: BitNetInferenceConfig) -> bool:
        if isinstance(weight, DTensor):
            raise TypeError(
                f"bitnet_inference: {describe_module(module)} has a sharded (DTensor) weight; gather the full model "
                "first (e.g. torch.distributed.checkpoint's get_model_state_dict with full_state_dict=True into an "
                "unsharded model)"
            )
        trained = _recipe(weight, config).weights
        if config.weights is not None and config.weights != trained:
            raise ValueError(
                f"bitnet_inference(weights={config.weights!r}): {describe_module(module)} was trained with "
                f"{trained} weights; drop the argument to keep them"
            )
        return isinstance(weight, BitNetPackedLinearWeight)  # already packed

    def new_weight(self, module: nn.Module, weight: Tensor, data: Tensor, config: BitNetInferenceConfig) -> Tensor:
        return pack_linear_weight(data, _recipe(weight, config))


register_quantize_module_handler(BitNetInferenceConfig)(_InferenceConversion())


@contextlib.contextmanager
def packed_weights(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, each :class:`~bitnet_ao.tensor.BitNetTrainingLinearWeight` of ``model`` is replaced by its
    packed inference weight (``weight.prepared()``: made once per weight version, the training forward's outputs bit
    for bit); on exit, also on an error, the training weights come back.

    For evaluation and generation during training through a compiled or exported step: eagerly a training weight
    already runs its packed forward without a gradient, but a graph traced from it quantizes the master weight on
    every call. Traced inside this block, a step multiplies by the packed weights, and a ``torch.compile``'d step
    made once runs again in the next evaluation's block on that step's new packed weights (they are its inputs, not
    constants: no recompilation, never a stale weight). Nothing may train inside the block. Sharded (DTensor) and
    group-scale weights stay as they are (their packed forward is not the CPU's)."""
    swapped: list[tuple[nn.Module, nn.Parameter]] = []
    try:
        for module in model.modules():
            weight = module._parameters.get("weight")
            if isinstance(weight, BitNetTrainingLinearWeight) and not weight.config.grouped:
                if isinstance(weight._data, DTensor):
                    continue
                module._parameters["weight"] = nn.Parameter(weight.prepared(), requires_grad=False)
                swapped.append((module, weight))
        yield model
    finally:
        for module, weight in swapped:
            module._parameters["weight"] = weight
