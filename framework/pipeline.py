"""Spec -> per-layer codecs: the registry's factories assembled into one object per layer and role."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from kvcompress.methods import ROLES, LayerContext, Role
from kvcompress.plugins import Registry, get_registry
from kvcompress.runtime import Estimator, Quantizer, Transform
from kvcompress.spec import CacheSpec, PipelineSpec
from kvcompress.state import PackedState


@dataclass
class RoleCodec:
    """The stages of one role of one layer: transform -> quantizer, read back through the estimator."""

    name: str
    quantizer: Quantizer
    estimator: Estimator
    transform: Transform | None = None

    @property
    def token_block(self) -> int:
        return self.quantizer.token_block

    def encode(self, x: torch.Tensor) -> PackedState:
        if not torch.isfinite(x).all():
            bad = (~torch.isfinite(x)).sum().item()
            raise ValueError(
                f"{self.name}: {bad} non-finite values (NaN or Inf) in the tensor to compress; "
                "the model produced them upstream of the cache (check its dtype and inputs)"
            )
        if x.shape[2] % self.token_block:
            raise ValueError(f"{self.name}: encode needs a multiple of {self.token_block} tokens, got {x.shape[2]}")
        if self.transform is not None:
            x = self.transform.forward(x)
        return self.quantizer.encode(x)

    def decode(self, state: PackedState) -> torch.Tensor:
        x = self.quantizer.decode(state)
        return self.transform.inverse(x) if self.transform is not None else x

    def scores(self, query: torch.Tensor, state: PackedState) -> torch.Tensor:
        """query grouped by KV head [batch, kv_heads, n, head_dim] -> [batch, kv_heads, n, tokens]."""
        if self.transform is not None:
            query = self.transform.forward(query)
        return self.estimator.scores(query, state, self.quantizer)

    def mix(self, weights: torch.Tensor, state: PackedState) -> torch.Tensor:
        out = self.estimator.mix(weights, state, self.quantizer)
        return self.transform.inverse(out) if self.transform is not None else out

    def constants(self) -> dict[str, torch.Tensor]:
        found = dict(self.quantizer.constants())
        if self.transform is not None:
            found.update({f"transform.{k}": v for k, v in self.transform.constants().items()})
        return found


@dataclass
class LayerCodecs:
    """Everything one cache layer needs: window and sinks, and a codec per role."""

    layer: int
    window: int
    sinks: int
    keys: RoleCodec
    values: RoleCodec

    @property
    def token_block(self) -> int:
        """Keys and values compress the same token range, so blocks are a multiple of both."""
        return math.lcm(self.keys.token_block, self.values.token_block)


def build_role_codec(
    pipeline: PipelineSpec, ctx: LayerContext, registry: Registry
) -> RoleCodec:
    codebook = None
    if pipeline.codebook is not None:
        codebook = registry.get("codebook", pipeline.codebook.method).factory(pipeline.codebook, ctx)
        ctx = LayerContext(**{**ctx.__dict__, "codebook": codebook})
    quantizer = registry.get("quantizer", pipeline.quantizer.method).factory(pipeline.quantizer, ctx)
    estimator_spec = pipeline.estimator or registry.get("estimator", "decode").spec()
    estimator = registry.get("estimator", estimator_spec.method).factory(estimator_spec, ctx)
    transform = None
    if pipeline.transform is not None:
        transform = registry.get("transform", pipeline.transform.method).factory(pipeline.transform, ctx)
    name = f"layer {ctx.layer} {ctx.role} ({pipeline.quantizer.method})"
    return RoleCodec(name=name, quantizer=quantizer, estimator=estimator, transform=transform)


def build_codecs(
    spec: CacheSpec,
    num_layers: int,
    head_dim: int,
    kv_heads: int,
    model: str | None = None,
    registry: Registry | None = None,
) -> list[LayerCodecs]:
    """One LayerCodecs per model layer, overrides applied."""
    registry = registry or get_registry()
    spec.check_layers(num_layers)
    spec_dir = str(Path(spec.source).resolve().parent) if spec.source else None
    layers = []
    for index in range(num_layers):
        plan = spec.layer(index)
        roles: dict[Role, RoleCodec] = {}
        for role in ROLES:
            ctx = LayerContext(
                layer=index, num_layers=num_layers, role=role, head_dim=head_dim, kv_heads=kv_heads,
                spec_dir=spec_dir, model=model,
            )
            roles[role] = build_role_codec(getattr(plan, role), ctx, registry)
        layers.append(LayerCodecs(layer=index, window=plan.window, sinks=plan.sinks, **roles))
    return layers
