"""Every shipped spec validates, builds for the default model's shape, and stores what its fields imply."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvcompress import load_spec
from kvcompress.pipeline import build_codecs
from kvcompress.runtime import Observation

SPECS = sorted((Path(__file__).parent.parent / "specs").glob("*.yaml")) + sorted(
    (Path(__file__).parent.parent / "specs" / "candidates").glob("*.yaml")
)
# SmolLM2-135M: 30 layers, 3 KV heads, head_dim 64
LAYERS, KV_HEADS, HEAD_DIM = 30, 3, 64


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_shipped_spec_validates_and_round_trips(path):
    spec = load_spec(path)
    import yaml

    assert spec.model_dump(mode="json", exclude_unset=True) == yaml.safe_load(path.read_text())


def _bits(path: Path, role: str, layer: int = 0) -> float:
    codecs = build_codecs(load_spec(path), LAYERS, HEAD_DIM, KV_HEADS)[layer]
    codec = getattr(codecs, role)
    x = torch.randn(1, KV_HEADS, codecs.token_block * 4, HEAD_DIM, generator=torch.Generator().manual_seed(0))
    return codec.encode(x).nbytes() * 8 / x.numel()


def test_kivi2_stores_three_bits_per_element():
    path = Path(__file__).parent.parent / "specs" / "kivi-2.yaml"
    bits = (_bits(path, "keys") + _bits(path, "values")) / 2
    assert bits == pytest.approx(3.0, abs=0.01)


def test_kivi4_stores_five_bits_per_element():
    path = Path(__file__).parent.parent / "specs" / "kivi-4.yaml"
    assert _bits(path, "keys") == pytest.approx(5.0) and _bits(path, "values") == pytest.approx(5.0)


def test_think_kivi4_stores_three_quarters_of_the_key_channels():
    path = Path(__file__).parent.parent / "specs" / "think-kivi-4.yaml"
    codecs = build_codecs(load_spec(path), LAYERS, HEAD_DIM, KV_HEADS)[0]
    x = torch.randn(1, KV_HEADS, 4 * codecs.token_block, HEAD_DIM, generator=torch.Generator().manual_seed(0))
    queries = torch.randn(1, 3 * KV_HEADS, 32, HEAD_DIM, generator=torch.Generator().manual_seed(1))
    state = codecs.keys.encode(x, Observation(queries=queries))
    # 48 channels at KIVI-4 (5.0 bits), and one byte per kept channel index and head
    assert state.nbytes() == (x.numel() * 48 // 64 * 5) // 8 + KV_HEADS * 48
    assert _bits(path, "values") == pytest.approx(5.0)
