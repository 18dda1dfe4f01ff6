"""Attention computed from the compressed cache, registered with transformers as "kvcompress".

For a layer holding [sinks | packed middle | tail] (position order), with queries grouped by KV head:

    scores  = [q @ sinks_k^T,  keys estimator scores(q, packed keys),  q @ tail_k^T] * scaling (+ softcap)
    weights = softmax(scores + mask) in float32
    output  = w_sinks @ sinks_v + values estimator mix(w_middle, packed values) + w_tail @ tail_v

The estimators come from the spec (the core's "decode", or a plugin's), so methods that read their
packed state directly plug in without this module knowing them. The mask is transformers' own sdpa mask,
registered beside the attention and sized by the cache to every held token, so causal masking, left
padding and sliding windows come from the model exactly as for sdpa; where transformers skips it (plain
causal attention), the causal mask is built here one query chunk at a time.

For layers whose pruners observe queries, the query this function receives (after RoPE: it exists nowhere
else) is recorded on the layer; the patch's post-forward hook hands it to the layer (kvcompress.hf.patch).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kvcompress.errors import KVCompressError
from kvcompress.pipeline import LayerCodecs

NAME = "kvcompress"
# Attribute the patch's pre-forward hook sets on an attention module: the CompressedCache of the running forward.
CACHE_ATTRIBUTE = "_kvcompress_cache"
# Keyword arguments some models pass that change the attention math in ways this function does not implement.
UNSUPPORTED_KWARGS = {
    "s_aux": "learned attention-sink logits (gpt-oss)",
    "position_bias": "an additive position bias (T5-style)",
}
# Upper bound on the float32 score block of one query chunk; long prefills run in query chunks under it.
SCORE_CHUNK_BYTES = 256 * 2**20


class Segment(Protocol):
    """A run of consecutive tokens of one layer that attention can score and mix."""

    length: int

    def scores(self, query: torch.Tensor) -> torch.Tensor: ...

    def mix(self, weights: torch.Tensor) -> torch.Tensor: ...


class DenseSegment:
    """Full-precision keys and values [batch, kv_heads, tokens, head_dim]."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys, self.values, self.length = keys, values, keys.shape[2]

    def scores(self, query: torch.Tensor) -> torch.Tensor:
        return query @ self.keys.to(query.dtype).transpose(-1, -2)

    def mix(self, weights: torch.Tensor) -> torch.Tensor:
        return weights @ self.values.to(weights.dtype)


class PackedSegment:
    """The packed middle of a layer, read through the spec's estimators."""

    def __init__(self, codecs: LayerCodecs, key_state: Any, value_state: Any):
        self.codecs, self.key_state, self.value_state = codecs, key_state, value_state
        self.length = key_state.tokens

    def scores(self, query: torch.Tensor) -> torch.Tensor:
        return self.codecs.keys.scores(query, self.key_state)

    def mix(self, weights: torch.Tensor) -> torch.Tensor:
        return self.codecs.values.mix(weights, self.value_state).to(weights.dtype)


def layer_segments(layer: Any) -> list[Segment]:
    """The non-empty segments of a CompressedLayer, in position order."""
    segments: list[Segment] = [DenseSegment(layer.sink_keys, layer.sink_values)]
    if layer.key_state is not None:
        segments.append(PackedSegment(layer.codecs, layer.key_state, layer.value_state))
    segments.append(DenseSegment(layer.tail_keys, layer.tail_values))
    return [s for s in segments if s.length]


def exact_new_token_segments(
    layer: Any, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, causal: bool
) -> tuple[list[Segment], torch.Tensor]:
    """Segments in which the tokens of the running forward (the newest key.shape[2] held) are read in full
    precision from `key`/`value`, as the published methods do in prefill, and older ones from the layer.

    Returns the segments and the mask re-indexed to their columns. A packed middle that already holds some
    of the new tokens is read whole, with those columns masked out (packed rows cannot be split by token).
    """
    new, length = key.shape[2], layer.length
    old = length - new
    sinks, packed = layer.sink_tokens, layer.compressed_tokens
    device = key.device
    segments: list[Segment] = []
    columns: list[torch.Tensor] = []  # the position of each score column
    if min(sinks, old) > 0:
        segments.append(DenseSegment(layer.sink_keys[:, :, :old], layer.sink_values[:, :, :old]))
        columns.append(torch.arange(min(sinks, old), device=device))
    if packed and sinks < old:
        segments.append(PackedSegment(layer.codecs, layer.key_state, layer.value_state))
        columns.append(torch.arange(sinks, sinks + packed, device=device))
    if old > sinks + packed:
        tail = old - sinks - packed
        segments.append(DenseSegment(layer.tail_keys[:, :, :tail], layer.tail_values[:, :, :tail]))
        columns.append(torch.arange(sinks + packed, old, device=device))
    segments.append(DenseSegment(key, value))
    fresh = torch.arange(old, length, device=device)
    position = torch.cat(columns + [fresh])
    # Columns of held copies of the new tokens (inside the packed middle) are hidden; the fresh ones are not.
    hidden = torch.cat([c >= old for c in columns] + [torch.zeros_like(fresh, dtype=torch.bool)])
    if len(position) == length:
        # Every position once, in order: the model's mask (or its absence) applies as it is.
        return segments, mask
    if mask is None:
        mask = _causal_mask(new, length, device) if causal else torch.ones(1, 1, new, length, dtype=torch.bool, device=device)
    _check_mask(mask, new, length)
    mask = mask.index_select(-1, position)
    if mask.dtype == torch.bool:
        mask = mask & ~hidden
    else:
        mask = mask.masked_fill(hidden, torch.finfo(mask.dtype).min)
    return segments, mask


