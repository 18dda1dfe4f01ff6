"""ThinK key channel pruning: the channel choice, what is stored, and the pruner in a cache on tiny models."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kvcompress
from kvcompress.runtime import Observation
from kvcompress.testing import make_codec, tiny_model
from kvcompress_prune.think import ThinKPruner

THINK = {"method": "think", "ratio": 0.5, "window": 4}
KIVI4_KEYS = {"method": "scalar", "bits": 4, "axis": "channel", "group": 8}


def test_kept_channels_follow_the_reference_rounding():
    assert ThinKPruner(head_dim=64, kv_heads=1, ratio=0.4, window=32).kept == 39  # floor(25.6) pruned
    assert ThinKPruner(head_dim=128, kv_heads=1, ratio=0.4, window=32).kept == 77
    assert ThinKPruner(head_dim=64, kv_heads=1, ratio=0.0, window=32).kept == 64


def test_channels_with_the_largest_query_times_key_energy_are_kept():
    pruner = ThinKPruner(head_dim=4, kv_heads=1, ratio=0.5, window=2)
    # Key energy per channel 1, 4, 9, 16; query energy 16, 1, 1, 0.25: products 16, 4, 9, 4 -> keep 0 and 2.
    keys = torch.tensor([1.0, 2.0, 3.0, 4.0]).expand(1, 1, 5, 4)
    queries = torch.tensor([4.0, 1.0, 1.0, 0.5]).expand(1, 1, 2, 4)
    assert pruner.select(keys, Observation(queries=queries)).tolist() == [[[0, 2]]]


def test_only_the_latest_window_of_queries_counts():
    pruner = ThinKPruner(head_dim=4, kv_heads=1, ratio=0.75, window=2)
    keys = torch.ones(1, 1, 3, 4)
    queries = torch.zeros(1, 1, 6, 4)
    queries[:, :, :4, 0] = 100.0  # old queries: outside the window
    queries[:, :, 4:, 3] = 1.0
    assert pruner.select(keys, Observation(queries=queries)).tolist() == [[[3]]]


def test_query_heads_of_a_group_score_their_kv_head_together():
    torch.manual_seed(0)
    pruner = ThinKPruner(head_dim=8, kv_heads=2, ratio=0.5, window=3)
    keys, queries = torch.randn(2, 2, 5, 8), torch.randn(2, 6, 7, 8)
    scores = pruner.channel_scores(keys, queries)
    for b in range(2):
        for h in range(2):
            group = queries[b, 3 * h : 3 * h + 3, -3:]  # query heads 3h..3h+2 read KV head h
            expected = group.pow(2).mean(dim=(0, 1)) * keys[b, h].pow(2).mean(0)
            torch.testing.assert_close(scores[b, h], expected)


@settings(max_examples=40, deadline=None)
@given(
    kv_heads=st.integers(1, 3),
    groups=st.integers(1, 3),
    head_dim=st.sampled_from([4, 8, 16, 24]),
    ratio=st.floats(0.0, 0.9),
    tokens=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
def test_selection_is_sorted_distinct_and_in_range(kv_heads, groups, head_dim, ratio, tokens, seed):
    generator = torch.Generator().manual_seed(seed)
    pruner = ThinKPruner(head_dim=head_dim, kv_heads=kv_heads, ratio=ratio, window=4)
    keys = torch.randn(2, kv_heads, tokens, head_dim, generator=generator)
    queries = torch.randn(2, kv_heads * groups, tokens, head_dim, generator=generator)
    channels = pruner.select(keys, Observation(queries=queries))
    assert channels.shape == (2, kv_heads, pruner.kept)
    assert (channels.diff(dim=-1) > 0).all() and channels.min() >= 0 and channels.max() < head_dim


def test_pruned_keys_store_kept_channels_only_and_scores_skip_the_rest():
    codec = make_codec({"method": "float", "dtype": "float32"}, head_dim=16, pruner=THINK)
    x, queries = torch.randn(2, 2, 6, 16), torch.randn(2, 2, 4, 16)
    state = codec.encode(x, Observation(queries=queries))
    channels = state.shared["channels"].long()
    assert channels.shape == (2, 2, 8) and state.nbytes() == x.numel() // 2 * 4 + channels.numel()
    kept = x.gather(-1, channels[:, :, None].expand(-1, -1, 6, -1))
    query = torch.randn(2, 2, 3, 16)
    kept_query = query.gather(-1, channels[:, :, None].expand(-1, -1, 3, -1))
    torch.testing.assert_close(codec.scores(query, state), kept_query @ kept.transpose(-1, -2))


def test_think_composes_with_kivi_on_the_kept_channels():
    codec = make_codec(KIVI4_KEYS, head_dim=16, pruner=THINK)
    x = torch.randn(1, 2, 16, 16)
    state = codec.encode(x, Observation(queries=torch.randn(1, 2, 4, 16)))
    # 8 kept channels: 4-bit codes (4 bytes a token row) + an fp16 scale and minimum per channel and block of 8.
    per_head = 16 * 4 + 2 * 8 * 2 * 2
    assert state.head_dim == 8 and state.nbytes() == 2 * per_head + 2 * 8
    decoded = codec.decode(state)
    channels = state.shared["channels"].long()[:, :, None].expand(-1, -1, 16, -1)
    assert decoded.scatter(-1, channels, 0).abs().max() == 0  # pruned channels read as zeros
    error = (decoded.gather(-1, channels) - x.gather(-1, channels)).norm() / x.gather(-1, channels).norm()
    assert error < 0.15


def test_think_prunes_keys_only():
    spec = {"name": "x", "keys": {"quantizer": {"method": "float"}},
            "values": {"pruner": dict(THINK), "quantizer": {"method": "float"}}}
    with pytest.raises(kvcompress.SpecError, match="values.pruner: 'think' does not serve values"):
        kvcompress.parse_spec(spec)


@pytest.mark.parametrize("field,value", [("ratio", 1.0), ("ratio", -0.1), ("window", 0)])
def test_spec_bounds(field, value):
    spec = {"name": "x", "keys": {"pruner": {**THINK, field: value}, "quantizer": {"method": "float"}},
            "values": {"quantizer": {"method": "float"}}}
    with pytest.raises(kvcompress.SpecError, match=f"keys.pruner.{field}"):
        kvcompress.parse_spec(spec)


# ---------------------------------------------------------------------------------------------------
# In a cache on tiny models

def think_spec(window: int = 4) -> dict:
    return {
        "name": "think-kivi",
        "window": window,
        "keys": {"pruner": dict(THINK), "quantizer": dict(KIVI4_KEYS)},
        "values": {"quantizer": {"method": "scalar", "bits": 4, "axis": "token", "group": 8}},
    }


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2"])
def test_generate_with_think_stores_half_the_key_channels(arch):
    model = tiny_model(arch)
    ids = torch.randint(0, 128, (2, 30), generator=torch.Generator().manual_seed(0))
    cache = kvcompress.cache_for(model, think_spec())
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, past_key_values=cache)
    assert out.shape == (2, 38)
    summary = cache.summary()
    # Half of 16 channels at KIVI-4 with blocks of 8 (8 bits an element): 4 bits, and the channel index.
    assert 4.0 < summary["key_bits"] < 4.2 and summary["value_bits"] == pytest.approx(8.0)
    assert cache.nbytes()["keys"] == sum(layer.key_store.nbytes() for layer in cache.layers)


def test_each_sequence_gets_its_own_channels_and_batch_reordering_keeps_them():
    model = tiny_model("llama")
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 128, (2, 24), generator=generator)
    ids[1] = ids[0]
    cache = kvcompress.cache_for(model, think_spec())
    with torch.no_grad():
        model(ids, past_key_values=cache)
    channels = cache.layers[0].key_store.shared["channels"]
    assert torch.equal(channels[0], channels[1])  # same prompt, same choice
    other = torch.randint(0, 128, (2, 24), generator=generator)
    fresh = kvcompress.cache_for(model, think_spec())
    with torch.no_grad():
        model(other, past_key_values=fresh)
    chosen = fresh.layers[0].key_store.shared["channels"]
    assert not torch.equal(chosen[0], chosen[1])  # different prompts choose apart
    fresh.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(fresh.layers[0].key_store.shared["channels"], chosen.flip(0))


# ---------------------------------------------------------------------------------------------------
# SmolLM2 (slow): the channels ThinK keeps are the ones that matter


@pytest.mark.slow
def test_smollm2_think_keeps_the_channels_that_matter(monkeypatch):
    from kvcompress.eval.perplexity import Protocol, evaluate_perplexity, tokenize_text
    from kvcompress.eval.runners import BASELINE, Runner
    from kvcompress.eval.text import default_text
    from kvcompress.hf.loading import load_model

    model, tokenizer = load_model("smollm2")
    text, source = default_text()
    protocol = Protocol(context=512, continuation=64, chunk=16)
    ids = tokenize_text(tokenizer, text, protocol, source)
    spec = kvcompress.parse_spec({
        "name": "think-0.4", "window": 32,
        "keys": {"pruner": {"method": "think", "ratio": 0.4}, "quantizer": {"method": "float"}},
        "values": {"quantizer": {"method": "float"}},
    })
    baseline, think = evaluate_perplexity(model, ids, protocol, [Runner(BASELINE, None), Runner("think", spec)])
    # The same budget spent on the channels ThinK scores lowest.
    monkeypatch.setattr(
        ThinKPruner, "select",
        lambda self, x, obs: self.channel_scores(x, obs.queries).topk(self.kept, largest=False).indices.sort().values,
    )
    (opposite,) = evaluate_perplexity(model, ids, protocol, [Runner("opposite", spec)])
    assert think["key_bits"] == pytest.approx(16 * 39 / 64, rel=0.01)
    assert think["ppl"] < 1.15 * baseline["ppl"]
    assert opposite["ppl"] > 3 * think["ppl"]
