"""Fused decode attention over packed scalar state (flash-decoding) in Triton.

The kernels read a layer's packed keys and values where the TokenStores hold them (strided views, no copy)
and return the packed middle's partial attention with its log-sum-exp, as a kvcompress.runtime.Reader does.
Their torch reference is the estimator path (kvcompress.pipeline.EstimatorReader over the `scalar`
estimator), which the reader (kvcompress_scalar.reader) takes off CUDA; tests hold the two equal.

Two launches:
  _decode_split_kernel, grid (batch x kv_heads, splits, query-row blocks): each program takes one KV head's
      tokens [split * per_split, (split + 1) * per_split) and a block of up to 64 of its query rows (32 at
      head_dim 256; rows run over (query head, token) of that KV head, so grouped-query heads share each read
      of a packed block: decode at up to 16 query heads per KV head is one row block). Block
      by block of BT tokens it widens the packed keys and values into float32 tiles in registers
      (codes unpacked LSB-first through kvcompress_kernels.bitpack.unpack_codes, then the quantizer's
      parameters), scores them (scale, softcap, the reader's additive bias, which also hides each head's
      padding rows), and keeps a running max, sum and weighted value sum; it writes the split's normalized
      output and log-sum-exp.
  kvcompress_kernels.decode.merge_splits: the exact log-sum-exp merge of the splits, skipped when there is one.

The formats (kvcompress_kernels.decode.Operand: min/max per channel or per token, Lloyd-Max, fp8), their widening
(`widened`), the softmax steps and the merge are kvcompress_kernels.decode's, shared with kvcompress_qjl's fused
reader, which reads scalar values beside QJL keys. Lloyd-Max state is rotated: the reader rotates the query and
un-rotates the output.
Scores and the value mix accumulate in float32 with exact float32 products (tl.dot, input_precision ieee);
fp8 keys against an fp16 query (FP16_DOT) use fp16 dot operands, exact there: every e4m3 value is an fp16.
"""

from __future__ import annotations

import torch

from kvcompress_kernels.decode import (
    MAX_DECODE_ROWS, NUM_STAGES, Operand, bias_layout, blank_operand, merge_splits, plan_splits, role_args, role_constexprs,
    split_buffers,
)
from kvcompress_kernels.dispatch import HAS_TRITON, block_size

# Query rows (query heads of one KV head x query tokens) one program scores at most, and at head_dim 256
# (query, output and tiles are float32 registers; more would spill).
MAX_BLOCK_ROWS = 64
WIDE_BLOCK_ROWS = 32


def _launch_shape(rows: int, dim: int) -> tuple[int, int, int]:
    """(query rows, tokens per tile, warps) of a program for `rows` query rows of (padded) head_dim `dim`:
    chosen from the AOT compile's registers (aot_cases), with no spills for sm_80 and sm_90."""
    block_rows = min(MAX_BLOCK_ROWS if dim <= 128 else WIDE_BLOCK_ROWS, block_size(rows))
    return block_rows, 32 if dim <= 64 else 16, 8 if block_rows * dim <= 4096 else 16


