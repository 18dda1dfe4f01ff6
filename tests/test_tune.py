"""kvcompress tune: sensitivities measured on calibration text, an exact knapsack over bits, and a tuned spec
that meets its budget by the framework's own accounting."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import kvcompress
from kvcompress import KVCompressError, load_spec
from kvcompress.cli import main
from kvcompress.eval import text as eval_text
from kvcompress.eval.text import pydoc_text
from kvcompress.testing import tiny_tokenizer
from kvcompress.tune import _selection, choose, gather_options, tuned_spec_data

pytest.importorskip("kvcompress_scalar", reason="the candidates are kvcompress-scalar pipelines")


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.lists(st.tuples(st.integers(1, 40), st.floats(0, 10)), min_size=1, max_size=3), min_size=1, max_size=5),
    st.integers(1, 40),
)
def test_the_knapsack_finds_the_least_loss_within_the_budget(items, budget_units):
    """Against brute force over every combination, costs in whole quarter bits."""
    costs = [[c / 4 for c, _ in row] for row in items]
    losses = [[loss for _, loss in row] for row in items]
    budget = budget_units / 4
    feasible = [
        combo for combo in itertools.product(*(range(len(row)) for row in items))
        if sum(costs[i][j] for i, j in enumerate(combo)) <= budget * len(items) + 1e-9
    ]
    if not feasible:
        with pytest.raises(KVCompressError, match="the cheapest choice of the candidates averages"):
            choose(losses, costs, budget)
        return
    best = min(sum(losses[i][j] for i, j in enumerate(combo)) for combo in feasible)
    chosen = choose(losses, costs, budget)
    assert sum(costs[i][j] for i, j in enumerate(chosen)) <= budget * len(items) + 1e-9
    assert sum(losses[i][j] for i, j in enumerate(chosen)) == pytest.approx(best)


def test_selections_are_written_as_ranges():
    assert _selection([0, 1, 2, 5]) == "0-2,5" and _selection([7]) == "7" and _selection([1, 3, 4]) == "1,3-4"


def test_a_centered_choice_is_written_so_that_every_layer_resolves_to_it(tmp_path):
    """The top-level pipeline centers and a layer's does not: its override says `center: false` (overrides
    inherit what they leave out), and the written spec resolves to each layer's choice."""
    plain = load_spec(candidate(tmp_path, 4))
    data = plain.model_dump(mode="json")
    for role in ("keys", "values"):
        data[role]["center"] = True
    data["name"] = "centered"
    centered = kvcompress.parse_spec(data)
    layout, options = gather_options([centered, plain])
    # option 0 (centered) everywhere but layer 1, which takes option 1 (plain)
    chosen = [{"keys": 0, "values": 0}, {"keys": 1, "values": 0}, {"keys": 0, "values": 0}]
    spec = kvcompress.parse_spec(tuned_spec_data("t", "", layout, options, chosen))
    assert [spec.layer(i).keys.center for i in range(3)] == [True, False, True]
    assert all(spec.layer(i).values.center for i in range(3))
    # written against a centered default, the plain option turns centering off
    centered_option, plain_option = options["keys"]
    assert plain_option.override(centered_option) == {**plain_option.stages(), "center": False}
    assert centered_option.override(plain_option) == centered_option.stages()


def candidate(directory: Path, bits: int) -> Path:
    """Lloyd-Max after a rotation at `bits` for both roles: (bits + 16/16) bits per element at head_dim 16."""
    role = {"transform": {"method": "hadamard", "seed": 0},
            "quantizer": {"method": "scalar", "bits": bits, "axis": "token", "group": 16, "grid": "lloyd-max"}}
    path = directory / f"lm{bits}.yaml"
    path.write_text(yaml.safe_dump({"name": f"lm{bits}", "window": 4, "compress_run": 4, "keys": role, "values": role}))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer(pydoc_text()[0][:50_000])
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
    )
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tune(model_dir: Path, directory: Path, budget: str, *extra: str) -> int:
    return main(["tune", str(candidate(directory, 1)), str(candidate(directory, 2)), "--budget", budget,
                 "--out", str(directory / "tuned-{budget}.yaml"), "--model", str(model_dir), "--context", "48",
                 "--continuation", "12", "--chunk", "4", "--windows", "1", "--quiet", *extra])


