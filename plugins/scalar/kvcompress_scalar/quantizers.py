"""Runtime objects of kvcompress-scalar: min/max (KIVI) and Lloyd-Max quantizers, fp8, and the Hadamard transform.

Arithmetic runs in float32; what is stored is packed uint8 codes (or fp8 bytes) and fp16 per-group parameters.
Codes are always computed from the fp16 parameters as stored, so decode reproduces exactly what encode chose.
"""

from __future__ import annotations

import math

import torch

from kvcompress_kernels.bitpack import pack_bits, packed_length, unpack_bits
from kvcompress_kernels.decode import Operand
from kvcompress.runtime import Quantizer, Transform
from kvcompress.state import PackedState

FP16_MAX = torch.finfo(torch.float16).max
FP16_TINY = 2.0**-24  # the smallest fp16 subnormal: a scale below it would be stored as 0
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


def _to_state_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 -> dtype; for narrow-range dtypes (fp16) clamp first, since fp16 rounding of stored
    parameters can push a decoded extreme a hair past the dtype's largest finite value."""
    info = torch.finfo(dtype)
    if info.max < 1e6:
        x = x.clamp(info.min, info.max)
    return x.to(dtype)


def _fp16_toward(x: torch.Tensor, direction: float) -> torch.Tensor:
    """float32 within the fp16 range -> the nearest fp16 on the side of `direction` (+-inf).

    Values fp16 holds exactly stay as they are; since the range ends are exact, the result stays finite.
    """
    rounded = x.half()
    off = rounded.float() > x if direction < 0 else rounded.float() < x
    return torch.where(off, torch.nextafter(rounded, torch.full_like(rounded, direction)), rounded)


def _code_bits_per_element(bits: int, head_dim: int) -> float:
    """Codes are packed per token along head_dim, so a row takes whole bytes."""
    return packed_length(head_dim, bits) * 8 / head_dim


# ---------------------------------------------------------------------------------------------------
# Lloyd-Max levels of N(0, 1)


def _normal_pdf(x: float) -> float:
    return math.exp(-0.5 * x * x) / math.sqrt(2 * math.pi) if math.isfinite(x) else 0.0


def _normal_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def lloyd_max_gaussian(bits: int, iterations: int = 20000, tolerance: float = 1e-13) -> list[float]:
    """The 2**bits levels minimizing E[(X - Q(X))^2] for X ~ N(0, 1), by Lloyd's algorithm in float64.

    Alternates thresholds at midpoints of neighbouring levels with levels at the conditional means
    E[X | t_i < X < t_{i+1}] = (pdf(t_i) - pdf(t_{i+1})) / (cdf(t_{i+1}) - cdf(t_i)).
    """
    count = 2**bits
    levels = [-3.0 + 6.0 * (i + 0.5) / count for i in range(count)]
    for _ in range(iterations):
        edges = [-math.inf] + [(a + b) / 2 for a, b in zip(levels, levels[1:])] + [math.inf]
        updated = [
            (_normal_pdf(lo) - _normal_pdf(hi)) / (_normal_cdf(hi) - _normal_cdf(lo))
            for lo, hi in zip(edges, edges[1:])
        ]
        shift = max(abs(a - b) for a, b in zip(levels, updated))
        levels = updated
        if shift < tolerance:
            return levels
    raise RuntimeError(f"Lloyd's algorithm did not converge for {bits} bits in {iterations} iterations")


LLOYD_MAX_LEVELS: dict[int, list[float]] = {bits: lloyd_max_gaussian(bits) for bits in (1, 2, 3, 4)}


# ---------------------------------------------------------------------------------------------------
# Quantizers


