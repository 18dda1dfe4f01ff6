"""kvcompress.eval (`kvcompress eval`): the perplexity protocol, report tables, needle retrieval, the command;
slow tests on SmolLM2."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import json
import math
import statistics

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from transformers import DynamicCache  # noqa: E402

import kvcompress  # noqa: E402
from kvcompress.errors import KVCompressError, SpecError  # noqa: E402
from kvcompress.eval import command, needle, ruler, ruler_tasks  # noqa: E402
from kvcompress.eval.perplexity import (  # noqa: E402
    Protocol, continuation_logits, continuation_nll, continuation_scores, evaluate_perplexity, token_nll, tokenize_text,
)
from kvcompress.eval.report import format_table  # noqa: E402
from kvcompress.eval.runners import BASELINE, Runner  # noqa: E402

# Stores tokens as float32 through the compressed cache's whole path: perplexity must equal the baseline's.
FLOAT32_SPEC = {
    "name": "float32",
    "keys": {"quantizer": {"method": "float", "dtype": "float32"}},
    "values": {"quantizer": {"method": "float", "dtype": "float32"}},
}


def manual_dynamic_cache_nll(model, ids: torch.Tensor, context: int, continuation: int, chunk: int) -> tuple[float, int]:
    """The protocol written out longhand: prefill, then chunks, each logit scored against the next token."""
    cache = DynamicCache(config=model.config)
    log_probs = []
    with torch.inference_mode():
        out = model(input_ids=ids[:, :context], past_key_values=cache, logits_to_keep=1)
        log_probs.append(out.logits[0, -1:].float().log_softmax(-1)[0, ids[0, context]].reshape(1))
        position = context
        while position < context + continuation - 1:
            stop = min(position + chunk, context + continuation - 1)
            out = model(input_ids=ids[:, position:stop], past_key_values=cache)
            lp = out.logits[0].float().log_softmax(-1)
            log_probs.append(lp.gather(-1, ids[0, position + 1 : stop + 1, None])[:, 0])
            position = stop
    scores = torch.cat(log_probs)
    return -scores.double().sum().item(), scores.numel()


# ---------------------------------------------------------------------------------------------------
# Protocol arithmetic


def test_chunks_cover_the_continuation_but_its_last_token():
    p = Protocol(context=10, continuation=8, chunk=3)
    assert p.tokens == 18
    assert p.chunks() == [(10, 13), (13, 16), (16, 17)]
    assert Protocol(context=10, continuation=1, chunk=4).chunks() == []
    assert Protocol(context=1024, continuation=256, chunk=16).chunks()[-1] == (1264, 1279)


@pytest.mark.parametrize("field", ["context", "continuation", "chunk", "windows"])
def test_protocol_rejects_non_positive_counts(field):
    counts = {"context": 8, "continuation": 8, "chunk": 4, field: 0}
    with pytest.raises(KVCompressError, match=f"--{field} must be at least 1"):
        Protocol(**counts)


def test_text_shorter_than_the_protocol_is_refused(tokenizer):
    with pytest.raises(KVCompressError, match="fewer than --windows 1 x \\(--context 60 \\+ --continuation 40\\) = 100"):
        tokenize_text(tokenizer, "a short text", Protocol(60, 40, 8), "short.txt")


def test_windows_are_disjoint_consecutive_slices_and_the_refusal_says_how_many_fit(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = tokenize_text(tokenizer, text, Protocol(20, 10, 4, windows=3), "default")
    assert windows.shape == (3, 30) and windows.flatten().tolist() == ids[:90]
    fitting = len(ids) // 30
    with pytest.raises(KVCompressError, match=f"--windows {fitting} fits"):
        tokenize_text(tokenizer, text, Protocol(20, 10, 4, windows=fitting + 1), "default")


def test_windows_pool_their_tokens_and_report_the_spread_of_the_deltas(model, tokenizer, text):
    pytest.importorskip("kvcompress_scalar")
    protocol = Protocol(context=24, continuation=9, chunk=4, windows=3)
    ids = tokenize_text(tokenizer, text, protocol, "default")
    spec = kvcompress.parse_spec({
        "name": "kivi-2", "window": 4,
        "keys": {"quantizer": {"method": "scalar", "bits": 2, "axis": "channel", "group": 8}},
        "values": {"quantizer": {"method": "scalar", "bits": 2, "axis": "token", "group": 8}},
    })
    baseline, compressed = evaluate_perplexity(model, ids, protocol, [Runner(BASELINE, None), Runner("kivi-2", spec)])
    for row in (baseline, compressed):
        assert row["tokens_scored"] == 27 and len(row["window_ppl"]) == 3
    for window, ppl in zip(ids.split(1), baseline["window_ppl"]):
        manual, _ = manual_dynamic_cache_nll(model, window, 24, 9, 4)
        assert ppl == pytest.approx(math.exp(manual / 9), rel=1e-5)
    pooled = math.exp(sum(9 * math.log(p) for p in baseline["window_ppl"]) / 27)
    assert baseline["ppl"] == pytest.approx(pooled) and baseline["delta_spread_pct"] == 0
    deltas = [100 * (c / b - 1) for c, b in zip(compressed["window_ppl"], baseline["window_ppl"])]
    assert compressed["window_delta_pct"] == pytest.approx(deltas)
    assert compressed["delta_spread_pct"] == pytest.approx(statistics.stdev(deltas))
    # the standard error of the pooled delta, from each scored token's NLL under both caches
    with torch.inference_mode(), kvcompress.patch(model, spec) as patched:
        nll = {
            "baseline": token_nll(continuation_logits(model, ids, protocol, DynamicCache(config=model.config))),
            "kivi-2": token_nll(continuation_logits(model, ids, protocol, patched.cache())),
        }
    differences = (nll["kivi-2"] - nll["baseline"]).flatten()
    assert differences.shape == (27,) and baseline["delta_stderr_pct"] == 0
    ratio = compressed["ppl"] / baseline["ppl"]
    assert ratio == pytest.approx(math.exp(differences.mean().item()))
    assert compressed["delta_stderr_pct"] == pytest.approx(100 * ratio * differences.std().item() / math.sqrt(27))
    assert compressed["delta_stderr_pct"] > 0


def test_batches_of_windows_and_a_shared_prefill_give_what_each_spec_gets_alone(model, tokenizer, text):
    """Windows side by side in batches of any size, and specs that share each batch's prefill: every row's
    per-window perplexities are those of the spec's windows run one by one on its own, and the bytes of one
    window depend on the batch only through the stores' growth headroom."""
    pytest.importorskip("kvcompress_scalar")
    protocol = Protocol(context=40, continuation=11, chunk=4, windows=5)
    ids = tokenize_text(tokenizer, text, protocol, "default")
    kivi = kvcompress.parse_spec({
        "name": "kivi-2", "window": 4, "sinks": 2,
        "keys": {"quantizer": {"method": "scalar", "bits": 2, "axis": "channel", "group": 8}},
        "values": {"quantizer": {"method": "scalar", "bits": 2, "axis": "token", "group": 8}},
    })
    runners = [Runner(BASELINE, None), Runner("kivi-2", kivi), Runner("float32", kvcompress.parse_spec(FLOAT32_SPEC))]
    alone = [evaluate_perplexity(model, ids, protocol, [runner], batch=1)[0] for runner in runners]
    for batch in (1, 2, 5):
        together = evaluate_perplexity(model, ids, protocol, runners, batch=batch)
        for row, expected in zip(together, alone):
            assert row["window_ppl"] == pytest.approx(expected["window_ppl"], rel=1e-5), (batch, row["name"])
            assert row["cache_bytes"] == pytest.approx(expected["cache_bytes"], rel=0.05), (batch, row["name"])
            assert row["bits_per_element"] == expected["bits_per_element"]


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_nll_scores_exactly_the_continuation_and_matches_a_manual_dynamic_cache_loop(model, tokenizer, text, chunk):
    protocol = Protocol(context=40, continuation=23, chunk=chunk)
    ids = tokenize_text(tokenizer, text, protocol, "default")
    steps = []
    nll, scored = continuation_nll(model, ids, protocol, DynamicCache(config=model.config), step=lambda: steps.append(1))
    assert scored == 23 and len(steps) == 1 + len(protocol.chunks())
    manual, count = manual_dynamic_cache_nll(model, ids, 40, 23, chunk)
    assert count == 23
    assert nll == pytest.approx(manual, rel=1e-5)


