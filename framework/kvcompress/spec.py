"""Spec files: a validated composition of methods for the keys and values of every layer.

The static models below type every stage with MethodSpec; validation goes through a model built from
the registry, in which each stage is the discriminated union (on `method`) of the installed methods'
spec models. Fields typed with the base serialize as their concrete class (SerializeAsAny), so a
loaded spec dumps back to the same content.
"""

from __future__ import annotations

import json
import tomllib
import typing
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SerializeAsAny, ValidationError, create_model, field_validator

from kvcompress.errors import SpecError
from kvcompress.methods import EVICTION, METHOD_KINDS, ROLES, STAGES
from kvcompress.plugins import Registry, get_registry, unknown_method_message
from kvcompress.spec_base import EvictionSpec, MethodSpec

SPEC_SUFFIXES = {".yaml": "yaml", ".yml": "yaml", ".toml": "toml", ".json": "json"}
# Bounds on what a spec file may ask of the reader, so a hostile file fails fast: spec files are a few KiB.
MAX_SPEC_BYTES = 1 << 20
MAX_SPEC_NODES = 100_000  # values after YAML aliases are expanded (an alias bomb reaches this at once)
MAX_SPEC_DEPTH = 32
MAX_OVERRIDES = 1024
EXCERPT_CHARS = 80


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


# `center: auto` centers a (sequence, KV head) when centering leaves less than this fraction of its energy
# (sum of squares): Qwen2.5's offset-dominated key layers leave 0.00-0.08, every other layer of SmolLM2,
# Gemma-3 and Qwen2.5 measured leaves 0.23-0.95.
AUTO_CENTER = 0.15
CenterChoice = bool | Literal["auto"]

# The fields of PipelineSpec and PipelineOverride are kvcompress.methods.STAGES, in order, then `center` (a
# switch, not a stage): spelled out so that each has its description in the schema and docs/specs.md
# (tests/test_spec.py holds them equal).
CENTER_DESCRIPTION = (
    "Subtract each sequence's per-channel center (per KV head: the median over the first tokens the layer "
    "compresses, which an attention sink's outliers do not pull) before the stages, and add it back when reading: "
    "exact, attention adds query . center to the scores and the center to the mixed values. Keys with a large "
    "constant offset (a k_proj bias, as in Qwen2.5) then spend their bits on what varies from token to token. "
    "true: always; auto: only the (sequence, head)s whose offset holds most of the energy (what remains after "
    f"centering is under {AUTO_CENTER:g} of it), the others keep a zero center. Costs one float32 vector per "
    "sequence and KV head."
)
class PipelineSpec(_Strict):
    """How one role (keys or values) is compressed: the stages run in this order."""

    pruner: SerializeAsAny[MethodSpec] | None = Field(
        None,
        description="Channel pruner: stores only the channels it selects (queries are read through the same ones); "
        "the later stages work on the kept channels.",
    )
    transform: SerializeAsAny[MethodSpec] | None = Field(
        None, description="Orthogonal transform applied before quantization (queries get it too)."
    )
    quantizer: SerializeAsAny[MethodSpec] = Field(description="The cache quantizer that packs tokens.")
    estimator: SerializeAsAny[MethodSpec] | None = Field(
        None, description="How attention reads the packed state; default: the quantizer's own estimator where it declares one, else decode, then matmul."
    )
    codebook: SerializeAsAny[MethodSpec] | None = Field(
        None, description="Learned constants for quantizers that need them (file source or learner)."
    )
    center: CenterChoice = Field(False, description=CENTER_DESCRIPTION)


class PipelineOverride(_Strict):
    """Stages to replace for some layers; stages left out keep the spec's top-level choice."""

    pruner: SerializeAsAny[MethodSpec] | None = None
    transform: SerializeAsAny[MethodSpec] | None = None
    quantizer: SerializeAsAny[MethodSpec] | None = None
    estimator: SerializeAsAny[MethodSpec] | None = None
    codebook: SerializeAsAny[MethodSpec] | None = None
    center: CenterChoice | None = Field(None, description=CENTER_DESCRIPTION)


EVICT_DESCRIPTION = (
    "Token eviction: which tokens each layer keeps (an evictor from kvcompress-prune or another plugin), with "
    "its budget (`keep` or `budget`) and when it runs (`every`). Evicted tokens leave memory."
)


class LayerOverride(_Strict):
    """Per-layer changes: window, sinks, eviction, or stages of the keys/values pipelines."""

    window: int | None = Field(None, ge=0, description="Full-precision recent tokens for these layers.")
    sinks: int | None = Field(None, ge=0, description="Full-precision first tokens for these layers.")
    evict: SerializeAsAny[EvictionSpec] | None = Field(None, description="Eviction for these layers (replaces the top-level one).")
    keys: PipelineOverride | None = Field(None, description="Stages replaced for keys in these layers.")
    values: PipelineOverride | None = Field(None, description="Stages replaced for values in these layers.")


