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
  _merge_splits_kernel, grid (batch x kv_heads, query-row blocks): the exact log-sum-exp merge of the splits
      (kvcompress_kernels.partial.merge_partials' math), skipped when there is one split.

Formats (Operand.format), what a stored vector element is:
  "minmax-channel"  minimum[t // group, c] + code * scale[t // group, c]   (KIVI keys)
  "minmax-token"    minimum[t, c // group] + code * scale[t, c // group]   (KIVI values)
  "lloyd-max"       levels[code] * norm[t, c // group] / sqrt(group)        (rotated: the reader rotates the
                                                                            query and un-rotates the output)
  "fp8"             e4m3 byte (times the per-token fp16 scale when stored)
Scores and the value mix accumulate in float32 with exact float32 products (tl.dot, input_precision ieee);
fp8 keys against an fp16 query (FP16_DOT) use fp16 dot operands, exact there: every e4m3 value is an fp16.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from kvcompress.runtime import Quantizer
from kvcompress.state import PackedState
from kvcompress_kernels.dispatch import HAS_TRITON, block_size
from kvcompress_scalar.quantizers import FP8Quantizer, LloydMaxQuantizer, MinMaxQuantizer

# Query rows (query heads of one KV head x query tokens) one program scores at most, and at head_dim 256
# (query, output and tiles are float32 registers; more would spill).
MAX_BLOCK_ROWS = 64
WIDE_BLOCK_ROWS = 32
# No software pipelining of the token loop: it holds a second tile set in registers (spills at 4-8 warps),
# and the many split programs already hide memory latency.
NUM_STAGES = 1
# The merge reads each split's rows once: small blocks of rows keep it to few registers.
MERGE_ROWS, MERGE_WARPS = 16, 4
# Query rows per KV head up to which the reader takes the kernels: 16 decode tokens of 8 query heads per KV
# head. Longer query blocks (prefill) keep the estimator path, which is matmul-bound rather than bandwidth-bound.
MAX_DECODE_ROWS = 128


@dataclass(frozen=True)
class Operand:
    """One role's packed state as the kernel reads it.

    codes: uint8 [b, h, t, bytes] (fp8 bytes viewed as uint8); scale: fp16 per-group scale (min/max), group
    norm (Lloyd-Max) or per-token scale (fp8); minimum: fp16 (min/max only); levels: float32 [2**bits]
    (Lloyd-Max only); factor: what scale is multiplied by (1 / sqrt(group) for Lloyd-Max). Unused tensors are
    empty ones of the kernel's pointer dtype.
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


def operand(quantizer: Quantizer, state: PackedState) -> Operand:
    """How the kernel reads `state`, written by `quantizer` (one of the scalar plugin's)."""
    tensors = state.tensors
    device = tensors["codes"].device
    blank_half = torch.empty(0, dtype=torch.float16, device=device)
    blank_levels = torch.empty(0, dtype=torch.float32, device=device)
    if isinstance(quantizer, FP8Quantizer):
        scale = tensors.get("scale")
        return Operand(
            "fp8", 8, 1, state.head_dim, tensors["codes"].view(torch.uint8),
            blank_half if scale is None else scale, blank_half, blank_levels, has_scale=scale is not None,
        )
    if isinstance(quantizer, LloydMaxQuantizer):
        return Operand(
            "lloyd-max", quantizer.bits, quantizer.group, state.head_dim, tensors["codes"], tensors["norm"],
            blank_half, quantizer.levels_on(device), factor=1 / math.sqrt(quantizer.group),
        )
    if isinstance(quantizer, MinMaxQuantizer):
        return Operand(
            f"minmax-{quantizer.axis}", quantizer.bits, quantizer.group, state.head_dim, tensors["codes"],
            tensors["scale"], tensors["minimum"], blank_levels,
        )
    raise TypeError(
        f"the fused scalar kernels read min/max, Lloyd-Max and fp8 state, got {type(quantizer).__name__}'s: "
        "read it through its estimator"
    )


def _launch_shape(rows: int, dim: int) -> tuple[int, int, int]:
    """(query rows, tokens per tile, warps) of a program for `rows` query rows of (padded) head_dim `dim`:
    chosen from the AOT compile's registers (compile_cases), with no or few spills for sm_80 and sm_90."""
    block_rows = min(MAX_BLOCK_ROWS if dim <= 128 else WIDE_BLOCK_ROWS, block_size(rows))
    return block_rows, 32 if dim <= 64 else 16, 8 if block_rows * dim <= 4096 else 16


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _split(tokens: int, block: int, programs: int, device: torch.device) -> tuple[int, int]:
    """(splits, tokens per split): about two programs per multiprocessor on a GPU; 4 elsewhere (the
    interpreter), which is few enough to stay quick and still exercises the merge."""
    tiles = -(-tokens // block)
    target = 2 * _multiprocessors(device) if device.type == "cuda" else 4
    wanted = min(tiles, max(1, -(-target // programs)))
    per_split = -(-tiles // wanted) * block
    return -(-tokens // per_split), per_split


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
    if splits is None:
        splits, per_split = _split(tokens, block_tokens, batch * heads * row_blocks, device)
    else:
        per_split = -(-tokens // (splits * block_tokens)) * block_tokens
        splits = -(-tokens // per_split)
    parts = torch.empty(batch * heads, splits, n, values.dim, dtype=torch.float32, device=device)
    part_lse = torch.empty(batch * heads, splits, n, dtype=torch.float32, device=device)
    if bias is not None:
        bias = bias.float()
        bias = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape)).expand(batch, heads, n, tokens)
    query = query if query.stride(-1) == 1 else query.contiguous()
    bias_arg = bias if bias is not None else part_lse
    bias_strides = bias.stride() if bias is not None else (0, 0, 0, 0)
    _decode_split_kernel[(batch * heads, splits, row_blocks)](
        query, *query.stride()[:3],
        bias_arg, *bias_strides,
        *_role_args(keys), *_role_args(values),
        parts, part_lse,
        heads, n, tokens, keys.dim, values.dim, per_split, scale, softcap or 1.0,
        **_role_constexprs("KEY", keys), **_role_constexprs("VALUE", values),
        BN=block_rows, BT=block_tokens, BDK=block_size(keys.dim), BDV=block_size(values.dim),
        HAS_BIAS=bias is not None, SOFTCAP=softcap is not None,
        FP16_DOT=keys.format == "fp8" and query.dtype == torch.float16,
        num_warps=warps, num_stages=NUM_STAGES,
    )
    if splits == 1:
        return parts.view(batch, heads, n, values.dim), part_lse.view(batch, heads, n)
    out = torch.empty(batch, heads, n, values.dim, dtype=torch.float32, device=device)
    lse = torch.empty(batch, heads, n, dtype=torch.float32, device=device)
    _merge_splits_kernel[(batch * heads, -(-n // MERGE_ROWS))](
        parts, part_lse, out, lse, splits, n, values.dim, BN=MERGE_ROWS, BD=block_size(values.dim),
        num_warps=MERGE_WARPS, num_stages=NUM_STAGES,
    )
    return out, lse


def _role_args(role: Operand) -> tuple:
    """The kernel's runtime arguments for one role: codes and their strides, parameters and their strides,
    levels, factor, bytes per packed row."""
    codes, scale = role.codes, role.scale
    if codes.stride(-1) != 1 or (scale.numel() and scale.dim() == 4 and scale.stride(-1) != 1):
        raise ValueError("fused decode: packed tensors must be contiguous along their last dim (TokenStore views are)")
    if role.minimum.numel() and role.minimum.stride() != scale.stride():
        raise ValueError("fused decode: min/max scale and minimum must share one layout (TokenStore buffers do)")
    scale_strides = scale.stride()[:3] if scale.numel() else (0, 0, 0)
    return (
        codes, *codes.stride()[:3], scale, role.minimum, *scale_strides, role.levels, role.factor, codes.shape[3]
    )


def _role_constexprs(prefix: str, role: Operand | tuple[str, int, int, bool]) -> dict:
    """The kernel's constexprs for one role: format, bits, group, whether a per-token fp8 scale is stored."""
    if isinstance(role, Operand):
        role = (role.format, role.bits, role.group, role.has_scale)
    return dict(zip((f"{prefix}_FORMAT", f"{prefix}_BITS", f"{prefix}_GROUP", f"{prefix}_SCALE"), role))


# (format, bits, group, stored fp8 scale) of keys and values in the shipped specs (specs/*.yaml), the
# method pairs the AOT cases compile; think-kivi-4's keys are kivi-4's with fewer channels.
SPEC_PAIRS: dict[str, tuple[tuple[str, int, int, bool], tuple[str, int, int, bool]]] = {
    "kivi-2": (("minmax-channel", 2, 32, True), ("minmax-token", 2, 32, True)),
    "kivi-4": (("minmax-channel", 4, 32, True), ("minmax-token", 4, 32, True)),
    "rot-k4v2": (("lloyd-max", 4, 64, True), ("lloyd-max", 2, 64, True)),
    "fp8": (("fp8", 8, 1, True), ("fp8", 8, 1, True)),
}


@dataclass(frozen=True)
class CompileCase:
    """One specialization of a kernel, as the launcher runs it: compile it ahead of time with
    triton.compile(ASTSource(case.kernel, case.signature, case.constexprs), target=GPUTarget("cuda", arch, 32),
    options=case.options)."""

    name: str
    kernel: object
    signature: dict[str, str]
    constexprs: dict[str, object]
    options: dict[str, int]


def _signature(kernel, types: dict[str, str], constexprs: dict[str, object]) -> dict[str, str]:
    """Every argument's type: pointers and floats as `types` names them, constexprs, the rest i32."""
    return {name: "constexpr" if name in constexprs else types.get(name, "i32") for name in kernel.arg_names}


def compile_cases(head_dims: tuple[int, ...] = (64, 128, 256)) -> list[CompileCase]:
    """The specializations the reader launches for the shipped specs' pairs (SPEC_PAIRS) at each head_dim, with
    an fp16 query and a bias: a decode block of 16 query rows and the largest block (softcap on for kivi-4),
    and the split merge."""
    if not HAS_TRITON:
        raise RuntimeError("compile_cases needs Triton: pip install triton")
    types = {
        "query_ptr": "*fp16", "bias_ptr": "*fp32", "parts_ptr": "*fp32", "part_lse_ptr": "*fp32", "out_ptr": "*fp32",
        "lse_ptr": "*fp32", "scale": "fp32", "softcap": "fp32",
    }
    for role in ("k", "v"):
        types.update({
            f"{role}_codes": "*u8", f"{role}_scale": "*fp16", f"{role}_minimum": "*fp16", f"{role}_levels": "*fp32",
            f"{role}_factor": "fp32",
        })
    cases = []
    for dim in head_dims:
        for rows in (16, MAX_DECODE_ROWS):
            block_rows, block_tokens, warps = _launch_shape(rows, dim)
            options = {"num_warps": warps, "num_stages": NUM_STAGES}
            for spec, (key, value) in SPEC_PAIRS.items():
                constexprs = {
                    **_role_constexprs("KEY", key), **_role_constexprs("VALUE", value), "BN": block_rows,
                    "BT": block_tokens, "BDK": dim, "BDV": dim, "HAS_BIAS": True,
                    "SOFTCAP": spec == "kivi-4" and rows > 16, "FP16_DOT": key[0] == "fp8",
                }
                cases.append(CompileCase(
                    f"decode_split[{spec},d={dim},rows={block_rows}{',softcap' if constexprs['SOFTCAP'] else ''}]",
                    _decode_split_kernel, _signature(_decode_split_kernel, types, constexprs), constexprs, options,
                ))
        constexprs = {"BN": MERGE_ROWS, "BD": dim}
        cases.append(CompileCase(
            f"merge_splits[d={dim}]", _merge_splits_kernel, _signature(_merge_splits_kernel, types, constexprs),
            constexprs, {"num_warps": MERGE_WARPS, "num_stages": NUM_STAGES},
        ))
    return cases


if HAS_TRITON:
    import triton
    import triton.language as tl

    from kvcompress_kernels.bitpack import unpack_codes

    @triton.jit
    def _fp8_halves(codes, s_t, offs_t, offs_c, live):
        """fp16 tile equal to e4m3 bytes / 256, exactly (kvcompress_scalar.estimator.fp8_halves' bit move: e4m3
        and fp16 differ in exponent width only, so the 7 low bits shifted into fp16's fields give the value at
        2^-8, subnormals included; the sign moves from bit 7 to bit 15)."""
        byte = tl.load(codes + offs_t[:, None] * s_t + offs_c[None, :], mask=live, other=0).to(tl.uint16)
        return (((byte & 0x80) << 8) | ((byte & 0x7F) << 7)).to(tl.float16, bitcast=True)

    @triton.jit
    def _token_scale(scale, p_t, offs_t, live_t, HAS_SCALE: tl.constexpr):
        """An fp8 tile's per-token factor [BT]: 256 (undoing _fp8_halves) times the stored scale."""
        if HAS_SCALE:
            return tl.load(scale + offs_t * p_t, mask=live_t, other=0.0).to(tl.float32) * 256.0
        return tl.where(live_t, 256.0, 0.0)

    @triton.jit
    def _widened(
        codes, s_t, scale, minimum, p_t, levels, factor, nbytes, offs_t, live_t, offs_c, live_c,
        FORMAT: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, HAS_SCALE: tl.constexpr,
    ):
        """float32 [BT, BD] tile of the vectors rows offs_t of one (sequence, KV head) stand for; 0 off the
        live rows and channels. codes, scale, minimum point at that head's rows."""
        live = live_t[:, None] & live_c[None, :]
        if FORMAT == "fp8":
            tile = _fp8_halves(codes, s_t, offs_t, offs_c, live).to(tl.float32)
            return tile * _token_scale(scale, p_t, offs_t, live_t, HAS_SCALE)[:, None]
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
        bh = tl.program_id(0)
        split = tl.program_id(1)
        b = (bh // heads).to(tl.int64)
        h = (bh % heads).to(tl.int64)
        offs_n = tl.program_id(2) * BN + tl.arange(0, BN)
        live_n = offs_n < n
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
        k_codes += b * kc_b + h * kc_h
        k_scale += b * kp_b + h * kp_h
        k_minimum += b * kp_b + h * kp_h
        v_codes += b * vc_b + h * vc_h
        v_scale += b * vp_b + h * vp_h
        v_minimum += b * vp_b + h * vp_h
        bias_rows = bias_ptr + b * m_b + h * m_h + offs_n[:, None] * m_n

        running_max = tl.full([BN], float("-inf"), tl.float32)
        running_sum = tl.zeros([BN], tl.float32)
        acc = tl.zeros([BN, BDV], tl.float32)
        start = split * per_split
        stop = tl.minimum(start + per_split, tokens)
        for first in range(start, stop, BT):
            offs_t = first + tl.arange(0, BT)
            live_t = offs_t < stop
            if FP16_DOT:  # exact products; the per-token factor applies to the scores
                k = _fp8_halves(k_codes, kc_t, offs_t, offs_k, live_t[:, None] & live_k[None, :])
                s = tl.dot(q, tl.trans(k)) * _token_scale(k_scale, kp_t, offs_t, live_t, KEY_SCALE)[None, :]
            else:
                k = _widened(
                    k_codes, kc_t, k_scale, k_minimum, kp_t, k_levels, k_factor, k_bytes, offs_t, live_t, offs_k,
                    live_k, KEY_FORMAT, KEY_BITS, KEY_GROUP, KEY_SCALE,
                )
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            s = s * scale
            if SOFTCAP:
                # tanh(x) = 1 - 2 / (e^2x + 1), which saturates to +-1 (the interpreter lacks libdevice.tanh)
                s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))
            if HAS_BIAS:
                s += tl.load(bias_rows + offs_t[None, :] * m_t, mask=live_n[:, None] & live_t[None, :], other=0.0)
            # rows past the split's end weigh nothing; every tile has a live token, so the max stays finite
            s = tl.where(live_t[None, :], s, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(s, axis=1))
            alpha = tl.exp(running_max - new_max)
            p = tl.exp(s - new_max[:, None])
            running_sum = running_sum * alpha + tl.sum(p, axis=1)
            v = _widened(
                v_codes, vc_t, v_scale, v_minimum, vp_t, v_levels, v_factor, v_bytes, offs_t, live_t, offs_v,
                live_v, VALUE_FORMAT, VALUE_BITS, VALUE_GROUP, VALUE_SCALE,
            )
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
            running_max = new_max
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