def test_chunked_nll_equals_one_full_forward_pass(model, tokenizer, text):
    """With a full-precision cache, chunked decoding is only a different schedule of the same computation."""
    protocol = Protocol(context=32, continuation=17, chunk=4)
    ids = tokenize_text(tokenizer, text, protocol, "default")
    nll, _ = continuation_nll(model, ids, protocol, DynamicCache(config=model.config))
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0, 31:48].float()
    full = F.cross_entropy(logits, ids[0, 32:49], reduction="sum").item()
    assert nll == pytest.approx(full, rel=1e-5)


@pytest.mark.parametrize("spec", [None, FLOAT32_SPEC], ids=["dynamic", "float32"])
def test_continuations_side_by_side_score_as_each_alone(model, tokenizer, text, spec):
    """One prefill, the cache repeated per continuation, rows of unequal length: each row's log-probabilities
    and greedy flags are those of that continuation scored alone (the padding after a short row is unseen)."""
    ids = torch.tensor(tokenizer(text)["input_ids"][:80])
    context, continuations = ids[:40], [ids[40:45], ids[40:41], ids[50:80]]
    with Runner("row", None if spec is None else kvcompress.parse_spec(spec)).session(model) as new_cache:
        together = continuation_scores(model, context, continuations, 7, new_cache())
        alone = [continuation_scores(model, context, [c], 7, new_cache())[0] for c in continuations]
    for (log_probs, greedy), (expected, expected_greedy), continuation in zip(together, alone, continuations):
        assert log_probs.shape == greedy.shape == continuation.shape
        torch.testing.assert_close(log_probs, expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(greedy, expected_greedy)


def test_a_float32_spec_reproduces_the_baseline_and_restores_the_model(model, tokenizer, text):
    protocol = Protocol(context=48, continuation=20, chunk=6)
    ids = tokenize_text(tokenizer, text, protocol, "default")
    spec = kvcompress.parse_spec(FLOAT32_SPEC)
    attention_before = model.config._attn_implementation
    rows = evaluate_perplexity(model, ids, protocol, [Runner(BASELINE, None), Runner("float32", spec)])
    assert model.config._attn_implementation == attention_before
    baseline, compressed = rows
    assert baseline["name"] == BASELINE and compressed["name"] == "float32"
    assert compressed["ppl"] == pytest.approx(baseline["ppl"], rel=1e-4)
    assert compressed["baseline_ppl"] == baseline["ppl"]
    assert compressed["delta_pct"] == pytest.approx(100 * (compressed["ppl"] / baseline["ppl"] - 1))
    manual, _ = manual_dynamic_cache_nll(model, ids, 48, 20, 6)
    assert baseline["ppl"] == pytest.approx(math.exp(manual / 20), rel=1e-6)
    # 2 layers x 2 kv heads x 16 dims x 67 tokens held (the last token is only predicted), keys and values.
    fp16 = 2 * 2 * 2 * 2 * 16 * 67
    assert baseline["fp16_bytes"] == compressed["fp16_bytes"] == fp16
    assert baseline["cache_bytes"] == 2 * fp16 and baseline["bits_per_element"] == 32
    assert compressed["key_bits"] == compressed["value_bits"] == compressed["bits_per_element"] == 32
    # float32 holds twice the fp16 bytes, plus each store's token count per (sequence, head): 2 layers x 2 roles.
    assert compressed["cache_bytes"] == 2 * fp16 + 2 * 2 * 2 * 8
    assert all(row["tokens_scored"] == 20 and row["seconds"] > 0 for row in rows)


def test_format_table_aligns_columns():
    rows = [{"name": "baseline", "ppl": 21.3141, "bits": None}, {"name": "kivi-4-long", "ppl": 3.0, "bits": 5.0}]
    table = format_table(rows, [("spec", "name", "{}"), ("ppl", "ppl", "{:.2f}"), ("bits", "bits", "{:.1f}")])
    lines = table.splitlines()
    assert lines[0].split() == ["spec", "ppl", "bits"]
    assert lines[1].split() == ["baseline", "21.31", "-"] and lines[2].split() == ["kivi-4-long", "3.00", "5.0"]
    assert len({len(line) for line in lines}) == 1


# ---------------------------------------------------------------------------------------------------
# Needle


def test_retrieved_accepts_the_number_in_any_grouping_and_nothing_else():
    assert needle.retrieved("The special magic number is 4821937.", "4821937")
    assert needle.retrieved("It is 4,821,937", "4821937") and needle.retrieved("4 821 937!", "4821937")
    assert not needle.retrieved("48219370", "4821937") and not needle.retrieved("482193", "4821937")
    assert not needle.retrieved("I don't know.", "4821937")


def test_insert_needle_moves_to_a_sentence_end():
    document = "First sentence here. Second one follows and goes on"
    assert needle.insert_needle(document, 30, "NEEDLE.") == "First sentence here. NEEDLE. Second one follows and goes on"
    assert needle.insert_needle("no stops at all", 3, "N.") == "no N. stops at all"
    assert needle.insert_needle("abc", 0, "N.") == "N. abc"


def test_needle_settings_parse_and_validate():
    s = needle.NeedleSettings.from_strings("64,128", "0.25,0.75", 8, "3")
    assert s.lengths == (64, 128) and s.depths == (0.25, 0.75)
    with pytest.raises(KVCompressError, match="--depths"):
        needle.NeedleSettings.from_strings("64", "0.5,1.5", 8, "0")
    with pytest.raises(KVCompressError, match="--lengths"):
        needle.NeedleSettings.from_strings("64,x", "0.5", 8, "0")


def test_trials_hide_a_seeded_number_at_each_depth(tokenizer, text):
    settings = needle.NeedleSettings((64, 256), (0.1, 0.5, 0.9), seed=7)
    trials = needle.build_trials(tokenizer, text, "default", settings)
    assert [(t.length, t.depth) for t in trials] == [(n, d) for n in (64, 256) for d in (0.1, 0.5, 0.9)]
    again = needle.build_trials(tokenizer, text, "default", settings)
    assert [t.number for t in trials] == [t.number for t in again]
    for trial in trials:
        assert 6 <= len(trial.number) <= 7
        prompt = tokenizer.decode(trial.input_ids[0])
        assert needle.NEEDLE.format(number=trial.number) in prompt and needle.QUESTION in prompt
        assert prompt.endswith("<|im_start|>assistant\n")
        # The document, the needle sentence and the chat frame: a little more than `length` tokens.
        assert trial.length < trial.input_ids.shape[1] < trial.length + 80
    positions = [tokenizer.decode(t.input_ids[0]).index(t.number) for t in trials[3:]]
    assert positions == sorted(positions)


def test_base_model_trials_end_in_the_answer_prefix(tokenizer, text):
    base = copy.deepcopy(tokenizer)
    base.chat_template = None
    trial = needle.build_trials(base, text, "default", needle.NeedleSettings((64,), (0.5,)))[0]
    prompt = base.decode(trial.input_ids[0], skip_special_tokens=True)
    assert "<|im_start|>" not in prompt and needle.NEEDLE.format(number=trial.number) in prompt
    assert prompt.endswith(f"{needle.QUESTION} {needle.BASE_ANSWER_PREFIX}")


def test_trials_refuse_a_text_shorter_than_the_longest_document(tokenizer):
    with pytest.raises(KVCompressError, match="fewer than the longest --lengths 64"):
        needle.build_trials(tokenizer, "too short", "x.txt", needle.NeedleSettings((64,), (0.5,)))


def test_needle_rows_report_accuracy_for_the_same_trials(model, tokenizer, text):
    settings = needle.NeedleSettings((48, 96), (0.5,), max_new_tokens=4)
    trials = needle.build_trials(tokenizer, text, "default", settings)
    spec = kvcompress.parse_spec(FLOAT32_SPEC)
    rows = needle.evaluate_needle(model, tokenizer, trials, [Runner(BASELINE, None), Runner("float32", spec)], settings)
    assert [r["name"] for r in rows] == [BASELINE, "float32"]
    for row in rows:
        assert row["trials"] == 2 and [a["number"] for a in row["answers"]] == [t.number for t in trials]
        assert row["accuracy"] == row["correct"] / 2 and set(row["by_length"]) == {"48", "96"}
        assert row["fp16_bytes"] > 0 and row["cache_bytes"] > 0
    # float32 storage: the same greedy replies as the baseline.
    assert [a["reply"] for a in rows[0]["answers"]] == [a["reply"] for a in rows[1]["answers"]]
    assert "accuracy" in needle.format_needle_table(rows, settings)


# ---------------------------------------------------------------------------------------------------
# The command


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return parser.parse_args(argv)


def test_eval_writes_the_table_and_json(model_dir, tmp_path, capsys):
    spec = tmp_path / "f32.json"
    spec.write_text(json.dumps(FLOAT32_SPEC))
    out = tmp_path / "results.json"
    args = parse([str(spec), "--model", str(model_dir), "--context", "40", "--continuation", "12", "--chunk", "5",
                  "--windows", "2", "--json", str(out)])
    assert command.run(args) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].split()[:2] == ["spec", "bits/elem"] and "float32" in printed
    written = json.loads(out.read_text())
    header, rows = written["header"], written["results"]
    assert header["protocol"] == {"context": 40, "continuation": 12, "chunk": 5, "windows": 2}
    assert header["versions"]["torch"] == torch.__version__ and header["machine"]["cpu_count"] >= 1
    fields = {"name", "bits_per_element", "key_bits", "value_bits", "ppl", "baseline_ppl", "delta_pct",
              "delta_spread_pct", "delta_stderr_pct", "window_ppl", "window_delta_pct", "cache_bytes", "fp16_bytes", "seconds"}
    assert all(fields <= set(row) for row in rows)
    assert [r["name"] for r in rows] == [BASELINE, "float32"]


