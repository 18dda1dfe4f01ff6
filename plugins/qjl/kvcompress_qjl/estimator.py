"""Scores of QJL keys read straight from the sign bits: one sketch of each query, no key reconstruction."""

from __future__ import annotations

import torch

from kvcompress import Estimator, PackedState, Quantizer
from kvcompress_qjl.kernels import qjl_scores

from kvcompress_qjl.quantizer import QJLQuantizer


class QJLEstimator(Estimator):
    """<q, k> ~= scale/m * ||k_in|| * <S q_in, sign(S k_in)> + scale/m' * ||k_out|| * <S' q_out, sign(S' k_out)>.

    Queries arrive grouped by KV head, so each query head is sketched once and scored against its KV head's keys.
    """

    def __init__(self, quantizer: Quantizer):
        if not isinstance(quantizer, QJLQuantizer):
            raise TypeError(
                f"the qjl estimator reads state of the qjl quantizer, got {type(quantizer).__name__}: "
                "use estimator decode for other quantizers"
            )
        self.quantizer = quantizer

    def scores(self, query: torch.Tensor, state: PackedState) -> torch.Tensor:
        quantizer = self.quantizer
        codes, index = quantizer.codes(state)
        sketch = quantizer.sketch_on(query.device)
        return qjl_scores(query, codes, sketch, quantizer.scale, index, quantizer.group).to(query.dtype)

    def mix(self, weights: torch.Tensor, state: PackedState) -> torch.Tensor:
        raise TypeError(
            "the qjl estimator computes scores from keys and cannot mix values: give values their own "
            "quantizer with the decode estimator (leave the values' estimator out)"
        )
