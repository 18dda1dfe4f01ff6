"""The fused decode kernels equal the estimator path they replace, and the reader takes them where it should.

On CUDA the kernels run on the GPU; elsewhere under TRITON_INTERPRET=1 (conftest.py), so shapes stay small.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import kvcompress
from kvcompress import parse_spec
from kvcompress.pipeline import build_codecs
from kvcompress.runtime import Observation
from kvcompress.store import TokenStore
from kvcompress.testing import assert_fused_generation_matches, assert_fused_read_matches
from kvcompress_scalar import reader as reader_module
from kvcompress_kernels.decode import operand
from kvcompress_scalar.decode_kernels import SPEC_PAIRS, fused_decode_triton
from kvcompress_scalar.reader import FusedScalarReader

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SPECS = Path(__file__).resolve().parents[3] / "specs"
KIVI = {"method": "scalar", "axis": "channel", "group": 32}
KIVI_VALUES = {"method": "scalar", "axis": "token", "group": 32}
SHIPPED = ("kivi-2", "kivi-4", "rot-k4v2", "fp8", "think-kivi-4")  # specs/*.yaml
# (keys pipeline, values pipeline) of pairs no shipped spec has: 3-bit codes straddle bytes, unscaled fp8 values
# beside min/max keys
OTHER_PAIRS = {
    "k3-fp8raw": (
        {"quantizer": {"method": "scalar", "bits": 3, "axis": "token", "group": 16}},
        {"quantizer": {"method": "fp8", "scale": "none"}},
    ),
}


@dataclass
class Layer:
    reader: FusedScalarReader
    keys: TokenStore
    values: TokenStore


def make_layer(pair: str, head_dim: int, kv_heads: int, tokens: int, seed: int, dtype=torch.float32) -> Layer:
    """Both roles' stores filled with `tokens` random tokens; then each (sequence, head) keeps its own count
    (whole groups of the keys' quantum), so heads hold uneven numbers of tokens with padding rows after them."""
    gen = torch.Generator().manual_seed(seed)
    if pair in SHIPPED:
        spec = kvcompress.load_spec(SPECS / f"{pair}.yaml")
    else:
        keys_spec, values_spec = OTHER_PAIRS[pair]
        spec = parse_spec({"name": pair, "window": 4, "keys": keys_spec, "values": values_spec})
    layer = build_codecs(spec, num_layers=1, head_dim=head_dim, kv_heads=kv_heads)[0]  # the scalar estimators
    assert isinstance(layer.reader, FusedScalarReader)
    codecs = (layer.keys, layer.values)
    batch = 2
    observation = Observation(queries=torch.randn(batch, kv_heads, 4, head_dim, generator=gen))
    stores = []
    for codec in codecs:
        x = (torch.randn(batch, kv_heads, tokens, head_dim, generator=gen) * 2 + 0.5).to(dtype)
        store = TokenStore(codec.name)
        store.append(codec.encode(x, observation).map(lambda t: t.to(DEVICE)), first_position=0)
        stores.append(store)
    quantum = stores[0].layout.quantum
    counts = torch.full((batch, kv_heads), tokens)
    counts[0, -1] = tokens - quantum
    counts[1, 0] = max(quantum, tokens // 2 // quantum * quantum)
    keep = torch.arange(tokens).expand(batch, kv_heads, tokens)
    for store in stores:
        store.select(keep.to(DEVICE), counts.to(DEVICE))
    return Layer(layer.reader, *stores)


def check(pair: str, head_dim: int, groups: int, queries: int, tokens: int, *, splits=None, softcap=None,
          dtype=torch.float32, seed=0) -> None:
    layer = make_layer(pair, head_dim, kv_heads=2, tokens=tokens, seed=seed, dtype=dtype)
    assert_fused_read_matches(
        layer.reader, layer.keys, layer.values, head_dim, groups * queries, splits=splits, softcap=softcap, dtype=dtype, seed=seed
    )


# (pair, head_dim, query heads per KV head, query tokens, tokens stored): every pair at every head_dim,
# groups 1/4/8 and 1 or several query tokens spread over them
CASES = [
    ("kivi-2", 64, 1, 1, 96), ("kivi-2", 128, 8, 1, 64), ("kivi-2", 256, 4, 3, 64),
    ("kivi-4", 64, 4, 1, 96), ("kivi-4", 128, 1, 5, 64), ("kivi-4", 256, 8, 1, 64),
    ("rot-k4v2", 64, 8, 2, 37), ("rot-k4v2", 128, 4, 1, 45), ("rot-k4v2", 256, 1, 1, 29),
    ("fp8", 64, 1, 16, 41), ("fp8", 128, 8, 1, 37), ("fp8", 256, 4, 2, 23),
    ("think-kivi-4", 64, 4, 1, 96), ("k3-fp8raw", 48, 4, 3, 39),
]


@pytest.mark.triton
@pytest.mark.parametrize("pair, head_dim, groups, queries, tokens", CASES, ids=lambda v: str(v))
def test_fused_kernels_equal_the_estimator_path(pair, head_dim, groups, queries, tokens):
    check(pair, head_dim, groups, queries, tokens)


@pytest.mark.triton
@pytest.mark.parametrize("splits", [1, 3])
def test_one_split_and_several_merge_to_the_same_read(splits):
    check("kivi-4", 64, 4, 2, 96, splits=splits)


@pytest.mark.triton
def test_softcap_is_applied_before_the_bias():
    check("rot-k4v2", 64, 4, 1, 37, softcap=2.0)


@pytest.mark.triton
@pytest.mark.parametrize("pair", ["fp8", "kivi-4"])
def test_fp16_queries(pair):
    # fp8 keys against an fp16 query take the fp16 dot, exact there
    check(pair, 64, 4, 1, 64, dtype=torch.float16)


@pytest.mark.triton
def test_a_query_block_taller_than_one_program_spans_row_blocks():
    check("kivi-2", 64, 8, 9, 64)  # 72 rows: two blocks of query rows


def test_a_query_in_the_wrong_space_is_refused():
    layer = make_layer("think-kivi-4", 64, kv_heads=2, tokens=64, seed=0)
    keys_operand = operand(layer.reader.keys.quantizer, layer.keys.view())
    values_operand = operand(layer.reader.values.quantizer, layer.values.view())
    query = torch.zeros(2, 2, 1, 64, device=DEVICE)  # 64 channels; the keys store 48
    with pytest.raises(ValueError, match="stored_query"):
        fused_decode_triton(query, keys_operand, values_operand, None, 1.0, None)


@pytest.mark.parametrize("spec", SHIPPED)
def test_shipped_scalar_specs_get_the_fused_reader(spec):
    layers = build_codecs(kvcompress.load_spec(SPECS / f"{spec}.yaml"), num_layers=2, head_dim=64, kv_heads=2)
    assert all(isinstance(layer.reader, FusedScalarReader) for layer in layers)


@pytest.mark.parametrize("spec", sorted(SPEC_PAIRS))
def test_the_compiled_pairs_are_the_shipped_specs(spec):
    layer = build_codecs(kvcompress.load_spec(SPECS / f"{spec}.yaml"), num_layers=1, head_dim=64, kv_heads=1)[0]
    for codec, expected in zip((layer.keys, layer.values), SPEC_PAIRS[spec]):
        read = operand(codec.quantizer, codec.encode(torch.randn(1, 1, codec.token_block, 64)))
        assert read.key == expected


def test_a_pair_with_another_family_keeps_the_default_reader():
    spec = parse_spec({
        "name": "mixed", "window": 4,
        "keys": {"quantizer": {**KIVI, "bits": 4}}, "values": {"quantizer": {"method": "float"}},
    })
    layers = build_codecs(spec, num_layers=1, head_dim=64, kv_heads=2)
    assert not isinstance(layers[0].reader, FusedScalarReader)


@pytest.mark.triton
@pytest.mark.parametrize("center", [False, True], ids=["plain", "centered"])
@pytest.mark.parametrize("values", [{**KIVI_VALUES, "bits": 2, "group": 8}, {"method": "fp8"}], ids=["kivi", "fp8"])
def test_generation_through_the_fused_reader_matches_the_torch_reader(monkeypatch, values, center):
    """A tiny model generating with KVCOMPRESS_KERNELS=triton reads its packed middle through the kernels and
    generates what the torch path does (centered: the mean's share added to the log-sum-exp and the output)."""
    spec = {
        "name": "fused", "window": 4, "compress_run": 8,
        "keys": {"quantizer": {**KIVI, "bits": 4, "group": 8}, "center": center},
        "values": {"quantizer": values, "center": center},
    }
    assert_fused_generation_matches(monkeypatch, spec, reader_module, "fused_decode_triton", torch.device(DEVICE))