def test_eval_runs_the_model_in_the_dtype_asked_and_records_it(model_dir, tmp_path, capsys):
    spec = tmp_path / "f32.json"
    spec.write_text(json.dumps(FLOAT32_SPEC))
    out = tmp_path / "results.json"
    args = parse([str(spec), "--model", str(model_dir), "--dtype", "bfloat16", "--context", "40", "--continuation",
                  "12", "--chunk", "5", "--json", str(out)])
    assert command.run(args) == 0
    written = json.loads(out.read_text())
    assert written["header"]["model_dtype"] == "bfloat16"
    assert "(bfloat16)" in capsys.readouterr().out  # the footer under the table
    baseline = written["results"][0]
    assert baseline["bits_per_element"] == 16.0 and baseline["cache_bytes"] == baseline["fp16_bytes"]


def test_eval_needle_task_runs_end_to_end(model_dir, tmp_path, capsys):
    out = tmp_path / "needle.json"
    args = parse(["--task", "needle", "--model", str(model_dir), "--lengths", "32", "--depths", "0.5",
                  "--max-new-tokens", "3", "--json", str(out)])
    assert command.run(args) == 0
    rows = json.loads(out.read_text())["results"]
    assert rows[0]["name"] == BASELINE and rows[0]["trials"] == 1
    assert "accuracy" in capsys.readouterr().out


