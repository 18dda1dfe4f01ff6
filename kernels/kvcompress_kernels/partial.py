"""Partial attention: the output of softmax attention over one segment of the keys, with its log-sum-exp,
and the exact merge of such partials (flash-decoding's split-K combine).

For scores s_j over a segment, lse = log sum_j exp(s_j) and out = sum_j exp(s_j - lse) v_j. Segments that
partition the keys merge exactly:
    lse = log sum_i exp(lse_i),   out = sum_i exp(lse_i - lse) out_i
so each segment (dense full-precision tokens, packed middle, the forward's own tokens) can be computed by
whatever reads it best (SDPA for dense ones, an estimator or a fused kernel for packed ones).

Masks are additive biases (0 where visible, a very negative finite number where hidden), so a row that sees
nothing in one segment gets a negligible weight in the merge instead of a NaN.
"""

from __future__ import annotations

import torch

def merge_partials(outputs: list[torch.Tensor], lses: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge partials out_i [..., n, d] (float32) with lse_i [..., n] into one (output, lse)."""
    if len(outputs) == 1:
        return outputs[0], lses[0]
    stacked = torch.stack(lses)
    total = torch.logsumexp(stacked, dim=0)
    weights = torch.exp(stacked - total)
    merged = weights[0].unsqueeze(-1) * outputs[0]
    for weight, output in zip(weights[1:], outputs[1:]):
        merged.addcmul_(weight.unsqueeze(-1), output)
    return merged, total


def bias_from_mask(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A boolean (True = visible) or additive float mask as an additive bias of `dtype`."""
    low = torch.finfo(dtype).min
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, low)
    return mask.to(dtype).clamp_(min=low)


def scores_partial(
    scores: torch.Tensor, bias: torch.Tensor | None, softcap: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled scores [..., n, t] (float32) -> (softmax weights, lse [..., n]), after softcap and the bias."""
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if bias is not None:
        scores = scores + bias
    lse = torch.logsumexp(scores, dim=-1)
    return torch.exp(scores - lse.unsqueeze(-1)), lse


def dense_partial(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of query [b, hq, q, d] over full-precision keys/values [b, h, t, d] (hq a multiple of h:
    grouped-query heads share a KV head) with an additive bias broadcastable to [b, hq, q, t].

    Returns (output [b, hq, q, d] float32, lse [b, hq, q] float32). On the CPU this is the fused SDPA kernel
    that also returns the log-sum-exp; with softcapping, or elsewhere, plain float32 math.
    """
    if softcap is None and query.device.type == "cpu" and keys.dtype == query.dtype:
        if bias is not None:
            bias = bias.to(query.dtype)
        output, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, keys, values, 0.0, False, attn_mask=bias, scale=scale
        )
        return output.float(), lse.float()
    batch, heads, q_len, dim = query.shape
    kv_heads = keys.shape[1]
    grouped = query.reshape(batch, kv_heads, heads // kv_heads * q_len, dim).float()
    scores = (grouped @ keys.float().transpose(-1, -2)).mul_(scale)
    scores = scores.view(batch, kv_heads, heads // kv_heads, q_len, -1)
    if bias is not None:  # [b, 1|hq, q, t] (or [q, t]) onto [b, kv_heads, groups, q, t]
        bias = bias.float().reshape(-1, 1 if bias.dim() == 2 or bias.shape[1] == 1 else heads, *bias.shape[-2:])
        bias = bias.unsqueeze(2) if bias.shape[1] == 1 else bias.view(bias.shape[0], kv_heads, heads // kv_heads, *bias.shape[-2:])
    weights, lse = scores_partial(scores, bias, softcap)
    output = weights.view(batch, kv_heads, -1, keys.shape[2]) @ values.float()
    return output.view(batch, heads, q_len, -1), lse.view(batch, heads, q_len)
