"""Attention from the compressed state: exactness against DynamicCache, masks, GQA, padding, estimators."""

from __future__ import annotations

from typing import Literal

import pytest
import torch
from transformers import DynamicCache

import kvcompress
from kvcompress import EstimatorMethod, MethodSpec, Registry, hookimpl
from kvcompress.hf import attention
from kvcompress.hf.cache import Segment

PROMPT, DECODE_STEPS = 12, 6


def chunked_logits(model, ids: torch.Tensor, cache, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Prefill PROMPT tokens, then one token per forward, as generation does; logits of every position."""
    logits = []
    with torch.no_grad():
        for start, stop in [(0, PROMPT)] + [(i, i + 1) for i in range(PROMPT, ids.shape[1])]:
            mask = None if attention_mask is None else attention_mask[:, :stop]
            logits.append(model(ids[:, start:stop], attention_mask=mask, past_key_values=cache).logits)
    return torch.cat(logits, dim=1)


def test_window_zero_float32_matches_dynamic_cache(arch, make_model, make_float_spec):
    """Every token goes through the packed state and the decode estimator; in float32 that is exact."""
    model = make_model(arch)
    ids = torch.randint(0, 128, (1, PROMPT + DECODE_STEPS), generator=torch.Generator().manual_seed(1))
    reference = chunked_logits(model, ids, DynamicCache(config=model.config))
    cache = kvcompress.cache_for(model, make_float_spec(window=0))
    logits = chunked_logits(model, ids, cache)
    assert cache.compressed_tokens() == 2 * ids.shape[1]  # both layers hold every token packed
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=0)


def test_window_covering_everything_generates_like_dynamic_cache(arch, make_model, make_float_spec):
    model = make_model(arch)
    ids = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = model.generate(ids, max_new_tokens=12, do_sample=False, past_key_values=DynamicCache(config=model.config))
        cache = kvcompress.cache_for(model, make_float_spec("float16", window=64))
        generated = model.generate(ids, max_new_tokens=12, do_sample=False, past_key_values=cache)
    assert cache.compressed_tokens() == 0
    assert generated.tolist() == reference.tolist()


@pytest.mark.parametrize("arch_name", ["llama", "qwen3", "gemma2"])
def test_left_padded_batch_matches_dynamic_cache(arch_name, make_model, make_float_spec):
    model = make_model(arch_name)
    ids = torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # the second row is a shorter prompt, left padded
    ids[1, :4] = 0
    with torch.no_grad():
        reference = model.generate(
            ids, attention_mask=mask, max_new_tokens=10, do_sample=False, past_key_values=DynamicCache(config=model.config)
        )
        cache = kvcompress.cache_for(model, make_float_spec(window=3, sinks=1))
        generated = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, past_key_values=cache)
    assert cache.compressed_tokens() > 0
    assert generated.tolist() == reference.tolist()

    # The logits of the real (unpadded) positions agree, with padding in the middle of the compressed part.
    full_mask = torch.cat([mask, torch.ones(2, 10, dtype=mask.dtype)], dim=1)
    ref_logits = chunked_logits(model, generated[:, :-1], DynamicCache(config=model.config), full_mask[:, :-1])
    logits = chunked_logits(model, generated[:, :-1], kvcompress.cache_for(model, make_float_spec(window=2)), full_mask[:, :-1])
    real = full_mask[:, :-1].bool()
    torch.testing.assert_close(logits[real], ref_logits[real], atol=1e-5, rtol=0)


def test_sampled_decoding_runs_and_matches_with_the_same_seed(make_model, make_float_spec):
    model = make_model("llama")
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(4))
    runs = []
    for cache in (DynamicCache(config=model.config), kvcompress.cache_for(model, make_float_spec(window=0))):
        torch.manual_seed(123)
        with torch.no_grad():
            runs.append(model.generate(ids, max_new_tokens=8, do_sample=True, top_k=20, temperature=1.0, past_key_values=cache))
    assert runs[1].shape == (2, 16)
    assert runs[1].tolist() == runs[0].tolist()


def test_forward_without_cache_uses_the_same_math(make_model, make_float_spec):
    """use_cache=False on a patched model: attention over the given key/value, equal to sdpa."""
    model = make_model("qwen2")
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        reference = model(ids, use_cache=False).logits
        with kvcompress.patch(model, make_float_spec()):
            assert model.config._attn_implementation == "kvcompress"
            logits = model(ids, use_cache=False).logits
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=0)


def naive_attention(query, keys, values, mask, scaling, softcap=None):
    """Textbook attention with repeated KV heads: query [b, hq, q, d], keys [b, hkv, t, d] -> [b, q, hq, d]."""
    groups = query.shape[1] // keys.shape[1]
    keys = keys.repeat_interleave(groups, dim=1)
    values = values.repeat_interleave(groups, dim=1)
    scores = query.float() @ keys.float().transpose(-1, -2) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ values.float()).transpose(1, 2)


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("mask_heads", [1, 6])
def test_partial_outputs_of_segments_merge_into_one_softmax(softcap, mask_heads):
    """Dense segments each give an output and its log-sum-exp; merged, they equal one softmax over all tokens
    (boolean and additive masks, per-head masks, left padding, grouped-query heads, softcapping)."""
    gen = torch.Generator().manual_seed(6)
    b, hq, hkv, q, t, d = 2, 6, 2, 5, 13, 8
    query = torch.randn(b, hq, q, d, generator=gen)
    keys = torch.randn(b, hkv, t, d, generator=gen)
    values = torch.randn(b, hkv, t, d, generator=gen)
    mask = torch.ones(q, t, dtype=torch.bool).tril(t - q)[None, None].repeat(b, mask_heads, 1, 1)
    mask[1, :, :, :3] = False  # left padding of the second sequence
    mask[0, -1, 0, 4] = False  # one hidden key in the last head's mask
    segments = [Segment(range(a, z), keys[:, :, a:z], values[:, :, a:z]) for a, z in [(0, 2), (2, 9), (9, 13)]]
    expected = naive_attention(query, keys, values, mask.expand(b, hq, q, t), 0.3, softcap)
    out = attention.attend(query, segments, t - q, mask, scaling=0.3, softcap=softcap)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    torch.testing.assert_close(attention.attend(query, segments, t - q, additive, 0.3, softcap), expected, atol=1e-5, rtol=1e-5)

    # Without a mask, causality comes from the positions: the queries are the newest q tokens.
    out = attention.attend(query, segments, t - q, None, scaling=0.3, softcap=softcap)
    causal = torch.ones(q, t, dtype=torch.bool).tril(t - q)[None, None]
    torch.testing.assert_close(out, naive_attention(query, keys, values, causal, 0.3, softcap), atol=1e-5, rtol=1e-5)


def test_merge_of_partials_equals_one_softmax_property():
    """merge_partials over any split of the keys equals the softmax over all of them."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from kvcompress_kernels.partial import dense_partial, merge_partials

    @settings(max_examples=40, deadline=None)
    @given(st.lists(st.integers(1, 9), min_size=1, max_size=5), st.integers(0, 2**16), st.sampled_from([1, 3]))
    def check(sizes, seed, groups):
        gen = torch.Generator().manual_seed(seed)
        t = sum(sizes)
        query = torch.randn(1, 2 * groups, 3, 8, generator=gen) * 3
        keys, values = torch.randn(2, 1, 2, t, 8, generator=gen)
        parts, start = [], 0
        for size in sizes:
            parts.append(dense_partial(query, keys[:, :, start : start + size], values[:, :, start : start + size], None, 0.5))
            start += size
        merged, lse = merge_partials([p[0] for p in parts], [p[1] for p in parts])
        whole, whole_lse = dense_partial(query, keys, values, None, 0.5)
        expected = naive_attention(query, keys, values, torch.ones(1, 1, 3, t, dtype=torch.bool), 0.5).transpose(1, 2)
        torch.testing.assert_close(merged, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse, whole_lse, atol=1e-5, rtol=1e-5)

    check()


def test_mask_of_the_wrong_length_is_a_clear_error():
    query, keys = torch.randn(1, 2, 1, 4), torch.randn(1, 2, 5, 4)
    with pytest.raises(kvcompress.KVCompressError, match="the layer has seen 6 positions for 1 queries"):
        attention.attend(query, [Segment(range(0, 5), keys, keys)], 5, torch.ones(1, 1, 1, 7, dtype=torch.bool), 1.0)


class CountingSpec(MethodSpec):
    """Test estimator: decode-and-matmul that counts its calls."""

    method: Literal["counting"] = "counting"


class CountingEstimator:
    calls = {"scores": 0, "mix": 0}

    def __init__(self, quantizer):
        self.quantizer = quantizer

    def scores(self, query, state):
        self.calls["scores"] += 1
        return query @ self.quantizer.decode(state).to(query.dtype).transpose(-1, -2)

    def mix(self, weights, state):
        self.calls["mix"] += 1
        return weights @ self.quantizer.decode(state).to(weights.dtype)


class CountingPlugin:
    @hookimpl
    def kvcompress_estimators(self):
        return [EstimatorMethod(name="counting", spec=CountingSpec, factory=lambda spec, ctx: CountingEstimator(ctx.quantizer))]


def test_spec_estimators_are_what_attention_calls(make_model, make_float_spec):
    registry = Registry(entry_points=False)
    registry.register(CountingPlugin(), "counting-plugin")
    spec = make_float_spec(window=2)
    spec["keys"]["estimator"] = {"method": "counting"}
    spec["values"]["estimator"] = {"method": "counting"}
    model = make_model("llama")
    ids = torch.randint(0, 128, (1, PROMPT + 3), generator=torch.Generator().manual_seed(7))
    CountingEstimator.calls.update(scores=0, mix=0)
    logits = chunked_logits(model, ids, kvcompress.cache_for(model, spec, registry=registry, exact_new_tokens=False))
    # One call per layer and forward (4 forwards x 2 layers), each role through its own estimator.
    assert CountingEstimator.calls == {"scores": 8, "mix": 8}
    torch.testing.assert_close(logits, chunked_logits(model, ids, DynamicCache(config=model.config)), atol=1e-5, rtol=0)


def test_unsupported_attention_arguments_are_refused(make_model):
    model = make_model("llama")
    module = model.model.layers[0].self_attn
    x = torch.randn(1, 4, 3, 16)
    with pytest.raises(kvcompress.KVCompressError, match="s_aux"):
        attention.kvcompress_attention(module, x, x[:, :2], x[:, :2], None, s_aux=torch.zeros(4))


def test_beam_search_reorders_the_compressed_cache(make_model, make_float_spec):
    model = make_model("llama")
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(8))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        reference = model.generate(
            ids, attention_mask=mask, max_new_tokens=8, num_beams=3, do_sample=False, past_key_values=DynamicCache(config=model.config)
        )
        cache = kvcompress.cache_for(model, make_float_spec(window=2))
        generated = model.generate(ids, attention_mask=mask, max_new_tokens=8, num_beams=3, do_sample=False, past_key_values=cache)
    assert generated.tolist() == reference.tolist()


