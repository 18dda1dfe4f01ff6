"""One prompt prefilled into several empty CompressedCaches by a single forward.

    caches = [patched.cache(spec) for spec in specs]          # all built for the same patched model
    model(input_ids=prompt, **with_cache(model, PrefillFanout(caches)), use_cache=True)
    # each cache now holds the prompt as its own spec stores it; decode with each on its own

A prompt's forward over empty caches attends in full precision to its own tokens only (exact_new_tokens),
so its hidden states, logits and the keys and values each layer stores are the same whichever spec the cache
follows: what differs is how each cache stores them. The fanout runs that forward once and hands every
layer's protocol calls (update, the observations pruners and evictors read, the attention they note,
end_forward, which encodes) to the same layer of every cache. Comparing N specs on one prompt then costs
one prefill instead of N (kvcompress.eval.perplexity uses it); the caches are exactly what N separate
prefills would leave.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache

from kvcompress.errors import KVCompressError
from kvcompress.hf.cache import CompressedCache, CompressedLayer, SeenLayer, Segment


class FanoutLayer(SeenLayer):
    """The same layer of several empty caches, driven through one forward's protocol."""

    def __init__(self, layers: list[CompressedLayer]):
        super().__init__()
        self.layers = layers
        self.is_sliding = layers[0].is_sliding

    @property
    def seen(self) -> int:
        return self.layers[0].seen

    @property
    def observes(self) -> frozenset[str]:
        return frozenset().union(*(layer.observes for layer in self.layers))

    @property
    def evictor(self) -> Any:
        """Truthy when any cache's layer evicts (attention then notes its scale and mask for them)."""
        return next((layer.evictor for layer in self.layers if layer.evictor is not None), None)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def begin_forward(self) -> None:
        if self.seen:
            raise KVCompressError(
                "PrefillFanout fills empty caches with one prompt; these already hold tokens, so their attention "
                "differs from cache to cache: run each cache's forward on its own"
            )
        for layer in self.layers:
            layer.begin_forward()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        for layer in self.layers:
            layer.update(key_states, value_states, *args, **kwargs)
        self.lazy_initialization(key_states, value_states)
        return key_states, value_states

    def observe(self, name: str, tensor: torch.Tensor) -> None:
        for layer in self.layers:
            if name in layer.observes:
                layer.observe(name, tensor)

    def note_attention(self, scale: float, mask: torch.Tensor | None) -> None:
        for layer in self.layers:
            if layer.evictor is not None:
                layer.note_attention(scale, mask)

    def read(self) -> tuple[list[Segment], int]:
        """Every cache's read (each marks its layer read); empty layers give each the same one dense segment,
        the forward's own tokens, which attention computes once."""
        reads = [layer.read() for layer in self.layers]
        return reads[0]

    def end_forward(self) -> None:
        for layer in self.layers:
            layer.end_forward()

    def abort_forward(self) -> None:
        for layer in self.layers:
            layer.abort_forward()


class PrefillFanout(Cache):
    """Several empty CompressedCaches of one model, filled with the same prompt by one forward of the patched
    model (pass it as the model's cache: kvcompress.hf.keywords.with_cache). Only the prefill: a second forward
    through it raises."""

    def __init__(self, caches: list[CompressedCache]):
        if not caches:
            raise KVCompressError("PrefillFanout needs at least one CompressedCache")
        if any(not isinstance(cache, CompressedCache) for cache in caches):
            raise KVCompressError("PrefillFanout fans out to CompressedCaches only (kvcompress.cache_for / Patch.cache)")
        if len({cache.geometry for cache in caches}) != 1:
            raise KVCompressError("PrefillFanout's caches must be built for the same model (their geometries differ)")
        if any(not cache.exact_new_tokens for cache in caches):
            raise KVCompressError(
                "PrefillFanout needs caches with exact_new_tokens=True: otherwise a prompt's later tokens read its "
                "earlier ones as each spec stores them, and one forward cannot serve every cache"
            )
        for cache in caches:
            if cache.get_seq_length() or any(not isinstance(layer, CompressedLayer) for layer in cache.layers):
                raise KVCompressError("PrefillFanout fills empty caches; one of these already holds tokens")
        super().__init__(layers=[FanoutLayer(list(layers)) for layers in zip(*(cache.layers for cache in caches))])

    def split_rows(self, index: int, starts: list[int]) -> Any:
        """A left-padded prompt: each cache holds such a batch as one layer per sequence, which one forward
        cannot drive for several caches."""
        raise KVCompressError(
            "PrefillFanout cannot prefill a left-padded batch (each cache holds it row by row); prefill each cache "
            "on its own, or pass rows of equal length without padding"
        )
