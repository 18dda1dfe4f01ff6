"""CompressedCache: window, sinks and blocks, bytes held, bit accounting, batch operations, KIVI-2 at 4096."""

from __future__ import annotations

from typing import Literal

import pytest
import torch
from pydantic import Field
from transformers import DynamicCache

import kvcompress
from kvcompress import MethodSpec, QuantizerMethod, Registry, hookimpl
from kvcompress.hf.cache import CompressedCache, CompressedLayer
from kvcompress.runtime import Quantizer
from kvcompress.store import GROWTH
from kvcompress.state import PackedState, reachable_tensors, storage_nbytes


class BlockFloatSpec(MethodSpec):
    """Test quantizer: float32 storage, but tokens are taken in blocks, like KIVI's per-channel keys."""

    method: Literal["blockfloat"] = "blockfloat"
    block: int = Field(4, ge=1, description="Tokens per encode block.")


class BlockFloat(Quantizer):
    def __init__(self, block: int):
        self.token_block = block
        # A constant it holds without listing it in constants(): the cache must count it anyway.
        self.table = torch.zeros(8, dtype=torch.float32)

    def encode(self, x: torch.Tensor) -> PackedState:
        assert x.shape[2] % self.token_block == 0
        rows = x.shape[2] // self.token_block
        packed = x.float().reshape(x.shape[0], x.shape[1], rows, self.token_block * x.shape[3]).contiguous()
        return PackedState({"x": packed}, x.shape[2], x.shape[3], x.dtype)

    def decode(self, state: PackedState) -> torch.Tensor:
        x = state.tensors["x"]
        return x.reshape(x.shape[0], x.shape[1], state.tokens, state.head_dim).to(state.dtype)

    def bits_per_element(self, head_dim: int) -> float:
        return 32.0


class BlockFloatPlugin:
    @hookimpl
    def kvcompress_quantizers(self):
        return [QuantizerMethod(name="blockfloat", spec=BlockFloatSpec, factory=lambda spec, ctx: BlockFloat(spec.block))]


@pytest.fixture
def block_registry() -> Registry:
    registry = Registry(entry_points=False)
    registry.register(BlockFloatPlugin(), "blockfloat-plugin")
    return registry


def kivi2_spec(window: int = 32, value_group: int = 32) -> dict:
    return {
        "name": "kivi-2",
        "window": window,
        "keys": {"quantizer": {"method": "scalar", "bits": 2, "axis": "channel", "group": 32}},
        "values": {"quantizer": {"method": "scalar", "bits": 2, "axis": "token", "group": value_group}},
    }


def test_tokens_leave_the_window_in_whole_blocks(make_model, block_registry):
    """sinks fill first; the tail keeps >= window tokens and compresses whole blocks; order is kept exactly."""
    window, sinks, block = 3, 2, 4
    spec = {
        "name": "blocks",
        "window": window,
        "sinks": sinks,
        "compress_run": 1,
        "keys": {"quantizer": {"method": "blockfloat", "block": block}},
        "values": {"quantizer": {"method": "float", "dtype": "float32"}},
    }
    model = make_model("llama")
    ids = torch.randint(0, 128, (1, 30), generator=torch.Generator().manual_seed(0))
    cache = kvcompress.cache_for(model, spec, registry=block_registry)
    reference = DynamicCache(config=model.config)
    assert all(layer.codecs.token_block == block for layer in cache.layers)
    with torch.no_grad():
        for start, stop in [(0, 7)] + [(i, i + 1) for i in range(7, 30)]:
            logits = model(ids[:, start:stop], past_key_values=cache).logits
            expected = model(ids[:, start:stop], past_key_values=reference).logits
            torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
            for layer in cache.layers:
                assert layer.sink_tokens == min(sinks, stop)
                assert layer.compressed_tokens % block == 0
                if layer.compressed_tokens:
                    assert window <= layer.tail_tokens < window + block
                assert layer.sink_tokens + layer.compressed_tokens + layer.tail_tokens == stop == layer.get_seq_length()
    assert cache.get_seq_length() == 30
    assert cache.compressed_tokens() == 2 * 24  # 30 - 2 sinks - 4 in the tail, per layer
    assert cache.nbytes()["constants"] == 2 * 32  # each layer's key quantizer table
    assert storage_nbytes(reachable_tensors(cache)) == cache.nbytes()["total"]


