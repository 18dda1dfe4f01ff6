"""kvcompress: real KV-cache compression for transformers models, with pluggable methods.

    spec = kvcompress.load_spec("specs/kivi-2.yaml")
    cache = kvcompress.cache_for(model, spec)
    model.generate(**inputs, past_key_values=cache)
"""

from __future__ import annotations

from kvcompress.errors import KVCompressError, PluginError, SpecError, UnknownMethodError, UnsupportedModelError
from kvcompress.hookspecs import hookimpl
from kvcompress.methods import (
    CodebookMethod,
    EstimatorMethod,
    LayerContext,
    QuantizerMethod,
    TransformMethod,
)
from kvcompress.plugins import Registry, get_registry, set_registry
from kvcompress.runtime import Estimator, Quantizer, Transform
from kvcompress.spec import CacheSpec, json_schema, load_spec, parse_spec
from kvcompress.spec_base import MethodSpec
from kvcompress.state import PackedState

__version__ = "0.1.0"

__all__ = [
    "CacheSpec",
    "CodebookMethod",
    "Estimator",
    "EstimatorMethod",
    "KVCompressError",
    "LayerContext",
    "MethodSpec",
    "PackedState",
    "PluginError",
    "Quantizer",
    "QuantizerMethod",
    "Registry",
    "SpecError",
    "Transform",
    "TransformMethod",
    "UnknownMethodError",
    "UnsupportedModelError",
    "get_registry",
    "hookimpl",
    "json_schema",
    "load_spec",
    "parse_spec",
    "set_registry",
]
