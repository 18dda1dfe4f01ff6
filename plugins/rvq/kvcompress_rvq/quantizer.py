"""The rvq quantizer: std scaling, channel groups, residual codes packed at log2(codebook_size) bits.

State of a block of tokens [b, h, t, d]:
    scale: fp16 [b, h, t]           the standard deviation of each vector over head_dim, or (scale
                                    "preserve") what makes the decoded vector as long as the input
    codes: uint8 [b, h, t, bytes]   groups x depth codes per token, code m = group * depth + level, packed
                                    LSB-first at log2(codebook_size) bits (kvcompress_kernels.bitpack)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvcompress_kernels.bitpack import pack_bits, packed_length, unpack_bits
from kvcompress_rvq.kernels import residual_decode, residual_encode
from kvcompress.methods import LayerContext
from kvcompress.runtime import Quantizer
from kvcompress.state import PackedState

FP16_MAX = torch.finfo(torch.float16).max
FP16_SMALLEST_NORMAL = torch.finfo(torch.float16).tiny
# The quantizer fields a codebook is learned for: a codebook serves only a quantizer with the same values.
CODEBOOK_FIELDS = ("depth", "codebook_size", "group", "layout")


@dataclass(frozen=True)
class Grouping:
    """How a head_dim vector splits into `groups` groups of `group` channels."""

    head_dim: int
    group: int
    layout: str

    @property
    def groups(self) -> int:
        return self.head_dim // self.group

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """[..., head_dim] -> [..., groups, group]."""
        lead = x.shape[:-1]
        if self.layout == "strided":  # channel c -> group c % groups, position c // groups
            return x.reshape(*lead, self.group, self.groups).transpose(-1, -2)
        return x.reshape(*lead, self.groups, self.group)

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """[..., groups, group] -> [..., head_dim] (the inverse of split)."""
        lead = x.shape[:-2]
        if self.layout == "strided":
            return x.transpose(-1, -2).reshape(*lead, self.head_dim)
        return x.reshape(*lead, self.head_dim)


def vector_scale(x: torch.Tensor) -> torch.Tensor:
    """fp16 [...] scale of each vector [..., d]: its standard deviation. A vector with no spread to speak of
    (constant, or below fp16's normal range) takes its root mean square instead, and a vector whose root mean
    square is below that range too takes 0: it decodes to zeros, where a floored scale would blow it up by
    orders of magnitude and an all-zero vector would decode to a sum of codewords."""
    x = x.float()
    std = (x - x.mean(dim=-1, keepdim=True)).square().mean(dim=-1).sqrt()  # 4x faster than Tensor.std on the CPU
    scale = torch.where(std >= FP16_SMALLEST_NORMAL, std, x.square().mean(dim=-1).sqrt())
    scale = torch.where(scale >= FP16_SMALLEST_NORMAL, scale, torch.zeros_like(scale))
    return scale.clamp(max=FP16_MAX).half()


def normalized_groups(x: torch.Tensor, grouping: Grouping) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp16 scale [...], float32 groups [..., groups, group] of x / scale) for vectors x [..., d].

    The division uses the scale as stored, so decoding multiplies back exactly what encoding divided by; a
    zero scale divides by 1 (those codes are multiplied by 0 when read).
    """
    scale = vector_scale(x)
    divisor = torch.where(scale > 0, scale.float(), torch.ones_like(scale, dtype=torch.float32))
    return scale, grouping.split(x.float() / divisor.unsqueeze(-1))


def norm_preserving_scale(x: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp16 [...] scale at which the codes [..., groups, depth] of vectors x [..., d], searched at `scale`
    (vector_scale), decode to x's L2 norm: |x| / |sum of the codewords|. Where the codewords sum to zero, or
    the vector decodes to zeros anyway (scale 0), `scale` is kept."""
    decoded = residual_decode(codes, codebooks).flatten(-2).norm(dim=-1)
    preserved = x.float().norm(dim=-1) / decoded.clamp_min(torch.finfo(torch.float32).tiny)
    keep = (decoded == 0) | (scale == 0)
    return torch.where(keep, scale.float(), preserved).clamp(max=FP16_MAX).half()


@dataclass(frozen=True)
class RVQCodebooks:
    """One layer's and role's codebooks: codewords [depth, codebook_size, group] (fp16 as calibrated).

    fields: the quantizer fields they were learned for (None: unknown, only shapes are checked);
    source: where they came from, for error messages.
    """

    codewords: torch.Tensor
    fields: dict | None = None
    source: str = "the codebook stage"


def check_codebooks(codebook: object, spec, ctx: LayerContext) -> torch.Tensor:
    """The codewords [depth, size, group] if `codebook` fits the quantizer spec; else a clear error."""
    if codebook is None:
        raise ValueError(
            f"rvq quantizer (layer {ctx.layer} {ctx.role}) has no codebooks: add a codebook stage, e.g. "
            "codebook: {method: kmeans, path: codebooks/NAME.safetensors}"
        )
    if isinstance(codebook, torch.Tensor):
        codebook = RVQCodebooks(codebook)
    if not isinstance(codebook, RVQCodebooks):
        raise ValueError(f"rvq quantizer needs rvq codebooks, got {type(codebook).__name__} from the codebook stage")
    wanted = {name: getattr(spec, name) for name in CODEBOOK_FIELDS}
    if codebook.fields is not None:
        differ = {k: (codebook.fields.get(k), v) for k, v in wanted.items() if codebook.fields.get(k) != v}
        if differ:
            detail = ", ".join(f"{k} {have!r} (spec: {want!r})" for k, (have, want) in differ.items())
            raise ValueError(
                f"codebooks in {codebook.source} for layer {ctx.layer} {ctx.role} were learned for another rvq "
                f"quantizer: {detail}; recalibrate with `kvcompress calibrate SPEC --out {codebook.source}`"
            )
    expected = (spec.depth, spec.codebook_size, spec.group)
    if tuple(codebook.codewords.shape) != expected:
        raise ValueError(
            f"codebooks from {codebook.source} for layer {ctx.layer} {ctx.role} have shape "
            f"{tuple(codebook.codewords.shape)}, the rvq spec needs [depth, codebook_size, group] = {list(expected)}"
        )
    if not torch.isfinite(codebook.codewords).all():
        raise ValueError(f"codebooks from {codebook.source} for layer {ctx.layer} {ctx.role} hold NaN or Inf")
    if not codebook.codewords.is_floating_point():
        raise ValueError(f"codebooks from {codebook.source} for layer {ctx.layer} {ctx.role} are not floating point")
    return codebook.codewords.contiguous()


class RVQQuantizer(Quantizer):
    """Residual vector quantization of each token vector (see the module docstring for the state)."""

    def __init__(self, codewords: torch.Tensor, grouping: Grouping, preserve_norm: bool = False):
        self.codewords = codewords  # [depth, size, group], held in the dtype it came in (fp16 from a file)
        self.grouping = grouping
        self.preserve_norm = preserve_norm
        self.depth, self.codebook_size, _ = codewords.shape
        self.bits = int(math.log2(self.codebook_size))
        self.codes_per_token = grouping.groups * self.depth
        self._on_device: dict[torch.device, torch.Tensor] = {}

    @classmethod
    def from_spec(cls, spec, ctx: LayerContext) -> RVQQuantizer:
        if ctx.head_dim % spec.group:
            raise ValueError(
                f"rvq quantizer: group {spec.group} does not divide head_dim {ctx.head_dim}; set `group` to a "
                f"divisor of {ctx.head_dim}"
            )
        grouping = Grouping(ctx.head_dim, spec.group, spec.layout)
        return cls(check_codebooks(ctx.codebook, spec, ctx), grouping, preserve_norm=spec.scale == "preserve")

    def codebooks_on(self, device: torch.device) -> torch.Tensor:
        """The codewords on `device` in float32 (copied and widened once per device)."""
        if device not in self._on_device:
            self._on_device[device] = self.codewords.to(device).float()
        return self._on_device[device]

    def tables(self, query: torch.Tensor) -> torch.Tensor:
        """Lookup tables of queries [b, h, n, head_dim]: float32 [b, h, n, codes per token, codebook size], entry
        (group j, level l, c) = <the query's group j, codeword c of level l> (what the lookup-table scores read)."""
        b, h, n, _ = query.shape
        tables = torch.einsum("bhnjg,lcg->bhnjlc", self.grouping.split(query.float()), self.codebooks_on(query.device))
        return tables.reshape(b, h, n, self.codes_per_token, self.codebook_size)

    def encode(self, x: torch.Tensor) -> PackedState:
        b, h, t, d = x.shape
        if d != self.grouping.head_dim:
            raise ValueError(f"rvq quantizer built for head_dim {self.grouping.head_dim}, got vectors of {d}")
        scale, groups = normalized_groups(x, self.grouping)
        codebooks = self.codebooks_on(x.device)
        codes = residual_encode(groups.reshape(-1, self.grouping.group), codebooks)
        if self.preserve_norm:
            scale = norm_preserving_scale(x, codes.reshape(b, h, t, -1, self.depth), codebooks, scale)
        codes = codes.reshape(b, h, t, self.codes_per_token)
        return PackedState(
            tensors={"scale": scale.contiguous(), "codes": pack_bits(codes, self.bits).contiguous()},
            tokens=t,
            head_dim=d,
            dtype=x.dtype,
        )

    def unpacked_codes(self, state: PackedState) -> torch.Tensor:
        """int64 [b, h, t, groups, depth] codes of a state."""
        codes = unpack_bits(state.tensors["codes"], self.bits, self.codes_per_token).long()
        return codes.reshape(*codes.shape[:3], self.grouping.groups, self.depth)

    def decode(self, state: PackedState) -> torch.Tensor:
        codes = self.unpacked_codes(state)
        groups = residual_decode(codes, self.codebooks_on(codes.device))
        x = self.grouping.merge(groups) * state.tensors["scale"].float().unsqueeze(-1)
        return x.clamp(torch.finfo(state.dtype).min, torch.finfo(state.dtype).max).to(state.dtype)

    def constants(self) -> dict[str, torch.Tensor]:
        return {"codebooks": self.codewords}

    def bits_per_element(self, head_dim: int) -> float:
        groups = head_dim // self.grouping.group
        return (packed_length(groups * self.depth, self.bits) * 8 + 16) / head_dim