def test_reported_bytes_are_the_bytes_of_every_tensor_held(make_model):
    """Walk every tensor reachable from the cache: their storages add up to nbytes()['total'], nothing twice."""
    model = make_model("qwen3", dtype=torch.float16)
    spec = kivi2_spec(window=8, value_group=16)
    spec["sinks"] = 2
    cache = kvcompress.cache_for(model, spec)
    ids = torch.randint(0, 128, (2, 90), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model.generate(ids, max_new_tokens=5, do_sample=False, past_key_values=cache)
    held = cache.nbytes()
    assert held["keys"] > 0 and held["values"] > 0 and held["window"] > 0
    assert held["total"] == held["keys"] + held["values"] + held["window"] + held["index"] + held["constants"]
    tensors = reachable_tensors(cache)
    assert storage_nbytes(tensors) == held["total"]
    # No tensor is a view into a larger buffer: each one's bytes are its whole storage.
    assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in tensors)
    # The window is sinks + tail in fp16, both roles: 2 sinks and 8..8+31 tail tokens per layer.
    for layer in cache.layers:
        assert layer.sink_tokens == 2 and 8 <= layer.tail_tokens < 8 + 32
    window_tokens = sum(layer.sink_tokens + layer.tail_tokens for layer in cache.layers)
    assert held["window"] == window_tokens * 2 * 2 * 2 * 16 * 2  # tokens x batch x heads x head_dim x roles x fp16


@pytest.mark.parametrize("dtype,bits", [("float16", 16.0), ("float32", 32.0)])
def test_bits_per_element_of_float_storage(make_model, make_float_spec, dtype, bits):
    model = make_model("llama")
    cache = kvcompress.cache_for(model, make_float_spec(dtype, window=4))
    assert cache.bits_per_element() is None  # nothing compressed yet
    with torch.no_grad():
        model(torch.randint(0, 128, (3, 20)), past_key_values=cache)
    assert cache.compressed_tokens() == 2 * 16
    assert cache.bits_per_element() == cache.key_bits() == cache.value_bits() == bits


def test_kivi2_at_4096_tokens_holds_under_a_fifth_of_fp16(make_model):
    """The issue's check: 4096 tokens, window 32; everything held (window, constants) counts."""
    model = make_model("llama", dtype=torch.bfloat16, head_dim=32)
    cache = kvcompress.cache_for(model, kivi2_spec(window=32))
    ids = torch.randint(0, 128, (1, 4090), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=7, do_sample=False, past_key_values=cache)
    # The cache holds every token but the last one generated: 4096.
    assert out.shape[1] == 4097 and cache.get_seq_length() == 4096
    summary = cache.summary()
    assert summary["fp16_nbytes"] == 2 * 2 * 4096 * 2 * 32 * 2  # roles x layers x tokens x kv heads x head_dim x bytes
    # Per layer: 4064 tokens packed at 3 bits, the newest 32 in bf16.
    assert summary["compressed_tokens"] == 2 * 4064
    # Per role: the packed rows (2 layers x 4064 tokens x 2 heads x 32 dims at 3 bits) and the stores' growth
    # headroom: at most GROWTH times that, plus a page (32 tokens) per layer.
    payload = 2 * 4064 * 2 * 32 * 3 // 8
    page = 32 * 2 * 32 * 3 // 8
    for role in ("keys", "values"):
        assert payload <= summary["nbytes"][role] <= payload * GROWTH + 2 * page, summary
    # Everything held, the 32-token bf16 window and the headroom included, is under 0.22 of an fp16 cache.
    assert summary["nbytes"]["total"] <= 0.22 * summary["fp16_nbytes"], summary
    # KIVI-2 with groups of 32: 2-bit codes plus an fp16 scale and minimum per group = 3 bits per element.
    assert summary["key_bits"] == summary["value_bits"] == 3.0
    assert storage_nbytes(reachable_tensors(cache)) == summary["nbytes"]["total"]