def _check_mask(mask: torch.Tensor, q_len: int, length: int) -> None:
    if mask.shape[-1] != length or mask.shape[-2] != q_len:
        raise KVCompressError(
            f"attention mask covers {mask.shape[-2]} queries x {mask.shape[-1]} keys, but the layer holds {length} "
            f"tokens for {q_len} queries; pass the 2D attention_mask and let the model build the 4D one"
        )


def _causal_mask(q_len: int, length: int, device: torch.device) -> torch.Tensor:
    """[1, 1, q_len, length]: the queries are the newest q_len tokens, query i at position length - q_len + i."""
    return torch.ones(q_len, length, dtype=torch.bool, device=device).tril(length - q_len)[None, None]


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
    for name, what in UNSUPPORTED_KWARGS.items():
        if kwargs.get(name) is not None:
            raise KVCompressError(
                f"{type(module).__name__} passes {name} ({what}) to attention, which kvcompress does not implement; "
                "this model is not supported"
            )
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    cache = getattr(module, CACHE_ATTRIBUTE, None)
    if cache is None:
        segments: list[Segment] = [DenseSegment(key, value)]
    else:
        if dropout:
            raise KVCompressError("attention dropout is on: the compressed cache is for inference, call model.eval()")
        layer = cache.layers[module.layer_idx]
        if "queries" in layer.observes:
            layer.observe("queries", query)
        if cache.exact_new_tokens:
            segments, attention_mask = exact_new_token_segments(
                layer, key, value, attention_mask, getattr(module, "is_causal", True)
            )
        else:
            segments = layer_segments(layer)
        layer.attended = True
    output = attend(
        query,
        segments,
        kv_heads=key.shape[1],
        attention_mask=attention_mask,
        scaling=scaling,
        softcap=softcap,
        dropout=dropout if module.training else 0.0,
        causal=getattr(module, "is_causal", True),
    )
    return output, None


def attend(
    query: torch.Tensor,
    segments: list[Segment],
    kv_heads: int,
    attention_mask: torch.Tensor | None,
    scaling: float,
    softcap: float | None = None,
    dropout: float = 0.0,
    causal: bool = True,
) -> torch.Tensor:
    """Softmax attention of query [b, hq, q, d] over segments that together hold `length` tokens.

    Queries are grouped by KV head ([b, kv_heads, groups * q, d]) for the segments, so grouped-query
    attention costs nothing extra. Returns [b, q, hq, d_v] in the query's dtype.
    """
    batch, heads, q_len, dim = query.shape
    groups = heads // kv_heads
    length = sum(s.length for s in segments)
    mask = _grouped_mask(attention_mask, q_len, length, heads, kv_heads)
    chunk = max(1, SCORE_CHUNK_BYTES // max(1, 4 * batch * heads * length))
    outputs = []
    for start in range(0, q_len, chunk):
        stop = min(q_len, start + chunk)
        rows = stop - start
        grouped = query[:, :, start:stop].reshape(batch, kv_heads, groups * rows, dim)
        # Each segment writes its columns of one float32 block (no concatenated copy).
        scores = torch.empty(batch, kv_heads, groups * rows, length, dtype=torch.float32, device=query.device)
        offset = 0
        for s in segments:
            scores[..., offset : offset + s.length] = s.scores(grouped)
            offset += s.length
        scores.mul_(scaling)
        if softcap is not None:
            scores = torch.tanh(scores.div_(softcap)).mul_(softcap)
        scores = scores.view(batch, kv_heads, groups, rows, length)
        if mask is not None:
            rows_mask = mask[..., start:stop, :]
            if rows_mask.dtype == torch.bool:
                scores.masked_fill_(~rows_mask, torch.finfo(torch.float32).min)
            else:
                scores.add_(rows_mask)
        elif causal:
            # No mask from the model means plain causal attention of the newest q_len tokens (what sdpa's
            # is_causal does for the cases where transformers skips the mask), built one chunk at a time.
            position = torch.arange(length - q_len + start, length - q_len + stop, device=query.device)
            hidden = torch.arange(length, device=query.device)[None, :] > position[:, None]
            scores.masked_fill_(hidden, torch.finfo(torch.float32).min)
        weights = torch.softmax(scores, dim=-1)
        if dropout:
            weights = torch.nn.functional.dropout(weights, p=dropout, training=True)
        weights = weights.to(query.dtype).view(batch, kv_heads, groups * rows, length)
        out = None
        offset = 0
        for s in segments:
            part = s.mix(weights[..., offset : offset + s.length])
            out = part if out is None else out + part
            offset += s.length
        outputs.append(out.view(batch, kv_heads, groups, rows, -1).reshape(batch, heads, rows, -1))
    output = torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]
    return output.transpose(1, 2).contiguous()


def _grouped_mask(
    mask: torch.Tensor | None, q_len: int, length: int, heads: int, kv_heads: int
) -> torch.Tensor | None:
    """The model's 4D mask (boolean, or additive float) viewed to broadcast over [b, kv_heads, groups, q, length]."""
    if mask is None:
        return None
    _check_mask(mask, q_len, length)
    if mask.shape[1] == 1:
        return mask[:, :, None]
    if mask.shape[1] == heads:
        return mask.view(mask.shape[0], kv_heads, heads // kv_heads, q_len, length)
    raise KVCompressError(f"attention mask has {mask.shape[1]} heads; expected 1 or {heads}")


AttentionInterface.register(NAME, kvcompress_attention)
# The sdpa mask as it is: None (skipped) means what it means to sdpa, handled in attend().
AttentionMaskInterface.register(NAME, sdpa_mask)