class FloatPairReader(kvcompress.Reader):
    """A layer-level reader for float keys and values: decodes both roles in one pass and counts its calls."""

    calls = 0

    def __init__(self, codecs):
        self.codecs = codecs

    def attend(self, query, keys, values, bias, scale, softcap):
        FloatPairReader.calls += 1
        k = self.codecs.keys.decode(keys).float()
        v = self.codecs.values.decode(values).float()
        scores = (query.float() @ k.transpose(-1, -2)) * scale
        if bias is not None:
            scores = scores + bias
        lse = torch.logsumexp(scores, dim=-1)
        return torch.exp(scores - lse[..., None]) @ v, lse


class FloatPairPlugin:
    @hookimpl
    def kvcompress_readers(self):
        return [
            kvcompress.ReaderMethod(
                name="float-pair", factory=lambda codecs, ctx: FloatPairReader(codecs),
                keys=frozenset({"float"}), values=frozenset({"float"}),
            )
        ]


def test_a_registered_reader_reads_the_layers_whose_method_pair_it_declares(make_model, make_float_spec):
    registry = Registry(entry_points=False)
    registry.register(FloatPairPlugin(), "float-pair-plugin")
    spec = make_float_spec(window=2)
    model = make_model("qwen2")
    ids = torch.randint(0, 128, (2, PROMPT + 3), generator=torch.Generator().manual_seed(11))
    FloatPairReader.calls = 0
    cache = kvcompress.cache_for(model, spec, registry=registry)
    assert all(isinstance(layer.codecs.reader, FloatPairReader) for layer in cache.layers)
    logits = chunked_logits(model, ids, cache)
    # 3 forwards read a packed middle (the prompt's forward has none), in each of 2 layers.
    assert FloatPairReader.calls == 3 * 2
    torch.testing.assert_close(logits, chunked_logits(model, ids, DynamicCache(config=model.config)), atol=1e-5, rtol=0)
    # A pair the reader does not declare gets the default reader, through the estimators.
    spec["values"]["quantizer"]["method"] = "float"
    spec["keys"]["quantizer"] = {"method": "scalar", "bits": 8, "axis": "token", "group": 16}
    installed = Registry()
    installed.register(FloatPairPlugin(), "float-pair-plugin")
    other = kvcompress.cache_for(model, spec, registry=installed)
    assert not any(isinstance(layer.codecs.reader, FloatPairReader) for layer in other.layers)


