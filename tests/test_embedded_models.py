"""The optional embedded models (`make models`), for real: Qwen2.5-Coder-1.5B-Instruct at head_dim 128 and
Gemma-3-270M with its sliding-window layers (slow; skipped where their wheels are not installed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("kvcompress_scalar", reason="the specs here use kvcompress-scalar: pip install -e plugins/scalar")
pytest.importorskip("kvcompress_prune", reason="the specs here use kvcompress-prune: pip install -e plugins/prune")

import kvcompress  # noqa: E402
from kvcompress.eval.perplexity import Protocol, evaluate_perplexity, tokenize_text  # noqa: E402
from kvcompress.eval.runners import BASELINE, Runner  # noqa: E402
from kvcompress.eval.text import default_text  # noqa: E402
from kvcompress.hf import loading  # noqa: E402
from kvcompress.hf.cache import check_spec, model_geometry  # noqa: E402

SPECS = Path(__file__).parent.parent / "specs"


def load_or_skip(name: str) -> tuple:
    model = loading.EMBEDDED[name]
    if not (loading.converted_dir(model) / "config.json").is_file():
        try:
            loading.check_installed(model)
        except loading.ModelLoadError:
            pytest.skip(f"{name} is not installed: `make models`, or `{model.install_command()}`")
    return loading.load_model(name)


def perplexities(model, tokenizer, specs: list[str], protocol: Protocol) -> dict[str, dict]:
    ids = tokenize_text(tokenizer, default_text()[0], protocol, "default")
    runners = [Runner(BASELINE, None)] + [Runner(name, kvcompress.load_spec(SPECS / f"{name}.yaml")) for name in specs]
    return {row["name"]: row for row in evaluate_perplexity(model, ids, protocol, runners)}


@pytest.mark.slow
def test_qwen_builds_every_shipped_spec_at_head_dim_128_and_kivi4_stays_close():
    model, tokenizer = load_or_skip("qwen2.5-coder-1.5b")
    geometry = model_geometry(model.config)
    assert (geometry.num_layers, geometry.query_heads, geometry.kv_heads, geometry.head_dim) == (28, 12, 2, 128)
    assert set(geometry.windows) == {None} and model.config.name_or_path == "qwen2.5-coder-1.5b"
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    for path in sorted(SPECS.glob("*.yaml")):
        spec = kvcompress.load_spec(path)
        # RVQ needs this model's calibrated codebooks; the tuned specs are SmolLM2's, layer by layer (30 layers)
        if not path.name.startswith("rvq") and spec.min_layers() <= geometry.num_layers:
            check_spec(spec, model.config)
    # Per-channel KIVI keys hold up on this model (per-token key codes do not: docs/results.md, "Three models").
    rows = perplexities(model, tokenizer, ["kivi-4"], Protocol(context=512, continuation=64, chunk=16))
    assert rows["kivi-4"]["ppl"] <= 1.03 * rows[BASELINE]["ppl"], rows
    assert rows["kivi-4"]["bits_per_element"] == pytest.approx(5.0)  # groups of 32 whatever the head_dim


@pytest.mark.slow
def test_gemma_sliding_layers_free_their_dead_tokens_and_are_never_evicted():
    model, tokenizer = load_or_skip("gemma3-270m")
    geometry = model_geometry(model.config)
    assert (geometry.num_layers, geometry.query_heads, geometry.kv_heads, geometry.head_dim) == (18, 4, 1, 256)
    sliding = [index for index, window in enumerate(geometry.windows) if window is not None]
    assert len(sliding) == 15 and {geometry.windows[i] for i in sliding} == {512}
    assert model.config.name_or_path == "gemma3-270m" and not tokenizer.chat_template  # a base model
    spec = kvcompress.load_spec(SPECS / "snapkv-kivi-4.yaml")
    ids = tokenize_text(tokenizer, default_text()[0], Protocol(context=1500, continuation=1, chunk=1), "default")
    with kvcompress.patch(model, spec) as patched, torch.inference_mode():
        cache = patched.cache()
        model(ids[:, :1500], past_key_values=cache)
    for index, layer in enumerate(cache.layers):
        held = layer.held_positions()
        count = int((held >= 0).sum(-1).max())
        assert layer.get_seq_length() == 1500
        if index in sliding:
            # Never evicted; what no later query sees is freed (but for part of a packed group): the window's
            # 512 positions and fewer than 32 dead ones.
            assert layer.evictor is None and 512 <= count < 512 + 32, (index, count)
            assert int(held[held >= 0].min()) > 1500 - 512 - 32
        else:
            assert layer.evictor is not None and count <= 1500 // 2 + 32, (index, count)
    rows = perplexities(model, tokenizer, ["kivi-4"], Protocol(context=1024, continuation=64, chunk=16))
    assert rows["kivi-4"]["ppl"] <= 1.05 * rows[BASELINE]["ppl"], rows
