"""The RVQ plugin's layer reader: a fused decode kernel (kvcompress_rvq.decode_kernels) over the packed middle of
layers whose keys and values are both RVQ-coded, the lookup-table estimators elsewhere
(kvcompress.pipeline.FusedDecodeReader decides)."""

from __future__ import annotations

from kvcompress.pipeline import FusedDecodeReader, LayerCodecs
from kvcompress_rvq.decode_kernels import fused_rvq_decode_triton


class FusedRVQReader(FusedDecodeReader):
    """Attention over a layer's RVQ keys and values: the fused Triton kernel for decode on CUDA, else the rvq-lut
    estimators' scores and mix, which are the kernel's reference."""

    def __init__(self, codecs: LayerCodecs, splits: int | None = None):
        super().__init__(codecs.keys, codecs.values, splits)

    def fused(self, query, keys, values, bias, scale, softcap):  # typed and documented by FusedDecodeReader.fused
        key_rvq, value_rvq = self.keys.quantizer, self.values.quantizer
        return fused_rvq_decode_triton(
            key_rvq.tables(query), keys.tensors, key_rvq.bits, values.tensors, value_rvq.bits,
            value_rvq.codebooks_on(query.device), value_rvq.grouping, bias, scale, softcap, self.splits,
        )
