"""Spec models and hook implementations of kvcompress-prune (torch loads only inside the factories)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kvcompress import LayerContext, MethodSpec, PrunerMethod, hookimpl


class ThinKSpec(MethodSpec):
    """ThinK query-driven key channel pruning: store only the key channels recent queries weigh most.

    Per sequence and KV head, channel i scores mean(q_i^2) over the last `window` queries (and the query
    heads of the group) times mean(k_i^2) over the keys first compressed; the top head_dim - floor(ratio *
    head_dim) channels are kept for the rest of the sequence. Only kept channels are stored, and queries
    are read through them, so a pruned channel costs no bytes and drops out of the score. The later stages
    (a quantizer such as KIVI) work on the kept channels.
    """

    method: Literal["think"] = "think"
    ratio: float = Field(0.4, ge=0.0, lt=1.0, description="Fraction of key channels pruned (ThinK's lambda).")
    window: int = Field(32, ge=1, description="Observation window: how many of the latest queries score the channels.")


def make_think(spec: ThinKSpec, ctx: LayerContext):
    from kvcompress_prune.think import ThinKPruner

    return ThinKPruner(head_dim=ctx.head_dim, kv_heads=ctx.kv_heads, ratio=spec.ratio, window=spec.window)


@hookimpl
def kvcompress_pruners() -> list[PrunerMethod]:
    return [
        PrunerMethod(
            name="think",
            spec=ThinKSpec,
            factory=make_think,
            description=ThinKSpec.__doc__.splitlines()[0],
            roles=frozenset({"keys"}),
            observes=frozenset({"queries"}),
        )
    ]
