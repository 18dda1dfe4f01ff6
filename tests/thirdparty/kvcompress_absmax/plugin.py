"""Hook implementations of the example plugin: spec model and descriptor only (no torch here)."""

from typing import Literal

from pydantic import Field

from kvcompress import LayerContext, MethodSpec, ModelAdapter, PrunerMethod, QuantizerMethod, hookimpl


class AbsmaxSpec(MethodSpec):
    """4-bit symmetric quantization per token, one fp16 scale per token and head."""

    method: Literal["absmax"] = "absmax"
    bits: Literal[4, 8] = Field(4, description="Bits per code.")


def make_absmax(spec: AbsmaxSpec, ctx: LayerContext):
    from kvcompress_absmax.quantizer import AbsmaxQuantizer

    return AbsmaxQuantizer(spec.bits)


class KeyNormSpec(MethodSpec):
    """Keep the key channels with the largest energy before RoPE."""

    method: Literal["keynorm"] = "keynorm"
    keep: int = Field(ge=1, description="Channels kept per KV head.")


def make_keynorm(spec: KeyNormSpec, ctx: LayerContext):
    from kvcompress_absmax.pruner import KeyNormPruner

    if spec.keep > ctx.head_dim:
        raise ValueError(f"keynorm: keep {spec.keep} is more than head_dim {ctx.head_dim}")
    return KeyNormPruner(ctx.head_dim, spec.keep)


@hookimpl
def kvcompress_pruners():
    return [PrunerMethod(name="keynorm", spec=KeyNormSpec, factory=make_keynorm, description=KeyNormSpec.__doc__,
                         roles=frozenset({"keys"}), observes=frozenset({"pre_rope_keys"}))]


@hookimpl
def kvcompress_quantizers():
    return [QuantizerMethod(name="absmax", spec=AbsmaxSpec, factory=make_absmax, description=AbsmaxSpec.__doc__)]


def load_neox():
    from kvcompress_absmax.neox import GPTNeoXAdapter

    return GPTNeoXAdapter()


@hookimpl
def kvcompress_model_adapters():
    return [ModelAdapter(name="gpt-neox", model_types=frozenset({"gpt_neox"}), load=load_neox,
                         description="GPT-NeoX: keys sliced from the fused query_key_value projection")]