def test_tune_writes_a_spec_that_meets_the_budget_by_the_caches_own_accounting(model_dir, tmp_path, capsys, monkeypatch):
    # the evaluation text is never read: its reader fails the test if called
    monkeypatch.setattr(eval_text, "default_text", lambda: pytest.fail("tune read the evaluation text"))
    sensitivity = tmp_path / "sensitivity.json"
    assert tune(model_dir, tmp_path, "2,2.25,2.5", "--sensitivity", str(sensitivity)) == 0  # one measurement
    printed = capsys.readouterr().out
    assert "layer   1:" in printed and "wrote" in printed
    cheapest = load_spec(tmp_path / "tuned-2.yaml")
    assert all(cheapest.layer(i).keys.quantizer.bits == cheapest.layer(i).values.quantizer.bits == 1 for i in range(2))
    # one of four pipelines at 2 bits: written as a per-layer override that resolves to it
    quarter = load_spec(tmp_path / "tuned-2.25.yaml")
    assert quarter.layers and sorted(
        quarter.layer(i).keys.quantizer.bits + quarter.layer(i).values.quantizer.bits for i in range(2)) == [2, 3]
    spec = load_spec(tmp_path / "tuned-2.5.yaml")
    assert spec.name == "tuned-2.5" and "pydoc_data.topics" in spec.description
    bits = {spec.layer(i).keys.quantizer.bits for i in range(2)} | {spec.layer(i).values.quantizer.bits for i in range(2)}
    assert len(bits) > 1  # between 2 (2.0 b) and 3 (3.0 b) bits codes per element: layers must differ

    # measured as `kvcompress eval` measures: the packed rows' bits per element of a filled cache
    import kvcompress
    from kvcompress.hf.loading import load_model

    model, _ = load_model(str(model_dir))
    with kvcompress.patch(model, spec) as patched, torch.inference_mode():
        cache = patched.cache()
        model(input_ids=torch.randint(0, 300, (1, 64)), past_key_values=cache, use_cache=True)
    measured = cache.bits_per_element()
    # four (layer, role) pipelines at 2 or 3 bits: the closest average to the budget is within 1/4 bit
    assert measured <= 2.5 + 1e-9 and 2.5 - measured < 1 / 4 + 1e-9
    assert f"{measured:.4f} bits per element" in spec.description

    # deterministic for a seed
    first = (tmp_path / "tuned-2.5.yaml").read_text()
    assert tune(model_dir, tmp_path, "2.5") == 0
    assert (tmp_path / "tuned-2.5.yaml").read_text() == first
    # the stored sensitivities serve another budget without measuring: the model's forward is never called
    from transformers import LlamaForCausalLM

    monkeypatch.setattr(LlamaForCausalLM, "forward", lambda *a, **k: pytest.fail("measured again"))
    assert tune(model_dir, tmp_path, "2.5", "--sensitivity", str(sensitivity)) == 0
    assert (tmp_path / "tuned-2.5.yaml").read_text() == first


def test_a_candidate_with_codebooks_tunes_into_a_spec_in_another_directory(model_dir, tmp_path):
    """A candidate names its codebook file relative to itself; the tuned spec, written elsewhere, names the
    same file relative to itself (MethodSpec.relocated), so it loads and runs."""
    pytest.importorskip("kvcompress_rvq", reason="the codebook candidate is an rvq pipeline")
    (tmp_path / "candidates").mkdir()
    role = {
        "transform": {"method": "hadamard", "seed": 0},
        "quantizer": {"method": "rvq", "depth": 1, "codebook_size": 16, "group": 4, "layout": "contiguous",
                      "scale": "preserve"},
        "estimator": {"method": "rvq-lut"},
        "codebook": {"method": "kmeans", "path": "../codebooks/{model}-vq.safetensors", "samples": 256, "iterations": 2},
    }
    vq = tmp_path / "candidates" / "vq.yaml"
    vq.write_text(yaml.safe_dump({"name": "vq", "window": 4, "compress_run": 4, "keys": role, "values": role}))
    codebooks = tmp_path / "codebooks" / f"{model_dir.name}-vq.safetensors"
    codebooks.parent.mkdir()
    assert main(["calibrate", str(vq), "--model", str(model_dir), "--out", str(codebooks), "--tokens", "256",
                 "--context", "64", "--quiet"]) == 0
    (tmp_path / "out").mkdir()
    assert main(["tune", str(candidate(tmp_path / "candidates", 4)), str(vq), "--budget", "3", "--out",
                 str(tmp_path / "out" / "tuned.yaml"), "--model", str(model_dir), "--context", "48", "--continuation",
                 "12", "--chunk", "4", "--windows", "1", "--quiet"]) == 0
    spec = load_spec(tmp_path / "out" / "tuned.yaml")
    paths = {spec.layer(i).values.codebook.path for i in range(2) if spec.layer(i).values.codebook is not None}
    paths |= {spec.layer(i).keys.codebook.path for i in range(2) if spec.layer(i).keys.codebook is not None}
    assert paths == {"../codebooks/{model}-vq.safetensors"}  # 3 bits: between vq (1.5 b) and lm4 (5 b)
    from kvcompress.hf.loading import load_model

    model, _ = load_model(str(model_dir))
    with kvcompress.patch(model, spec) as patched, torch.inference_mode():
        cache = patched.cache()
        model(input_ids=torch.randint(0, 300, (1, 32)), past_key_values=cache, use_cache=True)
    assert cache.compressed_tokens() > 0
    # an absolute path stays as it is
    stage = kvcompress.load_spec(vq).values.codebook
    absolute = stage.model_copy(update={"path": str(codebooks)})
    assert absolute.relocated(vq.parent, tmp_path / "out") is absolute
    assert stage.relocated(vq.parent, tmp_path).path == "codebooks/{model}-vq.safetensors"


