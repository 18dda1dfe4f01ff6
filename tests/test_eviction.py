"""Token eviction: the kept tokens are all that is held, at their positions, and attention over them is exact."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from transformers import DynamicCache

import kvcompress
from kvcompress.errors import KVCompressError, SpecError
from kvcompress.spec import parse_spec
from kvcompress.state import reachable_tensors, storage_nbytes

SPECS = Path(__file__).resolve().parents[1] / "specs"
SNAPKV = {"method": "snapkv", "keep": 0.5, "window": 8}


def _prompt(length: int, batch: int = 2, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def _kept_dynamic_cache(model, ids: torch.Tensor, cache) -> DynamicCache:
    """A DynamicCache holding, per layer and head, exactly the tokens `cache` holds (same count per head),
    taken from a full-precision prefill of the same prompt: keys after RoPE at their original positions."""
    full = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=full)
    kept = DynamicCache(config=model.config)
    for index, layer in enumerate(cache.layers):
        held = layer.held_positions()
        assert bool((held >= 0).all()), "the reference needs every head to hold the same count"
        gather = held[..., None].expand(-1, -1, -1, full.layers[index].keys.shape[-1])
        kept.update(full.layers[index].keys.gather(2, gather), full.layers[index].values.gather(2, gather), index)
    return kept


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma"])
@pytest.mark.parametrize(
    "evict",
    [SNAPKV, {"method": "streaming", "keep": 0.3}, {"method": "knorm", "budget": 24}, {"method": "snapkv", "keep": 0.4, "kernel": 1}],
)
def test_logits_equal_a_dynamic_cache_of_the_kept_tokens(make_model, make_float_spec, arch, evict):
    """Float32 storage: after eviction at the end of the prompt, the next tokens' logits are those of a
    DynamicCache built from the kept tokens at their original positions."""
    model = make_model(arch)
    ids = _prompt(40)
    cache = kvcompress.cache_for(model, make_float_spec(window=4, sinks=2, evict=evict))
    with torch.no_grad():
        model(ids, past_key_values=cache)
    reference = _kept_dynamic_cache(model, ids, cache)
    for layer in cache.layers:
        target = evict["budget"] if "budget" in evict else round(evict["keep"] * 40)
        assert layer.sink_tokens + layer.compressed_tokens + layer.tail_tokens == target
        held = layer.held_positions()
        assert held[..., :2].eq(torch.arange(2)).all() and held[..., -4:].eq(torch.arange(36, 40)).all()
    nxt = _prompt(3, seed=4)
    position = 40
    for step in range(3):
        token = nxt[:, step : step + 1]
        with torch.no_grad():
            got = model(token, past_key_values=cache).logits
            expected = model(
                token, past_key_values=reference, position_ids=torch.full((2, 1), position),
                cache_position=torch.tensor([reference.get_seq_length()]),
            ).logits
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
        position += 1
    assert cache.get_seq_length() == 43


def test_streaming_keeps_sinks_and_the_most_recent(make_model, make_float_spec):
    model = make_model("llama")
    cache = kvcompress.cache_for(model, make_float_spec(window=4, sinks=4, evict={"method": "streaming", "budget": 20}))
    with torch.no_grad():
        model(_prompt(50), past_key_values=cache)
    expected = list(range(4)) + list(range(34, 50))
    for layer in cache.layers:
        assert layer.held_positions()[0, 0].tolist() == expected


def test_snapkv_keeps_what_the_window_attends_to(make_model, make_float_spec):
    """SnapKV's choice is the top of the pooled window attention, computed independently here."""
    model = make_model("llama")
    ids = _prompt(48, batch=1)
    full = DynamicCache(config=model.config)
    captured = {}
    cache = kvcompress.cache_for(model, make_float_spec(window=0, evict={"method": "snapkv", "budget": 16, "window": 8, "kernel": 1}))
    layer0 = cache.layers[0]
    original = layer0.note_attention

    def spy(scale, mask):
        captured["queries"] = layer0.observed["queries"]
        captured["scale"] = scale
        original(scale, mask)

    layer0.note_attention = spy
    with torch.no_grad():
        model(ids, past_key_values=cache)
        model(ids, past_key_values=full)
    keys = full.layers[0].keys  # [1, kv, 48, d]
    q = captured["queries"][:, :, -8:]  # [1, hq, 8, d]
    group = q.shape[1] // keys.shape[1]
    logits = torch.einsum("bhqd,bhkd->bhqk", q, keys.repeat_interleave(group, 1)) * captured["scale"]
    causal = torch.arange(48)[None, :] > torch.arange(40, 48)[:, None]
    weights = logits.masked_fill(causal, float("-inf")).softmax(-1)
    scores = weights.mean(2).view(1, keys.shape[1], group, 48).mean(2)
    scores[..., 40:] = float("inf")  # the observation window stays
    expected = scores.topk(16, dim=-1).indices.sort(-1).values
    assert torch.equal(layer0.held_positions(), expected)


