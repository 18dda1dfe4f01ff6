"""The fused QJL decode kernel equals the estimator path it replaces, and the reader takes it where it should.

Kernels run on each of kvcompress.testing.kernel_devices(): CUDA where a GPU answers, else the CPU under
TRITON_INTERPRET=1 (conftest.py), so shapes stay small.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import kvcompress
from kvcompress import parse_spec
from kvcompress.pipeline import build_codecs
from kvcompress.store import TokenStore
from kvcompress.testing import assert_fused_generation_matches, assert_fused_read_matches, kernel_devices
from kvcompress_kernels.decode import operand
from kvcompress_qjl import reader as reader_module
from kvcompress_qjl.decode_kernels import SPEC_VALUES
from kvcompress_qjl.reader import FusedQJLReader

SPECS = Path(__file__).resolve().parents[3] / "specs"
SHIPPED = ("qjl", "qjl-lite")
# pairs no shipped spec has: QJL keys without outliers (a token block of 1, so any token count), beside fp8 values
# and beside 3-bit values whose codes straddle bytes
OTHER_PAIRS = {
    "qjl0-fp8": ({"method": "qjl", "outliers": 0}, {"method": "fp8"}),
    "qjl0-k3": ({"method": "qjl", "outliers": 0, "sketch_dim": 96}, {"method": "scalar", "bits": 3, "axis": "token", "group": 16}),
}


@dataclass
class Layer:
    reader: FusedQJLReader
    keys: TokenStore
    values: TokenStore


def make_layer(pair: str, layer: int, head_dim: int, tokens: int, device: str, seed: int, dtype=torch.float32) -> Layer:
    """Layer `layer` of the spec's codecs (qjl's layers 0-1 have their larger sketch), both roles' stores filled
    with `tokens` random tokens; then each (sequence, head) keeps its own count (whole groups of the keys'
    quantum), so heads hold uneven numbers of tokens with padding rows after them."""
    gen = torch.Generator().manual_seed(seed)
    if pair.removesuffix("-uncentered") in SHIPPED:
        spec = kvcompress.load_spec(SPECS / f"{pair.removesuffix('-uncentered')}.yaml")
        if pair.endswith("-uncentered"):  # the kernel's own softcap path (centered keys read around it)
            data = spec.model_dump(mode="json")
            data["keys"]["center"] = False
            spec = parse_spec(data)
    else:
        keys, values = OTHER_PAIRS[pair]
        spec = parse_spec({"name": pair, "window": 4, "keys": {"quantizer": keys}, "values": {"quantizer": values}})
    codecs = build_codecs(spec, num_layers=3, head_dim=head_dim, kv_heads=2)[layer]
    assert isinstance(codecs.reader, FusedQJLReader)
    batch = 2
    stores = []
    for codec in (codecs.keys, codecs.values):
        x = (torch.randn(batch, 2, tokens, head_dim, generator=gen) * 2 + 0.5).to(dtype)
        store = TokenStore(codec.name)
        store.append(codec.encode(x).map(lambda t: t.to(device)), first_position=0)
        stores.append(store)
    quantum = stores[0].layout.quantum
    counts = torch.full((batch, 2), tokens)
    counts[0, -1] = tokens - quantum
    counts[1, 0] = max(quantum, tokens // 2 // quantum * quantum)
    keep = torch.arange(tokens).expand(batch, 2, tokens)
    for store in stores:
        store.select(keep.to(device), counts.to(device))
    return Layer(codecs.reader, *stores)


def check(pair: str, layer: int, head_dim: int, groups: int, queries: int, tokens: int, device: str, *,
          splits=None, softcap=None, dtype=torch.float32, seed=0) -> None:
    built = make_layer(pair, layer, head_dim, tokens, device, seed, dtype)
    # sign dots sum in another order than the reference's matmul (fp32 accuracy through fp16 hi + lo parts)
    assert_fused_read_matches(
        built.reader, built.keys, built.values, head_dim, groups * queries, splits=splits, softcap=softcap, dtype=dtype,
        seed=seed, tolerance=5e-5,
    )


# (pair, layer, head_dim, query heads per KV head, query tokens, tokens stored): the shipped sketches at every
# head_dim (qjl's layers 0-1: 256 rows, 64 for the outliers; its other layers and qjl-lite 2 x head_dim), groups
# 1/4/8 and 1 or several query tokens; without outliers odd token counts
CASES = [
    ("qjl", 2, 64, 1, 1, 96), ("qjl", 0, 128, 8, 1, 64), ("qjl", 2, 256, 4, 1, 32),
    ("qjl-lite", 0, 64, 4, 3, 64), ("qjl-lite", 0, 256, 8, 1, 32),
    ("qjl0-fp8", 0, 64, 4, 1, 37), ("qjl0-k3", 0, 48, 1, 2, 45),
]


@pytest.mark.triton
@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("pair, layer, head_dim, groups, queries, tokens", CASES, ids=lambda v: str(v))
def test_fused_kernel_equals_the_estimator_path(pair, layer, head_dim, groups, queries, tokens, device):
    check(pair, layer, head_dim, groups, queries, tokens, device)


@pytest.mark.triton
@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("splits", [1, 3])
def test_one_split_and_several_merge_to_the_same_read(splits, device):
    check("qjl-lite", 0, 64, 4, 1, 96, device, splits=splits)


@pytest.mark.triton
@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("pair", ["qjl-uncentered", "qjl"])  # the kernel's cap; centered keys read around it
def test_softcap_and_fp16_queries(device, pair):
    check(pair, 2, 64, 4, 1, 64, device, softcap=2.0, dtype=torch.float16)


@pytest.mark.triton
@pytest.mark.parametrize("device", kernel_devices())
def test_a_query_block_taller_than_one_program_spans_row_blocks(device):
    check("qjl0-fp8", 0, 64, 8, 5, 21, device)  # 40 rows: two blocks of query rows


@pytest.mark.parametrize("spec", SHIPPED)
def test_shipped_qjl_specs_get_the_fused_reader_and_their_values_are_the_compiled_ones(spec):
    layers = build_codecs(kvcompress.load_spec(SPECS / f"{spec}.yaml"), num_layers=3, head_dim=64, kv_heads=1)
    assert all(isinstance(layer.reader, FusedQJLReader) for layer in layers)
    codec = layers[0].values
    assert operand(codec.quantizer, codec.encode(torch.randn(1, 1, codec.token_block, 64))).key == SPEC_VALUES


def test_qjl_keys_with_float_values_keep_the_default_reader():
    spec = parse_spec({
        "name": "mixed", "window": 4,
        "keys": {"quantizer": {"method": "qjl"}}, "values": {"quantizer": {"method": "float"}},
    })
    assert not isinstance(build_codecs(spec, num_layers=1, head_dim=64, kv_heads=2)[0].reader, FusedQJLReader)


@pytest.mark.triton
@pytest.mark.parametrize("device", kernel_devices())
def test_generation_through_the_fused_reader_matches_the_torch_reader(monkeypatch, device):
    """A tiny model generating with KVCOMPRESS_KERNELS=triton reads its packed middle through the kernel and
    generates what the torch path does."""
    spec = {
        "name": "fused-qjl", "window": 4, "compress_run": 8,
        "keys": {"quantizer": {"method": "qjl", "outliers": 2, "group": 8}, "estimator": {"method": "qjl"}},
        "values": {"quantizer": {"method": "scalar", "bits": 2, "axis": "token", "group": 8}},
    }
    assert_fused_generation_matches(monkeypatch, spec, reader_module, "fused_qjl_decode_triton", device)
