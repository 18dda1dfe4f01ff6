import torch

from kvcompress import ChannelPruner, Observation


class KeyNormPruner(ChannelPruner):
    """Keeps the channels with the largest pre-RoPE key energy."""

    def __init__(self, head_dim: int, keep: int):
        self.head_dim, self.kept = head_dim, keep

    def select(self, x: torch.Tensor, observation: Observation) -> torch.Tensor:
        energy = observation.pre_rope_keys.float().pow(2).mean(2)  # [batch, kv_heads, head_dim]
        return energy.topk(self.kept, dim=-1).indices.sort(dim=-1).values