def test_adaptive_heads_share_the_layer_budget(make_model, make_float_spec):
    model = make_model("llama", num_key_value_heads=4, num_attention_heads=8)
    spec = make_float_spec(window=2, evict={"method": "snapkv", "keep": 0.25, "window": 8, "heads": "adaptive", "floor": 0.1})
    cache = kvcompress.cache_for(model, spec)
    prompt = _prompt(64)
    with torch.no_grad():
        model(prompt, past_key_values=cache)
    uneven = False
    for layer in cache.layers:
        counts = layer.key_store.tokens
        assert bool((counts.sum(-1) <= 14 * 4).all())  # 16 - 2 (window) per head on average
        assert bool((counts >= int(14 * 0.1)).all())
        uneven |= not layer.key_store.uniform
        held = layer.held_positions()
        for b in range(2):
            for h in range(4):
                kept = held[b, h][held[b, h] >= 0]
                assert kept.tolist() == sorted(set(kept.tolist())) and len(kept) == counts[b, h] + 2
    assert uneven
    assert storage_nbytes(reachable_tensors(cache)) == cache.nbytes()["total"]
    with torch.no_grad():
        out = model.generate(
            torch.cat([prompt, _prompt(5, seed=9)], dim=1), max_new_tokens=4, min_new_tokens=4, do_sample=False,
            past_key_values=cache,
        )
    assert out.shape == (2, 73)


def test_eviction_frees_memory_on_a_4k_prompt(make_model):
    """KIVI-4 on a 4096-token prompt of an fp16 model: evicting 75 % holds at most 0.27 of the bytes of the same cache without
    eviction, with uniform heads and with AdaKV's uneven ones, and every byte held is counted."""
    model = make_model("llama", dtype=torch.float16, head_dim=64, num_key_value_heads=2, num_attention_heads=4)
    spec = yaml.safe_load((SPECS / "kivi-4.yaml").read_text())
    ids = _prompt(4096, batch=1)
    held = {}
    adaptive = {"method": "snapkv", "keep": 0.25, "heads": "adaptive"}
    for name, evict in (("none", None), ("snapkv", {"method": "snapkv", "keep": 0.25}), ("streaming", {"method": "streaming", "keep": 0.25}), ("adaptive", adaptive)):
        cache = kvcompress.cache_for(model, {**spec, "evict": evict} if evict else spec)
        with torch.no_grad():
            model(ids, past_key_values=cache)
        held[name] = cache.nbytes()
        assert storage_nbytes(reachable_tensors(cache)) == held[name]["total"]
        if name == "adaptive":  # AdaKV's heads keep different counts: held ragged, each head its own count
            assert any(layer.key_store.ragged for layer in cache.layers)
    for name in ("snapkv", "streaming", "adaptive"):
        ratio = (held[name]["total"] - held[name]["constants"]) / (held["none"]["total"] - held["none"]["constants"])
        assert ratio <= 0.27, (name, ratio)


