"""The lm-evaluation-harness model `kvcompress` (kvcompress.hf.lm_eval), offline, on the local tasks in
tests/data/lm_eval: a full-precision spec reproduces the harness's plain HFLM, a lossy one reads its cache;
slow tests on SmolLM2."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch

# The harness's datasets library reads these when it is imported: local task files only, no hub.
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"
lm_eval = pytest.importorskip(
    "lm_eval", reason="lm-evaluation-harness is not installed: pip install -e '.[lm-eval]' (or make test-lm-eval)"
)
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from kvcompress import cli  # noqa: E402
from kvcompress.hf.cache import CompressedCache  # noqa: E402
from kvcompress.hf.lm_eval import MODEL_NAME, HarnessArgumentError, KVCompressLM  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "tests" / "data" / "lm_eval"
# specs/kivi-2.yaml with groups that fit the tiny model's head_dim 16.
# The tiny model's tokenizer (400 tokens) cuts the passages into about 2000 tokens; HFLM's left truncation
# to this many keeps the tests fast, and is what both models then see.
TINY_LENGTH = 512
KIVI_2 = {
    "name": "kivi-2-tiny",
    "window": 32,
    "keys": {"quantizer": {"method": "scalar", "bits": 2, "axis": "channel", "group": 16}},
    "values": {"quantizer": {"method": "scalar", "bits": 2, "axis": "token", "group": 16}},
}


@pytest.fixture
def offline(monkeypatch):
    """Run from the repository root (the task files name their data from there) with every socket connection
    refused and recorded: the test fails if anything tried to reach the network."""
    attempts: list[object] = []

    def refuse(sock, address, *args):
        attempts.append(address)
        raise OSError(f"network access attempted in an offline test: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.chdir(ROOT)
    yield
    assert attempts == []


@pytest.fixture
def float_spec_file(tmp_path, make_float_spec) -> Path:
    """No window: every token goes to the packed part at once, stored as float32, and is read back from there."""
    path = tmp_path / "float32.json"
    path.write_text(json.dumps(make_float_spec("float32", window=0)))
    return path


def evaluate(lm, tasks: list[str], limit: int) -> dict:
    # Only the local tasks: indexing the harness's thousands of task files takes seconds.
    tasks_here = TaskManager(include_path=str(TASKS), include_defaults=False)
    return lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit, log_samples=True, task_manager=tasks_here)


def responses(results: dict, task: str) -> list:
    """The model's raw answers per document, in document order: (log-likelihood, greedy) pairs per choice,
    a rolling log-likelihood, or a generated string."""
    return [sample["resps"] for sample in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def log_likelihoods(results: dict, task: str) -> torch.Tensor:
    values = [
        answer[0] if isinstance(answer, (list, tuple)) else answer
        for doc in responses(results, task) for choice in doc for answer in choice
    ]
    return torch.tensor(values, dtype=torch.float64)


def plain_hflm(model_dir: Path, **kwargs) -> HFLM:
    return HFLM(pretrained=str(model_dir), device="cpu", dtype="float32", batch_size=1, **kwargs)


# ---------------------------------------------------------------------------------------------------
# The tiny model


def test_a_full_precision_spec_gives_the_plain_models_log_likelihoods(offline, model_dir, float_spec_file):
    """The issue's check: multiple choice, rolling perplexity and generation through the compressed cache
    (float32 storage, no window) match the harness's own HFLM on the same model (one prompt per generate())."""
    tasks = ["kvc_recall", "kvc_text", "kvc_recall_gen"]
    plain = evaluate(plain_hflm(model_dir, max_length=TINY_LENGTH), tasks, limit=2)
    adapter = KVCompressLM(
        pretrained=str(model_dir), spec=str(float_spec_file), score_chunk=48, device="cpu", max_length=TINY_LENGTH,
        batch_size=2,  # generation: two left-padded prompts per generate() through one cache
    )
    ours = evaluate(adapter, tasks, limit=2)
    for task in ("kvc_recall", "kvc_text"):
        expected, got = log_likelihoods(plain, task), log_likelihoods(ours, task)
        assert got.numel() == expected.numel() > 0
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-3)
    assert responses(ours, "kvc_recall_gen") == responses(plain, "kvc_recall_gen")
    assert ours["results"]["kvc_recall"]["acc,none"] == plain["results"]["kvc_recall"]["acc,none"]


def test_every_request_reads_a_fresh_compressed_cache(offline, model_dir, float_spec_file, monkeypatch):
    adapter = KVCompressLM(pretrained=str(model_dir), spec=str(float_spec_file), device="cpu", max_length=TINY_LENGTH)
    caches: list[CompressedCache] = []
    new_cache = adapter.new_cache
    monkeypatch.setattr(adapter, "new_cache", lambda: caches.append(new_cache()) or caches[-1])
    evaluate(adapter, ["kvc_recall", "kvc_recall_gen"], limit=2)
    # One cache per question (its four choices share the prefill) and one per generation.
    assert len(caches) == 4
    assert all(isinstance(cache, CompressedCache) and cache.get_seq_length() > 100 for cache in caches)


