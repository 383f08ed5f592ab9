"""The CPU kernels registered in C++ (``cpu_ops.cpp``), built against this torch on first use: the CPU kernel of the
op ``torch.ops.bitnet_ao.packed_linear`` (defined in ``ops.py``) and one query's attention over a KV cache,
``torch.ops.bitnet_ao.decode_attention``, which compiled code (inductor's C++ wrapper, AOTInductor) and the eager
dispatcher call without Python. ``decode_attention``'s fake implementation is here (``packed_linear``'s is in
``ops.py``), so that ``torch.compile`` and ``torch.export`` trace them.

:func:`available` builds and loads the library (and is what a process must call before it loads a package that
uses them: until then ``packed_linear``'s Python implementation serves CPU tensors, calling the same C through ctypes
for decode-sized inputs, with the same bits).
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
    defines = {
        "BITNET_AO_ACTIVATION_EPS": repr(reference.ACTIVATION_EPS),
        "BITNET_AO_DECODE_MAX_M": str(cpu_gemv.MAX_M),
        "BITNET_AO_DECODE_MAX_K": str(cpu_gemv.MAX_K),
    }
    if cpu_build.load_torch_library(SOURCE, (cpu_gemv.SOURCE,), defines) is None:
        return False
    torch.library.register_fake("bitnet_ao::decode_attention")(_decode_attention_fake)
    return True


def _decode_attention_fake(q: Tensor, keys: Tensor, values: Tensor, scale: float) -> Tensor:
    return q.new_empty(q.shape[:2] + (1, q.shape[3]))
