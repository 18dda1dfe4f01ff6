"""The model's dtype (`--dtype` of eval and calibrate): every shipped spec runs a model in bfloat16 and float16,
the cache holds its full-precision tokens (sinks, window, pending) in that dtype, and the bytes it reports follow."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

import kvcompress
from kvcompress.eval.footprint import cache_figures
from kvcompress.eval.runners import BASELINE, Runner
from kvcompress.testing import tiny_model

pytest.importorskip("transformers")
for _module in ("kvcompress_scalar", "kvcompress_qjl", "kvcompress_rvq", "kvcompress_prune"):
    pytest.importorskip(_module, reason="the shipped specs use every plugin: pip install -e plugins/scalar plugins/qjl "
                        "plugins/rvq plugins/prune")

SPECS = sorted((Path(__file__).parent.parent / "specs").glob("*.yaml"))
RVQ_SPECS = [p for p in SPECS if p.name.startswith("rvq")]
# The shipped specs' groups (up to 64 channels) need a head_dim of at least 64; 128 is Qwen2.5's.
HEAD_DIM = 128
TOKENS = 160  # past the 32-token window and a SnapKV window of 64, so tokens are packed and evicted


def _model(arch: str, dtype: torch.dtype, layers: int = 2) -> torch.nn.Module:
    # Gemma-3 as the real one is: sliding layers (here of 96 positions, so they pack tokens too) and full ones.
    kinds = (["sliding_attention", "full_attention"] * layers)[:layers]
    sliding = {"sliding_window": 96, "layer_types": kinds} if arch == "gemma3" else {}
    model = tiny_model(arch, dtype=dtype, head_dim=HEAD_DIM, num_hidden_layers=layers, **sliding)
    model.config._name_or_path = f"/models/tiny-{arch}"  # its codebooks are named after it
    return model


@pytest.fixture(scope="module")
def spec_dir(tmp_path_factory) -> Path:
    """The shipped specs, with the RVQ ones' codebooks calibrated for each tiny model (`{model}` in their path)."""
    from kvcompress.calibrate import calibrate, save

    directory = tmp_path_factory.mktemp("specs")
    for path in SPECS:
        shutil.copy(path, directory / path.name)
    for path in RVQ_SPECS:  # codebooks learned in seconds: a short k-means is enough to read them back
        data = yaml.safe_load(path.read_text())
        for role in ("keys", "values"):
            data[role]["codebook"].update(samples=1024, iterations=1, ema_epochs=0)
        (directory / path.name).write_text(yaml.safe_dump(data))

    for arch in ("llama", "gemma3"):
        model = _model(arch, torch.bfloat16)
        ids = torch.randint(0, 128, (2048,), generator=torch.Generator().manual_seed(3))
        for path in RVQ_SPECS:
            spec = kvcompress.load_spec(directory / path.name)
            tensors, metadata = calibrate(spec, model, ids, tokens=2048, context=512, progress=False)
            save(directory / "codebooks" / f"tiny-{arch}-{spec.name}.safetensors", tensors, metadata)
    return directory


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
def test_every_shipped_spec_runs_the_model_in_its_dtype(spec_dir, name, arch, dtype):
    spec = kvcompress.load_spec(spec_dir / name)
    ids = torch.randint(0, 128, (1, TOKENS), generator=torch.Generator().manual_seed(0))
    layers = max(2, spec.min_layers())  # the tuned specs override layers up to 29
    narrow_model, wide_model = _model(arch, dtype, layers), _model(arch, torch.float32, layers)
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

    model = _model("gemma3", torch.float32)
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(torch.randint(0, 128, (1, TOKENS)), past_key_values=cache)
    figures = cache_figures(model, cache)
    assert figures["bits_per_element"] == figures["key_bits"] == 32.0
    # the full layer holds all 160 tokens, the sliding one its last 95 (window 96): 4 bytes, 2 roles, 2 heads
    assert figures["cache_bytes"] == (TOKENS + 95) * 4 * 2 * 2 * HEAD_DIM < 2 * figures["fp16_bytes"]


def test_the_reported_bytes_follow_the_dtype(spec_dir):
    """The same tokens through kivi-4: the window's bytes halve from float32 to bfloat16, the packed ones do not
    change; the baseline's DynamicCache holds the model's dtype (32 or 16 bits per element)."""
    spec = kvcompress.load_spec(spec_dir / "kivi-4.yaml")
    ids = torch.randint(0, 128, (1, TOKENS), generator=torch.Generator().manual_seed(1))
    figures = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = _model("llama", dtype)
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
