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
CHECKED_ON = {"torch": "2.13.0"}


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
