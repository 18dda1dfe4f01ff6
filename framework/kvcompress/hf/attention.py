"""Attention computed from the compressed cache, registered with transformers as "kvcompress".

A layer hands attention its segments in position order (kvcompress.hf.cache.CompressedLayer.read):
    sinks │ packed middle │ tail │ the forward's own tokens
Each segment gives a partial output with its log-sum-exp, and the partials merge exactly
(kvcompress_kernels.partial):
    dense segments   fused SDPA over the full-precision keys and values (grouped-query heads native);
    packed middle    the layer's reader (kvcompress.runtime.Reader: a fused kernel for the layer's method
                     pair, or the default that goes through the keys' and values' estimators), block by
                     block of tokens so that transient memory stays bounded.
A forward with nothing older than its own tokens (a prompt) is one dense segment: plain SDPA, exactly what
transformers' sdpa attention computes.

The mask is transformers' own sdpa mask, registered beside the attention and sized by the cache to every
position seen, so causal masking, left padding and sliding windows come from the model; each segment takes
its columns (by position). Where transformers skips the mask (plain causal attention), causality is applied
from the positions.

For layers whose pruners observe queries, the query this function receives (after RoPE: it exists nowhere
else) is recorded on the layer (kvcompress.hf.patch hands it over when the forward ends).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kvcompress.errors import KVCompressError
from kvcompress.hf.cache import CompressedLayer, Segment
from kvcompress.hf.fanout import FanoutLayer
from kvcompress.hf.rows import PaddedBatchLayer, first_real_positions
from kvcompress_kernels.partial import bias_from_mask, dense_partial, merge_partials

NAME = "kvcompress"
# Attribute the patch's pre-forward hook sets on an attention module: the CompressedCache of the running forward.
CACHE_ATTRIBUTE = "_kvcompress_cache"
# Attribute the patch sets on each attention module: keyword arguments its architecture may pass that change the
# attention math in ways this function does not implement (from the model adapter).
UNSUPPORTED_KWARGS_ATTRIBUTE = "_kvcompress_unsupported_kwargs"
UNSUPPORTED_KWARGS = {
    "s_aux": "learned attention-sink logits (gpt-oss)",
    "position_bias": "an additive position bias (T5-style)",
}
# Upper bound on the float32 score block of the packed middle; longer reads go block by block.
READ_BLOCK_BYTES = 64 * 2**20


def kvcompress_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The attention function transformers calls: query [b, hq, q, d] -> output [b, q, hq, d].

    With a CompressedCache in the running forward it attends over everything the layer holds; otherwise
    (no cache, use_cache=False) over the key and value it is given, with the same math.
    """
    for name, what in getattr(module, UNSUPPORTED_KWARGS_ATTRIBUTE, UNSUPPORTED_KWARGS).items():
        if kwargs.get(name) is not None:
            raise KVCompressError(
                f"{type(module).__name__} passes {name} ({what}) to attention, which kvcompress does not implement; "
                "this model is not supported"
            )
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    causal = getattr(module, "is_causal", True)
    cache = getattr(module, CACHE_ATTRIBUTE, None)
    if cache is None:
        segments = [Segment(range(0, key.shape[2]), key, value)]
        first_query = key.shape[2] - query.shape[2]
    else:
        if dropout:
            raise KVCompressError("attention dropout is on: the compressed cache is for inference, call model.eval()")
        layer = cache.layers[module.layer_idx]
        if not layer.seen and isinstance(layer, (CompressedLayer, FanoutLayer)):
            starts = first_real_positions(attention_mask, 0)
            if starts is not None and any(start != 0 for start in starts):  # held alone: padding enters no statistic
                layer = cache.split_rows(module.layer_idx, starts)
        if isinstance(layer, PaddedBatchLayer):
            return layer.attend(query, attention_mask, attend, scaling, softcap, causal), None
        if "queries" in layer.observes:
            layer.observe("queries", query)
        segments, first_query = layer.read()
        if layer.evictor is not None:
            layer.note_attention(scaling, attention_mask)
    output = attend(
        query, segments, first_query, attention_mask, scaling, softcap, causal, dropout if module.training else 0.0
    )
    return output, None