def test_packed_middle_with_uneven_heads_reads_each_heads_own_tokens_at_their_positions():
    """After a per-head selection the heads hold different tokens (and counts): attention over the packed
    middle equals, head by head, softmax attention over that head's kept tokens, masked by their positions."""
    from kvcompress.pipeline import EstimatorReader
    from kvcompress.store import TokenStore
    from kvcompress.testing import make_codec

    gen = torch.Generator().manual_seed(12)
    b, hkv, groups, q, t, d = 2, 2, 3, 2, 12, 8
    keys, values = torch.randn(2, b, hkv, t, d, generator=gen)
    query = torch.randn(b, hkv * groups, q, d, generator=gen)
    codecs = [make_codec({"method": "float", "dtype": "float32"}, role=role, head_dim=d, kv_heads=hkv) for role in ("keys", "values")]
    stores = [TokenStore(), TokenStore()]
    for store, codec, x in zip(stores, codecs, (keys, values)):
        store.append(codec.encode(x), first_position=0)
    kept = [[[0, 2, 3, 7, 9], [1, 4]], [[5, 6, 7, 8, 10], [0, 1, 2, 11]]]  # per sequence and head
    counts = torch.tensor([[len(k) for k in row] for row in kept])
    keep = torch.zeros(b, hkv, int(counts.max()), dtype=torch.int64)
    for s in range(b):
        for h in range(hkv):
            keep[s, h, : len(kept[s][h])] = torch.tensor(kept[s][h])
    for store in stores:
        store.select(keep, counts)
    # the model's mask: queries at positions 12, 13; position 7 hidden from the second sequence (padding)
    mask = torch.ones(b, 1, q, t + q, dtype=torch.bool)
    mask[..., t:] = torch.ones(q, q, dtype=torch.bool).tril()
    mask[1, :, :, 7] = False
    segment = Segment(stores=tuple(stores), reader=EstimatorReader(*codecs))
    new_keys, new_values = torch.randn(2, b, hkv, q, d, generator=gen)
    segments = [segment, Segment(range(t, t + q), new_keys, new_values)]
    out = attention.attend(query, segments, t, mask, scaling=0.4)
    for s in range(b):
        for h in range(hkv):
            visible = [p for p in kept[s][h] if mask[s, 0, 0, p]]
            k = torch.cat([keys[s, h, visible], new_keys[s, h]])
            v = torch.cat([values[s, h, visible], new_values[s, h]])
            causal = torch.ones(q, len(visible) + q, dtype=torch.bool).tril(len(visible))
            for g in range(groups):
                head = h * groups + g
                scores = (query[s, head] @ k.T * 0.4).masked_fill(~causal, float("-inf"))
                torch.testing.assert_close(out[s, :, head], scores.softmax(-1) @ v, atol=1e-5, rtol=1e-5)


