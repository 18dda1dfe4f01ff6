"""A model adapter for GPT-NeoX (GPTNeoXForCausalLM), which the core does not cover.

GPT-NeoX projects queries, keys and values with one fused `query_key_value` linear layer whose output is,
per head, [query | key | value] (head_size channels each); RoPE then rotates only the first
rotary_pct * head_size channels of each head. The base class finds the attention modules (GPTNeoXAttention
has a layer_idx) and applies the model's own rotary embedding (partial rotary included); this adapter only
says where the keys before RoPE are. Loaded by the plugin's hook on first use: it imports torch.
"""

import torch

from kvcompress.hf.adapters import Adapter


def keys_from_fused_projection(module: torch.nn.Module, qkv: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The keys [batch, heads, tokens, head_dim] from the fused projection's output [batch, tokens, 3 * hidden]."""
    batch, tokens = qkv.shape[:2]
    per_head = qkv.view(batch, tokens, -1, 3 * head_dim)
    return per_head[..., head_dim : 2 * head_dim].transpose(1, 2)


class GPTNeoXAdapter(Adapter):
    def pre_rope_keys(self, module: torch.nn.Module):
        return module.query_key_value, keys_from_fused_projection
