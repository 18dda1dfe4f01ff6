"""Model adapters: the core's adapter against every tested architecture, and how adapters are chosen."""

from __future__ import annotations

import pytest
import torch

import kvcompress
from kvcompress import ModelAdapter, PluginError, Registry, hookimpl
from kvcompress.testing import ARCHITECTURES, adapter_rope_views


def check_rope(model) -> None:
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(0))
    views = adapter_rope_views(model, ids, prompt=8)
    assert len(views) == model.config.num_hidden_layers
    for rotated, stored in views:
        assert stored.shape[2] >= 5
        torch.testing.assert_close(rotated, stored, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_apply_rope_of_captured_pre_rope_keys_is_what_dynamic_cache_holds(arch, make_model):
    check_rope(make_model(arch))


def test_gemma3_local_and_global_layers_each_get_their_own_rope(make_model):
    model = make_model("gemma3", layer_types=["sliding_attention", "full_attention"])
    rotary = model.model.rotary_emb
    assert not torch.equal(rotary.sliding_attention_inv_freq, rotary.full_attention_inv_freq)
    check_rope(model)


def test_a_model_type_without_adapter_is_refused_with_the_hook_named(make_float_spec):
    from transformers import Phi3Config, Phi3ForCausalLM

    config = Phi3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=2, vocab_size=64, pad_token_id=0)
    model = Phi3ForCausalLM(config)
    with pytest.raises(kvcompress.UnsupportedModelError) as raised:
        kvcompress.patch(model, make_float_spec())
    message = str(raised.value)
    assert "no model adapter handles model type 'phi3'" in message
    assert "kvcompress_model_adapters" in message and "Model adapters" in message
    assert model.config._attn_implementation != "kvcompress"


def test_the_core_adapter_covers_the_tested_architectures_without_importing_transformers():
    adapter = Registry(entry_points=False).adapter_for("gemma3_text")
    assert adapter.name == "separate-projections"
    assert {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3"} <= adapter.model_types


def adapter_plugin(name: str, model_types: set[str]):
    class plugin:
        @staticmethod
        @hookimpl
        def kvcompress_model_adapters():
            return [ModelAdapter(name=name, model_types=frozenset(model_types), load=lambda: None)]

    return plugin


def test_two_adapters_claiming_one_model_type_are_refused_naming_both_distributions():
    registry = Registry(entry_points=False)
    with pytest.raises(PluginError) as raised:
        registry.register(adapter_plugin("my-llama", {"llama", "mine"}), kvcompress.plugins.PluginInfo("mine", "kvcompress-mine", "1"))
    message = str(raised.value)
    assert "plugin 'mine' (distribution kvcompress-mine 1)" in message and "of plugin 'kvcompress' (kvcompress)" in message
    assert "'my-llama'" in message and "'separate-projections'" in message


def test_two_adapters_of_one_name_are_refused():
    registry = Registry(entry_points=False)
    with pytest.raises(PluginError, match="provides 'separate-projections' through kvcompress_model_adapters, clashing"):
        registry.register(adapter_plugin("separate-projections", {"mine"}), "mine")


def test_a_plugin_returning_something_else_from_the_adapter_hook_is_refused():
    class wrong:
        @staticmethod
        @hookimpl
        def kvcompress_model_adapters():
            return ["llama"]

    registry = Registry(entry_points=False)
    with pytest.raises(PluginError, match="returned str from kvcompress_model_adapters; expected ModelAdapter"):
        registry.register(wrong, "wrong")


def test_patched_attention_modules_carry_the_adapters_unsupported_kwargs(make_model, make_float_spec):
    from kvcompress.hf.adapters import UNSUPPORTED_KWARGS_ATTRIBUTE, model_adapter

    model = make_model("qwen3")
    modules = [layer.self_attn for layer in model.model.layers]
    with kvcompress.patch(model, make_float_spec()) as patched:
        assert patched.modules == modules
        expected = dict(model_adapter(model).unsupported_kwargs)
        assert "s_aux" in expected
        assert all(getattr(m, UNSUPPORTED_KWARGS_ATTRIBUTE) == expected for m in modules)
    assert not any(hasattr(m, UNSUPPORTED_KWARGS_ATTRIBUTE) for m in modules)
