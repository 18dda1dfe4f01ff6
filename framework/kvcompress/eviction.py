"""What an evictor sees: a layer's candidate tokens, their positions, keys and the attention the latest queries
give them; and the check of what it returns.

The cache (kvcompress.hf.cache) builds Candidates in one of two forms:
- at the end of a prefill whose layer holds no packed tokens yet: the full-precision tokens about to be
  compressed (`from_dense`), chosen one by one; the kept ones are then encoded, the others never are;
- otherwise (decoding with `every`, a later prompt): the packed tokens of the layer's stores (`from_stores`),
  chosen in whole groups of the stores' quantum (a KIVI key block), read through the keys' codec.
Sinks and the full-precision window are never candidates; they enter the softmax that `attention()` computes
(`context`), so the weights are the ones the model's attention gives.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from kvcompress.errors import KVCompressError
from kvcompress.pipeline import RoleCodec
from kvcompress.store import TokenStore

NEG_INF = float("-inf")


@dataclass
class Candidates:
    """The tokens of one layer an evictor chooses among, per (sequence, KV head).

    positions: absolute positions [batch, kv_heads, tokens] int64; valid: [batch, kv_heads, tokens] bool, False
    for a head's padding and for tokens the model's mask hides from the latest query (left padding);
    quantum: tokens are kept or dropped in whole groups of this many (index // quantum); step: each head's
    kept count is a multiple of this; scale: the attention's score scale; queries: the latest queries grouped
    by KV head [batch, kv_heads, group * w, head_dim] (query head-major, oldest first), None when the evictor
    reads none; query_positions: [group * w] int64.
    """

    positions: torch.Tensor
    valid: torch.Tensor
    quantum: int
    step: int
    scale: float
    queries: torch.Tensor | None
    query_positions: torch.Tensor | None
    score_fn: Callable[[torch.Tensor], torch.Tensor]
    keys_fn: Callable[[], torch.Tensor]
    context: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return self.positions.shape[2]

    @property
    def batch(self) -> int:
        return self.positions.shape[0]

    @property
    def kv_heads(self) -> int:
        return self.positions.shape[1]

    def keys(self) -> torch.Tensor:
        """The candidates' keys [batch, kv_heads, tokens, head_dim] (after RoPE; decoded when packed)."""
        return self.keys_fn()

    def attention(self) -> torch.Tensor:
        """float32 [batch, kv_heads, group * w, tokens]: the attention weight each of the latest queries gives
        each candidate, the softmax taken over every token the layer holds that the query sees (causal by
        position); 0 for invalid candidates."""
        if self.queries is None:
            raise KVCompressError("this evictor reads attention but declares no query window (query_window = 0)")
        q = self.queries
        visible = self.valid[:, :, None, :] & (self.positions[:, :, None, :] <= self.query_positions[:, None])
        logits = self.score_fn(q).float().mul_(self.scale).masked_fill_(~visible, NEG_INF)
        lse = torch.logsumexp(logits, dim=-1)
        for keys, positions in self.context:
            other = torch.matmul(q.float(), keys.float().transpose(-1, -2)).mul_(self.scale)
            other.masked_fill_(positions > self.query_positions[:, None], NEG_INF)
            lse = torch.logaddexp(lse, torch.logsumexp(other, dim=-1))
        return torch.exp(logits - lse[..., None]).nan_to_num_(0.0)

    @classmethod
    def from_dense(
        cls, keys: torch.Tensor, positions: torch.Tensor, step: int, visible: torch.Tensor | None = None, **common
    ) -> "Candidates":
        """Full-precision candidates: keys [batch, kv_heads, tokens, head_dim] at positions [tokens]. visible:
        [batch, positions] bool, what the latest query may see (None: everything)."""
        batch, heads, tokens, _ = keys.shape
        grid = positions.to(keys.device, torch.int64).expand(batch, heads, tokens)
        held = torch.ones_like(grid, dtype=torch.bool)
        return cls(
            positions=grid, valid=_visible(held, grid, visible), quantum=1, step=step,
            score_fn=lambda q: torch.matmul(q, keys.transpose(-1, -2)), keys_fn=lambda: keys, **common,
        )

    @classmethod
    def from_stores(
        cls, store: TokenStore, codec: RoleCodec, quantum: int, visible: torch.Tensor | None = None, **common
    ) -> "Candidates":
        """The packed tokens of a layer's key store, read through its codec (pruner, transform, estimator);
        a head's padding rows are not valid."""
        state = store.view()
        positions = store.position_tensor()
        padding = store.padding()
        held = torch.ones_like(positions, dtype=torch.bool) if padding is None else ~padding
        return cls(
            positions=positions, valid=_visible(held, positions, visible), quantum=quantum, step=quantum,
            score_fn=lambda q: codec.scores(q, state), keys_fn=lambda: codec.decode(state), **common,
        )

    def check(self, indices: torch.Tensor, counts: torch.Tensor, keep: int, who: str) -> None:
        """Fail, naming the evictor, when its selection breaks the contract of kvcompress.runtime.Evictor.select."""
        shape = (self.batch, self.kv_heads)
        if indices.dim() != 3 or tuple(indices.shape[:2]) != shape or tuple(counts.shape) != shape:
            raise KVCompressError(
                f"evictor {who} returned indices {tuple(indices.shape)} and counts {tuple(counts.shape)}; expected "
                f"[{shape[0]}, {shape[1]}, n] and [{shape[0]}, {shape[1]}]"
            )
        if bool((counts % self.step).any()) or bool((counts < 0).any()) or bool((counts > indices.shape[2]).any()):
            raise KVCompressError(f"evictor {who}: each head's count must be a multiple of {self.step} within indices")
        if bool((counts.sum(-1) > keep * self.kv_heads).any()):
            raise KVCompressError(f"evictor {who} kept more than {keep} tokens per head on average")
        slot = torch.arange(indices.shape[2], device=indices.device)
        used = slot < counts[..., None]
        if bool((used & ((indices < 0) | (indices >= self.tokens))).any()):
            raise KVCompressError(f"evictor {who} chose tokens outside the {self.tokens} candidates")
        if indices.shape[2] > 1 and bool((used[..., 1:] & (indices[..., 1:] <= indices[..., :-1])).any()):
            raise KVCompressError(f"evictor {who} must list each head's kept tokens once, in ascending order")


def _visible(held: torch.Tensor, positions: torch.Tensor, visible: torch.Tensor | None) -> torch.Tensor:
    """held [batch, kv_heads, tokens] and, where the model's mask is known, visible to the latest query."""
    if visible is None:
        return held
    seen = visible.to(held.device).expand(held.shape[0], -1)
    return held & seen.gather(1, positions.flatten(1)).view_as(held)


def group_queries(queries: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[batch, query_heads, w, head_dim] -> [batch, kv_heads, group * w, head_dim] (query heads of a KV head
    are consecutive, as grouped-query attention repeats them)."""
    batch, query_heads, w, dim = queries.shape
    return queries.reshape(batch, kv_heads, query_heads // kv_heads * w, dim)


__all__ = ["Candidates", "group_queries"]
