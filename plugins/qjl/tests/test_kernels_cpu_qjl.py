"""The QJL C++ CPU kernel (kernels_cpu.cpp) against the torch reference: head_dim 64/128/256, 1-8 queries per KV
head, with and without outliers, odd token counts, batches, and the strided views a store hands out."""

from __future__ import annotations

import pytest
import torch

from kvcompress.testing import native_or_skip
from kvcompress_qjl.kernels import (
    NATIVE_QUERIES,
    NATIVE_SOURCE,
    QJLCodes,
    outlier_channels,
    qjl_quantize_torch,
    qjl_scores,
    qjl_scores_native,
    qjl_scores_torch,
)

SCALE = 1.2533


@pytest.fixture(autouse=True)
def needs_compiler():
    native_or_skip(NATIVE_SOURCE)


def quantized(batch: int, heads: int, t: int, d: int, m: int, m_out: int, outliers: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(batch, heads, t, d, generator=generator)
    keys[..., [1, d // 2]] *= 8.0
    sketch = torch.randn(m, d, generator=generator)
    index = outlier_channels(keys, outliers, 32) if outliers else None
    return qjl_quantize_torch(keys, sketch, index, 32, m_out), sketch, index


def assert_matches(query, codes, sketch, index):
    expected = qjl_scores_torch(query, codes, sketch, SCALE, index, 32)
    got = qjl_scores_native(query, codes, sketch, SCALE, index, 32)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4 * expected.abs().max().item())


@pytest.mark.parametrize("d, m, m_out", [(64, 128, 128), (64, 256, 64), (128, 256, 128), (256, 512, 256)])
@pytest.mark.parametrize("queries", [1, 3, 4, 8])
def test_matches_reference_with_outliers(d, m, m_out, queries):
    codes, sketch, index = quantized(2, 2, 96, d, m, m_out, 8, seed=queries)
    assert_matches(torch.randn(2, 2, queries, d), codes, sketch, index)


@pytest.mark.parametrize("t", [1, 5, 37, 130])
@pytest.mark.parametrize("queries", [2, 5, 7])
def test_matches_reference_without_outliers_at_odd_token_counts(t, queries):
    codes, sketch, index = quantized(1, 3, t, 64, 128, 0, 0, seed=t)
    assert_matches(torch.randn(1, 3, queries, 64), codes, sketch, index)


def test_reads_strided_views_like_a_store():
    """A store's view is a slice of buffers with room for more tokens: heads are strided by the capacity."""
    codes, sketch, index = quantized(2, 3, 64, 64, 128, 64, 8)
    room = 3

    def held(tensor: torch.Tensor, rows: int) -> torch.Tensor:
        buffer = torch.zeros(tensor.shape[0], tensor.shape[1], rows * room, *tensor.shape[3:], dtype=tensor.dtype)
        buffer[:, :, :rows] = tensor
        return buffer[:, :, :rows]

    strided = QJLCodes(*(held(x, x.shape[2]) for x in codes))
    assert not strided.signs.is_contiguous()
    query = torch.randn(2, 3, 3, 64)
    expected = qjl_scores_torch(query, codes, sketch, SCALE, index, 32)
    torch.testing.assert_close(qjl_scores_native(query, strided, sketch, SCALE, held(index, 2), 32), expected,
                               rtol=1e-5, atol=1e-4 * expected.abs().max().item())


def test_empty_state_and_bad_query_counts():
    codes, sketch, index = quantized(1, 2, 0, 64, 128, 0, 0)
    assert qjl_scores_native(torch.randn(1, 2, 3, 64), codes, sketch, SCALE, None, 32).shape == (1, 2, 3, 0)
    with pytest.raises(ValueError, match="1..8 queries"):
        qjl_scores_native(torch.randn(1, 2, NATIVE_QUERIES + 1, 64), codes, sketch, SCALE, None, 32)


def test_native_override_takes_the_kernel(monkeypatch):
    monkeypatch.setenv("KVCOMPRESS_KERNELS", "native")
    codes, sketch, index = quantized(1, 2, 64, 64, 128, 128, 8)
    query = torch.randn(1, 2, 3, 64)
    assert torch.equal(qjl_scores(query, codes, sketch, SCALE, index, 32), qjl_scores_native(query, codes, sketch, SCALE, index, 32))
