"""Left-padded batches: every shipped spec gives each padded row what its prompt gives alone (the padding enters
no group, range, outlier choice or channel score, and each row's window edge falls where it falls alone), the
padding is never stored, and batch operations (beams, selection, crop, reset, pickling) keep rows apart."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch

import kvcompress
from kvcompress.errors import KVCompressError
from kvcompress.hf.rows import PaddedBatchLayer, first_real_positions
from kvcompress.testing import spec_model

for _module in ("kvcompress_scalar", "kvcompress_qjl", "kvcompress_rvq", "kvcompress_prune"):
    pytest.importorskip(_module, reason="the shipped specs use every plugin: pip install -e plugins/scalar plugins/qjl "
                        "plugins/rvq plugins/prune")

SPECS = sorted((Path(__file__).parent.parent / "specs").glob("*.yaml"))
# Prompt lengths past the window (32), a KIVI group (32) and SnapKV's window (64), none a multiple of 32 apart:
# batched, the rows' groups and window edges would fall at other tokens than alone.
LENGTHS = (150, 95, 201)
NEW_TOKENS = 24


def _prompts(lengths=LENGTHS, pad_id: int = 0) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    prompts = [torch.randint(3, 128, (n,), generator=torch.Generator().manual_seed(n)) for n in lengths]
    width = max(lengths)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = prompt
        mask[row, width - len(prompt) :] = 1
    return prompts, ids, mask


def _generate(model, spec, ids, mask=None, **kwargs):
    cache = kvcompress.cache_for(model, spec)
    with torch.inference_mode():
        out = model.generate(
            ids, attention_mask=mask, past_key_values=cache, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
            do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0, **kwargs,
        )
    return out, cache


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("name", [p.name for p in SPECS])
def test_a_padded_row_equals_its_prompt_alone(shipped_specs, name, arch):
    spec = kvcompress.load_spec(shipped_specs / name)
    model = spec_model(arch, torch.float32, max(2, spec.min_layers()))
    prompts, ids, mask = _prompts()
    batch, cache = _generate(model, spec, ids, mask)
    assert all(isinstance(layer, PaddedBatchLayer) for layer in cache.layers)
    alone_bytes = 0
    for row, prompt in enumerate(prompts):
        single, single_cache = _generate(model, spec, prompt[None])
        batched = torch.stack([scores[row] for scores in batch.logits])
        expected = torch.stack([scores[0] for scores in single.logits])
        assert (batched - expected).abs().max() <= 1e-4 * expected.abs().max(), (name, row)
        assert torch.equal(batch.sequences[row, ids.shape[1] :], single.sequences[0, len(prompt) :])
        held = single_cache.nbytes()
        alone_bytes += held["total"] - held["constants"]
    assert cache.compressed_tokens() > 0
    # The padding is never stored: the batch holds what its prompts hold alone.
    held = cache.nbytes()
    assert held["total"] - held["constants"] == alone_bytes


def test_the_pad_token_does_not_matter(shipped_specs):
    spec = kvcompress.load_spec(shipped_specs / "kivi-2.yaml")
    model = spec_model("llama")
    outputs = [_generate(model, spec, *_prompts(pad_id=pad)[1:])[0] for pad in (2, 17)]
    assert torch.equal(torch.stack(outputs[0].logits), torch.stack(outputs[1].logits))


def test_beam_search_keeps_each_row_apart(shipped_specs):
    """Beams of a padded batch are copies of their row's layers (reordered, repeated): each row's beams give what
    beam search gives the prompt alone."""
    spec = kvcompress.load_spec(shipped_specs / "kivi-2.yaml")
    model = spec_model("llama")
    prompts, ids, mask = _prompts((70, 45))
    batch, _ = _generate(model, spec, ids, mask, num_beams=3)
    for row, prompt in enumerate(prompts):
        single, _ = _generate(model, spec, prompt[None], num_beams=3)
        assert torch.equal(batch.sequences[row, ids.shape[1] :], single.sequences[0, len(prompt) :])


@pytest.mark.filterwarnings("ignore::kvcompress.hf.cache.RollbackWarning")  # crop is what this tests
def test_batch_operations_on_a_padded_batch(shipped_specs):
    spec = kvcompress.load_spec(shipped_specs / "kivi-4.yaml")
    model = spec_model("llama")
    prompts, ids, mask = _prompts((70, 45))
    cache = kvcompress.cache_for(model, spec)
    with torch.inference_mode():
        model(ids, attention_mask=mask, past_key_values=cache)
    layer = cache.layers[0]
    assert layer.starts == [0, 25] and cache.batch_size == 2 and cache.get_seq_length() == 70
    # held in the batch's positions: the second row's first token is at 25
    assert int(layer.held_positions()[1].max()) == 69 and int(layer.held_positions()[1, 0, 0]) == 25
    # pickling keeps the split layers
    copy = torch.load(io.BytesIO(_saved(cache)), weights_only=False)
    assert copy.layers[0].starts == [0, 25] and copy.nbytes() == cache.nbytes()
    # a repeated row is a copy: changing one leaves the other
    cache.batch_repeat_interleave(2)
    assert cache.batch_size == 4 and cache.layers[0].starts == [0, 0, 25, 25]
    twins = cache.layers[0].rows
    assert twins[0] is not twins[1] and twins[0].tail_keys is not twins[1].tail_keys
    assert torch.equal(twins[0].tail_keys, twins[1].tail_keys)
    cache.batch_select_indices(torch.tensor([1, 2]))
    assert cache.layers[0].starts == [0, 25]
    # crop within the window; not into the padding
    cache.crop(-3)
    assert cache.get_seq_length() == 67 and cache.layers[0].rows[1].seen == 42
    with pytest.raises(KVCompressError, match="into its padding"):
        cache.crop(10)
    cache.reset()
    assert not any(isinstance(layer, PaddedBatchLayer) for layer in cache.layers) and cache.get_seq_length() == 0


def _saved(cache) -> bytes:
    buffer = io.BytesIO()
    torch.save(cache, buffer)
    return buffer.getvalue()


def test_first_real_positions_from_the_mask():
    causal = torch.ones(4, 4, dtype=torch.bool).tril()
    assert first_real_positions(None, 0) is None
    assert first_real_positions(causal.expand(2, 1, 4, 4), 0) == [0, 0]
    padded = causal.expand(2, 1, 4, 4).clone()
    padded[1, :, :, :2] = False
    assert first_real_positions(padded, 0) == [0, 2]
    # a torch fix that un-masks fully masked rows: padded queries see later columns, and are told apart
    fixed = padded.clone()
    fixed[1, :, :2] = True
    assert first_real_positions(fixed, 0) == [0, 2]
    # a sliding window of 2: the first real query still sees back to its sequence's first token
    sliding = padded & ~torch.ones(4, 4, dtype=torch.bool).tril(-2)
    assert first_real_positions(sliding, 0) == [0, 2]
    # an additive mask
    additive = torch.zeros(2, 1, 4, 4).masked_fill(~padded, torch.finfo(torch.float32).min)
    assert first_real_positions(additive, 0) == [0, 2]
    # a forward of padding only, then the one with the first real token (a prompt fed in chunks)
    assert first_real_positions(padded[:, :, :2, :2], 0) == [0, None]
    assert first_real_positions(padded[:, :, 2:], 2) == [0, 2]


def test_a_prompt_fed_in_chunks_from_padding_only(make_float_spec):
    """A chunk of padding only, then real tokens: the sequence's first tokens are held from the forward that
    shows them, and logits equal DynamicCache's."""
    from transformers import DynamicCache

    model = spec_model("llama")
    spec = make_float_spec(window=2, compress_run=1)
    ids = torch.randint(1, 128, (2, 24), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    cache = kvcompress.cache_for(model, spec)
    reference = DynamicCache(config=model.config)
    with torch.no_grad():
        for start, stop in [(0, 3), (3, 9), (9, 10), (10, 24)]:
            logits = model(ids[:, start:stop], attention_mask=mask[:, :stop], past_key_values=cache).logits
            expected = model(ids[:, start:stop], attention_mask=mask[:, :stop], past_key_values=reference).logits
            real = mask[:, start:stop].bool()
            torch.testing.assert_close(logits[real], expected[real], atol=1e-5, rtol=0)
    assert cache.layers[0].starts == [5, 0]
    held = cache.layers[0].held_positions()[0]
    assert held[held >= 0].view(2, -1).tolist() == [list(range(5, 24))] * 2  # both KV heads, from the first real token
