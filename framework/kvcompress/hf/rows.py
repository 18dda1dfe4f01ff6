"""A left-padded batch held as one CompressedLayer per sequence, so each sequence is compressed as it would be alone.

Blockwise codecs group tokens (KIVI keys per channel over 32 tokens, QJL's outlier channels, ThinK's channel
scores) and compress whole runs of tokens once they leave the window. In one batched layer the padding would
enter those statistics, and each sequence's groups and window edge would sit at the batch's positions rather
than its own, so a padded prompt would come out differently from the same prompt alone. Here, from the first
forward on, each sequence has its own CompressedLayer that is given only its real tokens: the padding is never
stored, and every group, window edge, sink and eviction of a sequence falls where it falls for the prompt
alone. Attention runs per sequence over its own layer with its columns of the model's mask.

The cost: attention is one call per sequence instead of one per batch, so only batches with left padding take
this path (kvcompress.hf.attention splits a layer at its first forward when the mask shows padding).
A sequence whose first forward is all padding (a prompt fed in chunks) gets its first tokens in the forward
that shows its first real one.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Iterator

import torch

from kvcompress.errors import KVCompressError
from kvcompress.hf.cache import CompressedLayer, SeenLayer
from kvcompress.store import TokenStore


def first_real_positions(mask: torch.Tensor | None, first_query: int) -> list[int | None] | None:
    """Per sequence, the position of its first real token where a query of this forward shows it (None: every
    query of the sequence in this forward is padding); None for the whole batch when the mask is None.

    mask: the forward's 4D mask [batch, 1|heads, queries, first_query + queries]. A real query sees itself and
    not the next position; padded queries see nothing, or, where a torch fix un-masks fully masked rows,
    everything (the next position too). The first position the first real query sees is its sequence's first
    real token (under a sliding or chunked window too: later queries start no earlier). Reads O(queries +
    positions) of the mask, not all of it: this runs in the first forward of every layer."""
    if mask is None:
        return None
    rows = mask[:, 0]  # [batch, queries, positions]
    batch, queries, width = rows.shape
    own = first_query + torch.arange(queries, device=rows.device)

    def visible(x: torch.Tensor) -> torch.Tensor:
        return x if x.dtype == torch.bool else x > torch.finfo(x.dtype).min / 2

    itself = visible(rows.gather(-1, own.expand(batch, queries)[..., None])[..., 0])
    following = visible(rows.gather(-1, (own + 1).clamp(max=width - 1).expand(batch, queries)[..., None])[..., 0])
    real = itself & ~(following & (own + 1 < width))  # [batch, queries]
    first_row = real.to(torch.uint8).argmax(-1)  # the first real query of each sequence
    seen = visible(rows.gather(1, first_row[:, None, None].expand(batch, 1, width))[:, 0])  # [batch, positions]
    starts = seen.to(torch.uint8).argmax(-1)
    return [int(start) if has else None for start, has in zip(starts.tolist(), real.any(-1).tolist())]


def _shifted(positions: torch.Tensor, start: int) -> torch.Tensor:
    """A sequence's own positions as the batch's (-1, no token, stays)."""
    return torch.where(positions >= 0, positions + start, positions)


def _layer_copy(layer: CompressedLayer) -> CompressedLayer:
    """An independent copy of a sequence's layer (a beam that continues twice): tensors cloned, codecs shared."""
    twin = copy.copy(layer)
    twin.key_store, twin.value_store = copy.copy(layer.key_store), copy.copy(layer.value_store)
    twin.observed = {}
    twin._map_batch(lambda t: t.clone())
    return twin


