"""Fused decode attention over RVQ keys and values through lookup tables (flash-decoding) in Triton.

The kernel reads a layer's packed codes and per-token scales where the TokenStores hold them (strided views, no
copy) and returns the packed middle's partial attention with its log-sum-exp, as a kvcompress.runtime.Reader does.
Its torch reference is the estimator path (the rvq-lut estimator's scores and mix), which the reader
(kvcompress_rvq.reader) takes off CUDA; tests hold the two equal.

Two launches:
  _rvq_decode_split_kernel, grid (batch x kv_heads, splits, query-row blocks): each program takes one KV head's
      tokens [split * per_split, (split + 1) * per_split) and a block of up to 32 of its query rows (rows run over
      (query head, token) of that KV head, so grouped-query heads share each read of the codes). The launcher
      builds each query row's lookup tables once (RVQQuantizer.tables: table[m, c] = <query part of code slot m,
      codeword c>); per tile of tokens a key's score is its scale times the sum over its code slots of
      table[m, code_m], gathered from the tables (no key is reconstructed). Values are rebuilt in registers, one
      code slot per channel and level: scale x the sum over levels of codebook[level, code, channel's position
      in its group], then mixed by tl.dot with the softmax weights (kvcompress_kernels.decode.softmax_step, the
      running softmax of every fused reader).
  kvcompress_kernels.decode.merge_splits: the exact log-sum-exp merge of the splits, skipped when there is one.
"""

from __future__ import annotations

import torch

from kvcompress_kernels.decode import (
    MAX_DECODE_ROWS, NUM_STAGES, bias_layout, merge_splits, plan_splits, split_buffers,
)
from kvcompress_kernels.dispatch import HAS_TRITON, block_size
from kvcompress_rvq.quantizer import Grouping

# Query rows one program scores at most (the score tile, the value tile and its codes, the output stay in registers).
MAX_BLOCK_ROWS = 32


def _launch_shape(rows: int, dim: int) -> tuple[int, int, int]:
    """(query rows, tokens per tile, warps) of a program for `rows` query rows of (padded) head_dim `dim`: from
    the AOT compile's registers (aot_cases)."""
    block_rows = min(MAX_BLOCK_ROWS, block_size(rows))
    return block_rows, 32 if dim <= 128 else 16, 4 if block_rows * dim <= 2048 else 8


