"""The rvq-lut estimator: attention read from rvq codes through per-query lookup tables.

scores: for a query q, table[group j, level l, c] = <q restricted to group j, codeword c of level l>; a key's
score is scale * sum over (j, l) of table[j, l, code]. The tables cost queries x groups x depth x C x group
multiply-adds once; each key then costs groups x depth lookups, and no key is reconstructed.

mix: sum_t w_t v_t = sum_(j, l) sum_c (sum of w_t * scale_t over tokens t whose code (j, l) is c) x codeword
c: weights are accumulated per codeword, then one product with the codebooks.
"""

from __future__ import annotations

import torch

from kvcompress_rvq.kernels import lut_mix, lut_scores
from kvcompress.runtime import Estimator, Quantizer
from kvcompress.state import PackedState
from kvcompress_rvq.quantizer import RVQQuantizer


def _rvq(quantizer: object) -> RVQQuantizer:
    if not isinstance(quantizer, RVQQuantizer):
        raise TypeError(f"the rvq-lut estimator reads rvq state only, got a {type(quantizer).__name__}")
    return quantizer


class LUTEstimator(Estimator):
    def __init__(self, quantizer: Quantizer):
        self.rvq = _rvq(quantizer)

    def scores(self, query: torch.Tensor, state: PackedState) -> torch.Tensor:
        rvq = self.rvq
        return lut_scores(rvq.tables(query), state.tensors["codes"], state.tensors["scale"], rvq.bits).to(query.dtype)

    def mix(self, weights: torch.Tensor, state: PackedState) -> torch.Tensor:
        rvq = self.rvq
        b, h, n, t = weights.shape
        size = rvq.codebook_size
        per_codeword = lut_mix(weights, state.tensors["codes"], state.tensors["scale"], rvq.bits, rvq.codes_per_token, size)
        per_codeword = per_codeword.reshape(b, h, n, rvq.grouping.groups, rvq.depth, size)
        groups = torch.einsum("bhnjlc,lcg->bhnjg", per_codeword, rvq.codebooks_on(weights.device))
        return rvq.grouping.merge(groups).to(weights.dtype)