def attend(
    query: torch.Tensor,
    segments: list[Any],
    first_query: int,
    attention_mask: torch.Tensor | None,
    scaling: float,
    softcap: float | None = None,
    causal: bool = True,
    dropout: float = 0.0,
) -> torch.Tensor:
    """Softmax attention of query [b, hq, q, d] (at positions first_query ...) over the segments' tokens.

    attention_mask: transformers' 4D mask over positions [0, first_query + q) (boolean, True = visible, or
    additive), or None for plain causal attention. Returns [b, q, hq, d] in the query's dtype.
    """
    q_len = query.shape[2]
    width = first_query + q_len
    if attention_mask is not None and (attention_mask.shape[-1] != width or attention_mask.shape[-2] != q_len):
        raise KVCompressError(
            f"attention mask covers {attention_mask.shape[-2]} queries x {attention_mask.shape[-1]} positions, but the "
            f"layer has seen {width} positions for {q_len} queries; pass the 2D attention_mask and let the model build "
            "the 4D one"
        )
    only = segments[0] if len(segments) == 1 else None
    # sdpa's is_causal aligns the queries with the first keys, so without a mask it serves only q == keys or q == 1
    aligned = attention_mask is not None or q_len in (1, width)
    if only is not None and only.stores is None and only.positions == range(0, width) and softcap is None and aligned:
        # Every token in one full-precision segment: exactly transformers' sdpa attention.
        output = torch.nn.functional.scaled_dot_product_attention(
            query, only.keys, only.values, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
            is_causal=attention_mask is None and causal and q_len > 1, enable_gqa=query.shape[1] != only.keys.shape[1],
        )
        return output.transpose(1, 2).contiguous()
    if dropout:
        raise KVCompressError("attention dropout over a compressed cache is not supported: call model.eval()")
    outputs, lses = [], []
    for segment in segments:
        if segment.stores is None:
            bias = _dense_bias(segment.positions, attention_mask, first_query, q_len, causal, query)
            output, lse = dense_partial(query, segment.keys, segment.values, bias, scaling, softcap)
        else:
            output, lse = _packed_partial(query, segment, attention_mask, first_query, causal, scaling, softcap)
        outputs.append(output)
        lses.append(lse)
    output, _ = merge_partials(outputs, lses)
    return output.to(query.dtype).transpose(1, 2).contiguous()


def _dense_bias(
    positions: range, mask: torch.Tensor | None, first_query: int, q_len: int, causal: bool, query: torch.Tensor
) -> torch.Tensor | None:
    """Additive bias [b, 1|hq, q, t] (in the query's dtype) of a segment at contiguous positions (None: every
    token visible)."""
    if mask is not None:
        return bias_from_mask(mask[..., positions.start : positions.stop], query.dtype)
    if causal and positions.stop > first_query + 1:
        tensor = torch.arange(positions.start, positions.stop, device=query.device)
        return _causal_bias(tensor, first_query, q_len, query.dtype)
    return None


def _causal_bias(positions: torch.Tensor, first_query: int, q_len: int, dtype: torch.dtype) -> torch.Tensor:
    """[..., q, t]: hidden where a token's position is after the query's (positions [..., t])."""
    query_positions = torch.arange(first_query, first_query + q_len, device=positions.device)
    hidden = positions.unsqueeze(-2) > query_positions[:, None]
    return torch.zeros(hidden.shape, dtype=dtype, device=positions.device).masked_fill_(hidden, torch.finfo(dtype).min)


