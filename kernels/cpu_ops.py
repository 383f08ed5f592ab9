"""Operators registered in C++ (``cpu_ops.cpp``), built against this torch on first use: the packed decode linear
``torch.ops.bitnet_ao.packed_linear_cpu`` and one query's attention over a KV cache
``torch.ops.bitnet_ao.decode_attention``, which compiled code (inductor's C++ wrapper, AOTInductor) calls without
Python. Their fake implementations are here, so that ``torch.compile`` and ``torch.export`` trace them.

:func:`available` builds and loads the library (and is what a process must call before it loads a package that
uses them). ``kernels.run_packed_linear`` calls the decode linear where it is available and
``torch_backend.decode_linear_applies`` holds; elsewhere the Python op ``bitnet_ao::packed_linear`` runs, whose CPU
kernel calls the same C through ctypes where that holds too.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import Tensor

from . import cpu_build, cpu_gemv, reference

SOURCE = Path(__file__).with_name("cpu_ops.cpp")


@torch.compiler.assume_constant_result
def available() -> bool:
    """Whether the operator library is built and loaded (building it on the first call: ~20 s on 2 cores). A
    constant of compiled graphs: torch.compile may be the first to ask."""
    return _load()


@functools.cache
def _load() -> bool:
    defines = {"BITNET_AO_ACTIVATION_EPS": repr(reference.ACTIVATION_EPS)}
    if cpu_build.load_torch_library(SOURCE, (cpu_gemv.SOURCE,), defines) is None:
        return False
    torch.library.register_fake("bitnet_ao::packed_linear_cpu")(_packed_linear_fake)
    torch.library.register_fake("bitnet_ao::decode_attention")(_decode_attention_fake)
    return True


def _decode_attention_fake(q: Tensor, keys: Tensor, values: Tensor, scale: float) -> Tensor:
    return q.new_empty(q.shape[:2] + (1, q.shape[3]))


def _packed_linear_fake(
    x: Tensor,
    norm_weight: Tensor | None,
    norm_eps: float,
    b_packed: Tensor,
    k: int,
    bits: int,
    scale: Tensor,
    bias: Tensor | None,
    out_dtype: torch.dtype,
) -> Tensor:
    return x.new_empty((x.shape[0], b_packed.shape[0]), dtype=out_dtype)
