"""`center`: each sequence's per-channel median is taken out before a role's stages and put back when read,
exactly (scores get <q, center>, mixes the center), so a large constant offset in the keys no longer eats the codes' range."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformers import DynamicCache

import kvcompress
from kvcompress.errors import SpecError
from kvcompress.testing import make_codec

pytest.importorskip("kvcompress_scalar", reason="the centered codecs here are kvcompress-scalar's: pip install -e plugins/scalar")


def _centered(spec: dict) -> dict:
    return {**spec, "keys": {**spec["keys"], "center": True}, "values": {**spec["values"], "center": True}}


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gemma3"])  # gemma2 caps its scores (softcap): not shift-invariant
def test_centered_float_storage_equals_dynamic_cache(make_model, make_float_spec, arch):
    model = make_model(arch)
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1))
    cache = kvcompress.cache_for(model, _centered(make_float_spec(window=3, sinks=1)))
    reference = DynamicCache(config=model.config)
    with torch.no_grad():
        for start, stop in [(0, 25), (25, 26), (26, 27), (27, 40)]:
            logits = model(ids[:, start:stop], past_key_values=cache).logits
            expected = model(ids[:, start:stop], past_key_values=reference).logits
            torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    assert cache.compressed_tokens() > 0


def test_centering_takes_a_constant_offset_out_of_the_error():
    """Keys with a large per-channel offset (a k_proj bias): per-token 4-bit codes after a rotation spend their
    range on it; centered, the error on what varies between tokens is what it is without the offset."""
    gen = torch.Generator().manual_seed(0)
    varying = torch.randn(1, 2, 256, 64, generator=gen)
    offset = torch.zeros(64)
    offset[:4] = 40.0  # a few channels of very large magnitude
    keys = varying + offset
    stages = dict(quantizer={"method": "scalar", "bits": 4, "axis": "token", "group": 64, "grid": "lloyd-max"},
                  transform={"method": "hadamard", "seed": 0})
    plain = make_codec(**stages)
    centered = replace(plain, center=True)

    def error(codec):
        return ((codec.decode(codec.encode(keys)) - keys).norm() / (keys - keys.mean(2, keepdim=True)).norm()).item()

    assert error(centered) < 0.12 < 0.5 < error(plain)
    state = centered.encode(keys)
    torch.testing.assert_close(state.shared["center"], keys.median(2).values)
    # scores and mixes read through the estimator equal those of the decoded vectors
    query = torch.randn(1, 2, 3, 64, generator=gen)
    decoded = centered.decode(state)
    torch.testing.assert_close(centered.scores(query, state), query @ decoded.transpose(-1, -2), atol=1e-3, rtol=1e-4)
    weights = torch.softmax(torch.randn(1, 2, 3, 256, generator=gen), -1)
    torch.testing.assert_close(centered.mix(weights, state), weights @ decoded, atol=1e-4, rtol=1e-4)


def test_auto_centers_only_the_heads_whose_offset_holds_most_of_the_energy():
    gen = torch.Generator().manual_seed(4)
    keys = torch.randn(1, 2, 64, 64, generator=gen)
    keys[:, 0, :, :4] += 40.0  # head 0: an offset far above what varies; head 1: none
    codec = replace(make_codec({"method": "scalar", "bits": 4, "axis": "token", "group": 64, "grid": "lloyd-max"}),
                    center="auto")
    center = codec.encode(keys).shared["center"]
    torch.testing.assert_close(center[:, 0], keys[:, 0].median(1).values)
    assert not center[:, 1].any()
    assert kvcompress.parse_spec(_centered_auto()).keys.center == "auto"
    with pytest.raises(SpecError, match=r"keys\.center"):
        kvcompress.parse_spec({**_centered_auto(), "keys": {"quantizer": {"method": "float"}, "center": "yes"}})


def _centered_auto() -> dict:
    return {"name": "auto", "keys": {"quantizer": {"method": "float"}, "center": "auto"},
            "values": {"quantizer": {"method": "float"}}}


def test_the_center_is_held_and_counted_once_per_sequence_and_head(make_model, make_float_spec):
    model = make_model("llama")
    ids = torch.randint(0, 128, (2, 30), generator=torch.Generator().manual_seed(2))
    held = {}
    for center in (False, True):
        spec = make_float_spec(window=2)
        spec["keys"]["center"] = center
        cache = kvcompress.cache_for(model, spec)
        with torch.no_grad():
            model(ids, past_key_values=cache)
        held[center] = cache.nbytes()
    layers, batch, kv_heads, head_dim = 2, 2, 2, 16
    assert held[True]["keys"] - held[False]["keys"] == layers * batch * kv_heads * head_dim * 4
    assert held[True]["values"] == held[False]["values"]


def test_eviction_scores_centered_keys_as_they_are(make_model, make_float_spec):
    """SnapKV keeps the same tokens whether the float keys are centered or not: its scores include <q, center>."""
    model = make_model("llama")
    ids = torch.randint(0, 128, (1, 60), generator=torch.Generator().manual_seed(3))
    kept = []
    for center in (False, True):
        spec = make_float_spec(window=2, evict={"method": "snapkv", "budget": 24, "window": 4, "every": 8})
        spec["keys"]["center"] = center
        cache = kvcompress.cache_for(model, spec)
        with torch.no_grad():
            model(ids[:, :40], past_key_values=cache)
            for position in range(40, 60):
                model(ids[:, position : position + 1], past_key_values=cache)
        kept.append([layer.held_positions() for layer in cache.layers])
    for plain, centered in zip(*kept):
        assert torch.equal(plain, centered)


def test_center_in_overrides_and_refused_with_a_codebook(make_float_spec):
    spec = make_float_spec(window=2, layers={"0": {"keys": {"center": True}}})
    parsed = kvcompress.parse_spec(spec)
    assert parsed.layer(0).keys.center and not parsed.layer(1).keys.center
    rvq = {
        "name": "rvq-centered", "window": 32,
        "keys": {"quantizer": {"method": "rvq", "depth": 2, "codebook_size": 16, "group": 32},
                 "codebook": {"method": "kmeans", "path": "x.safetensors"}, "center": True},
        "values": {"quantizer": {"method": "float"}},
    }
    pytest.importorskip("kvcompress_rvq")
    with pytest.raises(SpecError, match=r"keys\.center: centering changes"):
        kvcompress.parse_spec(rvq)
    with pytest.raises(SpecError, match=r"keys\.center"):
        kvcompress.parse_spec({**spec, "keys": {**spec["keys"], "center": 1}})