class LayerPlan(_Strict):
    """The resolved spec of one layer."""

    window: int
    sinks: int
    keys: SerializeAsAny[PipelineSpec]
    values: SerializeAsAny[PipelineSpec]
    evict: SerializeAsAny[EvictionSpec] | None = None


class CacheSpec(_Strict):
    """A kvcompress spec: what each layer's KV cache stores and how attention reads it."""

    name: str = Field(description="Name shown in tables and JSON results.")
    description: str = Field("", description="Free text.")
    window: int = Field(0, ge=0, description="Most recent tokens kept in full precision.")
    sinks: int = Field(0, ge=0, description="First tokens (attention sinks) kept in full precision.")
    compress_run: int = Field(
        16, ge=1,
        description="Tokens beyond the window are compressed in runs of this many (rounded up to a multiple of the "
        "methods' token blocks): one encode per run instead of one per decoded token. The window then holds "
        "between `window` and `window + run - 1` tokens in full precision.",
    )
    keys: SerializeAsAny[PipelineSpec] = Field(description="How keys are compressed and read.")
    values: SerializeAsAny[PipelineSpec] = Field(description="How values are compressed and read.")
    evict: SerializeAsAny[EvictionSpec] | None = Field(None, description=EVICT_DESCRIPTION)
    layers: dict[str, SerializeAsAny[LayerOverride]] = Field(
        default_factory=dict, max_length=MAX_OVERRIDES,
        description='Per-layer overrides keyed by layer selections: "3", "0-1", "0,2,5-7". Selections may not overlap.',
    )
    _source: str | None = PrivateAttr(None)

    @field_validator("layers")
    @classmethod
    def _selections_disjoint(cls, layers: dict[str, Any]) -> dict[str, Any]:
        spans = sorted((r.start, r.stop, key) for key in layers for r in parse_layer_selection(key))
        for (_, stop, first), (start, _, second) in zip(spans, spans[1:]):
            if start < stop:
                raise ValueError(f"layer {start} is selected by both {first!r} and {second!r}")
        return layers

    @property
    def source(self) -> str | None:
        """The file this spec was loaded from, if any."""
        return self._source

    def __reduce__(self) -> tuple[Any, tuple[dict[str, Any], str | None]]:
        # The validated class is built from the installed methods at run time (spec_model), so pickle cannot
        # find it by name: a spec travels as its data and is validated again where it is unpickled.
        return _unpickle_spec, (self.model_dump(mode="json", exclude_unset=True), self._source)

    def layer(self, index: int) -> LayerPlan:
        """The spec of layer `index`, with any override applied."""
        window, sinks, evict = self.window, self.sinks, self.evict
        pipelines = {"keys": self.keys, "values": self.values}
        for key, override in self.layers.items():
            if any(index in r for r in parse_layer_selection(key)):
                window = override.window if override.window is not None else window
                sinks = override.sinks if override.sinks is not None else sinks
                evict = override.evict if override.evict is not None else evict
                for role in ROLES:
                    part = getattr(override, role)
                    if part is not None:
                        pipelines[role] = _merge(pipelines[role], part)
        return LayerPlan(window=window, sinks=sinks, evict=evict, **pipelines)

    def min_layers(self) -> int:
        """The fewest layers a model needs for every override selection to exist (1 without overrides)."""
        return max((r.stop for key in self.layers for r in parse_layer_selection(key)), default=1)

    def check_layers(self, num_layers: int) -> None:
        """Fail when an override selects a layer the model does not have."""
        for key in self.layers:
            bad = [max(r.start, num_layers) for r in parse_layer_selection(key) if r.stop > num_layers]
            if bad:
                raise SpecError(
                    [f"layers.{key}: selects layer {min(bad)}, but the model has {num_layers} layers (0-{num_layers - 1})"],
                    self._source,
                )


def _merge(base: PipelineSpec, override: PipelineOverride) -> PipelineSpec:
    names = (*STAGES, "center")
    fields = {name: getattr(base, name) for name in names}
    fields.update({name: getattr(override, name) for name in names if getattr(override, name) is not None})
    return PipelineSpec(**fields)


