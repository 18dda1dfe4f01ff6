"""The runtime objects of the core's own methods (kvcompress.builtin holds their specs and hook
implementations, and stays light: this module imports torch, and loads only when a factory runs)."""

from __future__ import annotations

import torch

from kvcompress.runtime import Estimator, Quantizer
from kvcompress.state import PackedState


class DecodeEstimator(Estimator):
    """The reference estimator: decode the packed state, then matmul. Correct for every quantizer."""

    def __init__(self, quantizer: Quantizer):
        self.quantizer = quantizer

    def scores(self, query: torch.Tensor, state: PackedState) -> torch.Tensor:
        keys = self.quantizer.decode(state).to(query.dtype)
        return query @ keys.transpose(-1, -2)

    def mix(self, weights: torch.Tensor, state: PackedState) -> torch.Tensor:
        values = self.quantizer.decode(state).to(weights.dtype)
        return weights @ values


class FloatQuantizer(Quantizer):
    """Stores tokens as floats of one dtype."""

    def __init__(self, dtype: str):
        self.storage = getattr(torch, dtype)

    def encode(self, x: torch.Tensor) -> PackedState:
        return PackedState({"x": x.to(self.storage).contiguous()}, x.shape[2], x.shape[3], x.dtype)

    def decode(self, state: PackedState) -> torch.Tensor:
        return state.tensors["x"].to(state.dtype)

    def bits_per_element(self, head_dim: int) -> float:
        return float(torch.finfo(self.storage).bits)
