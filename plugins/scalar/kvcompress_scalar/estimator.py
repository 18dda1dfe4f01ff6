"""The scalar estimator: attention read from min/max (KIVI), Lloyd-Max and fp8 state without decoding it.

Parameters are folded into the query or the weights, so the only full-size float tensor is the codes of one
token block (or the Lloyd-Max levels they stand for), never the dequantized keys or values:

  min/max, axis channel (keys): <q, k_t> = sum_c (q_c scale_Gc) code_tc + sum_c q_c min_Gc per token group G;
      mix = sum_G (w_G @ codes_G) * scale_G + (sum_{t in G} w_t) min_G.
  min/max, axis token (values): mix over channel group g = (w * scale_g) @ codes_g + (w @ min_g);
      scores = sum_g (q_g @ codes_g^T) * scale_g + (sum_{c in g} q_c) min_g.
  Lloyd-Max: levels[code] * norm_g / sqrt(group) is min/max with levels for codes, norm/sqrt(group) for
      scale and no minimum; it runs in the rotated space (the codec rotates the query once before scores and
      the mix once after).
  fp8: the e4m3 bytes widen through fp16 bit arithmetic (exact, and much faster on CPUs than torch's fp8
      cast); the per-token scale multiplies the scores or the weights.

Codes widen through a 256-row table per packed byte (an embedding lookup yields a byte's codes as floats,
already in the levels' values) where whole codes fill bytes, through a 4096-row table per 12 bits where they
straddle bytes but fill 3 bytes (3 and 6 bits); otherwise through unpack_bits. Every read works
on token blocks of at most READ_BLOCK tokens, so its transient memory is bounded by the block, and computes in
float32 whatever the query dtype, returning that dtype.

On the CPU, token-axis codes (min/max with axis token, Lloyd-Max) of 2, 4 or 8 bits are read for decode-sized
query blocks (at most NATIVE_QUERIES per KV head) by C++ kernels (kernels_cpu.cpp, compiled on first use by
kvcompress_kernels.native), which widen each row's bytes in registers instead of through a float tensor, and so
are the scores of channel-axis min/max codes (KIVI's keys); the torch reads above are their references.
"""

from __future__ import annotations

import ctypes
import functools
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from kvcompress.runtime import Estimator, Quantizer
from kvcompress.state import PackedState
from kvcompress_kernels import native
from kvcompress_kernels.bitpack import unpack_bits
from kvcompress_kernels.dispatch import native_library
from kvcompress_kernels.native import pointer, token_rows
from kvcompress_kernels.scratch import scratch
from kvcompress_scalar.quantizers import FP8Quantizer, LloydMaxQuantizer, MinMaxQuantizer

# Tokens read at once: bounds the float codes held during a read (b x h x READ_BLOCK x head_dim floats).
READ_BLOCK = 4096
NATIVE_SOURCE = Path(__file__).with_name("kernels_cpu.cpp")
# Queries per KV head the C++ reads take (decode steps, grouped-query heads); larger blocks keep torch's matmuls.
NATIVE_QUERIES = 8


def fp8_halves(codes: torch.Tensor) -> torch.Tensor:
    """float8_e4m3fn codes -> float32 equal to codes / 256, exactly.

    e4m3 (bias 7) and fp16 (bias 15) differ in exponent width only, so an e4m3 byte's 7 low bits shifted
    into an fp16's exponent and mantissa fields are that fp16 at 2^-8 times the value, subnormals included;
    the sign moves from bit 7 to bit 15 (sign extension to int16 and the shift set bits 14 and 15; bit 14 is
    cleared). NaN codes do not occur: the quantizer clamps to +-448.
    """
    widened = (codes.view(torch.int8).to(torch.int16) << 7) & ~0x4000
    return widened.view(torch.float16).float()


@functools.lru_cache(maxsize=256)
def code_table(bits: int, levels: tuple[float, ...], device: torch.device) -> torch.Tensor | None:
    """The values of every code a packed unit holds, per unit: [256, 8 / bits] per byte where whole codes fill
    bytes; [4096, 12 / bits] per 12-bit half of 3 bytes where codes straddle bytes but fill 3 (3 and 6 bits);
    None otherwise. One per process for each width and levels (at most 64 KiB), shared by every reader and cache,
    like the read scratch buffers (kvcompress_kernels.scratch): derived working tables, not a cache's state."""
    values = torch.tensor(levels, dtype=torch.float32)
    if 8 % bits == 0:
        unit = 8
    elif 12 % bits == 0:
        unit = 12
    else:
        return None
    shifts = torch.arange(0, unit, bits)
    return values[(torch.arange(2**unit).unsqueeze(-1) >> shifts) & (2**bits - 1)].to(device)


