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
    EvictorMethod,
    LayerContext,
    ModelAdapter,
    PrunerMethod,
    QuantizerMethod,
    ReaderMethod,
    TransformMethod,
)
from kvcompress.plugins import Registry, get_registry, set_registry
from kvcompress.spec import CacheSpec, json_schema, load_spec, parse_spec
from kvcompress.spec_base import EvictionSpec, MethodSpec

__version__ = "0.1.0"

# Names whose modules import torch (or transformers) load on first use, so that plugin modules, which
# import kvcompress for the hook marker and descriptors, stay light.
_LAZY = {
    "ChannelPruner": "kvcompress.runtime",
    "Estimator": "kvcompress.runtime",
    "Evictor": "kvcompress.runtime",
    "Observation": "kvcompress.runtime",
    "Quantizer": "kvcompress.runtime",
    "Reader": "kvcompress.runtime",
    "Transform": "kvcompress.runtime",
    "PackedState": "kvcompress.state",
    "CompressedCache": "kvcompress.hf.cache",
    "Patch": "kvcompress.hf.patch",
    "cache_for": "kvcompress.hf.patch",
    "patch": "kvcompress.hf.patch",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kvcompress' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)

__all__ = [
    "CacheSpec",
    "ChannelPruner",
    "CodebookMethod",
    "CompressedCache",
    "Estimator",
    "Evictor",
    "EstimatorMethod",
    "EvictionSpec",
    "EvictorMethod",
    "KVCompressError",
    "LayerContext",
    "MethodSpec",
    "ModelAdapter",
    "Observation",
    "PackedState",
    "Patch",
    "PluginError",
    "PrunerMethod",
    "Quantizer",
    "QuantizerMethod",
    "Reader",
    "ReaderMethod",
    "Registry",
    "SpecError",
    "Transform",
    "TransformMethod",
    "UnknownMethodError",
    "UnsupportedModelError",
    "cache_for",
    "get_registry",
    "hookimpl",
    "json_schema",
    "load_spec",
    "parse_spec",
    "patch",
    "set_registry",
]
