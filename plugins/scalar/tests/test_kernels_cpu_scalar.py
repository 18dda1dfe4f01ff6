"""The scalar plugin's C++ reads (kernels_cpu.cpp) against the dense reference: scores and value mixes of token-axis
codes (2, 4 and 8 bits, with and without levels (Lloyd-Max) and minima (min/max), group sizes) and scores of
channel-axis codes (KIVI's keys), at head_dim 64/128/256, 1-8 queries, token counts that do and do not fill the
kernels' blocks, batches, a store's strided views and one or two threads; and the estimator taking them exactly
where they apply."""

from __future__ import annotations

import pytest
import torch

from kvcompress.testing import make_codec, native_or_skip
from kvcompress_kernels.bitpack import pack_bits
from kvcompress_scalar.estimator import (
    NATIVE_QUERIES,
    NATIVE_SOURCE,
    channel_scores_native,
    native_channel_reads,
    native_token_reads,
    token_mix_native,
    token_scores_native,
)


@pytest.fixture(autouse=True)
def needs_compiler():
    native_or_skip(NATIVE_SOURCE)


def state(b, h, t, d, bits, group, levels, minimum, seed=0):
    """(packed codes, scale, minimum, levels, dense values [b, h, t, d]) of random token-axis codes."""
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (b, h, t, d), generator=generator)
    scale = torch.rand(b, h, t, d // group, generator=generator) + 0.5
    low = torch.randn(b, h, t, d // group, generator=generator) if minimum else None
    table = torch.randn(2**bits, generator=generator) if levels else None
    values = table[codes] if levels else codes.float()
    dense = values * scale.repeat_interleave(group, -1)
    if minimum:
        dense = dense + low.repeat_interleave(group, -1)
    return pack_bits(codes, bits), scale, low, table, dense


CASES = [  # bits, group, head_dim, levels, minimum
    (2, 32, 64, False, True), (4, 32, 64, False, True), (8, 64, 64, False, True), (2, 64, 64, True, False),
    (4, 64, 64, True, False), (4, 16, 128, False, True), (2, 64, 256, True, False), (4, 32, 256, False, True),
]


@pytest.mark.parametrize("bits, group, d, levels, minimum", CASES)
@pytest.mark.parametrize("t", [1, 17, 1025, 2100])
@pytest.mark.parametrize("n", [1, 3, 8])
def test_reads_match_the_dense_values(bits, group, d, levels, minimum, t, n):
    packed, scale, low, table, dense = state(2, 3, t, d, bits, group, levels, minimum, seed=t + n)
    query = torch.randn(2, 3, n, d)
    weights = torch.rand(2, 3, n, t)
    scores = token_scores_native(query, packed, scale, low, table, bits, group)
    mix = token_mix_native(weights, packed, scale, low, table, bits, group, d)
    torch.testing.assert_close(scores, query @ dense.transpose(-1, -2), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(mix, weights @ dense, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("bits, group, d", [(2, 32, 64), (4, 32, 64), (8, 16, 64), (2, 128, 128), (4, 64, 256)])
@pytest.mark.parametrize("groups", [1, 3, 40])
@pytest.mark.parametrize("n", [1, 3, 8])
def test_channel_scores_match_the_dense_keys(bits, group, d, groups, n):
    generator = torch.Generator().manual_seed(groups + n)
    t = groups * group
    codes = torch.randint(0, 2**bits, (2, 3, t, d), generator=generator)
    scale = torch.rand(2, 3, groups, d, generator=generator) + 0.5
    low = torch.randn(2, 3, groups, d, generator=generator)
    dense = codes.float() * scale.repeat_interleave(group, 2) + low.repeat_interleave(group, 2)
    query = torch.randn(2, 3, n, d, generator=generator)
    scores = channel_scores_native(query, pack_bits(codes, bits), scale, low, bits, group)
    torch.testing.assert_close(scores, query @ dense.transpose(-1, -2), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("threads", [1, 2])
def test_strided_store_views_and_threads(threads):
    """The codes as a store holds them (a view of buffers with room for more tokens), on one or two threads."""
    packed, scale, low, table, dense = state(1, 3, 3000, 64, 2, 32, False, True)
    room = torch.zeros(1, 3, 4096, packed.shape[-1], dtype=torch.uint8)
    room[:, :, :3000] = packed
    view = room[:, :, :3000]
    query, weights = torch.randn(1, 3, 3, 64), torch.rand(1, 3, 3, 3000)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        scores = token_scores_native(query, view, scale, low, None, 2, 32)
        mix = token_mix_native(weights, view, scale, low, None, 2, 32, 64)
    finally:
        torch.set_num_threads(previous)
    torch.testing.assert_close(scores, query @ dense.transpose(-1, -2), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(mix, weights @ dense, rtol=1e-4, atol=1e-3)


def test_shapes_the_kernels_take():
    cpu = torch.zeros(1)
    assert native_token_reads(2, 32, 64, 3, cpu)
    assert native_token_reads(4, 64, 128, NATIVE_QUERIES, cpu)
    assert not native_token_reads(3, 64, 64, 3, cpu)  # codes straddle bytes
    assert not native_token_reads(2, 32, 96, 3, cpu)  # a row is not whole 16-byte chunks
    assert not native_token_reads(4, 8, 256, 3, cpu)  # 32 groups
    assert not native_token_reads(2, 32, 64, NATIVE_QUERIES + 1, cpu)  # a prefill block: torch's matmuls
    assert native_channel_reads(2, 32, 64, 3, cpu) and native_channel_reads(4, 128, 128, 1, cpu)
    assert not native_channel_reads(2, 24, 64, 3, cpu)  # a group of 16 tokens would straddle two token groups
    with pytest.raises(ValueError, match="whole groups of 32 tokens"):
        channel_scores_native(torch.zeros(1, 1, 1, 64), torch.zeros(1, 1, 40, 16, dtype=torch.uint8),
                              torch.ones(1, 1, 1, 64), torch.zeros(1, 1, 1, 64), 2, 32)
    with pytest.raises(ValueError, match="minimum None"):
        channel_scores_native(torch.zeros(1, 1, 1, 64), torch.zeros(1, 1, 32, 16, dtype=torch.uint8),
                              torch.ones(1, 1, 1, 64), None, 2, 32)
    with pytest.raises(ValueError, match="whole 16-byte chunks"):  # 32 two-bit codes fill half a chunk
        token_mix_native(torch.zeros(1, 1, 1, 8), torch.zeros(1, 1, 4, 8, dtype=torch.uint8), torch.ones(1, 1, 4, 1),
                         None, None, 2, 32, 32)
    with pytest.raises(ValueError, match="uint8 rows of 64 2-bit codes"):
        token_scores_native(torch.zeros(1, 1, 1, 64), torch.zeros(1, 1, 4, 8, dtype=torch.uint8),
                            torch.ones(1, 1, 4, 2), None, None, 2, 32)


@pytest.mark.parametrize("quantizer", [
    {"method": "scalar", "bits": 2, "axis": "token", "group": 32},
    {"method": "scalar", "bits": 2, "axis": "channel", "group": 32},
    {"method": "scalar", "bits": 4, "axis": "channel", "group": 32},
    {"method": "scalar", "bits": 4, "axis": "token", "group": 64, "grid": "lloyd-max"},
    {"method": "scalar", "bits": 3, "axis": "token", "group": 64, "grid": "lloyd-max"},
])
@pytest.mark.parametrize("n", [3, NATIVE_QUERIES + 4])
def test_the_estimator_reads_alike_with_and_without_the_kernels(quantizer, n, monkeypatch):
    codec = make_codec(quantizer, estimator={"method": "scalar"}, kv_heads=3)
    state_ = codec.encode(torch.randn(1, 3, 704, 64))
    query, weights = torch.randn(1, 3, n, 64), torch.softmax(torch.randn(1, 3, n, 704), -1)
    native_scores, native_mix = codec.scores(query, state_), codec.mix(weights, state_)
    monkeypatch.setenv("KVCOMPRESS_KERNELS", "torch")
    torch.testing.assert_close(native_scores, codec.scores(query, state_), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(native_mix, codec.mix(weights, state_), rtol=1e-4, atol=1e-5)


def test_the_estimator_takes_the_kernels_where_they_apply(monkeypatch):
    calls = []
    import kvcompress_scalar.estimator as estimator

    real = estimator.token_scores_native
    monkeypatch.setattr(estimator, "token_scores_native", lambda *args: calls.append(args) or real(*args))
    codec = make_codec({"method": "scalar", "bits": 2, "axis": "token", "group": 32}, estimator={"method": "scalar"})
    packed = codec.encode(torch.randn(1, 2, 64, 64))
    codec.scores(torch.randn(1, 2, 1, 64), packed)
    assert len(calls) == 1
    codec.scores(torch.randn(1, 2, NATIVE_QUERIES + 1, 64), packed)
    assert len(calls) == 1
