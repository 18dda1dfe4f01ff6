"""kvcompress calibrate: keys/values collected from a model, codebooks learned per layer and role, written as
safetensors that the spec's codebook stage reads back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from kvcompress import KVCompressError, SpecError, load_spec
from kvcompress.calibrate import calibrate, save
from kvcompress.cli import main
from kvcompress.pipeline import build_codecs

pytest.importorskip("kvcompress_rvq", reason="calibration tests learn rvq codebooks (kvcompress-rvq)")

LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 16


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, max_position_embeddings=512,
    )
    model = LlamaForCausalLM(config).eval()
    model.config._name_or_path = "/somewhere/tiny-llama"
    return model


def token_ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 96, (n,), generator=torch.Generator().manual_seed(seed))


def write_spec(directory: Path, depth: int = 2, sinks: int = 0, **stages: dict) -> Path:
    def role(layout: str) -> dict:
        return {
            "quantizer": {"method": "rvq", "depth": depth, "codebook_size": 16, "group": 8, "layout": layout},
            "estimator": {"method": "rvq-lut"},
            "codebook": {"method": "kmeans", "path": "books/tiny.safetensors", "samples": 400, "iterations": 3},
            **stages,
        }

    path = directory / "tiny.yaml"
    path.write_text(yaml.safe_dump({"name": "tiny", "sinks": sinks, "keys": role("strided"), "values": role("contiguous")}))
    return path


def test_collect_reads_what_the_cache_stores_minus_skipped_sinks():
    from transformers import DynamicCache

    from kvcompress.hf.collect import collect_kv

    model, ids = tiny_llama(), token_ids(128)
    collected = collect_kv(model, ids, tokens=100, context=64, skip=4, progress=False)
    assert len(collected) == LAYERS
    keys, values = collected[1]
    assert keys.shape == values.shape == (100, KV_HEADS, HEAD_DIM) and keys.dtype == torch.float32
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=ids[:64].unsqueeze(0), past_key_values=cache, use_cache=True)
    torch.testing.assert_close(keys[:60], cache.layers[1].keys[0, :, 4:].transpose(0, 1))
    torch.testing.assert_close(values[60:100], _window_values(model, ids[64:128])[4:44])


def test_collect_reads_every_position_of_sliding_window_layers():
    """Gemma-3's sliding layers keep only their window in a DynamicCache built from its config; calibration
    wants every position, and they are the keys that cache would hold."""
    from transformers import DynamicCache

    from kvcompress.hf.collect import collect_kv
    from kvcompress.testing import tiny_model

    model = tiny_model("gemma3")  # layer 0 slides over 6 positions
    ids = token_ids(64) % 128
    keys, _ = collect_kv(model, ids, tokens=64, context=64, progress=False)[0]
    assert keys.shape[0] == 64
    windowed = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=ids.unsqueeze(0), past_key_values=windowed, use_cache=True)
    held = windowed.layers[0].keys[0].transpose(0, 1)
    assert held.shape[0] < 64
    torch.testing.assert_close(keys[-held.shape[0] :], held)


def _window_values(model, ids):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=ids.unsqueeze(0), past_key_values=cache, use_cache=True)
    return cache.layers[1].values[0].transpose(0, 1)


def test_calibrated_file_builds_the_spec_codecs(tmp_path):
    spec = load_spec(write_spec(tmp_path))
    model = tiny_llama()
    tensors, metadata = calibrate(spec, model, token_ids(512), tokens=300, context=128, progress=False)
    assert sorted(tensors) == [f"layers.{i}.{r}.codewords" for i in range(LAYERS) for r in ("keys", "values")]
    assert metadata["model"] == "/somewhere/tiny-llama" and metadata["num_layers"] == str(LAYERS)
    entries = json.loads(metadata["entries"])
    assert entries["1.values"]["quantizer"]["layout"] == "contiguous"
    out = tmp_path / "books" / "tiny.safetensors"
    save(out, tensors, metadata)
    codecs = build_codecs(spec, LAYERS, HEAD_DIM, KV_HEADS, model="/elsewhere/tiny-llama")
    # checked against a config as eval and validate --model do: the model it was loaded from, not the CLI name
    from kvcompress.hf.cache import check_spec

    check_spec(spec, model.config)
    model.config._name_or_path = "/models/smollm2"
    with pytest.raises(SpecError, match="calibrated for model"):
        check_spec(spec, model.config)
    x = torch.randn(1, KV_HEADS, 10, HEAD_DIM)
    state = codecs[1].keys.encode(x)
    assert state.nbytes() * 8 / x.numel() == (2 * 2 * 4 + 16) / HEAD_DIM
    assert torch.isfinite(codecs[1].keys.decode(state)).all()
    # the same file refuses another model, and a spec whose quantizer changed
    with pytest.raises(KVCompressError, match="calibrated for model"):
        build_codecs(spec, LAYERS, HEAD_DIM, KV_HEADS, model="/models/smollm2")
    with pytest.raises(SpecError, match="keys.quantizer: .*learned for another rvq quantizer: depth 2 \\(spec: 3\\)"):
        build_codecs(load_spec(write_spec(tmp_path, depth=3)), LAYERS, HEAD_DIM, KV_HEADS)


def test_codebooks_are_learned_after_the_pipelines_transform_and_only_serve_it(tmp_path):
    pytest.importorskip("kvcompress_scalar", reason="the hadamard transform is kvcompress-scalar's")
    from kvcompress.hf.collect import collect_kv
    from kvcompress.methods import LayerContext
    from kvcompress.plugins import get_registry
    from kvcompress_scalar.quantizers import HadamardTransform

    hadamard = {"method": "hadamard", "seed": 5}
    spec = load_spec(write_spec(tmp_path, transform=hadamard))
    model, ids = tiny_llama(), token_ids(512)
    tensors, metadata = calibrate(spec, model, ids, tokens=300, context=128, progress=False)
    assert json.loads(metadata["entries"])["1.keys"]["transform"] == hadamard
    # the same learner on keys rotated by hand: the file holds exactly what it learns
    keys = collect_kv(model, ids, tokens=300, context=128, progress=False)[1][0]
    rotation = HadamardTransform(head_dim=HEAD_DIM, seed=5, layer=1)
    rotated = rotation.forward(keys.transpose(0, 1).unsqueeze(0))[0].transpose(0, 1).reshape(-1, HEAD_DIM)
    ctx = LayerContext(layer=1, num_layers=LAYERS, role="keys", head_dim=HEAD_DIM, kv_heads=KV_HEADS)
    by_hand = get_registry().get("codebook", "kmeans").learn(spec.keys.codebook, spec.keys.quantizer, rotated, ctx)
    torch.testing.assert_close(tensors["layers.1.keys.codewords"], by_hand["codewords"])
    save(tmp_path / "books" / "tiny.safetensors", tensors, metadata)
    build_codecs(spec, LAYERS, HEAD_DIM, KV_HEADS)
    # the file refuses a pipeline without the transform, or with another seed
    with pytest.raises(KVCompressError, match="learned after transform .*'seed': 5.*but the spec's pipeline applies None"):
        build_codecs(load_spec(write_spec(tmp_path)), LAYERS, HEAD_DIM, KV_HEADS)
    with pytest.raises(KVCompressError, match="learned after transform"):
        build_codecs(load_spec(write_spec(tmp_path, transform={"method": "hadamard", "seed": 6})), LAYERS, HEAD_DIM, KV_HEADS)


def test_a_pruner_before_a_codebook_is_refused_at_validation(tmp_path):
    pytest.importorskip("kvcompress_prune", reason="think is kvcompress-prune's")
    with pytest.raises(SpecError, match="keys.codebook: pruner 'think' stores the channels it selects"):
        load_spec(write_spec(tmp_path, pruner={"method": "think", "ratio": 0.5}))


def test_a_spec_without_learners_is_refused(tmp_path):
    path = tmp_path / "plain.yaml"
    path.write_text(yaml.safe_dump({"name": "plain", "keys": {"quantizer": {"method": "float"}}, "values": {"quantizer": {"method": "float"}}}))
    with pytest.raises(KVCompressError, match="no codebook stage with a learner"):
        calibrate(load_spec(path), tiny_llama(), token_ids(256), tokens=64, context=64, progress=False)


def test_too_little_text_names_the_fix(tmp_path):
    with pytest.raises(KVCompressError, match="needs 5 windows of 64 tokens.*the text has 100"):
        calibrate(load_spec(write_spec(tmp_path)), tiny_llama(), token_ids(100), tokens=300, context=64, progress=False)


def test_cli_reports_a_bad_spec_before_loading_a_model(tmp_path, capsys):
    assert main(["calibrate", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "cannot read the spec file" in capsys.readouterr().err


@pytest.mark.slow
def test_calibrate_the_default_model_and_error_falls_with_depth(tmp_path):
    from kvcompress.calibrate import calibration_text
    from kvcompress.hf.collect import collect_kv
    from kvcompress.hf.loading import load_model
    from kvcompress.testing import relative_error
    from kvcompress_rvq.quantizer import Grouping, RVQQuantizer

    spec_path = tmp_path / "small.yaml"
    role = {
        "quantizer": {"method": "rvq", "depth": 4, "codebook_size": 64, "group": 32, "layout": "strided"},
        "codebook": {"method": "kmeans", "path": "small.safetensors", "samples": 768, "iterations": 3},
    }
    spec_path.write_text(yaml.safe_dump({"name": "small", "keys": role, "values": {**role, "estimator": {"method": "rvq-lut"}}}))
    out = tmp_path / "small.safetensors"
    assert main(["calibrate", str(spec_path), "--out", str(out), "--tokens", "256", "--context", "256", "--quiet"]) == 0
    model, tokenizer = load_model()
    codecs = build_codecs(load_spec(spec_path), 30, 64, 3, model=model.config._name_or_path)
    # real keys from text the codebooks never saw: every level lowers the error
    text, _ = calibration_text(None)
    ids = tokenizer(text[-20000:], add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    keys = collect_kv(model, ids, tokens=256, context=256, progress=False)[10][0]  # layer 10: [256, 3, 64]
    x = keys.transpose(0, 1).unsqueeze(0)
    codewords = codecs[10].keys.quantizer.codewords
    errors = []
    for depth in range(1, 5):
        quantizer = RVQQuantizer(codewords[:depth].contiguous(), Grouping(64, 32, "strided"))
        errors.append(relative_error(x, quantizer.decode(quantizer.encode(x))))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