@lru_cache(maxsize=4096)
def parse_layer_selection(key: str) -> tuple[range, ...]:
    """'3' -> (range(3, 4),); '0-2' -> (range(0, 3),); '0,4-5' -> (range(0, 1), range(4, 6)). Ranges, so a
    selection like '0-100000000' costs nothing to hold or test."""
    spans: list[range] = []
    for part in key.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        if not lo.strip().isdigit() or (sep and not hi.strip().isdigit()):
            raise ValueError(f"layer selection {key!r} is not like '3', '0-1' or '0,2,5-7'")
        start, stop = int(lo), int(hi) if sep else int(lo)
        if stop < start:
            raise ValueError(f"layer range {part!r} runs backwards")
        spans.append(range(start, stop + 1))
    return tuple(spans)


# ---------------------------------------------------------------------------------------------------
# The validation model, built from the registry


@lru_cache(maxsize=8)
def _validation_model(signature: tuple[tuple[str, tuple[type, ...]], ...]) -> type[CacheSpec]:
    unions: dict[str, Any] = {}
    for stage, classes in signature:
        if not classes:
            unions[stage] = None
        elif len(classes) == 1:
            unions[stage] = classes[0]
        else:
            unions[stage] = Annotated[Union[classes], Field(discriminator="method")]

    def stage_field(stage: str, required: bool, description: str | None = None) -> Any:
        annotation = unions[stage]
        if annotation is None:
            return (type(None), None)
        description = description or PipelineSpec.model_fields[stage].description
        if required:
            return (SerializeAsAny[annotation], Field(description=description))
        return (SerializeAsAny[annotation] | None, Field(None, description=description))

    pipeline = create_model(
        "PipelineSpec",
        __base__=PipelineSpec,
        **{stage: stage_field(stage, stage == "quantizer") for stage in STAGES},
    )
    pipeline_override = create_model(
        "PipelineOverride", __base__=PipelineOverride, **{stage: stage_field(stage, False) for stage in STAGES}
    )
    evict = stage_field(EVICTION.name, False, CacheSpec.model_fields[EVICTION.name].description)
    layer_override = create_model(
        "LayerOverride",
        __base__=LayerOverride,
        **{role: (pipeline_override | None, Field(None, description=LayerOverride.model_fields[role].description)) for role in ROLES},
        evict=stage_field(EVICTION.name, False, LayerOverride.model_fields[EVICTION.name].description),
    )
    return create_model(
        "CacheSpec",
        __base__=CacheSpec,
        **{role: (SerializeAsAny[pipeline], Field(description=CacheSpec.model_fields[role].description)) for role in ROLES},
        evict=evict,
        layers=(dict[str, SerializeAsAny[layer_override]], Field(default_factory=dict, description=CacheSpec.model_fields["layers"].description)),
    )


def spec_model(registry: Registry | None = None) -> type[CacheSpec]:
    """The CacheSpec subclass whose stages are unions of the installed methods' spec models."""
    registry = registry or get_registry()
    signature = tuple(
        (stage, tuple(p.method.spec for _, p in sorted(registry.provided(stage).items()))) for stage in METHOD_KINDS
    )
    return _validation_model(signature)


def json_schema(registry: Registry | None = None) -> dict[str, Any]:
    """JSON Schema of the spec format with every installed method, for editors."""
    schema = spec_model(registry).model_json_schema()
    schema["title"] = "kvcompress spec"
    return schema


# ---------------------------------------------------------------------------------------------------
# Parsing and loading


def parse_spec(data: dict[str, Any] | CacheSpec, source: str | None = None, registry: Registry | None = None) -> CacheSpec:
    """Validate a spec dict (or re-validate a spec built in code) against the installed methods."""
    registry = registry or get_registry()
    if isinstance(data, BaseModel):
        source = source or getattr(data, "source", None)
        data = data.model_dump(mode="json", exclude_unset=True)
    if not isinstance(data, dict):
        raise SpecError([f"a spec must be a mapping with keys, values, ...; got {type(data).__name__}"], source)
    problems = _unknown_methods(data, registry)
    if problems:
        raise SpecError(problems, source)
    model = spec_model(registry)
    try:
        spec = model.model_validate(data)
    except ValidationError as exc:
        raise SpecError(_format_errors(exc, model), source) from None
    spec._source = source
    problems = check_composition(spec, registry)
    if problems:
        raise SpecError(problems, source)
    return spec


def _unpickle_spec(data: dict[str, Any], source: str | None) -> CacheSpec:
    return parse_spec(data, source=source)


def load_spec(path: str | Path, registry: Registry | None = None) -> CacheSpec:
    """Read a YAML, TOML or JSON spec file (chosen by extension) and validate it."""
    path = Path(path)
    return parse_spec(read_spec_file(path), source=str(path), registry=registry)