def test_eval_ruler_task_runs_end_to_end_with_seeds_and_a_plot(model_dir, tmp_path, capsys, monkeypatch):
    """Baseline and a float32 spec answer the same prompts (two seeds, two tasks); the JSON holds every reply,
    the table each task's mean and spread, and the plot is drawn from the rows."""
    for name in ("niah_single_1", "vt"):  # the random model never stops: short answers keep the test quick
        monkeypatch.setitem(ruler_tasks.TASKS, name, dataclasses.replace(ruler_tasks.TASKS[name], budget=6))
    spec = tmp_path / "f32.json"
    spec.write_text(json.dumps(FLOAT32_SPEC))
    out, picture = tmp_path / "ruler.json", tmp_path / "ruler.svg"
    argv = [str(spec), "--task", "ruler", "--model", str(model_dir), "--lengths", "1536", "--seed", "0,1",
            "--ruler-tasks", "niah_single_1,vt", "--json", str(out)]
    matplotlib = importlib.util.find_spec("matplotlib") is not None
    assert command.run(parse(argv + (["--plot", str(picture)] if matplotlib else []))) == 0
    printed = capsys.readouterr().out
    assert "ruler @ 1536 tokens" in printed and "mean ± sample std over seeds 0,1" in printed
    written = json.loads(out.read_text())
    assert written["header"]["protocol"] == {"lengths": [1536], "seeds": [0, 1], "samples": 1, "tasks": ["niah_single_1", "vt"]}
    rows = written["results"]
    assert [r["name"] for r in rows] == [BASELINE, "float32"]
    for row in rows:
        assert [(r["seed"], r["task"]) for r in row["replies"]] == [(0, "niah_single_1"), (0, "vt"), (1, "niah_single_1"), (1, "vt")]
        assert all(r["prompt_tokens"] <= 1536 for r in row["replies"])
        vt = row["tasks"]["vt"]["1536"]
        assert vt["by_seed"] == {str(r["seed"]): 100 * r["score"] for r in row["replies"] if r["task"] == "vt"}
        assert row["cache_bytes"] > 0 and row["bits_per_element"] > 0
    # float32 storage: the same greedy replies as the baseline.
    assert [r["reply"] for r in rows[0]["replies"]] == [r["reply"] for r in rows[1]["replies"]]
    if matplotlib:
        assert b"<svg" in picture.read_bytes()[:2000]


