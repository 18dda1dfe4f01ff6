"""Spec models and hook implementations of kvcompress-prune (torch loads only inside the factories)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kvcompress import EvictionSpec, EvictorMethod, LayerContext, MethodSpec, PrunerMethod, hookimpl


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


class ScoredEvictionSpec(EvictionSpec):
    """What every evictor of kvcompress-prune shares: how the layer's budget is split over its KV heads."""

    heads: Literal["uniform", "adaptive"] = Field(
        "uniform",
        description="uniform: every KV head keeps the same count. adaptive (AdaKV, arXiv 2407.11550): the layer's "
        "budget goes to the best-scored tokens across its KV heads, so heads keep different counts.",
    )
    floor: float = Field(
        0.2, ge=0.0, le=1.0,
        description="With heads: adaptive, the fraction of its uniform share each head keeps at least (AdaKV's "
        "safeguard alpha).",
    )


class StreamingSpec(ScoredEvictionSpec):
    """StreamingLLM (arXiv 2309.17453): keep the most recent tokens; the spec's `sinks` keep the first ones."""

    method: Literal["streaming"] = "streaming"


class SnapKVSpec(ScoredEvictionSpec):
    """SnapKV (arXiv 2404.14469): keep the tokens the last `window` queries attend to most (averaged over them
    and the query heads of each KV head, then an average pool of `kernel` tokens); the observation window
    itself always stays."""

    method: Literal["snapkv"] = "snapkv"
    window: int = Field(64, ge=1, description="Observation window: how many of the latest queries score the tokens.")
    kernel: int = Field(5, ge=1, description="Average-pooling kernel over neighbouring tokens' scores (odd).")


class KNormSpec(ScoredEvictionSpec):
    """KNorm (arXiv 2406.11430): keep the keys of smallest L2 norm; reads no query."""

    method: Literal["knorm"] = "knorm"


class TOVASpec(ScoredEvictionSpec):
    """TOVA (arXiv 2401.06104): while decoding, keep the tokens the latest queries attend to most (averaged over
    the query heads of each KV head). Set `every` to evict as generation goes."""

    method: Literal["tova"] = "tova"
    window: int = Field(1, ge=1, description="How many of the latest queries score the tokens (TOVA: 1).")


def make_evictor(spec: ScoredEvictionSpec, ctx: LayerContext):
    from kvcompress_prune import eviction

    common = dict(adaptive=spec.heads == "adaptive", floor=spec.floor)
    if isinstance(spec, SnapKVSpec):
        return eviction.SnapKVEvictor(window=spec.window, kernel=spec.kernel, **common)
    if isinstance(spec, TOVASpec):
        return eviction.TOVAEvictor(query_window=spec.window, **common)
    if isinstance(spec, KNormSpec):
        return eviction.KNormEvictor(**common)
    return eviction.StreamingEvictor(**common)


@hookimpl
def kvcompress_evictors() -> list[EvictorMethod]:
    queries = frozenset({"queries"})
    return [
        EvictorMethod(name="streaming", spec=StreamingSpec, factory=make_evictor, description=StreamingSpec.__doc__.splitlines()[0]),
        EvictorMethod(name="snapkv", spec=SnapKVSpec, factory=make_evictor, description=SnapKVSpec.__doc__.splitlines()[0], observes=queries),
        EvictorMethod(name="knorm", spec=KNormSpec, factory=make_evictor, description=KNormSpec.__doc__.splitlines()[0]),
        EvictorMethod(name="tova", spec=TOVASpec, factory=make_evictor, description=TOVASpec.__doc__.splitlines()[0], observes=queries),
    ]
