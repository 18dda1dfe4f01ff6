"""Token evictors: StreamingLLM, SnapKV, KNorm and TOVA scores, kept per head uniformly or with AdaKV's
per-head budgets. The core (kvcompress.eviction) hands them Candidates and frees what they do not keep."""

from __future__ import annotations

from abc import abstractmethod

import torch
import torch.nn.functional as F

from kvcompress.eviction import Candidates
from kvcompress.runtime import Evictor

NEG_INF = float("-inf")


class ScoredEvictor(Evictor):
    """Keeps the candidates with the highest scores: `keep` per head (uniform), or a layer budget of
    keep x kv_heads shared across the heads by score, each head keeping at least `floor` of its uniform
    share (adaptive, AdaKV's safeguard)."""

    def __init__(self, adaptive: bool = False, floor: float = 0.2, query_window: int = 0):
        self.adaptive = adaptive
        self.floor = floor
        self.query_window = query_window

    @abstractmethod
    def scores(self, candidates: Candidates) -> torch.Tensor:
        """float [batch, kv_heads, tokens]: higher is kept first."""

    def select(self, candidates: Candidates, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.scores(candidates).float().masked_fill(~candidates.valid, NEG_INF)
        return choose(scores, keep, candidates.quantum, candidates.step, self.floor if self.adaptive else None)


def choose(
    scores: torch.Tensor, keep: int, quantum: int, step: int, floor: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens with the highest scores [batch, kv_heads, tokens], in whole groups of `quantum` (a group
    scores the mean of its tokens), each head's count a multiple of `step` (a multiple of quantum).

    floor None: every head keeps `keep`. Otherwise AdaKV: the layer keeps keep x kv_heads tokens per sequence,
    the best groups across all its heads, after each head's best floor x keep are set aside for it.
    Returns (indices [batch, kv_heads, longest count] ascending per head, counts [batch, kv_heads])."""
    batch, heads, tokens = scores.shape
    groups = scores.view(batch, heads, tokens // quantum, quantum).mean(-1)
    if floor is None:
        counts = torch.full((batch, heads), keep, dtype=torch.int64, device=scores.device)
    else:
        counts = _adaptive_counts(groups, keep, quantum, step, floor)
    longest = int(counts.max()) // quantum
    ranked = groups.argsort(dim=-1, descending=True)[..., :longest]
    unused = torch.arange(longest, device=scores.device) >= (counts // quantum)[..., None]
    # unused slots sort last: a group index past every real one
    chosen = ranked.masked_fill(unused, groups.shape[-1]).sort(dim=-1).values
    indices = (chosen[..., None] * quantum + torch.arange(quantum, device=scores.device)).flatten(2)
    return indices.clamp(max=tokens - 1), counts


def _adaptive_counts(groups: torch.Tensor, keep: int, quantum: int, step: int, floor: float) -> torch.Tensor:
    """AdaKV's per-head counts in tokens: each head's safeguard share, then the layer's best remaining groups
    wherever they are; rounded down to `step` per head, the tokens that frees handed back a step at a time to
    the heads that lost the most to rounding."""
    batch, heads, count = groups.shape
    safe = int(keep * floor) // quantum
    boosted = groups.clone()
    if safe:
        top = groups.topk(safe, dim=-1).indices
        boosted.scatter_(-1, top, float("inf"))
    total = keep * heads // quantum
    chosen = boosted.flatten(1).topk(total, dim=-1).indices // count
    per_head = torch.zeros(batch, heads, dtype=torch.int64, device=groups.device)
    per_head.scatter_add_(1, chosen, torch.ones_like(chosen))
    wanted = per_head * quantum
    counts = wanted // step * step
    spare = (keep * heads - counts.sum(-1)) // step
    order = (wanted - counts).argsort(dim=-1, descending=True)
    bonus = (torch.arange(heads, device=groups.device) < spare[:, None]).long() * step
    counts.scatter_add_(1, order, bonus)
    return counts.clamp(max=count * quantum)


class StreamingEvictor(ScoredEvictor):
    """StreamingLLM: the most recent tokens stay (the spec's `sinks` keep the first ones)."""

    def scores(self, candidates: Candidates) -> torch.Tensor:
        return candidates.positions.float()


class KNormEvictor(ScoredEvictor):
    """KNorm: keys of small norm stay (they draw the most attention), no query needed."""

    def scores(self, candidates: Candidates) -> torch.Tensor:
        return -candidates.keys().float().norm(dim=-1)


class SnapKVEvictor(ScoredEvictor):
    """SnapKV: the attention the last `window` queries give each token, averaged over them and the query
    heads of its KV head, smoothed by an average pool of `kernel` tokens; tokens inside the observation
    window always stay."""

    def __init__(self, window: int, kernel: int, **kwargs):
        super().__init__(query_window=window, **kwargs)
        self.kernel = kernel

    def scores(self, candidates: Candidates) -> torch.Tensor:
        weights = candidates.attention().mean(dim=2)
        batch, heads, tokens = weights.shape
        pooled = F.avg_pool1d(
            weights.view(batch * heads, 1, tokens), self.kernel, stride=1, padding=self.kernel // 2
        ).view(batch, heads, tokens)
        observed = candidates.positions >= int(candidates.query_positions.min())
        return pooled.masked_fill(observed, float("inf"))


class TOVAEvictor(ScoredEvictor):
    """TOVA: the attention of the latest `window` queries (1: the current one), averaged over them and the
    query heads of each KV head; meant to run while decoding (`every`)."""

    def scores(self, candidates: Candidates) -> torch.Tensor:
        return candidates.attention().mean(dim=2)


__all__ = ["KNormEvictor", "ScoredEvictor", "SnapKVEvictor", "StreamingEvictor", "TOVAEvictor", "choose"]
