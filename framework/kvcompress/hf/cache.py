"""CompressedCache: a transformers Cache whose layers hold packed state instead of float keys and values.

Each layer keeps, in position order:
    sinks   the first `sinks` tokens, full precision;
    middle  a TokenStore per role (keys, values): packed rows in buffers grown geometrically, a token count
            per (sequence, KV head), positions implicit until tokens are selected (kvcompress.store);
    tail    the most recent tokens, full precision, at least `window` of them.
A forward's new tokens reach the layer once (update() keeps them pending) and attention reads them from its
arguments; when the forward ends they are stored, and the tail's oldest whole runs beyond `window` tokens
are encoded and appended to the stores. Nothing is held twice.

A sliding-window layer (model_geometry's `windows`) frees, when a forward ends, the tokens no later query
can attend to: dead sinks and tail tokens at once, dead packed tokens in whole groups once enough of them
gather (amortized, so copying stays O(tokens)); the few dead ones left are hidden by the model's mask.

A layer whose spec evicts tokens (`evict`) lets its evictor choose, at the end of a prefill and every `every`
tokens while decoding, which tokens before the window stay: at the end of a first prefill among the tokens
about to be compressed (the others are never encoded), later among the packed tokens (in whole groups);
the stores then hold only what is kept, at its positions. Sliding-window layers do not evict (their window
already bounds them).

The layer knows how many tokens it has seen apart from how many it holds, and the position of every held
token, so sequence lengths, masks and new positions stay right when it holds fewer than it has seen.
The cache must be used on a model patched by kvcompress.patch / kvcompress.cache_for.
"""

from __future__ import annotations

from dataclasses import dataclass
import math
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, get_layer_types_and_kwargs

from kvcompress.errors import KVCompressError, UnsupportedModelError
from kvcompress.eviction import Candidates, group_queries
from kvcompress.pipeline import LayerCodecs, build_codecs
from kvcompress.plugins import Registry
from kvcompress.spec import CacheSpec, load_spec, parse_spec
from kvcompress.runtime import Observation, Reader
from kvcompress.state import reachable_tensors, storage_nbytes
from kvcompress.store import PAGE_TOKENS, TokenStore

# Layer kinds whose cache is plain per-token keys and values. Sliding-window layers are CompressedLayers too,
# which free the tokens that left their window.
ATTENTION_LAYER_TYPES = frozenset({"full_attention", "sliding_attention"})

NOT_PATCHED = (
    "this CompressedCache was updated by a model whose attention is not kvcompress's, so attention would see "
    "only the newest tokens. Create the cache with kvcompress.cache_for(model, spec), or run the model inside "
    "`with kvcompress.patch(model, spec):`"
)

SpecLike = CacheSpec | dict | str | Path


class RollbackWarning(UserWarning):
    """Tokens were rolled back (assisted or speculative decoding) in a cache that compresses or evicts."""


ROLLBACK_WARNING = (
    "kvcompress: tokens rolled back (assisted or speculative decoding). A compressed cache compresses and evicts at "
    "the end of each forward, and verification forwards come at other times than plain decoding's, so the tokens "
    "generated can differ from plain decoding with the same cache spec. A window as long as the whole generation "
    "(and no eviction) keeps them identical"
)


def resolve_spec(spec: SpecLike, registry: Registry | None = None) -> CacheSpec:
    """A validated spec from a spec object, a spec dict, or the path of a spec file."""
    if isinstance(spec, (str, Path)):
        return load_spec(spec, registry=registry)
    if isinstance(spec, (dict, CacheSpec)):
        return parse_spec(spec, registry=registry)
    raise TypeError(f"spec must be a CacheSpec, a dict or a spec file path; got {type(spec).__name__}")


@dataclass(frozen=True)
class ModelGeometry:
    """The cache shape a model's config implies."""

    num_layers: int
    query_heads: int
    kv_heads: int
    head_dim: int
    # Per layer: the sliding window W (a query at position p sees keys k with p - W < k <= p), None for full
    # attention. Empty when built without a config's layer types.
    windows: tuple[int | None, ...] = ()
    # The positions the model was trained for (max_position_embeddings), None where the config does not say.
    context: int | None = None


