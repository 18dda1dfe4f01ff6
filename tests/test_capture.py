"""What the patch captures for pruners (queries after RoPE, keys before it), and how pruned roles are stored.

A probe pruner, registered in-process, keeps every channel and records each observation it is handed, so
the observation can be held against what the model computes.
"""

from __future__ import annotations

from typing import Literal

import pytest
import torch
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import kvcompress
from kvcompress import MethodSpec, PrunerMethod, Registry, hookimpl
from kvcompress.errors import KVCompressError, PluginError, UnsupportedModelError
from kvcompress.hf.adapters import SeparateProjectionAdapter
from kvcompress.runtime import ChannelPruner, Observation
from kvcompress.testing import ARCHITECTURES, make_codec


class ProbeSpec(MethodSpec):
    method: Literal["probe"] = "probe"
    keep: int = 0  # channels kept (0: all)


class ProbePruner(ChannelPruner):
    """Keeps the first `keep` channels and records what it observed, by layer."""

    seen: dict[int, list[Observation]] = {}

    def __init__(self, head_dim: int, keep: int, layer: int):
        self.head_dim, self.kept, self.layer = head_dim, keep or head_dim, layer

    def select(self, x: torch.Tensor, observation: Observation) -> torch.Tensor:
        ProbePruner.seen.setdefault(self.layer, []).append(observation)
        return torch.arange(self.kept).expand(x.shape[0], x.shape[1], -1)


class probe_plugin:
    @staticmethod
    @hookimpl
    def kvcompress_pruners():
        return [
            PrunerMethod(
                name="probe",
                spec=ProbeSpec,
                factory=lambda spec, ctx: ProbePruner(ctx.head_dim, spec.keep, ctx.layer),
                observes=frozenset({"queries", "pre_rope_keys"}),
            )
        ]


@pytest.fixture
def registry() -> Registry:
    ProbePruner.seen = {}
    registry = Registry()
    registry.register(probe_plugin, "probe")
    return registry


def probe_spec(window: int = 0, keep: int = 0) -> dict:
    float32 = {"method": "float", "dtype": "float32"}
    return {
        "name": "probe",
        "window": window,
        "compress_run": 1,
        "keys": {"pruner": {"method": "probe", "keep": keep}, "quantizer": float32},
        "values": {"quantizer": float32},
    }


def model_views(model, ids) -> dict[int, dict[str, torch.Tensor]]:
    """Per layer: the queries (after RoPE) and keys (before and after RoPE) the model computes, from the
    attention modules' own projections on the hidden states they receive."""
    inputs: dict[int, dict] = {}
    hooks = [
        layer.self_attn.register_forward_pre_hook(
            lambda module, args, kwargs: inputs.__setitem__(module.layer_idx, kwargs), with_kwargs=True
        )
        for layer in model.model.layers
    ]
    try:
        with torch.no_grad():
            model(ids, past_key_values=DynamicCache(config=model.config))
    finally:
        for hook in hooks:
            hook.remove()
    views = {}
    for index, kwargs in inputs.items():
        attn = model.model.layers[index].self_attn
        hidden = kwargs["hidden_states"]
        shape = (*hidden.shape[:2], -1, attn.head_dim)
        with torch.no_grad():
            q, k = attn.q_proj(hidden).view(shape), attn.k_proj(hidden).view(shape)
            if hasattr(attn, "q_norm"):
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
            cos, sin = kwargs["position_embeddings"]
            q_rot, k_rot = apply_rotary_pos_emb(q, k, cos, sin)
        views[index] = {"queries": q_rot, "pre_rope_keys": k, "keys": k_rot}
    return views


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_observation_is_the_queries_after_rope_and_the_keys_before_it(arch, make_model, registry):
    model = make_model(arch)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    views = model_views(model, ids)
    cache = kvcompress.cache_for(model, probe_spec(), registry=registry)
    with torch.no_grad():
        model(ids, past_key_values=cache)
    for index, layer in enumerate(cache.layers):
        (observation,) = ProbePruner.seen[index]
        torch.testing.assert_close(observation.queries, views[index]["queries"])
        torch.testing.assert_close(observation.pre_rope_keys, views[index]["pre_rope_keys"])
        # The keys before RoPE, rotated, are the keys the cache stored.
        torch.testing.assert_close(layer.codecs.keys.decode(layer.key_store.view()), views[index]["keys"])
        assert layer.observed == {}, "the observation must not outlive the forward"


def test_observing_layers_compress_at_the_end_of_the_forward_and_match_dynamic_cache(make_model, registry):
    model = make_model("llama")
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(1))
    expected = model.generate(ids, max_new_tokens=12, do_sample=False, past_key_values=DynamicCache(config=model.config))
    cache = kvcompress.cache_for(model, probe_spec(window=4), registry=registry)
    got = model.generate(ids, max_new_tokens=12, do_sample=False, past_key_values=cache)
    assert torch.equal(got, expected)
    layer = cache.layers[0]
    assert (layer.compressed_tokens, layer.tail_tokens) == (31 - 4, 4)
    # The selection is made once, at the first compression (the prompt's forward), and kept after.
    assert len(ProbePruner.seen[0]) == 1 and ProbePruner.seen[0][0].queries.shape[2] == 20


