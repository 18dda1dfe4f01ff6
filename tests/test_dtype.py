"""The model's dtype (`--dtype` of eval and calibrate): every shipped spec runs a model in bfloat16 and float16,
the cache holds its full-precision tokens (sinks, window, pending) in that dtype, and the bytes it reports follow."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import kvcompress
from kvcompress.eval.footprint import cache_figures
from kvcompress.eval.runners import BASELINE, Runner
from kvcompress.testing import spec_model

pytest.importorskip("transformers")
for _module in ("kvcompress_scalar", "kvcompress_qjl", "kvcompress_rvq", "kvcompress_prune"):
    pytest.importorskip(_module, reason="the shipped specs use every plugin: pip install -e plugins/scalar plugins/qjl "
                        "plugins/rvq plugins/prune")

SPECS = sorted((Path(__file__).parent.parent / "specs").glob("*.yaml"))
HEAD_DIM = 128  # kvcompress.testing.spec_model's head size
TOKENS = 160  # past the 32-token window and a SnapKV window of 64, so tokens are packed and evicted


def _last_logits(model: torch.nn.Module, spec: kvcompress.CacheSpec, ids: torch.Tensor) -> tuple[torch.Tensor, object]:
    """A prompt, then 8 tokens decoded one by one (they read the packed tokens): the last logits and the cache."""
    with torch.inference_mode(), kvcompress.patch(model, spec) as patched:
        cache = patched.cache()
        model(ids[:, :-8], past_key_values=cache)
        for position in range(ids.shape[1] - 8, ids.shape[1]):
            logits = model(ids[:, position : position + 1], past_key_values=cache).logits[0, -1].float()
    return logits, cache


@pytest.mark.parametrize("arch,dtype", [("llama", torch.bfloat16), ("gemma3", torch.bfloat16), ("llama", torch.float16)],
                         ids=str)
@pytest.mark.parametrize("name", [p.name for p in SPECS])
def test_every_shipped_spec_runs_the_model_in_its_dtype(shipped_specs, name, arch, dtype):
    spec = kvcompress.load_spec(shipped_specs / name)
    ids = torch.randint(0, 128, (1, TOKENS), generator=torch.Generator().manual_seed(0))
    layers = max(2, spec.min_layers())  # the tuned specs override layers up to 29
    narrow_model, wide_model = spec_model(arch, dtype, layers), spec_model(arch, torch.float32, layers)
    wide, _ = _last_logits(wide_model, spec, ids)
    logits, cache = _last_logits(narrow_model, spec, ids)
    assert torch.isfinite(logits).all()
    # The same weights and spec in float32: 16-bit rounding moves the logits (3 % on the tiny Gemma without a cache,
    # more through 30 random layers) and flips some quantization codes; a read path that mixed dtypes wrongly would
    # be off by their whole size.
    with torch.inference_mode():
        dense = [m(ids).logits[0, -1].float() for m in (narrow_model, wide_model)]
    drift = ((dense[0] - dense[1]).norm() / dense[1].norm()).item()
    assert (logits - wide).norm() <= (0.3 + 3 * drift) * wide.norm(), ((logits - wide).norm() / wide.norm()).item()
    assert cache.compressed_tokens() > 0
    window = 0
    for layer in cache.layers:
        for tensor in (layer.sink_keys, layer.sink_values, layer.tail_keys, layer.tail_values):
            assert tensor.dtype == dtype
            window += tensor.numel() * 2  # bytes of a 16-bit element
    assert cache.nbytes()["window"] == window


def test_a_sliding_window_baseline_reports_its_dtype_bits_and_the_bytes_it_holds():
    """Gemma-3's DynamicCache keeps only the window on sliding layers: fewer bytes, still 32 bits per element."""
    from transformers import DynamicCache

    model = spec_model("gemma3", torch.float32)
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(torch.randint(0, 128, (1, TOKENS)), past_key_values=cache)
    figures = cache_figures(model, cache)
    assert figures["bits_per_element"] == figures["key_bits"] == 32.0
    # the full layer holds all 160 tokens, the sliding one its last 95 (window 96): 4 bytes, 2 roles, 2 heads
    assert figures["cache_bytes"] == (TOKENS + 95) * 4 * 2 * 2 * HEAD_DIM < 2 * figures["fp16_bytes"]


def test_the_reported_bytes_follow_the_dtype(shipped_specs):
    """The same tokens through kivi-4: the window's bytes halve from float32 to bfloat16, the packed ones do not
    change; the baseline's DynamicCache holds the model's dtype (32 or 16 bits per element)."""
    spec = kvcompress.load_spec(shipped_specs / "kivi-4.yaml")
    ids = torch.randint(0, 128, (1, TOKENS), generator=torch.Generator().manual_seed(1))
    figures = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = spec_model("llama", dtype)
        for runner in (Runner(BASELINE, None), Runner("kivi-4", spec)):
            with runner.session(model) as new_cache, torch.inference_mode():
                cache = new_cache()
                model(ids, past_key_values=cache)
                held = cache.nbytes() if hasattr(cache, "nbytes") else None
                figures[dtype, runner.name] = (cache_figures(model, cache), held)
    assert figures[torch.float32, BASELINE][0]["bits_per_element"] == 32.0
    assert figures[torch.bfloat16, BASELINE][0]["bits_per_element"] == 16.0
    assert figures[torch.bfloat16, BASELINE][0]["cache_bytes"] == figures[torch.bfloat16, BASELINE][0]["fp16_bytes"]
    wide, narrow = figures[torch.float32, "kivi-4"][1], figures[torch.bfloat16, "kivi-4"][1]
    assert wide["window"] == 2 * narrow["window"] > 0
    assert (wide["keys"], wide["values"]) == (narrow["keys"], narrow["values"])
    assert figures[torch.float32, "kivi-4"][0]["bits_per_element"] == figures[torch.bfloat16, "kivi-4"][0]["bits_per_element"]
