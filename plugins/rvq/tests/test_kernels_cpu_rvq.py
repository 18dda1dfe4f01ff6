"""The RVQ C++ kernels (kernels_cpu.cpp) against their torch references: the encoder on float32 registers and,
where the CPU has them, on AMX tiles (codebook sizes that are and are not multiples of a tile, group widths, odd row
counts, one and two threads, ties) and the lookup-table
scores and mix of 8-bit codes (query counts, odd token counts, batches, a store's strided views)."""

from __future__ import annotations

import pytest
import torch

from kvcompress.testing import native_or_skip
from kvcompress_rvq.kernels import (
    NATIVE_SOURCE,
    lut_mix,
    lut_mix_native,
    lut_mix_torch,
    lut_scores,
    lut_scores_native,
    lut_scores_torch,
    native_tiles,
    residual_encode,
    residual_encode_native,
    residual_encode_torch,
)


@pytest.fixture(autouse=True)
def needs_compiler():
    native_or_skip(NATIVE_SOURCE)


def codebooks(depth: int, size: int, width: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    decay = (0.7 ** torch.arange(depth, dtype=torch.float32)).view(depth, 1, 1)
    return torch.randn(depth, size, width, generator=generator) * decay


def assert_same_codes(vectors: torch.Tensor, books: torch.Tensor, got: torch.Tensor) -> None:
    """Equal codes, but where two codewords are within rounding of each other: at the first level where a row's
    codes differ, both codewords lie at the same distance (to rounding) from the residual both searched (the levels
    after it may then go their own ways)."""
    expected = residual_encode_torch(vectors, books)
    differ = (got != expected).any(-1)
    assert differ.float().mean() <= 0.01
    for row in differ.nonzero().flatten().tolist():
        level = int((got[row] != expected[row]).nonzero()[0])
        residual = vectors[row] - sum((books[l, expected[row, l]] for l in range(level)), torch.zeros_like(vectors[row]))
        distance = lambda code: float((residual - books[level, code]).square().sum())
        scale = float(residual.norm() * books[level, got[row, level]].norm())
        assert abs(distance(got[row, level]) - distance(expected[row, level])) <= 1e-4 * scale + 1e-6


# tiles=True takes the AMX path where the CPU has it and the width is a multiple of 32, the registers otherwise
ENGINES = [pytest.param(False, id="registers"), pytest.param(True, id="tiles")]


@pytest.mark.parametrize("tiles", ENGINES)
@pytest.mark.parametrize("depth, size, width", [(11, 256, 32), (6, 256, 32), (3, 100, 8), (2, 16, 64), (1, 65, 5),
                                                (3, 100, 96)])
@pytest.mark.parametrize("rows", [1, 7, 33, 81, 1001])
def test_matches_the_reference(depth, size, width, rows, tiles):
    books = codebooks(depth, size, width, seed=size)
    vectors = torch.randn(rows, width, generator=torch.Generator().manual_seed(rows))
    assert_same_codes(vectors, books, residual_encode_native(vectors, books, tiles))


@pytest.mark.parametrize("tiles", ENGINES)
@pytest.mark.parametrize("threads", [1, 2])
def test_threads_split_rows_alike(threads, tiles):
    books = codebooks(4, 256, 32)
    vectors = torch.randn(3001, 32, generator=torch.Generator().manual_seed(3))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = residual_encode_native(vectors, books, tiles)
    finally:
        torch.set_num_threads(previous)
    assert_same_codes(vectors, books, got)


def test_tiles_keep_the_float32_ranking_on_calibrated_scales():
    """Shaped like the shipped rvq spec (11 levels of 256 codewords on groups of 32), the bf16 tile products pick
    the reference's codes in all but near-ties."""
    if not native_tiles():
        pytest.skip("this CPU has no AMX tiles (or the OS does not grant them)")
    books = codebooks(11, 256, 32, seed=11)
    vectors = torch.randn(4096, 32, generator=torch.Generator().manual_seed(5))
    got = residual_encode_native(vectors, books, tiles=True)
    assert (got != residual_encode_native(vectors, books, tiles=False)).any(-1).float().mean() <= 0.002
    assert_same_codes(vectors, books, got)


@pytest.mark.parametrize("tiles", ENGINES)
def test_ties_go_to_the_lowest_index(tiles):
    books = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]] * 2)
    vectors = torch.tensor([[0.5, 0.5], [0.0, 2.0], [3.0, 0.0]])
    assert torch.equal(residual_encode_native(vectors, books, tiles), residual_encode_torch(vectors, books))
    assert residual_encode_native(vectors, books, tiles)[:, 0].tolist() == [0, 1, 0]
    # width 32 (the tiles' width): codeword 3 repeats codeword 1 exactly, codeword 0 is far
    wide = torch.zeros(1, 40, 32)
    wide[0, 0] = 10.0
    wide[0, 1, :16] = 1.0
    wide[0, 3, :16] = 1.0
    vectors = torch.ones(50, 32)
    assert residual_encode_native(vectors, wide, tiles)[:, 0].tolist() == [1] * 50


def test_native_tiles_says_whether_the_tiles_run():
    assert isinstance(native_tiles(), bool)


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