def test_capture_is_skipped_for_specs_that_observe_nothing(make_model, make_float_spec):
    model = make_model("llama")
    cache = kvcompress.cache_for(model, make_float_spec(window=2))
    with torch.no_grad():
        model(torch.arange(8)[None], past_key_values=cache)
    assert all(layer.observed == {} for layer in cache.layers)
    assert cache.layers[0].compressed_tokens == 6


def test_a_model_without_key_projection_is_refused_for_pre_rope_keys(make_model, registry, monkeypatch):
    model = make_model("llama")
    monkeypatch.setattr(SeparateProjectionAdapter, "pre_rope_keys", lambda self, module: None)
    with pytest.raises(UnsupportedModelError, match="layer 0: .* SeparateProjectionAdapter cannot capture them from LlamaAttention"):
        kvcompress.cache_for(model, probe_spec(), registry=registry)


def test_pruned_state_holds_only_kept_channels_and_reads_queries_through_them(registry):
    codec = make_codec({"method": "float", "dtype": "float32"}, head_dim=8, pruner={"method": "probe", "keep": 3}, registry=registry)
    x = torch.randn(2, 2, 5, 8)
    observation = Observation(queries=torch.randn(2, 2, 4, 8), pre_rope_keys=x)
    state = codec.encode(x, observation)
    assert state.head_dim == 3 and state.nbytes() == 2 * 2 * 5 * 3 * 4 + 2 * 2 * 3  # floats + uint8 channels
    decoded = codec.decode(state)
    assert torch.equal(decoded[..., :3], x[..., :3]) and not decoded[..., 3:].any()
    query = torch.randn(2, 2, 6, 8)
    torch.testing.assert_close(codec.scores(query, state), query[..., :3] @ x[..., :3].transpose(-1, -2))
    weights = torch.softmax(torch.randn(2, 2, 6, 5), dim=-1)
    mixed = codec.mix(weights, state)
    assert torch.equal(mixed[..., 3:], torch.zeros_like(mixed[..., 3:]))
    # Later tokens reuse the selection of the state they join, without observing anything.
    more = codec.encode(torch.randn(2, 2, 2, 8), shared=state.shared)
    assert more.shared["channels"] is state.shared["channels"]
    assert state.cat(more).tokens == 7


def test_states_with_different_channel_selections_do_not_concatenate(registry):
    codec = make_codec({"method": "float"}, head_dim=8, pruner={"method": "probe", "keep": 3}, registry=registry)
    x = torch.randn(1, 2, 4, 8)
    a = codec.encode(x, Observation(queries=x, pre_rope_keys=x))
    b = codec.encode(x, Observation(queries=x, pre_rope_keys=x))
    b.shared = {"channels": b.shared["channels"].flip(-1)}
    with pytest.raises(ValueError, match="shared per-sequence tensors differ"):
        a.cat(b)


def test_a_pruner_without_its_observation_says_what_is_missing(registry):
    codec = make_codec({"method": "float"}, head_dim=8, pruner={"method": "probe"}, registry=registry)
    with pytest.raises(KVCompressError, match="needs the pre_rope_keys and queries"):
        codec.encode(torch.randn(1, 2, 4, 8))


def test_a_pruner_returning_bad_indices_is_caught(registry, monkeypatch):
    codec = make_codec({"method": "float"}, head_dim=8, pruner={"method": "probe", "keep": 3}, registry=registry)
    monkeypatch.setattr(ProbePruner, "select", lambda self, x, obs: torch.full((1, 2, 3), 9))
    x = torch.randn(1, 2, 4, 8)
    with pytest.raises(KVCompressError, match=r"expected \(1, 2, 3\) in \[0, 8\)"):
        codec.encode(x, Observation(queries=x, pre_rope_keys=x))


def test_registry_refuses_a_pruner_that_observes_what_the_cache_cannot_capture():
    class bad_plugin:
        @staticmethod
        @hookimpl
        def kvcompress_pruners():
            return [PrunerMethod(name="bad", spec=ProbeSpec, factory=None, observes=frozenset({"attention_weights"}))]

    registry = Registry(entry_points=False)
    with pytest.raises(PluginError, match="observes attention_weights; the cache can capture queries, pre_rope_keys"):
        registry.register(bad_plugin, "bad")


def test_pruner_stage_serves_only_its_roles(registry):
    class keys_only:
        @staticmethod
        @hookimpl
        def kvcompress_pruners():
            return [PrunerMethod(name="keysonly", spec=type("KeysOnlySpec", (MethodSpec,), {"__annotations__": {"method": Literal["keysonly"]}, "method": "keysonly"}), factory=None, roles=frozenset({"keys"}))]

    registry.register(keys_only, "keysonly")
    spec = {"name": "x", "keys": {"quantizer": {"method": "float"}},
            "values": {"pruner": {"method": "keysonly"}, "quantizer": {"method": "float"}}}
    with pytest.raises(kvcompress.SpecError, match="values.pruner: 'keysonly' does not serve values"):
        kvcompress.parse_spec(spec, registry=registry)


def test_a_pruner_must_keep_between_one_and_head_dim_channels(registry):
    with pytest.raises(kvcompress.KVCompressError, match=r"keys.pruner: .probe. keeps 9 channels; it must keep between 1 and head_dim \(8\)"):
        make_codec({"method": "float"}, head_dim=8, pruner={"method": "probe", "keep": 9}, registry=registry)
