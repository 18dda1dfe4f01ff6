"""Model patching: the one place kvcompress changes a transformers model.

    with kvcompress.patch(model, spec) as patched:     # attention -> "kvcompress", hooks installed
        cache = patched.cache()
        model.generate(**inputs, past_key_values=cache)
    # on exit: the previous attention implementation is back and the hooks are gone

    cache = kvcompress.cache_for(model, spec)          # patch (idempotent, stays on) + a fresh cache

Patching sets the model's attention implementation to "kvcompress" (kvcompress.hf.attention) and puts
forward hooks on every attention module. The pre-forward hook finds the CompressedCache among the
module's arguments and records it on the module for the attention function; it also arms the layer, so
that a cache updated by an unpatched model fails loudly instead of attending over the newest tokens only.

The hooks also capture what pruners observe (kvcompress.runtime.Observation), only for layers whose spec
asks: the queries as attention receives them (after RoPE) are taken by the attention function, the keys
before RoPE by a forward hook on the module's k_proj (then its k_norm, where the model has one). The
post-forward hook then hands the layer its observation, and the layer compresses.
"""

from __future__ import annotations

from typing import Any

import torch

from kvcompress.errors import KVCompressError, UnsupportedModelError
from kvcompress.hf import attention
from kvcompress.hf.cache import CompressedCache, ModelGeometry, SpecLike, model_geometry, resolve_spec
from kvcompress.plugins import Registry
from kvcompress.spec import CacheSpec

PATCH_ATTRIBUTE = "_kvcompress_patch"


def attention_modules(model: torch.nn.Module, geometry: ModelGeometry) -> list[torch.nn.Module]:
    """The self-attention module of each layer, in layer order, or UnsupportedModelError saying what is missing."""
    found: dict[int, torch.nn.Module] = {}
    for module in model.modules():
        index = getattr(module, "layer_idx", None)
        if isinstance(index, int) and "Attention" in type(module).__name__ and index not in found:
            found[index] = module
    missing = [i for i in range(geometry.num_layers) if i not in found]
    if missing:
        raise UnsupportedModelError(
            f"{type(model).__name__}: found no attention module (a submodule named *Attention* with an integer "
            f"layer_idx) for layer(s) {', '.join(map(str, missing[:8]))} of {geometry.num_layers}; kvcompress patches "
            "models whose attention goes through transformers' AttentionInterface"
        )
    return [found[i] for i in range(geometry.num_layers)]


def _find_cache(args: tuple, kwargs: dict) -> CompressedCache | None:
    """The CompressedCache among an attention module's arguments (past_key_values in transformers 5)."""
    cache = kwargs.get("past_key_values")
    if isinstance(cache, CompressedCache):
        return cache
    return next((a for a in (*args, *kwargs.values()) if isinstance(a, CompressedCache)), None)


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


def key_projection(module: torch.nn.Module) -> torch.nn.Module | None:
    """The attention module's key projection (k_proj), whose output the pre-RoPE key capture reads; None
    for fused projections."""
    found = getattr(module, "k_proj", None)
    return found if isinstance(found, torch.nn.Module) else None


def pre_rope_keys(attention_module: torch.nn.Module, projected: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Keys before RoPE [batch, kv_heads, tokens, head_dim] from the key projection's output [batch, tokens,
    kv_heads * head_dim], with the module's k_norm applied as the model applies it: per head (Qwen3, Gemma3;
    the norm acts on the last dim, so the models' different transposes do not matter) or over all heads."""
    batch, tokens = projected.shape[:2]
    norm = getattr(attention_module, "k_norm", None)
    if isinstance(norm, torch.nn.Module):
        weight = getattr(norm, "weight", None)
        if weight is not None and weight.numel() == projected.shape[-1] != head_dim:
            projected, norm = norm(projected), None
    keys = projected.view(batch, tokens, -1, head_dim)
    if isinstance(norm, torch.nn.Module):
        keys = norm(keys)
    return keys.transpose(1, 2)