def test_a_lossy_spec_changes_the_scores_that_dense_scoring_would_hide(offline, model_dir):
    """KIVI-2 keeps 32 tokens in full precision: the passages are longer, so their continuations read
    2-bit keys and values and the log-likelihoods move away from the plain model's."""
    plain = log_likelihoods(evaluate(plain_hflm(model_dir, max_length=TINY_LENGTH), ["kvc_recall"], limit=2), "kvc_recall")
    adapter = KVCompressLM(pretrained=str(model_dir), spec=KIVI_2, device="cpu", max_length=TINY_LENGTH)
    lossy = log_likelihoods(evaluate(adapter, ["kvc_recall"], limit=2), "kvc_recall")
    assert torch.isfinite(lossy).all()
    assert (lossy - plain).abs().max() > 1e-3


def test_a_one_token_continuation_is_predicted_from_the_cache(model_dir, text):
    """The forward that predicts a continuation's first token reads the context from the cache: a prefill
    would compute it densely, and one-token answers (" A", " B") would never see the spec."""
    baseline = KVCompressLM(pretrained=str(model_dir), device="cpu")
    lossy = KVCompressLM(pretrained=str(model_dir), spec=KIVI_2, device="cpu")
    tokens = baseline.tok_encode(text)[:300]
    requests = [(None, tokens[:-1], tokens[-1:])]
    [(expected, _)] = baseline._loglikelihood_tokens(requests)
    [(got, _)] = lossy._loglikelihood_tokens(requests)
    assert abs(got - expected) > 1e-4


def test_without_a_spec_the_protocol_runs_on_the_models_own_cache(offline, model_dir):
    plain = log_likelihoods(evaluate(plain_hflm(model_dir, max_length=TINY_LENGTH), ["kvc_text"], limit=2), "kvc_text")
    adapter = KVCompressLM(pretrained=str(model_dir), device="cpu", score_chunk=64, max_length=TINY_LENGTH)
    assert adapter.spec is None and adapter.get_model_info()["kvcompress_spec"] is None
    torch.testing.assert_close(log_likelihoods(evaluate(adapter, ["kvc_text"], limit=2), "kvc_text"), plain,
                               rtol=1e-5, atol=1e-3)


def test_close_restores_the_models_attention(model_dir, float_spec_file):
    adapter = KVCompressLM(pretrained=str(model_dir), spec=str(float_spec_file), device="cpu")
    assert adapter.model.config._attn_implementation == "kvcompress"
    adapter.close()
    assert adapter.model.config._attn_implementation != "kvcompress"


def test_the_command_line_runs_the_harness_with_the_model_registered(offline, model_dir, float_spec_file, tmp_path):
    out = tmp_path / "results"
    status = cli.main([
        "lm-eval", "--model", MODEL_NAME,
        "--model_args", f"pretrained={model_dir},spec={float_spec_file},score_chunk=32,max_length={TINY_LENGTH}",
        "--tasks", "kvc_text", "--include_path", str(TASKS), "--limit", "1", "--device", "cpu",
        "--output_path", str(out),
    ])
    assert status == 0
    [written] = list(out.rglob("results_*.json"))
    results = json.loads(written.read_text())
    assert results["results"]["kvc_text"]["word_perplexity,none"] > 1
    assert results["config"]["model"] == MODEL_NAME
    assert results["config"]["pretrained"] == str(model_dir)
    assert results["config"]["kvcompress_spec"] == "float-float32-w0" and results["config"]["score_chunk"] == 32


def test_the_command_line_names_the_install_command_without_the_harness(monkeypatch, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else find_spec(name, *a))
    assert cli.main(["lm-eval", "--model", MODEL_NAME]) == 1
    assert "pip install 'kvcompress[lm-eval]'" in capsys.readouterr().err


@pytest.mark.parametrize("arguments, problem", [
    ({"score_chunk": 0}, "score_chunk"),
    ({"batch_size": "auto"}, "batch_size"),
    ({"batch_size": 0}, "batch_size"),
    ({"dtype": "int8"}, "dtype"),
])
def test_bad_model_args_are_refused_by_name(model_dir, arguments, problem):
    with pytest.raises(HarnessArgumentError, match=problem):
        KVCompressLM(pretrained=str(model_dir), device="cpu", **arguments)


def test_the_harness_batch_size_text_is_a_number(model_dir):
    adapter = KVCompressLM(pretrained=str(model_dir), device="cpu", batch_size="3")
    assert adapter.batch_size == 3


def test_a_loaded_model_needs_its_tokenizer(model):
    with pytest.raises(HarnessArgumentError, match="tokenizer"):
        KVCompressLM(pretrained=model)


# ---------------------------------------------------------------------------------------------------
# SmolLM2 (slow)


@pytest.mark.slow
def test_smollm2_full_precision_matches_plain_hflm_and_kivi_runs(offline, float_spec_file):
    from kvcompress.hf.loading import resolve_model

    plain = evaluate(plain_hflm(resolve_model("smollm2")), ["kvc_recall"], limit=2)
    exact = evaluate(KVCompressLM(pretrained="smollm2", spec=str(float_spec_file), device="cpu"), ["kvc_recall"], limit=2)
    torch.testing.assert_close(log_likelihoods(exact, "kvc_recall"), log_likelihoods(plain, "kvc_recall"),
                               rtol=1e-4, atol=1e-3)
    kivi = evaluate(KVCompressLM(pretrained="smollm2", spec=str(ROOT / "specs" / "kivi-4.yaml"), device="cpu"),
                    ["kvc_recall"], limit=2)
    assert torch.isfinite(log_likelihoods(kivi, "kvc_recall")).all()
    assert kivi["results"]["kvc_recall"]["acc,none"] >= 0
