"""Packing integer codes of 1 to 16 bits into a uint8 bit stream, and back.

Codes along the last dim are laid out least-significant bit first, code after code, so a row of n codes of
b bits takes exactly ceil(n * b / 8) bytes whatever n is. `pack_bits_torch`/`unpack_bits_torch` are the
reference (and the CPU path); `pack_bits_triton`/`unpack_bits_triton` are the kernels; tests hold them equal.
"""

from __future__ import annotations

import math

import torch

from kvcompress_kernels.dispatch import HAS_TRITON, use_triton

MAX_BITS = 16


def packed_length(n: int, bits: int) -> int:
    """Bytes that n codes of `bits` bits take."""
    return (n * bits + 7) // 8


def code_dtype(bits: int) -> torch.dtype:
    """The dtype unpacked codes come back in."""
    return torch.uint8 if bits <= 8 else torch.int32


def _check(bits: int) -> None:
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in 1..{MAX_BITS}, got {bits}")


def _chunk(bits: int) -> tuple[int, int]:
    """(bytes, codes) of the smallest run of codes that fills whole bytes: (3, 8) for 3 bits, (1, 4) for 2."""
    common = math.gcd(bits, 8)
    return bits // common, 8 // common


def pack_bits_torch(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes [..., n] of integers in [0, 2**bits) -> uint8 [..., ceil(n*bits/8)]."""
    _check(bits)
    n = codes.shape[-1]
    lead = codes.shape[:-1]
    per_byte = 8 // bits if 8 % bits == 0 else 0
    if per_byte and n % per_byte == 0:
        # Fast path: whole codes per byte, shifted into place and summed (no bit overlap, so sum == or).
        grouped = codes.to(torch.uint8).reshape(*lead, n // per_byte, per_byte)
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
        return (grouped << shifts).sum(-1, dtype=torch.uint8)
    chunk_bytes, chunk_codes = _chunk(bits)
    if bits <= 8 and n % chunk_codes == 0:
        # Whole chunks: chunk_codes codes fill chunk_bytes bytes exactly (3 bits: 8 codes in 3 bytes), so each
        # chunk is one int64 of the bit stream, shifted into place code by code and cut into bytes.
        shifts = torch.arange(0, chunk_codes * bits, bits, device=codes.device, dtype=torch.int64)
        chunks = (codes.to(torch.int64).reshape(*lead, n // chunk_codes, chunk_codes) << shifts).sum(-1)
        cuts = torch.arange(0, 8 * chunk_bytes, 8, device=codes.device, dtype=torch.int64)
        return ((chunks.unsqueeze(-1) >> cuts) & 0xFF).to(torch.uint8).reshape(*lead, n // chunk_codes * chunk_bytes)
    stream = (codes.to(torch.int32).unsqueeze(-1) >> torch.arange(bits, device=codes.device, dtype=torch.int32)) & 1
    stream = stream.reshape(*lead, n * bits)
    total = packed_length(n, bits)
    stream = torch.nn.functional.pad(stream, (0, total * 8 - n * bits))
    weights = torch.arange(8, device=codes.device, dtype=torch.int32)
    return (stream.reshape(*lead, total, 8) << weights).sum(-1).to(torch.uint8)


def unpack_bits_torch(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """uint8 [..., ceil(n*bits/8)] -> codes [..., n] (uint8 for bits <= 8, else int32)."""
    _check(bits)
    lead = packed.shape[:-1]
    per_byte = 8 // bits if 8 % bits == 0 else 0
    if per_byte and n % per_byte == 0:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        mask = (1 << bits) - 1
        return ((packed.unsqueeze(-1) >> shifts) & mask).reshape(*lead, n).to(code_dtype(bits))
    chunk_bytes, chunk_codes = _chunk(bits)
    if bits <= 8 and n % chunk_codes == 0:
        cuts = torch.arange(0, 8 * chunk_bytes, 8, device=packed.device, dtype=torch.int64)
        chunks = (packed.to(torch.int64).reshape(*lead, n // chunk_codes, chunk_bytes) << cuts).sum(-1)
        shifts = torch.arange(0, chunk_codes * bits, bits, device=packed.device, dtype=torch.int64)
        codes = (chunks.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
        return codes.reshape(*lead, n).to(code_dtype(bits))
    stream = (packed.to(torch.int32).unsqueeze(-1) >> torch.arange(8, device=packed.device, dtype=torch.int32)) & 1
    stream = stream.reshape(*lead, -1)[..., : n * bits].reshape(*lead, n, bits)
    weights = torch.arange(bits, device=packed.device, dtype=torch.int32)
    return (stream << weights).sum(-1).to(code_dtype(bits))


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack with the Triton kernel on CUDA, the torch reference elsewhere."""
    return pack_bits_triton(codes, bits) if use_triton(codes) else pack_bits_torch(codes, bits)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Unpack with the Triton kernel on CUDA, the torch reference elsewhere."""
    return unpack_bits_triton(packed, bits, n) if use_triton(packed) else unpack_bits_torch(packed, bits, n)


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _pack_kernel(codes_ptr, out_ptr, n, nbytes, BITS: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # rows x n passes 2**31 codes on a whole cache
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        live = offs < nbytes
        acc = tl.zeros([BLOCK], dtype=tl.int32)
        for k in tl.static_range(8):
            bit = offs * 8 + k
            index = bit // BITS
            code = tl.load(codes_ptr + row * n + index, mask=live & (index < n), other=0).to(tl.int32)
            acc |= ((code >> (bit % BITS)) & 1) << k
        tl.store(out_ptr + row * nbytes + offs, acc.to(tl.uint8), mask=live)

    @triton.jit
    def unpack_codes(row, index, nbytes, mask, BITS: tl.constexpr):
        """int32 codes number `index` of the packed rows starting at pointers `row` (broadcast together), 0 where
        `mask` is False; nbytes: bytes per row. Code i starts at bit i * BITS, LSB first: one byte holds it
        when BITS divides 8, else it spans up to ceil((BITS + 7) / 8) bytes, read as one little-endian word."""
        bit = index * BITS
        first = bit // 8
        word = tl.load(row + first, mask=mask, other=0).to(tl.int32)
        if 8 % BITS != 0:
            for k in tl.static_range(1, (BITS + 14) // 8):
                byte = tl.load(row + first + k, mask=mask & (first + k < nbytes), other=0).to(tl.int32)
                word |= byte << (8 * k)
        return (word >> (bit % 8)) & ((1 << BITS) - 1)

    @triton.jit
    def _unpack_kernel(packed_ptr, out_ptr, n, nbytes, BITS: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        live = offs < n
        codes = unpack_codes(packed_ptr + row * nbytes, offs, nbytes, live, BITS)
        tl.store(out_ptr + row * n + offs, codes.to(out_ptr.dtype.element_ty), mask=live)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


def pack_bits_triton(codes: torch.Tensor, bits: int, block: int = 128) -> torch.Tensor:
    """Triton version of pack_bits_torch (same layout, same result)."""
    _check(bits)
    n = codes.shape[-1]
    nbytes = packed_length(n, bits)
    flat = _rows(codes.to(code_dtype(bits)))
    out = torch.empty(flat.shape[0], nbytes, dtype=torch.uint8, device=codes.device)
    if flat.numel():
        _pack_kernel[(flat.shape[0], triton.cdiv(nbytes, block))](flat, out, n, nbytes, BITS=bits, BLOCK=block)
    return out.reshape(*codes.shape[:-1], nbytes)


def unpack_bits_triton(packed: torch.Tensor, bits: int, n: int, block: int = 128) -> torch.Tensor:
    """Triton version of unpack_bits_torch."""
    _check(bits)
    nbytes = packed.shape[-1]
    flat = _rows(packed)
    out = torch.empty(flat.shape[0], n, dtype=code_dtype(bits), device=packed.device)
    if flat.numel():
        _unpack_kernel[(flat.shape[0], triton.cdiv(n, block))](flat, out, n, nbytes, BITS=bits, BLOCK=block)
    return out.reshape(*packed.shape[:-1], n)


def aot_cases() -> list:
    """Compile cases (kvcompress_kernels.aot): both kernels at every code width the methods pack (1 to 8 bits) and
    the widest (16, int32 codes)."""
    from kvcompress_kernels.aot import AOTCase

    cases = []
    for bits in [*range(1, 9), MAX_BITS]:
        codes = torch.zeros(4, 128, dtype=code_dtype(bits))
        packed = torch.zeros(4, packed_length(128, bits), dtype=torch.uint8)
        cases.append(AOTCase(f"pack {bits} bits", lambda codes=codes, bits=bits: pack_bits_triton(codes, bits)))
        cases.append(AOTCase(f"unpack {bits} bits", lambda packed=packed, bits=bits: unpack_bits_triton(packed, bits, 128)))
    return cases
