"""Hook implementations of the example plugin: spec model and descriptor only (no torch here)."""

from typing import Literal

from pydantic import Field

from kvcompress import LayerContext, MethodSpec, QuantizerMethod, hookimpl


class AbsmaxSpec(MethodSpec):
    """4-bit symmetric quantization per token, one fp16 scale per token and head."""

    method: Literal["absmax"] = "absmax"
    bits: Literal[4, 8] = Field(4, description="Bits per code.")


def make_absmax(spec: AbsmaxSpec, ctx: LayerContext):
    from kvcompress_absmax.quantizer import AbsmaxQuantizer

    return AbsmaxQuantizer(spec.bits)


@hookimpl
def kvcompress_quantizers():
    return [QuantizerMethod(name="absmax", spec=AbsmaxSpec, factory=make_absmax, description=AbsmaxSpec.__doc__)]
