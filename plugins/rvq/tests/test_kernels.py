"""kernels/rvq.py: the torch references do what they claim, and the Triton kernels equal them (compiled on CUDA
where a GPU answers, under TRITON_INTERPRET=1 on CPU tensors elsewhere: kvcompress.testing.kernel_devices)."""

from __future__ import annotations

import pytest
import torch

from kvcompress.testing import kernel_devices
from kvcompress_kernels.bitpack import pack_bits_torch
from kvcompress_rvq.kernels import (
    lut_scores,
    lut_scores_torch,
    lut_scores_triton,
    nearest_codeword,
    nearest_codeword_torch,
    nearest_codeword_triton,
    residual_decode,
    residual_encode,
)


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_nearest_codeword_is_the_brute_force_minimum():
    residuals = torch.randn(300, 8, generator=generator(0))
    codebook = torch.randn(40, 8, generator=generator(1))
    brute = torch.cdist(residuals.double(), codebook.double()).argmin(-1)
    assert torch.equal(nearest_codeword_torch(residuals, codebook), brute)


def test_ties_go_to_the_lowest_index():
    codebook = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    residuals = torch.tensor([[0.5, 0.5], [0.0, 2.0], [3.0, 0.0]])  # equidistant from all, then from 1 and 3, 0 and 2
    assert nearest_codeword_torch(residuals, codebook).tolist() == [0, 1, 0]


def test_search_rejects_mismatched_widths():
    with pytest.raises(ValueError, match=r"residuals \[N, g\] and a codebook \[C, g\]"):
        nearest_codeword_torch(torch.zeros(3, 4), torch.zeros(5, 8))


def test_residual_encode_recovers_a_sum_of_codewords():
    # levels of decreasing scale, so the greedy search recovers every level's choice
    codebooks = torch.stack([torch.randn(32, 16, generator=generator(level)) * 4.0**-level for level in range(4)])
    codes = torch.randint(0, 32, (50, 4), generator=generator(9))
    vectors = residual_decode(codes, codebooks)
    assert torch.equal(residual_encode(vectors, codebooks), codes)


def _tables_and_codes(b, h, n, t, m, bits, seed=0):
    size = 2**bits
    tables = torch.randn(b, h, n, m, size, generator=generator(seed))
    codes = torch.randint(0, size, (b, h, t, m), generator=generator(seed + 1))
    scale = (torch.rand(b, h, t, generator=generator(seed + 2)) + 0.5).half()
    return tables, codes, pack_bits_torch(codes, bits), scale


@pytest.mark.parametrize("bits", [8, 11, 5])
def test_lut_scores_sum_the_table_entries(bits):
    tables, codes, packed, scale = _tables_and_codes(1, 2, 3, 7, 6, bits)
    got = lut_scores_torch(tables, packed, scale, bits)
    picked = tables.gather(-1, codes.unsqueeze(2).expand(1, 2, 3, 7, 6).permute(0, 1, 2, 4, 3))  # [b, h, n, m, t]
    want = picked.sum(3) * scale.float().unsqueeze(2)
    torch.testing.assert_close(got, want)


def test_lut_scores_reject_codes_of_another_width():
    tables, _, packed, scale = _tables_and_codes(1, 1, 2, 4, 6, 8)
    with pytest.raises(ValueError, match="do not hold 6 codes of 11 bits"):
        lut_scores_torch(tables, packed, scale, 11)


def test_dispatchers_use_the_reference_on_cpu():
    residuals, codebook = torch.randn(20, 8, generator=generator(3)), torch.randn(16, 8, generator=generator(4))
    assert torch.equal(nearest_codeword(residuals, codebook), nearest_codeword_torch(residuals, codebook))
    tables, _, packed, scale = _tables_and_codes(1, 2, 2, 5, 4, 4)
    assert torch.equal(lut_scores(tables, packed, scale, 4), lut_scores_torch(tables, packed, scale, 4))


@pytest.mark.triton
@pytest.mark.parametrize("device", kernel_devices())
def test_nearest_codeword_kernel_equals_the_reference_with_ties(device):
    # small integers: every distance is exact in float32, and repeated codewords make exact ties
    values = torch.randint(-3, 4, (100, 8), generator=generator(5)).float()
    codebook = torch.randint(-2, 3, (70, 8), generator=generator(6)).float()
    codebook[40:] = codebook[:30]  # duplicates in a later block: the first copy must win
    got = nearest_codeword_triton(values.to(device), codebook.to(device)).cpu()
    assert torch.equal(got, nearest_codeword_torch(values, codebook))


@pytest.mark.triton
@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("rows,size,width", [(37, 256, 32), (5, 16, 8), (64, 100, 20)])
def test_nearest_codeword_kernel_equals_the_reference(rows, size, width, device):
    residuals = torch.randn(rows, width, generator=generator(rows))
    codebook = torch.randn(size, width, generator=generator(size))
    got = nearest_codeword_triton(residuals.to(device), codebook.to(device)).cpu()
    want = nearest_codeword_torch(residuals, codebook)
    assert torch.equal(got, want)


@pytest.mark.triton
@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("bits,m,t", [(8, 22, 70), (11, 16, 33), (3, 5, 9), (16, 2, 4)])
def test_lut_scores_kernel_equals_the_reference(bits, m, t, device):
    size = min(2**bits, 64)  # a codebook may be smaller than the code width allows
    tables = torch.randn(2, 2, 3, m, size, generator=generator(bits))
    codes = torch.randint(0, size, (2, 2, t, m), generator=generator(bits + 1))
    scale = (torch.rand(2, 2, t, generator=generator(bits + 2)) + 0.5).half()
    packed = pack_bits_torch(codes, bits)
    got = lut_scores_triton(tables.to(device), packed.to(device), scale.to(device), bits).cpu()
    torch.testing.assert_close(got, lut_scores_torch(tables, packed, scale, bits))
