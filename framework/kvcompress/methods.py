"""Descriptors that plugins return from the collector hooks, and the context factories receive.

Plugins import only this module, kvcompress.runtime, kvcompress.state and kvcompress.spec_base;
never transformers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

from kvcompress.spec_base import MethodSpec

Role = Literal["keys", "values"]
ROLES: tuple[Role, ...] = ("keys", "values")
# What a pruner can ask the cache to capture: the fields of kvcompress.runtime.Observation.
OBSERVABLES: tuple[str, ...] = ("queries", "pre_rope_keys")


@dataclass(frozen=True)
class LayerContext:
    """What a factory knows about the place its object will serve.

    layer: model layer index; num_layers: layers in the model; role: "keys" or "values";
    head_dim, kv_heads: the cache tensor shape; codebook: what the pipeline's codebook stage
    provided for this layer and role (None without one); quantizer: the role's quantizer, for the
    estimator's factory, which binds to it (None for the other stages); spec_dir: directory of the spec file,
    for resolving relative paths (None for specs built in code); model: a model identifier
    (None when no model is known, as in `kvcompress demo` on random tensors).
    """

    layer: int
    num_layers: int
    role: Role
    head_dim: int
    kv_heads: int
    codebook: Any = None
    quantizer: Any = None
    spec_dir: str | None = None
    model: str | None = None


@dataclass(frozen=True)
class QuantizerMethod:
    """A cache quantizer: factory(spec, ctx) -> kvcompress.runtime.Quantizer.

    roles: which of keys/values it may quantize. needs_codebook: the pipeline must name a codebook
    stage. description: one line for `kvcompress methods`. estimator: the estimator method that reads its
    state fastest, which a pipeline naming no estimator stage uses (None: decode).
    """

    name: str
    spec: type[MethodSpec]
    factory: Callable[[Any, LayerContext], Any]
    description: str = ""
    roles: frozenset[str] = frozenset({"keys", "values"})
    needs_codebook: bool = False
    estimator: str | None = None


@dataclass(frozen=True)
class EstimatorMethod:
    """An attention estimator: factory(spec, ctx) -> kvcompress.runtime.Estimator, bound to ctx.quantizer.

    quantizers: the quantizer methods whose state it reads (empty: any quantizer, via decode).
    """

    name: str
    spec: type[MethodSpec]
    factory: Callable[[Any, LayerContext], Any]
    description: str = ""
    quantizers: frozenset[str] = frozenset()
    roles: frozenset[str] = frozenset({"keys", "values"})


@dataclass(frozen=True)
class CodebookMethod:
    """A codebook source/learner for quantizers that need learned constants.

    factory(spec, ctx) -> the object handed to the quantizer as ctx.codebook.
    learn(spec, quantizer_spec, samples, ctx) -> dict[str, Tensor]: codebook tensors for one layer and
    role learned from samples [N, head_dim] (None: this method only loads).
    quantizers: the quantizer methods it serves.
    """

    name: str
    spec: type[MethodSpec]
    factory: Callable[[Any, LayerContext], Any]
    description: str = ""
    quantizers: frozenset[str] = frozenset()
    learn: Callable[..., Any] | None = None


@dataclass(frozen=True)
class TransformMethod:
    """An orthogonal transform applied before quantization: factory(spec, ctx) -> Transform."""

    name: str
    spec: type[MethodSpec]
    factory: Callable[[Any, LayerContext], Any]
    description: str = ""
    roles: frozenset[str] = frozenset({"keys", "values"})


@dataclass(frozen=True)
class PrunerMethod:
    """A channel pruner that runs before the other stages: factory(spec, ctx) -> kvcompress.runtime.ChannelPruner.

    observes: what select() reads from the Observation (names in OBSERVABLES); the cache
    captures those during the forward and compresses at its end. The later stages of the pipeline are built
    for the kept channels: their LayerContext.head_dim is the pruner's `kept`.
    """

    name: str
    spec: type[MethodSpec]
    factory: Callable[[Any, LayerContext], Any]
    description: str = ""
    roles: frozenset[str] = frozenset({"keys", "values"})
    observes: frozenset[str] = frozenset()


# Pipeline stages in the order they run on the tokens to store.
STAGES: dict[str, type] = {
    "pruner": PrunerMethod,
    "transform": TransformMethod,
    "quantizer": QuantizerMethod,
    "estimator": EstimatorMethod,
    "codebook": CodebookMethod,
}

# Methods this project ships, so an unknown name can say which package to install.
KNOWN_PROVIDERS: dict[str, str] = {
    "scalar": "kvcompress-scalar",
    "fp8": "kvcompress-scalar",
    "hadamard": "kvcompress-scalar",
    "qjl": "kvcompress-qjl",
    "rvq": "kvcompress-rvq",
    "rvq-lut": "kvcompress-rvq",
    "kmeans": "kvcompress-rvq",
    "think": "kvcompress-prune",
}

__all__ = [
    "CodebookMethod",
    "EstimatorMethod",
    "KNOWN_PROVIDERS",
    "LayerContext",
    "OBSERVABLES",
    "PrunerMethod",
    "QuantizerMethod",
    "ROLES",
    "Role",
    "STAGES",
    "TransformMethod",
]