def test_batch_operations_follow_the_batch_dimension(make_model, make_float_spec):
    model = make_model("mistral")
    ids = torch.randint(0, 128, (3, 14), generator=torch.Generator().manual_seed(3))
    cache = kvcompress.cache_for(model, make_float_spec(window=3, sinks=1))
    with torch.no_grad():
        model(ids, past_key_values=cache)
    layer: CompressedLayer = cache.layers[0]
    before = (layer.sink_keys.clone(), layer.key_store.view().tensors["x"].clone(), layer.tail_values.clone())

    cache.reorder_cache(torch.tensor([2, 0, 1]))
    assert torch.equal(layer.sink_keys, before[0][[2, 0, 1]])
    assert torch.equal(layer.key_store.view().tensors["x"], before[1][[2, 0, 1]])
    cache.batch_select_indices(torch.tensor([1, 2]))  # rows 0 and 1 of the original
    assert torch.equal(layer.tail_values, before[2][[0, 1]])
    cache.batch_repeat_interleave(2)
    assert torch.equal(layer.key_store.view().tensors["x"], before[1][[0, 0, 1, 1]])
    assert cache.batch_size == 4
    assert storage_nbytes(reachable_tensors(cache)) == cache.nbytes()["total"]


@pytest.mark.filterwarnings("ignore::kvcompress.hf.cache.RollbackWarning")  # rollbacks are what these test
def test_crop_inside_the_window_and_refusal_beyond_it(make_model, make_float_spec):
    from kvcompress.hf.cache import RollbackWarning

    model = make_model("llama")
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(4))
    cache = kvcompress.cache_for(model, make_float_spec(window=4))
    with torch.no_grad():
        model(ids, past_key_values=cache)
    with pytest.warns(RollbackWarning, match="can differ from plain decoding"):
        cache.crop(-3)
    assert cache.get_seq_length() == 9 and cache.layers[0].tail_tokens == 1
    cache.crop(8)  # transformers < 5.18 form: the length to keep
    assert cache.get_seq_length() == 8 and cache.layers[0].tail_tokens == 0
    with pytest.raises(kvcompress.KVCompressError, match="window of at least 2"):
        cache.crop(-2)
    # After a crop, decoding continues from the right positions.
    reference = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids[:, :8], past_key_values=reference)
        expected = model(ids[:, 8:10], past_key_values=reference).logits
        logits = model(ids[:, 8:10], past_key_values=cache).logits
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


def test_reset_empties_the_cache(make_model, make_float_spec):
    model = make_model("llama")
    cache = kvcompress.cache_for(model, make_float_spec(window=2))
    with torch.no_grad():
        model(torch.randint(0, 128, (1, 9)), past_key_values=cache)
        cache.reset()
        assert cache.get_seq_length() == 0 and cache.nbytes()["total"] == 0
        model(torch.randint(0, 128, (1, 5)), past_key_values=cache)
    assert cache.get_seq_length() == 5


def test_per_layer_overrides_reach_the_layers(make_model, make_float_spec):
    spec = make_float_spec(window=2)
    spec["layers"] = {"1": {"window": 5, "sinks": 1, "values": {"quantizer": {"method": "float", "dtype": "float16"}}}}
    model = make_model("llama")
    cache = kvcompress.cache_for(model, spec)
    with torch.no_grad():
        model(torch.randint(0, 128, (1, 12)), past_key_values=cache)
    first, second = cache.layers
    assert (first.codecs.window, first.codecs.sinks, first.tail_tokens, first.compressed_tokens) == (2, 0, 2, 10)
    assert (second.codecs.window, second.codecs.sinks, second.tail_tokens, second.compressed_tokens) == (5, 1, 5, 6)
    assert first.value_store.view().tensors["x"].dtype == torch.float32
    assert second.value_store.view().tensors["x"].dtype == torch.float16


def test_cache_on_an_unpatched_model_fails_with_the_fix(make_model, make_float_spec):
    patched, plain = make_model("llama"), make_model("llama")
    cache = kvcompress.cache_for(patched, make_float_spec())
    with pytest.raises(kvcompress.KVCompressError, match="kvcompress.cache_for"):
        plain(torch.randint(0, 128, (1, 4)), past_key_values=cache)
    built = CompressedCache(make_float_spec(), plain.config)
    with pytest.raises(kvcompress.KVCompressError, match="kvcompress.patch"):
        plain(torch.randint(0, 128, (1, 4)), past_key_values=built)


