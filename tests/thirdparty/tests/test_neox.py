import torch
from transformers import AutoModelForCausalLM, DynamicCache, GPTNeoXConfig

import kvcompress
from kvcompress.testing import adapter_rope_views


def tiny_neox() -> torch.nn.Module:
    """2 layers, 4 heads of 16 channels, RoPE on the first 4 of them (partial_rotary_factor 0.25)."""
    config = GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           vocab_size=128, max_position_embeddings=256)
    assert config.rope_parameters["partial_rotary_factor"] == 0.25
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def absmax_spec(window: int, keys: dict | None = None) -> dict:
    return {"name": "neox", "window": window,
            "keys": keys or {"quantizer": {"method": "absmax", "bits": 8}},
            "values": {"quantizer": {"method": "absmax"}}}


def test_generation_within_the_window_equals_dynamic_cache():
    model = tiny_neox()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    common = dict(attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False)
    expected = model.generate(ids, past_key_values=DynamicCache(config=model.config), **common)
    cache = kvcompress.cache_for(model, absmax_spec(window=64))
    got = model.generate(ids, past_key_values=cache, **common)
    assert model.config._attn_implementation == "kvcompress"
    assert torch.equal(got, expected)
    assert cache.get_seq_length() == 21 and cache.compressed_tokens() == 0
    # With a short window the same generation runs on packed 8-bit keys and 4-bit values.
    small = kvcompress.cache_for(model, absmax_spec(window=4))
    assert model.generate(ids, past_key_values=small, **common).shape == expected.shape
    assert small.compressed_tokens() > 0


def test_apply_rope_of_the_sliced_keys_is_what_dynamic_cache_holds():
    model = tiny_neox()
    assert model.gpt_neox.layers[0].attention.rotary_ndims == 4  # partial rotary: 4 of 16 channels turn
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(1))
    for rotated, stored in adapter_rope_views(model, ids, prompt=8):
        assert stored.shape == (2, 4, 11, 16)
        torch.testing.assert_close(rotated, stored, atol=1e-5, rtol=1e-5)


def test_keynorm_reads_the_keys_sliced_from_the_fused_projection():
    model = tiny_neox()
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(2))
    keys = {"pruner": {"method": "keynorm", "keep": 8}, "quantizer": {"method": "absmax", "bits": 8}}
    cache = kvcompress.cache_for(model, absmax_spec(window=0, keys=keys))
    with torch.no_grad():
        model(ids, past_key_values=cache)
    seen = {}
    attention = model.gpt_neox.layers[0].attention
    hook = attention.query_key_value.register_forward_hook(lambda m, a, out: seen.setdefault("qkv", out))
    with torch.no_grad():
        model(ids)
    hook.remove()
    energy = seen["qkv"].view(1, 16, 4, 48)[..., 16:32].transpose(1, 2).pow(2).mean(2)
    expected = energy.topk(8, dim=-1).indices.sort(dim=-1).values
    assert torch.equal(cache.layers[0].key_store.shared["channels"].long(), expected)