class MinMaxQuantizer(Quantizer):
    """KIVI asymmetric quantization: per group scale = (max - min) / (2^b - 1), code = round((x - min) / scale).

    axis "channel": groups of `group` tokens of one channel; scale/minimum [b, h, t/group, d].
    axis "token": groups of `group` channels of one token; scale/minimum [b, h, t, d/group].
    Codes [b, h, t, d] are packed along d into uint8 [b, h, t, ceil(d*bits/8)].
    """

    def __init__(self, bits: int, axis: str, group: int):
        self.bits = bits
        self.axis = axis
        self.group = group
        self.top = 2**bits - 1
        self.token_block = group if axis == "channel" else 1

    def _grouped(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """x viewed with each group along one dim, and that dim."""
        b, h, t, d = x.shape
        if self.axis == "channel":
            return x.reshape(b, h, t // self.group, self.group, d), 3
        return x.reshape(b, h, t, d // self.group, self.group), 4

    def encode(self, x: torch.Tensor) -> PackedState:
        grouped, dim = self._grouped(x.float())
        low = grouped.amin(dim, keepdim=True)
        high = grouped.amax(dim, keepdim=True)
        # The fp16 minimum rounds down and the fp16 scale up, so the stored grid covers the whole group and
        # every element lies within half a step of a level (round-to-nearest could push the extremes off it).
        minimum = _fp16_toward(low.clamp(-FP16_MAX, FP16_MAX), -math.inf)
        scale = _fp16_toward(((high - minimum.float()) / self.top).clamp(max=FP16_MAX), math.inf)
        step = scale.float()
        # zero-range groups (constant channels) have scale 0: every code is 0 and decodes to the minimum
        divisor = torch.where(step > 0, step, torch.ones_like(step))
        codes = torch.round((grouped - minimum.float()) / divisor).clamp_(0, self.top)
        codes = torch.where(step > 0, codes, torch.zeros_like(codes)).to(torch.uint8).reshape(x.shape)
        return PackedState(
            tensors={
                "codes": pack_bits(codes, self.bits),
                "scale": scale.squeeze(dim),
                "minimum": minimum.squeeze(dim),
            },
            tokens=x.shape[2],
            head_dim=x.shape[3],
            dtype=x.dtype,
        )

    def decode(self, state: PackedState) -> torch.Tensor:
        codes = unpack_bits(state.tensors["codes"], self.bits, state.head_dim).float()
        grouped, dim = self._grouped(codes)
        scale = state.tensors["scale"].float().unsqueeze(dim)
        minimum = state.tensors["minimum"].float().unsqueeze(dim)
        return _to_state_dtype((minimum + grouped * scale).reshape(codes.shape), state.dtype)

    def kernel_operand(self, state: PackedState) -> Operand:
        """How the fused decode kernels read `state` (kvcompress_kernels.decode)."""
        t = state.tensors
        return Operand(
            f"minmax-{self.axis}", self.bits, self.group, state.head_dim, t["codes"], t["scale"], t["minimum"],
            torch.empty(0, dtype=torch.float32, device=t["codes"].device),
        )

    def bits_per_element(self, head_dim: int) -> float:
        return _code_bits_per_element(self.bits, head_dim) + 32 / self.group


class LloydMaxQuantizer(Quantizer):
    """Per token group of `group` channels: each coordinate of the normalized vector times sqrt(group)
    (about N(0, 1) after a random rotation) coded as the index of the nearest Lloyd-Max level, and one fp16
    scale s. Decode: level * s / sqrt(group). s is chosen by `norm` (the spec's field): "input" stores the
    group's L2 norm; "preserve" rescales it so the decoded group keeps that norm; "least-squares" projects the
    group onto its decoded direction."""

    token_block = 1

    def __init__(self, bits: int, group: int, norm: str = "preserve"):
        self.bits = bits
        self.group = group
        self.norm = norm
        self.levels = torch.tensor(LLOYD_MAX_LEVELS[bits], dtype=torch.float32)
        self.thresholds = (self.levels[1:] + self.levels[:-1]) / 2
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._on_device:
            self._on_device[device] = (self.levels.to(device), self.thresholds.to(device))
        return self._on_device[device]

    def levels_on(self, device: torch.device) -> torch.Tensor:
        """The float32 levels on `device` (copied there once)."""
        return self._tables(device)[0]

    def encode(self, x: torch.Tensor) -> PackedState:
        b, h, t, d = x.shape
        grouped = x.float().reshape(b, h, t, d // self.group, self.group)
        norm = grouped.norm(dim=-1, keepdim=True)
        # a zero group stays zero: its coordinates are 0 (nearest levels +-smallest) times norm 0
        unit = grouped / torch.where(norm > 0, norm, torch.ones_like(norm))
        levels, thresholds = self._tables(x.device)
        codes = torch.bucketize(unit * math.sqrt(self.group), thresholds)
        scale = norm
        if self.norm != "input":
            decoded = levels[codes]  # never zero: the Gaussian grids have no zero level
            length = decoded.norm(dim=-1, keepdim=True)
            if self.norm == "preserve":
                scale = norm * math.sqrt(self.group) / length
            else:
                scale = (grouped * decoded).sum(dim=-1, keepdim=True) * math.sqrt(self.group) / length.square()
        return PackedState(
            tensors={
                "codes": pack_bits(codes.to(torch.uint8).reshape(x.shape), self.bits),
                "norm": scale.squeeze(-1).clamp(min=-FP16_MAX, max=FP16_MAX).half(),
            },
            tokens=t,
            head_dim=d,
            dtype=x.dtype,
        )

    def decode(self, state: PackedState) -> torch.Tensor:
        codes = unpack_bits(state.tensors["codes"], self.bits, state.head_dim)
        levels, _ = self._tables(codes.device)
        b, h, t, d = codes.shape
        values = levels[codes.long()].reshape(b, h, t, d // self.group, self.group)
        radius = state.tensors["norm"].float().unsqueeze(-1) / math.sqrt(self.group)
        return _to_state_dtype((values * radius).reshape(b, h, t, d), state.dtype)

    def kernel_operand(self, state: PackedState) -> Operand:
        """How the fused decode kernels read `state` (kvcompress_kernels.decode)."""
        t = state.tensors
        device = t["codes"].device
        return Operand(
            "lloyd-max", self.bits, self.group, state.head_dim, t["codes"], t["norm"],
            torch.empty(0, dtype=torch.float16, device=device), self.levels_on(device), factor=1 / math.sqrt(self.group),
        )

    def constants(self) -> dict[str, torch.Tensor]:
        return {"levels": self.levels}

    def bits_per_element(self, head_dim: int) -> float:
        return _code_bits_per_element(self.bits, head_dim) + 16 / self.group


class FP8Quantizer(Quantizer):
    """fp8 e4m3 bytes per element; with a per-token scale, each token of each head is divided by
    amax/448 (stored fp16 as [b, h, t]) so that its largest element lands on the largest e4m3 value."""

    token_block = 1

    def __init__(self, per_token_scale: bool):
        self.per_token_scale = per_token_scale

    def encode(self, x: torch.Tensor) -> PackedState:
        values = x.float()
        tensors: dict[str, torch.Tensor] = {}
        if self.per_token_scale:
            # all-zero tokens get the smallest scale instead of 0, and code as zeros
            scale = (values.abs().amax(-1) / FP8_MAX).clamp(FP16_TINY, FP16_MAX).half()
            values = values / scale.float().unsqueeze(-1)
            tensors["scale"] = scale
        # the fp16 rounding of the scale may leave a value a hair past 448; e4m3fn has no Inf and would give NaN
        tensors["codes"] = values.clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return PackedState(tensors=tensors, tokens=x.shape[2], head_dim=x.shape[3], dtype=x.dtype)

    def decode(self, state: PackedState) -> torch.Tensor:
        values = state.tensors["codes"].float()
        if self.per_token_scale:
            values = values * state.tensors["scale"].float().unsqueeze(-1)
        return _to_state_dtype(values, state.dtype)

    def kernel_operand(self, state: PackedState) -> Operand:
        """How the fused decode kernels read `state` (kvcompress_kernels.decode): e4m3 bytes as uint8."""
        t = state.tensors
        device = t["codes"].device
        scale = t.get("scale")
        blank = torch.empty(0, dtype=torch.float16, device=device)
        return Operand(
            "fp8", 8, 1, state.head_dim, t["codes"].view(torch.uint8), blank if scale is None else scale, blank,
            torch.empty(0, dtype=torch.float32, device=device), has_scale=scale is not None,
        )

    def bits_per_element(self, head_dim: int) -> float:
        return 8.0 + (16 / head_dim if self.per_token_scale else 0.0)


# ---------------------------------------------------------------------------------------------------
# Transform


def hadamard_matrix(size: int) -> torch.Tensor:
    """The Sylvester Hadamard matrix of order `size` (a power of two), entries +-1, float32."""
    matrix = torch.ones(1, 1)
    while matrix.shape[0] < size:
        matrix = torch.cat([torch.cat([matrix, matrix], 1), torch.cat([matrix, -matrix], 1)], 0)
    return matrix


class HadamardTransform(Transform):
    """x -> H (s * x) / sqrt(d): random signs s, then the normalized Walsh-Hadamard transform. Orthogonal.

    Applied as one matmul with the d x d matrix diag(s) H / sqrt(d) (row vectors; H is symmetric), which
    is faster on GPUs than log2(d) butterfly passes at head_dim 64-256. The signs define it; the matrix
    built from them is what is held, so both are reported as constants.
    """

    def __init__(self, head_dim: int, seed: int, layer: int):
        if head_dim < 1 or head_dim & (head_dim - 1):
            raise ValueError(
                f"hadamard transform: head_dim {head_dim} is not a power of two; the Walsh-Hadamard transform "
                "needs one (drop the transform stage for this model)"
            )
        generator = torch.Generator().manual_seed((seed << 20) + layer)
        self.signs = (torch.randint(0, 2, (head_dim,), generator=generator) * 2 - 1).to(torch.int8)
        self.matrix = self.signs.float().unsqueeze(1) * hadamard_matrix(head_dim) / math.sqrt(head_dim)
        self._on_device: dict[torch.device, torch.Tensor] = {}

    def _matrix(self, device: torch.device) -> torch.Tensor:
        if device not in self._on_device:
            self._on_device[device] = self.matrix.to(device)
        return self._on_device[device]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() @ self._matrix(x.device)).to(x.dtype)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() @ self._matrix(x.device).T).to(x.dtype)

    def constants(self) -> dict[str, torch.Tensor]:
        return {"signs": self.signs, "matrix": self.matrix}
