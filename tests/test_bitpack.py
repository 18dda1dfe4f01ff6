"""Bit packing: the torch reference round-trips, and the Triton kernel equals it."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcompress.testing import kernel_devices
from kvcompress_kernels.bitpack import (
    code_dtype,
    pack_bits,
    pack_bits_torch,
    packed_length,
    unpack_bits,
    unpack_bits_torch,
)


def codes(shape: tuple[int, ...], bits: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 2**bits, shape, generator=torch.Generator().manual_seed(seed))


@settings(max_examples=150, deadline=None)
@given(bits=st.integers(1, 16), n=st.integers(1, 130), rows=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_round_trip_any_width_and_length(bits, n, rows, seed):
    original = codes((rows, n), bits, seed)
    packed = pack_bits_torch(original, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (rows, packed_length(n, bits))
    restored = unpack_bits_torch(packed, bits, n)
    assert restored.dtype == code_dtype(bits)
    assert torch.equal(restored.long(), original)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_whole_byte_fast_path_matches_the_bit_stream(bits):
    # n divisible by 8/bits takes the fast path; n + 1 codes with a trailing zero share its first bytes.
    original = codes((3, 64), bits, 0)
    extended = torch.cat([original, torch.zeros(3, 8 // bits, dtype=original.dtype)], dim=1)[:, : 64 + 1]
    assert torch.equal(pack_bits_torch(extended, bits)[:, : packed_length(64, bits)], pack_bits_torch(original, bits))


def test_exact_size_is_the_bit_count():
    assert packed_length(64, 3) == 24 and packed_length(13, 3) == 5 and packed_length(11, 11) == 16


def test_out_of_range_width_is_rejected():
    with pytest.raises(ValueError, match="bits must be in 1..16"):
        pack_bits_torch(torch.zeros(4, dtype=torch.uint8), 17)


def test_dispatcher_uses_the_reference_on_cpu():
    original = codes((2, 5, 33), 3, 1)
    assert torch.equal(pack_bits(original, 3), pack_bits_torch(original, 3))
    assert torch.equal(unpack_bits(pack_bits(original, 3), 3, 33).long(), original)


@pytest.mark.triton
@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("bits", list(range(1, 9)) + [11, 16])
@pytest.mark.parametrize("n", [1, 7, 64, 101])
def test_triton_kernel_equals_reference(bits, n, device):
    from kvcompress_kernels.bitpack import pack_bits_triton, unpack_bits_triton

    original = codes((2, 3, n), bits, bits * 1000 + n)
    packed = pack_bits_torch(original, bits)
    assert torch.equal(pack_bits_triton(original.to(device), bits).cpu(), packed)
    assert torch.equal(unpack_bits_triton(packed.to(device), bits, n).cpu(), unpack_bits_torch(packed, bits, n))