def model_geometry(config: Any) -> ModelGeometry:
    """Layers, heads and head size of a decoder config, or UnsupportedModelError naming what is missing."""
    if config is None:
        raise UnsupportedModelError("the model has no config; kvcompress needs a transformers PreTrainedModel")
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    kind = getattr(text, "model_type", type(text).__name__)
    if getattr(text, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"{kind} is an encoder-decoder model; kvcompress compresses the self-attention cache of decoder-only models"
        )
    layers = getattr(text, "num_hidden_layers", None)
    heads = getattr(text, "num_attention_heads", None)
    missing = [name for name, value in (("num_hidden_layers", layers), ("num_attention_heads", heads)) if not value]
    if missing:
        raise UnsupportedModelError(
            f"{kind} config has no {' or '.join(missing)}: kvcompress needs a decoder with multi-head attention layers"
        )
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None)
    if not head_dim:
        hidden = getattr(text, "hidden_size", None)
        if not hidden or hidden % heads:
            raise UnsupportedModelError(
                f"{kind} config has neither head_dim nor a hidden_size divisible by num_attention_heads ({heads})"
            )
        head_dim = hidden // heads
    if heads % kv_heads:
        raise UnsupportedModelError(
            f"{kind}: num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})"
        )
    layer_types = getattr(text, "layer_types", None) or []
    other = sorted(set(layer_types) - ATTENTION_LAYER_TYPES)
    if other:
        raise UnsupportedModelError(
            f"{kind} has layers of type {', '.join(other)}; kvcompress supports only "
            f"{', '.join(sorted(ATTENTION_LAYER_TYPES))} layers"
        )
    return ModelGeometry(
        num_layers=layers, query_heads=heads, kv_heads=kv_heads, head_dim=head_dim, windows=_sliding_windows(text),
        context=getattr(text, "max_position_embeddings", None),
    )


def model_name(config: Any) -> str | None:
    """The model identifier codecs are built for (what calibrated codebooks are checked against): the
    directory or hub name the config was loaded from."""
    return getattr(config, "_name_or_path", None) or None


def check_spec(spec: CacheSpec, config: Any, registry: Registry | None = None) -> list[LayerCodecs]:
    """Build every layer's codecs for this model config, as a cache for the model would, without weights, so
    a spec the model's shape refuses (a group that does not divide head_dim, an override past the last layer,
    a codebook for another shape or model) fails as a SpecError with the field path before a model loads.
    Returns the codecs built."""
    g = model_geometry(config)
    return build_codecs(spec, g.num_layers, g.head_dim, g.kv_heads, model=model_name(config), registry=registry)


def _sliding_windows(text: Any) -> tuple[int | None, ...]:
    """Each layer's sliding window (None: full attention), by transformers' own rule for DynamicCache: a
    config's layer_types, else `sliding_window` set makes every layer slide (Mistral)."""
    types, kwargs = get_layer_types_and_kwargs(text)
    return tuple(
        kw.get("sliding_window") if kind == "sliding_attention" and kw.get("sliding_window") else None
        for kind, kw in zip(types, kwargs)
    )


def _owned(x: torch.Tensor) -> torch.Tensor:
    """A contiguous copy with its own storage, so no view keeps a larger buffer (the forward's keys, an old
    tail) alive and counted."""
    return x.clone(memory_format=torch.contiguous_format)


@dataclass
class Segment:
    """A run of a layer's tokens for attention, in position order: full-precision keys/values [batch,
    kv_heads, tokens, head_dim] at contiguous positions, or the packed middle (the layer's two stores and the
    reader that reads them together)."""

    positions: range | None = None
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None
    stores: tuple[TokenStore, TokenStore] | None = None
    reader: Reader | None = None


class SeenLayer(CacheLayerMixin):
    """What transformers asks of a kvcompress cache layer about positions: a layer counts every position it has
    seen (`seen`), whatever it holds, and the mask spans them all; attention picks the columns it reads."""

    seen: int

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1


