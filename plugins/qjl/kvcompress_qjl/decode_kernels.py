"""Fused decode attention over QJL keys and scalar-quantized values (flash-decoding) in Triton.

The kernel reads a layer's packed keys (sign bits, norms, outlier indices, signs and norms) and values (min/max,
Lloyd-Max or fp8 codes with their parameters) where the TokenStores hold them (strided views, no copy) and
returns the packed middle's partial attention with its log-sum-exp, as a kvcompress.runtime.Reader does. Its
torch reference is the estimator path (the `qjl` estimator's scores, the values' estimator mix), which the reader
(kvcompress_qjl.reader) takes off CUDA; tests hold the two equal.

Two launches:
  _qjl_decode_split_kernel, grid (batch x kv_heads, splits, query-row blocks): each program takes one KV head's
      tokens [split * per_split, (split + 1) * per_split), per_split a whole number of outlier groups, and a block
      of up to 32 of its query rows (rows run over (query head, token) of that KV head, so grouped-query heads
      share each read of a packed block). Group by group of tokens it scores the keys with the QJL estimator
      (kvcompress_qjl.kernels.qjl_tile_scores, the scores kernel's math: S q is computed once by the launcher,
      S q_out from the group's outlier columns, sign dots on tensor cores at fp32 accuracy), then scale, softcap,
      the reader's bias (which also hides each head's padding rows) and the running softmax, and mixes the
      values widened in registers (kvcompress_kernels.decode.widened, the scalar kernels' own widening).
  kvcompress_kernels.decode.merge_splits: the exact log-sum-exp merge of the splits, skipped when there is one.

Why the value side comes from kvcompress_kernels: a plugin may not import another, and the values are the scalar
plugin's. The scalar quantizers describe their state (kernel_operand -> kvcompress_kernels.decode.Operand) and
kvcompress_kernels.decode widens it, so this kernel reads them knowing only the shared module.
"""

from __future__ import annotations

import torch

from kvcompress_kernels.decode import (
    MAX_DECODE_ROWS, NUM_STAGES, Operand, bias_layout, blank_operand, merge_splits, plan_splits, role_args, role_constexprs,
    split_buffers,
)
from kvcompress_kernels.dispatch import HAS_TRITON, block_size
from kvcompress_qjl.kernels import QJLCodes, qjl_quantize_torch, sketched_query

# Query rows one program scores at most: S q rows, the score tile and the output stay in float32 registers.
MAX_BLOCK_ROWS = 32
# Tokens per tile without outliers (with outliers, a tile is an outlier group); sketch rows per step.
TILE_TOKENS, SKETCH_ROWS = 32, 64


def _warps(block_rows: int, dv: int) -> int:
    """Warps per program of `block_rows` query rows at (padded) value head_dim dv: from the AOT compile's registers
    (aot_cases): at 4 warps 32 rows take all 255 registers, 16 rows at head_dim 256 nearly so."""
    return 4 if block_rows <= 16 and dv <= 128 else 8


