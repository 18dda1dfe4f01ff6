"""The scalar plugin's layer reader: fused decode kernels (kvcompress_scalar.decode_kernels) over the packed
middle of layers whose keys and values are scalar (min/max, Lloyd-Max) or fp8, the estimator path elsewhere.

The kernels run where kvcompress_kernels.dispatch.use_triton says (CUDA tensors, or KVCOMPRESS_KERNELS=triton)
for decode-sized query blocks (at most MAX_DECODE_ROWS query rows per KV head); the query goes through the
keys' codec first (kept channels of a pruned role, the rotation of a transformed one) and the output through
the values' codec after (inverse rotation, pruned channels as zeros), once per read.
"""

from __future__ import annotations

from kvcompress.pipeline import EstimatorReader, LayerCodecs
from kvcompress.runtime import Reader
from kvcompress_kernels.decode import MAX_DECODE_ROWS, operand
from kvcompress_kernels.dispatch import use_triton
from kvcompress_scalar.decode_kernels import fused_decode_triton


class FusedScalarReader(Reader):
    """Attention over a layer's scalar/fp8 packed keys and values: the fused Triton kernels for decode on
    CUDA, else the estimators (EstimatorReader), which are the kernels' reference.

    splits: programs sharing a head's tokens (None: enough to fill the GPU)."""

    def __init__(self, codecs: LayerCodecs, splits: int | None = None):
        self.keys, self.values = codecs.keys, codecs.values
        self.estimators = EstimatorReader(codecs.keys, codecs.values)
        self.splits = splits

    def attend(self, query, keys, values, bias, scale, softcap):  # typed and documented by Reader.attend
        if query.shape[2] > MAX_DECODE_ROWS or keys.tokens == 0 or not use_triton(query):
            return self.estimators.attend(query, keys, values, bias, scale, softcap)
        out, lse = fused_decode_triton(
            self.keys.stored_query(query, keys), operand(self.keys.quantizer, keys),
            operand(self.values.quantizer, values), bias, scale, softcap, self.splits,
        )
        return self.values.restored_mix(out, values).float(), lse