class CompressedLayer(SeenLayer):
    """One model layer's cache: full-precision sinks and tail around a packed middle held in TokenStores.

    The patch drives it through one forward protocol: begin_forward() (pre-hook), update() hands it the
    forward's new keys and values (kept pending, returned unchanged), read() gives attention its segments,
    end_forward() (post-hook) stores the pending tokens: sinks first, then the tail, whose oldest whole runs
    beyond `window` tokens are encoded and appended to the stores. abort_forward() drops a failed forward.
    """

    is_compileable = False
    # Tokens already encoded cannot be taken back one by one, so crop() works only inside the window.
    is_croppable = False

    def __init__(
        self,
        codecs: LayerCodecs,
        kv_heads: int,
        head_dim: int,
        exact_new_tokens: bool = True,
        sliding_window: int | None = None,
    ):
        super().__init__()
        self.codecs = codecs
        # A query at position p sees keys k with p - sliding_window < k <= p; None: every earlier key.
        self.sliding_window = sliding_window
        # transformers picks the layer whose mask sizes to use by this; ours span every position either way.
        self.is_sliding = sliding_window is not None
        # Tokens before this position may have been freed (sliding layers): crop() must not go back past it.
        self.freed_before = 0
        self.sink_start = 0  # position of the first held sink (sinks a sliding layer freed are gone)
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.exact_new_tokens = exact_new_tokens
        where = f"layer {codecs.layer}"
        self.key_store = TokenStore(f"{where} keys")
        self.value_store = TokenStore(f"{where} values", holds_positions=False)
        self.sink_keys: torch.Tensor | None = None
        self.sink_values: torch.Tensor | None = None
        self.tail_keys: torch.Tensor | None = None
        self.tail_values: torch.Tensor | None = None
        self.seen = 0  # tokens this layer has been given (stored, compressed or evicted), not counting pending
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.in_forward = False
        self.was_read = False  # attention read the layer in the running forward
        self.observed: dict[str, torch.Tensor] = {}
        # Token eviction (none on sliding-window layers: their window bounds them already).
        self.evictor = codecs.evictor if sliding_window is None else None
        self.recent_queries: torch.Tensor | None = None  # the evictor's query window [batch, query_heads, w, dim]
        self.attention_scale = head_dim**-0.5
        self.visible: torch.Tensor | None = None  # [batch, positions]: what the forward's last query may see
        self.next_eviction = 0  # decoding evicts again once `seen` reaches this (with `every`)

    def __repr__(self) -> str:
        return (
            f"CompressedLayer(layer={self.codecs.layer}, sinks={self.sink_tokens}, "
            f"compressed={self.compressed_tokens}, tail={self.tail_tokens})"
        )

    @property
    def sink_tokens(self) -> int:
        return 0 if self.sink_keys is None else self.sink_keys.shape[2]

    @property
    def compressed_tokens(self) -> int:
        """Packed tokens of the longest (sequence, head)."""
        return self.key_store.length

    @property
    def tail_tokens(self) -> int:
        return 0 if self.tail_keys is None else self.tail_keys.shape[2]

    @property
    def batch_size(self) -> int:
        """Sequences held (-1 before the first forward)."""
        return self.tail_keys.shape[0] if self.is_initialized else -1

    def stores(self) -> Iterator[tuple[TokenStore, TokenStore]]:
        """The (keys, values) stores of the packed tokens."""
        yield self.key_store, self.value_store

    @property
    def observes(self) -> frozenset[str]:
        """What the patch must capture for this layer (Observation fields)."""
        return self.codecs.observes

    # ---------------------------------------------------------------------------------------------
    # the forward protocol

    def begin_forward(self) -> None:
        """The layer's attention module starts a forward (the patch's pre-forward hook)."""
        self.in_forward = True
        self.was_read = False
        self.pending = None
        self.visible = None

    def note_attention(self, scale: float, mask: torch.Tensor | None) -> None:
        """What the evictor needs of the forward's attention call: its score scale, and which positions the
        forward's last query may see (the model's 4D mask: left padding is hidden)."""
        self.attention_scale = scale
        if mask is not None:
            row = mask[:, 0, -1, :]
            self.visible = row if row.dtype == torch.bool else row > torch.finfo(row.dtype).min / 2

    def observe(self, name: str, tensor: torch.Tensor) -> None:
        """Record what the running forward showed this layer (called by the patch and the attention)."""
        self.observed[name] = tensor

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        empty = (key_states.shape[0], self.kv_heads, 0, self.head_dim)
        self.sink_keys = key_states.new_empty(empty)
        self.sink_values = value_states.new_empty(empty)
        self.tail_keys = key_states.new_empty(empty)
        self.tail_values = value_states.new_empty(empty)
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Take the forward's new tokens [batch, kv_heads, n, head_dim]; they are stored when the forward ends.
        Returns them unchanged: attention reads the layer (read()), the new tokens once, from its arguments."""
        if not self.in_forward:
            raise KVCompressError(NOT_PATCHED)
        if self.pending is not None:
            raise KVCompressError(
                f"layer {self.codecs.layer}: the cache was updated twice in one forward of the attention module"
            )
        expected = (self.kv_heads, self.head_dim)
        for role, x in (("keys", key_states), ("values", value_states)):
            if x.dim() != 4 or (x.shape[1], x.shape[3]) != expected:
                raise KVCompressError(
                    f"layer {self.codecs.layer}: {role} of shape {tuple(x.shape)} do not match the cache built for "
                    f"{self.kv_heads} kv heads of size {self.head_dim}; build the cache from this model's config"
                )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.pending = (key_states, value_states)
        return key_states, value_states

    def read(self) -> tuple[list[Segment], int]:
        """The segments attention reads, in position order, and the position of the forward's first query.

        With exact_new_tokens the forward's own tokens come last, in full precision, from update(); otherwise
        they are stored first and read back from what the layer holds."""
        if self.pending is None:
            raise KVCompressError(f"layer {self.codecs.layer}: attention read the layer before the forward updated it")
        keys, values = self.pending
        first_query = self.seen
        self.was_read = True
        if not self.exact_new_tokens:
            self._store_pending()
        segments = []
        if self.sink_tokens:
            sinks = range(self.sink_start, self.sink_start + self.sink_tokens)
            segments.append(Segment(sinks, self.sink_keys, self.sink_values))
        if self.key_store.length:
            segments.append(Segment(stores=(self.key_store, self.value_store), reader=self.codecs.reader))
        start = self.seen - self.tail_tokens
        if self.exact_new_tokens:
            # the tail and the new tokens are contiguous: one dense segment (a copy of at most window + run
            # tokens is cheaper than a second attention call and partial)
            if self.tail_tokens:
                keys, values = torch.cat([self.tail_keys, keys], dim=2), torch.cat([self.tail_values, values], dim=2)
            segments.append(Segment(range(start, start + keys.shape[2]), keys, values))
        elif self.tail_tokens:
            segments.append(Segment(range(start, self.seen), self.tail_keys, self.tail_values))
        return segments, first_query

    def abort_forward(self) -> None:
        """The forward raised: its tokens are not stored, what it captured is dropped."""
        self.in_forward = False
        self.pending = None
        self.observed = {}

    def end_forward(self) -> None:
        """The layer's attention module finished a forward (the patch's post-forward hook): store its tokens,
        compressing what leaves the window, with what the forward showed the layer's pruners."""
        self.in_forward = False
        if self.pending is not None:
            if not self.was_read:
                self.abort_forward()
                raise KVCompressError(
                    f"layer {self.codecs.layer} stored tokens in the CompressedCache but its attention was not "
                    "kvcompress's; do not change the attention implementation of a patched model"
                )
            count = self.pending[0].shape[2]
            self._remember_queries()
            self._store_pending()
            if self.evictor is not None:
                if count > 1 or self._eviction_due():
                    self._evict_packed()
                if self.codecs.eviction.every is None:
                    self.recent_queries = None  # no eviction while decoding: the next prompt brings its own queries
        if self.was_read:  # the forward's tokens are stored (by read() when not exact_new_tokens)
            self._free_dead()
        self.observed = {}
        self.visible = None  # a view of the forward's mask: not held past it

    # ---------------------------------------------------------------------------------------------
    # storing

    def _store_pending(self) -> None:
        """Sinks first, then the tail; the tail's oldest whole runs beyond `window` tokens are encoded."""
        keys, values = self.pending
        self.pending = None
        count = keys.shape[2]
        room = min(self.codecs.sinks - self.seen, count)  # sinks are the first `sinks` positions
        if room > 0:
            self.sink_keys = torch.cat([self.sink_keys, keys[:, :, :room]], dim=2)
            self.sink_values = torch.cat([self.sink_values, values[:, :, :room]], dim=2)
            keys, values = keys[:, :, room:], values[:, :, room:]
        if self.tail_tokens:
            keys = torch.cat([self.tail_keys, keys], dim=2)
            values = torch.cat([self.tail_values, values], dim=2)
        first_position = self.seen + count - keys.shape[2]
        self.seen += count
        run = self.codecs.run
        # max(0, ...): floor division of a negative excess would slice the tail from the end and lose tokens
        overflow = max(0, (keys.shape[2] - self.codecs.window) // run * run)
        self.tail_keys = _owned(keys[:, :, overflow:])
        self.tail_values = _owned(values[:, :, overflow:])
        if overflow <= 0:
            return
        leaving = (keys[:, :, :overflow], values[:, :, :overflow])
        positions = counts = None
        if self.evictor is not None and count > 1 and not self.key_store.length:
            leaving, positions, counts = self._evict_dense(*leaving, first_position)
            if not leaving[0].shape[2]:
                return
        observation = Observation(**self.observed) if self.observes else None
        for codec, store, x in ((self.codecs.keys, self.key_store, leaving[0]), (self.codecs.values, self.value_store, leaving[1])):
            shared = store.shared if store.layout is not None else None
            store.append(codec.encode(x, observation, shared), first_position, positions)
        if counts is not None:  # heads kept different counts: drop each head's padding rows
            keep = torch.arange(leaving[0].shape[2], device=counts.device).expand(*counts.shape, -1)
            self.key_store.select(keep, counts)
            self.value_store.select(keep, counts)

    # ---------------------------------------------------------------------------------------------
    # eviction

    def _eviction_target(self) -> int:
        """Tokens the layer may hold per (sequence, head) on average after eviction."""
        spec = self.codecs.eviction
        return spec.budget if spec.budget is not None else round(spec.keep * self.seen)

    def _eviction_due(self) -> bool:
        every = self.codecs.eviction.every
        return every is not None and self.seen >= self.next_eviction

    def _remember_queries(self) -> None:
        """Keep the evictor's query window: the latest `query_window` queries over the forwards."""
        queries = self.observed.get("queries")
        window = 0 if self.evictor is None else self.evictor.query_window
        if not window or queries is None:
            return
        if self.recent_queries is not None and self.recent_queries.shape[0] == queries.shape[0]:
            queries = torch.cat([self.recent_queries, queries], dim=2)
        self.recent_queries = _owned(queries[:, :, -window:])

    def _candidate_context(self) -> dict[str, Any]:
        """What every form of Candidates shares: the latest queries and their positions, the score scale, the
        mask's visibility, and the sinks and window as the rest of the softmax."""
        queries = query_positions = None
        if self.recent_queries is not None:
            queries = group_queries(self.recent_queries, self.kv_heads)
            w = self.recent_queries.shape[2]
            group = queries.shape[2] // w
            query_positions = torch.arange(self.seen - w, self.seen, device=queries.device).repeat(group)
        context = []
        if self.sink_tokens:
            context.append((self.sink_keys, range(self.sink_start, self.sink_start + self.sink_tokens)))
        if self.tail_tokens:
            context.append((self.tail_keys, range(self.seen - self.tail_tokens, self.seen)))
        return dict(
            scale=self.attention_scale, queries=queries, query_positions=query_positions, visible=self.visible,
            context=[(keys, torch.arange(span.start, span.stop, device=keys.device)) for keys, span in context],
        )

    def _room(self, step: int) -> int:
        """Tokens per head the candidates may keep: the target less the sinks and window, in multiples of step."""
        return max(0, (self._eviction_target() - self.sink_tokens - self.tail_tokens) // step * step)

    def _select(self, candidates: Candidates, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The evictor's choice, checked, indices cut to the longest head's count."""
        indices, counts = self.evictor.select(candidates, keep)
        candidates.check(indices, counts, keep, f"{self.codecs.eviction.method!r} (layer {self.codecs.layer})")
        return indices[..., : int(counts.max())], counts

    def _evict_dense(
        self, keys: torch.Tensor, values: torch.Tensor, first_position: int
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor | None, torch.Tensor | None]:
        """At the end of a first prefill: the evictor keeps some of the tokens about to be compressed (keys,
        values [batch, kv_heads, n, head_dim] from first_position). Returns the kept tokens (padded to the
        longest head), their positions [batch, kv_heads, kept] (None if all stay) and each head's count (None
        when every head keeps the same)."""
        step = self.codecs.token_block
        n = keys.shape[2]
        keep = self._room(step)
        if keep >= n:
            return (keys, values), None, None
        if keep <= 0:
            return (keys[:, :, :0], values[:, :, :0]), None, None
        positions = torch.arange(first_position, first_position + n, device=keys.device)
        candidates = Candidates.from_dense(keys, positions, step, **self._candidate_context())
        indices, counts = self._select(candidates, keep)
        longest = indices.shape[2]
        # a head's slots past its count repeat its last kept token (its KIVI group keeps its range), dropped later
        last = indices.gather(2, (counts - 1).clamp(min=0)[..., None])
        indices = torch.where(torch.arange(longest, device=indices.device) < counts[..., None], indices, last)
        index = indices[..., None].expand(-1, -1, -1, keys.shape[3])
        kept = (keys.gather(2, index), values.gather(2, index))
        uneven = None if bool((counts == longest).all()) else counts
        return kept, first_position + indices, uneven

    def _evict_packed(self) -> None:
        """Evict among the packed tokens, in whole groups of the stores' quantum, down to the layer's target."""
        self.next_eviction = self.seen + (self.codecs.eviction.every or 0)
        keys, values = self.key_store, self.value_store
        if not keys.length:
            return
        quantum = math.lcm(keys.layout.quantum, values.layout.quantum)
        keep = max(0, self._room(quantum))
        if int(keys.tokens.sum(-1).max()) <= keep * self.kv_heads:
            return
        if keep:
            candidates = Candidates.from_stores(keys, self.codecs.keys, quantum, **self._candidate_context())
            indices, counts = self._select(candidates, keep)
        else:
            indices = keys.tokens.new_zeros(*keys.tokens.shape, 0)
            counts = torch.zeros_like(keys.tokens)
        keys.select(indices, counts)
        values.select(indices, counts)

    def _free_dead(self) -> None:
        """On a sliding layer, free the tokens the next query (at position `seen`) and every later one cannot
        see: positions <= seen - W. Sinks and tail at once; packed tokens in whole groups of the stores'
        quantum, and only once the dead ones reach a page or a quarter of what the stores hold."""
        if self.sliding_window is None:
            return
        live = self.seen - self.sliding_window + 1  # the first position a later query sees
        freed = False
        cut = min(max(0, live - self.sink_start), self.sink_tokens)
        if cut:
            self.sink_keys = _owned(self.sink_keys[:, :, cut:])
            self.sink_values = _owned(self.sink_values[:, :, cut:])
            self.sink_start += cut
            freed = True
        cut = min(max(0, live - (self.seen - self.tail_tokens)), self.tail_tokens)
        if cut:
            self.tail_keys = _owned(self.tail_keys[:, :, cut:])
            self.tail_values = _owned(self.tail_values[:, :, cut:])
            freed = True
        if self.key_store.length and self._free_dead_packed(live):
            freed = True
        if freed:
            self.freed_before = max(self.freed_before, live)

    def _free_dead_packed(self, live: int) -> bool:
        """Drop the packed tokens before position `live` from both stores alike (attention reads them
        together), keeping whole groups: at most quantum - 1 dead tokens per head stay. True if it dropped."""
        keys, values = self.key_store, self.value_store
        quantum = math.lcm(keys.layout.quantum, values.layout.quantum)
        tokens = keys.tokens
        if not torch.equal(tokens, values.tokens) or bool((tokens % quantum).any()):
            return False  # not in whole common groups: leave them to the mask
        positions = keys.token_positions()
        if isinstance(positions, range):
            dead = torch.full_like(tokens, min(max(0, live - positions.start), keys.length))
        else:  # each head's positions ascend: its dead tokens are a prefix
            held = torch.arange(keys.length, device=tokens.device) < tokens[..., None]
            dead = ((positions.to(tokens.device) < live) & held).sum(-1)
        drop = dead // quantum * quantum
        page = -(-PAGE_TOKENS // quantum) * quantum
        if int(drop.max()) < max(page, keys.length // 4):
            return False
        counts = tokens - drop
        n = int(counts.max())
        keep = drop[..., None] + torch.arange(n, device=tokens.device)
        keys.select(keep, counts)
        values.select(keep, counts)
        return True

    def held_positions(self) -> torch.Tensor:
        """The absolute position of every token the layer holds, in order (sinks, packed, tail): int64
        [batch, kv_heads, sinks + longest packed head + tail], -1 where a head holds fewer packed tokens."""
        batch = self.tail_keys.shape[0] if self.is_initialized else 0
        shape = (batch, self.kv_heads)
        parts = [torch.arange(self.sink_start, self.sink_start + self.sink_tokens).expand(*shape, -1)]
        if self.key_store.length:
            packed = self.key_store.position_tensor()
            padding = self.key_store.padding()
            parts.append(packed if padding is None else packed.masked_fill(padding, -1))
        parts.append(torch.arange(self.seen - self.tail_tokens, self.seen).expand(*shape, -1))
        return torch.cat([p.to(torch.int64).cpu() for p in parts], dim=-1)

    # ---------------------------------------------------------------------------------------------
    # what transformers asks of a cache layer

    def empty_like(self) -> CompressedLayer:
        """An empty layer with this one's codecs, geometry and modes."""
        return CompressedLayer(self.codecs, self.kv_heads, self.head_dim, self.exact_new_tokens, self.sliding_window)

    def reset(self) -> None:
        self.sink_keys = self.sink_values = self.tail_keys = self.tail_values = None
        self.key_store = TokenStore(self.key_store.name)
        self.value_store = TokenStore(self.value_store.name, holds_positions=False)
        self.pending = None
        self.observed = {}
        self.recent_queries = self.visible = None
        self.seen = self.next_eviction = 0
        self.freed_before = self.sink_start = 0
        self.is_initialized = False

    def _map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if not self.is_initialized:
            return
        self.sink_keys, self.sink_values = fn(self.sink_keys), fn(self.sink_values)
        self.tail_keys, self.tail_values = fn(self.tail_keys), fn(self.tail_values)
        self.key_store.map_batch(fn)
        self.value_store.map_batch(fn)
        if self.recent_queries is not None:
            self.recent_queries = fn(self.recent_queries)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: _owned(t[indices]))

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the newest tokens: a negative count removes that many; a positive one (transformers < 5.18)
        is the length to keep. Only full-precision tokens can be dropped."""
        if tokens_to_remove > 0:
            tokens_to_remove = min(0, tokens_to_remove - self.seen)
        remove = -tokens_to_remove
        if remove == 0 or not self.is_initialized:
            return
        if self.compressed_tokens or self.evictor is not None:
            warnings.warn(ROLLBACK_WARNING, RollbackWarning, stacklevel=2)
        if remove > self.tail_tokens and self.compressed_tokens:
            raise KVCompressError(
                f"layer {self.codecs.layer}: cannot crop {remove} tokens, only the newest {self.tail_tokens} are still "
                f"in full precision and the ones before are compressed. Use a spec with a window of at least {remove} "
                "tokens for decoding strategies that roll back (assisted or speculative decoding)"
            )
        seen = max(0, self.seen - remove)
        if self.sliding_window is not None and seen - self.sliding_window + 1 < self.freed_before:
            raise KVCompressError(
                f"layer {self.codecs.layer}: cannot crop {remove} tokens, this sliding-window layer already freed "
                f"tokens before position {self.freed_before} that queries after the crop would see"
            )
        keep_tail = max(0, seen - (self.seen - self.tail_tokens))
        keep_sinks = min(max(0, seen - self.sink_start), self.sink_tokens)
        self.tail_keys = _owned(self.tail_keys[:, :, :keep_tail])
        self.tail_values = _owned(self.tail_values[:, :, :keep_tail])
        self.sink_keys = _owned(self.sink_keys[:, :, :keep_sinks])
        self.sink_values = _owned(self.sink_values[:, :, :keep_sinks])
        self.seen = seen

    # ---------------------------------------------------------------------------------------------
    # accounting

    def nbytes(self) -> dict[str, int]:
        """Bytes held by this layer: packed keys and values (buffers with their headroom), the full-precision
        window (sinks + tail), and the bookkeeping (the stores' token counts and explicit positions, the
        evictor's query window)."""
        dense = (self.sink_keys, self.sink_values, self.tail_keys, self.tail_values)
        queries = storage_nbytes([self.recent_queries]) if self.recent_queries is not None else 0
        return {
            "keys": self.key_store.nbytes(),
            "values": self.value_store.nbytes(),
            "window": storage_nbytes(t for t in dense if t is not None),
            "index": self.key_store.index_nbytes() + self.value_store.index_nbytes() + queries,
        }


class CompressedCache(Cache):
    """A transformers Cache built from a kvcompress spec and a model config: one CompressedLayer per layer.

    exact_new_tokens: the tokens of each forward attend to one another in full precision (their keys and
    values are at hand, as in the published methods' prefill); tokens of earlier forwards are read from
    what the cache holds. This is the default. Off, attention reads only what the cache holds, so a
    prompt's later tokens already see the compressed form of its earlier ones.

        cache = kvcompress.cache_for(model, spec)          # patches the model and builds this
        model.generate(**inputs, past_key_values=cache)
        cache.nbytes()    # {"keys": ..., "values": ..., "window": ..., "constants": ..., "total": ...}
    """

    def __init__(
        self,
        spec: SpecLike,
        config: Any,
        model_name: str | None = None,
        registry: Registry | None = None,
        exact_new_tokens: bool = True,
    ):
        self.spec = resolve_spec(spec, registry)
        self.exact_new_tokens = exact_new_tokens
        self.geometry = model_geometry(config)
        g = self.geometry
        codecs = build_codecs(self.spec, g.num_layers, g.head_dim, g.kv_heads, model=model_name, registry=registry)
        if not exact_new_tokens and any(c.evictor is not None for c in codecs):
            raise KVCompressError(
                f"spec {self.spec.name!r} evicts tokens, which needs the forward's attention before its tokens are "
                "stored; use exact_new_tokens=True (the default)"
            )
        windows = g.windows or (None,) * g.num_layers
        super().__init__(
            layers=[CompressedLayer(c, g.kv_heads, g.head_dim, exact_new_tokens, w) for c, w in zip(codecs, windows)]
        )

    def __repr__(self) -> str:
        return f"CompressedCache(spec={self.spec.name!r}, layers={len(self.layers)}, tokens={self.get_seq_length()})"

    @property
    def batch_size(self) -> int:
        for layer in self.layers:
            if layer.is_initialized:
                return layer.batch_size
        return -1

    def split_rows(self, index: int, starts: list[int]) -> Any:
        """Hold layer `index` of a left-padded batch as one layer per sequence, from its first real position
        (kvcompress.hf.rows); called in the layer's first forward."""
        from kvcompress.hf.rows import PaddedBatchLayer

        self.layers[index] = PaddedBatchLayer(self.layers[index], starts)
        return self.layers[index]

    def reset(self) -> None:
        """Empty every layer (a layer split into sequences becomes one batched layer again)."""
        for index, layer in enumerate(self.layers):
            if isinstance(layer, CompressedLayer):
                layer.reset()
            else:
                self.layers[index] = layer.rows[0].empty_like()

    def constants_nbytes(self) -> int:
        """Bytes of per-layer constants (sketches, codebooks, rotations, lookup tables): every tensor the
        layers' codecs hold, found by walking them rather than trusting each method's constants(), so the
        figure is what is held. Shared tensors count once."""
        return storage_nbytes(reachable_tensors([layer.codecs for layer in self.layers]))

    def nbytes(self) -> dict[str, int]:
        """Bytes actually held: packed keys and values (allocated buffers, headroom included), the
        full-precision window (sinks + tail, both roles), the stores' index (token counts per head, explicit
        positions), per-layer constants, and their total."""
        parts = {"keys": 0, "values": 0, "window": 0, "index": 0}
        for layer in self.layers:
            for name, count in layer.nbytes().items():
                parts[name] += count
        parts["constants"] = self.constants_nbytes()
        parts["total"] = sum(parts.values())
        return parts

    def compressed_tokens(self) -> int:
        """Tokens held in packed form, summed over layers (the longest sequence and head of each)."""
        return sum(layer.compressed_tokens for layer in self.layers)

    def _bits(self, roles: tuple[str, ...]) -> float | None:
        """Bits per element of the packed rows that hold tokens (what the encoding costs; the buffers'
        headroom is in nbytes(), not here), averaged over `roles` and every layer, sequence and head."""
        payload = elements = 0
        for layer in self.layers:
            for pair in layer.stores():
                for role, store in zip(("keys", "values"), pair):
                    if role in roles:
                        payload += store.payload_nbytes()
                        elements += store.held_tokens() * self.geometry.head_dim
        return 8 * payload / elements if elements else None

    def key_bits(self) -> float | None:
        """Average bits per stored key element over compressed tokens (None before any token is compressed)."""
        return self._bits(("keys",))

    def value_bits(self) -> float | None:
        """Average bits per stored value element over compressed tokens (None before any token is compressed)."""
        return self._bits(("values",))

    def bits_per_element(self) -> float | None:
        """Average bits per key and value element over compressed tokens (None before any is compressed)."""
        return self._bits(("keys", "values"))

    def dense_nbytes(self, dtype: torch.dtype = torch.float16) -> int:
        """Bytes an uncompressed cache of `dtype` would hold for the same tokens (both roles, all layers)."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        g = self.geometry
        tokens = sum(layer.seen for layer in self.layers)
        return 2 * itemsize * tokens * max(self.batch_size, 0) * g.kv_heads * g.head_dim

    def summary(self) -> dict[str, Any]:
        """Figures for reports: bytes by part, tokens, bits per element, and the ratio to an fp16 cache."""
        held = self.nbytes()
        dense = self.dense_nbytes(torch.float16)
        return {
            "spec": self.spec.name,
            "tokens": self.get_seq_length(),
            "compressed_tokens": self.compressed_tokens(),
            "nbytes": held,
            "fp16_nbytes": dense,
            "fraction_of_fp16": held["total"] / dense if dense else None,
            "bits_per_element": self.bits_per_element(),
            "key_bits": self.key_bits(),
            "value_bits": self.value_bits(),
        }
