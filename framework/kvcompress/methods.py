"""Descriptors that plugins return from the collector hooks, and the context factories receive.

Plugins import only this module, kvcompress.runtime, kvcompress.state and kvcompress.spec_base;
never transformers. The one exception is the module behind a ModelAdapter's `load`, which knows a
transformers architecture and may import transformers and kvcompress.hf (it loads only when such a model
is patched).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from kvcompress.spec_base import MethodSpec

Role = Literal["keys", "values"]
ROLES: tuple[Role, ...] = ("keys", "values")
# What a pruner can ask the cache to capture: the fields of kvcompress.runtime.Observation.
OBSERVABLES: tuple[str, ...] = ("queries", "pre_rope_keys")
# The embedded model `kvcompress eval` and `calibrate` run by default (kvcompress.hf.loading.EMBEDDED).
DEFAULT_MODEL = "smollm2"
# In a file path of a spec (a codebook file), the name of the model the cache is built for.
MODEL_PLACEHOLDER = "{model}"


def short_model_name(identifier: str) -> str:
    """A model identifier's last part: an embedded model's name such as "smollm2", or a local model directory's
    name, the same on every machine (whole paths differ between machines and users)."""
    return Path(identifier.rstrip("/")).name


@dataclass(frozen=True)
class LayerContext:
    """What a factory knows about the place its object will serve.

    layer: model layer index; num_layers: layers in the model; role: "keys" or "values";
    head_dim, kv_heads: the cache tensor shape; codebook: what the pipeline's codebook stage
    provided for this layer and role (None without one); quantizer: the role's quantizer, for the
    estimator's factory, which binds to it (None for the other stages); transform: the pipeline's transform
    spec, for the codebook stage, which learns and must be used in the space the transform maps to (None
    without one); spec_dir: directory of the spec file, for resolving relative paths (None for specs built in
    code); model: a model identifier (None when no model is known, as in `kvcompress roundtrip` on random tensors).
    """

    layer: int
    num_layers: int
    role: Role
    head_dim: int
    kv_heads: int
    codebook: Any = None
    quantizer: Any = None
    transform: Any = None
    spec_dir: str | None = None
    model: str | None = None

    def model_name(self) -> str:
        """The model's short name (short_model_name), the default model's where no model is known (codecs on
        random tensors read the default model's codebooks)."""
        return short_model_name(self.model) if self.model else DEFAULT_MODEL

    def resolve_path(self, path: str) -> Path:
        """A spec's file path for this context: `{model}` replaced by model_name() (so one spec serves every
        model), then a relative path taken from the spec file's directory (the working directory without one)."""
        found = Path(path.replace(MODEL_PLACEHOLDER, self.model_name())).expanduser()
        if not found.is_absolute() and self.spec_dir is not None:
            found = Path(self.spec_dir) / found
        return found


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


@dataclass(frozen=True)
class EvictorMethod:
    """A token evictor for a whole layer: factory(spec, ctx) -> kvcompress.runtime.Evictor. Its spec model
    subclasses kvcompress.spec_base.EvictionSpec (keep or budget, every).

    observes: what the evictor reads from the model besides the layer's keys (names in OBSERVABLES); the
    cache captures it only for layers that evict. ctx is the layer's keys context (role "keys").
    """

    name: str
    spec: type[MethodSpec]
    factory: Callable[[Any, LayerContext], Any]
    description: str = ""
    observes: frozenset[str] = frozenset()


@dataclass(frozen=True)
class ModelAdapter:
    """How kvcompress.patch handles an architecture: the only plugin code that knows transformers models.

    model_types: the `model_type` values of the (text) configs it handles, e.g. {"llama", "mistral"}; each
    model type has one adapter across every installed plugin.
    load() -> the adapter object. It is called when a model of one of those types is patched, so the module
    that implements the object (and imports torch and transformers) loads only then; a plugin's hook module
    names it without importing it. The object has (kvcompress.hf.adapters.Adapter is a base class giving
    defaults for all but pre_rope_keys):

        attention_modules(model, geometry) -> [module]    the attention module of each layer, in layer order
        pre_rope_keys(module) -> (submodule, read) | None  where the keys before RoPE can be captured: a forward
            hook on `submodule` calls read(module, output, head_dim) -> [batch, kv_heads, tokens, head_dim];
            None when this architecture cannot show them (specs observing pre_rope_keys are then refused)
        apply_rope(model, layer, keys, positions) -> keys  rotate pre-RoPE keys [batch, kv_heads, tokens,
            head_dim] at absolute positions ([tokens] or [batch, tokens]) as the model does before its cache
        unsupported_kwargs: {name: what it is}            attention kwargs whose math kvcompress lacks

    description: one line for `kvcompress plugins`.
    """

    name: str
    model_types: frozenset[str]
    load: Callable[[], Any]
    description: str = ""


@dataclass(frozen=True)
class ReaderMethod:
    """A layer-level reader: factory(codecs, ctx) -> kvcompress.runtime.Reader, for layers whose keys and values
    are stored by the named quantizer methods (the pair a fused kernel reads in one pass).

    keys / values: the quantizer methods it reads (a layer uses it only when both match; empty: any).
    The cache picks, per layer, the first installed reader that matches; otherwise the default reader, which
    goes through the keys' and values' estimators. ctx is the keys' LayerContext.
    """

    name: str
    factory: Callable[[Any, LayerContext], Any]
    keys: frozenset[str] = frozenset()
    values: frozenset[str] = frozenset()
    description: str = ""

    def reads(self, keys: str, values: str) -> bool:
        return (not self.keys or keys in self.keys) and (not self.values or values in self.values)


@dataclass(frozen=True)
class Stage:
    """One stage of a pipeline: its name (the field of a spec's keys/values pipeline), the descriptor class
    its methods are, and the collector hook of kvcompress.hookspecs that returns them."""

    name: str
    descriptor: type
    hook: str


# The pipeline stages, in the order they run on the tokens to store: the one list of them. The registry,
# the spec models, the CLI and docs/specs.md follow it, and tests hold kvcompress.hookspecs and the
# explicit fields of kvcompress.spec.PipelineSpec equal to it.
STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage("pruner", PrunerMethod, "kvcompress_pruners"),
        Stage("transform", TransformMethod, "kvcompress_transforms"),
        Stage("quantizer", QuantizerMethod, "kvcompress_quantizers"),
        Stage("estimator", EstimatorMethod, "kvcompress_estimators"),
        Stage("codebook", CodebookMethod, "kvcompress_codebooks"),
    )
}

# The layer-level stage: which tokens a layer keeps (the spec's `evict` field, beside the pipelines).
EVICTION = Stage("evict", EvictorMethod, "kvcompress_evictors")
# Every kind of method the registry collects and spec files name: the pipeline stages, then eviction.
METHOD_KINDS: dict[str, Stage] = {**STAGES, EVICTION.name: EVICTION}

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
    "streaming": "kvcompress-prune",
    "snapkv": "kvcompress-prune",
    "knorm": "kvcompress-prune",
    "tova": "kvcompress-prune",
}

__all__ = [
    "CodebookMethod",
    "EVICTION",
    "EstimatorMethod",
    "EvictorMethod",
    "KNOWN_PROVIDERS",
    "LayerContext",
    "METHOD_KINDS",
    "ModelAdapter",
    "OBSERVABLES",
    "PrunerMethod",
    "QuantizerMethod",
    "ROLES",
    "ReaderMethod",
    "Role",
    "STAGES",
    "Stage",
    "TransformMethod",
]
