import torch

import kvcompress
from kvcompress.testing import QuantizerConformance, tiny_model


class TestAbsmax(QuantizerConformance):
    spec = {"method": "absmax"}
    role = "values"
    head_dim = 64
    max_relative_error = 0.2


class TestAbsmax8Keys(QuantizerConformance):
    spec = {"method": "absmax", "bits": 8}
    role = "keys"
    head_dim = 32
    max_relative_error = 0.02


def test_keynorm_keeps_the_channels_of_largest_pre_rope_key_energy():
    model = tiny_model("llama")
    spec = {"name": "keynorm", "window": 0,
            "keys": {"pruner": {"method": "keynorm", "keep": 8}, "quantizer": {"method": "absmax", "bits": 8}},
            "values": {"quantizer": {"method": "absmax"}}}
    ids = torch.randint(0, 128, (1, 16))
    cache = kvcompress.cache_for(model, spec)
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, past_key_values=cache)
    seen = {}
    hook = model.model.layers[0].self_attn.k_proj.register_forward_hook(lambda m, a, out: seen.setdefault("k", out))
    with torch.no_grad():
        model(ids)
    hook.remove()
    energy = seen["k"].view(1, 16, 2, 16).transpose(1, 2).pow(2).mean(2)
    expected = energy.topk(8, dim=-1).indices.sort(dim=-1).values
    assert torch.equal(cache.layers[0].key_store.shared["channels"].long(), expected)
    assert cache.key_bits() < 0.6 * (8 + 16 / 8)
