"""Methods the core provides itself: the decode estimator and the float (uncompressed) quantizer.

This module holds their specs and hook implementations and imports no torch; the objects the factories
build are in kvcompress.builtin_runtime.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kvcompress.hookspecs import hookimpl
from kvcompress.methods import EstimatorMethod, LayerContext, QuantizerMethod
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
