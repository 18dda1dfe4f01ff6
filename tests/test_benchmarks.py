"""benchmarks/codecs.py runs every shipped spec whose constants are at hand (tiny contexts: no timing claims)."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest
import torch

from kvcompress import load_spec

ROOT = Path(__file__).parent.parent
SPECS = sorted((ROOT / "specs").glob("*.yaml"))


def _codecs_module():
    spec = importlib.util.spec_from_file_location("bench_codecs", ROOT / "benchmarks" / "codecs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_codec_benchmark_runs_each_shipped_spec(path):
    spec = load_spec(path)
    for role in ("keys", "values"):
        codebook = getattr(spec, role).codebook
        if codebook is not None and not (path.parent / codebook.path).exists():
            pytest.skip(f"{codebook.path} is calibrated by `make demo`, not shipped")
    args = argparse.Namespace(kv_heads=2, head_dim=64, group=3, repeats=1)
    (row,) = _codecs_module().bench_spec(path, [128], args, torch.device("cpu"))
    assert row["bytes"] * 8 == pytest.approx(row["bits_per_element"] * 2 * 2 * row["context"] * 64)
    assert row["bytes"] < row["fp16_bytes"] and row["output_rel_error_vs_exact"] < 1.0
