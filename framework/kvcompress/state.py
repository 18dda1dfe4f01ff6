"""The packed state a quantizer produces from a block of tokens, and that estimators and readers read.

Every tensor in a state has the layout [batch, kv_heads, rows, ...], where `rows` counts token rows
(one per token, or one per group of tokens such as a KIVI key block). States of the same quantizer
concatenate along dim 2: a cache layer's TokenStore (kvcompress.store) appends each new state's rows to its
buffers, and hands readers views of them as states. A state may also hold per-sequence tensors
[batch, kv_heads, ...] that every row shares (a channel selection): those are held once, not concatenated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch

ROW_DIM = 2


@dataclass
class PackedState:
    """Packed tensors for `tokens` tokens of one role (keys or values) of one layer.

    tensors: name -> tensor, each [batch, kv_heads, rows, ...] with rows a fixed fraction of tokens.
    tokens: how many tokens the state encodes.
    head_dim: the vector length the state decodes to.
    dtype: the floating dtype decode restores.
    shared: name -> per-sequence tensor [batch, kv_heads, ...] that applies to every row (a pruner's channel
    selection); concatenated states must share it.
    """

    tensors: dict[str, torch.Tensor]
    tokens: int
    head_dim: int
    dtype: torch.dtype
    meta: dict[str, int] = field(default_factory=dict)
    shared: dict[str, torch.Tensor] = field(default_factory=dict)

    def nbytes(self) -> int:
        """Bytes actually held: the sum over distinct storages, so a view of a larger buffer counts whole."""
        return storage_nbytes([*self.tensors.values(), *self.shared.values()])

    @property
    def batch(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    @property
    def kv_heads(self) -> int:
        return next(iter(self.tensors.values())).shape[1]

    def cat(self, other: PackedState) -> PackedState:
        """This state followed by `other` along the token axis."""
        if self.tensors.keys() != other.tensors.keys() or self.head_dim != other.head_dim:
            raise ValueError("cannot concatenate packed states of different quantizers")
        if self.shared.keys() != other.shared.keys() or not all(
            v is other.shared[k] or torch.equal(v, other.shared[k]) for k, v in self.shared.items()
        ):
            raise ValueError("cannot concatenate packed states whose shared per-sequence tensors differ")
        return PackedState(
            tensors={k: torch.cat([v, other.tensors[k]], dim=ROW_DIM) for k, v in self.tensors.items()},
            tokens=self.tokens + other.tokens,
            head_dim=self.head_dim,
            dtype=self.dtype,
            meta=dict(self.meta),
            shared=dict(self.shared),
        )

    def map(self, fn) -> PackedState:
        """A state whose tensors are fn(tensor): batch selection, device moves."""
        return PackedState(
            tensors={k: fn(v) for k, v in self.tensors.items()},
            tokens=self.tokens,
            head_dim=self.head_dim,
            dtype=self.dtype,
            meta=dict(self.meta),
            shared={k: fn(v) for k, v in self.shared.items()},
        )


def storage_nbytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (shared storages count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def reachable_tensors(root: Any) -> list[torch.Tensor]:
    """Every tensor reachable from `root` through object attributes, dicts, lists and tuples."""
    found: list[torch.Tensor] = []
    seen: set[int] = set()
    stack = [root]
    while stack:
        item = stack.pop()
        if id(item) in seen or isinstance(item, (type, ModuleType)):
            continue
        seen.add(id(item))
        if isinstance(item, torch.Tensor):
            found.append(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
        elif hasattr(item, "__dict__"):
            stack.extend(vars(item).values())
    return found