def test_tune_refuses_the_evaluation_text_before_loading_the_model(tmp_path, capsys):
    if not eval_text.DEFAULT_TEXT.is_file():
        pytest.skip(f"{eval_text.DEFAULT_TEXT} is not on this system")
    assert tune(tmp_path / "no-model", tmp_path, "2.5", "--text", str(eval_text.DEFAULT_TEXT)) == 1
    assert "the text `kvcompress eval` measures on" in capsys.readouterr().err
    # nor a directory that holds it
    assert tune(tmp_path / "no-model", tmp_path, "2.5", "--text", str(eval_text.DEFAULT_TEXT.parent)) == 1
    assert "that is (or holds)" in capsys.readouterr().err


def test_several_budgets_need_a_budget_in_the_file_name(tmp_path, capsys):
    code = main(["tune", str(candidate(tmp_path, 1)), "--budget", "2,3", "--out", str(tmp_path / "t.yaml")])
    assert code == 1 and "with several budgets it must contain {budget}" in capsys.readouterr().err


def test_candidates_must_share_their_layout(tmp_path, capsys):
    other = tmp_path / "other.yaml"
    data = yaml.safe_load(candidate(tmp_path, 2).read_text())
    other.write_text(yaml.safe_dump({**data, "name": "other", "window": 8}))
    code = main(["tune", str(candidate(tmp_path, 4)), str(other), "--budget", "3", "--out", str(tmp_path / "t.yaml")])
    assert code == 1 and "candidates must share them" in capsys.readouterr().err


def test_candidates_must_compress_in_one_run_whatever_their_blocks(model_dir, tmp_path, capsys):
    # per-channel keys in groups of 8 tokens hold back 8 at a time where the Lloyd-Max candidates compress every 4
    channel = tmp_path / "channel.yaml"
    data = yaml.safe_load(candidate(tmp_path, 2).read_text())
    data["keys"] = {"quantizer": {"method": "scalar", "bits": 2, "axis": "channel", "group": 8}}
    channel.write_text(yaml.safe_dump({**data, "name": "channel"}))
    args = ["--budget", "3", "--out", str(tmp_path / "t.yaml"), "--model", str(model_dir), "--quiet"]
    assert main(["tune", str(candidate(tmp_path, 2)), str(channel), *args]) == 1
    err = capsys.readouterr().err
    assert "its keys compress tokens in blocks of 8, which do not divide compress_run 4" in err
    assert "compress_run: 8" in err


def test_each_sensitivity_is_that_probe_run_alone_window_by_window(model_dir, tmp_path, monkeypatch):
    """Probes share the windows' prefill and run the windows side by side, in groups of any size: each KL and
    each cost is what the probe gives run on its own, window by window, against a DynamicCache."""
    import torch.nn.functional as F
    from transformers import DynamicCache

    from kvcompress import tune as tune_module
    from kvcompress.eval.perplexity import Protocol, continuation_logits
    from kvcompress.hf.loading import load_model

    model, _ = load_model(str(model_dir))
    protocol = Protocol(context=40, continuation=9, chunk=4, windows=3)
    windows = torch.randint(3, 300, (3, protocol.tokens), generator=torch.Generator().manual_seed(0))
    layout, options = gather_options([load_spec(candidate(tmp_path, bits)) for bits in (1, 3)])
    expected = {}
    for layer in range(2):
        for role in ("keys", "values"):
            for index, option in enumerate(options[role]):
                total = 0.0
                with kvcompress.patch(model, tune_module.probe_spec(layout, layer, role, option, protocol.tokens)) as patched:
                    for window in windows.split(1):
                        cache = patched.cache()
                        with torch.inference_mode():
                            reference = list(continuation_logits(model, window, protocol, DynamicCache(config=model.config)))
                            probe = list(continuation_logits(model, window, protocol, cache))
                        for (ref, _), (logits, _) in zip(reference, probe):
                            ref, logp = F.log_softmax(ref.float(), -1), F.log_softmax(logits.float(), -1)
                            total += float((ref.exp() * (ref - logp)).sum())
                store = getattr(cache.layers[layer], "key_store" if role == "keys" else "value_store")
                expected[layer, role, index] = total, 8 * store.payload_nbytes() / (store.held_tokens() * 16)
    for group_bytes in (1, 10**12):  # one probe per group; every probe in one group
        monkeypatch.setattr(tune_module, "PROBE_GROUP_BYTES", group_bytes)
        found = tune_module.measure(model, windows, protocol, layout, options, progress=False)
        for (layer, role, index), (total, bits) in expected.items():
            assert found.kl[layer][role][index] == pytest.approx(total, rel=1e-3, abs=1e-6), (layer, role, index)
            assert found.bits[layer][role][index] == pytest.approx(bits), (layer, role, index)
