"""Where one role of one layer keeps its packed tokens: buffers grown geometrically, a token count per head.

For every tensor of the role's PackedState the store holds one buffer [batch, kv_heads, capacity rows, ...],
filled from row 0. `tokens` [batch, kv_heads] says how many tokens each (sequence, KV head) holds, so heads
may hold different counts (token eviction with per-head budgets); rows past a head's count are padding, zeros
(so that whatever decodes them gives finite values, which attention then weighs 0).

- Appending writes the new rows after each head's last one: O(rows appended). When the buffers are full
  they are reallocated `GROWTH` times larger (rounded up to a page of PAGE_TOKENS tokens), so a generation
  copies each row about 1 / (GROWTH - 1) = 16 times in all (a memcpy of packed bytes), instead of
  concatenating the whole state at every block (O(tokens^2 / block)).
- nbytes() is every byte allocated, headroom included: at most 1 - 1 / GROWTH (6 %) of the capacity, plus
  one page, is headroom.
- Reading is zero-copy: view(start, stop) slices the buffers into a PackedState that estimators read as if
  it had been encoded in one piece. A GPU kernel reads the buffers with their strides and `tokens`.
- select() keeps given tokens per head (eviction) and shrinks the buffers to what is kept; positions of
  the kept tokens are kept too. Batch selection and beam reordering map dim 0.

Heads that hold different counts (eviction with per-head budgets) are held **ragged**, so that a head pays for
the tokens it keeps, not for the longest head's: each (sequence, head) owns a region of one flat buffer per
tensor (rows [regions[b, h], regions[b, h] + room[b, h]), room rounded up to a page and grown GROWTH times
when an append overflows it: at most a page plus 6 % of headroom per region). view() then gathers the block
it is asked for into the padded [batch, kv_heads, rows] form readers take (a transient copy, bounded by the
block a reader reads at once); padding rows read as zeros.

A tensor whose rows each cover several tokens (a KIVI key group's scale) keeps whole rows: appends and
selections move tokens in multiples of that many.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from kvcompress.errors import KVCompressError
from kvcompress.state import ROW_DIM, PackedState, storage_nbytes

GROWTH = 1.0625
PAGE_TOKENS = 32


@dataclass(frozen=True)
class Layout:
    """What the store learned from the first state appended: tokens per row of each tensor, and what
    decode needs."""

    tokens_per_row: dict[str, int]
    head_dim: int
    dtype: torch.dtype
    meta: dict[str, int]

    @property
    def quantum(self) -> int:
        """Appends and selections move tokens in multiples of this (every tensor's rows stay whole)."""
        return math.lcm(*self.tokens_per_row.values())


class TokenStore:
    """Packed rows of one role of one layer (see the module docstring)."""

    def __init__(self, name: str = "store", holds_positions: bool = True):
        self.name = name
        # A layer's value store follows its key store row for row: only the key store holds the positions.
        self.holds_positions = holds_positions
        self.explicit = False  # positions are explicit (tokens were selected or appended at given positions)
        self.layout: Layout | None = None
        self.buffers: dict[str, torch.Tensor] = {}
        self.shared: dict[str, torch.Tensor] = {}
        # [batch, kv_heads] int64; None while empty
        self.tokens: torch.Tensor | None = None
        # Absolute positions [batch, kv_heads, capacity], int16 while they fit (int32 beyond), held only once
        # explicit (before that, the positions are first_position + index, the same for every head).
        self.positions: torch.Tensor | None = None
        self.first_position = 0
        self.capacity = 0  # tokens per (sequence, head) the buffers can hold (dense)
        self.length = 0  # the most tokens any (sequence, head) holds: the extent a reader scans
        self.uniform = True  # every (sequence, head) holds `length` tokens
        # Ragged: buffers and positions are flat [rows, ...] / [tokens]; each (sequence, head) owns the tokens
        # [regions, regions + room) of them ([batch, kv_heads] int64 each). None while dense.
        self.regions: torch.Tensor | None = None
        self.room: torch.Tensor | None = None

    def __repr__(self) -> str:
        return (
            f"TokenStore({self.name}, length={self.length}, capacity={self.capacity}, uniform={self.uniform}, "
            f"ragged={self.ragged})"
        )

    @property
    def ragged(self) -> bool:
        return self.regions is not None

    @property
    def _page(self) -> int:
        """Capacities and ragged regions are whole pages of PAGE_TOKENS tokens and whole rows of every tensor."""
        return math.lcm(PAGE_TOKENS, self.layout.quantum)

    # ---------------------------------------------------------------------------------------------
    # writing

    def append(
        self, state: PackedState, first_position: int | None = None, positions: torch.Tensor | None = None
    ) -> None:
        """Store `state` (the same token count for every sequence and head) after each head's tokens.

        first_position: the absolute position of the state's first token; the positions of appended tokens
        follow it. Only needed once positions are explicit (after select); otherwise they are implicit.
        positions: instead, each appended token's own position [batch, kv_heads, tokens] (tokens an evictor
        kept); positions become explicit.
        """
        count = state.tokens
        if count == 0:
            return
        if self.layout is None:
            self._initialize(state, first_position or 0)
        self._check(state)
        if positions is not None and not self.explicit:
            self._explicit_positions()
        new = self._new_positions(count, first_position, positions)
        if not self.ragged:  # dense buffers hold heads of one count
            self._reserve(self.length + count)
            start = self.length
            for name, buffer in self.buffers.items():
                per = self.layout.tokens_per_row[name]
                buffer[:, :, start // per : (start + count) // per] = state.tensors[name]
            if self.positions is not None:
                self.positions[:, :, start : start + count] = new
            self.tokens += count
            self.length += count
            return
        # ragged (the only layout of uneven heads): each region takes the rows after its own
        ends = self.tokens + count
        if bool((ends > self.room).any()):
            self._regrow(ends)
        slot = self.regions + self.tokens  # [batch, heads] first free token of each region
        for name, buffer in self.buffers.items():
            per = self.layout.tokens_per_row[name]
            rows = state.tensors[name].shape[ROW_DIM]
            index = ((slot // per)[..., None] + torch.arange(rows, device=buffer.device)).flatten()
            _bits(buffer)[index] = _bits(state.tensors[name]).flatten(0, 2)
        if self.positions is not None:
            index = (slot[..., None] + torch.arange(count, device=slot.device)).flatten()
            self.positions[index] = new.expand(*self.tokens.shape, count).flatten().to(self.positions.dtype)
        self.tokens = ends
        self.length = int(ends.max())
        self.uniform = bool((ends == self.length).all())

    def _initialize(self, state: PackedState, first_position: int) -> None:
        per_row = {}
        for name, tensor in state.tensors.items():
            rows = tensor.shape[ROW_DIM]
            if rows == 0 or state.tokens % rows:
                raise KVCompressError(
                    f"{self.name}: tensor {name!r} has {rows} rows for {state.tokens} tokens; a packed state's rows "
                    "must each cover a whole number of tokens"
                )
            per_row[name] = state.tokens // rows
        self.layout = Layout(per_row, state.head_dim, state.dtype, dict(state.meta))
        self.shared = dict(state.shared)
        batch, heads = next(iter(state.tensors.values())).shape[:2]
        device = next(iter(state.tensors.values())).device
        self.tokens = torch.zeros(batch, heads, dtype=torch.int64, device=device)
        self.buffers = {
            name: tensor.new_empty(tensor.shape[:ROW_DIM] + (0,) + tensor.shape[ROW_DIM + 1 :])
            for name, tensor in state.tensors.items()
        }
        self.first_position = first_position

    def _check(self, state: PackedState) -> None:
        if state.tensors.keys() != self.buffers.keys() or state.head_dim != self.layout.head_dim:
            raise KVCompressError(f"{self.name}: the state to append comes from another quantizer than the held one")
        if state.tokens % self.layout.quantum:
            raise KVCompressError(
                f"{self.name}: appends must be whole multiples of {self.layout.quantum} tokens, got {state.tokens}"
            )
        for name, value in state.shared.items():
            held = self.shared.get(name)
            if held is None or not (value is held or torch.equal(value, held)):
                raise KVCompressError(f"{self.name}: the state to append has another per-sequence {name!r} than the held one")

    def _new_positions(
        self, count: int, first_position: int | None, positions: torch.Tensor | None
    ) -> torch.Tensor | None:
        """The appended tokens' positions, int64 [count] or [batch, kv_heads, count], with the buffer widened to
        hold them; None where this store holds none (implicit, or a value store)."""
        if positions is not None and tuple(positions.shape) != (*self.tokens.shape, count):
            raise KVCompressError(
                f"{self.name}: positions {tuple(positions.shape)} do not match {count} tokens of "
                f"{tuple(self.tokens.shape)} (sequence, head) pairs"
            )
        if self.positions is None:
            return None
        if positions is not None:
            self._widen(int(positions.max()))  # an evictor's choice, at the end of a prefill: one sync
            return positions.to(device=self.tokens.device, dtype=torch.int64)
        if first_position is None:
            raise KVCompressError(f"{self.name}: positions are explicit after a selection; append needs first_position")
        self._widen(first_position + count - 1)  # known on the host: no sync on the decode path
        return torch.arange(first_position, first_position + count, device=self.tokens.device)

    def _explicit_positions(self) -> None:
        """Turn implicit positions (first_position + index) into the explicit buffer (in a key store)."""
        self.explicit = True
        if not self.holds_positions:
            return
        batch, heads = self.tokens.shape
        last = self.first_position + self.length
        dtype = torch.int16 if last <= torch.iinfo(torch.int16).max else torch.int32
        self.positions = torch.zeros(batch, heads, self.capacity, dtype=dtype, device=self.tokens.device)
        self.positions[..., : self.length] = self.first_position + torch.arange(self.length, device=self.tokens.device)

    def _widen(self, position: int) -> None:
        """int16 positions become int32 before one that does not fit is written."""
        if self.positions is not None and position > torch.iinfo(self.positions.dtype).max:
            self.positions = self.positions.to(torch.int32)

    def _reserve(self, tokens: int) -> None:
        """Make room for `tokens` per (sequence, head): reallocate GROWTH times larger when full."""
        if tokens <= self.capacity:
            return
        self._reallocate(max(tokens, math.ceil(self.capacity * GROWTH)))

    def _reallocate(self, tokens: int) -> None:
        """Buffers of capacity `tokens` (rounded up to a page), holding the first `length` tokens."""
        page = self._page
        capacity = -(-tokens // page) * page
        for name, buffer in self.buffers.items():
            per = self.layout.tokens_per_row[name]
            grown = buffer.new_zeros(buffer.shape[:ROW_DIM] + (capacity // per,) + buffer.shape[ROW_DIM + 1 :])
            used = self.length // per
            grown[:, :, :used] = buffer[:, :, :used]
            self.buffers[name] = grown
        if self.positions is not None:
            grown = self.positions.new_zeros(*self.positions.shape[:2], capacity)
            grown[..., : self.length] = self.positions[..., : self.length]
            self.positions = grown
        self.capacity = capacity

    # ---------------------------------------------------------------------------------------------
    # selecting

    def select(self, keep: torch.Tensor, counts: torch.Tensor | None = None) -> None:
        """Keep, per (sequence, head), the tokens at indices keep [batch, kv_heads, n] (ascending; the first
        counts[b, h] of each row when counts is given, else all n), and free the rest: the buffers shrink to
        what is kept (rounded up to a page; ragged regions when heads keep different counts).

        Tensors whose rows cover several tokens keep whole rows: the kept indices must come in whole rows.
        """
        if self.layout is None:
            raise KVCompressError(f"{self.name}: nothing is stored, there is nothing to select from")
        keep = keep.to(device=self.tokens.device, dtype=torch.int64)
        batch, heads = self.tokens.shape
        if keep.dim() != 3 or keep.shape[:2] != (batch, heads):
            raise KVCompressError(f"{self.name}: keep must be [{batch}, {heads}, n] token indices, got {tuple(keep.shape)}")
        n = keep.shape[2]
        counts = torch.full_like(self.tokens, n) if counts is None else counts.to(self.tokens)
        slot = torch.arange(n, device=keep.device)
        valid = slot < counts[..., None]
        if n and bool((valid & ((keep < 0) | (keep >= self.tokens[..., None]))).any()):
            raise KVCompressError(f"{self.name}: keep names tokens a head does not hold")
        if n > 1 and bool((valid[..., 1:] & (keep[..., 1:] <= keep[..., :-1])).any()):
            raise KVCompressError(f"{self.name}: keep must list each head's tokens once, in ascending order")
        quantum = self.layout.quantum
        if n % quantum or bool((counts % quantum).any()):
            raise KVCompressError(f"{self.name}: selections keep whole groups of {quantum} tokens")
        keep = torch.where(valid, keep, 0)
        if not self.explicit:
            self._explicit_positions()
        source, source_positions = self._padded()
        kept_positions = source_positions.gather(2, keep) if source_positions is not None else None
        kept = {}
        for name, buffer in source.items():
            per = self.layout.tokens_per_row[name]
            rows = keep[..., ::per] // per
            if per > 1:
                whole = (rows[..., None] * per + torch.arange(per, device=keep.device)).reshape(batch, heads, n)
                if not torch.equal(whole[valid], keep[valid]):
                    raise KVCompressError(f"{self.name}: tensor {name!r} stores one row per {per} tokens; keep whole groups")
            gathered = _bits(buffer).gather(ROW_DIM, _expand_index(rows, buffer))
            unused = torch.arange(n // per, device=keep.device) >= (counts // per)[..., None]
            kept[name] = gathered.masked_fill_(_expand_index(unused, gathered), 0).view(buffer.dtype)
        self._hold(kept, kept_positions, counts.clone())

    def _hold(self, tensors: dict[str, torch.Tensor], positions: torch.Tensor | None, counts: torch.Tensor) -> None:
        """Hold padded tensors [batch, kv_heads, rows, ...] (zeros past each head's count), their positions
        [batch, kv_heads, tokens] and the counts: dense buffers (capacity the longest count, rounded up to a
        page) when every head holds the same count, else ragged regions (each its own count, rounded up)."""
        page = self._page
        self.tokens = counts
        self.length = int(counts.max()) if counts.numel() else 0
        self.uniform = bool((counts == self.length).all())
        if self.uniform:
            capacity = -(-self.length // page) * page
            self.regions = self.room = None
            self.buffers = {}
            for name, tensor in tensors.items():
                per = self.layout.tokens_per_row[name]
                fresh = tensor.new_zeros(tensor.shape[:ROW_DIM] + (capacity // per,) + tensor.shape[ROW_DIM + 1 :])
                fresh[:, :, : self.length // per] = tensor[:, :, : self.length // per]
                self.buffers[name] = fresh
            if positions is not None:
                self.positions = positions.new_zeros(*positions.shape[:2], capacity)
                self.positions[..., : self.length] = positions[..., : self.length]
            self.capacity = capacity
            return
        self._place(-(-counts // page) * page, tensors, positions)

    def _place(self, room: torch.Tensor, tensors: dict[str, torch.Tensor], positions: torch.Tensor | None) -> None:
        """Lay padded tensors out ragged: region (b, h) gets room[b, h] tokens (multiples of a page), the first
        tokens[b, h] of them filled."""
        flat_room = room.flatten()
        self.room = room
        self.regions = (flat_room.cumsum(0) - flat_room).view_as(room)
        total = int(flat_room.sum())
        self.capacity = 0
        self.buffers = {}
        for name, tensor in tensors.items():
            per = self.layout.tokens_per_row[name]
            rows = tensor.shape[ROW_DIM]
            filled = torch.arange(rows, device=tensor.device) < (self.tokens // per)[..., None]  # [b, h, rows]
            target = (self.regions // per)[..., None] + torch.arange(rows, device=tensor.device)
            flat = tensor.new_zeros((total // per,) + tensor.shape[ROW_DIM + 1 :])
            _bits(flat)[target[filled]] = _bits(tensor)[filled]
            self.buffers[name] = flat
        if positions is not None:
            filled = torch.arange(positions.shape[2], device=positions.device) < self.tokens[..., None]
            target = self.regions[..., None] + torch.arange(positions.shape[2], device=positions.device)
            flat = positions.new_zeros(total)
            flat[target[filled]] = positions[filled]
            self.positions = flat

    def _regrow(self, ends: torch.Tensor) -> None:
        """Ragged regions room for `ends` tokens each: GROWTH times larger where full, rounded up to a page."""
        page = self._page
        grown = torch.maximum(ends, torch.ceil(self.room * GROWTH).long())
        room = torch.where(ends > self.room, -(-grown // page) * page, self.room)
        tensors, positions = self._padded()
        self._place(room, tensors, positions)

    def _padded(self) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """Every held token as padded tensors [batch, kv_heads, rows, ...] and positions [batch, kv_heads,
        tokens] in the stored dtype: the buffers themselves when dense, a gathered copy when ragged."""
        if not self.ragged:
            return self.buffers, self.positions
        tensors = self.view(0, self.length).tensors
        positions = None
        if self.positions is not None:
            positions = self._gather_positions(0, self.length)
        return tensors, positions

    def _gather_rows(self, flat: torch.Tensor, per: int, start: int, stop: int) -> torch.Tensor:
        """Rows of tokens [start, stop) of every ragged region of a flat tensor: [batch, kv_heads, rows, ...],
        zeros past each region's count."""
        rows = -(-stop // per) - start // per
        offsets = torch.arange(rows, device=flat.device)
        filled = offsets + start // per < (self.tokens // per)[..., None]
        index = torch.where(filled, ((self.regions + start) // per)[..., None] + offsets, 0)
        gathered = _bits(flat)[index]
        return gathered.masked_fill_(_expand_index(~filled, gathered), 0).view(flat.dtype)

    def _gather_positions(self, start: int, stop: int) -> torch.Tensor:
        return self._gather_rows(self.positions, 1, start, stop)

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply fn to dim 0 of everything held (batch selection, beam reordering, device moves)."""
        if self.layout is None:
            return
        self.shared = {name: fn(value) for name, value in self.shared.items()}
        if self.ragged:  # through the padded form, laid out again
            tensors, positions = self._padded()
            self._hold(
                {name: fn(t) for name, t in tensors.items()}, None if positions is None else fn(positions), fn(self.tokens)
            )
            return
        self.buffers = {name: fn(buffer) for name, buffer in self.buffers.items()}
        self.tokens = fn(self.tokens)
        if self.positions is not None:
            self.positions = fn(self.positions)
        self.length = int(self.tokens.max()) if self.tokens.numel() else 0
        self.uniform = bool((self.tokens == self.length).all())

    # ---------------------------------------------------------------------------------------------
    # reading

    def view(self, start: int = 0, stop: int | None = None) -> PackedState:
        """Tokens [start, stop) of every head as a PackedState of views into the buffers (no copy; ragged: the
        rows gathered, zeros past each head's count).

        start and stop are multiples of `layout.quantum` (stop may be `length`)."""
        stop = self.length if stop is None else stop
        tensors = {}
        for name, buffer in self.buffers.items():
            per = self.layout.tokens_per_row[name]
            if self.ragged:
                tensors[name] = self._gather_rows(buffer, per, start, stop)
            else:
                tensors[name] = buffer[:, :, start // per : -(-stop // per)]
        return PackedState(
            tensors=tensors,
            tokens=stop - start,
            head_dim=self.layout.head_dim,
            dtype=self.layout.dtype,
            meta=dict(self.layout.meta),
            shared=dict(self.shared),
        )

    def padding(self, start: int = 0, stop: int | None = None) -> torch.Tensor | None:
        """bool [batch, kv_heads, stop - start]: True where a head holds no token (None when none is padding)."""
        stop = self.length if stop is None else stop
        if self.uniform:
            return None
        index = torch.arange(start, stop, device=self.tokens.device)
        return index >= self.tokens[..., None]

    def token_positions(self, start: int = 0, stop: int | None = None) -> torch.Tensor | range:
        """Absolute positions of tokens [start, stop): a range while they are implicit (every head alike), else
        int64 [batch, kv_heads, stop - start]."""
        stop = self.length if stop is None else stop
        if self.explicit and self.positions is None:
            raise KVCompressError(f"{self.name}: this store follows its layer's key store, which holds the positions")
        if self.positions is None:
            return range(self.first_position + start, self.first_position + stop)
        if self.ragged:
            return self._gather_positions(start, stop).long()
        return self.positions[..., start:stop].long()

    def position_tensor(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """token_positions() as int64 [batch, kv_heads, stop - start] either way (implicit ones expanded)."""
        positions = self.token_positions(start, stop)
        if isinstance(positions, range):
            arange = torch.arange(positions.start, positions.stop, device=self.tokens.device)
            return arange.expand(*self.tokens.shape, len(positions))
        return positions

    # ---------------------------------------------------------------------------------------------
    # accounting

    def nbytes(self) -> int:
        """Every byte allocated for the packed rows and their per-sequence tensors, headroom included."""
        return storage_nbytes([*self.buffers.values(), *self.shared.values()])

    def index_nbytes(self) -> int:
        """Bytes of the bookkeeping: token counts per head, the positions once they are explicit, and the ragged
        regions' offsets and room."""
        held = [t for t in (self.tokens, self.positions, self.regions, self.room) if t is not None]
        return storage_nbytes(held)

    def payload_nbytes(self) -> int:
        """Bytes of the rows that hold tokens (and the per-sequence tensors): what the encoding costs."""
        if self.layout is None:
            return 0
        total = storage_nbytes(self.shared.values())
        tokens = int(self.tokens.sum())
        for name, buffer in self.buffers.items():
            trailing = buffer.shape[1:] if self.ragged else buffer.shape[ROW_DIM + 1 :]
            total += tokens // self.layout.tokens_per_row[name] * math.prod(trailing) * buffer.element_size()
        return total

    def held_tokens(self) -> int:
        """Tokens held, summed over sequences and heads."""
        return 0 if self.tokens is None else int(self.tokens.sum())


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor viewed as integers of its element size, for the row moves: torch has no gather, scatter or
    masked_fill for float8 (fp8 states) on the CPU; moving bits is exact for every dtype."""
    return tensor.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()])


def _expand_index(index: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """index [batch, kv_heads, rows] broadcast over a buffer's trailing dims, for gather/scatter on dim 2."""
    trailing = buffer.shape[ROW_DIM + 1 :]
    return index.reshape(*index.shape, *([1] * len(trailing))).expand(*index.shape, *trailing)