def read_spec_file(path: Path) -> dict[str, Any]:
    kind = SPEC_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise SpecError([f"unknown spec file type {path.suffix!r}; use one of {', '.join(SPEC_SUFFIXES)}"], str(path))
    try:
        size = path.stat().st_size
        if size > MAX_SPEC_BYTES:
            raise SpecError([f"the file is {size} bytes; spec files are at most {MAX_SPEC_BYTES} bytes"], str(path))
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise SpecError([f"cannot read the spec file: {exc.strerror}"], str(path)) from None
    except UnicodeDecodeError as exc:
        raise SpecError([f"not UTF-8 text (byte {exc.start} is {exc.object[exc.start]:#04x}); save the spec as UTF-8"], str(path)) from None
    try:
        if kind == "yaml":
            data = yaml.load(text, Loader=_UniqueKeyLoader)
        elif kind == "toml":
            data = tomllib.loads(text)
        else:
            data = json.loads(text, object_pairs_hook=_unique_pairs)
    except (yaml.YAMLError, tomllib.TOMLDecodeError, json.JSONDecodeError, DuplicateKeyError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else exc
        raise SpecError([f"not valid {kind.upper()}: {reason}"], str(path)) from None
    problem = _too_large(data)
    if problem:
        raise SpecError([problem], str(path))
    return data


class DuplicateKeyError(ValueError):
    """A mapping of a spec file names one key twice (YAML and JSON would silently keep the last)."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, refusing a key given twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise DuplicateKeyError(f"the key {key!r} appears twice in one mapping (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    for key in keys:
        if keys.count(key) > 1:
            raise DuplicateKeyError(f"the key {key!r} appears twice in one object")
    return dict(pairs)


def _too_large(data: Any) -> str | None:
    """Why a loaded document is beyond what a spec needs (values after aliases, nesting), or None."""
    nodes = 0
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        nodes += 1
        if nodes > MAX_SPEC_NODES:
            return f"the document holds more than {MAX_SPEC_NODES} values (YAML aliases expanded); a spec needs far fewer"
        if depth > MAX_SPEC_DEPTH:
            return f"the document nests deeper than {MAX_SPEC_DEPTH} levels; a spec needs far fewer"
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
    return None


def _stage_items(data: dict[str, Any]):
    """(path, stage, stage dict) for every stage in the spec's pipelines, its eviction and its overrides."""
    for role in ROLES:
        yield from _pipeline_items(data.get(role), role)
    if isinstance(data.get(EVICTION.name), dict):
        yield EVICTION.name, EVICTION.name, data[EVICTION.name]
    layers = data.get("layers")
    if isinstance(layers, dict):
        for key, override in layers.items():
            if isinstance(override, dict):
                for role in ROLES:
                    yield from _pipeline_items(override.get(role), f"layers.{key}.{role}")
                if isinstance(override.get(EVICTION.name), dict):
                    yield f"layers.{key}.{EVICTION.name}", EVICTION.name, override[EVICTION.name]


def _pipeline_items(pipeline: Any, path: str):
    if isinstance(pipeline, dict):
        for stage in STAGES:
            value = pipeline.get(stage)
            if isinstance(value, dict):
                yield f"{path}.{stage}", stage, value


def _unknown_methods(data: dict[str, Any], registry: Registry) -> list[str]:
    problems = []
    for path, stage, value in _stage_items(data):
        method = value.get("method")
        installed = registry.names(stage)
        if method is None:
            problems.append(f"{path}.method: missing; allowed: {', '.join(installed) or 'none installed'}")
        elif method not in installed:
            problems.append(f"{path}.method: {unknown_method_message(stage, str(method), installed)}")
    return problems


def check_composition(spec: CacheSpec, registry: Registry | None = None) -> list[str]:
    """Problems with how stages combine (an estimator for another quantizer, a missing codebook...)."""
    registry = registry or get_registry()
    plans = [("", spec.layer(-1))] + [
        (f"layers.{key}.", spec.layer(parse_layer_selection(key)[0].start)) for key in spec.layers
    ]
    problems: list[str] = []
    for prefix, plan in plans:
        for role in ROLES:
            pipeline: PipelineSpec = getattr(plan, role)
            path = f"{prefix}{role}"
            quantizer = registry.get("quantizer", pipeline.quantizer.method)
            if role not in quantizer.roles:
                problems.append(
                    f"{path}.quantizer: {quantizer.name!r} cannot quantize {role}; it supports {', '.join(sorted(quantizer.roles))}"
                )
            if pipeline.estimator is not None:
                estimator = registry.get("estimator", pipeline.estimator.method)
                if estimator.quantizers and quantizer.name not in estimator.quantizers:
                    problems.append(
                        f"{path}.estimator: {estimator.name!r} reads only {', '.join(sorted(estimator.quantizers))} "
                        f"state, but the quantizer is {quantizer.name!r}; drop the estimator or change the quantizer"
                    )
                if role not in estimator.roles:
                    problems.append(f"{path}.estimator: {estimator.name!r} does not serve {role}")
            if quantizer.needs_codebook and pipeline.codebook is None:
                problems.append(f"{path}.codebook: quantizer {quantizer.name!r} needs a codebook stage")
            if pipeline.codebook is not None and pipeline.center:
                problems.append(
                    f"{path}.center: centering changes the vectors the quantizer sees per sequence, and calibration "
                    "learns codebooks from uncentered ones; drop `center` or use a quantizer without codebooks"
                )
            if pipeline.codebook is not None and pipeline.pruner is not None:
                problems.append(
                    f"{path}.codebook: pruner {pipeline.pruner.method!r} stores the channels it selects at each "
                    "prefill, which differ from one prompt to the next, so no codebook learned on whole vectors "
                    "fits them; drop the pruner or use a quantizer without codebooks (e.g. scalar)"
                )
            if pipeline.codebook is not None:
                codebook = registry.get("codebook", pipeline.codebook.method)
                if codebook.quantizers and quantizer.name not in codebook.quantizers:
                    problems.append(
                        f"{path}.codebook: {codebook.name!r} serves {', '.join(sorted(codebook.quantizers))}, "
                        f"not {quantizer.name!r}"
                    )
            for stage in ("pruner", "transform"):
                chosen = getattr(pipeline, stage)
                if chosen is not None and role not in registry.get(stage, chosen.method).roles:
                    problems.append(f"{path}.{stage}: {chosen.method!r} does not serve {role}")
    return sorted(set(problems), key=problems.index)


def _format_errors(exc: ValidationError, model: type[BaseModel]) -> list[str]:
    problems = []
    for error in exc.errors():
        loc, owner = _readable_loc(error["loc"], model)
        path = ".".join(str(part) for part in loc) or "(top level)"
        kind = error["type"]
        if kind == "extra_forbidden":
            allowed = ", ".join(owner.model_fields) if owner is not None else "?"
            problems.append(f"{path}: unknown field (given {_excerpt(error['input'])}); allowed fields: {allowed}")
        elif kind == "missing":
            problems.append(f"{path}: required field is missing")
        elif kind == "value_error" and isinstance(error["input"], dict):
            # a model's own check (MethodSpec, EvictionSpec) names the field it refuses as "field: problem"
            message = error["msg"].removeprefix("Value error, ")
            field, _, problem = message.partition(": ")
            named = field.isidentifier() and field in error["input"]
            problems.append(f"{path}.{field}: {problem}" if named else f"{path}: {message}")
        else:
            problems.append(f"{path}: {error['msg']} (given {_excerpt(error['input'])})")
    return problems


def _excerpt(value: Any) -> str:
    """repr of a bad value, cut short: an error shows what was given, not a 50 MB echo of it."""
    text = repr(value)
    return text if len(text) <= EXCERPT_CHARS else text[: EXCERPT_CHARS - 3] + "..."


def _readable_loc(loc: tuple[Any, ...], model: type[BaseModel]) -> tuple[list[Any], type[BaseModel] | None]:
    """Drop union tags from a pydantic error location, and find the model that owns its last field."""
    parts: list[Any] = []
    current: Any = model
    owner: type[BaseModel] | None = None
    for item in loc:
        options = _models_in(current)
        if isinstance(item, str) and options and item not in _fields_of(options):
            tagged = [m for m in options if _method_tag(m) == item or m.__name__ == item]
            if tagged:  # a discriminator tag or a union member name: not a field, skip it
                current = tagged[0]
                continue
        parts.append(item)
        owner = options[0] if options else None
        current = _field_annotation(options, item)
    return parts, owner


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found = []
    for arg in typing.get_args(annotation):
        found.extend(_models_in(arg))
    return found


def _fields_of(models: list[type[BaseModel]]) -> set[str]:
    return {name for m in models for name in m.model_fields}


def _field_annotation(models: list[type[BaseModel]], item: Any) -> Any:
    for m in models:
        if isinstance(item, str) and item in m.model_fields:
            return m.model_fields[item].annotation
    # not a field: a dict key (a layer selection) whose value is the container's model
    return models[0] if models else None


def _method_tag(model: type[BaseModel]) -> str | None:
    field = model.model_fields.get("method")
    if field is None:
        return None
    args = typing.get_args(field.annotation)
    return args[0] if args else None
