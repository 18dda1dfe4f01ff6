"""kvcompress.patch / kvcompress.cache_for: what they change, what they restore, what they refuse."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import kvcompress
from kvcompress.hf import attention
from kvcompress.hf.adapters import model_adapter


def hook_counts(model) -> tuple[int, int]:
    modules = model_adapter(model).attention_modules(model, kvcompress.hf.cache.model_geometry(model.config))
    return sum(len(m._forward_pre_hooks) for m in modules), sum(len(m._forward_hooks) for m in modules)


def test_patch_as_context_manager_restores_the_model(arch, make_model, make_float_spec):
    model = make_model(arch)
    before = model.config._attn_implementation
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids).logits
        with kvcompress.patch(model, make_float_spec()) as patched:
            assert model.config._attn_implementation == "kvcompress"
            assert hook_counts(model) == (2, 2)
            cache = patched.cache()
            logits = model(ids, past_key_values=cache).logits
            assert cache.get_seq_length() == 9
        assert model.config._attn_implementation == before
        assert hook_counts(model) == (0, 0)
        assert not hasattr(model, "_kvcompress_patch")
        torch.testing.assert_close(model(ids).logits, reference, atol=0, rtol=0)
    torch.testing.assert_close(logits, reference, atol=1e-5, rtol=0)
    # The attention modules keep no reference to the cache once a forward is over.
    assert all(getattr(m, attention.CACHE_ATTRIBUTE, None) is None for m in model.modules())


def test_cache_for_is_idempotent_and_nested_patches_leave_the_outer_one(make_model, make_float_spec):
    model = make_model("llama")
    first = kvcompress.cache_for(model, make_float_spec())
    second = kvcompress.cache_for(model, make_float_spec("float16"))
    assert first is not second and hook_counts(model) == (2, 2)
    assert second.layers[0].codecs.keys.quantizer.storage == torch.float16
    with kvcompress.patch(model, make_float_spec()):
        assert hook_counts(model) == (2, 2)
    # The inner context exits; the patch from cache_for is still in place.
    assert model.config._attn_implementation == "kvcompress" and hook_counts(model) == (2, 2)
    model._kvcompress_patch.restore()
    assert model.config._attn_implementation != "kvcompress" and hook_counts(model) == (0, 0)


def test_patch_accepts_a_spec_file(tmp_path, make_model):
    path = tmp_path / "f16.yaml"
    path.write_text(
        "name: f16\nwindow: 4\nkeys: {quantizer: {method: float}}\nvalues: {quantizer: {method: float}}\n"
    )
    model = make_model("qwen2")
    cache = kvcompress.cache_for(model, path)
    assert cache.spec.name == "f16" and cache.spec.source == str(path)
    assert all(layer.codecs.window == 4 for layer in cache.layers)


def test_a_spec_selecting_missing_layers_is_refused(make_model, make_float_spec):
    spec = make_float_spec()
    spec["layers"] = {"2-3": {"window": 8}}
    with pytest.raises(kvcompress.SpecError, match="the model has 2 layers"):
        kvcompress.patch(make_model("llama"), spec)


def test_model_without_attention_layers_is_unsupported():
    from transformers import MambaConfig, MambaForCausalLM

    model = MambaForCausalLM(MambaConfig(hidden_size=32, num_hidden_layers=2, vocab_size=64, state_size=4))
    with pytest.raises(kvcompress.UnsupportedModelError, match="num_attention_heads"):
        kvcompress.patch(model, {"name": "x", "keys": {"quantizer": {"method": "float"}}, "values": {"quantizer": {"method": "float"}}})


def test_encoder_decoder_is_unsupported(make_float_spec):
    from transformers import T5Config, T5ForConditionalGeneration

    model = T5ForConditionalGeneration(T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16, vocab_size=64))
    with pytest.raises(kvcompress.UnsupportedModelError, match="encoder-decoder"):
        kvcompress.cache_for(model, make_float_spec())


def test_non_transformers_module_is_unsupported(make_float_spec):
    with pytest.raises(kvcompress.UnsupportedModelError, match="not a transformers PreTrainedModel"):
        kvcompress.patch(torch.nn.Linear(4, 4), make_float_spec())


def test_missing_attention_modules_are_named(make_model, make_float_spec):
    model = make_model("llama")
    del model.model.layers[1].self_attn.layer_idx
    with pytest.raises(kvcompress.UnsupportedModelError, match=r"layer\(s\) 1 of 2"):
        kvcompress.patch(model, make_float_spec())
    assert model.config._attn_implementation != "kvcompress"


def test_linear_attention_layers_are_unsupported(make_model, make_float_spec):
    model = make_model("llama")
    model.config.layer_types = ["full_attention", "linear_attention"]
    with pytest.raises(kvcompress.UnsupportedModelError, match="linear_attention"):
        kvcompress.patch(model, make_float_spec())


def test_importing_kvcompress_does_not_import_transformers():
    code = (
        "import sys, kvcompress\n"
        "assert 'transformers' not in sys.modules, 'transformers imported'\n"
        "assert callable(kvcompress.patch) and callable(kvcompress.cache_for)\n"
        "assert 'transformers' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
