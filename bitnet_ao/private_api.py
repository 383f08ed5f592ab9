"""Every private torch / Triton API bitnet_ao relies on, in one place, each with the version it was checked on.

Tensor subclasses, FSDP2 extensions and custom kernels need a few internals that carry no stability promise.
Keeping them here means an upgrade is reviewed in one file, and ``tests/test_private_api.py`` checks each
behaviour the package depends on, so a torch or Triton release that changes one fails there, by name, instead of
deep inside a training step. This module imports nothing from bitnet_ao (every layer may use it).

Checked on torch 2.13.0 and Triton 3.9.0 (:data:`CHECKED_ON`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as _pytree
from torch import Tensor

#: The releases every entry below was checked on.
CHECKED_ON = {"torch": "2.13.0", "triton": "3.9.0"}


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


def dispatch_mode_active() -> bool:
    """Whether a ``TorchDispatchMode`` (fake tensors, FLOP or communication counters, functionalization) is on the
    stack (torch 2.13.0: ``torch._C._len_torch_dispatch_stack``): such a mode must see a custom op as one op."""
    return torch._C._len_torch_dispatch_stack() > 0


def outside_dispatch_modes() -> Any:
    """Context manager that runs its block on real tensors with every ``TorchDispatchMode`` (fake tensors of a
    torch.compile trace included) taken off the stack (torch 2.13.0: ``torch.utils._python_dispatch.
    _disable_current_modes``): measuring the CPU's int8 routes may first happen while a compile traces."""
    from torch.utils._python_dispatch import _disable_current_modes

    return _disable_current_modes()


#: Context manager that turns ``__torch_function__`` of tensor subclasses off (torch 2.13.0:
#: ``torch._C.DisableTorchFunctionSubclass``): a subclass's own override calls the plain function through it.
disable_torch_function_subclass = torch._C.DisableTorchFunctionSubclass


def make_wrapper_subclass(cls: type, shape: torch.Size | tuple[int, ...], **kwargs: Any) -> Tensor:
    """A tensor of class ``cls`` with the given metadata and no storage (torch 2.13.0:
    ``Tensor._make_wrapper_subclass``), the base of every wrapper tensor subclass in torch and torchao."""
    return Tensor._make_wrapper_subclass(cls, shape, **kwargs)


def stable_hash_for_caching(meta: tuple) -> str:
    """What a tensor subclass's ``_stable_hash_for_caching`` (the key torch.compile's AOT autograd cache asks
    for) returns: a digest of everything a compiled graph specializes on, ``meta``, and no data."""
    return hashlib.blake2b(repr(meta).encode(), digest_size=16).hexdigest()


def tree_map_only(cls: type, fn: Callable, tree: Any) -> Any:
    """``fn`` applied to every instance of ``cls`` in a nested structure (torch 2.13.0:
    ``torch.utils._pytree.tree_map_only``), how ``__torch_dispatch__`` unwraps arguments."""
    return _pytree.tree_map_only(cls, fn, tree)


def dtensor_local(t: Tensor) -> Tensor:
    """The local shard of a DTensor as the very object FSDP2 keeps (torch 2.13.0: ``DTensor._local_tensor``).
    ``to_local()`` is an autograd op that may return a view, so object identity needs the attribute."""
    return t._local_tensor


def int_mm(a: Tensor, b: Tensor) -> Tensor:
    """Exact int8 x int8 -> int32 matmul (torch 2.13.0: ``torch._int_mm``; on CPU fast only where oneDNN has
    VNNI / AMX kernels)."""
    return torch._int_mm(a, b)


def onednn_int8_linear_available() -> bool:
    """Whether oneDNN's int8 linear ops exist in this build (torch 2.13.0 x86 builds: ``torch.ops.onednn``)."""
    return hasattr(torch.ops.onednn, "qlinear_pointwise")


def onednn_int8_linear(a_u8: Tensor, zero_point: int, weight_s8: Tensor) -> Tensor:
    """``(a_u8 - zero_point) @ weight_s8.T`` as float32, by oneDNN's u8 x s8 linear (torch 2.13.0:
    ``torch.ops.onednn.qlinear_prepack`` + ``qlinear_pointwise``, the ops inductor's int8 lowering uses), with
    unit scales so the output is the integer sum itself. ``weight_s8`` is ``(N, K)``, prepacked on every call."""
    n = weight_s8.shape[0]
    packed = torch.ops.onednn.qlinear_prepack(weight_s8, None)
    ones, zeros = torch.ones(n), torch.zeros(n, dtype=torch.long)
    return torch.ops.onednn.qlinear_pointwise(
        a_u8, 1.0, zero_point, packed, ones, zeros, None, 1.0, 0, torch.float32, "none", [], ""
    )


def cpu_has_int8_dot_product() -> bool:
    """Whether this CPU has int8 dot-product instructions oneDNN uses for ``torch._int_mm`` (torch 2.13.0:
    ``torch.cpu._is_vnni_supported()`` for AVX-512 VNNI, ``torch.cpu._is_amx_tile_supported()`` for AMX)."""
    return torch.cpu._is_vnni_supported() or torch.cpu._is_amx_tile_supported()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies BF16 natively (torch 2.13.0: ``torch.cpu._is_avx512_bf16_supported()`` or
    AMX); without it a BF16 matmul falls back to scalar code, 30-80x slower than FP32."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def triton_interpreting() -> bool:
    """Whether Triton kernels run in Triton's interpreter (Triton 3.9.0: ``triton.knobs.runtime.interpret``,
    read from ``TRITON_INTERPRET`` when a kernel is decorated)."""
    import triton

    return bool(triton.knobs.runtime.interpret)


def triton_compiler() -> tuple[type, type]:
    """``(ASTSource, GPUTarget)``: Triton's ahead-of-time compiler entry points (Triton 3.9.0), used by
    ``bitnet_ao.kernels.triton_aot_check`` to compile kernels for a GPU on a machine without one."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    return ASTSource, GPUTarget
