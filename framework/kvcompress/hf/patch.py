"""Model patching: the one place kvcompress changes a transformers model.

    with kvcompress.patch(model, spec) as patched:     # attention -> "kvcompress", hooks installed
        cache = patched.cache()
        model.generate(**inputs, past_key_values=cache)
    # on exit: the previous attention implementation is back and the hooks are gone

    cache = kvcompress.cache_for(model, spec)          # patch (idempotent, stays on) + a fresh cache

Patching sets the model's attention implementation to "kvcompress" (kvcompress.hf.attention) and puts
forward hooks on every attention module. What is architecture-specific (which modules those are, where the
keys before RoPE show, which attention kwargs are unsupported) comes from the model adapter the registry
holds for the model's config model_type (kvcompress.hf.adapters; plugins add adapters through the
kvcompress_model_adapters hook). The pre-forward hook finds the CompressedCache among the module's
arguments and records it on the module for the attention function; it also arms the layer, so that a
cache updated by an unpatched model fails loudly instead of attending over the newest tokens only. Each
attention module also carries the adapter's unsupported kwargs (UNSUPPORTED_KWARGS_ATTRIBUTE) while patched.

The hooks also capture what pruners observe (kvcompress.runtime.Observation), only for layers whose spec
asks: the queries as attention receives them (after RoPE) are taken by the attention function, the keys
before RoPE by a forward hook on the submodule the adapter names (for the core's architectures k_proj,
then k_norm where the model has one). The post-forward hook then hands the layer its observation, and the
layer compresses.
"""

from __future__ import annotations

from typing import Any

import torch

from kvcompress.errors import KVCompressError, UnsupportedModelError
from kvcompress.hf import attention
from kvcompress.hf.adapters import UNSUPPORTED_KWARGS_ATTRIBUTE, KeyReader, model_adapter
from kvcompress.hf.cache import CompressedCache, ModelGeometry, SpecLike, model_geometry, model_name, resolve_spec
from kvcompress.hf.fanout import PrefillFanout
from kvcompress.hf.keywords import CACHE_KEYWORDS
from kvcompress.plugins import Registry
from kvcompress.spec import CacheSpec

PATCH_ATTRIBUTE = "_kvcompress_patch"
# The caches a patched forward drives: a spec's, or several specs' sharing one prefill.
KVCOMPRESS_CACHES = (CompressedCache, PrefillFanout)


def _find_cache(args: tuple, kwargs: dict) -> CompressedCache | PrefillFanout | None:
    """The kvcompress cache among an attention module's arguments (under CACHE_KEYWORDS, else anywhere)."""
    for keyword in CACHE_KEYWORDS:
        if isinstance(cache := kwargs.get(keyword), KVCOMPRESS_CACHES):
            return cache
    return next((a for a in (*args, *kwargs.values()) if isinstance(a, KVCOMPRESS_CACHES)), None)


