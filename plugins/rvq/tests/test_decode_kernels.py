"""The fused RVQ decode kernel equals the lookup-table estimator path it replaces.

Kernels run on each of kvcompress.testing.kernel_devices(): CUDA where a GPU answers, else the CPU under
TRITON_INTERPRET=1 (conftest.py), so shapes stay small. Codebooks are random: the kernel and the estimators must
agree whatever the codewords.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import kvcompress
from kvcompress.pipeline import LayerCodecs, build_codecs
from kvcompress.store import TokenStore
from kvcompress.testing import assert_fused_generation_matches, assert_fused_read_matches, kernel_devices, make_codec
from kvcompress_rvq import reader as reader_module
from kvcompress_rvq.codebooks import FILE_FORMAT
from kvcompress_rvq.quantizer import RVQCodebooks
from kvcompress_rvq.reader import FusedRVQReader


def random_codebooks(depth: int, size: int, group: int, layout: str) -> RVQCodebooks:
    codewords = torch.randn(depth, size, group, generator=torch.Generator().manual_seed(depth * size + group)).half()
    fields = {"depth": depth, "codebook_size": size, "group": group, "layout": layout}
    return RVQCodebooks(codewords, fields=fields, source="random test codebooks")


def make_stores(head_dim: int, depth: int, size: int, group: int, value_layout: str, tokens: int, device):
    """A fused reader over keys (strided groups) and values (value_layout) of `tokens` random tokens, each
    (sequence, head) then keeping its own count, so heads hold uneven numbers of tokens with padding rows."""
    codecs = {}
    for role, layout in (("keys", "strided"), ("values", value_layout)):
        quantizer = {"method": "rvq", "depth": depth, "codebook_size": size, "group": group, "layout": layout}
        codecs[role] = make_codec(
            quantizer, role=role, head_dim=head_dim, estimator={"method": "rvq-lut"},
            codebook=lambda ctx, layout=layout: random_codebooks(depth, size, group, layout),
        )
    reader = FusedRVQReader(LayerCodecs(layer=0, window=4, sinks=0, keys=codecs["keys"], values=codecs["values"]))
    gen = torch.Generator().manual_seed(head_dim + tokens)
    stores = []
    for codec in codecs.values():
        store = TokenStore(codec.name)
        x = torch.randn(2, 2, tokens, head_dim, generator=gen) * 2 + 0.5
        store.append(codec.encode(x).map(lambda t: t.to(device)), first_position=0)
        stores.append(store)
    counts = torch.tensor([[tokens, tokens - 3], [tokens // 2, tokens]])
    for store in stores:
        store.select(torch.arange(tokens).expand(2, 2, tokens).to(device), counts.to(device))
    return reader, *stores


# (head_dim, levels, codewords, channels per group, values' layout, query heads per KV head, query tokens, tokens):
# head_dim 64/128/256; 8-bit codes (one byte each), 6-bit codes straddling bytes, 5-bit codes of 8-channel groups;
# groups 1/4/8; odd token counts
CASES = [
    (64, 2, 256, 32, "contiguous", 4, 1, 37), (128, 3, 64, 32, "contiguous", 8, 1, 29),
    (256, 2, 64, 32, "strided", 1, 3, 21), (64, 3, 32, 8, "strided", 4, 2, 33),
]


@pytest.mark.triton
@pytest.mark.parametrize("device", kernel_devices())
@pytest.mark.parametrize("head_dim, depth, size, group, layout, groups, queries, tokens", CASES, ids=lambda v: str(v))
def test_fused_kernel_equals_the_estimator_path(head_dim, depth, size, group, layout, groups, queries, tokens, device):
    reader, keys, values = make_stores(head_dim, depth, size, group, layout, tokens, device)
    assert_fused_read_matches(reader, keys, values, head_dim, groups * queries)


@pytest.mark.triton
@pytest.mark.parametrize("device", kernel_devices())
def test_several_splits_softcap_and_fp16_queries(device):
    reader, keys, values = make_stores(64, 2, 64, 32, "contiguous", 70, device)
    assert_fused_read_matches(reader, keys, values, 64, 4, splits=3, softcap=2.0, dtype=torch.float16)


@pytest.mark.triton
@pytest.mark.parametrize("device", kernel_devices())
def test_a_query_block_taller_than_one_program_spans_row_blocks(device):
    reader, keys, values = make_stores(64, 2, 64, 32, "contiguous", 19, device)
    assert_fused_read_matches(reader, keys, values, 64, 40)  # two blocks of 32 query rows


def write_codebooks(path, layers: int, head_dim: int, quantizers: dict[str, dict]) -> None:
    """A codebook file of random codewords for every layer and role (no model named: any model of that geometry)."""
    tensors, entries = {}, {}
    for layer in range(layers):
        for role, quantizer in quantizers.items():
            codebooks = random_codebooks(quantizer["depth"], quantizer["codebook_size"], quantizer["group"], quantizer["layout"])
            tensors[f"layers.{layer}.{role}.codewords"] = codebooks.codewords
            entries[f"{layer}.{role}"] = {"quantizer": quantizer, "codebook": {"method": "kmeans", "path": str(path)}}
    metadata = {"format": FILE_FORMAT, "num_layers": str(layers), "head_dim": str(head_dim), "kv_heads": "2",
                "spec": "test", "entries": json.dumps(entries)}
    save_file(tensors, str(path), metadata=metadata)


@pytest.mark.triton
@pytest.mark.parametrize("device", kernel_devices())
def test_generation_through_the_fused_reader_matches_the_torch_reader(monkeypatch, tmp_path, device):
    """A tiny model generating with KVCOMPRESS_KERNELS=triton reads its packed middle through the kernel and
    generates what the torch path does."""
    quantizers = {
        "keys": {"method": "rvq", "depth": 2, "codebook_size": 16, "group": 8, "layout": "strided"},
        "values": {"method": "rvq", "depth": 2, "codebook_size": 16, "group": 8, "layout": "contiguous"},
    }
    write_codebooks(tmp_path / "cb.safetensors", layers=2, head_dim=16, quantizers=quantizers)
    codebook = {"method": "kmeans", "path": str(tmp_path / "cb.safetensors")}
    spec = {"name": "fused-rvq", "window": 4, "compress_run": 8}
    spec.update({role: {"quantizer": q, "estimator": {"method": "rvq-lut"}, "codebook": codebook} for role, q in quantizers.items()})
    assert_fused_generation_matches(monkeypatch, spec, reader_module, "fused_rvq_decode_triton", device)


def test_rvq_keys_and_values_get_the_fused_reader_and_other_values_do_not(tmp_path):
    quantizer = {"method": "rvq", "depth": 2, "codebook_size": 16, "group": 8, "layout": "strided"}
    write_codebooks(tmp_path / "cb.safetensors", layers=1, head_dim=16, quantizers={"keys": quantizer, "values": quantizer})
    keys = {"quantizer": quantizer, "estimator": {"method": "rvq-lut"},
            "codebook": {"method": "kmeans", "path": str(tmp_path / "cb.safetensors")}}
    both = kvcompress.parse_spec({"name": "rvq", "window": 4, "keys": keys, "values": keys})
    other = kvcompress.parse_spec({"name": "mixed", "window": 4, "keys": keys, "values": {"quantizer": {"method": "float"}}})
    assert isinstance(build_codecs(both, num_layers=1, head_dim=16, kv_heads=2)[0].reader, FusedRVQReader)
    assert not isinstance(build_codecs(other, num_layers=1, head_dim=16, kv_heads=2)[0].reader, FusedRVQReader)
