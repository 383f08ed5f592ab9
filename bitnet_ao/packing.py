"""Packing of BitNet weights into int8 bytes: ternary values 2 bits each, binary values 1 bit each.

2-bit layout (the one ``kernels.scaled_int8_mm_packed``, the FSDP2 all-gather and the inference weight use): along
the last dimension,
value ``4 j + i`` of a row goes to bits ``2 i .. 2 i + 1`` of byte ``j``, as 2-bit two's complement::

    -2 -> 0b10    -1 -> 0b11    0 -> 0b00    1 -> 0b01

e.g. the row ``[1, -1, 0, 1]`` is the byte ``0b01_00_11_01`` = ``0x4D`` (value 0 in the low bits). A last
dimension ``K`` that is not a multiple of 4 is zero-padded, so a packed row has ``ceil(K / 4)`` bytes and
:func:`unpack_i2_in_i8` needs ``K`` back to trim the padding.

1-bit layout (binary weights, ``{-1, 1}``): value ``8 j + i`` of a row goes to bit ``i`` of byte ``j``, 1 for ``+1``
and 0 for ``-1``; rows of ``ceil(K / 8)`` bytes, padded with 0 bits.

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
    _check_values("pack_i2_in_i8", x, -2, 1)
    return reference.pack_i2_in_i8(x)


def unpack_i2_in_i8(packed: Tensor, k: int | None = None) -> Tensor:
    """Inverse of :func:`pack_i2_in_i8`: int8 values in ``{-2, -1, 0, 1}``, last dimension ``k``.

    ``k`` defaults to ``4 * packed.shape[-1]`` (no padding to trim); pass the original last dimension when it
    was not a multiple of 4, since the padding zeros are otherwise indistinguishable from real zeros.
    """
    return reference.unpack_i2_in_i8(packed, _check_packed("unpack_i2_in_i8", packed, k, 4))


def pack_i1_in_i8(x: Tensor) -> Tensor:
    """Pack an int8 tensor with values in ``{-1, 1}`` (binary weights) eight to a byte along the last dimension.

    Returns int8 of shape ``(*x.shape[:-1], ceil(K / 8))``.
    """
    _check_values("pack_i1_in_i8", x, -1, 1)
    if x.numel() and bool((x == 0).any()):
        raise ValueError(f"pack_i1_in_i8: values must be -1 or 1, got a 0 in a tensor of shape {tuple(x.shape)}")
    return reference.pack_i1_in_i8(x)


def unpack_i1_in_i8(packed: Tensor, k: int | None = None) -> Tensor:
    """Inverse of :func:`pack_i1_in_i8`: int8 values in ``{-1, 1}``, last dimension ``k`` (default
    ``8 * packed.shape[-1]``; pass the original when it was not a multiple of 8)."""
    return reference.unpack_i1_in_i8(packed, _check_packed("unpack_i1_in_i8", packed, k, 8))


def _check_values(name: str, x: object, low: int, high: int) -> None:
    if not isinstance(x, Tensor) or x.dtype != torch.int8:
        raise TypeError(f"{name}: expected an int8 tensor, got {_describe(x)}")
    if x.dim() == 0:
        raise ValueError(f"{name}: expected at least one dimension (values pack along the last), got 0-d")
    if x.numel() and (x.min() < low or x.max() > high):
        allowed = ", ".join(map(str, range(low, high + 1)))
        raise ValueError(
            f"{name}: values must lie in {{{allowed}}} to fit, got range [{int(x.min())}, {int(x.max())}] in a "
            f"tensor of shape {tuple(x.shape)}"
        )


def _check_packed(name: str, packed: object, k: int | None, per_byte: int) -> int:
    """Validate ``packed`` and return the number of values per row (``k``, or all the row holds)."""
    if not isinstance(packed, Tensor) or packed.dtype != torch.int8:
        raise TypeError(f"{name}: expected an int8 tensor, got {_describe(packed)}")
    if packed.dim() == 0:
        raise ValueError(f"{name}: expected at least one dimension, got a 0-d tensor")
    capacity = per_byte * packed.shape[-1]
    if k is None:
        return capacity
    if not 0 <= capacity - k < per_byte:
        raise ValueError(
            f"{name}: k={k} does not match packed rows of {packed.shape[-1]} bytes "
            f"(they hold between {max(capacity - per_byte + 1, 0)} and {capacity} values)"
        )
    return k


def _describe(x: object) -> str:
    return f"a {x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