def test_decoding_evicts_every_n_tokens_in_whole_groups(make_model):
    """KIVI-4 keys are quantized over blocks of 32 tokens: while decoding, eviction drops whole blocks, holds
    the layer near its budget and keeps positions right."""
    model = make_model("llama", head_dim=32)
    spec = yaml.safe_load((SPECS / "kivi-4.yaml").read_text())
    spec["evict"] = {"method": "tova", "budget": 96, "every": 16}
    cache = kvcompress.cache_for(model, spec)
    with torch.no_grad():
        out = model.generate(_prompt(70), max_new_tokens=120, min_new_tokens=120, do_sample=False, past_key_values=cache)
    assert out.shape == (2, 190) and cache.get_seq_length() == 189
    for layer in cache.layers:
        held = layer.held_positions()
        real = held[held >= 0]
        assert real.numel() and int(real.max()) == 188
        # the budget plus what arrived since the last eviction (at most `every` + a compress run)
        assert layer.compressed_tokens + layer.tail_tokens <= 96 + 16 + 16
        assert layer.key_store.length % 32 == 0


def test_beam_search_and_left_padding_with_eviction(make_model, make_float_spec):
    model = make_model("llama")
    ids = _prompt(30)
    mask = torch.ones_like(ids)
    mask[1, :6] = 0  # left padding
    spec = make_float_spec(window=2, evict={"method": "snapkv", "keep": 0.5, "window": 4, "every": 4})
    cache = kvcompress.cache_for(model, spec)
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=mask, num_beams=2, max_new_tokens=10, min_new_tokens=10, do_sample=False,
            past_key_values=cache,
        )
    assert out.shape == (2, 40)


def test_left_padding_is_evicted_first(make_model, make_float_spec):
    """Padded positions are what the mask hides: the evictor drops them before any real token, so a padded row
    keeps the tokens it keeps alone."""
    model = make_model("llama")
    ids = _prompt(30)
    padded = torch.cat([torch.zeros(2, 6, dtype=ids.dtype), ids], dim=1)
    mask = torch.ones_like(padded)
    mask[1, :6] = 0
    padded[0, :6] = _prompt(6, batch=1, seed=11)
    evict = {"method": "snapkv", "budget": 12, "window": 4}
    batch = kvcompress.cache_for(model, make_float_spec(window=2, evict=evict))
    alone = kvcompress.cache_for(model, make_float_spec(window=2, evict=evict))
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        model(padded, attention_mask=mask, position_ids=position_ids, past_key_values=batch)
        model(ids[1:], past_key_values=alone)
    for both, single in zip(batch.layers, alone.layers):
        assert torch.equal(both.held_positions()[1] - 6, single.held_positions()[0])


def test_eviction_spec_errors(make_float_spec):
    with pytest.raises(SpecError, match="exactly one of keep"):
        parse_spec(make_float_spec(evict={"method": "snapkv", "keep": 0.5, "budget": 10}))
    with pytest.raises(SpecError, match="exactly one of keep"):
        parse_spec(make_float_spec(evict={"method": "streaming"}))
    with pytest.raises(SpecError, match=r"evict\.keep"):
        parse_spec(make_float_spec(evict={"method": "streaming", "keep": 1.5}))
    with pytest.raises(SpecError, match="unknown evict method 'h2o'"):
        parse_spec(make_float_spec(evict={"method": "h2o", "keep": 0.5}))
    with pytest.raises(SpecError, match=r"layers\.0\.evict\.window"):
        parse_spec(make_float_spec(layers={"0": {"evict": {"method": "snapkv", "keep": 0.5, "window": "8"}}}))


def test_per_layer_override_and_refusals(make_model, make_float_spec):
    model = make_model("llama")
    spec = make_float_spec(window=2, evict={"method": "streaming", "keep": 0.5}, layers={"1": {"evict": {"method": "knorm", "budget": 10}}})
    cache = kvcompress.cache_for(model, spec)
    with torch.no_grad():
        model(_prompt(40), past_key_values=cache)
    assert cache.layers[0].held_positions().shape[-1] == 20
    assert cache.layers[1].held_positions().shape[-1] == 10
    with pytest.raises(KVCompressError, match="exact_new_tokens=True"):
        kvcompress.CompressedCache(spec, model.config, exact_new_tokens=False)
