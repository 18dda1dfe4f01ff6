"""Flash-decoding pieces the fused decode readers share (kvcompress_scalar's and kvcompress_qjl's).

A fused reader computes a packed middle's partial attention with its log-sum-exp in two launches: its own split
kernel, in which each program owns a contiguous range of one KV head's tokens (a split) and a block of query rows,
keeping a running max, sum and weighted value sum; then `merge_splits`, the exact log-sum-exp merge of the splits
(kvcompress_kernels.partial.merge_partials' math). This module holds what does not depend on how keys are scored:

- `Operand`: a scalar-quantized role (min/max, Lloyd-Max, fp8) as the kernels read it. A quantizer describes its
  packed state by a `kernel_operand(state)` method (`operand` asks for it), so a plugin reading another plugin's
  values needs only this module, never that plugin;
- `widened` (@triton.jit): such a role's float32 tile of tokens, in registers;
- `program_rows` / `role_rows` / `split_start` / `softmax_step` (`attend_widened_tile`: with an Operand's values
  mixed in) / `store_split` (@triton.jit): a split program's
  place, its rows of an Operand, the running softmax and its update by a tile of scores and widened values
  (scale, softcap, bias, value mix), the split's normalized output;
- the launchers' bookkeeping: split planning, the buffers, the bias layout, the merge.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from kvcompress_kernels.dispatch import HAS_TRITON, block_size

# No software pipelining of the token loops: it holds a second tile set in registers (spills at 4-8 warps),
# and the many split programs already hide memory latency.
NUM_STAGES = 1
# The merge reads each split's rows once: small blocks of rows keep it to few registers.
MERGE_ROWS, MERGE_WARPS = 16, 4
# Query rows per KV head up to which the fused readers take their kernels: 16 decode tokens of 8 query heads per KV
# head. Longer query blocks (prefill) keep the estimator path, which is matmul-bound rather than bandwidth-bound.
MAX_DECODE_ROWS = 128


@dataclass(frozen=True)
class Operand:
    """One scalar-quantized role's packed state as the kernels read it (`widened`).

    format: "minmax-channel" (minimum[t // group, c] + code * scale[t // group, c]: KIVI keys), "minmax-token"
    (minimum[t, c // group] + code * scale[t, c // group]: KIVI values), "lloyd-max" (levels[code] *
    norm[t, c // group] * factor) or "fp8" (an e4m3 byte, times the per-token scale when has_scale).
    codes: uint8 [b, h, t, bytes] (fp8 bytes viewed as uint8); scale: fp16 per-group scale (min/max), group norm
    (Lloyd-Max) or per-token scale (fp8); minimum: fp16 (min/max only); levels: float32 [2**bits] (Lloyd-Max
    only); factor: what scale is multiplied by (1 / sqrt(group) for Lloyd-Max). Unused tensors are empty ones of
    the kernel's pointer dtype.
    """

    format: str
    bits: int
    group: int
    dim: int
    codes: torch.Tensor
    scale: torch.Tensor
    minimum: torch.Tensor
    levels: torch.Tensor
    factor: float = 1.0
    has_scale: bool = True

    @property
    def key(self) -> tuple[str, int, int, bool]:
        """(format, bits, group, has_scale): what the kernels specialize on."""
        return self.format, self.bits, self.group, self.has_scale


def operand(quantizer: object, state) -> Operand:
    """How the kernels read `state` (a PackedState), written by `quantizer`, which must describe it
    (`kernel_operand`: the scalar plugin's min/max, Lloyd-Max and fp8 quantizers do)."""
    describe = getattr(quantizer, "kernel_operand", None)
    if describe is None:
        raise TypeError(
            f"the fused decode kernels read min/max, Lloyd-Max and fp8 state, got {type(quantizer).__name__}'s: "
            "read it through its estimator"
        )
    return describe(state)


def blank_operand(format: str, bits: int, group: int, has_scale: bool, dim: int, tokens: int) -> Operand:
    """An operand of zeros in one format on the CPU: the example launches of the kernels' compile cases."""
    per_token = format in ("minmax-token", "lloyd-max")
    codes = torch.zeros(1, 1, tokens, -(-dim * bits // 8), dtype=torch.uint8)
    if format == "fp8":
        params = (1, 1, tokens) if has_scale else (0,)
    else:
        params = (1, 1, tokens, dim // group) if per_token else (1, 1, -(-tokens // group), dim)
    scale = torch.zeros(params, dtype=torch.float16)
    minimum = scale if format.startswith("minmax") else torch.empty(0, dtype=torch.float16)
    levels = torch.zeros(1 << bits if format == "lloyd-max" else 0)
    return Operand(format, bits, group, dim, codes, scale, minimum, levels, 1.0, has_scale)


def role_args(role: Operand) -> tuple:
    """A kernel's runtime arguments for one role: codes and their strides, parameters and their strides, levels,
    factor, bytes per packed row."""
    codes, scale = role.codes, role.scale
    if codes.stride(-1) != 1 or (scale.numel() and scale.dim() == 4 and scale.stride(-1) != 1):
        raise ValueError("fused decode: packed tensors must be contiguous along their last dim (TokenStore views are)")
    if role.minimum.numel() and role.minimum.stride() != scale.stride():
        raise ValueError("fused decode: min/max scale and minimum must share one layout (TokenStore buffers do)")
    scale_strides = scale.stride()[:3] if scale.numel() else (0, 0, 0)
    return (
        codes, *codes.stride()[:3], scale, role.minimum, *scale_strides, role.levels, role.factor, codes.shape[3]
    )


def role_constexprs(prefix: str, role: tuple[str, int, int, bool]) -> dict:
    """A kernel's constexprs for one role (Operand.key): format, bits, group, whether a per-token fp8 scale is
    stored."""
    return dict(zip((f"{prefix}_FORMAT", f"{prefix}_BITS", f"{prefix}_GROUP", f"{prefix}_SCALE"), role))


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def plan_splits(tokens: int, block: int, programs: int, device: torch.device, splits: int | None) -> tuple[int, int]:
    """(splits, tokens per split, a multiple of `block`) for `programs` programs per split: `splits` if given, else
    about two programs per multiprocessor on a GPU and 4 elsewhere (the interpreter), which is few enough to stay
    quick and still exercises the merge."""
    tiles = -(-tokens // block)
    if splits is None:
        target = 2 * _multiprocessors(device) if device.type == "cuda" else 4
        splits = max(1, -(-target // programs))
    per_split = -(-tiles // min(tiles, splits)) * block
    return -(-tokens // per_split), per_split


def split_buffers(batch: int, heads: int, splits: int, n: int, dv: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Where a split kernel writes (store_split): normalized outputs [b * h, splits, n, dv] and log-sum-exps
    [b * h, splits, n], float32."""
    parts = torch.empty(batch * heads, splits, n, dv, dtype=torch.float32, device=device)
    return parts, torch.empty(batch * heads, splits, n, dtype=torch.float32, device=device)


def bias_layout(bias: torch.Tensor | None, shape: tuple[int, int, int, int]) -> tuple[torch.Tensor | None, tuple]:
    """The reader's additive bias (broadcastable to [b, h, n, t]) as a float32 view of that shape, and its strides
    ((0, 0, 0, 0) without one)."""
    if bias is None:
        return None, (0, 0, 0, 0)
    bias = bias.float()
    bias = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape)).expand(shape)
    return bias, bias.stride()


def merge_splits(parts: torch.Tensor, part_lse: torch.Tensor, shape: tuple[int, int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The splits' normalized outputs parts [b * h, splits, n, dv] and log-sum-exps [b * h, splits, n] merged
    exactly: (output [b, h, n, dv], lse [b, h, n]) float32, as `shape` = (b, h, n, dv) gives them."""
    batch, heads, n, dv = shape
    splits = parts.shape[1]
    if splits == 1:
        return parts.view(shape), part_lse.view(batch, heads, n)
    out = torch.empty(shape, dtype=torch.float32, device=parts.device)
    lse = torch.empty(batch, heads, n, dtype=torch.float32, device=parts.device)
    _merge_splits_kernel[(batch * heads, -(-n // MERGE_ROWS))](
        parts, part_lse, out, lse, splits, n, dv, BN=MERGE_ROWS, BD=block_size(dv),
        num_warps=MERGE_WARPS, num_stages=NUM_STAGES,
    )
    return out, lse


if HAS_TRITON:
    import triton
    import triton.language as tl

    from kvcompress_kernels.bitpack import unpack_codes

    @triton.jit
    def fp8_halves(codes, s_t, offs_t, offs_c, live):
        """fp16 tile equal to e4m3 bytes / 256, exactly (kvcompress_scalar.estimator.fp8_halves' bit move: e4m3
        and fp16 differ in exponent width only, so the 7 low bits shifted into fp16's fields give the value at
        2^-8, subnormals included; the sign moves from bit 7 to bit 15)."""
        byte = tl.load(codes + offs_t[:, None] * s_t + offs_c[None, :], mask=live, other=0).to(tl.uint16)
        return (((byte & 0x80) << 8) | ((byte & 0x7F) << 7)).to(tl.float16, bitcast=True)

    @triton.jit
    def token_scale(scale, p_t, offs_t, live_t, HAS_SCALE: tl.constexpr):
        """An fp8 tile's per-token factor [BT]: 256 (undoing fp8_halves) times the stored scale."""
        if HAS_SCALE:
            return tl.load(scale + offs_t * p_t, mask=live_t, other=0.0).to(tl.float32) * 256.0
        return tl.where(live_t, 256.0, 0.0)

    @triton.jit
    def widened(
        codes, s_t, scale, minimum, p_t, levels, factor, nbytes, offs_t, live_t, offs_c, live_c,
        FORMAT: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, HAS_SCALE: tl.constexpr,
    ):
        """float32 [BT, BD] tile of the vectors rows offs_t of one (sequence, KV head) of an Operand stand for; 0
        off the live rows and channels. codes, scale, minimum point at that head's rows."""
        live = live_t[:, None] & live_c[None, :]
        if FORMAT == "fp8":
            tile = fp8_halves(codes, s_t, offs_t, offs_c, live).to(tl.float32)
            return tile * token_scale(scale, p_t, offs_t, live_t, HAS_SCALE)[:, None]
        code = unpack_codes(codes + offs_t[:, None] * s_t, offs_c[None, :], nbytes, live, BITS)
        if FORMAT == "minmax-channel":
            at = (offs_t // GROUP)[:, None] * p_t + offs_c[None, :]
        else:
            at = offs_t[:, None] * p_t + (offs_c // GROUP)[None, :]
        step = tl.load(scale + at, mask=live, other=0.0).to(tl.float32)
        if FORMAT == "lloyd-max":
            return tl.load(levels + code, mask=live, other=0.0) * (step * factor)
        low = tl.load(minimum + at, mask=live, other=0.0).to(tl.float32)
        return low + code.to(tl.float32) * step

    @triton.jit
    def program_rows(heads, n, BN: tl.constexpr):
        """A split program's place in grid (batch x kv_heads, splits, query-row blocks): (bh, split, sequence, KV
        head (64-bit, for base offsets), its query rows offs_n [BN], which of them exist)."""
        bh = tl.program_id(0)
        offs_n = tl.program_id(2) * BN + tl.arange(0, BN)
        return bh, tl.program_id(1), (bh // heads).to(tl.int64), (bh % heads).to(tl.int64), offs_n, offs_n < n

    @triton.jit
    def role_rows(codes, scale, minimum, b, h, c_b, c_h, p_b, p_h):
        """An Operand's codes, scale and minimum pointers moved to sequence b, KV head h."""
        return codes + b * c_b + h * c_h, scale + b * p_b + h * p_h, minimum + b * p_b + h * p_h

    @triton.jit
    def split_start(split, per_split, tokens, BN: tl.constexpr, BDV: tl.constexpr):
        """A split program's tokens [start, stop) and its empty running softmax: max -inf, sum 0, value sum 0
        [BN, BDV] (softmax_step)."""
        start = split * per_split
        stop = tl.minimum(start + per_split, tokens)
        running_max = tl.full([BN], float("-inf"), tl.float32)
        return start, stop, running_max, tl.zeros([BN], tl.float32), tl.zeros([BN, BDV], tl.float32)

    @triton.jit
    def softmax_step(
        s, running_max, running_sum, scale, softcap, bias_rows, m_t, offs_t, live_n, live_t,
        HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
    ):
        """One tile of raw scores <q, k> [BN, BT] into the running softmax: (weights p, the factor alpha that
        rescales what was accumulated, the new max, the new sum); the caller adds p @ values to acc * alpha.
        Scores are multiplied by the scale, then softcapped, then biased (kvcompress_kernels.partial.scores_partial's
        order); tokens off live_t (past the split's end) weigh nothing. Every tile has a live token, so the max
        stays finite."""
        s = s * scale
        if SOFTCAP:
            # tanh(x) = 1 - 2 / (e^2x + 1), which saturates to +-1 (the interpreter lacks libdevice.tanh)
            s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))
        if HAS_BIAS:
            s += tl.load(bias_rows + offs_t[None, :] * m_t, mask=live_n[:, None] & live_t[None, :], other=0.0)
        s = tl.where(live_t[None, :], s, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(s, axis=1))
        alpha = tl.exp(running_max - new_max)
        p = tl.exp(s - new_max[:, None])
        return p, alpha, new_max, running_sum * alpha + tl.sum(p, axis=1)

    @triton.jit
    def attend_widened_tile(
        s, running_max, running_sum, acc, scale, softcap, bias_rows, m_t, offs_t, live_n, live_t,
        v_codes, v_t, v_scale, v_minimum, vp_t, v_levels, v_factor, v_bytes, offs_v, live_v,
        HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, VALUE_FORMAT: tl.constexpr, VALUE_BITS: tl.constexpr,
        VALUE_GROUP: tl.constexpr, VALUE_SCALE: tl.constexpr,
    ):
        """softmax_step, then the values of an Operand's rows (v_*) widened (after the scores, so the two tiles
        are not live at once) and mixed in: (max, sum, value sum)."""
        p, alpha, running_max, running_sum = softmax_step(
            s, running_max, running_sum, scale, softcap, bias_rows, m_t, offs_t, live_n, live_t, HAS_BIAS, SOFTCAP,
        )
        v = widened(
            v_codes, v_t, v_scale, v_minimum, vp_t, v_levels, v_factor, v_bytes, offs_t, live_t, offs_v, live_v,
            VALUE_FORMAT, VALUE_BITS, VALUE_GROUP, VALUE_SCALE,
        )
        return running_max, running_sum, acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")

    @triton.jit
    def store_split(parts_ptr, part_lse_ptr, acc, running_max, running_sum, bh, split, n, dv, offs_n, live_n, offs_v, live_v):
        """The split's normalized output and log-sum-exp, where merge_splits reads them."""
        part = ((bh * tl.num_programs(1) + split) * n).to(tl.int64) + offs_n  # x dv may pass 2**31
        tl.store(
            parts_ptr + part[:, None] * dv + offs_v[None, :], acc / running_sum[:, None],
            mask=live_n[:, None] & live_v[None, :],
        )
        tl.store(part_lse_ptr + part, running_max + tl.log(running_sum), mask=live_n)

    @triton.jit
    def _merge_splits_kernel(
        parts_ptr, part_lse_ptr, out_ptr, lse_ptr, splits, n, dv, BN: tl.constexpr, BD: tl.constexpr,
    ):
        bh = tl.program_id(0)
        offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
        live_n = offs_n < n
        offs_d = tl.arange(0, BD)
        live = live_n[:, None] & (offs_d[None, :] < dv)
        total_max = tl.full([BN], float("-inf"), tl.float32)
        total = tl.zeros([BN], tl.float32)
        acc = tl.zeros([BN, BD], tl.float32)
        for split in range(splits):
            row = ((bh * splits + split) * n).to(tl.int64) + offs_n
            lse = tl.load(part_lse_ptr + row, mask=live_n, other=0.0)
            part = tl.load(parts_ptr + row[:, None] * dv + offs_d[None, :], mask=live, other=0.0)
            new_max = tl.maximum(total_max, lse)
            alpha = tl.exp(total_max - new_max)
            weight = tl.exp(lse - new_max)
            acc = acc * alpha[:, None] + part * weight[:, None]
            total = total * alpha + weight
            total_max = new_max
        row = (bh * n).to(tl.int64) + offs_n
        tl.store(out_ptr + row[:, None] * dv + offs_d[None, :], acc / total[:, None], mask=live)
        tl.store(lse_ptr + row, total_max + tl.log(total), mask=live_n)


def aot_cases() -> list:
    """Compile cases (kvcompress_kernels.aot): the merge at head_dim 64, 128 and 256."""
    from kvcompress_kernels.aot import AOTCase

    cases = []
    for dim in (64, 128, 256):
        shape = (1, 1, 16, dim)
        parts, part_lse = torch.zeros(1, 2, 16, dim), torch.zeros(1, 2, 16)
        cases.append(AOTCase(f"merge d={dim}", lambda a=(parts, part_lse, shape): merge_splits(*a)))
    return cases
