"""The benchmarks run: benchmarks/codecs.py on every shipped spec whose constants are at hand, benchmarks/e2e.py on a
tiny random model, benchmarks/gpu_check.py at tiny shapes (tiny contexts: no timing claims)."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from kvcompress import load_spec
from kvcompress.methods import LayerContext

ROOT = Path(__file__).parent.parent
SPECS = sorted((ROOT / "specs").glob("*.yaml"))


def _load_benchmark(name: str):
    """benchmarks/NAME.py as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_codec_benchmark_runs_each_shipped_spec(path):
    spec = load_spec(path)
    for role in ("keys", "values"):
        codebook = getattr(spec, role).codebook
        # Codecs built without a model read the default model's codebooks (`{model}` in the path).
        where = LayerContext(layer=0, num_layers=1, role=role, head_dim=64, kv_heads=2, spec_dir=str(path.parent))
        if codebook is not None and not where.resolve_path(codebook.path).exists():
            pytest.skip(f"{codebook.path} is calibrated by `make demo`, not shipped")
    args = argparse.Namespace(kv_heads=2, head_dim=64, group=3, repeats=1)
    (row,) = _load_benchmark("codecs").bench_spec(path, [128], args, torch.device("cpu"))
    assert row["bytes"] * 8 == pytest.approx(row["bits_per_element"] * 2 * 2 * row["context"] * 64)
    assert row["bytes"] < row["fp16_bytes"] and row["output_rel_error_vs_exact"] < 1.0


