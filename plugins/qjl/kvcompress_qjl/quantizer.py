"""The QJL key quantizer: packed sign bits of a per-layer sketch, fp16 norms, uint8 outlier channel indices."""

from __future__ import annotations

import torch

from kvcompress import LayerContext, PackedState, Quantizer
from kvcompress_qjl.kernels import QJLCodes, group_channel_mask, outlier_channels, qjl_quantize, unpack_signs

from kvcompress_qjl.plugin import QJLSpec, sketch_rows
from kvcompress_qjl.sketch import estimator_scale, make_sketch, sketch_seed


class QJLQuantizer(Quantizer):
    """Keys as sign(S k) (m bits) plus ||k|| in fp16; with outliers, per group of tokens and head the `outliers`
    channels of largest norm are split off: k = k_in + k_out, sign(S k_in) and sign(S' k_out) (S' = the first m'
    rows of S), both norms in fp16 and the channel indices in uint8.

    State tensors, each [batch, kv_heads, rows, ...]:
      signs uint8 [b, h, t, m/8]; norm fp16 [b, h, t] (of k_in, which is k without outliers);
      with outliers also outlier_index uint8 [b, h, t/group, outliers], outlier_signs uint8 [b, h, t, m'/8],
      outlier_norm fp16 [b, h, t].
    Storing ||k_in|| rather than ||k|| (the reference) costs the same 16 bits and avoids recovering it as
    sqrt(||k||^2 - ||k_out||^2), which cancels badly in fp16 when outliers hold most of the norm.
    """

    def __init__(
        self,
        head_dim: int,
        sketch_dim: int,
        outliers: int,
        outlier_sketch_dim: int,
        group: int,
        sketch: torch.Tensor,
        scale: float,
    ):
        self.head_dim = head_dim
        self.sketch_dim = sketch_dim
        self.outliers = outliers
        self.outlier_sketch_dim = outlier_sketch_dim
        self.group = group
        self.sketch = sketch
        self.scale = scale
        self.token_block = group if outliers else 1
        self._sketch_on: dict[torch.device, torch.Tensor] = {}

    @classmethod
    def from_spec(cls, spec: QJLSpec, ctx: LayerContext) -> QJLQuantizer:
        d = ctx.head_dim
        m = sketch_rows(spec.sketch_dim, d) if spec.sketch_dim is not None else 2 * d
        m_out = sketch_rows(spec.outlier_sketch_dim, d) if spec.outlier_sketch_dim is not None else m
        where = f"layer {ctx.layer} {ctx.role} (qjl)"
        if m > 8192:
            raise ValueError(f"{where}: sketch_dim {spec.sketch_dim} is {m} rows at head_dim {d}, over 8192; lower it")
        if spec.outliers:
            if spec.outliers >= d:
                raise ValueError(f"{where}: outliers ({spec.outliers}) must be below head_dim ({d}); lower it")
            if d > 256:
                raise ValueError(f"{where}: outlier indices are uint8, so head_dim must be <= 256 (got {d}); set outliers: 0")
            if m_out > m:
                raise ValueError(
                    f"{where}: outlier_sketch_dim ({m_out}) uses the first rows of the sketch, so it can be at most "
                    f"sketch_dim ({m}); lower it or raise sketch_dim"
                )
        seed = sketch_seed(spec.seed, ctx.layer, ctx.role)
        return cls(
            head_dim=d,
            sketch_dim=m,
            outliers=spec.outliers,
            outlier_sketch_dim=m_out if spec.outliers else 0,
            group=spec.group,
            sketch=make_sketch(d, m, spec.sketch, seed),
            scale=estimator_scale(spec.sketch, d),
        )

    def sketch_on(self, device: torch.device) -> torch.Tensor:
        """The sketch on `device`, copied once per device."""
        if device not in self._sketch_on:
            self._sketch_on[device] = self.sketch.to(device)
        return self._sketch_on[device]

    def encode(self, x: torch.Tensor) -> PackedState:
        if x.dim() != 4 or x.shape[-1] != self.head_dim:
            raise ValueError(f"qjl: keys must be [batch, kv_heads, tokens, {self.head_dim}], got {tuple(x.shape)}")
        index = outlier_channels(x, self.outliers, self.group) if self.outliers else None
        codes = qjl_quantize(x, self.sketch_on(x.device), index, self.group, self.outlier_sketch_dim)
        tensors = {"signs": codes.signs, "norm": codes.norm}
        if index is not None:
            tensors.update(outlier_index=index, outlier_signs=codes.outlier_signs, outlier_norm=codes.outlier_norm)
        return PackedState(tensors=tensors, tokens=x.shape[2], head_dim=self.head_dim, dtype=x.dtype)

    def codes(self, state: PackedState) -> tuple[QJLCodes, torch.Tensor | None]:
        """The state's tensors as the kernels take them: packed codes and outlier indices (None without)."""
        t = state.tensors
        codes = QJLCodes(t["signs"], t["norm"], t.get("outlier_signs"), t.get("outlier_norm"))
        return codes, t.get("outlier_index")

    def decode(self, state: PackedState) -> torch.Tensor:
        """The keys the estimator implicitly uses: k_hat = scale/m * ||k_in|| * S^T sign(S k_in) on inlier channels,
        scale/m' * ||k_out|| * S'^T sign(S' k_out) on outlier channels; <q, k_hat> equals the QJL score."""
        codes, index = self.codes(state)
        sketch = self.sketch_on(codes.signs.device)
        m = self.sketch_dim
        keys = unpack_signs(codes.signs, m) @ sketch * (self.scale / m * codes.norm.float().unsqueeze(-1))
        if index is not None:
            m_out = self.outlier_sketch_dim
            out = unpack_signs(codes.outlier_signs, m_out) @ sketch[:m_out]
            out = out * (self.scale / m_out * codes.outlier_norm.float().unsqueeze(-1))
            mask = group_channel_mask(index, self.head_dim).repeat_interleave(self.group, dim=2)
            keys = torch.where(mask, out, keys)
        return keys.to(state.dtype)

    def constants(self) -> dict[str, torch.Tensor]:
        return {"sketch": self.sketch}

    def bits_per_element(self, head_dim: int) -> float:
        """m sign bits + 16 (norm) per token; with outliers also m' bits + 16 (outlier norm) per token and
        8 bits per outlier index per group of tokens."""
        bits = self.sketch_dim + 16
        if self.outliers:
            bits += self.outlier_sketch_dim + 16 + self.outliers * 8 / self.group
        return bits / head_dim
