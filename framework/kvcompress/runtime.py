"""The runtime objects that plugin factories build, one per (layer, role).

A quantizer turns float tensors [batch, kv_heads, tokens, head_dim] into a PackedState and back.
An estimator computes attention scores and value mixes straight from a PackedState.
A reader computes a layer's partial attention over its packed keys and values together (the default one
goes through the two roles' estimators; a method pair can supply a fused kernel).
A transform is an orthogonal map applied before quantization (queries get it too, so scores keep).
A channel pruner picks which head_dim channels a role stores, from what the model showed (an Observation).
An evictor picks which tokens of a layer stay (token eviction), from its Candidates.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kvcompress.state import PackedState

if TYPE_CHECKING:
    from kvcompress.eviction import Candidates


class Quantizer(ABC):
    """Encodes blocks of tokens into packed state.

    token_block: encode() is only called with a token count that is a multiple of this (KIVI keys
    quantize per channel over blocks of G tokens, so G; per-token methods leave it at 1).
    """

    token_block: int = 1

    @abstractmethod
    def encode(self, x: torch.Tensor) -> PackedState:
        """x: [batch, kv_heads, tokens, head_dim], tokens % token_block == 0, finite values."""

    @abstractmethod
    def decode(self, state: PackedState) -> torch.Tensor:
        """The [batch, kv_heads, tokens, head_dim] tensor the state stands for, in state.dtype."""

    def constants(self) -> dict[str, torch.Tensor]:
        """Per-layer constants (sketch matrices, codebooks): counted apart from per-token bytes."""
        return {}

    def bits_per_element(self, head_dim: int) -> float | None:
        """The storage cost the spec's fields imply, in bits per element over a full token block.

        Tests hold the bytes actually stored to this figure; None when it depends on the data.
        """
        return None


class Estimator(ABC):
    """Computes attention terms from packed state without the core decoding it.

    An estimator is bound to its quantizer when built: its factory finds it as `ctx.quantizer` (and checks
    there, once, that it can read that quantizer's state).
    Queries arrive grouped by KV head: [batch, kv_heads, n, head_dim] where n = query heads per KV head
    x query length, so grouped-query attention needs nothing from the estimator.
    """

    @abstractmethod
    def scores(self, query: torch.Tensor, state: PackedState) -> torch.Tensor:
        """<q, k> for every query and stored key: [batch, kv_heads, n, tokens] (unscaled)."""

    @abstractmethod
    def mix(self, weights: torch.Tensor, state: PackedState) -> torch.Tensor:
        """sum_t weights[..., t] * v_t: weights [batch, kv_heads, n, tokens] -> [batch, kv_heads, n, head_dim]."""


class Reader(ABC):
    """Attention over a layer's packed middle, reading its keys' and values' states together.

    Built once per layer, bound to that layer's codecs (kvcompress.pipeline.LayerCodecs), so a fused kernel
    for a (key method, value method) pair reads both states in one pass. The cache calls it per block of
    tokens and merges the partial outputs exactly with the other segments (kvcompress_kernels.partial).
    """

    @abstractmethod
    def attend(
        self,
        query: torch.Tensor,
        keys: PackedState,
        values: PackedState,
        bias: torch.Tensor | None,
        scale: float,
        softcap: float | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """query grouped by KV head [batch, kv_heads, n, head_dim]; bias: additive float32 broadcastable to
        [batch, kv_heads, n, tokens] (hidden keys very negative) or None; scores are <q, k> * scale, then
        softcap * tanh(. / softcap) when softcap is set, then + bias.

        Returns (output [batch, kv_heads, n, head_dim] float32, log-sum-exp of the scores [batch, kv_heads, n]
        float32), the output normalized over these tokens only."""


class Transform(ABC):
    """An orthogonal map of head_dim vectors: inverse(forward(x)) == x and <f(q), f(k)> == <q, k>."""

    @abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def inverse(self, x: torch.Tensor) -> torch.Tensor: ...

    def constants(self) -> dict[str, torch.Tensor]:
        return {}


@dataclass(frozen=True)
class Observation:
    """What one layer's attention module saw in the forward after which its cache compresses tokens.

    queries: [batch, query_heads, n, head_dim], the forward's n queries as attention received them (after
    RoPE and any query norm), oldest first. pre_rope_keys: [batch, kv_heads, n, head_dim], the forward's new
    keys before RoPE (after any key norm). A field is None unless a method of the layer observes it.
    The tokens being stored may include older ones than the forward's n (they waited in the window).
    """

    queries: torch.Tensor | None = None
    pre_rope_keys: torch.Tensor | None = None


class ChannelPruner(ABC):
    """Chooses, per sequence and KV head, which `kept` of the `head_dim` channels a role stores.

    The choice is made once, from the first tokens the layer compresses and the observation of that
    forward, and holds for every later token of the sequence. Queries are read through the same channels,
    so the pruned ones drop out of the scores; what is not stored is not counted.
    """

    head_dim: int
    kept: int

    @abstractmethod
    def select(self, x: torch.Tensor, observation: Observation) -> torch.Tensor:
        """x: the first tokens to store [batch, kv_heads, tokens, head_dim] -> channel indices
        [batch, kv_heads, kept], ascending, int64."""


class Evictor(ABC):
    """Chooses which of a layer's candidate tokens stay; the cache frees the others (kvcompress.eviction).

    query_window: how many of the latest queries it reads (Candidates.queries); the layer holds that many
    between forwards so that eviction during decoding sees them too. 0: it reads no queries.
    """

    query_window: int = 0

    @abstractmethod
    def select(self, candidates: "Candidates", keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep `keep` tokens per (sequence, KV head) on average out of candidates.tokens (keep is a multiple of
        candidates.step, below candidates.tokens).

        Returns (indices [batch, kv_heads, n] int64, counts [batch, kv_heads] int64): head h keeps
        indices[b, h, :counts[b, h]], ascending, in whole groups of candidates.quantum; every count a multiple
        of candidates.step; the counts of a sequence sum to at most keep * kv_heads (a head may keep more than
        `keep` where another keeps less)."""
