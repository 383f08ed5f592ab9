"""Checkpoints hold plain tensors: the state-dict and load hooks the ``quantize_`` handlers put on each linear.

A checkpoint carries weights, not the recipe, so safetensors, ``save_pretrained``, the HF Trainer and any other tool
that serializes plain tensors work unchanged:

- a master weight (:data:`MASTER_WEIGHT_HOOKS`) is saved as its plain high-precision tensor (same key, dtype and
  shape as the unquantized model, so a plain model loads it). The recipe stays on the model: loading writes into
  the master weight, and a load that assigns the tensor (``load_state_dict(assign=True)``, the meta-device
  loaders) gets it re-wrapped with the module's config first.
- a packed weight (:data:`PACKED_WEIGHT_HOOKS`) is saved as ``<prefix>weight``, the packed int8 ``(N, bytes per
  row)``, and ``<prefix>weight_scale`` (:data:`SCALE_KEY`), the float32 scale. Loading them into a packed model
  restores it exactly; loading a high-precision weight (a training checkpoint) quantizes it on the way in.

A pickled model holds its modules' hooks, so every hook is a safe global (docs/usage.md#saving-and-loading).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from . import tensor as tensor_module
from .kernels import reference
from .packed import BitNetPackedLinearWeight, pack_linear_weight
from .private_api import dtensor_local, module_hook_wrapper
from .tensor import BitNetTrainingLinearWeight

#: State-dict key suffix of the weight scale next to the packed ``weight`` (the name Hugging Face uses too).
SCALE_KEY = "weight_scale"

#: A pair of hooks: ``nn.Module.register_state_dict_post_hook``'s and ``register_load_state_dict_pre_hook``'s.
CheckpointHooks = tuple[Callable[..., None], Callable[..., None]]


# --- master weights: plain master weights in, plain master weights out ------------------------------------


def _checkpoint_value(value: Tensor) -> Tensor:
    """What a checkpoint holds for a state-dict value: the master weight of a BitNet weight, also as the local
    tensor of an FSDP2-sharded DTensor (whose placements and global shape stay). Other values pass through."""
    if isinstance(value, BitNetTrainingLinearWeight):
        return value._data
    if isinstance(value, DTensor) and isinstance(dtensor_local(value), BitNetTrainingLinearWeight):
        return DTensor.from_local(
            dtensor_local(value)._data,
            value.device_mesh,
            value.placements,
            run_check=False,
            shape=value.shape,
            stride=value.stride(),
        )
    return value


def _master_weight_state_dict_hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for name, param in module._parameters.items():
        value = state_dict.get(prefix + name)
        # state_dict(keep_vars=True) hands out the parameter itself, for code that wants the live object.
        if value is not None and value is not param:
            state_dict[prefix + name] = _checkpoint_value(value)
    # A weight tied to a module that is not quantized (an output head tied to the input embedding) appears under
    # that module's key too, and that module has no hook: its entries already written are fixed here.
    for key, value in state_dict.items():
        if isinstance(value, BitNetTrainingLinearWeight) and not isinstance(value, nn.Parameter):
            state_dict[key] = value._data


def _master_weight_load_hook(module: nn.Module, state_dict: dict, prefix: str, *args: object) -> None:
    # load_state_dict works on its own copy of the dict, so replacing entries does not touch the caller's.
    for name, param in module._parameters.items():
        value = state_dict.get(prefix + name)
        if isinstance(param, BitNetTrainingLinearWeight) and type(value) in (Tensor, nn.Parameter):
            state_dict[prefix + name] = param._rewrap(value.detach())


#: The hooks of a module holding master weights (``bitnet_training``).
MASTER_WEIGHT_HOOKS: CheckpointHooks = (_master_weight_state_dict_hook, _master_weight_load_hook)


# --- packed weights: the packed bytes and the scale as plain tensors ---------------------------------------


def _packed_weight_state_dict_hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    value = state_dict.get(prefix + "weight")
    if isinstance(value, BitNetPackedLinearWeight) and value is not module.weight:
        state_dict[prefix + "weight"] = value.packed
        state_dict[prefix + SCALE_KEY] = value.scale


def _packed_weight_load_hook(module: nn.Module, state_dict: dict, prefix: str, *args: object) -> None:
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


#: The hooks of a module holding a packed weight (``bitnet_inference``).
PACKED_WEIGHT_HOOKS: CheckpointHooks = (_packed_weight_state_dict_hook, _packed_weight_load_hook)


def register_checkpoint_hooks(module: nn.Module, hooks: CheckpointHooks) -> None:
    """Register ``hooks`` (:data:`MASTER_WEIGHT_HOOKS` or :data:`PACKED_WEIGHT_HOOKS`) on ``module``, once per
    pair: a linear converted for training and then packed keeps both pairs, each acting on its own weight kind."""
    registered = module.__dict__.setdefault("_bitnet_checkpoint_hooks", set())
    if hooks in registered:
        return
    state_dict_post_hook, load_pre_hook = hooks
    module.register_state_dict_post_hook(state_dict_post_hook)
    module.register_load_state_dict_pre_hook(load_pre_hook)
    registered.add(hooks)


# The hooks' paths in whole models pickled before the hooks were gathered here (from bitnet_ao/tensor.py and
# bitnet_ao/inference.py): a pickle names a function by its path, so torch.load(weights_only=True) of such a model
# finds each under its old name too, and torch.load(weights_only=False) imports it from there: tensor.py, below this
# module, gets its two names back from here; inference.py, above it, keeps aliases of its own.
_FORMER_PATHS = [
    (_master_weight_state_dict_hook, "bitnet_ao.tensor._state_dict_post_hook"),
    (_master_weight_load_hook, "bitnet_ao.tensor._load_state_dict_pre_hook"),
    (_packed_weight_state_dict_hook, "bitnet_ao.inference._state_dict_post_hook"),
    (_packed_weight_load_hook, "bitnet_ao.inference._load_state_dict_pre_hook"),
]
tensor_module._state_dict_post_hook = _master_weight_state_dict_hook
tensor_module._load_state_dict_pre_hook = _master_weight_load_hook
# torch keeps a load pre-hook in its own wrapper class (module_hook_wrapper); the user allowlists their own module
# classes, bitnet_ao everything of its own.
torch.serialization.add_safe_globals([module_hook_wrapper, *MASTER_WEIGHT_HOOKS, *PACKED_WEIGHT_HOOKS, *_FORMER_PATHS])
