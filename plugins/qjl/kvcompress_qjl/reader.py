"""The QJL plugin's layer reader: a fused decode kernel (kvcompress_qjl.decode_kernels) over the packed middle of
layers whose keys are QJL's and whose values are scalar-quantized (min/max, Lloyd-Max, fp8: the scalar plugin's,
read through kvcompress_kernels.decode), the estimator path elsewhere (kvcompress.pipeline.FusedDecodeReader
decides)."""

from __future__ import annotations

from kvcompress.pipeline import FusedDecodeReader, LayerCodecs
from kvcompress_kernels.decode import operand
from kvcompress_qjl.decode_kernels import fused_qjl_decode_triton


class FusedQJLReader(FusedDecodeReader):
    """Attention over a layer's QJL keys and scalar values: the fused Triton kernel for decode on CUDA, else the
    qjl estimator's scores and the values' estimator mix, which are the kernel's reference."""

    def __init__(self, codecs: LayerCodecs, splits: int | None = None):
        super().__init__(codecs.keys, codecs.values, splits)

    def fused(self, query, keys, values, bias, scale, softcap):  # typed and documented by FusedDecodeReader.fused
        quantizer = self.keys.quantizer
        codes, index = quantizer.codes(keys)
        return fused_qjl_decode_triton(
            query, codes, index, quantizer.sketch_on(query.device), quantizer.scale, quantizer.group,
            operand(self.values.quantizer, values), bias, scale, softcap, self.splits,
        )
