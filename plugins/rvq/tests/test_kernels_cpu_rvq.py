"""The RVQ C++ kernels (kernels_cpu.cpp) against their torch references: the encoder (codebook sizes that are and
are not multiples of its tile, group widths, odd row counts, one and two threads, ties) and the lookup-table
scores and mix of 8-bit codes (query counts, odd token counts, batches, a store's strided views)."""

from __future__ import annotations

import pytest
import torch

from kvcompress_kernels import native
from kvcompress_rvq.kernels import (
    NATIVE_SOURCE,
    lut_mix,
    lut_mix_native,
    lut_mix_torch,
    lut_scores,
    lut_scores_native,
    lut_scores_torch,
    residual_decode,
    residual_encode,
    residual_encode_native,
    residual_encode_torch,
)


@pytest.fixture(autouse=True)
def needs_compiler():
    if native.library(NATIVE_SOURCE) is None:
        pytest.skip(f"no C++ kernel: {native.unavailable(NATIVE_SOURCE)}")


def codebooks(depth: int, size: int, width: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    decay = (0.7 ** torch.arange(depth, dtype=torch.float32)).view(depth, 1, 1)
    return torch.randn(depth, size, width, generator=generator) * decay


def assert_same_codes(vectors: torch.Tensor, books: torch.Tensor, got: torch.Tensor) -> None:
    """Equal codes; a code may differ only where two codewords are within float rounding (then the coding error is
    the same to rounding)."""
    expected = residual_encode_torch(vectors, books)
    differ = (got != expected).any(-1)
    assert differ.float().mean() <= 0.01
    error = lambda codes: (vectors - residual_decode(codes, books)).square().sum(-1)
    torch.testing.assert_close(error(got)[differ], error(expected)[differ], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("depth, size, width", [(11, 256, 32), (6, 256, 32), (3, 100, 8), (2, 16, 64), (1, 65, 5)])
@pytest.mark.parametrize("rows", [1, 7, 1001])
def test_matches_the_reference(depth, size, width, rows):
    books = codebooks(depth, size, width, seed=size)
    vectors = torch.randn(rows, width, generator=torch.Generator().manual_seed(rows))
    assert_same_codes(vectors, books, residual_encode_native(vectors, books))


@pytest.mark.parametrize("threads", [1, 2])
def test_threads_split_rows_alike(threads):
    books = codebooks(4, 256, 32)
    vectors = torch.randn(3001, 32, generator=torch.Generator().manual_seed(3))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = residual_encode_native(vectors, books)
    finally:
        torch.set_num_threads(previous)
    assert_same_codes(vectors, books, got)


def test_ties_go_to_the_lowest_index():
    books = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]] * 2)
    vectors = torch.tensor([[0.5, 0.5], [0.0, 2.0], [3.0, 0.0]])
    assert torch.equal(residual_encode_native(vectors, books), residual_encode_torch(vectors, books))
    assert residual_encode_native(vectors, books)[:, 0].tolist() == [0, 1, 0]


def test_empty_input_and_shapes():
    books = codebooks(2, 16, 8)
    assert residual_encode_native(torch.zeros(0, 8), books).shape == (0, 2)
    with pytest.raises(ValueError, match="vectors \\[N, g\\] and codebooks"):
        residual_encode_native(torch.zeros(4, 7), books)


def test_dispatch_takes_the_encoder_on_cpu(monkeypatch):
    books = codebooks(3, 64, 16)
    vectors = torch.randn(50, 16, generator=torch.Generator().manual_seed(5))
    assert torch.equal(residual_encode(vectors, books), residual_encode_native(vectors, books))
    monkeypatch.setenv("KVCOMPRESS_KERNELS", "torch")
    assert torch.equal(residual_encode(vectors, books), residual_encode_torch(vectors, books))


def lookups(b: int, h: int, n: int, t: int, m: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    tables = torch.randn(b, h, n, m, 256, generator=generator)
    codes = torch.randint(0, 256, (b, h, t, m), generator=generator).to(torch.uint8)
    scale = (torch.rand(b, h, t, generator=generator) + 0.5).half()
    weights = torch.rand(b, h, n, t, generator=generator)
    return tables, codes, scale, weights


@pytest.mark.parametrize("b, h, n, t, m", [(1, 3, 3, 4096, 22), (2, 2, 1, 37, 12), (1, 1, 8, 5, 22), (1, 2, 48, 130, 8)])
def test_lookups_match_the_reference(b, h, n, t, m):
    tables, codes, scale, weights = lookups(b, h, n, t, m, seed=t)
    torch.testing.assert_close(lut_scores_native(tables, codes, scale, 8), lut_scores_torch(tables, codes, scale, 8))
    torch.testing.assert_close(lut_mix_native(weights, codes, scale, 8, m, 256), lut_mix_torch(weights, codes, scale, 8, m, 256))


def test_lookups_read_strided_views_like_a_store():
    tables, codes, scale, weights = lookups(2, 3, 3, 64, 22)

    def held(tensor: torch.Tensor) -> torch.Tensor:
        buffer = torch.zeros(tensor.shape[0], tensor.shape[1], 3 * tensor.shape[2], *tensor.shape[3:], dtype=tensor.dtype)
        buffer[:, :, : tensor.shape[2]] = tensor
        return buffer[:, :, : tensor.shape[2]]

    strided, strided_scale = held(codes), held(scale)
    assert not strided.is_contiguous()
    torch.testing.assert_close(lut_scores_native(tables, strided, strided_scale, 8), lut_scores_torch(tables, codes, scale, 8))
    torch.testing.assert_close(lut_mix_native(weights, strided, strided_scale, 8, 22, 256),
                               lut_mix_torch(weights, codes, scale, 8, 22, 256))


def test_lookup_dispatch(monkeypatch):
    tables, codes, scale, weights = lookups(1, 2, 3, 40, 6)
    assert torch.equal(lut_scores(tables, codes, scale, 8), lut_scores_native(tables, codes, scale, 8))
    assert torch.equal(lut_mix(weights, codes, scale, 8, 6, 256), lut_mix_native(weights, codes, scale, 8, 6, 256))
    with pytest.raises(ValueError, match="8-bit codes"):
        lut_mix_native(weights, codes[..., :5], scale, 8, 6, 256)
    monkeypatch.setenv("KVCOMPRESS_KERNELS", "torch")
    assert torch.equal(lut_scores(tables, codes, scale, 8), lut_scores_torch(tables, codes, scale, 8))
    assert torch.equal(lut_mix(weights, codes, scale, 8, 6, 256), lut_mix_torch(weights, codes, scale, 8, 6, 256))
