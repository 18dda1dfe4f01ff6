"""Spec models and hook implementations of kvcompress-rvq (torch loads only inside the factories)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from kvcompress import (
    CodebookMethod, EstimatorMethod, LayerContext, MethodSpec, QuantizerMethod, ReaderMethod, hookimpl,
)


class RVQSpec(MethodSpec):
    """Residual vector quantization: per-vector std scaling, then `depth` codebook levels per channel group.

    Each token of each head is divided by its standard deviation and split into groups of
    `group` channels; each group is coded level by level on the residual with one codebook per level
    (shared by the heads and groups of a layer, separate for keys and values); one fp16 scale per vector
    (`scale`) multiplies the decoded codewords back. Codes are packed at
    log2(codebook_size) bits: (head_dim/group x depth x log2(codebook_size) + 16) / head_dim bits per
    element, rounded up to whole bytes per token. Needs a codebook stage (method kmeans).
    """

    method: Literal["rvq"] = "rvq"
    depth: int = Field(8, ge=1, le=64, description="Residual levels, each with its own codebook.")
    codebook_size: int = Field(
        1024, ge=2, le=65536, description="Codewords per level, a power of two (codes take log2 of it bits)."
    )
    group: int = Field(32, ge=1, description="Channels per group; must divide head_dim.")
    layout: Literal["strided", "contiguous"] = Field(
        "strided",
        description='How channels form groups. "strided": group j holds channels j, j + G, j + 2G, ... '
        '(G = head_dim/group; the paper\'s choice for keys). "contiguous": group j holds channels '
        "j*group .. (j+1)*group - 1 (the paper's choice for values).",
    )
    scale: Literal["std", "preserve"] = Field(
        "std",
        description='The fp16 scale each vector stores. "std": its standard deviation, which the codes were '
        'searched at. "preserve": the scale at which the decoded vector has the input\'s L2 norm (the nearest '
        "codewords are shorter than what they code, the more so the fewer bits per channel: one level of 256 "
        "codewords per 8 channels decodes Gaussian vectors 17 % short, per 16 channels 33 %, two levels per 8 "
        "channels 7 %, which scales attention logits and value mixes down). Same codes, same bits; codebooks "
        "serve both.",
    )

    @field_validator("codebook_size")
    @classmethod
    def _power_of_two(cls, size: int) -> int:
        if size & (size - 1):
            lower = 1 << (size.bit_length() - 1)
            raise ValueError(f"codebook_size must be a power of two (codes are whole bits), got {size}; try {lower} or {lower * 2}")
        return size


class LUTSpec(MethodSpec):
    """Lookup-table attention on rvq state: per query, one dot product with every codeword of every level;
    a key's score is its scale times the sum of its codes' table entries (no key is reconstructed).
    Values are mixed by accumulating weights per codeword, then one product with the codebooks."""

    method: Literal["rvq-lut"] = "rvq-lut"


class KMeansSpec(MethodSpec):
    """Codebooks of an rvq quantizer: loaded from a safetensors file written by `kvcompress calibrate`.

    Learning (by calibrate): k-means level by level on the residuals of a calibration sample, then
    exponential-moving-average updates of all levels over mini-batches (decay, Laplace smoothing eps).
    """

    method: Literal["kmeans"] = "kmeans"
    path: str = Field(
        description="Codebook file (safetensors); a relative path resolves against the spec file's directory, "
        "and `{model}` in it stands for the model's name (smollm2, qwen2.5-coder-1.5b, a local directory's name), "
        "so one spec serves every model. Write it with `kvcompress calibrate SPEC --model MODEL`."
    )
    samples: int = Field(
        16384, ge=1, description="Vectors (tokens x heads) per layer and role that calibration learns from."
    )
    iterations: int = Field(8, ge=0, description="k-means (Lloyd) iterations per level for the initialisation.")
    ema_epochs: int = Field(1, ge=0, description="Passes of EMA updates over the sample after the initialisation.")
    batch: int = Field(1024, ge=1, description="Vectors per EMA mini-batch.")
    decay: float = Field(0.99, gt=0.0, lt=1.0, description="EMA decay of codeword counts and sums.")
    eps: float = Field(1e-5, gt=0.0, description="Laplace smoothing of EMA codeword counts.")
    seed: int = Field(0, ge=0, description="Seed of the sample subset and the k-means initialisation.")

    def relocated(self, source_dir: Path, target_dir: Path) -> KMeansSpec:  # documented by MethodSpec.relocated
        if Path(self.path).is_absolute():
            return self
        moved = os.path.relpath(Path(source_dir).resolve() / self.path, Path(target_dir).resolve())
        return self.model_copy(update={"path": Path(moved).as_posix()})


def make_rvq(spec: RVQSpec, ctx: LayerContext):
    from kvcompress_rvq.quantizer import RVQQuantizer

    return RVQQuantizer.from_spec(spec, ctx)


def make_lut(spec: LUTSpec, ctx: LayerContext):
    from kvcompress_rvq.estimator import LUTEstimator

    return LUTEstimator(ctx.quantizer)


def load_codebooks(spec: KMeansSpec, ctx: LayerContext):
    from kvcompress_rvq.codebooks import load

    return load(spec, ctx)


def learn_codebooks(spec: KMeansSpec, quantizer: RVQSpec, samples, ctx: LayerContext):
    from kvcompress_rvq.codebooks import learn

    return learn(spec, quantizer, samples, ctx)


def _summary(doc: str | None) -> str:
    return " ".join((doc or "").split("\n\n")[0].split())


def make_fused_reader(codecs, ctx: LayerContext):
    from kvcompress_rvq.reader import FusedRVQReader

    return FusedRVQReader(codecs)


@hookimpl
def kvcompress_quantizers() -> list[QuantizerMethod]:
    return [
        QuantizerMethod(name="rvq", spec=RVQSpec, factory=make_rvq, description=_summary(RVQSpec.__doc__), needs_codebook=True)
    ]


@hookimpl
def kvcompress_estimators() -> list[EstimatorMethod]:
    return [
        EstimatorMethod(
            name="rvq-lut", spec=LUTSpec, factory=make_lut, description=_summary(LUTSpec.__doc__),
            quantizers=frozenset({"rvq"}),
        )
    ]


@hookimpl
def kvcompress_codebooks() -> list[CodebookMethod]:
    return [
        CodebookMethod(
            name="kmeans", spec=KMeansSpec, factory=load_codebooks, description=_summary(KMeansSpec.__doc__),
            quantizers=frozenset({"rvq"}), learn=learn_codebooks,
        )
    ]


@hookimpl
def kvcompress_readers() -> list[ReaderMethod]:
    return [
        ReaderMethod(
            name="rvq-fused", factory=make_fused_reader, keys=frozenset({"rvq"}), values=frozenset({"rvq"}),
            description="fused Triton decode attention over RVQ keys and values through lookup tables (CUDA)",
        )
    ]
