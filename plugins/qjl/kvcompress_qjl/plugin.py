"""Hook implementations of kvcompress-qjl: spec models and descriptors only (torch loads in the factories)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from kvcompress import EstimatorMethod, LayerContext, MethodSpec, QuantizerMethod, ReaderMethod, hookimpl


# Sketch rows as a count (a multiple of 8) or as a multiple of the head dimension ("4x"), so one spec sizes its
# sketches alike at head_dim 64, 128 and 256.
SketchRows = Annotated[int, Field(ge=8, le=8192, multiple_of=8)] | Annotated[str, Field(pattern=r"^[1-9][0-9]*x$")]


def sketch_rows(value: int | str, head_dim: int) -> int:
    """Rows of a sketch given as a count or as "Nx" (N x head_dim)."""
    if isinstance(value, str):
        return int(value[:-1]) * head_dim
    return value


class QJLSpec(MethodSpec):
    """QJL keys (arXiv 2406.03482): sign bits of a random sketch of each key plus its fp16 norm; per group of
    tokens and head, the largest-norm channels are split off and sketched on their own."""

    method: Literal["qjl"] = "qjl"
    sketch_dim: SketchRows | None = Field(
        None,
        description="Sketch rows m, i.e. sign bits per key: a multiple of 8, at most 8192 (the sketch matrix is m x "
        "head_dim floats per layer), or `Nx` for N x head_dim (`4x`: 256 rows at head_dim 64, 1024 at 256). "
        "Default: 2 x head_dim, as in the reference. Give a larger sketch to some layers with the spec's `layers` "
        "overrides.",
    )
    outliers: int = Field(
        8, ge=0,
        description="Outlier channels split off per group of tokens and head (0: none, and no token grouping).",
    )
    outlier_sketch_dim: SketchRows | None = Field(
        None,
        description="Rows m' of the outlier sketch (the first m' rows of the sketch; a multiple of 8 or `Nx` as for "
        "sketch_dim, at most sketch_dim). Default: sketch_dim.",
    )
    group: int = Field(
        32, ge=1,
        description="Tokens per outlier group; with outliers, keys stay in full precision until a group is full.",
    )
    sketch: Literal["orthogonal", "gaussian"] = Field(
        "orthogonal",
        description="orthogonal: Gaussian blocks of head_dim rows orthogonalised by QR, rows scaled to norm "
        "sqrt(head_dim) (the reference); gaussian: i.i.d. N(0, 1) entries (the paper's analysis).",
    )
    seed: int = Field(
        0, ge=0,
        description="Seed of the sketches; each layer's sketch is drawn from (seed, layer), the same in every process.",
    )

    @model_validator(mode="after")
    def _outlier_sketch_fits(self) -> QJLSpec:
        # comparable before head_dim is known when both are counts or both multiples; else checked when built
        given = (self.sketch_dim, self.outlier_sketch_dim)
        if None not in given and isinstance(given[0], str) == isinstance(given[1], str):
            if sketch_rows(given[1], 1) > sketch_rows(given[0], 1):
                raise ValueError(
                    f"outlier_sketch_dim ({given[1]}) uses the first rows of the sketch, so it can be at "
                    f"most sketch_dim ({given[0]}): lower it or raise sketch_dim"
                )
        return self


class QJLEstimatorSpec(MethodSpec):
    """Attention scores of QJL keys computed in sketch space, sqrt(pi/2)/m * ||k|| * <S q, sign(S k)>, without
    reconstructing keys."""

    method: Literal["qjl"] = "qjl"


def make_quantizer(spec: QJLSpec, ctx: LayerContext):
    from kvcompress_qjl.quantizer import QJLQuantizer

    return QJLQuantizer.from_spec(spec, ctx)


def make_estimator(spec: QJLEstimatorSpec, ctx: LayerContext):
    from kvcompress_qjl.estimator import QJLEstimator

    return QJLEstimator(ctx.quantizer)


def make_fused_reader(codecs, ctx: LayerContext):
    from kvcompress_qjl.reader import FusedQJLReader

    return FusedQJLReader(codecs)


@hookimpl
def kvcompress_quantizers() -> list[QuantizerMethod]:
    return [
        QuantizerMethod(
            name="qjl", spec=QJLSpec, factory=make_quantizer, description=" ".join(QJLSpec.__doc__.split()),
            roles=frozenset({"keys"}),
        )
    ]


@hookimpl
def kvcompress_estimators() -> list[EstimatorMethod]:
    return [
        EstimatorMethod(
            name="qjl", spec=QJLEstimatorSpec, factory=make_estimator,
            description=" ".join(QJLEstimatorSpec.__doc__.split()),
            quantizers=frozenset({"qjl"}), roles=frozenset({"keys"}),
        )
    ]


@hookimpl
def kvcompress_readers() -> list[ReaderMethod]:
    # the values' method names are the scalar plugin's: named here, never imported (their state is read through
    # kvcompress_kernels.decode)
    return [
        ReaderMethod(
            name="qjl-fused", factory=make_fused_reader, keys=frozenset({"qjl"}), values=frozenset({"scalar", "fp8"}),
            description="fused Triton decode attention over QJL keys and scalar or fp8 values (CUDA)",
        )
    ]
