"""Codebooks learned from synthetic vectors, for tests and examples that have no calibrated file."""

from __future__ import annotations

from functools import cache

import torch

from kvcompress.methods import LayerContext
from kvcompress_rvq.codebooks import learn
from kvcompress_rvq.plugin import KMeansSpec, RVQSpec
from kvcompress_rvq.quantizer import RVQCodebooks


def structured_vectors(n: int, head_dim: int = 64, seed: int = 0) -> torch.Tensor:
    """Key-like vectors: low-rank structure, noise, and one outlier channel."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g) @ torch.randn(8, head_dim, generator=g) + 0.5 * torch.randn(n, head_dim, generator=g)
    x[:, 5] *= 6.0
    return x


@cache
def learned(depth: int, size: int, group: int = 32, layout: str = "strided", head_dim: int = 64,
            data: str = "gaussian") -> RVQCodebooks:
    quantizer = RVQSpec(depth=depth, codebook_size=size, group=group, layout=layout)
    spec = KMeansSpec(path="unused.safetensors", samples=4096, iterations=4)
    ctx = LayerContext(layer=0, num_layers=1, role="keys", head_dim=head_dim, kv_heads=2)
    if data == "gaussian":
        samples = torch.randn(4096, head_dim, generator=torch.Generator().manual_seed(1))
    else:
        samples = structured_vectors(4096, head_dim, seed=1)
    codewords = learn(spec, quantizer, samples, ctx)["codewords"]
    fields = {"depth": depth, "codebook_size": size, "group": group, "layout": layout}
    return RVQCodebooks(codewords, fields=fields, source="test codebooks")

