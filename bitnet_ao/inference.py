"""``quantize_(model, bitnet_inference())``: freeze BitNet linears into packed weights for deployment.

Each selected weight, a BitNet training weight or a plain high-precision one, is quantized once with the rule the
training forward uses (abs-mean scale, ternary or binary values) and replaced by a frozen
:class:`~bitnet_ao.packed.BitNetPackedLinearWeight`: 2 bits per ternary value (1 per binary value) plus the float32
scale, 1/8 (1/16) of a BF16 weight's bytes; the high-precision weight is released. ``F.linear`` then gives the
training forward's outputs bit for bit (docs/inference.md).

Checkpoints of a packed module hold plain tensors, so ``safetensors`` and ``torch.save`` work as for any model:
``<prefix>weight`` is the packed int8 ``(N, bytes per row)`` and ``<prefix>weight_scale`` the float32 scale.
Loading such a state dict into a packed model restores it exactly; loading a high-precision weight (a training
checkpoint) into it quantizes that weight on the way in.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from torchao.quantization.transform_module import register_quantize_module_handler

from .config import BitNetInferenceConfig, BitNetTrainingConfig
from .kernels import reference
from .packed import BitNetPackedLinearWeight, pack_linear_weight
from .tensor import (
    BitNetTrainingLinearWeight,
    checked_linear_weight,
    describe_module,
    register_checkpoint_hooks,
    replace_parameter,
)

#: State-dict key suffix of the weight scale next to the packed ``weight`` (the name Hugging Face uses too).
SCALE_KEY = "weight_scale"


def _recipe(weight: Tensor, config: BitNetInferenceConfig, module: nn.Module) -> BitNetTrainingConfig:
    """The training recipe the packed weight keeps: the weight's own, or ``config.weights`` for a plain weight."""
    if isinstance(weight, (BitNetTrainingLinearWeight, BitNetPackedLinearWeight)):
        if config.weights is not None and config.weights != weight.config.weights:
            raise ValueError(
                f"bitnet_inference(weights={config.weights!r}): {describe_module(module)} was trained with "
                f"{weight.config.weights} weights; drop the argument to keep them"
            )
        return weight.config
    return BitNetTrainingConfig(weights=config.weights or "ternary")


@register_quantize_module_handler(BitNetInferenceConfig)
def _bitnet_inference_transform(module: nn.Module, config: BitNetInferenceConfig) -> nn.Module:
    weight = checked_linear_weight(module, "bitnet_inference")
    if isinstance(weight, DTensor):
        raise TypeError(
            f"bitnet_inference: {describe_module(module)} has a sharded (DTensor) weight; gather the full model "
            "first (e.g. torch.distributed.checkpoint's get_model_state_dict with full_state_dict=True into an "
            "unsharded model)"
        )
    recipe = _recipe(weight, config, module)
    if isinstance(weight, BitNetPackedLinearWeight):
        return module  # already packed
    data = weight._data if isinstance(weight, BitNetTrainingLinearWeight) else weight.detach()
    if not data.dtype.is_floating_point:
        raise TypeError(
            f"bitnet_inference: {describe_module(module)} has a {data.dtype} weight; expected a floating-point weight"
        )
    new = nn.Parameter(pack_linear_weight(data, recipe), requires_grad=False)
    if isinstance(weight, nn.Parameter):
        replace_parameter(module, "weight", new)  # a tied module sees the packed weight too, and says so
    else:
        module.weight = new
    register_checkpoint_hooks(module, _state_dict_post_hook, _load_state_dict_pre_hook)
    return module


# --- checkpoints: the packed bytes and the scale as plain tensors ------------------------------------------


def _state_dict_post_hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    value = state_dict.get(prefix + "weight")
    if isinstance(value, BitNetPackedLinearWeight) and value is not module.weight:
        state_dict[prefix + "weight"] = value.packed
        state_dict[prefix + SCALE_KEY] = value.scale


def _load_state_dict_pre_hook(module: nn.Module, state_dict: dict, prefix: str, *args: object) -> None:
    param = module._parameters.get("weight")
    value = state_dict.get(prefix + "weight")
    if not isinstance(param, BitNetPackedLinearWeight) or type(value) not in (Tensor, nn.Parameter):
        return
    scale = state_dict.pop(prefix + SCALE_KEY, None)
    n, k = param.shape
    if value.dtype.is_floating_point:
        # A high-precision weight (a training checkpoint): quantize it as bitnet_inference would have.
        if tuple(value.shape) != (n, k):
            return  # the default loader reports the size mismatch
        state_dict[prefix + "weight"] = pack_linear_weight(value.detach().to(param.device), param.config)
        return
    expected = (n, reference.packed_columns(k, param.bits))
    if (
        value.dtype != torch.int8
        or tuple(value.shape) != expected
        or scale is None
        or scale.numel() != param.scale.numel()
    ):
        raise ValueError(
            f"bitnet_inference: loading {prefix}weight into a packed {param.config.weights} "
            f"nn.Linear(in_features={k}, out_features={n}): expected int8 {expected} packed values and "
            f"{prefix}{SCALE_KEY}, got {value.dtype} {tuple(value.shape)} and "
            f"{'no scale' if scale is None else f'a scale of shape {tuple(scale.shape)}'}"
        )
    packed = value.detach().to(param.device)
    scale = scale.detach().to(device=param.device, dtype=torch.float32).reshape(param.scale.shape)
    state_dict[prefix + "weight"] = BitNetPackedLinearWeight(packed, scale, k, param.dtype, param.config)


# A pickled model holds its modules' hooks: torch.load(weights_only=True) of a whole packed model needs them.
torch.serialization.add_safe_globals([_state_dict_post_hook, _load_state_dict_pre_hook])
