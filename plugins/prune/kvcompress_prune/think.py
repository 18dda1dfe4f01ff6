"""ThinK (Xu et al., arXiv 2407.21018): query-driven key channel pruning."""

from __future__ import annotations

import torch

from kvcompress.runtime import ChannelPruner, Observation


class ThinKPruner(ChannelPruner):
    """Keeps, per sequence and KV head, the channels with the largest query energy x key energy."""

    def __init__(self, head_dim: int, kv_heads: int, ratio: float, window: int):
        self.head_dim = head_dim
        self.kv_heads = kv_heads
        # As the reference: floor(ratio * head_dim) channels go.
        self.kept = head_dim - int(ratio * head_dim)
        self.window = window

    def channel_scores(self, keys: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """keys [b, kv_heads, t, d], queries [b, query_heads, n, d] -> [b, kv_heads, d].

        ||Q_w[:, i]||^2 * ||K[:, i]||^2 up to constant factors (means instead of sums), over the last `window`
        queries of every query head that reads the KV head; the ranking is ThinK's ||Q_w[:, i]|| ||K[:, i]||.
        """
        batch, heads, _, dim = queries.shape
        if heads % self.kv_heads or batch != keys.shape[0]:
            raise ValueError(
                f"think: queries of shape {tuple(queries.shape)} do not go with keys of shape {tuple(keys.shape)}"
            )
        recent = queries[:, :, -self.window :].float()
        query_energy = recent.pow(2).mean(2).view(batch, self.kv_heads, heads // self.kv_heads, dim).mean(2)
        return query_energy * keys.float().pow(2).mean(2)

    def select(self, x: torch.Tensor, observation: Observation) -> torch.Tensor:
        scores = self.channel_scores(x, observation.queries)
        return scores.topk(self.kept, dim=-1).indices.sort(dim=-1).values