class CodeReader:
    """Float values of packed b-bit codes: `values[code]` for each code (codes 0..2^b - 1 for min/max)."""

    def __init__(self, bits: int, values: torch.Tensor):
        self.bits = bits
        self.values = values.float()
        self.per_byte = 8 // bits if 8 % bits == 0 else 0
        # 4-bit codes standing for themselves (min/max) widen fastest by two shifts into a reused buffer
        self.nibbles = bits == 4 and torch.equal(self.values, torch.arange(16, dtype=torch.float32))
        self.levels = tuple(self.values.tolist())
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
        # looked up once per device, not at each read (the shared table's key hashes every level: up to 2 us)
        if device not in self._on_device:
            self._on_device[device] = (self.values.to(device), code_table(self.bits, self.levels, device))
        return self._on_device[device]

    def _read_halves(self, packed: torch.Tensor, table: torch.Tensor, n: int) -> torch.Tensor:
        """3- or 6-bit codes, n a multiple of 24 / bits: each 3 packed bytes are two 12-bit halves of whole
        codes (the bit stream is LSB first), looked up in the 4096-row table. float32 [b, h, t, n]."""
        b, h, t, _ = packed.shape
        chunks = packed.reshape(b, h, t, -1, 3).int()
        halves = torch.stack(
            [chunks[..., 0] | (chunks[..., 1] & 15) << 8, chunks[..., 1] >> 4 | chunks[..., 2] << 4], dim=-1
        )
        out = scratch(b * h * t * n, packed.device).view(-1, table.shape[1])
        torch.index_select(table, 0, halves.reshape(-1), out=out)
        return out.view(b, h, t, n)

    def read(self, packed: torch.Tensor, n: int, groups: int = 1) -> torch.Tensor:
        """packed uint8 [b, h, t, bytes] holding n codes per row -> float32 [b, h, groups, t, n / groups]:
        the values of each group of n / groups consecutive codes, group-major."""
        b, h, t, _ = packed.shape
        values, table = self._tables(packed.device)
        width = n // groups
        if table is not None and self.per_byte and width % self.per_byte == 0:
            # whole bytes per group: reorder the (small) byte index group-major, then one lookup
            index = packed.reshape(b, h, t, groups, width // self.per_byte).transpose(2, 3)
            if self.nibbles:
                out = scratch(b * h * t * n, packed.device).view(b, h, groups, t, width // 2, 2)
                out[..., 0].copy_(index & 15)
                out[..., 1].copy_(index >> 4)
                return out.view(b, h, groups, t, width)
            out = scratch(b * h * t * n, packed.device).view(-1, self.per_byte)
            torch.index_select(table, 0, index.reshape(-1).int(), out=out)
            return out.view(b, h, groups, t, width)
        if table is not None and not self.per_byte and n % (24 // self.bits) == 0:
            codes = self._read_halves(packed, table, n)
        else:
            codes = values[unpack_bits(packed, self.bits, n).long()]
        return codes.reshape(b, h, t, groups, width).transpose(2, 3)


def _rows(state: PackedState, start: int, stop: int) -> dict[str, torch.Tensor]:
    """The state's tensors for tokens start..stop (block bounds are whole rows of every tensor: a row per
    token, or per group of tokens for channel-axis parameters)."""
    return {
        name: tensor[:, :, start * tensor.shape[2] // state.tokens : stop * tensor.shape[2] // state.tokens]
        for name, tensor in state.tensors.items()
    }


def _split(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[b, h, n, d] -> [b, h, groups, n, d / groups]: the channel groups of each row."""
    b, h, n, d = x.shape
    return x.reshape(b, h, n, groups, d // groups).transpose(2, 3)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """[b, h, groups, n, width] -> [b, h, n, groups * width] (the inverse of _split)."""
    b, h, groups, n, width = x.shape
    return x.transpose(2, 3).reshape(b, h, n, groups * width)


def _grouped_scores(query, codes, scale):
    """sum over channel groups g of (q_g @ codes_g^T) * scale_g: query [b, h, n, d], codes [b, h, G, t, w],
    scale [b, h, t, G] -> [b, h, n, t]."""
    per_group = _split(query, codes.shape[2]) @ codes.transpose(-1, -2)  # [b, h, G, n, t]
    return (per_group * scale.permute(0, 1, 3, 2).unsqueeze(3)).sum(2)


def _grouped_mix(weights, codes, scale):
    """sum_t w_t scale_tg codes_tg per channel group g: weights [b, h, n, t], codes [b, h, G, t, w],
    scale [b, h, t, G] -> [b, h, n, G * w]."""
    scaled = weights.unsqueeze(2) * scale.permute(0, 1, 3, 2).unsqueeze(3)  # [b, h, G, n, t]
    return _merge(scaled @ codes)


class _NativeRead(ctypes.Structure):
    """The Args struct of kernels_cpu.cpp (same fields, same order)."""

    _fields_ = [(name, ctypes.c_int64) for name in ("batch", "heads", "tokens", "queries", "dim", "group", "bits")] + [
        ("codes", ctypes.c_void_p), ("codes_b", ctypes.c_int64), ("codes_h", ctypes.c_int64)
    ] + [(name, ctypes.c_void_p) for name in ("scale", "minimum", "levels", "input", "out")]


def native_token_reads(bits: int, group: int, dim: int, queries: int, *tensors: torch.Tensor) -> bool:
    """Whether the C++ reads take token-axis codes of this shape: 2, 4 or 8 bits filling whole 16-byte chunks,
    at most 16 groups and NATIVE_QUERIES queries, CPU tensors and the kernels at hand."""
    return _token_groups_fit(group, dim) and _native_rows(bits, dim, queries, tensors)


def _native_rows(bits: int, dim: int, queries: int, tensors: tuple[torch.Tensor, ...]) -> bool:
    """What both C++ reads need: 2, 4 or 8-bit codes in rows of whole 16-byte chunks, a decode-sized query block,
    CPU tensors and the kernels at hand."""
    return (bits in (2, 4, 8) and dim * bits % 128 == 0 and 1 <= queries <= NATIVE_QUERIES
            and native_library(NATIVE_SOURCE, *tensors) is not None)


def _token_groups_fit(group: int, dim: int) -> bool:
    """Channel groups the token-axis kernels take: dividing the row, at most 16 (one vector of scales). With rows of
    whole 16-byte chunks that makes every group whole bytes."""
    return dim % group == 0 and dim // group <= 16


def _check_token_groups(dim: int, group: int) -> None:
    if not _token_groups_fit(group, dim):
        raise ValueError(f"the CPU reads take up to 16 channel groups dividing the head_dim, got {dim} channels in "
                         f"groups of {group}")


def _native_read(entry: str, inputs: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor,
                 minimum: torch.Tensor | None, levels: torch.Tensor | None, bits: int, group: int, dim: int,
                 out: torch.Tensor) -> torch.Tensor:
    library = native.required(NATIVE_SOURCE)
    b, h, t = codes.shape[:3]
    if codes.dtype != torch.uint8 or codes.shape[-1] != dim * bits // 8 or dim * bits % 128:
        raise ValueError(f"the CPU reads take uint8 rows of {dim} {bits}-bit codes in whole 16-byte chunks, got "
                         f"{tuple(codes.shape)} {codes.dtype}")
    codes = token_rows(codes)
    held = [scale.float().contiguous(), None if minimum is None else minimum.float().contiguous(),
            None if levels is None else levels.float().contiguous(), inputs.float().contiguous()]
    if b * h * t:
        getattr(library, entry)(ctypes.byref(_NativeRead(
            b, h, t, inputs.shape[2], dim, group, bits, pointer(codes), codes.stride(0), codes.stride(1),
            *(pointer(x) for x in held), pointer(out))))
    return out


def native_channel_reads(bits: int, group: int, dim: int, queries: int, *tensors: torch.Tensor) -> bool:
    """Whether the C++ scores take channel-axis codes of this shape: 2, 4 or 8 bits filling whole 16-byte chunks,
    token groups of a multiple of 16 tokens dividing 1024, at most NATIVE_QUERIES queries, CPU tensors and the
    kernels at hand."""
    return group % 16 == 0 and 1024 % group == 0 and _native_rows(bits, dim, queries, tensors)


def channel_scores_native(query: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor,
                          bits: int, group: int) -> torch.Tensor:
    """float32 scores [b, h, n, t] of queries [b, h, n, d] against channel-axis min/max codes [b, h, t, d * bits / 8]
    whose scale and minimum [b, h, t / group, d] hold per channel and group of `group` tokens. The C++ kernel; raises
    where it cannot be built."""
    b, h, n, d = query.shape
    if minimum is None or codes.shape[2] % group or tuple(scale.shape) != (b, h, codes.shape[2] // group, d):
        raise ValueError(f"channel-axis codes need whole groups of {group} tokens and a scale and minimum per group "
                         f"and channel, got {codes.shape[2]} tokens, scale {tuple(scale.shape)}, minimum "
                         f"{None if minimum is None else tuple(minimum.shape)}")
    out = torch.empty(b, h, n, codes.shape[2], dtype=torch.float32)
    return _native_read("scalar_channel_scores_cpu", query, codes, scale, minimum, None, bits, group, d, out)


def token_scores_native(query: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None,
                        levels: torch.Tensor | None, bits: int, group: int) -> torch.Tensor:
    """float32 scores [b, h, n, t] of queries [b, h, n, d] against token-axis codes [b, h, t, d * bits / 8]: channel
    group g of token t is scale[..., t, g] * value + minimum[..., t, g] (value: levels[code], or the code without
    levels). The C++ kernel; raises where it cannot be built."""
    b, h, n, d = query.shape
    _check_token_groups(d, group)
    out = torch.empty(b, h, n, codes.shape[2], dtype=torch.float32)
    return _native_read("scalar_token_scores_cpu", query, codes, scale, minimum, levels, bits, group, d, out)


def token_mix_native(weights: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None,
                     levels: torch.Tensor | None, bits: int, group: int, dim: int) -> torch.Tensor:
    """float32 [b, h, n, dim]: weights [b, h, n, t] times the values of token-axis codes (as token_scores_native
    reads them). The C++ kernel; raises where it cannot be built."""
    b, h, n, _ = weights.shape
    _check_token_groups(dim, group)
    out = torch.empty(b, h, n, dim, dtype=torch.float32)
    return _native_read("scalar_token_mix_cpu", weights, codes, scale, minimum, levels, bits, group, dim, out)


class ScalarEstimator(Estimator):
    """Reads the state of the scalar plugin's quantizers (see the module docstring)."""

    def __init__(self, quantizer: Quantizer):
        if isinstance(quantizer, MinMaxQuantizer):
            self.reader = CodeReader(quantizer.bits, torch.arange(2**quantizer.bits))
        elif isinstance(quantizer, LloydMaxQuantizer):
            self.reader = CodeReader(quantizer.bits, quantizer.levels)
        elif not isinstance(quantizer, FP8Quantizer):
            raise TypeError(
                f"the scalar estimator reads state of the scalar and fp8 quantizers, got {type(quantizer).__name__}: "
                "use estimator decode for other quantizers"
            )
        self.quantizer = quantizer
        block = quantizer.token_block
        self.block = max(block, READ_BLOCK - READ_BLOCK % block)

    def _native(self, inputs: torch.Tensor, codes: torch.Tensor, dim: int) -> bool:
        """Whether the C++ reads take this block (token-axis codes; see native_token_reads)."""
        return native_token_reads(self.quantizer.bits, self.quantizer.group, dim, inputs.shape[2], inputs, codes)

    def _blocks(self, tokens: int):
        for start in range(0, tokens, self.block):
            yield start, min(tokens, start + self.block)

    def scores(self, query: torch.Tensor, state: PackedState) -> torch.Tensor:
        q = query.float()
        b, h, n, _ = q.shape
        out = torch.empty(b, h, n, state.tokens, dtype=torch.float32, device=q.device)
        for start, stop in self._blocks(state.tokens):
            out[..., start:stop] = self._scores(q, state, start, stop)
        return out.to(query.dtype)

    def mix(self, weights: torch.Tensor, state: PackedState) -> torch.Tensor:
        w = weights.float()
        b, h, n, _ = w.shape
        out = torch.zeros(b, h, n, state.head_dim, dtype=torch.float32, device=w.device)
        for start, stop in self._blocks(state.tokens):
            out += self._mix(w[..., start:stop], state, start, stop)
        return out.to(weights.dtype)

    def _scores(self, q: torch.Tensor, state: PackedState, start: int, stop: int) -> torch.Tensor:
        quantizer, d = self.quantizer, state.head_dim
        if isinstance(quantizer, FP8Quantizer):
            part = _rows(state, start, stop)
            scores = q @ fp8_halves(part["codes"]).transpose(-1, -2)
            return scores * (256.0 * _fp8_scale(part))
        if isinstance(quantizer, LloydMaxQuantizer):
            part = _rows(state, start, stop)
            groups = d // quantizer.group
            scale = part["norm"].float() / math.sqrt(quantizer.group)
            if self._native(q, part["codes"], d):
                return token_scores_native(q, part["codes"], scale, None, self.reader.values, quantizer.bits,
                                           quantizer.group)
            codes = self.reader.read(part["codes"], d, groups)
            return _grouped_scores(q, codes, scale)
        if quantizer.axis == "token":
            part = _rows(state, start, stop)
            groups = d // quantizer.group
            if self._native(q, part["codes"], d):
                return token_scores_native(q, part["codes"], part["scale"], part["minimum"], None, quantizer.bits,
                                           quantizer.group)
            codes = self.reader.read(part["codes"], d, groups)
            offset = _split(q, groups).sum(-1).transpose(-1, -2) @ part["minimum"].float().transpose(-1, -2)
            return _grouped_scores(q, codes, part["scale"].float()) + offset
        # axis channel: one scale and minimum per channel and group of `group` tokens
        group = quantizer.group
        part = _rows(state, start, stop)
        if native_channel_reads(quantizer.bits, group, d, q.shape[2], q, part["codes"]):
            return channel_scores_native(q, part["codes"], part["scale"], part["minimum"], quantizer.bits, group)
        b, h, n, _ = q.shape
        codes = self.reader.read(part["codes"], d).reshape(b, h, -1, group, d)  # [b, h, G, group, d]
        scaled = q.unsqueeze(2) * part["scale"].float().unsqueeze(3)  # [b, h, G, n, d]
        offset = part["minimum"].float() @ q.transpose(-1, -2)  # [b, h, G, n]
        scores = scaled @ codes.transpose(-1, -2) + offset.unsqueeze(-1)  # [b, h, G, n, group]
        return scores.transpose(2, 3).reshape(b, h, n, stop - start)

    def _mix(self, w: torch.Tensor, state: PackedState, start: int, stop: int) -> torch.Tensor:
        quantizer, d = self.quantizer, state.head_dim
        if isinstance(quantizer, FP8Quantizer):
            part = _rows(state, start, stop)
            return (w * (256.0 * _fp8_scale(part))) @ fp8_halves(part["codes"])
        if isinstance(quantizer, LloydMaxQuantizer):
            part = _rows(state, start, stop)
            scale = part["norm"].float() / math.sqrt(quantizer.group)
            if self._native(w, part["codes"], d):
                return token_mix_native(w, part["codes"], scale, None, self.reader.values, quantizer.bits,
                                        quantizer.group, d)
            codes = self.reader.read(part["codes"], d, d // quantizer.group)
            return _grouped_mix(w, codes, scale)
        if quantizer.axis == "token":
            part = _rows(state, start, stop)
            if self._native(w, part["codes"], d):
                return token_mix_native(w, part["codes"], part["scale"], part["minimum"], None, quantizer.bits,
                                        quantizer.group, d)
            codes = self.reader.read(part["codes"], d, d // quantizer.group)
            offset = (w @ part["minimum"].float()).repeat_interleave(quantizer.group, dim=-1)
            return _grouped_mix(w, codes, part["scale"].float()) + offset
        group = quantizer.group
        part = _rows(state, start, stop)
        b, h, n, _ = w.shape
        codes = self.reader.read(part["codes"], d).reshape(b, h, -1, group, d)
        per_block = w.reshape(b, h, n, -1, group).transpose(2, 3)  # [b, h, G, n, group]
        mixed = (per_block @ codes) * part["scale"].float().unsqueeze(3)  # [b, h, G, n, d]
        offset = per_block.sum(-1).transpose(-1, -2) @ part["minimum"].float()  # [b, h, n, d]
        return mixed.sum(2) + offset


def _fp8_scale(part: dict[str, torch.Tensor]) -> torch.Tensor | float:
    """The per-token scale [b, h, 1, t] of an fp8 block, or 1 without one."""
    scale = part.get("scale")
    return 1.0 if scale is None else scale.float().unsqueeze(2)
