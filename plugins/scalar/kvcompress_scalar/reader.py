"""The scalar plugin's layer reader: fused decode kernels (kvcompress_scalar.decode_kernels) over the packed
middle of layers whose keys and values are scalar (min/max, Lloyd-Max) or fp8, the estimator path elsewhere
(kvcompress.pipeline.FusedDecodeReader decides)."""

from __future__ import annotations

from kvcompress.pipeline import FusedDecodeReader, LayerCodecs
from kvcompress_kernels.decode import operand
from kvcompress_scalar.decode_kernels import fused_decode_triton


class FusedScalarReader(FusedDecodeReader):
    """Attention over a layer's scalar/fp8 packed keys and values: the fused Triton kernels for decode on
    CUDA, else the estimators, which are the kernels' reference."""

    def __init__(self, codecs: LayerCodecs, splits: int | None = None):
        super().__init__(codecs.keys, codecs.values, splits)

    def fused(self, query, keys, values, bias, scale, softcap):  # typed and documented by FusedDecodeReader.fused
        return fused_decode_triton(
            query, operand(self.keys.quantizer, keys), operand(self.values.quantizer, values), bias, scale, softcap,
            self.splits,
        )
