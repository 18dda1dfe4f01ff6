"""Sliding-window layers free the tokens that no later query can attend to (positions <= seen - W)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from transformers import DynamicCache

import kvcompress
from kvcompress.hf.cache import model_geometry
from kvcompress.state import reachable_tensors, storage_nbytes
from kvcompress.store import PAGE_TOKENS

KIVI4 = Path(__file__).resolve().parents[1] / "specs" / "kivi-4.yaml"


def test_model_geometry_gives_each_layer_its_window(make_model):
    assert model_geometry(make_model("llama").config).windows == (None, None)
    assert model_geometry(make_model("mistral").config).windows == (6, 6)  # sliding_window, no layer_types
    assert model_geometry(make_model("gemma2").config).windows == (6, None)
    assert model_geometry(make_model("gemma3").config).windows == (6, 6)


@pytest.mark.parametrize("arch", ["mistral", "gemma2", "gemma3"])
@pytest.mark.parametrize("window", [0, 4])
def test_generation_matches_dynamic_cache(make_model, make_float_spec, arch, window):
    """Float32 storage over a sequence several times the sliding window (6): token-identical to DynamicCache."""
    model = make_model(arch)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(7))
    cache = kvcompress.cache_for(model, make_float_spec(window=window, sinks=2))
    reference = DynamicCache(config=model.config)
    with torch.no_grad():
        expected = model.generate(ids, max_new_tokens=60, min_new_tokens=60, do_sample=False, past_key_values=reference)
        generated = model.generate(ids, max_new_tokens=60, min_new_tokens=60, do_sample=False, past_key_values=cache)
    assert torch.equal(generated, expected)
    for layer in cache.layers:
        if layer.sliding_window is not None:
            live = layer.seen - layer.sliding_window + 1
            assert layer.freed_before > 0 and layer.sink_tokens == 0
            assert layer.tail_tokens <= window
            # the packed tokens are freed a page at a time: fewer than a page of dead ones linger
            held = layer.held_positions()
            assert int((held < live).sum()) < 2 * 2 * PAGE_TOKENS


@pytest.mark.parametrize("exact", [True, False])
def test_held_positions_of_a_sliding_layer(make_model, make_float_spec, exact):
    """gemma2: the sliding layer (0) holds its live tokens once enough died; the full layer (1) keeps all."""
    model = make_model("gemma2", sliding_window=8)
    ids = torch.randint(0, 128, (1, 120), generator=torch.Generator().manual_seed(8))
    cache = kvcompress.cache_for(model, make_float_spec(window=3, sinks=2), exact_new_tokens=exact)
    reference = DynamicCache(config=model.config)
    with torch.no_grad():
        for start in range(0, 120, 10):
            logits = model(ids[:, start : start + 10], past_key_values=cache).logits
            expected = model(ids[:, start : start + 10], past_key_values=reference).logits
            torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    sliding, full = cache.layers
    assert sliding.is_sliding and not full.is_sliding
    assert full.held_positions()[0, 0].tolist() == list(range(120))
    held = sliding.held_positions()
    live = 120 - 8 + 1
    assert held[..., -3:].tolist() == [[list(range(117, 120))] * 2]  # the tail
    assert sliding.sink_tokens == 0  # both sinks died
    # packed tokens: freed once a page of them died, so fewer than a page of dead ones linger
    assert int(held.min()) >= live - PAGE_TOKENS and sliding.compressed_tokens < 8 + PAGE_TOKENS
    assert sliding.freed_before > 0


def test_long_generation_holds_bounded_memory(make_model):
    """Mistral (every layer slides, W = 64), KIVI-4, 330 tokens: the packed stores stay within W plus two
    pages, and every byte held is still counted."""
    window = 64
    model = make_model("mistral", dtype=torch.float16, head_dim=32, sliding_window=window)
    spec = yaml.safe_load(KIVI4.read_text())
    cache = kvcompress.cache_for(model, spec)
    ids = torch.randint(0, 128, (2, 30), generator=torch.Generator().manual_seed(9))
    bounds = []
    with torch.no_grad():
        model.generate(ids, max_new_tokens=300, min_new_tokens=300, do_sample=False, past_key_values=cache)
    assert cache.get_seq_length() == 329
    for layer in cache.layers:
        quantum = layer.key_store.layout.quantum
        bound = window + 2 * max(PAGE_TOKENS, quantum)
        bounds.append(bound)
        assert layer.key_store.length <= bound and layer.value_store.length <= bound
        assert layer.key_store.capacity <= bound + PAGE_TOKENS
        assert layer.freed_before > 0
    held = cache.nbytes()
    assert storage_nbytes(reachable_tensors(cache)) == held["total"]
    per_token = cache.layers[0].key_store.nbytes() / max(cache.layers[0].key_store.capacity, 1)
    assert held["keys"] <= sum(b + PAGE_TOKENS for b in bounds) * per_token


@pytest.mark.filterwarnings("ignore::kvcompress.hf.cache.RollbackWarning")  # rollbacks are what these test
def test_crop_does_not_go_back_past_freed_tokens(make_model, make_float_spec):
    model = make_model("mistral")
    cache = kvcompress.cache_for(model, make_float_spec(window=8))
    with torch.no_grad():
        model(torch.randint(0, 128, (1, 20)), past_key_values=cache)
    layer = cache.layers[0]
    assert layer.freed_before == 15 and layer.tail_tokens == 5  # W = 6: positions 15..19 live
    with pytest.raises(kvcompress.KVCompressError, match="already freed"):
        cache.crop(-1)