def test_e2e_benchmark_reports_every_config_of_every_length_against_the_baseline():
    from kvcompress.eval.runners import BASELINE, Runner
    from kvcompress.testing import VOCAB, tiny_model

    e2e = _load_benchmark("e2e")
    model = tiny_model("llama", head_dim=64)  # kivi-2 groups 32 channels of a token
    spec = load_spec(ROOT / "specs" / "kivi-2.yaml")
    prompt = torch.randint(0, VOCAB, (1, 72), generator=torch.Generator().manual_seed(0))
    runners = [Runner(BASELINE, None), Runner(spec.name, spec)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model's forward passes: on a busy machine, more threads only wait
    try:
        rows = e2e.benchmark(model, prompt, [24, 72], runners, decode=3, repeats=2, long_decode=10, long_window=4,
                             long_lengths=[72], long_names=["kivi-2"])
    finally:
        torch.set_num_threads(threads)
    assert [(row["length"], row["name"]) for row in rows] == [(24, BASELINE), (24, "kivi-2"), (72, BASELINE), (72, "kivi-2")]
    for row in rows:
        for key in ("prefill_s", "decode_ms", "decode_mean_ms", "prefill_ratio", "decode_ratio", "cache_bytes", "fp16_bytes"):
            assert row[key] > 0, key
        assert row["decode_steps_timed"] == 2 * (3 - 2)
        if row["name"] == BASELINE:
            assert row["prefill_ratio"] == row["decode_ratio"] == 1.0
        elif row["length"] == 72:  # what a kvcompress cache holds after the prefill: cache.nbytes()["total"]
            assert row["cache_bytes"] <= 2 * row["fp16_bytes"] and row["bits_per_element"] == 3.0
        else:  # 24 tokens stay in the float32 window: twice the fp16 bytes, plus the per-layer constants
            assert row["cache_bytes"] > 2 * row["fp16_bytes"] and row["bits_per_element"] is None
    long = {row["name"]: row["long_decode"] for row in rows if "long_decode" in row}
    assert set(long) == {BASELINE, "kivi-2"} and all(row["length"] == 72 for row in rows if "long_decode" in row)
    assert long[BASELINE]["kth_ratio"] == 1.0 and long["kivi-2"]["kth_tokens"] == [8, 11]
    assert all(w[key] > 0 for w in long.values() for key in ("first_ms", "kth_ms", "first_ratio", "kth_ratio"))
    assert "| 72 | kivi-2 |" in e2e.markdown(rows)


def test_gpu_check_smoke_checks_and_times_the_triton_path(tmp_path):
    """benchmarks/gpu_check.py --smoke: the GPU check's code at tiny shapes (on the CPU, Triton interpreted, without
    a GPU; compiled on CUDA with one)."""
    specs = [str(ROOT / "specs" / name) for name in ("kivi-2.yaml", "qjl-lite.yaml")]
    out, table = tmp_path / "gpu_check.json", tmp_path / "gpu_check.md"
    gpu_check = _load_benchmark("gpu_check")
    report = gpu_check.main(["--smoke", "--specs", *specs, "--json", str(out), "--markdown", str(table)])
    assert gpu_check.failures(report) == []
    assert [(row["spec"], row["geometry"]) for row in report["layers"]] == [("kivi-2", "tiny"), ("qjl-lite", "tiny")]
    for row in report["layers"]:
        assert row["error_vs_exact"] < 1.0, row  # random data: QJL errs ~0.5
        assert row["kvcompress_ms"] > 0 and row["sdpa_ms"] > 0 and row["bytes"] < 2 * row["fp16_bytes"]
    assert [row["name"] for row in report["end_to_end"]] == ["baseline", "kivi-2", "qjl-lite"]
    assert json.loads(out.read_text())["layers"] == report["layers"]
    assert "| qjl-lite | tiny | 96 | 1 |" in table.read_text()


def test_gpu_check_fails_on_kernel_tests_errors_and_paths_that_differ():
    gpu_check = _load_benchmark("gpu_check")
    where = {"spec": "qjl", "geometry": "llama-3-8b", "context": 4096, "batch": 8}
    report = {
        "kernel_tests": {"returncode": 1, "summary": "1 failed, 40 passed"},
        "layers": [{**where, "triton_vs_torch": 0.2}, {**where, "error": "OutOfResources: shared memory"},
                   {**where, "skipped": "CodebookError: head_dim"}, {**where, "triton_vs_torch": 1e-6}],
    }
    assert gpu_check.failures(report) == [
        "kernel tests failed: 1 failed, 40 passed (run pytest -m triton to see them)",
        "qjl on a llama-3-8b layer, 4096 tokens, batch 8: the Triton and torch paths differ by 2.0e-01 (relative)",
        "qjl on a llama-3-8b layer, 4096 tokens, batch 8: OutOfResources: shared memory",
    ]


def test_kvpress_side_by_side_our_half_keeps_kvpress_counts_and_frees_the_rest():
    """Our half of benchmarks/kvpress_side_by_side.py (kvpress's needs its own venv from PyPI): each evictor
    holds int(T x (1 - ratio)) tokens, so the bytes fall by the evicted fraction; above it: the kept positions
    (2 bytes a token and head against 128 of float32 keys and values at head_dim 16) and the packed store's
    rounding up to 32 tokens (with StreamingLLM's 4 sinks held apart, 92 packed tokens take 96 rows)."""
    from kvcompress.eval.perplexity import Protocol
    from kvcompress.testing import VOCAB, tiny_model

    side = _load_benchmark("kvpress_side_by_side")
    model = tiny_model("llama")
    protocol = Protocol(context=128, continuation=4, chunk=1)  # more than SnapKV's 64 observed queries
    ids = torch.randint(0, VOCAB, (1, protocol.tokens), generator=torch.Generator().manual_seed(0))
    pairs = side.runs(["streaming", "snapkv", "knorm"], [0.25, 0.75])
    rows = side.run_ours(model, None, ids, protocol, [], 8, pairs)
    table = side.compare(rows, rows)
    assert [(row["method"], row["ratio"]) for row in table][:3] == [("none", 0.0), ("streaming", 0.25), ("streaming", 0.75)]
    for row in table:
        assert 1 - row["ratio"] <= row["held_ours"] <= 1 - row["ratio"] + 0.05 and row["ppl_ours"] > 1
    assert "| snapkv | 75% |" in side.markdown(table)