def test_eval_needle_refuses_several_seeds_before_the_model_loads(monkeypatch):
    monkeypatch.setattr("kvcompress.hf.loading.load_model", lambda name: pytest.fail("model loaded"))
    with pytest.raises(KVCompressError, match="the needle task takes one seed"):
        command.run(parse(["--task", "needle", "--seed", "0,1"]))


def test_spec_naming_a_method_not_installed_fails_before_the_model_loads(tmp_path, monkeypatch):
    monkeypatch.setattr("kvcompress.hf.loading.load_model", lambda name: pytest.fail("model loaded"))
    # Whether or not kvcompress-rvq is installed here, blocking it makes "rvq" a method that is not installed.
    monkeypatch.setenv("KVCOMPRESS_DISABLE_PLUGINS", "kvcompress-rvq")
    kvcompress.set_registry(kvcompress.Registry(strict=True))
    try:
        spec = tmp_path / "rvq.yaml"
        spec.write_text("name: m\nkeys:\n  quantizer: {method: rvq}\nvalues:\n  quantizer: {method: float}\n")
        with pytest.raises(SpecError, match="keys.quantizer.method: .*pip install kvcompress-rvq"):
            command.run(parse([str(spec)]))
    finally:
        kvcompress.set_registry(None)


def test_cli_eval_names_the_package_of_a_missing_method(tmp_path, monkeypatch, capsys):
    from kvcompress.cli import main

    monkeypatch.setattr("kvcompress.hf.loading.load_model", lambda name: pytest.fail("model loaded"))
    monkeypatch.setenv("KVCOMPRESS_DISABLE_PLUGINS", "kvcompress-qjl")
    spec = tmp_path / "qjl.yaml"
    spec.write_text("name: q\nkeys:\n  quantizer: {method: qjl}\nvalues:\n  quantizer: {method: float}\n")
    assert main(["eval", str(spec)]) == 2
    assert "pip install kvcompress-qjl" in capsys.readouterr().err


