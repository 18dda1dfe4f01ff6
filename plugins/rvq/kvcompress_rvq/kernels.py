"""Residual vector quantization kernels: nearest-codeword search (encode) and lookup-table scores (attention).

Nearest codeword: residuals [N, g] against one level's codebook [C, g] -> the index of the codeword at the
smallest Euclidean distance, ties to the lowest index. Distances are ranked by ||c||^2 - 2 <r, c> (the
residual's own norm does not change the ranking).

Lookup-table scores: a key is stored as its fp16 scale and M = groups x depth codes (packed LSB-first at
`bits` bits each, code m = group * depth + level). For each query, table[m, c] = <query part of group(m),
codeword c of level(m)> is computed once; a key's score is scale * sum_m table[m, code_m]. No key is
reconstructed.

Lookup-table mix (values): the attention weights times each token's scale, summed per code slot and codeword
(out[m, c] = sum of w_t * scale_t over tokens whose code m is c); the estimator multiplies that by the codebooks.

`*_torch` functions are the references, `*_triton` the GPU kernels, `*_native` the CPU kernels (kernels_cpu.cpp,
compiled on first use; the torch path where no compiler works: encoding, and lookups of 8-bit codes);
`nearest_codeword`, `residual_encode`, `lut_scores` and `lut_mix` dispatch on the device.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from kvcompress_kernels import native
from kvcompress_kernels.dispatch import HAS_TRITON, block_size, native_library, use_triton
from kvcompress_kernels.bitpack import packed_length, unpack_bits

NATIVE_SOURCE = Path(__file__).with_name("kernels_cpu.cpp")
# The C++ encoder scores codewords in tiles of this many (the codebook is padded to a multiple).
NATIVE_TILE = 64
# Rows of the distance matrix computed at once by the torch path (bounds its temporary memory).
SEARCH_CHUNK = 2048
# Tokens scored at once by the torch lookup-table path.
SCORE_CHUNK = 2048


def _check_search(residuals: torch.Tensor, codebook: torch.Tensor) -> None:
    if residuals.dim() != 2 or codebook.dim() != 2 or residuals.shape[1] != codebook.shape[1]:
        raise ValueError(
            f"nearest codeword search needs residuals [N, g] and a codebook [C, g], got "
            f"{tuple(residuals.shape)} and {tuple(codebook.shape)}"
        )


def _nearest_rows(r: torch.Tensor, codebook: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """Nearest codeword of float32 rows r [n, g] (n <= SEARCH_CHUNK) given the codewords' squared norms."""
    scores = torch.addmm(norms, r, codebook.T, alpha=-2.0)
    # min(-1) gives the first minimum like argmin (ties to the lowest index) and is faster on CPU
    return scores.min(-1).indices