def _before_attention(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    cache = _find_cache(args, kwargs)
    setattr(module, attention.CACHE_ATTRIBUTE, cache)
    if cache is not None:
        cache.layers[module.layer_idx].begin_forward()


def _after_attention(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
    cache = getattr(module, attention.CACHE_ATTRIBUTE, None)
    # Drop the reference so a finished forward does not keep the cache alive.
    setattr(module, attention.CACHE_ATTRIBUTE, None)
    if cache is None:
        return
    layer = cache.layers[module.layer_idx]
    if output is None:  # the forward raised; what it captured is of no use
        layer.abort_forward()
        return
    layer.end_forward()


def _pre_rope_key_capture(attention_module: torch.nn.Module, read: KeyReader):
    """A forward hook for the submodule the adapter names that records the keys before RoPE (read from its
    output by the adapter's `read`) on the running cache's layer when the layer observes them."""

    def capture(submodule: torch.nn.Module, args: tuple, output: Any) -> None:
        cache = getattr(attention_module, attention.CACHE_ATTRIBUTE, None)
        if cache is None:
            return
        layer = cache.layers[attention_module.layer_idx]
        if "pre_rope_keys" in layer.observes:
            layer.observe("pre_rope_keys", read(attention_module, output, layer.head_dim))

    return capture


def check_capture(adapter: Any, modules: list[torch.nn.Module], cache: CompressedCache) -> None:
    """Fail when the cache's spec observes something the adapter cannot capture from these attention modules."""
    for layer in cache.layers:
        module = modules[layer.codecs.layer]
        if "pre_rope_keys" in layer.codecs.observes and adapter.pre_rope_keys(module) is None:
            raise UnsupportedModelError(
                f"layer {layer.codecs.layer}: the spec's pruner observes the keys before RoPE, but the model "
                f"adapter {type(adapter).__name__} cannot capture them from {type(module).__name__} (a fused "
                "projection it does not slice, or no key projection); use a pruner that does not observe "
                "pre_rope_keys, or an adapter that captures them"
            )


class Patch:
    """A patched model: restores it on exit (or restore()), builds caches with cache()."""

    def __init__(
        self,
        model: torch.nn.Module,
        spec: CacheSpec,
        geometry: ModelGeometry,
        registry: Registry | None,
        adapter: Any,
        modules: list[torch.nn.Module],
    ):
        self.model = model
        self.spec = spec
        self.geometry = geometry
        self.registry = registry
        self.adapter = adapter
        self.modules = modules
        self.previous_attention: str | None = None
        self.hooks: list[Any] = []
        self.active = False

    def apply(self) -> None:
        for index, module in enumerate(self.modules):
            if getattr(module, "layer_idx", None) != index:
                raise UnsupportedModelError(
                    f"model adapter {type(self.adapter).__name__} gave {type(module).__name__} with layer_idx "
                    f"{getattr(module, 'layer_idx', None)!r} as the attention module of layer {index}"
                )
        self.previous_attention = self.model.config._attn_implementation
        self.model.set_attn_implementation(attention.NAME)
        if self.model.config._attn_implementation != attention.NAME:
            raise UnsupportedModelError(
                f"{type(self.model).__name__} does not let its attention implementation be changed (it does not call "
                "transformers' AttentionInterface), so kvcompress cannot read its cache"
            )
        for module in self.modules:
            self.hooks.append(module.register_forward_pre_hook(_before_attention, with_kwargs=True))
            self.hooks.append(module.register_forward_hook(_after_attention, with_kwargs=True, always_call=True))
            capture = self.adapter.pre_rope_keys(module)
            if capture is not None:
                submodule, read = capture
                self.hooks.append(submodule.register_forward_hook(_pre_rope_key_capture(module, read)))
            setattr(module, UNSUPPORTED_KWARGS_ATTRIBUTE, dict(self.adapter.unsupported_kwargs))
        setattr(self.model, PATCH_ATTRIBUTE, self)
        self.active = True

    def cache(self, spec: SpecLike | None = None, exact_new_tokens: bool = True) -> CompressedCache:
        """A fresh CompressedCache for this model (from this patch's spec unless another is given)."""
        cache = CompressedCache(
            self.spec if spec is None else spec,
            self.model.config,
            model_name=model_name(self.model.config),
            registry=self.registry,
            exact_new_tokens=exact_new_tokens,
        )
        check_capture(self.adapter, self.modules, cache)
        return cache

    def restore(self) -> None:
        """Put back the attention implementation the model had and remove the hooks."""
        if not self.active:
            return
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()
        for module in self.modules:
            if hasattr(module, UNSUPPORTED_KWARGS_ATTRIBUTE):
                delattr(module, UNSUPPORTED_KWARGS_ATTRIBUTE)
        self.model.set_attn_implementation(self.previous_attention)
        if getattr(self.model, PATCH_ATTRIBUTE, None) is self:
            delattr(self.model, PATCH_ATTRIBUTE)
        self.active = False

    def __enter__(self) -> Patch:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.restore()


class _Nested(Patch):
    """What patch() returns for a model already patched: uses the outer patch's adapter and hooks, restores
    nothing on exit."""

    def restore(self) -> None:
        self.active = False


def patch(model: torch.nn.Module, spec: SpecLike, registry: Registry | None = None) -> Patch:
    """Validate `spec` for `model` and route the model's attention through kvcompress.

    The model adapter (kvcompress.hf.adapters) is the registry's for the model's config model_type; a model
    type no installed adapter handles raises UnsupportedModelError. Returns a Patch, usable as a context
    manager that restores the model on exit. Patching a model that is already patched changes nothing and
    returns a handle whose exit leaves the outer patch in place.
    """
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "set_attn_implementation"):
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a transformers PreTrainedModel (no set_attn_implementation); "
            "load the model with transformers"
        )
    geometry = model_geometry(getattr(model, "config", None))
    spec = resolve_spec(spec, registry)
    spec.check_layers(geometry.num_layers)
    current = getattr(model, PATCH_ATTRIBUTE, None)
    if current is not None and current.active:
        nested = _Nested(model, spec, geometry, registry, current.adapter, current.modules)
        nested.active = True
        return nested
    adapter = model_adapter(model, registry)
    handle = Patch(model, spec, geometry, registry, adapter, adapter.attention_modules(model, geometry))
    handle.apply()
    return handle


def cache_for(
    model: torch.nn.Module, spec: SpecLike, registry: Registry | None = None, exact_new_tokens: bool = True
) -> CompressedCache:
    """Patch `model` (if it is not already) and return a fresh CompressedCache built from `spec` for it.

    The model stays patched; use `with kvcompress.patch(model, spec):` for a scoped change.
    exact_new_tokens: see CompressedCache.
    """
    return patch(model, spec, registry).cache(exact_new_tokens=exact_new_tokens)
