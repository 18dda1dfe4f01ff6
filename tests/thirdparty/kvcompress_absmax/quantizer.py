"""Runtime quantizer of the example plugin."""

import torch

from kvcompress import PackedState, Quantizer
from kvcompress_kernels.bitpack import pack_bits, unpack_bits


class AbsmaxQuantizer(Quantizer):
    token_block = 1

    def __init__(self, bits: int):
        self.bits = bits
        self.levels = 2 ** (bits - 1) - 1

    def encode(self, x: torch.Tensor) -> PackedState:
        scale = x.abs().amax(-1, keepdim=True).float() / self.levels
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = (torch.round(x.float() / scale) + self.levels).to(torch.uint8)
        return PackedState(
            tensors={"codes": pack_bits(codes, self.bits), "scale": scale.squeeze(-1).half()},
            tokens=x.shape[2],
            head_dim=x.shape[3],
            dtype=x.dtype,
        )

    def decode(self, state: PackedState) -> torch.Tensor:
        codes = unpack_bits(state.tensors["codes"], self.bits, state.head_dim)
        scale = state.tensors["scale"].float().unsqueeze(-1)
        return ((codes.float() - self.levels) * scale).to(state.dtype)

    def bits_per_element(self, head_dim: int) -> float:
        return self.bits + 16 / head_dim