def fused_qjl_decode_triton(
    query: torch.Tensor, codes: QJLCodes, outlier_index: torch.Tensor | None, sketch: torch.Tensor, qjl_scale: float,
    group: int, values: Operand, bias: torch.Tensor | None, scale: float, softcap: float | None,
    splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of query [b, h, n, d] (grouped by KV head) over QJL keys (codes, outlier_index [b, h, t/group, o]
    or None, sketch [m, d], estimator constant qjl_scale, tokens per outlier group) and packed scalar values:
    (output [b, h, n, values.dim] float32, log-sum-exp [b, h, n] float32), the Reader contract.

    bias: additive float32, broadcastable to [b, h, n, t]; splits: how many programs share a head's tokens
    (None: enough to fill the GPU)."""
    batch, heads, n, d = query.shape
    tokens = codes.signs.shape[2]
    if d != sketch.shape[1] or codes.signs.shape[:2] != (batch, heads) or values.codes.shape[:3] != codes.signs.shape[:3]:
        raise ValueError(
            f"fused qjl decode: the query [{batch}, {heads}, {n}, {d}], sketch {tuple(sketch.shape)}, keys "
            f"{tuple(codes.signs.shape[:3])} and values {tuple(values.codes.shape[:3])} must agree on batch, KV heads, "
            "tokens and head_dim"
        )
    has_outliers = outlier_index is not None
    tile = group if has_outliers else TILE_TOKENS
    m = sketch.shape[0]
    m_out = codes.outlier_signs.shape[-1] * 8 if has_outliers else 8
    device = query.device
    block_rows = min(MAX_BLOCK_ROWS, block_size(n))
    row_blocks = -(-n // block_rows)
    splits, per_split = plan_splits(tokens, tile, batch * heads * row_blocks, device, splits)
    parts, part_lse = split_buffers(batch, heads, splits, n, values.dim, device)
    bias, bias_strides = bias_layout(bias, (batch, heads, n, tokens))
    q, sq, row_scale = sketched_query(query, sketch)
    # without outliers the kernel never reads these: any tensors of the pointer types
    index = outlier_index if has_outliers else codes.signs
    outlier_signs = codes.outlier_signs if has_outliers else codes.signs
    outlier_norm = codes.outlier_norm if has_outliers else codes.norm
    if codes.signs.stride(-1) != 1 or outlier_signs.stride(-1) != 1 or index.stride(-1) != 1:
        raise ValueError("fused qjl decode: packed tensors must be contiguous along their last dim (TokenStore views are)")
    _qjl_decode_split_kernel[(batch * heads, splits, row_blocks)](
        q, sq, row_scale,
        bias if bias is not None else part_lse, *bias_strides,
        codes.signs, *codes.signs.stride()[:3], codes.norm, *codes.norm.stride(),
        index, *index.stride()[:3], outlier_signs, *outlier_signs.stride()[:3], outlier_norm, *outlier_norm.stride(),
        sketch.float().contiguous(),
        *role_args(values),
        parts, part_lse,
        heads, n, tokens, d, m, m_out, tile, outlier_index.shape[3] if has_outliers else 0, values.dim, per_split,
        qjl_scale / m, qjl_scale / m_out, scale, softcap or 1.0,
        **role_constexprs("VALUE", values.key),
        BN=block_rows, BT=block_size(tile), BM=SKETCH_ROWS,
        BO=block_size(outlier_index.shape[3]) if has_outliers else 16, BDV=block_size(values.dim),
        HAS_OUTLIERS=has_outliers, HAS_BIAS=bias is not None, SOFTCAP=softcap is not None,
        num_warps=_warps(block_rows, block_size(values.dim)), num_stages=NUM_STAGES,
    )
    return merge_splits(parts, part_lse, (batch, heads, n, values.dim))


# The value side of the shipped QJL specs (qjl, qjl-lite: KIVI 2-bit per token in groups of 32), as Operand.key;
# the tests hold it equal to specs/*.yaml.
SPEC_VALUES = ("minmax-token", 2, 32, True)


def aot_cases() -> list:
    """Compile cases (kvcompress_kernels.aot): the reader's launches at head_dim 64, 128 and 256 with the shipped
    specs' key sketches (qjl: 2 x head_dim rows, 8 outliers sketched by as many; its layers 0-1: 256 rows, 64 for
    the outliers; qjl-lite: 2 x head_dim rows, 4 outliers sketched by 64) and values (SPEC_VALUES), an fp16 query
    and a bias, for a decode block of 16 query rows and the largest block (MAX_DECODE_ROWS, softcap on), split in
    two, so the merge compiles too."""
    from kvcompress_kernels.aot import AOTCase

    cases = []
    for d in (64, 128, 256):
        values = blank_operand(*SPEC_VALUES, d, 64)
        for m, outliers, m_out in ((2 * d, 8, 2 * d), (256, 8, 64), (2 * d, 4, 64)):
            sketch = torch.zeros(m, d)
            index = torch.zeros(1, 1, 2, outliers, dtype=torch.uint8)
            codes = qjl_quantize_torch(torch.zeros(1, 1, 64, d), sketch, index, 32, m_out)
            for rows in (16, MAX_DECODE_ROWS):
                query = torch.zeros(1, 1, rows, d, dtype=torch.float16)
                bias = torch.zeros(1, 1, rows, 64)
                softcap = 30.0 if rows > 16 else None
                label = f"d={d} m={m} outliers={outliers} m'={m_out} rows={rows}{' softcap' if softcap else ''}"
                launch = lambda a=(query, codes, index, sketch, 1.0, 32, values, bias, 0.125, softcap, 2): (
                    fused_qjl_decode_triton(*a)
                )
                cases.append(AOTCase(label, launch))
    return cases


if HAS_TRITON:
    import triton
    import triton.language as tl

    from kvcompress_kernels.decode import (
        attend_widened_tile, program_rows, role_rows, split_start, store_split,
    )
    from kvcompress_qjl.kernels import qjl_tile_scores

    @triton.jit
    def _qjl_decode_split_kernel(
        query_ptr, sq_ptr, row_scale_ptr,
        bias_ptr, m_b, m_h, m_n, m_t,
        signs_ptr, s_b, s_h, s_t, norm_ptr, nm_b, nm_h, nm_t, index_ptr, i_b, i_h, i_g,
        outlier_signs_ptr, os_b, os_h, os_t, outlier_norm_ptr, on_b, on_h, on_t, sketch_ptr,
        v_codes, vc_b, vc_h, vc_t, v_scale, v_minimum, vp_b, vp_h, vp_t, v_levels, v_factor, v_bytes,
        parts_ptr, part_lse_ptr,
        heads, n, tokens, d, m, m_out, group, outliers, dv, per_split, scale_in, scale_out, scale, softcap,
        VALUE_FORMAT: tl.constexpr, VALUE_BITS: tl.constexpr, VALUE_GROUP: tl.constexpr, VALUE_SCALE: tl.constexpr,
        BN: tl.constexpr, BT: tl.constexpr, BM: tl.constexpr, BO: tl.constexpr, BDV: tl.constexpr,
        HAS_OUTLIERS: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
    ):
        bh, split, b, h, offs_n, live_n = program_rows(heads, n, BN)
        row = bh.to(tl.int64) * n + offs_n  # the launcher's query, S q and row scale are contiguous [b*h, n, ...]
        row_scale = tl.load(row_scale_ptr + row, mask=live_n, other=1.0)
        q_rows = query_ptr + row[:, None] * d
        sq_rows = sq_ptr + row[:, None] * m
        signs_ptr += b * s_b + h * s_h
        norm_ptr += b * nm_b + h * nm_h
        index_ptr += b * i_b + h * i_h
        outlier_signs_ptr += b * os_b + h * os_h
        outlier_norm_ptr += b * on_b + h * on_h
        v_codes, v_scale, v_minimum = role_rows(v_codes, v_scale, v_minimum, b, h, vc_b, vc_h, vp_b, vp_h)
        bias_rows = bias_ptr + b * m_b + h * m_h + offs_n[:, None] * m_n
        offs_v = tl.arange(0, BDV)
        live_v = offs_v < dv

        start, stop, running_max, running_sum, acc = split_start(split, per_split, tokens, BN, BDV)
        for first in range(start, stop, group):  # split starts are whole groups, so a tile is one outlier group
            offs_t = first + tl.arange(0, BT)
            live_t = (tl.arange(0, BT) < group) & (offs_t < stop)
            s = qjl_tile_scores(
                q_rows, sq_rows, row_scale, live_n, offs_t, live_t,
                signs_ptr, s_t, norm_ptr, nm_t, index_ptr + (first // group) * i_g, outliers,
                outlier_signs_ptr, os_t, outlier_norm_ptr, on_t, sketch_ptr,
                d, m, m_out, scale_in, scale_out, BN, BT, BM, BO, HAS_OUTLIERS,
            )
            running_max, running_sum, acc = attend_widened_tile(
                s, running_max, running_sum, acc, scale, softcap, bias_rows, m_t, offs_t, live_n, live_t,
                v_codes, vc_t, v_scale, v_minimum, vp_t, v_levels, v_factor, v_bytes, offs_v, live_v,
                HAS_BIAS, SOFTCAP, VALUE_FORMAT, VALUE_BITS, VALUE_GROUP, VALUE_SCALE,
            )
        store_split(parts_ptr, part_lse_ptr, acc, running_max, running_sum, bh, split, n, dv, offs_n, live_n, offs_v, live_v)
