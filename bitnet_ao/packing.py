"""2-bit packing of ternary (or binary) weights: four values per int8 byte.

Layout (the one ``kernels.scaled_int8_mm_packed`` and the FSDP2 all-gather use): along the last dimension,
value ``4 j + i`` of a row goes to bits ``2 i .. 2 i + 1`` of byte ``j``, as 2-bit two's complement::

    -2 -> 0b10    -1 -> 0b11    0 -> 0b00    1 -> 0b01

e.g. the row ``[1, -1, 0, 1]`` is the byte ``0b01_00_11_01`` = ``0x4D`` (value 0 in the low bits). A last
dimension ``K`` that is not a multiple of 4 is zero-padded, so a packed row has ``ceil(K / 4)`` bytes and
:func:`unpack_i2_in_i8` needs ``K`` back to trim the padding.

These functions validate their input and name what is wrong; the unchecked bodies live in
``bitnet_ao.kernels.reference`` so that kernels and tests share one definition.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .kernels import reference


def pack_i2_in_i8(x: Tensor) -> Tensor:
    """Pack an int8 tensor with values in ``{-2, -1, 0, 1}`` four to a byte along the last dimension.

    Returns int8 of shape ``(*x.shape[:-1], ceil(K / 4))``. Ternary weights use ``{-1, 0, 1}``, binary ones
    ``{-1, 1}``; ``-2`` is representable and round-trips.
    """
    if not isinstance(x, Tensor) or x.dtype != torch.int8:
        raise TypeError(f"pack_i2_in_i8: expected an int8 tensor, got {_describe(x)}")
    if x.dim() == 0:
        raise ValueError("pack_i2_in_i8: expected at least one dimension (values pack along the last), got 0-d")
    if x.numel() and (x.min() < -2 or x.max() > 1):
        raise ValueError(
            f"pack_i2_in_i8: values must lie in {{-2, -1, 0, 1}} to fit in 2 bits, got range "
            f"[{int(x.min())}, {int(x.max())}] in a tensor of shape {tuple(x.shape)}"
        )
    return reference.pack_i2_in_i8(x)


def unpack_i2_in_i8(packed: Tensor, k: int | None = None) -> Tensor:
    """Inverse of :func:`pack_i2_in_i8`: int8 values in ``{-2, -1, 0, 1}``, last dimension ``k``.

    ``k`` defaults to ``4 * packed.shape[-1]`` (no padding to trim); pass the original last dimension when it
    was not a multiple of 4, since the padding zeros are otherwise indistinguishable from real zeros.
    """
    if not isinstance(packed, Tensor) or packed.dtype != torch.int8:
        raise TypeError(f"unpack_i2_in_i8: expected an int8 tensor, got {_describe(packed)}")
    if packed.dim() == 0:
        raise ValueError("unpack_i2_in_i8: expected at least one dimension, got a 0-d tensor")
    capacity = 4 * packed.shape[-1]
    if k is None:
        k = capacity
    if not 0 <= capacity - k < 4:
        raise ValueError(
            f"unpack_i2_in_i8: k={k} does not match packed rows of {packed.shape[-1]} bytes "
            f"(they hold between {max(capacity - 3, 0)} and {capacity} values)"
        )
    return reference.unpack_i2_in_i8(packed, k)


def _describe(x: object) -> str:
    return f"a {x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