def nearest_codeword_torch(residuals: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index (int64 [N]) of the nearest codeword of codebook [C, g] to each residual [N, g]; float32 math."""
    _check_search(residuals, codebook)
    r = residuals.float()
    c = codebook.float()
    norms = c.square().sum(-1)
    out = torch.empty(r.shape[0], dtype=torch.int64, device=r.device)
    for start in range(0, r.shape[0], SEARCH_CHUNK):
        out[start : start + SEARCH_CHUNK] = _nearest_rows(r[start : start + SEARCH_CHUNK], c, norms)
    return out


def nearest_codeword(residuals: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Search with the Triton kernel on CUDA, the torch reference elsewhere."""
    if use_triton(residuals, codebook):
        return nearest_codeword_triton(residuals, codebook)
    return nearest_codeword_torch(residuals, codebook)


class _NativeEncode(ctypes.Structure):
    """The Args struct of kernels_cpu.cpp (same fields, same order)."""

    _fields_ = [(name, ctypes.c_int64) for name in ("rows", "width", "depth", "size", "padded")] + [
        (name, ctypes.c_void_p) for name in ("vectors", "transposed", "norms", "codebooks", "codes")
    ] + [("threads", ctypes.c_int64), ("tiles", ctypes.c_int64)]


def native_tiles() -> bool:
    """Whether the CPU encoder runs its dot products on AMX tiles here (built for them, granted by the OS)."""
    library = native.library(NATIVE_SOURCE)
    return library is not None and bool(library.rvq_encode_tiles_cpu())


def residual_encode_native(vectors: torch.Tensor, codebooks: torch.Tensor, tiles: bool = True) -> torch.Tensor:
    """The CPU encoder (kernels_cpu.cpp): codes int64 [N, depth] like residual_encode_torch (a code may
    differ where two codewords are within rounding of each other), on torch's thread count; `tiles`: AMX bf16
    tile products (about 16 bits per product) where native_tiles() and the group width is a multiple of 32, else
    float32 registers. Raises where the kernel cannot be built (kvcompress_kernels.native says why)."""
    library = native.required(NATIVE_SOURCE)
    if vectors.dim() != 2 or codebooks.dim() != 3 or vectors.shape[1] != codebooks.shape[2]:
        raise ValueError(f"residual encoding needs vectors [N, g] and codebooks [depth, C, g], got "
                         f"{tuple(vectors.shape)} and {tuple(codebooks.shape)}")
    x = vectors.float().contiguous()
    codewords = codebooks.float().contiguous()
    depth, size, width = codewords.shape
    padded = -(-size // NATIVE_TILE) * NATIVE_TILE
    transposed = torch.zeros(depth, width, padded)
    transposed[:, :, :size] = codewords.transpose(1, 2)
    norms = torch.full((depth, padded), float("inf"))
    norms[:, :size] = codewords.square().sum(-1)
    codes = torch.empty(x.shape[0], depth, dtype=torch.int64)
    held = (x, transposed, norms, codewords, codes)
    if x.shape[0] and depth:
        library.rvq_encode_cpu(ctypes.byref(_NativeEncode(
            x.shape[0], width, depth, size, padded, *(t.data_ptr() for t in held), torch.get_num_threads(), int(tiles))))
    return codes


def residual_encode_torch(vectors: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """Codes int64 [N, depth] of vectors [N, g] through codebooks [depth, C, g]: level by level on the residual,
    a block of SEARCH_CHUNK rows through every level while it is in cache (the reference)."""
    codebooks = codebooks.float()
    codes = torch.empty(vectors.shape[0], codebooks.shape[0], dtype=torch.int64, device=vectors.device)
    norms = codebooks.square().sum(-1)
    for start in range(0, vectors.shape[0], SEARCH_CHUNK):
        residual = vectors[start : start + SEARCH_CHUNK].float().clone()
        for level in range(codebooks.shape[0]):
            code = _nearest_rows(residual, codebooks[level], norms[level])
            codes[start : start + SEARCH_CHUNK, level] = code
            residual -= codebooks[level][code]
    return codes


def residual_encode(vectors: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """residual_encode_torch's codes through the search kernel level by level on CUDA, the C++ encoder on the CPU
    where it builds, else the reference."""
    codebooks = codebooks.float()
    if use_triton(vectors, codebooks):
        codes = torch.empty(vectors.shape[0], codebooks.shape[0], dtype=torch.int64, device=vectors.device)
        residual = vectors.float().clone()
        for level in range(codebooks.shape[0]):
            code = nearest_codeword_triton(residual, codebooks[level])
            codes[:, level] = code
            residual -= codebooks[level][code]
        return codes
    if native_library(NATIVE_SOURCE, vectors, codebooks) is not None:
        return residual_encode_native(vectors, codebooks)
    return residual_encode_torch(vectors, codebooks)


def residual_decode(codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """float32 [..., g]: the sum over levels of the chosen codewords, codes [..., depth]."""
    out = torch.zeros(*codes.shape[:-1], codebooks.shape[-1], dtype=torch.float32, device=codes.device)
    for level in range(codebooks.shape[0]):
        out += codebooks[level].float()[codes[..., level].long()]
    return out


def _check_scores(tables: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bits: int) -> None:
    if tables.dim() != 5:
        raise ValueError(f"tables must be [batch, heads, queries, codes per token, codebook size], got {tuple(tables.shape)}")
    b, h, _, m, size = tables.shape
    if size > 2**bits:
        raise ValueError(f"a codebook of {size} codewords needs more than {bits}-bit codes")
    if codes.shape[:2] != (b, h) or codes.shape[-1] != packed_length(m, bits):
        raise ValueError(
            f"packed codes {tuple(codes.shape)} do not hold {m} codes of {bits} bits per token for "
            f"batch {b} x heads {h}"
        )
    if scale.shape != codes.shape[:3]:
        raise ValueError(f"scale {tuple(scale.shape)} must be [batch, heads, tokens] = {tuple(codes.shape[:3])}")


def token_codes(codes: torch.Tensor, bits: int, m: int) -> torch.Tensor:
    """Codes [..., m] of packed codes [..., bytes]: 8-bit codes are the bytes themselves (no unpacking)."""
    return codes if bits == 8 and codes.shape[-1] == m else unpack_bits(codes, bits, m)


def lut_scores_torch(tables: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Scores float32 [b, h, n, t] from tables [b, h, n, M, C], packed codes uint8 [b, h, t, bytes], scale [b, h, t].

    One embedding_bag over the tables of all heads as rows [b * h * M * C, n]: a token is a bag of its M
    entries (code + offset of its code slot and head), summed for all n queries at once.
    """
    _check_scores(tables, codes, scale, bits)
    b, h, n, m, size = tables.shape
    t = codes.shape[2]
    rows = tables.float().permute(0, 1, 3, 4, 2).reshape(b * h * m * size, n)
    heads = torch.arange(b * h, dtype=torch.int32, device=codes.device).view(b * h, 1, 1)
    offsets = (heads * m + torch.arange(m, dtype=torch.int32, device=codes.device)) * size
    out = torch.empty(b * h, n, t, dtype=torch.float32, device=tables.device)
    for start in range(0, t, SCORE_CHUNK):
        chunk = token_codes(codes[:, :, start : start + SCORE_CHUNK], bits, m).reshape(b * h, -1, m)
        width = chunk.shape[1]
        index = (offsets + chunk).reshape(b * h * width, m)  # int32: embedding_bag takes it, half the bytes of int64
        picked = torch.nn.functional.embedding_bag(index, rows, mode="sum").view(b * h, width, n)
        out[..., start : start + width] = picked.transpose(1, 2)
    return (out.view(b, h, n, t) * scale.float().unsqueeze(2))


def lut_mix_torch(weights: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bits: int, m: int, size: int
                  ) -> torch.Tensor:
    """Weight per codeword float32 [b, h, n, m * size] of weights [b, h, n, t], packed codes uint8 [b, h, t, bytes]
    (m codes per token), scale [b, h, t]: one scatter_add per block of SCORE_CHUNK tokens (bounds the unpacked
    codes and per-code weights)."""
    b, h, n, t = weights.shape
    offsets = torch.arange(m, device=weights.device) * size
    out = torch.zeros(b, h, n, m * size, dtype=torch.float32, device=weights.device)
    for start in range(0, t, SCORE_CHUNK):
        stop = min(t, start + SCORE_CHUNK)
        block = token_codes(codes[:, :, start:stop], bits, m).long().add_(offsets)  # [b, h, block, m]
        index = block.reshape(b, h, 1, (stop - start) * m).expand(b, h, n, -1)
        weighted = weights[..., start:stop].float() * scale[:, :, None, start:stop].float()
        source = weighted.unsqueeze(-1).expand(b, h, n, stop - start, m).reshape(b, h, n, -1)
        out.scatter_add_(-1, index, source)
    return out


class _NativeLookup(ctypes.Structure):
    """The LookupArgs struct of kernels_cpu.cpp (same fields, same order)."""

    _fields_ = [(name, ctypes.c_int64) for name in ("batch", "heads", "tokens", "queries", "slots", "size")] + [
        ("codes", ctypes.c_void_p), ("codes_b", ctypes.c_int64), ("codes_h", ctypes.c_int64),
    ] + [(name, ctypes.c_void_p) for name in ("scale", "tables", "weights", "out")]


def _lookup(entry: str, codes: torch.Tensor, scale: torch.Tensor, queries: int, m: int, size: int,
            tables: torch.Tensor | None, weights: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """Run rvq_lut_scores_cpu / rvq_lut_mix_cpu on 8-bit codes [b, h, t, m] (read where they lie: a store's
    strided view is not copied) and return `out`."""
    library = native.required(NATIVE_SOURCE)
    if codes.dtype != torch.uint8 or codes.shape[-1] != m or size > 256:
        raise ValueError(f"the CPU lookups read 8-bit codes, one byte per code: got {tuple(codes.shape)} {codes.dtype} "
                         f"for {m} codes of a {size}-codeword book")
    b, h, t = codes.shape[:3]
    codes = native.token_rows(codes)
    held = (scale.float().contiguous(), tables, weights)
    if b * h * t * queries:
        getattr(library, entry)(ctypes.byref(_NativeLookup(
            b, h, t, queries, m, size, codes.data_ptr(), codes.stride(0), codes.stride(1),
            *(native.pointer(x) for x in held), out.data_ptr())))
    return out


def lut_scores_native(tables: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """The CPU kernel (kernels_cpu.cpp) for 8-bit codes: float32 [b, h, n, t] like lut_scores_torch."""
    _check_scores(tables, codes, scale, bits)
    b, h, n, m, size = tables.shape
    out = torch.empty(b, h, n, codes.shape[2], dtype=torch.float32)
    return _lookup("rvq_lut_scores_cpu", codes, scale, n, m, size, tables.float().contiguous(), None, out)


def lut_mix_native(weights: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bits: int, m: int, size: int
                   ) -> torch.Tensor:
    """The CPU kernel (kernels_cpu.cpp) for 8-bit codes: float32 [b, h, n, m * size] like lut_mix_torch."""
    b, h, n, _ = weights.shape
    out = torch.zeros(b, h, n, m * size, dtype=torch.float32)
    return _lookup("rvq_lut_mix_cpu", codes, scale, n, m, size, None, weights.float().contiguous(), out)


def _native_lookups(bits: int, m: int, codes: torch.Tensor, *tensors: torch.Tensor) -> bool:
    """Whether the CPU lookups take these codes: 8-bit codes, one byte each, and the C++ kernels at hand."""
    return bits == 8 and codes.shape[-1] == m and native_library(NATIVE_SOURCE, codes, *tensors) is not None


def lut_scores(tables: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Lookup-table scores with the Triton kernel on CUDA, the C++ kernel on the CPU for 8-bit codes where it
    builds, the torch reference elsewhere."""
    if use_triton(tables, codes, scale):
        return lut_scores_triton(tables, codes, scale, bits)
    if _native_lookups(bits, tables.shape[3], codes, tables, scale):
        return lut_scores_native(tables, codes, scale, bits)
    return lut_scores_torch(tables, codes, scale, bits)


def lut_mix(weights: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bits: int, m: int, size: int
            ) -> torch.Tensor:
    """Weight per codeword (lut_mix_torch) with the C++ kernel on the CPU for 8-bit codes where it builds, else
    the torch reference (a GPU reads values through the fused reader, kvcompress_rvq.decode_kernels)."""
    if _native_lookups(bits, m, codes, weights, scale):
        return lut_mix_native(weights, codes, scale, bits, m, size)
    return lut_mix_torch(weights, codes, scale, bits, m, size)


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _nearest_codeword_kernel(
        residuals_ptr, codebook_ptr, norms_ptr, out_ptr, rows, size, width,
        BN: tl.constexpr, BC: tl.constexpr, BG: tl.constexpr,
    ):
        # 64-bit offsets: rows x width may pass 2**31 (calibration encodes many tokens at once)
        offs_n = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN)
        offs_g = tl.arange(0, BG)
        live_n = offs_n < rows
        r = tl.load(
            residuals_ptr + offs_n[:, None] * width + offs_g[None, :],
            mask=live_n[:, None] & (offs_g[None, :] < width),
            other=0.0,
        )
        best = tl.full([BN], float("inf"), tl.float32)
        best_index = tl.zeros([BN], dtype=tl.int64)
        for start in range(0, size, BC):
            offs_c = start + tl.arange(0, BC)
            live_c = offs_c < size
            codewords_t = tl.load(
                codebook_ptr + offs_c[None, :] * width + offs_g[:, None],
                mask=live_c[None, :] & (offs_g[:, None] < width),
                other=0.0,
            )
            norms = tl.load(norms_ptr + offs_c, mask=live_c, other=float("inf"))
            scores = norms[None, :] - 2.0 * tl.dot(r, codewords_t, input_precision="ieee")
            block_best = tl.min(scores, axis=1)
            block_index = tl.argmin(scores, axis=1, tie_break_left=True).to(tl.int64) + start
            # strictly smaller: on a tie the earlier block (lower index) keeps the place
            better = block_best < best
            best = tl.where(better, block_best, best)
            best_index = tl.where(better, block_index, best_index)
        tl.store(out_ptr + offs_n, best_index, mask=live_n)

    @triton.jit
    def _lut_scores_kernel(
        tables_ptr, codes_ptr, scale_ptr, out_ptr, n, t, m, size, nbytes,
        BITS: tl.constexpr, BT: tl.constexpr, BM: tl.constexpr,
    ):
        bh = tl.program_id(0).to(tl.int64)  # 64-bit offsets: batch x heads x tokens x bytes passes 2**31
        offs_t = tl.program_id(1) * BT + tl.arange(0, BT)
        offs_m = tl.arange(0, BM)
        live_t = offs_t < t
        live = live_t[:, None] & (offs_m[None, :] < m)
        # unpack the codes of this token block straight from the packed bytes: code m starts at bit m * BITS
        # and spans at most three bytes (BITS <= 16)
        bit = offs_m * BITS
        rows = codes_ptr + (bh * t + offs_t[:, None]) * nbytes + (bit // 8)[None, :]
        word = tl.zeros([BT, BM], dtype=tl.int32)
        for k in tl.static_range(3):
            in_row = live & (((bit // 8) + k) < nbytes)[None, :]
            word |= tl.load(rows + k, mask=in_row, other=0).to(tl.int32) << (8 * k)
        code = (word >> (bit % 8)[None, :]) & ((1 << BITS) - 1)
        entry = offs_m[None, :] * size + code  # index into one query's flattened [M, C] table
        scale = tl.load(scale_ptr + bh * t + offs_t, mask=live_t, other=0.0).to(tl.float32)
        for q in range(n):
            table = tables_ptr + (bh * n + q) * m * size
            picked = tl.load(table + entry, mask=live, other=0.0)
            tl.store(out_ptr + (bh * n + q) * t + offs_t, tl.sum(picked, axis=1) * scale, mask=live_t)


def nearest_codeword_triton(
    residuals: torch.Tensor, codebook: torch.Tensor, block_rows: int = 32, block_codes: int = 64
) -> torch.Tensor:
    """Triton version of nearest_codeword_torch (same indices where distances are computed alike)."""
    _check_search(residuals, codebook)
    r = residuals.float().contiguous()
    c = codebook.float().contiguous()
    norms = c.square().sum(-1).contiguous()
    rows, width = r.shape
    out = torch.empty(rows, dtype=torch.int64, device=r.device)
    if rows:
        _nearest_codeword_kernel[(triton.cdiv(rows, block_rows),)](
            r, c, norms, out, rows, c.shape[0], width, BN=block_rows, BC=block_codes, BG=block_size(width),
        )
    return out


def lut_scores_triton(
    tables: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bits: int, block_tokens: int = 64
) -> torch.Tensor:
    """Triton version of lut_scores_torch: float32 [b, h, n, t], reading the packed codes directly."""
    _check_scores(tables, codes, scale, bits)
    b, h, n, m, size = tables.shape
    t, nbytes = codes.shape[2], codes.shape[3]
    out = torch.empty(b, h, n, t, dtype=torch.float32, device=tables.device)
    if b * h * n * t:
        _lut_scores_kernel[(b * h, triton.cdiv(t, block_tokens))](
            tables.float().contiguous(), codes.contiguous(), scale.contiguous(), out,
            n, t, m, size, nbytes, BITS=bits, BT=block_tokens, BM=block_size(m, 2),
        )
    return out


def aot_cases() -> list:
    """Compile cases (kvcompress_kernels.aot): the search at the shipped specs' codebooks (256 codewords of 32
    channels), and the lookup-table scores of 8-bit codes for rvq (11 levels) and rvq-lite (6 levels) at head_dim
    64, 128 and 256 (groups of 32 channels: head_dim / 32 x depth codes per token)."""
    from kvcompress_kernels.aot import AOTCase

    cases = [AOTCase("search 256 x 32", lambda: nearest_codeword_triton(torch.zeros(64, 32), torch.zeros(256, 32)))]
    for d in (64, 128, 256):
        for depth in (11, 6):
            m = d // 32 * depth
            tables = torch.zeros(1, 1, 4, m, 256)
            codes = torch.zeros(1, 1, 64, m, dtype=torch.uint8)
            scale = torch.zeros(1, 1, 64, dtype=torch.float16)
            cases.append(AOTCase(f"lut scores d={d} depth={depth}", lambda a=(tables, codes, scale, 8): lut_scores_triton(*a)))
    return cases