def _pre_rope_key_capture(attention_module: torch.nn.Module):
    """A forward hook for the key projection of `attention_module` that records the keys before RoPE on the
    running cache's layer when the layer observes them."""

    def capture(projection: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        cache = getattr(attention_module, attention.CACHE_ATTRIBUTE, None)
        if cache is None:
            return
        layer = cache.layers[attention_module.layer_idx]
        if "pre_rope_keys" in layer.observes:
            layer.observe("pre_rope_keys", pre_rope_keys(attention_module, output, layer.head_dim))

    return capture


def check_capture(model: torch.nn.Module, geometry: ModelGeometry, cache: CompressedCache) -> None:
    """Fail when the cache's spec observes something this model's attention modules cannot show."""
    observing = [layer for layer in cache.layers if "pre_rope_keys" in layer.codecs.observes]
    if not observing:  # the common case: no need to walk the model's modules for every new cache
        return
    modules = attention_modules(model, geometry)
    for layer in observing:
        module = modules[layer.codecs.layer]
        if key_projection(module) is None:
            raise UnsupportedModelError(
                f"layer {module.layer_idx}: the spec's pruner observes the keys before RoPE, but "
                f"{type(module).__name__} has no k_proj submodule to capture them from (fused projections are not "
                "supported); use a pruner that does not observe pre_rope_keys"
            )


class Patch:
    """A patched model: restores it on exit (or restore()), builds caches with cache()."""

    def __init__(self, model: torch.nn.Module, spec: CacheSpec, geometry: ModelGeometry, registry: Registry | None):
        self.model = model
        self.spec = spec
        self.geometry = geometry
        self.registry = registry
        self.previous_attention: str | None = None
        self.hooks: list[Any] = []
        self.active = False

    def apply(self, modules: list[torch.nn.Module]) -> None:
        self.previous_attention = self.model.config._attn_implementation
        self.model.set_attn_implementation(attention.NAME)
        if self.model.config._attn_implementation != attention.NAME:
            raise UnsupportedModelError(
                f"{type(self.model).__name__} does not let its attention implementation be changed (it does not call "
                "transformers' AttentionInterface), so kvcompress cannot read its cache"
            )
        for module in modules:
            self.hooks.append(module.register_forward_pre_hook(_before_attention, with_kwargs=True))
            self.hooks.append(module.register_forward_hook(_after_attention, with_kwargs=True, always_call=True))
            projection = key_projection(module)
            if projection is not None:
                self.hooks.append(projection.register_forward_hook(_pre_rope_key_capture(module)))
        setattr(self.model, PATCH_ATTRIBUTE, self)
        self.active = True

    def cache(self, spec: SpecLike | None = None, exact_new_tokens: bool = True) -> CompressedCache:
        """A fresh CompressedCache for this model (from this patch's spec unless another is given)."""
        cache = CompressedCache(
            self.spec if spec is None else spec,
            self.model.config,
            model_name=getattr(self.model.config, "_name_or_path", None) or None,
            registry=self.registry,
            exact_new_tokens=exact_new_tokens,
        )
        check_capture(self.model, self.geometry, cache)
        return cache

    def restore(self) -> None:
        """Put back the attention implementation the model had and remove the hooks."""
        if not self.active:
            return
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()
        self.model.set_attn_implementation(self.previous_attention)
        if getattr(self.model, PATCH_ATTRIBUTE, None) is self:
            delattr(self.model, PATCH_ATTRIBUTE)
        self.active = False

    def __enter__(self) -> Patch:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.restore()


class _Nested(Patch):
    """What patch() returns for a model already patched: uses the outer patch, restores nothing on exit."""

    def restore(self) -> None:
        self.active = False


def patch(model: torch.nn.Module, spec: SpecLike, registry: Registry | None = None) -> Patch:
    """Validate `spec` for `model` and route the model's attention through kvcompress.

    Returns a Patch, usable as a context manager that restores the model on exit. Patching a model that
    is already patched changes nothing and returns a handle whose exit leaves the outer patch in place.
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
        nested = _Nested(model, spec, geometry, registry)
        nested.active = True
        return nested
    handle = Patch(model, spec, geometry, registry)
    handle.apply(attention_modules(model, geometry))
    return handle


def cache_for(
    model: torch.nn.Module, spec: SpecLike, registry: Registry | None = None, exact_new_tokens: bool = True
) -> CompressedCache:
    """Patch `model` (if it is not already) and return a fresh CompressedCache built from `spec` for it.

    The model stays patched; use `with kvcompress.patch(model, spec):` for a scoped change.
    exact_new_tokens: see CompressedCache.
    """
    return patch(model, spec, registry).cache(exact_new_tokens=exact_new_tokens)
