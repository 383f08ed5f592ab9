"""``bitnet_ao.pack_i2_in_i8`` / ``pack_i1_in_i8`` and their inverses: the bit layouts, exact round trips, clear
errors."""

from __future__ import annotations

import pytest
import torch

from bitnet_ao import kernels, pack_i1_in_i8, pack_i2_in_i8, unpack_i1_in_i8, unpack_i2_in_i8
from tests.conftest import random_int8


def test_bit_layout_matches_hand_computed_bytes():
    # Value 4j+i sits at bits 2i..2i+1 of byte j; -2 -> 0b10, -1 -> 0b11, 0 -> 0b00, 1 -> 0b01.
    x = torch.tensor([[1, -1, 0, 1, -2, 0, 0, 0], [-1, -1, -1, -1, 0, 1, 0, 0]], dtype=torch.int8)
    expected = [[0b01_00_11_01, 0b00_00_00_10], [0b11_11_11_11, 0b00_00_01_00]]
    packed = pack_i2_in_i8(x)
    assert packed.dtype == torch.int8
    assert packed.view(torch.uint8).tolist() == expected


def test_odd_last_dimension_is_zero_padded():
    x = torch.tensor([[1, -1, 1, -1, -1]], dtype=torch.int8)
    packed = pack_i2_in_i8(x)
    assert packed.shape == (1, 2)
    assert packed.view(torch.uint8).tolist() == [[0b11_01_11_01, 0b00_00_00_11]]
    assert torch.equal(unpack_i2_in_i8(packed, 5), x)
    assert unpack_i2_in_i8(packed).tolist() == [[1, -1, 1, -1, -1, 0, 0, 0]]


# (0, 5): no rows, as an FSDP2 shard of a weight with fewer rows than ranks (out_features=1 on 2 ranks).
@pytest.mark.parametrize("shape", [(7, 33), (3, 4), (2, 5, 6), (1,), (4, 0), (0, 5), (2, 0, 6)])
def test_round_trip_is_exact(shape):
    x = random_int8(*shape, low=-2, high=2, generator=torch.Generator().manual_seed(0))
    packed = pack_i2_in_i8(x)
    assert packed.shape == (*shape[:-1], -(-shape[-1] // 4))
    assert torch.equal(unpack_i2_in_i8(packed, shape[-1]), x)


def test_one_bit_layout_and_round_trip():
    # Value 8j+i sits at bit i of byte j: 1 for +1, 0 for -1; the last byte is padded with 0 bits.
    x = torch.tensor([[1, -1, -1, 1, 1, 1, -1, -1, 1, -1]], dtype=torch.int8)
    packed = pack_i1_in_i8(x)
    assert packed.view(torch.uint8).tolist() == [[0b0011_1001, 0b0000_0001]]
    assert torch.equal(unpack_i1_in_i8(packed, 10), x)
    for shape in [(5, 17), (2, 3, 8), (4, 0), (0, 9)]:
        y = random_int8(*shape, low=0, high=2, generator=torch.Generator().manual_seed(3)) * 2 - 1
        assert pack_i1_in_i8(y).shape == (*shape[:-1], -(-shape[-1] // 8))
        assert torch.equal(unpack_i1_in_i8(pack_i1_in_i8(y), shape[-1]), y)
    with pytest.raises(ValueError, match="-1 or 1, got a 0"):
        pack_i1_in_i8(torch.tensor([1, 0], dtype=torch.int8))
    with pytest.raises(ValueError, match=r"k=17 does not match packed rows of 2 bytes \(they hold between 9 and 16"):
        unpack_i1_in_i8(packed, 17)


def test_agrees_with_kernel_packed_matmul():
    w = random_int8(6, 10, low=-1, high=2, generator=torch.Generator().manual_seed(1))
    a = random_int8(3, 10, generator=torch.Generator().manual_seed(2))
    out = kernels.scaled_int8_mm_packed(a, pack_i2_in_i8(w), 10, True, None, None, None, None, torch.float32)
    assert torch.equal(out, (a.long() @ w.long().t()).float())


@pytest.mark.parametrize(
    ("x", "error", "match"),
    [
        (torch.zeros(4, dtype=torch.int32), TypeError, "int8"),
        (torch.zeros(4), TypeError, "float32"),
        (torch.tensor([0, 2], dtype=torch.int8), ValueError, r"\[0, 2\]"),
        (torch.tensor([-3, 0], dtype=torch.int8), ValueError, "-2, -1, 0, 1"),
        (torch.tensor(1, dtype=torch.int8), ValueError, "0-d"),
        ([1, 0], TypeError, "list"),
    ],
)
def test_pack_errors(x, error, match):
    with pytest.raises(error, match=match):
        pack_i2_in_i8(x)


def test_unpack_errors():
    packed = torch.zeros(2, 3, dtype=torch.int8)
    with pytest.raises(TypeError, match="uint8"):
        unpack_i2_in_i8(packed.view(torch.uint8))
    for k in (8, 13, -1):
        with pytest.raises(ValueError, match=f"k={k}"):
            unpack_i2_in_i8(packed, k)
    with pytest.raises(ValueError, match="0-d"):
        unpack_i2_in_i8(torch.tensor(0, dtype=torch.int8))