def fused_decode_triton(
    query: torch.Tensor,
    keys: Operand,
    values: Operand,
    bias: torch.Tensor | None,
    scale: float,
    softcap: float | None,
    splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of query [b, h, n, keys.dim] (grouped by KV head, in the keys' stored space) over packed keys
    and values: (output [b, h, n, values.dim] float32, log-sum-exp [b, h, n] float32), the Reader contract.

    bias: additive float32, broadcastable to [b, h, n, t]; splits: how many programs share a head's tokens
    (None: enough to fill the GPU)."""
    batch, heads, n, dim = query.shape
    tokens = keys.codes.shape[2]
    if dim != keys.dim:
        raise ValueError(
            f"fused decode: the query has {dim} channels but the keys store {keys.dim}; pass the query through "
            "the keys' codec (RoleCodec.stored_query) first"
        )
    if values.codes.shape[2] != tokens or keys.codes.shape[:2] != (batch, heads):
        raise ValueError(
            f"fused decode: keys {tuple(keys.codes.shape[:3])} and values {tuple(values.codes.shape[:3])} must cover "
            f"the same [batch, kv_heads, tokens] as the query's [{batch}, {heads}]"
        )
    device = query.device
    block_rows, block_tokens, warps = _launch_shape(n, block_size(max(keys.dim, values.dim)))
    row_blocks = -(-n // block_rows)
    splits, per_split = plan_splits(tokens, block_tokens, batch * heads * row_blocks, device, splits)
    parts, part_lse = split_buffers(batch, heads, splits, n, values.dim, device)
    bias, bias_strides = bias_layout(bias, (batch, heads, n, tokens))
    query = query if query.stride(-1) == 1 else query.contiguous()
    _decode_split_kernel[(batch * heads, splits, row_blocks)](
        query, *query.stride()[:3],
        bias if bias is not None else part_lse, *bias_strides,
        *role_args(keys), *role_args(values),
        parts, part_lse,
        heads, n, tokens, keys.dim, values.dim, per_split, scale, softcap or 1.0,
        **role_constexprs("KEY", keys.key), **role_constexprs("VALUE", values.key),
        BN=block_rows, BT=block_tokens, BDK=block_size(keys.dim), BDV=block_size(values.dim),
        HAS_BIAS=bias is not None, SOFTCAP=softcap is not None,
        FP16_DOT=keys.format == "fp8" and query.dtype == torch.float16,
        num_warps=warps, num_stages=NUM_STAGES,
    )
    return merge_splits(parts, part_lse, (batch, heads, n, values.dim))


# Operand.key of keys and values in the shipped specs (specs/*.yaml, held equal by the tests), the pairs the
# AOT cases compile; think-kivi-4's keys are kivi-4's with fewer channels.
SPEC_PAIRS: dict[str, tuple[tuple[str, int, int, bool], tuple[str, int, int, bool]]] = {
    "kivi-2": (("minmax-channel", 2, 32, True), ("minmax-token", 2, 32, True)),
    "kivi-4": (("minmax-channel", 4, 32, True), ("minmax-token", 4, 32, True)),
    "rot-k4v2": (("lloyd-max", 4, 64, True), ("lloyd-max", 2, 64, True)),
    "fp8": (("fp8", 8, 1, True), ("fp8", 8, 1, True)),
}


def aot_cases() -> list:
    """Compile cases (kvcompress_kernels.aot): the reader's launches for the shipped specs' pairs (SPEC_PAIRS) at
    head_dim 64, 128 and 256 with an fp16 query and a bias, for a decode block of 16 query rows and the largest
    block (MAX_DECODE_ROWS rows, softcap on for kivi-4), split in two, so the merge compiles too."""
    from kvcompress_kernels.aot import AOTCase

    cases = []
    for dim in (64, 128, 256):
        for rows in (16, MAX_DECODE_ROWS):
            for spec, (key, value) in SPEC_PAIRS.items():
                keys, values = blank_operand(*key, dim, 64), blank_operand(*value, dim, 64)
                query = torch.zeros(1, 1, rows, dim, dtype=torch.float16)
                bias = torch.zeros(1, 1, rows, 64)
                softcap = 30.0 if spec == "kivi-4" and rows > 16 else None
                label = f"{spec} d={dim} rows={rows}{' softcap' if softcap else ''}"
                launch = lambda a=(query, keys, values, bias, 0.125, softcap, 2): fused_decode_triton(*a)
                cases.append(AOTCase(label, launch))
    return cases


if HAS_TRITON:
    import triton
    import triton.language as tl

    from kvcompress_kernels.decode import (
        attend_widened_tile, fp8_halves, program_rows, role_rows, split_start, store_split,
        token_scale, widened,
    )

    @triton.jit
    def _decode_split_kernel(
        query_ptr, q_b, q_h, q_n,
        bias_ptr, m_b, m_h, m_n, m_t,
        k_codes, kc_b, kc_h, kc_t, k_scale, k_minimum, kp_b, kp_h, kp_t, k_levels, k_factor, k_bytes,
        v_codes, vc_b, vc_h, vc_t, v_scale, v_minimum, vp_b, vp_h, vp_t, v_levels, v_factor, v_bytes,
        parts_ptr, part_lse_ptr,
        heads, n, tokens, dk, dv, per_split, scale, softcap,
        KEY_FORMAT: tl.constexpr, KEY_BITS: tl.constexpr, KEY_GROUP: tl.constexpr, KEY_SCALE: tl.constexpr,
        VALUE_FORMAT: tl.constexpr, VALUE_BITS: tl.constexpr, VALUE_GROUP: tl.constexpr,
        VALUE_SCALE: tl.constexpr,
        BN: tl.constexpr, BT: tl.constexpr, BDK: tl.constexpr, BDV: tl.constexpr,
        HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, FP16_DOT: tl.constexpr,
    ):
        bh, split, b, h, offs_n, live_n = program_rows(heads, n, BN)
        offs_k = tl.arange(0, BDK)
        live_k = offs_k < dk
        offs_v = tl.arange(0, BDV)
        live_v = offs_v < dv
        q = tl.load(
            query_ptr + b * q_b + h * q_h + offs_n[:, None] * q_n + offs_k[None, :],
            mask=live_n[:, None] & live_k[None, :], other=0.0,
        )
        if not FP16_DOT:
            q = q.to(tl.float32)
        k_codes, k_scale, k_minimum = role_rows(k_codes, k_scale, k_minimum, b, h, kc_b, kc_h, kp_b, kp_h)
        v_codes, v_scale, v_minimum = role_rows(v_codes, v_scale, v_minimum, b, h, vc_b, vc_h, vp_b, vp_h)
        bias_rows = bias_ptr + b * m_b + h * m_h + offs_n[:, None] * m_n

        start, stop, running_max, running_sum, acc = split_start(split, per_split, tokens, BN, BDV)
        for first in range(start, stop, BT):
            offs_t = first + tl.arange(0, BT)
            live_t = offs_t < stop
            if FP16_DOT:  # exact products; the per-token factor applies to the scores
                k = fp8_halves(k_codes, kc_t, offs_t, offs_k, live_t[:, None] & live_k[None, :])
                s = tl.dot(q, tl.trans(k)) * token_scale(k_scale, kp_t, offs_t, live_t, KEY_SCALE)[None, :]
            else:
                k = widened(
                    k_codes, kc_t, k_scale, k_minimum, kp_t, k_levels, k_factor, k_bytes, offs_t, live_t, offs_k,
                    live_k, KEY_FORMAT, KEY_BITS, KEY_GROUP, KEY_SCALE,
                )
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            running_max, running_sum, acc = attend_widened_tile(
                s, running_max, running_sum, acc, scale, softcap, bias_rows, m_t, offs_t, live_n, live_t,
                v_codes, vc_t, v_scale, v_minimum, vp_t, v_levels, v_factor, v_bytes, offs_v, live_v,
                HAS_BIAS, SOFTCAP, VALUE_FORMAT, VALUE_BITS, VALUE_GROUP, VALUE_SCALE,
            )
        store_split(parts_ptr, part_lse_ptr, acc, running_max, running_sum, bh, split, n, dv, offs_n, live_n, offs_v, live_v)