def test_a_spec_that_does_not_fit_the_model_fails_before_any_measurement(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(command, "evaluate_perplexity", lambda *a: pytest.fail("measurement started"))
    spec = tmp_path / "deep.json"
    spec.write_text(json.dumps({**FLOAT32_SPEC, "layers": {"5": {"window": 8}}}))
    with pytest.raises(SpecError, match="selects layer 5, but the model has 2 layers"):
        command.run(parse([str(spec), "--model", str(model_dir)]))


def test_device_choice():
    assert command.resolve_device("cpu") == torch.device("cpu")
    assert command.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(KVCompressError, match="not a torch device"):
        command.resolve_device("abacus")
    if not torch.cuda.is_available():
        with pytest.raises(KVCompressError, match="no CUDA device"):
            command.resolve_device("cuda")
    with pytest.raises(KVCompressError, match="--device meta: evaluation runs on cpu or cuda"):
        command.resolve_device("meta")


def test_eval_refuses_duplicate_names_and_bad_paths_before_the_model_loads(tmp_path, monkeypatch):
    monkeypatch.setattr("kvcompress.hf.loading.load_model", lambda name: pytest.fail("model loaded"))
    spec = tmp_path / "a.json"
    spec.write_text(json.dumps({**FLOAT32_SPEC, "name": "baseline"}))
    with pytest.raises(KVCompressError, match="also used by the baseline row"):
        command.run(parse([str(spec)]))
    spec.write_text(json.dumps(FLOAT32_SPEC))
    with pytest.raises(KVCompressError, match="--text .*cannot read"):
        command.run(parse([str(spec), "--text", str(tmp_path / "nope.txt")]))
    with pytest.raises(KVCompressError, match="--json .*does not exist"):
        command.run(parse([str(spec), "--json", str(tmp_path / "no" / "out.json")]))
    with pytest.raises(KVCompressError, match="--json .*is a directory; give a file name"):
        command.run(parse([str(spec), "--json", str(tmp_path)]))


# ---------------------------------------------------------------------------------------------------
# SmolLM2 (slow)


@pytest.fixture(scope="module")
def smollm2():
    from kvcompress.hf.loading import load_model

    return load_model("smollm2")


@pytest.mark.slow
def test_smollm2_baseline_equals_a_plain_dynamic_cache_run_and_kivi4_stays_close(smollm2, text):
    model, tokenizer = smollm2
    pytest.importorskip("kvcompress_scalar")
    protocol = Protocol(context=1024, continuation=256, chunk=16)
    ids = tokenize_text(tokenizer, text, protocol, "default")
    kivi4 = kvcompress.load_spec("specs/kivi-4.yaml")
    baseline, compressed = evaluate_perplexity(model, ids, protocol, [Runner(BASELINE, None), Runner("kivi-4", kivi4)])
    manual, count = manual_dynamic_cache_nll(model, ids, 1024, 256, 16)
    assert count == 256
    assert baseline["ppl"] == pytest.approx(math.exp(manual / 256), rel=1e-3)
    assert compressed["ppl"] <= 1.03 * baseline["ppl"]
    assert compressed["bits_per_element"] <= 5.05
    assert compressed["cache_bytes"] < compressed["fp16_bytes"]


@pytest.mark.slow
def test_smollm2_needle_runs_end_to_end(smollm2, text):
    model, tokenizer = smollm2
    pytest.importorskip("kvcompress_scalar")
    settings = needle.NeedleSettings((256,), (0.5,), max_new_tokens=12)
    trials = needle.build_trials(tokenizer, text, "default", settings)
    runners = [Runner(BASELINE, None), Runner("kivi-4", kvcompress.load_spec("specs/kivi-4.yaml"))]
    rows = needle.evaluate_needle(model, tokenizer, trials, runners, settings)
    assert [r["trials"] for r in rows] == [1, 1]
    assert all(r["answers"][0]["reply"] for r in rows)
    assert rows[1]["bits_per_element"] is not None and rows[1]["bits_per_element"] <= 5.05


@pytest.mark.slow
def test_smollm2_generates_fluent_chat_text_from_a_compressed_cache(smollm2):
    model, tokenizer = smollm2
    pytest.importorskip("kvcompress_scalar")
    # No full-precision window, so the prompt itself is read from packed keys and values.
    spec = kvcompress.parse_spec({**kvcompress.load_spec("specs/kivi-4.yaml").model_dump(), "window": 0})
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with kvcompress.patch(model, spec) as patched:
        cache = patched.cache()
        with torch.inference_mode():
            output = model.generate(**inputs, past_key_values=cache, max_new_tokens=24, do_sample=False)
    reply = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert cache.compressed_tokens() > 0
    assert "Paris" in reply, reply


@pytest.mark.slow
def test_smollm2_ruler_finds_a_single_needle_through_a_compressed_cache(smollm2, text):
    model, tokenizer = smollm2
    pytest.importorskip("kvcompress_scalar")
    settings = ruler.RulerSettings((1024,), tasks=("niah_single_1",))
    prompts = ruler.build_prompts(tokenizer, text, "default", settings, model.config.max_position_embeddings)
    runners = [Runner(BASELINE, None), Runner("kivi-4", kvcompress.load_spec("specs/kivi-4.yaml"))]
    rows = ruler.evaluate_ruler(model, tokenizer, prompts, runners, settings)
    # the needle's 7-digit number, in the baseline's reply and in KIVI-4's
    assert [row["replies"][0]["score"] for row in rows] == [1.0, 1.0], [row["replies"][0]["reply"] for row in rows]
    assert rows[1]["cache_bytes"] < rows[0]["cache_bytes"]

