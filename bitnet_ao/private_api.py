"""Every private torch API the modules of bitnet_ao/ rely on, in one place, each with the version it was checked on.

Tensor subclasses and FSDP2 extensions need a few internals that carry no stability promise. Keeping them here
means an upgrade is reviewed in one file, and ``tests/test_private_api.py`` checks each behaviour the package
depends on, so a torch release that changes one fails there, by name, instead of deep inside a training step. This
module imports nothing from bitnet_ao (every layer may use it). The kernels' own wrappers (the int8 matmuls, the
dispatch-mode checks, Triton's knobs and compiler) live in ``bitnet_ao.kernels.private_api``, since ``kernels/``
imports nothing from outside itself; each wrapper exists in one of the two modules only.

Checked on torch 2.13.0 (:data:`CHECKED_ON`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as _pytree
from torch import Tensor

#: The releases every entry below was checked on.
CHECKED_ON = {"torch": "2.13.0", "torchao": "0.18.0"}


def in_backward() -> bool:
    """Whether the calling code runs inside an autograd backward pass (torch 2.13.0:
    ``torch._C._current_graph_task_id()`` is -1 outside of one). FSDP2 re-gathers inside the backward reuse the
    forward's weight scale and must not start a collective of their own."""
    return torch._C._current_graph_task_id() != -1


def is_compiling_with_fake_tensors() -> bool:
    """Whether torch.compile is tracing right now (torch 2.13.0: ``torch._guards.TracingContext.try_get()`` is
    set during dynamo and AOT tracing). Unlike ``torch.compiler.is_compiling()`` it is also true inside
    ``__torch_function__`` overrides called while tracing."""
    return torch._guards.TracingContext.try_get() is not None


#: Context manager that turns ``__torch_function__`` of tensor subclasses off (torch 2.13.0:
#: ``torch._C.DisableTorchFunctionSubclass``): a subclass's own override calls the plain function through it.
disable_torch_function_subclass = torch._C.DisableTorchFunctionSubclass


#: The wrapper ``nn.Module.register_load_state_dict_pre_hook`` keeps each hook in (torch 2.13.0:
#: ``torch.nn.modules.module._WrappedHook``). A pickled module holds it, so ``torch.load(weights_only=True)`` of a
#: whole model with load hooks needs it allowlisted.
module_hook_wrapper = torch.nn.modules.module._WrappedHook


def make_wrapper_subclass(cls: type, shape: torch.Size | tuple[int, ...], **kwargs: Any) -> Tensor:
    """A tensor of class ``cls`` with the given metadata and no storage (torch 2.13.0:
    ``Tensor._make_wrapper_subclass``), the base of every wrapper tensor subclass in torch and torchao."""
    return Tensor._make_wrapper_subclass(cls, shape, **kwargs)


def stable_hash_for_caching(meta: tuple) -> str:
    """What a tensor subclass's ``_stable_hash_for_caching`` (the key torch.compile's AOT autograd cache asks
    for, torch 2.13.0) returns: a digest of everything a compiled graph specializes on, ``meta``, and no data."""
    return hashlib.blake2b(repr(meta).encode(), digest_size=16).hexdigest()


def tree_map_only(cls: type, fn: Callable, tree: Any) -> Any:
    """``fn`` applied to every instance of ``cls`` in a nested structure (torch 2.13.0:
    ``torch.utils._pytree.tree_map_only``), how ``__torch_dispatch__`` unwraps arguments."""
    return _pytree.tree_map_only(cls, fn, tree)


def is_mutable_op(func: torch._ops.OpOverload) -> bool:
    """Whether the aten op ``func`` writes into one of its arguments (torch 2.13.0: ``OpOverload._schema.
    is_mutable``): the in-place updates a ``__torch_dispatch__`` answers with the weight itself."""
    return func._schema.is_mutable


def dtensor_local(t: Tensor) -> Tensor:
    """The local shard of a DTensor as the very object FSDP2 keeps (torch 2.13.0: ``DTensor._local_tensor``).
    ``to_local()`` is an autograd op that may return a view, so object identity needs the attribute."""
    return t._local_tensor


def torchtitan_sharding_config(module: Any) -> Any:
    """The ``ShardingConfig`` torchtitan attached to a built module, ``None`` for a module without one (torchtitan
    0.3.0 on torch 2.13.0: ``Module._sharding_config``, set by ``Module.Config.build``; no public accessor). It says
    how tensor parallelism shards each parameter, which the BitNet linear needs before torchtitan's ``parallelize``
    does it."""
    return module._sharding_config


def observe_quantize_(config_types: tuple[type, ...], on_done: Callable[[Any, Any, int], None]) -> None:
    """Make torchao's ``quantize_`` call ``on_done(model, config, converted)`` after it has walked ``model`` with a
    config of one of ``config_types``: ``converted`` is how many modules the config's handler was given. torchao
    has no API that says ``quantize_`` selected nothing (a ``filter_fn`` with a typo). On torch 2.13.0 with torchao
    0.18.0, ``quantize_`` walks the model with ``quant_api._replace_with_custom_fn_if_matches_filter(model,
    handler, filter_fn, cur_fqn, device, extra_args=(config,))``, which recurses through that module global with
    a non-empty ``cur_fqn`` and calls the handler only on the modules the filter selects. Every other caller
    passes through untouched."""
    from torchao.quantization import quant_api

    original = quant_api._replace_with_custom_fn_if_matches_filter
    if getattr(original, "_bitnet_ao_observed", False):
        return

    def walk(model, replacement_fn, filter_fn, cur_fqn="", device=None, extra_args=()):
        config = extra_args[0] if extra_args else None
        if cur_fqn or not isinstance(config, config_types):
            return original(model, replacement_fn, filter_fn, cur_fqn, device, extra_args)
        converted = 0

        def counted(module, *args):
            nonlocal converted
            converted += 1
            return replacement_fn(module, *args)

        result = original(model, counted, filter_fn, cur_fqn, device, extra_args)
        on_done(model, config, converted)
        return result

    walk._bitnet_ao_observed = True
    quant_api._replace_with_custom_fn_if_matches_filter = walk