class PaddedBatchLayer(SeenLayer):
    """One model layer's cache for a left-padded batch: a CompressedLayer per sequence, each holding that
    sequence's tokens from its first real one. Positions (what the model's mask and get_seq_length count) stay
    the batch's; sequence b's own position p is the batch's p + starts[b]."""

    is_compileable = False
    is_croppable = False

    def __init__(self, layer: CompressedLayer, starts: list[int | None]):
        """Split `layer` in its first forward (updated, not yet read), given each sequence's first real position
        (None: not in this forward; found in the first forward that shows it)."""
        super().__init__()
        if layer.pending is None or layer.seen:
            raise KVCompressError(f"layer {layer.codecs.layer}: a layer is split into sequences in its first forward only")
        self.codecs = layer.codecs
        self.kv_heads = layer.kv_heads
        self.is_sliding = layer.is_sliding
        self.is_initialized = True
        self.seen = 0
        self.rows = [layer.empty_like() for _ in starts]
        self.starts: list[int | None] = [None] * len(starts)
        # the running forward's tokens and captures, kept for sequences whose first real token is still unknown
        self.pending = layer.pending
        self.observed = dict(layer.observed)
        self.count = layer.pending[0].shape[2]
        self._resolve(starts)

    def _resolve(self, found: list[int | None]) -> None:
        """Give each sequence whose first real position is newly found its tokens of the running forward."""
        keys, values = self.pending
        for b, (row, start) in enumerate(zip(self.rows, found)):
            if self.starts[b] is not None or start is None:
                continue
            self.starts[b] = start
            offset = start - self.seen
            row.begin_forward()
            for name, tensor in self.observed.items():
                row.observe(name, tensor[b : b + 1, :, offset:])
            row.update(keys[b : b + 1, :, offset:], values[b : b + 1, :, offset:])

    def _live(self) -> Iterator[tuple[int, CompressedLayer, int]]:
        """(index, layer, first real position) of the sequences whose first real token has come."""
        for b, (row, start) in enumerate(zip(self.rows, self.starts)):
            if start is not None:
                yield b, row, start

    def __repr__(self) -> str:
        return f"PaddedBatchLayer(layer={self.codecs.layer}, starts={self.starts}, rows={self.rows})"

    @property
    def batch_size(self) -> int:
        return len(self.rows)

    @property
    def observes(self) -> frozenset[str]:
        return self.codecs.observes

    @property
    def compressed_tokens(self) -> int:
        """Packed tokens of the longest (sequence, head)."""
        return max(row.compressed_tokens for row in self.rows)

    def stores(self) -> Iterator[tuple[TokenStore, TokenStore]]:
        for row in self.rows:
            yield from row.stores()

    # the forward protocol, per sequence

    def begin_forward(self) -> None:
        self.count = 0
        self.pending = None
        self.observed = {}
        for _, row, _ in self._live():
            row.begin_forward()

    def observe(self, name: str, tensor: torch.Tensor) -> None:
        self.observed[name] = tensor
        for b, row, _ in self._live():
            row.observe(name, tensor[b : b + 1])

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass  # made initialized, from a layer that was

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if key_states.shape[0] != len(self.rows):
            raise KVCompressError(
                f"layer {self.codecs.layer}: a batch of {key_states.shape[0]} reached a cache holding {len(self.rows)} "
                "sequences"
            )
        for b, row, _ in self._live():
            row.update(key_states[b : b + 1], value_states[b : b + 1])
        self.pending = (key_states, value_states)
        self.count = key_states.shape[2]
        return key_states, value_states

    def attend(
        self,
        query: torch.Tensor,
        mask: torch.Tensor | None,
        attend: Callable[..., torch.Tensor],
        scaling: float,
        softcap: float | None,
        causal: bool,
    ) -> torch.Tensor:
        """Attention of query [b, hq, q, d] (at positions seen ...) per sequence over its own layer, with its
        columns of the model's mask: [b, q, hq, d], zeros for padded queries."""
        if None in self.starts:
            self._resolve(first_real_positions(mask, self.seen) or [self.seen] * len(self.rows))
        output = query.new_zeros(query.shape[0], query.shape[2], query.shape[1], query.shape[3])
        for b, row, start in self._live():
            skip = max(0, start - self.seen)  # padded queries of the forward that brought the first real token
            row_query = query[b : b + 1, :, skip:]
            row_mask = None if mask is None else mask[b : b + 1, :, skip:, start:]
            if "queries" in row.observes:
                row.observe("queries", row_query)
            segments, first_query = row.read()
            if row.evictor is not None:
                row.note_attention(scaling, row_mask)
            output[b, skip:] = attend(row_query, segments, first_query, row_mask, scaling, softcap, causal)[0]
        return output

    def abort_forward(self) -> None:
        for _, row, _ in self._live():
            row.abort_forward()
        self.pending = None
        self.observed = {}

    def end_forward(self) -> None:
        for _, row, _ in self._live():
            row.end_forward()
        self.seen += self.count
        self.count = 0
        self.pending = None
        self.observed = {}

    # what transformers asks of a cache layer

    def reset(self) -> None:
        raise KVCompressError("a padded batch's layer is reset by its CompressedCache, which puts a fresh layer back")

    def _map_rows(self, order: list[int]) -> None:
        """The sequences in a new order (beam reordering, batch selection, repetition); a sequence taken twice
        is copied."""
        taken: set[int] = set()
        rows = []
        for index in order:
            rows.append(_layer_copy(self.rows[index]) if index in taken else self.rows[index])
            taken.add(index)
        self.rows = rows
        self.starts = [self.starts[index] for index in order]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_rows(beam_idx.tolist())

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_rows([index for index in range(len(self.rows)) for _ in range(repeats)])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_rows(torch.arange(len(self.rows))[indices].tolist())

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the newest tokens: a negative count removes that many; a positive one is the length to keep."""
        keep = max(0, self.seen + tokens_to_remove) if tokens_to_remove <= 0 else min(tokens_to_remove, self.seen)
        last_start = max((start for _, _, start in self._live()), default=0)
        if keep < last_start:
            raise KVCompressError(
                f"layer {self.codecs.layer}: cannot crop a left-padded batch to {keep} positions, into its padding "
                f"(a prompt starts at position {last_start})"
            )
        for _, row, start in self._live():
            row.crop(keep - start - row.seen)
        self.seen = keep

    def held_positions(self) -> torch.Tensor:
        """As CompressedLayer.held_positions, in the batch's positions, sequences padded with -1 to the longest."""
        held = [
            torch.full((1, self.kv_heads, 0), -1, dtype=torch.int64) if start is None else _shifted(row.held_positions(), start)
            for row, start in zip(self.rows, self.starts)
        ]
        longest = max(h.shape[-1] for h in held)
        return torch.cat([torch.nn.functional.pad(h, (0, longest - h.shape[-1]), value=-1) for h in held])

    def nbytes(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for row in self.rows:
            for name, count in row.nbytes().items():
                total[name] = total.get(name, 0) + count
        return total