def test_one_dense_segment_longer_than_the_queries_is_causal_from_the_positions():
    """Without a mask, queries that are the newest of a longer run see the keys up to their own position (sdpa's
    is_causal would align them with the first keys)."""
    gen = torch.Generator().manual_seed(13)
    query = torch.randn(1, 4, 3, 8, generator=gen)
    keys, values = torch.randn(2, 1, 2, 7, 8, generator=gen)
    out = attention.attend(query, [Segment(range(0, 7), keys, values)], 4, None, scaling=0.5)
    causal = torch.ones(3, 7, dtype=torch.bool).tril(4)[None, None]
    torch.testing.assert_close(out, naive_attention(query, keys, values, causal, 0.5), atol=1e-5, rtol=1e-5)


def test_a_fused_decode_reader_takes_its_kernel_only_for_triton_and_decode_sized_reads(monkeypatch, make_float_spec):
    """kvcompress.pipeline.FusedDecodeReader, the base of the plugins' fused readers, decides where the kernel
    runs; a reader whose kernel reads through the estimators records the reads it is given."""
    from kvcompress.pipeline import EstimatorReader, FusedDecodeReader, build_codecs
    from kvcompress_kernels.decode import MAX_DECODE_ROWS

    calls = []

    class Recording(FusedDecodeReader):
        def fused(self, query, keys, values, bias, scale, softcap):
            calls.append(query.shape[2])
            return EstimatorReader.attend(self, query, keys, values, bias, scale, softcap)

    codecs = build_codecs(kvcompress.parse_spec(make_float_spec(window=2)), num_layers=1, head_dim=16, kv_heads=2)[0]
    reader = Recording(codecs.keys, codecs.values)
    x = torch.randn(1, 2, 8, 16)
    keys, values = codecs.keys.encode(x), codecs.values.encode(x)

    def read(rows: int) -> None:
        reader.attend(torch.randn(1, 2, rows, 16), keys, values, None, 0.25, None)

    monkeypatch.setenv("KVCOMPRESS_KERNELS", "torch")
    read(4)
    assert calls == []
    monkeypatch.setenv("KVCOMPRESS_KERNELS", "triton")
    read(4)
    read(MAX_DECODE_ROWS + 1)  # a prefill-sized block keeps the estimator path
    assert calls == [4]
