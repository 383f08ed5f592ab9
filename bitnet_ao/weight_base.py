"""``BitNetWeightTensor``: what every BitNet weight kind is as a tensor subclass, written once.

A weight kind (``packed.py``, ``tensor.py``) is a wrapper tensor subclass that implements the
:class:`~bitnet_ao.linear.BitNetWeight` methods (its math) and its own ``__torch_dispatch__`` (which aten ops it
supports). The rest is the same for every kind and lives here:

- ``F.linear`` on the weight runs :func:`~bitnet_ao.linear.bitnet_linear` (``__torch_function__``); every other
  torch function runs as for a plain tensor and reaches the kind's ``__torch_dispatch__``.
- torch.compile's AOT autograd cache key (``_stable_hash_for_caching``): the metadata a compiled graph specializes
  on, never data, and the fingerprint of this library's code (:func:`implementation_fingerprint`). A kind adds its
  layout metadata (:meth:`BitNetWeightTensor._cache_key_layout`).
- Pickling (``torch.save`` of a weight or a whole module): the kind says how to rebuild itself
  (:meth:`BitNetWeightTensor._rebuild_args`, and the ``rebuild`` class keyword when its constructor is not the
  rebuild function). Every kind and its rebuild function are registered as safe globals when the class is
  created, so ``torch.load(weights_only=True)`` opens them once ``bitnet_ao`` is imported.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from . import kernels
from .config import BitNetTrainingConfig
from .linear import bitnet_linear
from .private_api import disable_torch_function_subclass, stable_hash_for_caching


@functools.cache
def implementation_fingerprint() -> str:
    """A digest of bitnet_ao's own code: every Python, C and C++ source of the package and of ``bitnet_ao.kernels``.

    Why it is part of the compile cache key: a graph compiled for a model with BitNet weights holds what the
    weight's code traced into (which ops, in which order, with which arguments), and torch's AOT autograd cache
    keys it on the dynamo graph, which only says ``F.linear``. Without the fingerprint a process running another
    version of bitnet_ao would load the graph compiled with the old one from the on-disk cache: a crash where an op
    was renamed, wrong numbers without a word where a formula changed. Read once per process (~400 KB)."""
    roots = {Path(__file__).parent, Path(kernels.__file__).parent}
    files = sorted({f for root in roots for f in root.rglob("*") if f.suffix in (".py", ".c", ".cpp", ".h")})
    digest = hashlib.blake2b(digest_size=16)
    for f in files:
        digest.update(f"{f.parent.name}/{f.name}".encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()


class BitNetWeightTensor(Tensor):
    """The base of every BitNet weight kind: routing of ``F.linear``, the compile cache key and pickling.

    A subclass declares how it pickles with ``class Kind(BitNetWeightTensor, rebuild=fn)``: ``fn(*args)`` with
    ``args = weight._rebuild_args()`` gives the weight back; without ``rebuild`` the class itself is called.
    """

    #: The training recipe the weight is quantized with (also kept by a packed weight: bits, group scales).
    config: BitNetTrainingConfig
    #: ``lambda`` of quantization warmup (docs/finetuning.md): ``None`` is ``lambda = 1``, the INT8 linear; while
    #: a :class:`bitnet_ao.warmup.QuantizationWarmup` blends a master weight, the 0-d float32 tensor it owns and
    #: updates in place (a graph input under torch.compile, so a new value needs no recompile).
    quantization_strength: Tensor | None = None
    #: What ``__reduce_ex__`` pickles the weight as a call of: the ``rebuild`` class keyword, else the class. A
    #: module-level name, registered as a safe global: the weights-only unpickler calls nothing else.
    _rebuild: Callable[..., BitNetWeightTensor]

    def __init_subclass__(cls, rebuild: Callable[..., BitNetWeightTensor] | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # staticmethod: stored on the class, a plain function would become a method of the instances.
        cls._rebuild = staticmethod(rebuild) if rebuild is not None else cls
        torch.serialization.add_safe_globals([cls, BitNetTrainingConfig, rebuild or cls])

    def _cache_key_layout(self) -> tuple:
        """What a compiled graph specializes on besides shape, dtype, device, ``requires_grad`` and the recipe
        (the master weight: its strides); empty by default."""
        return ()

    def _rebuild_args(self) -> tuple:
        """The arguments that rebuild this weight when pickled (see the class docstring)."""
        raise NotImplementedError(f"{type(self).__name__} does not say how it pickles (_rebuild_args)")

    def _stable_hash_for_caching(self) -> str:
        # Key for torch.compile's AOT autograd cache: everything a compiled graph specializes on, no data.
        meta = (
            implementation_fingerprint(),
            tuple(self.shape),
            *self._cache_key_layout(),
            self.dtype,
            self.device.type,
            self.requires_grad,
            self.config,
        )
        return stable_hash_for_caching(meta)

    def __reduce_ex__(self, protocol: int) -> tuple[Callable[..., BitNetWeightTensor], tuple]:
        return (self._rebuild, self._rebuild_args())

    @classmethod
    def __torch_function__(
        cls, func: Callable, types: tuple[type, ...], args: tuple = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.linear:
            return bitnet_linear(*args, **kwargs)
        with disable_torch_function_subclass():
            return func(*args, **kwargs)