def _packed_partial(
    query: torch.Tensor,
    segment: Any,
    mask: torch.Tensor | None,
    first_query: int,
    causal: bool,
    scaling: float,
    softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The packed middle through the layer's reader, block by block of tokens, merged exactly.

    Queries are grouped by KV head ([b, kv_heads, groups * q, d]) so grouped-query heads share each read."""
    key_store, value_store = segment.stores
    batch, heads, q_len, dim = query.shape
    kv_heads = key_store.tokens.shape[1]
    groups = heads // kv_heads
    grouped = query.reshape(batch, kv_heads, groups * q_len, dim)
    quantum = key_store.layout.quantum
    block = max(quantum, READ_BLOCK_BYTES // (4 * batch * heads * q_len) // quantum * quantum)
    outputs, lses = [], []
    for start in range(0, key_store.length, block):
        stop = min(key_store.length, start + block)
        bias = _packed_bias(key_store, start, stop, mask, first_query, q_len, causal, groups)
        output, lse = segment.reader.attend(
            grouped, key_store.view(start, stop), value_store.view(start, stop), bias, scaling, softcap
        )
        outputs.append(output)
        lses.append(lse)
    output, lse = merge_partials(outputs, lses)
    return output.view(batch, heads, q_len, dim), lse.view(batch, heads, q_len)


def _packed_bias(
    store: Any, start: int, stop: int, mask: torch.Tensor | None, first_query: int, q_len: int, causal: bool, groups: int
) -> torch.Tensor | None:
    """Additive float32 bias for the grouped queries over tokens [start, stop) of a store: the model's mask
    columns at the tokens' positions (or causality from them), and the padding of heads holding fewer tokens.
    Broadcastable to [b, kv_heads, groups * q, t]."""
    positions = store.token_positions(start, stop)
    bias = None
    if mask is not None:
        if isinstance(positions, range):
            columns = mask[..., positions.start : positions.stop]  # [b, 1|hq, q, t]
        else:  # per (sequence, head) positions [b, kv, t]: the mask's columns per head
            if mask.shape[1] > 1:
                positions = positions.repeat_interleave(mask.shape[1] // positions.shape[1], dim=1)
            batch, heads, tokens = positions.shape
            rows = mask.expand(batch, heads, q_len, mask.shape[-1])
            columns = rows.gather(-1, positions[:, :, None, :].expand(batch, heads, q_len, tokens))
        bias = _group_rows(bias_from_mask(columns), groups, store.tokens.shape[1])
    elif causal:
        last = positions.stop - 1 if isinstance(positions, range) else int(positions.max())
        if last > first_query:
            tensor = (
                torch.arange(positions.start, positions.stop, device=store.tokens.device)
                if isinstance(positions, range) else positions
            )
            bias = _group_rows(_causal_bias(tensor, first_query, q_len, torch.float32), groups, store.tokens.shape[1])
    padding = store.padding(start, stop)
    if padding is not None:
        hidden = bias_from_mask(~padding).unsqueeze(2)
        bias = hidden if bias is None else bias + hidden
    return bias


def _group_rows(bias: torch.Tensor, groups: int, kv_heads: int) -> torch.Tensor:
    """A bias [b, 1|kv_heads|query_heads, q, t] (or [q, t]) laid out for queries grouped by KV head:
    broadcastable to [b, kv_heads, groups * q, t], whose rows run over (group, query)."""
    if bias.dim() == 2:
        bias = bias[None, None]
    batch, heads, q_len, tokens = bias.shape
    if heads == kv_heads * groups and groups > 1:
        return bias.reshape(batch, kv_heads, groups * q_len, tokens)
    if q_len == 1:
        return bias
    return bias.unsqueeze(2).expand(batch, heads, groups, q_len, tokens).reshape(batch, heads, groups * q_len, tokens)


AttentionInterface.register(NAME, kvcompress_attention)
# The sdpa mask as it is: None (skipped) means what it means to sdpa, handled in attend().
AttentionMaskInterface.register(NAME, sdpa_mask)
