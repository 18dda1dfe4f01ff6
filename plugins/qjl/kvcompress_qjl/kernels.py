"""QJL key sketching: sign bits of a Gaussian-like projection, and attention scores read from them.

A key k of head_dim d is stored as sign(S k) for a sketch S of m rows (m bits, LSB-first: bit j of byte b is
row 8b + j) and its norm. With outliers, each group of `group` consecutive tokens of one head has its own
`outliers` channels split off: k = k_in + k_out, the inlier part sketched with all m rows, the outlier part
with the first m' rows; both norms are stored (fp16).

Scores of a query q against a stored key (scale is the estimator constant, sqrt(pi/2) for a Gaussian sketch):
    scale/m * ||k_in|| * <S q_in, sign(S k_in)> + scale/m' * ||k_out|| * <S' q_out, sign(S' k_out)>
where q_in, q_out split q on the same channels as its key. q_in is used rather than q because the inlier
sketch never saw the outlier channels: the estimate stays unbiased and loses the outlier channels' variance.

`qjl_quantize_torch` / `qjl_scores_torch` are the references, `qjl_quantize_triton` / `qjl_scores_triton` the
GPU kernels, `qjl_scores_native` the CPU kernel for decode-sized query blocks (kernels_cpu.cpp, compiled on first
use; the torch path where no compiler works); `qjl_quantize` / `qjl_scores` dispatch.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import NamedTuple

import torch

from kvcompress_kernels.dispatch import HAS_TRITON, block_size, native_library, use_triton
from kvcompress_kernels import native
from kvcompress_kernels.native import pointer, token_rows
from kvcompress_kernels.bitpack import pack_bits_torch
from kvcompress_kernels.scratch import scratch

NATIVE_SOURCE = Path(__file__).with_name("kernels_cpu.cpp")
# Queries per KV head the CPU kernel takes (decode: query heads per KV head x 1-2 tokens); larger blocks (prefill,
# chunked scoring) keep the torch path, whose matmul then has the arithmetic to pay for unpacking the signs.
NATIVE_QUERIES = 8
# Tokens scored at once by the torch path (rounded down to whole outlier groups).
SCORE_CHUNK = 2048
# Norms are stored in fp16 saturated at its largest finite value: a key longer than that would become Inf and
# every score of its row NaN (such keys are not a model's, but one must not poison a sequence).
FP16_MAX = torch.finfo(torch.float16).max


class QJLCodes(NamedTuple):
    """Packed QJL state of a block of keys [batch, heads, tokens, head_dim].

    signs: uint8 [b, h, t, m/8]; norm: fp16 [b, h, t] (norm of the inlier part, the whole key without outliers);
    outlier_signs: uint8 [b, h, t, m'/8] and outlier_norm: fp16 [b, h, t], None without outliers.
    """

    signs: torch.Tensor
    norm: torch.Tensor
    outlier_signs: torch.Tensor | None
    outlier_norm: torch.Tensor | None


def outlier_channels(keys: torch.Tensor, outliers: int, group: int) -> torch.Tensor:
    """The `outliers` channels of largest norm over each group of `group` tokens, per head.

    keys [b, h, t, d] with t % group == 0 -> uint8 [b, h, t/group, outliers], ascending channel order.
    """
    b, h, t, d = keys.shape
    if t % group:
        raise ValueError(f"outlier selection needs whole groups of {group} tokens, got {t} tokens")
    if d > 256:
        raise ValueError(f"outlier channel indices are stored as uint8, so head_dim must be <= 256, got {d}")
    energy = keys.float().reshape(b, h, t // group, group, d).square().sum(3)
    chosen = energy.topk(outliers, dim=-1).indices.sort(dim=-1).values
    return chosen.to(torch.uint8).contiguous()


def group_channel_mask(outlier_index: torch.Tensor, head_dim: int) -> torch.Tensor:
    """uint8 [b, h, G, o] channel indices -> bool [b, h, G, head_dim], True on outlier channels."""
    mask = torch.zeros(*outlier_index.shape[:-1], head_dim, dtype=torch.bool, device=outlier_index.device)
    return mask.scatter_(-1, outlier_index.long(), True)


# The +1/-1 floats of each byte value's bits, LSB first [256, 8], per device.
_SIGN_ROWS: dict[torch.device, torch.Tensor] = {}


def unpack_signs(packed: torch.Tensor, rows: int, slot: str | None = None) -> torch.Tensor:
    """uint8 [..., rows/8] sign bits -> float32 [..., rows] of +1 (bit set) / -1: one 8-float row per byte, looked
    up in a 256-row table (much cheaper on CPU than shifting out each bit). slot: write into this thread's
    reused buffer of that name (kvcompress_kernels.scratch; valid until the slot's next use) instead of a fresh
    tensor."""
    table = _SIGN_ROWS.get(packed.device)
    if table is None:
        bits = (torch.arange(256).unsqueeze(-1) >> torch.arange(8)) & 1
        table = _SIGN_ROWS[packed.device] = (bits.float() * 2 - 1).to(packed.device)
    index = packed.reshape(-1).int()
    out = None if slot is None else scratch(index.numel() * 8, packed.device, slot).view(-1, 8)
    return torch.index_select(table, 0, index, out=out).reshape(*packed.shape[:-1], rows)


def _check_quantize(keys: torch.Tensor, sketch: torch.Tensor, outlier_index: torch.Tensor | None,
                    group: int, outlier_sketch_dim: int) -> None:
    if keys.dim() != 4 or keys.shape[-1] != sketch.shape[1]:
        raise ValueError(f"keys must be [batch, heads, tokens, {sketch.shape[1]}], got {tuple(keys.shape)}")
    if sketch.shape[0] % 8:
        raise ValueError(f"sketch rows must be a multiple of 8 (packed 8 per byte), got {sketch.shape[0]}")
    if outlier_index is not None:
        if outlier_sketch_dim % 8 or not 8 <= outlier_sketch_dim <= sketch.shape[0]:
            raise ValueError(
                f"outlier_sketch_dim must be a multiple of 8 in 8..{sketch.shape[0]}, got {outlier_sketch_dim}"
            )
        if outlier_index.shape[:2] != keys.shape[:2] or outlier_index.shape[2] * group != keys.shape[2]:
            raise ValueError(
                f"outlier_index {tuple(outlier_index.shape)} does not cover keys {tuple(keys.shape)} "
                f"in groups of {group} tokens"
            )


def qjl_quantize_torch(
    keys: torch.Tensor,
    sketch: torch.Tensor,
    outlier_index: torch.Tensor | None = None,
    group: int = 1,
    outlier_sketch_dim: int = 0,
) -> QJLCodes:
    """Sketch, take signs and pack a block of keys [b, h, t, d] with sketch [m, d] (fp32)."""
    _check_quantize(keys, sketch, outlier_index, group, outlier_sketch_dim)
    x = keys.float()
    if outlier_index is None:
        return QJLCodes(pack_bits_torch(x @ sketch.T > 0, 1), _fp16_norm(x), None, None)
    mask = group_channel_mask(outlier_index, x.shape[-1]).repeat_interleave(group, dim=2)
    inlier = x.masked_fill(mask, 0.0)
    outlier = x.masked_fill(~mask, 0.0)
    return QJLCodes(
        signs=pack_bits_torch(inlier @ sketch.T > 0, 1),
        norm=_fp16_norm(inlier),
        outlier_signs=pack_bits_torch(outlier @ sketch[:outlier_sketch_dim].T > 0, 1),
        outlier_norm=_fp16_norm(outlier),
    )


def _fp16_norm(x: torch.Tensor) -> torch.Tensor:
    return x.norm(dim=-1).clamp(max=FP16_MAX).half()


def qjl_scores_torch(
    query: torch.Tensor,
    codes: QJLCodes,
    sketch: torch.Tensor,
    scale: float,
    outlier_index: torch.Tensor | None = None,
    group: int = 1,
) -> torch.Tensor:
    """Unscaled attention scores <q, k> estimated from packed keys, float32 [b, h, n, t].

    query [b, h, n, d] is grouped by KV head (n = query heads per KV head x query length), so one sketch of
    each query serves every key of its KV head: grouped-query attention costs nothing extra. Keys are read
    SCORE_CHUNK tokens at a time (whole outlier groups), which bounds the unpacked signs held at once.
    """
    q = query.float()
    b, h, n, d = q.shape
    m = sketch.shape[0]
    t = codes.signs.shape[2]
    chunk = max(group, SCORE_CHUNK - SCORE_CHUNK % group)
    sketched = q @ sketch.T  # S q, once for every chunk
    norm = codes.norm.float()
    if outlier_index is None:
        out = torch.empty(b, h, n, t, dtype=torch.float32, device=q.device)
        for start in range(0, t, chunk):
            signs = unpack_signs(codes.signs[:, :, start : start + chunk], m, "qjl signs")  # [b, h, chunk, m]
            torch.matmul(sketched, signs.transpose(-1, -2), out=out[..., start : start + chunk])
        return out.mul_(norm.unsqueeze(-2)).mul_(scale / m)
    groups = t // group
    m_out = codes.outlier_signs.shape[-1] * 8
    index = outlier_index.long()  # [b, h, G, o]
    o = index.shape[-1]
    # The query on each group's outlier channels [b, h, G, n, o] times those channels' sketch columns: S q_out
    # [b, h, G, n, m] involves only these, so S q_in = S q - S q_out costs o (not d) per row, and S' q_out is its
    # first m' rows.
    sketch_t = sketch.T.contiguous()  # [d, m]: row c is channel c's sketch column
    q_out = q.unsqueeze(2).expand(b, h, groups, n, d).gather(-1, index.unsqueeze(3).expand(b, h, groups, n, o))
    norm = norm.reshape(b, h, groups, 1, group)
    norm_out = codes.outlier_norm.float().reshape(b, h, groups, 1, group)
    out = torch.empty(b, h, groups, n, group, dtype=torch.float32, device=q.device)
    per = chunk // group
    for g in range(0, groups, per):
        tokens = slice(g * group, (g + per) * group)
        sq_out = q_out[:, :, g : g + per] @ torch.nn.functional.embedding(index[:, :, g : g + per], sketch_t)
        sq_in = (sketched.unsqueeze(2) - sq_out).mul_(scale / m)
        sq_out = sq_out[..., :m_out].mul_(scale / m_out)
        signs = unpack_signs(codes.signs[:, :, tokens], m, "qjl signs").unflatten(2, (-1, group))  # [b, h, G', group, m]
        # scale/m <S q_in, sign(S k_in)> and scale/m' <S' q_out, sign(S' k_out)>, weighted by their norms
        inner = torch.matmul(sq_in, signs.transpose(-1, -2), out=out[:, :, g : g + per])
        signs = unpack_signs(codes.outlier_signs[:, :, tokens], m_out, "qjl outlier signs").unflatten(2, (-1, group))
        inner.mul_(norm[:, :, g : g + per]).addcmul_(sq_out @ signs.transpose(-1, -2), norm_out[:, :, g : g + per])
    return out.permute(0, 1, 3, 2, 4).reshape(b, h, n, t)


class _NativeScores(ctypes.Structure):
    """The Args struct of kernels_cpu.cpp (same fields, same order)."""

    _fields_ = [(name, ctypes.c_int64) for name in ("batch", "heads", "tokens", "head_dim", "group", "m", "m_out",
                                                      "outliers")] + [
        ("query", ctypes.c_void_p), ("sketched", ctypes.c_void_p), ("sketch_t", ctypes.c_void_p),
        ("signs", ctypes.c_void_p), ("signs_b", ctypes.c_int64), ("signs_h", ctypes.c_int64), ("norm", ctypes.c_void_p),
        ("outlier_signs", ctypes.c_void_p), ("outlier_signs_b", ctypes.c_int64), ("outlier_signs_h", ctypes.c_int64),
        ("outlier_norm", ctypes.c_void_p), ("outlier_index", ctypes.c_void_p), ("index_b", ctypes.c_int64),
        ("index_h", ctypes.c_int64), ("scale_in", ctypes.c_float), ("scale_out", ctypes.c_float), ("out", ctypes.c_void_p),
    ]


def qjl_scores_native(
    query: torch.Tensor,
    codes: QJLCodes,
    sketch: torch.Tensor,
    scale: float,
    outlier_index: torch.Tensor | None = None,
    group: int = 1,
) -> torch.Tensor:
    """The CPU kernel (kernels_cpu.cpp) for query [b, h, n, d] with n <= NATIVE_QUERIES: float32 [b, h, n, t] like
    qjl_scores_torch. Raises where the kernel cannot be built (kvcompress_kernels.native says why)."""
    library = native.required(NATIVE_SOURCE)
    b, h, n, d = query.shape
    if not 1 <= n <= NATIVE_QUERIES:
        raise ValueError(f"the CPU kernel scores 1..{NATIVE_QUERIES} queries per KV head, got {n}")
    sketch = sketch.float()
    m = sketch.shape[0]
    t = codes.signs.shape[2]
    q = query.float().contiguous()
    sketched = (q @ sketch.T).contiguous()
    signs = token_rows(codes.signs)
    out = torch.empty(b, h, n, t, dtype=torch.float32, device=query.device)
    has_outliers = outlier_index is not None
    if has_outliers and t % group:
        raise ValueError(f"outlier groups need whole groups of {group} tokens, got {t} tokens")
    outlier_signs = token_rows(codes.outlier_signs) if has_outliers else None
    index = token_rows(outlier_index) if has_outliers else None
    m_out = outlier_signs.shape[-1] * 8 if has_outliers else 0
    held = [q, sketched, sketch.T.contiguous(), codes.norm.float().contiguous(),
            codes.outlier_norm.float().contiguous() if has_outliers else None]
    args = _NativeScores(
        b, h, t, d, group, m, m_out, index.shape[-1] if has_outliers else 0,
        pointer(held[0]), pointer(held[1]), pointer(held[2]),
        pointer(signs), signs.stride(0), signs.stride(1), pointer(held[3]),
        pointer(outlier_signs), outlier_signs.stride(0) if has_outliers else 0,
        outlier_signs.stride(1) if has_outliers else 0, pointer(held[4]),
        pointer(index), index.stride(0) if has_outliers else 0, index.stride(1) if has_outliers else 0,
        scale / m, scale / m_out if has_outliers else 0.0, pointer(out),
    )
    if b * h * t and library.qjl_scores_cpu(ctypes.byref(args), n):
        raise RuntimeError(f"the QJL CPU kernel refused {n} queries per KV head")
    return out


def qjl_quantize(
    keys: torch.Tensor,
    sketch: torch.Tensor,
    outlier_index: torch.Tensor | None = None,
    group: int = 1,
    outlier_sketch_dim: int = 0,
) -> QJLCodes:
    """Quantize with the Triton kernel on CUDA, the torch reference elsewhere."""
    if use_triton(keys, sketch):
        return qjl_quantize_triton(keys, sketch, outlier_index, group, outlier_sketch_dim)
    return qjl_quantize_torch(keys, sketch, outlier_index, group, outlier_sketch_dim)


def qjl_scores(
    query: torch.Tensor,
    codes: QJLCodes,
    sketch: torch.Tensor,
    scale: float,
    outlier_index: torch.Tensor | None = None,
    group: int = 1,
) -> torch.Tensor:
    """Scores with the Triton kernel on CUDA, the C++ kernel on the CPU for decode-sized query blocks where it
    builds, the torch reference elsewhere."""
    if use_triton(query, codes.signs, sketch):
        return qjl_scores_triton(query, codes, sketch, scale, outlier_index, group)
    if query.shape[2] <= NATIVE_QUERIES and native_library(NATIVE_SOURCE, query, codes.signs) is not None:
        return qjl_scores_native(query, codes, sketch, scale, outlier_index, group)
    return qjl_scores_torch(query, codes, sketch, scale, outlier_index, group)


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _store_sketch(
        x, sketch_ptr, rows, signs_ptr, norm_ptr, bh, t, offs_t, live_t, offs_d, d, BT: tl.constexpr, BR: tl.constexpr,
    ):
        """Store the packed signs of x [BT, BD] @ sketch[:rows].T (bit j of byte b = row 8b + j) and the fp16 norms
        of x's token rows. The sketch is read BR rows at a time, one dot each: what is staged stays small whatever
        the sketch size. fp32 dots: a sign must match the reference's fp32 projection, and neither operand is
        exact in fp16 (encoding is off the decode hot path)."""
        nbytes = rows // 8
        offs_r = tl.arange(0, BR)
        offs_b = tl.arange(0, BR // 8)
        weights = 1 << tl.arange(0, 8)
        out = signs_ptr + (bh * t + offs_t[:, None]) * nbytes
        for start in range(0, rows, BR):
            row = start + offs_r
            chunk_t = tl.load(
                sketch_ptr + row[None, :] * d + offs_d[:, None],
                mask=(row[None, :] < rows) & (offs_d[:, None] < d),
                other=0.0,
            )
            positive = (tl.dot(x, chunk_t, input_precision="ieee") > 0).to(tl.int32)
            packed = tl.sum(tl.reshape(positive, [BT, BR // 8, 8]) * weights[None, None, :], axis=2)
            byte = start // 8 + offs_b
            tl.store(out + byte[None, :], packed.to(tl.uint8), mask=live_t[:, None] & (byte[None, :] < nbytes))
        norm = tl.minimum(tl.sqrt(tl.sum(x * x, axis=1)), 65504.0)  # FP16_MAX: saturate, never Inf
        tl.store(norm_ptr + bh * t + offs_t, norm.to(tl.float16), mask=live_t)

    @triton.jit
    def _qjl_quantize_kernel(
        keys_ptr, outlier_index_ptr, sketch_ptr,
        signs_ptr, norm_ptr, outlier_signs_ptr, outlier_norm_ptr,
        t, d, m, m_out, groups, group, outliers,
        BT: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr, HAS_OUTLIERS: tl.constexpr,
    ):
        bh = tl.program_id(0).to(tl.int64)  # 64-bit offsets: batch x heads x tokens x head_dim passes 2**31
        offs_t = tl.program_id(1) * BT + tl.arange(0, BT)
        offs_d = tl.arange(0, BD)
        live_t = offs_t < t
        x = tl.load(
            keys_ptr + bh * t * d + offs_t[:, None] * d + offs_d[None, :],
            mask=live_t[:, None] & (offs_d[None, :] < d),
            other=0.0,
        ).to(tl.float32)
        if HAS_OUTLIERS:
            # channel mask of each token's group, from the group's outlier indices
            group_of = bh * groups + offs_t // group
            is_outlier = tl.zeros([BT, BD], dtype=tl.int1)
            for o in range(outliers):
                channel = tl.load(outlier_index_ptr + group_of * outliers + o, mask=live_t, other=0).to(tl.int32)
                is_outlier = is_outlier | (offs_d[None, :] == channel[:, None])
            x_out = tl.where(is_outlier, x, 0.0)
            x = tl.where(is_outlier, 0.0, x)
            _store_sketch(
                x_out, sketch_ptr, m_out, outlier_signs_ptr, outlier_norm_ptr, bh, t, offs_t, live_t, offs_d, d, BT, BR,
            )
        _store_sketch(x, sketch_ptr, m, signs_ptr, norm_ptr, bh, t, offs_t, live_t, offs_d, d, BT, BR)

    @triton.jit
    def _unpacked_signs(packed_ptr, row_stride, offs_t, live_t, first, rows, BR: tl.constexpr):
        """+1/-1 fp16 [BT, BR] of sketch rows first..first+BR of tokens offs_t (0 outside the live range), rows
        row_stride bytes apart: exact in fp16, so they feed tensor-core dots."""
        offs_r = first + tl.arange(0, BR)
        live = live_t[:, None] & (offs_r[None, :] < rows)
        byte = tl.load(packed_ptr + offs_t[:, None] * row_stride + offs_r[None, :] // 8, mask=live, other=0)
        bit = (byte.to(tl.int32) >> (offs_r[None, :] % 8)) & 1
        return tl.where(live, bit.to(tl.float16) * 2.0 - 1.0, 0.0).to(tl.float16)

    @triton.jit
    def _signed_sum(acc, x, signs):
        """acc + x @ signs.T on tensor cores at fp32 accuracy: x (fp32, scaled below 2**14 so fp16 cannot overflow)
        is split into fp16 hi + lo parts; products with the +1/-1 signs are exact, accumulation is fp32."""
        hi = x.to(tl.float16)
        lo = (x - hi.to(tl.float32)).to(tl.float16)
        acc = tl.dot(lo, tl.trans(signs), acc)
        return tl.dot(hi, tl.trans(signs), acc)

    @triton.jit
    def qjl_tile_scores(
        q_rows, sq_rows, row_scale, live_n, offs_t, live_t,
        signs_ptr, signs_t, norm_ptr, norm_t, channel_ptr, outliers, outlier_signs_ptr, outlier_signs_t,
        outlier_norm_ptr, outlier_norm_t, sketch_ptr,
        d, m, m_out, scale_in, scale_out,
        BN: tl.constexpr, BT: tl.constexpr, BM: tl.constexpr, BO: tl.constexpr, HAS_OUTLIERS: tl.constexpr,
    ):
        """Estimated <q, k> [BN, BT] of query rows against the keys offs_t of one (sequence, KV head), all in one
        outlier group. q_rows, sq_rows: [BN, 1] pointers at each row's query (fp32, d channels) and S q (m);
        row_scale: what S q is multiplied by to stay fp16-safe (divided out here); signs_ptr, norm_ptr, ...: that
        head's rows, *_t elements apart; channel_ptr: the group's `outliers` outlier indices (0 where the group does not
        exist)."""
        norm = tl.load(norm_ptr + offs_t * norm_t, mask=live_t, other=0.0).to(tl.float32)
        inner = tl.zeros([BN, BT], dtype=tl.float32)
        inner_out = tl.zeros([BN, BT], dtype=tl.float32)
        if HAS_OUTLIERS:
            offs_o = tl.arange(0, BO)
            live_o = offs_o < outliers
            channel = tl.load(channel_ptr + offs_o, mask=live_o, other=0).to(tl.int32)
            q_out = tl.load(q_rows + channel[None, :], mask=live_n[:, None] & live_o[None, :], other=0.0)
            q_out = q_out.to(tl.float32) * row_scale[:, None]
        # the sketch rows BM at a time: what is staged per step stays small whatever the sketch size
        for start in range(0, m, BM):
            offs_m = start + tl.arange(0, BM)
            sq = tl.load(sq_rows + offs_m[None, :], mask=live_n[:, None] & (offs_m[None, :] < m), other=0.0)
            sq = sq * row_scale[:, None]
            if HAS_OUTLIERS:
                # S q_out from the group's outlier columns only: [BN, BO] x [BO, BM]; S q_in = S q - S q_out,
                # and the outlier sketch S' is the first m' rows of S, so S' q_out is the same product
                columns = tl.load(
                    sketch_ptr + offs_m[None, :] * d + channel[:, None],
                    mask=live_o[:, None] & (offs_m[None, :] < m),
                    other=0.0,
                )
                sq_out = tl.dot(q_out, columns, input_precision="ieee")
                sq = sq - sq_out
                if start < m_out:
                    signs_out = _unpacked_signs(outlier_signs_ptr, outlier_signs_t, offs_t, live_t, start, m_out, BM)
                    inner_out = _signed_sum(inner_out, sq_out, signs_out)
            signs = _unpacked_signs(signs_ptr, signs_t, offs_t, live_t, start, m, BM)
            inner = _signed_sum(inner, sq, signs)
        scores = scale_in * inner * norm[None, :]
        if HAS_OUTLIERS:
            norm_out = tl.load(outlier_norm_ptr + offs_t * outlier_norm_t, mask=live_t, other=0.0).to(tl.float32)
            scores += scale_out * inner_out * norm_out[None, :]
        return scores / row_scale[:, None]

    @triton.jit
    def _qjl_scores_kernel(
        query_ptr, sq_ptr, row_scale_ptr, signs_ptr, norm_ptr, outlier_index_ptr, outlier_signs_ptr,
        outlier_norm_ptr, sketch_ptr, out_ptr,
        n, t, d, m, m_out, groups, group, outliers, groups_per_program, scale_in, scale_out,
        BN: tl.constexpr, BT: tl.constexpr, BM: tl.constexpr, BO: tl.constexpr, HAS_OUTLIERS: tl.constexpr,
    ):
        # 64-bit offsets: batch x heads x queries x tokens passes 2**31 at long contexts
        bh = tl.program_id(0).to(tl.int64)
        offs_n = tl.program_id(1).to(tl.int64) * BN + tl.arange(0, BN)
        live_n = offs_n < n
        row_scale = tl.load(row_scale_ptr + bh * n + offs_n, mask=live_n, other=1.0)
        q_rows = query_ptr + (bh * n + offs_n[:, None]) * d
        sq_rows = sq_ptr + (bh * n + offs_n[:, None]) * m
        first = tl.program_id(2) * groups_per_program
        for g in range(first, first + groups_per_program):
            offs_t = g * group + tl.arange(0, BT)
            live_t = (tl.arange(0, BT) < group) & (offs_t < t)  # offs_t < t also rules out g >= groups
            scores = qjl_tile_scores(
                q_rows, sq_rows, row_scale, live_n, offs_t, live_t,
                signs_ptr + bh * t * (m // 8), m // 8, norm_ptr + bh * t, 1,
                outlier_index_ptr + (bh * groups + g) * outliers, tl.where(g < groups, outliers, 0),
                outlier_signs_ptr + bh * t * (m_out // 8), m_out // 8, outlier_norm_ptr + bh * t, 1, sketch_ptr,
                d, m, m_out, scale_in, scale_out, BN, BT, BM, BO, HAS_OUTLIERS,
            )
            tl.store(
                out_ptr + (bh * n + offs_n[:, None]) * t + offs_t[None, :],
                scores,
                mask=live_n[:, None] & live_t[None, :],
            )


def sketched_query(query: torch.Tensor, sketch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What the score kernels read of a query [..., d]: (the query, S q [..., m], row scale [...]), float32 and
    contiguous; S q is one matmul. The row scale is a power of two bringing |q| max|s| (which bounds S q, S q_in
    and S q_out of a row) below 2**14, where fp16 parts stay finite: exact, and divided out by the kernels."""
    q = query.float().contiguous()
    sketch = sketch.float()
    bound = q.norm(dim=-1) * sketch.norm(dim=-1).max()
    row_scale = torch.ldexp(torch.ones_like(bound), (14 - torch.frexp(bound).exponent).clamp(-126, 126))
    return q, q @ sketch.T, row_scale


def qjl_quantize_triton(
    keys: torch.Tensor,
    sketch: torch.Tensor,
    outlier_index: torch.Tensor | None = None,
    group: int = 1,
    outlier_sketch_dim: int = 0,
    block_tokens: int = 16,
    block_rows: int = 32,
) -> QJLCodes:
    """Triton version of qjl_quantize_torch (same packed bits; norms equal to fp16 rounding)."""
    _check_quantize(keys, sketch, outlier_index, group, outlier_sketch_dim)
    b, h, t, d = keys.shape
    m = sketch.shape[0]
    has_outliers = outlier_index is not None
    m_out = outlier_sketch_dim if has_outliers else 8
    device = keys.device
    signs = torch.empty(b, h, t, m // 8, dtype=torch.uint8, device=device)
    norm = torch.empty(b, h, t, dtype=torch.float16, device=device)
    if has_outliers:
        index = outlier_index.contiguous()
        outlier_signs = torch.empty(b, h, t, m_out // 8, dtype=torch.uint8, device=device)
        outlier_norm = torch.empty(b, h, t, dtype=torch.float16, device=device)
    else:  # the kernel never touches these without outliers
        index, outlier_signs, outlier_norm = signs, signs, norm
    if b * h * t:
        _qjl_quantize_kernel[(b * h, triton.cdiv(t, block_tokens))](
            keys.contiguous(), index, sketch.float().contiguous(),
            signs, norm, outlier_signs, outlier_norm,
            t, d, m, m_out, outlier_index.shape[2] if has_outliers else 1, group,
            outlier_index.shape[3] if has_outliers else 0,
            BT=block_tokens, BD=block_size(d), BR=block_rows, HAS_OUTLIERS=has_outliers,
        )
    if not has_outliers:
        return QJLCodes(signs, norm, None, None)
    return QJLCodes(signs, norm, outlier_signs, outlier_norm)


def qjl_scores_triton(
    query: torch.Tensor,
    codes: QJLCodes,
    sketch: torch.Tensor,
    scale: float,
    outlier_index: torch.Tensor | None = None,
    group: int = 1,
    block_queries: int = 16,
    chunk: int = 32,
    groups_per_program: int = 4,
    block_rows: int = 64,
) -> torch.Tensor:
    """Triton version of qjl_scores_torch: float32 [b, h, n, t].

    S q is one matmul here, as in the reference; each program scores `groups_per_program` token groups (a group
    is the outlier group; without outliers, `chunk` tokens) for a block of queries, `block_rows` sketch rows at a
    time.
    """
    b, h, n, d = query.shape
    sketch = sketch.float().contiguous()
    m = sketch.shape[0]
    t = codes.signs.shape[2]
    has_outliers = outlier_index is not None
    tokens = group if has_outliers else chunk
    groups = triton.cdiv(t, tokens)
    m_out = codes.outlier_signs.shape[-1] * 8 if has_outliers else 8
    outliers = outlier_index.shape[3] if has_outliers else 0
    out = torch.empty(b, h, n, t, dtype=torch.float32, device=query.device)
    if b * h * n * t:
        q, sq, row_scale = sketched_query(query, sketch)
        blank = codes.signs
        grid = (b * h, triton.cdiv(n, block_queries), triton.cdiv(groups, groups_per_program))
        _qjl_scores_kernel[grid](
            q, sq, row_scale, codes.signs.contiguous(), codes.norm.contiguous(),
            outlier_index.contiguous() if has_outliers else blank,
            codes.outlier_signs.contiguous() if has_outliers else blank,
            codes.outlier_norm.contiguous() if has_outliers else codes.norm,
            sketch, out,
            n, t, d, m, m_out, groups, tokens, outliers, groups_per_program,
            scale / m, scale / m_out,
            BN=block_queries, BT=block_size(tokens), BM=block_rows, BO=block_size(outliers), HAS_OUTLIERS=has_outliers,
        )
    return out


def aot_cases() -> list:
    """Compile cases (kvcompress_kernels.aot): both kernels for fp16 keys at head_dim 64, 128 and 256 with the
    shipped specs' sketches: qjl (2 x head_dim rows, 8 outliers sketched by as many), its layers 0-1 (256 rows,
    64 for the outliers) and qjl-lite (2 x head_dim rows, 4 outliers sketched by 64)."""
    from kvcompress_kernels.aot import AOTCase

    cases = []
    for d in (64, 128, 256):
        for m, outliers, m_out in ((2 * d, 8, 2 * d), (256, 8, 64), (2 * d, 4, 64)):
            keys = torch.zeros(1, 1, 32, d, dtype=torch.float16)
            sketch = torch.zeros(m, d)
            index = torch.zeros(1, 1, 1, outliers, dtype=torch.uint8)
            codes = qjl_quantize_torch(keys, sketch, index, 32, m_out)
            query = torch.zeros(1, 1, 4, d, dtype=torch.float16)
            label = f"d={d} m={m} outliers={outliers} m'={m_out}"
            cases.append(AOTCase(f"quantize {label}", lambda a=(keys, sketch, index, 32, m_out): qjl_quantize_triton(*a)))
            cases.append(AOTCase(f"scores {label}", lambda a=(query, codes, sketch, 1.0, index, 32): qjl_scores_triton(*a)))
    return cases