def fused_rvq_decode_triton(
    tables: torch.Tensor, keys: dict[str, torch.Tensor], key_bits: int, values: dict[str, torch.Tensor],
    value_bits: int, codebooks: torch.Tensor, grouping: Grouping, bias: torch.Tensor | None, scale: float,
    softcap: float | None, splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of queries through their lookup tables [b, h, n, M, C] (RVQQuantizer.tables of the keys) over RVQ
    keys and values (state tensors: codes uint8 [b, h, t, bytes], scale fp16 [b, h, t]) whose values are coded by
    `codebooks` [depth, C, group] float32 in `grouping`: (output [b, h, n, head_dim] float32, log-sum-exp [b, h, n]
    float32), the Reader contract.

    bias: additive float32, broadcastable to [b, h, n, t]; splits: how many programs share a head's tokens
    (None: enough to fill the GPU)."""
    batch, heads, n, codes_per_key, size = tables.shape
    key_codes, value_codes = keys["codes"], values["codes"]
    tokens = key_codes.shape[2]
    depth = codebooks.shape[0]
    dim = grouping.head_dim
    if key_codes.shape[:2] != (batch, heads) or value_codes.shape[:3] != key_codes.shape[:3]:
        raise ValueError(
            f"fused rvq decode: keys {tuple(key_codes.shape[:3])} and values {tuple(value_codes.shape[:3])} must "
            f"cover the same [batch, kv_heads, tokens] as the tables' [{batch}, {heads}]"
        )
    if key_codes.stride(-1) != 1 or value_codes.stride(-1) != 1:
        raise ValueError("fused rvq decode: packed codes must be contiguous along their last dim (TokenStore views are)")
    device = tables.device
    block_rows, block_tokens, warps = _launch_shape(n, block_size(dim))
    row_blocks = -(-n // block_rows)
    splits, per_split = plan_splits(tokens, block_tokens, batch * heads * row_blocks, device, splits)
    parts, part_lse = split_buffers(batch, heads, splits, n, dim, device)
    bias, bias_strides = bias_layout(bias, (batch, heads, n, tokens))
    key_scale, value_scale = keys["scale"], values["scale"]
    _rvq_decode_split_kernel[(batch * heads, splits, row_blocks)](
        tables.float().contiguous(),
        bias if bias is not None else part_lse, *bias_strides,
        key_codes, *key_codes.stride()[:3], key_scale, *key_scale.stride(), key_codes.shape[3],
        value_codes, *value_codes.stride()[:3], value_scale, *value_scale.stride(), value_codes.shape[3],
        codebooks.float().contiguous(),
        parts, part_lse,
        heads, n, tokens, codes_per_key, size, depth, grouping.groups, dim, per_split, scale, softcap or 1.0,
        KEY_BITS=key_bits, VALUE_BITS=value_bits, VALUE_GROUP=grouping.group, STRIDED=grouping.layout == "strided",
        BN=block_rows, BT=block_tokens, BDV=block_size(dim), HAS_BIAS=bias is not None, SOFTCAP=softcap is not None,
        num_warps=warps, num_stages=NUM_STAGES,
    )
    return merge_splits(parts, part_lse, (batch, heads, n, dim))


def aot_cases() -> list:
    """Compile cases (kvcompress_kernels.aot): the reader's launches for rvq (11 levels) and rvq-lite (6 levels)
    at head_dim 64, 128 and 256 (256 codewords of 32 channels: 8-bit codes, strided keys and contiguous values),
    with a bias, for a decode block of 16 query rows and the largest block (MAX_DECODE_ROWS, softcap on), split in
    two, so the merge compiles too."""
    from kvcompress_kernels.aot import AOTCase

    cases = []
    for d in (64, 128, 256):
        for depth in (11, 6):
            m = d // 32 * depth
            state = {"codes": torch.zeros(1, 1, 64, m, dtype=torch.uint8), "scale": torch.zeros(1, 1, 64, dtype=torch.float16)}
            codebooks = torch.zeros(depth, 256, 32)
            for rows in (16, MAX_DECODE_ROWS):
                tables = torch.zeros(1, 1, rows, m, 256)
                softcap = 30.0 if rows > 16 else None
                args = (tables, state, 8, state, 8, codebooks, Grouping(d, 32, "contiguous"), torch.zeros(1, 1, rows, 64),
                        0.125, softcap, 2)
                label = f"d={d} depth={depth} rows={rows}{' softcap' if softcap else ''}"
                cases.append(AOTCase(label, lambda a=args: fused_rvq_decode_triton(*a)))
    return cases


if HAS_TRITON:
    import triton
    import triton.language as tl

    from kvcompress_kernels.bitpack import unpack_codes
    from kvcompress_kernels.decode import program_rows, softmax_step, split_start, store_split

    @triton.jit
    def _rvq_decode_split_kernel(
        tables_ptr,
        bias_ptr, m_b, m_h, m_n, m_t,
        k_codes, kc_b, kc_h, kc_t, k_scale, ks_b, ks_h, ks_t, k_bytes,
        v_codes, vc_b, vc_h, vc_t, v_scale, vs_b, vs_h, vs_t, v_bytes, codebooks_ptr,
        parts_ptr, part_lse_ptr,
        heads, n, tokens, codes_per_key, size, depth, groups, dv, per_split, scale, softcap,
        KEY_BITS: tl.constexpr, VALUE_BITS: tl.constexpr, VALUE_GROUP: tl.constexpr, STRIDED: tl.constexpr,
        BN: tl.constexpr, BT: tl.constexpr, BDV: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
    ):
        bh, split, b, h, offs_n, live_n = program_rows(heads, n, BN)
        # the launcher's tables are contiguous [b * h, n, codes_per_key, size]
        table_rows = tables_ptr + (bh.to(tl.int64) * n + offs_n[:, None]) * codes_per_key * size
        k_codes += b * kc_b + h * kc_h
        k_scale += b * ks_b + h * ks_h
        v_codes += b * vc_b + h * vc_h
        v_scale += b * vs_b + h * vs_h
        bias_rows = bias_ptr + b * m_b + h * m_h + offs_n[:, None] * m_n
        offs_v = tl.arange(0, BDV)
        live_v = offs_v < dv
        # a value channel's group and its position in the group (kvcompress_rvq.quantizer.Grouping)
        if STRIDED:
            group_of, position = offs_v % groups, offs_v // groups
        else:
            group_of, position = offs_v // VALUE_GROUP, offs_v % VALUE_GROUP

        start, stop, running_max, running_sum, acc = split_start(split, per_split, tokens, BN, BDV)
        for first in range(start, stop, BT):
            offs_t = first + tl.arange(0, BT)
            live_t = offs_t < stop
            live_nt = live_n[:, None] & live_t[None, :]
            key_rows = k_codes + offs_t * kc_t
            s = tl.zeros([BN, BT], tl.float32)
            for slot in range(codes_per_key):
                code = unpack_codes(key_rows, tl.zeros_like(offs_t) + slot, k_bytes, live_t, KEY_BITS)
                s += tl.load(table_rows + slot * size + code[None, :], mask=live_nt, other=0.0)
            s = s * tl.load(k_scale + offs_t * ks_t, mask=live_t, other=0.0).to(tl.float32)[None, :]
            p, alpha, running_max, running_sum = softmax_step(
                s, running_max, running_sum, scale, softcap, bias_rows, m_t, offs_t, live_n, live_t, HAS_BIAS, SOFTCAP,
            )
            live = live_t[:, None] & live_v[None, :]
            value_rows = v_codes + offs_t[:, None] * vc_t
            v = tl.zeros([BT, BDV], tl.float32)
            for level in range(depth):
                code = unpack_codes(value_rows, (group_of * depth + level)[None, :], v_bytes, live, VALUE_BITS)
                v += tl.load(codebooks_ptr + (level * size + code) * VALUE_GROUP + position[None, :], mask=live, other=0.0)
            v = v * tl.load(v_scale + offs_t * vs_t, mask=live_t, other=0.0).to(tl.float32)[:, None]
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        store_split(parts_ptr, part_lse_ptr, acc, running_max, running_sum, bh, split, n, dv, offs_n, live_n, offs_v, live_v)
