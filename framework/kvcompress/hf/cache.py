"""CompressedCache: a transformers Cache whose layers hold packed state instead of float keys and values.

Each layer keeps, in position order:
    sinks   the first `sinks` tokens, full precision;
    middle  a PackedState per role (keys, values), the tokens that left the window;
    tail    the most recent tokens, full precision, at least `window` of them.
Tokens move from the tail into the packed state in whole blocks (LayerCodecs.token_block) as soon as
that leaves `window` tokens behind; once encoded, the float copy is dropped. Nothing is held twice.
A layer whose pruners observe the model (LayerCodecs.observes) compresses at the end of the forward
instead, when the patch hands it what the forward showed (kvcompress.runtime.Observation).

update() only stores: attention reads the layer itself (kvcompress.hf.attention), so the cache must be
used on a model patched by kvcompress.patch / kvcompress.cache_for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from kvcompress.errors import KVCompressError, UnsupportedModelError
from kvcompress.pipeline import LayerCodecs, build_codecs
from kvcompress.plugins import Registry
from kvcompress.runtime import Observation
from kvcompress.spec import CacheSpec, load_spec, parse_spec
from kvcompress.state import PackedState, reachable_tensors, storage_nbytes

# Layer kinds whose cache is plain per-token keys and values. Sliding-window layers keep every token here
# (their mask hides the old ones), so the cache stays one kind of layer.
ATTENTION_LAYER_TYPES = frozenset({"full_attention", "sliding_attention"})

NOT_PATCHED = (
    "this CompressedCache was updated by a model whose attention is not kvcompress's, so attention would see "
    "only the newest tokens. Create the cache with kvcompress.cache_for(model, spec), or run the model inside "
    "`with kvcompress.patch(model, spec):`"
)

SpecLike = CacheSpec | dict | str | Path


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
    return ModelGeometry(num_layers=layers, query_heads=heads, kv_heads=kv_heads, head_dim=head_dim)


def _owned(x: torch.Tensor) -> torch.Tensor:
    """A contiguous copy with its own storage, so no view keeps a larger buffer alive."""
    return x.clone(memory_format=torch.contiguous_format)


class CompressedLayer(CacheLayerMixin):
    """One model layer's cache: full-precision sinks and tail around a packed middle."""

    is_sliding = False
    is_compileable = False
    # Tokens already encoded cannot be taken back one by one, so crop() works only inside the window.
    is_croppable = False

    def __init__(self, codecs: LayerCodecs, kv_heads: int, head_dim: int):
        super().__init__()
        self.codecs = codecs
        self.kv_heads = kv_heads
        self.head_dim = head_dim
        self.sink_keys: torch.Tensor | None = None
        self.sink_values: torch.Tensor | None = None
        self.key_state: PackedState | None = None
        self.value_state: PackedState | None = None
        self.tail_keys: torch.Tensor | None = None
        self.tail_values: torch.Tensor | None = None
        self.length = 0
        # Set by the patch's pre-forward hook on the attention module: an update is only legal inside a
        # forward whose attention reads this layer (see kvcompress.hf.patch).
        self.armed = False
        self.attended = False
        # What the running forward showed this layer (Observation fields), captured for its pruners.
        self.observed: dict[str, torch.Tensor] = {}

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
        return 0 if self.key_state is None else self.key_state.tokens

    @property
    def tail_tokens(self) -> int:
        return 0 if self.tail_keys is None else self.tail_keys.shape[2]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        batch = key_states.shape[0]
        empty = (batch, self.kv_heads, 0, self.head_dim)
        self.sink_keys = key_states.new_empty(empty)
        self.sink_values = value_states.new_empty(empty)
        self.tail_keys = key_states.new_empty(empty)
        self.tail_values = value_states.new_empty(empty)
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new tokens [batch, kv_heads, n, head_dim]; returns them unchanged (attention reads the layer)."""
        if not self.armed:
            raise KVCompressError(NOT_PATCHED)
        expected = (self.kv_heads, self.head_dim)
        for role, x in (("keys", key_states), ("values", value_states)):
            if x.dim() != 4 or (x.shape[1], x.shape[3]) != expected:
                raise KVCompressError(
                    f"layer {self.codecs.layer}: {role} of shape {tuple(x.shape)} do not match the cache built for "
                    f"{self.kv_heads} kv heads of size {self.head_dim}; build the cache from this model's config"
                )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        keys, values = key_states, value_states
        room = self.codecs.sinks - self.sink_tokens
        if room > 0:
            self.sink_keys = torch.cat([self.sink_keys, keys[:, :, :room]], dim=2)
            self.sink_values = torch.cat([self.sink_values, values[:, :, :room]], dim=2)
            keys, values = keys[:, :, room:], values[:, :, room:]
        self.tail_keys = torch.cat([self.tail_keys, keys], dim=2)
        self.tail_values = torch.cat([self.tail_values, values], dim=2)
        self.length += key_states.shape[2]
        if not self.codecs.observes:
            self._compress_overflow()
        self.attended = False
        return key_states, value_states

    @property
    def observes(self) -> frozenset[str]:
        """What the patch must capture for this layer (Observation fields)."""
        return self.codecs.observes

    def observe(self, name: str, tensor: torch.Tensor) -> None:
        """Record what the running forward showed this layer (called by the patch and the attention)."""
        self.observed[name] = tensor

    def begin_forward(self) -> None:
        """The layer's attention module starts a forward (the patch's pre-forward hook)."""
        self.armed = True
        self.attended = True  # nothing stored yet; update() clears it until the attention reads the layer

    def abort_forward(self) -> None:
        """The forward raised: what it captured is of no use."""
        self.armed = False
        self.observed = {}

    def end_forward(self) -> None:
        """The layer's attention module finished a forward: a layer whose pruners observe compresses now,
        with what the forward showed it. Called by the patch's post-forward hook."""
        self.armed = False
        if not self.attended:
            raise KVCompressError(
                f"layer {self.codecs.layer} stored tokens in the CompressedCache but its attention was not "
                "kvcompress's; do not change the attention implementation of a patched model"
            )
        observed, self.observed = self.observed, {}
        if self.codecs.observes and self.is_initialized:
            self._compress_overflow(Observation(**observed))

    def _compress_overflow(self, observation: Observation | None = None) -> None:
        """Encode the oldest whole blocks of the tail that are not needed to keep `window` tokens."""
        block = self.codecs.token_block
        count = (self.tail_tokens - self.codecs.window) // block * block
        if count <= 0:
            return
        new_keys = self.codecs.keys.encode(_owned(self.tail_keys[:, :, :count]), observation, self.key_state)
        new_values = self.codecs.values.encode(_owned(self.tail_values[:, :, :count]), observation, self.value_state)
        self.key_state = new_keys if self.key_state is None else self.key_state.cat(new_keys)
        self.value_state = new_values if self.value_state is None else self.value_state.cat(new_values)
        self.tail_keys = _owned(self.tail_keys[:, :, count:])
        self.tail_values = _owned(self.tail_values[:, :, count:])

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Every token stays addressable (sinks, middle, tail in position order), so the mask spans them all.
        return self.length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.sink_keys = self.sink_values = self.tail_keys = self.tail_values = None
        self.key_state = self.value_state = None
        self.observed = {}
        self.length = 0
        self.is_initialized = False

    def _map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if not self.is_initialized:
            return
        self.sink_keys, self.sink_values = fn(self.sink_keys), fn(self.sink_values)
        self.tail_keys, self.tail_values = fn(self.tail_keys), fn(self.tail_values)
        if self.key_state is not None:
            self.key_state = self.key_state.map(fn)
            self.value_state = self.value_state.map(fn)

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
            tokens_to_remove = min(0, tokens_to_remove - self.length)
        remove = -tokens_to_remove
        if remove == 0 or not self.is_initialized:
            return
        if remove > self.tail_tokens and self.compressed_tokens:
            raise KVCompressError(
                f"layer {self.codecs.layer}: cannot crop {remove} tokens, only the newest {self.tail_tokens} are still "
                f"in full precision and the ones before are compressed. Use a spec with a window of at least {remove} "
                "tokens for decoding strategies that roll back (assisted or speculative decoding)"
            )
        from_tail = min(remove, self.tail_tokens)
        keep_tail = self.tail_tokens - from_tail
        keep_sinks = max(0, self.sink_tokens - (remove - from_tail))
        self.tail_keys = _owned(self.tail_keys[:, :, :keep_tail])
        self.tail_values = _owned(self.tail_values[:, :, :keep_tail])
        self.sink_keys = _owned(self.sink_keys[:, :, :keep_sinks])
        self.sink_values = _owned(self.sink_values[:, :, :keep_sinks])
        self.length = max(0, self.length - remove)

    def nbytes(self) -> dict[str, int]:
        """Bytes held by this layer: packed keys, packed values, and the full-precision window (sinks + tail)."""
        window = storage_nbytes(t for t in (self.sink_keys, self.sink_values, self.tail_keys, self.tail_values) if t is not None)
        return {
            "keys": self.key_state.nbytes() if self.key_state is not None else 0,
            "values": self.value_state.nbytes() if self.value_state is not None else 0,
            "window": window,
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
        super().__init__(layers=[CompressedLayer(c, g.kv_heads, g.head_dim) for c in codecs])

    def __repr__(self) -> str:
        return f"CompressedCache(spec={self.spec.name!r}, layers={len(self.layers)}, tokens={self.get_seq_length()})"

    @property
    def batch_size(self) -> int:
        for layer in self.layers:
            if layer.is_initialized:
                return layer.tail_keys.shape[0]
        return -1

    def constants_nbytes(self) -> int:
        """Bytes of per-layer constants (sketches, codebooks, rotations, lookup tables): every tensor the
        layers' codecs hold, found by walking them rather than trusting each method's constants(), so the
        figure is what is held. Shared tensors count once."""
        return storage_nbytes(reachable_tensors([layer.codecs for layer in self.layers]))

    def nbytes(self) -> dict[str, int]:
        """Bytes actually held: packed keys, packed values, full-precision window (sinks + tail, both roles),
        per-layer constants, and their total."""
        parts = {"keys": 0, "values": 0, "window": 0}
        for layer in self.layers:
            for name, count in layer.nbytes().items():
                parts[name] += count
        parts["constants"] = self.constants_nbytes()
        parts["total"] = sum(parts.values())
        return parts

    def _elements(self, tokens: Callable[[CompressedLayer], int]) -> int:
        batch = max(self.batch_size, 0)
        return sum(tokens(layer) for layer in self.layers) * batch * self.geometry.kv_heads * self.geometry.head_dim

    def compressed_tokens(self) -> int:
        """Tokens held in packed form, summed over layers."""
        return sum(layer.compressed_tokens for layer in self.layers)

    def key_bits(self) -> float | None:
        """Average bits per stored key element over compressed tokens (None before any token is compressed)."""
        elements = self._elements(lambda layer: layer.compressed_tokens)
        return 8 * self.nbytes()["keys"] / elements if elements else None

    def value_bits(self) -> float | None:
        """Average bits per stored value element over compressed tokens (None before any token is compressed)."""
        elements = self._elements(lambda layer: layer.compressed_tokens)
        return 8 * self.nbytes()["values"] / elements if elements else None

    def bits_per_element(self) -> float | None:
        """Average bits per key and value element over compressed tokens (None before any is compressed)."""
        elements = self._elements(lambda layer: layer.compressed_tokens)
        if not elements:
            return None
        held = self.nbytes()
        return 8 * (held["keys"] + held["values"]) / (2 * elements)

    def dense_nbytes(self, dtype: torch.dtype = torch.float16) -> int:
        """Bytes an uncompressed cache of `dtype` would hold for the same tokens (both roles, all layers)."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * itemsize * self._elements(lambda layer: layer.length)

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
