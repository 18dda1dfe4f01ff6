"""Spec models and hook implementations of kvcompress-scalar (torch loads only inside the factories)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from kvcompress import (
    EstimatorMethod, LayerContext, MethodSpec, QuantizerMethod, ReaderMethod, TransformMethod, hookimpl,
)

# Grids with tabulated Lloyd-Max levels (computed in kvcompress_scalar.quantizers).
LLOYD_MAX_BITS = (1, 2, 3, 4)


class ScalarSpec(MethodSpec):
    """Scalar quantization in groups, packed codes plus fp16 per-group parameters.

    grid "minmax" is KIVI's asymmetric quantization (one fp16 scale and one fp16 minimum per group;
    b + 32/group bits per element). grid "lloyd-max" stores each token group's L2 norm (fp16) and
    quantizes the normalized coordinates to the Lloyd-Max levels of N(0, 1) (b + 16/group bits per
    element); use it after the hadamard transform, which makes coordinates near Gaussian.
    """

    method: Literal["scalar"] = "scalar"
    bits: Literal[1, 2, 3, 4, 8] = Field(description="Bits per code.")
    axis: Literal["channel", "token"] = Field(
        "token",
        description=(
            'How groups are formed. "channel": a group is `group` consecutive tokens of one channel (KIVI keys; '
            'tokens are compressed in blocks of `group`). "token": a group is `group` consecutive channels of one '
            "token (KIVI values; every token is compressed on arrival)."
        ),
    )
    group: int = Field(
        32,
        ge=1,
        description='Elements per group. With axis "token" it must divide head_dim.',
    )
    grid: Literal["minmax", "lloyd-max"] = Field(
        "minmax",
        description='"minmax": uniform levels between the group minimum and maximum. "lloyd-max": Gaussian '
        'Lloyd-Max levels scaled by the group norm (axis "token" and bits 1-4 only).',
    )
    norm: Literal["preserve", "input", "least-squares"] | None = Field(
        None,
        description='grid "lloyd-max" only: the fp16 scale each group stores (unset: "preserve"). "preserve": the '
        "decoded group has the input's L2 norm (the nearest levels are shorter than the vector they code: at 2 "
        "bits their squared length is 12 % less, which scales attention logits and value mixes down). "
        '"input": the input\'s L2 norm itself. '
        '"least-squares": the scale that minimizes the group\'s squared error. Same bits for all three.',
    )

    @model_validator(mode="after")
    def _lloyd_max_needs_token_groups(self) -> ScalarSpec:
        if self.grid != "lloyd-max" and self.norm is not None:
            raise ValueError(
                f'`norm` chooses the scale of grid "lloyd-max"; grid "{self.grid}" stores a scale and a minimum '
                "per group instead: remove `norm` or set grid: lloyd-max"
            )
        if self.grid == "lloyd-max":
            if self.axis != "token":
                raise ValueError(
                    'grid "lloyd-max" quantizes the normalized channels of one token group, so it needs '
                    'axis "token" (got axis "channel"); use grid "minmax" for per-channel key groups'
                )
            if self.bits not in LLOYD_MAX_BITS:
                raise ValueError(
                    f'grid "lloyd-max" has levels for bits {", ".join(map(str, LLOYD_MAX_BITS))} '
                    f"(got bits {self.bits}); use grid \"minmax\" for 8 bits"
                )
        return self


class FP8Spec(MethodSpec):
    """fp8 e4m3 storage of every element, with an fp16 scale per token and head (amax / 448).

    8 + 16/head_dim bits per element with scale "token"; 8 with scale "none".
    """

    method: Literal["fp8"] = "fp8"
    scale: Literal["token", "none"] = Field(
        "token",
        description='"token": divide each token of each head by amax/448 (stored fp16) so nothing saturates. '
        '"none": store the values as they are, clamped to the e4m3 range +-448.',
    )


class HadamardSpec(MethodSpec):
    """Randomized Hadamard transform: random +-1 signs, then the normalized Walsh-Hadamard transform.

    Orthogonal, so attention scores are unchanged; it spreads outlier channels so that every coordinate of
    a rotated vector is close to Gaussian. head_dim must be a power of two.
    """

    method: Literal["hadamard"] = "hadamard"
    seed: int = Field(
        0, ge=0, description="Seed of the random signs; each layer derives its own signs from it and its index."
    )


class ScalarEstimatorSpec(MethodSpec):
    """Attention read straight from scalar and fp8 state: group parameters folded into the query or the
    weights, codes widened one token block at a time, never the dequantized keys or values."""

    method: Literal["scalar"] = "scalar"


def make_scalar(spec: ScalarSpec, ctx: LayerContext):
    from kvcompress_scalar.quantizers import LloydMaxQuantizer, MinMaxQuantizer

    if spec.axis == "token" and ctx.head_dim % spec.group:
        raise ValueError(
            f'scalar quantizer: group {spec.group} does not divide head_dim {ctx.head_dim} (axis "token" '
            f"groups channels of one token); set `group` to a divisor of {ctx.head_dim}"
        )
    if spec.grid == "lloyd-max":
        return LloydMaxQuantizer(bits=spec.bits, group=spec.group, norm=spec.norm or "preserve")
    return MinMaxQuantizer(bits=spec.bits, axis=spec.axis, group=spec.group)


def make_fp8(spec: FP8Spec, ctx: LayerContext):
    from kvcompress_scalar.quantizers import FP8Quantizer

    return FP8Quantizer(per_token_scale=spec.scale == "token")


def make_hadamard(spec: HadamardSpec, ctx: LayerContext):
    from kvcompress_scalar.quantizers import HadamardTransform

    return HadamardTransform(head_dim=ctx.head_dim, seed=spec.seed, layer=ctx.layer)


def make_estimator(spec: ScalarEstimatorSpec, ctx: LayerContext):
    from kvcompress_scalar.estimator import ScalarEstimator

    return ScalarEstimator(ctx.quantizer)


def make_fused_reader(codecs, ctx: LayerContext):
    from kvcompress_scalar.reader import FusedScalarReader

    return FusedScalarReader(codecs)


@hookimpl
def kvcompress_quantizers() -> list[QuantizerMethod]:
    return [
        QuantizerMethod(
            name="scalar", spec=ScalarSpec, factory=make_scalar, description=ScalarSpec.__doc__.splitlines()[0],
            estimator="scalar",
        ),
        QuantizerMethod(
            name="fp8", spec=FP8Spec, factory=make_fp8, description=FP8Spec.__doc__.splitlines()[0], estimator="scalar"
        ),
    ]


@hookimpl
def kvcompress_estimators() -> list[EstimatorMethod]:
    return [
        EstimatorMethod(
            name="scalar", spec=ScalarEstimatorSpec, factory=make_estimator,
            description=" ".join(ScalarEstimatorSpec.__doc__.split()), quantizers=frozenset({"scalar", "fp8"}),
        )
    ]


@hookimpl
def kvcompress_transforms() -> list[TransformMethod]:
    return [
        TransformMethod(
            name="hadamard", spec=HadamardSpec, factory=make_hadamard, description=HadamardSpec.__doc__.splitlines()[0]
        )
    ]


@hookimpl
def kvcompress_readers() -> list[ReaderMethod]:
    return [
        ReaderMethod(
            name="scalar-fused", factory=make_fused_reader, keys=frozenset({"scalar", "fp8"}),
            values=frozenset({"scalar", "fp8"}),
            description="fused Triton decode attention over scalar and fp8 keys and values (CUDA)",
        )
    ]
