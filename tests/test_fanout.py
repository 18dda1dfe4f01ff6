"""PrefillFanout: one prefill fills every shipped spec's cache exactly as a prefill of its own does (held bytes,
the logits of the prompt and of the forwards after it), and what it cannot serve it refuses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import kvcompress
from kvcompress.errors import KVCompressError
from kvcompress.hf.fanout import PrefillFanout
from kvcompress.testing import spec_model

for _module in ("kvcompress_scalar", "kvcompress_qjl", "kvcompress_rvq", "kvcompress_prune"):
    pytest.importorskip(_module, reason="the shipped specs use every plugin: pip install -e plugins/scalar plugins/qjl "
                        "plugins/rvq plugins/prune")

SPECS = sorted((Path(__file__).parent.parent / "specs").glob("*.yaml"))
# Past the window (32), SnapKV's query window (64) and a few KIVI groups, not a multiple of 32.
PROMPT, NEXT = 181, (16, 1, 7)


def _ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_one_prefill_fills_every_spec_as_its_own_prefill_does(shipped_specs, arch):
    model = spec_model(arch)
    specs = [kvcompress.load_spec(shipped_specs / path.name) for path in SPECS if not path.name.startswith("tuned")]
    prompt = _ids(2, PROMPT, 0)
    follow = [_ids(2, n, 1 + i) for i, n in enumerate(NEXT)]

    def run(cache, first):
        with torch.inference_mode():
            logits = [first] + [model(input_ids=ids, past_key_values=cache, use_cache=True).logits for ids in follow]
        return logits, cache.nbytes()

    alone = []
    for spec in specs:
        with kvcompress.patch(model, spec) as patched, torch.inference_mode():
            cache = patched.cache()
            first = model(input_ids=prompt, past_key_values=cache, use_cache=True).logits
            nbytes = cache.nbytes()
            alone.append((first, nbytes, run(cache, first)))
    with kvcompress.patch(model, specs[0]) as patched:
        caches = [patched.cache(spec) for spec in specs]
        with torch.inference_mode():
            first = model(input_ids=prompt, past_key_values=PrefillFanout(caches), use_cache=True).logits
        for spec, cache, (first_alone, nbytes_alone, (logits_alone, after_alone)) in zip(specs, caches, alone):
            assert torch.equal(first, first_alone), spec.name
            assert cache.nbytes() == nbytes_alone, spec.name
            assert cache.get_seq_length() == PROMPT
            logits, after = run(cache, first)
            for step, (mine, theirs) in enumerate(zip(logits, logits_alone)):
                assert torch.equal(mine, theirs), f"{spec.name}: forward {step} after the prompt"
            assert after == after_alone, spec.name


def test_the_fanout_serves_only_a_prefill_of_empty_unpadded_caches(shipped_specs):
    model = spec_model("llama")
    spec = kvcompress.load_spec(shipped_specs / "kivi-2.yaml")
    with kvcompress.patch(model, spec) as patched, torch.inference_mode():
        caches = [patched.cache(), patched.cache()]
        fanout = PrefillFanout(caches)
        model(input_ids=_ids(1, 40, 0), past_key_values=fanout, use_cache=True)
        with pytest.raises(KVCompressError, match="empty caches"):
            model(input_ids=_ids(1, 4, 1), past_key_values=fanout, use_cache=True)
        with pytest.raises(KVCompressError, match="already holds tokens"):
            PrefillFanout(caches)
        with pytest.raises(KVCompressError, match="exact_new_tokens"):
            PrefillFanout([patched.cache(), patched.cache(exact_new_tokens=False)])
        mask = torch.ones(2, 40, dtype=torch.long)
        mask[0, :5] = 0
        with pytest.raises(KVCompressError, match="left-padded"):
            model(input_ids=_ids(2, 40, 2), attention_mask=mask, past_key_values=PrefillFanout([patched.cache()]))
    with pytest.raises(KVCompressError, match="at least one"):
        PrefillFanout([])
    other = spec_model("llama", layers=3)
    with kvcompress.patch(other, spec) as patched_other, kvcompress.patch(model, spec) as patched:
        with pytest.raises(KVCompressError, match="same model"):
            PrefillFanout([patched.cache(), patched_other.cache()])
