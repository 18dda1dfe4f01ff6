"""What the core provides itself: the decode estimator, the float (uncompressed) quantizer, and the model
adapter for the architectures kvcompress is tested on (kvcompress.hf.adapters, loaded when a model is patched).

This module holds their specs and hook implementations and imports no torch; the objects the factories
build are in kvcompress.builtin_runtime.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kvcompress.hookspecs import hookimpl
from kvcompress.methods import EstimatorMethod, LayerContext, ModelAdapter, QuantizerMethod
from kvcompress.spec_base import MethodSpec


class DecodeSpec(MethodSpec):
    """Decode the packed state to floats, then an ordinary matmul. Works with every quantizer."""

    method: Literal["decode"] = "decode"


class FloatSpec(MethodSpec):
    """Store tokens as plain floating point: a reference point, and a way to compress only one role."""

    method: Literal["float"] = "float"
    dtype: Literal["float16", "bfloat16", "float32"] = Field("float16", description="Storage dtype.")


def _make_decode(spec: DecodeSpec, ctx: LayerContext):
    from kvcompress.builtin_runtime import DecodeEstimator

    return DecodeEstimator(ctx.quantizer)


def _make_float(spec: FloatSpec, ctx: LayerContext):
    from kvcompress.builtin_runtime import FloatQuantizer

    return FloatQuantizer(spec.dtype)


@hookimpl
def kvcompress_estimators() -> list[EstimatorMethod]:
    return [EstimatorMethod(name="decode", spec=DecodeSpec, factory=_make_decode, description=DecodeSpec.__doc__)]


@hookimpl
def kvcompress_quantizers() -> list[QuantizerMethod]:
    return [QuantizerMethod(name="float", spec=FloatSpec, factory=_make_float, description=FloatSpec.__doc__)]


def _load_separate_projection_adapter():
    from kvcompress.hf.adapters import SeparateProjectionAdapter

    return SeparateProjectionAdapter()


@hookimpl
def kvcompress_model_adapters() -> list[ModelAdapter]:
    return [
        ModelAdapter(
            name="separate-projections",
            model_types=frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text"}),
            load=_load_separate_projection_adapter,
            description="decoders with a separate k_proj (and optional k_norm) and a rotary_emb module",
        )
    ]