def test_switching_attention_away_on_a_patched_model_is_caught(make_model, make_float_spec):
    model = make_model("llama")
    cache = kvcompress.cache_for(model, make_float_spec())
    model.set_attn_implementation("sdpa")
    with pytest.raises(kvcompress.KVCompressError, match="attention was not kvcompress"):
        with torch.no_grad():
            model(torch.randint(0, 128, (1, 4)), past_key_values=cache)


def test_cache_built_for_another_shape_refuses_tokens(make_model, make_float_spec):
    model = make_model("llama")
    other = make_model("llama", head_dim=8)
    cache = kvcompress.patch(model, make_float_spec()).cache()
    foreign = CompressedCache(make_float_spec(), other.config)
    with pytest.raises(kvcompress.KVCompressError, match="build the cache from this model's config"):
        model(torch.randint(0, 128, (1, 4)), past_key_values=foreign)
    assert cache.get_seq_length() == 0


@pytest.mark.parametrize("exact", [False, True])
def test_exact_new_tokens_keeps_logits_exact_with_sinks_and_blocks(make_model, block_registry, exact):
    """Float storage is exact either way: the column re-indexing of the exact mode loses nothing, whether the
    new tokens sit in the sinks, the packed middle (prefill) or the tail."""
    spec = {
        "name": "blocks",
        "window": 2,
        "sinks": 3,
        "compress_run": 1,
        "keys": {"quantizer": {"method": "blockfloat", "block": 4}},
        "values": {"quantizer": {"method": "float", "dtype": "float32"}},
    }
    model = make_model("gemma2")
    ids = torch.randint(1, 128, (2, 24), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    cache = kvcompress.cache_for(model, spec, registry=block_registry, exact_new_tokens=exact)
    reference = DynamicCache(config=model.config)
    with torch.no_grad():
        for start, stop in [(0, 2), (2, 13), (13, 14), (14, 15), (15, 21), (21, 22)]:
            logits = model(ids[:, start:stop], attention_mask=mask[:, :stop], past_key_values=cache).logits
            expected = model(ids[:, start:stop], attention_mask=mask[:, :stop], past_key_values=reference).logits
            torch.testing.assert_close(logits[mask[:, start:stop].bool()], expected[mask[:, start:stop].bool()], atol=1e-5, rtol=0)
    assert cache.compressed_tokens() == 2 * 16


def test_exact_new_tokens_reads_history_compressed_and_the_new_tokens_exactly(make_model):
    """KIVI-2, window 0: a prefill equals the uncompressed model; the next step reads the packed prompt."""
    model = make_model("llama", head_dim=32)
    spec = kivi2_spec(window=0)
    ids = torch.randint(0, 128, (1, 65), generator=torch.Generator().manual_seed(6))
    reference = DynamicCache(config=model.config)
    exact = kvcompress.cache_for(model, spec, exact_new_tokens=True)
    held = kvcompress.cache_for(model, spec, exact_new_tokens=False)
    with torch.no_grad():
        expected = model(ids[:, :64], past_key_values=reference).logits
        torch.testing.assert_close(model(ids[:, :64], past_key_values=exact).logits, expected, atol=1e-5, rtol=0)
        assert (model(ids[:, :64], past_key_values=held).logits - expected).abs().max() > 1e-3
        assert exact.compressed_tokens() == held.compressed_tokens() == 2 * 64
        step_expected = model(ids[:, 64:], past_key_values=reference).logits
        step_exact = model(ids[:, 64:], past_key_values=exact).logits
    assert (step_exact - step_expected).abs().max() > 1e-3  # the history is read from 2-bit state


@pytest.mark.filterwarnings("ignore::kvcompress.hf.cache.RollbackWarning")  # rollbacks are what these test
def test_positions_follow_crop_beam_reorder_and_batch_selection(make_model, make_float_spec):
    model = make_model("llama")
    cache = kvcompress.cache_for(model, make_float_spec(window=4, sinks=2))
    ids = torch.randint(0, 128, (3, 15), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        model(ids, past_key_values=cache)
    layer = cache.layers[0]
    assert torch.equal(layer.held_positions(), torch.arange(15).expand(3, 2, 15))
    cache.crop(-3)
    assert cache.get_seq_length() == 12 and torch.equal(layer.held_positions(), torch.arange(12).expand(3, 2, 12))
    cache.reorder_cache(torch.tensor([2, 2, 0]))
    cache.batch_select_indices(torch.tensor([0, 2]))
    assert torch.equal(layer.held_positions(), torch.arange(12).expand(2, 2, 12))
    with torch.no_grad():
        model(ids[[2, 0], 12:13], past_key_values=cache)
    assert cache.get_seq_length() == 13 and torch.equal(layer.held_positions(), torch.arange(13).expand(2, 2, 13))


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_after_selecting_tokens_attention_reads_the_kept_ones_at_their_positions(arch, make_model, make_float_spec):
    """Drop packed tokens from every layer's stores (what eviction will do): the layer holds fewer tokens than it
    has seen, the sequence length and new positions stay right, and the next logits equal a DynamicCache run whose
    attention mask hides the dropped positions. (gemma2's sliding window is made longer than the sequence, so that
    its sliding layer frees nothing itself: tests/test_sliding.py covers that.)"""
    model = make_model(arch, **({"sliding_window": 64} if arch == "gemma2" else {}))
    cache = kvcompress.cache_for(model, make_float_spec(window=3, sinks=1))
    ids = torch.randint(1, 128, (2, 24), generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        model(ids[:, :20], past_key_values=cache)
    layer = cache.layers[0]
    assert (layer.sink_tokens, layer.compressed_tokens, layer.tail_tokens) == (1, 16, 3)
    keep = torch.tensor([0, 1, 2, 6, 7, 11, 12, 13, 14, 15])  # packed token indices: positions 1-3, 7-8, 12-16
    dropped = [4, 5, 6, 9, 10, 11]
    for each in cache.layers:
        for store in (each.key_store, each.value_store):
            store.select(keep.expand(2, 2, -1))
    held = layer.held_positions()
    assert cache.get_seq_length() == 20 and held.shape[-1] == 14
    assert held[0, 0].tolist() == [0, 1, 2, 3, 7, 8, 12, 13, 14, 15, 16, 17, 18, 19]
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[:, dropped] = 0
    reference = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids[:, :20], past_key_values=reference)
        for stop in (21, 22, 24):
            start = cache.get_seq_length()
            expected = model(ids[:, start:stop], attention_mask=mask[:, :stop], past_key_values=reference).logits
            got = model(ids[:, start:stop], attention_mask=mask[:, :stop], past_key_values=cache).logits
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert cache.get_seq_length() == 24


def test_a_filled_cache_survives_torch_save_and_load(make_model):
    """torch.save pickles the cache (its spec, codecs and stores); the loaded one continues exactly."""
    import io

    pytest.importorskip("kvcompress_scalar")
    model = make_model("llama", head_dim=32)
    cache = kvcompress.cache_for(model, kivi2_spec(window=8))
    ids = torch.randint(0, 128, (1, 70), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        buffer = io.BytesIO()
        torch.save(cache, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        assert loaded.nbytes() == cache.nbytes() and loaded.get_seq_length() == 70
        step = torch.tensor([[5]])
        want = model(input_ids=step, past_key_values=cache, use_cache=True).logits
        got = model(input_ids=step, past_key_values=loaded, use_cache=True).logits
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("window, prompt, chunk", [(32, 20, 1), (32, 17, 4), (32, 47, 1), (500, 256, 16), (40, 30, 16)])
def test_a_tail_shorter_than_the_window_keeps_every_token(make_model, make_float_spec, window, prompt, chunk):
    """A tail between `window - run` and `window` tokens lost its oldest tokens (floor division of a negative
    excess sliced it from the end): a 20-token prompt under window 32 dropped 4, silently."""
    model = make_model("llama")
    spec = kvcompress.parse_spec(make_float_spec(window=window, compress_run=16))
    ids = torch.randint(0, 128, (1, prompt + 3 * chunk), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        reference = DynamicCache(config=model.config)
        want = [model(input_ids=ids[:, :prompt], past_key_values=reference).logits]
        with kvcompress.patch(model, spec) as patched:
            cache = patched.cache()
            got = [model(input_ids=ids[:, :prompt], past_key_values=cache).logits]
            for start in range(prompt, ids.shape[1], chunk):
                want.append(model(input_ids=ids[:, start : start + chunk], past_key_values=reference).logits)
                got.append(model(input_ids=ids[:, start : start + chunk], past_key_values=cache).logits)
                layer = cache.layers[0]
                assert layer.sink_tokens + layer.compressed_tokens + layer.tail_tokens == layer.seen
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
