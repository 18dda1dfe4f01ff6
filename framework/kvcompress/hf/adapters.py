"""Model adapters: what kvcompress.patch needs to know about an architecture, behind one small interface.

A plugin declares an adapter with the kvcompress_model_adapters hook (a kvcompress.methods.ModelAdapter:
the config model types it handles and a `load` function); kvcompress.patch picks it by the model's
(text) config `model_type` and calls `load()` for the adapter object, whose methods are:

    attention_modules(model, geometry)        the attention module of each layer, in layer order
    pre_rope_keys(module)                     (submodule, read) where the keys before RoPE show, or None
    apply_rope(model, layer, keys, positions) pre-RoPE keys rotated as the model rotates them
    unsupported_kwargs                        attention kwargs kvcompress's attention does not implement

`Adapter` is the base class with the defaults every transformers decoder of the usual shape can use: an
attention module is a submodule whose class name contains "Attention" with an integer `layer_idx`; the
model's rotary embedding module is its submodule named `rotary_emb`, called as transformers' models call
it (with the layer's `layer_type` where it takes one, as Gemma 3's local and global RoPE do), and its
cos/sin are applied with the semantics of transformers' apply_rotary_pos_emb (rotate_half over the first
cos.shape[-1] channels, the rest passed through: partial rotary included). A subclass says where the keys
before RoPE are (pre_rope_keys has no default: only the architecture knows its projections).

The core's SeparateProjectionAdapter serves the architectures kvcompress is tested on (Llama, Mistral,
Qwen2/3, Gemma 1/2/3): keys before RoPE are the output of `k_proj`, then `k_norm` where the model has one.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Mapping
from typing import Any, Callable

import torch

from kvcompress.errors import UnsupportedModelError
from kvcompress.hf import attention
from kvcompress.hf.cache import ModelGeometry
from kvcompress.plugins import Registry, get_registry

# read(attention module, output of the hooked submodule, head_dim) -> keys [batch, kv_heads, tokens, head_dim]
KeyReader = Callable[[torch.nn.Module, Any, int], torch.Tensor]
# Attribute the patch sets on each attention module: the adapter's unsupported_kwargs, for the attention function.
UNSUPPORTED_KWARGS_ATTRIBUTE = attention.UNSUPPORTED_KWARGS_ATTRIBUTE


def text_config(model: torch.nn.Module) -> Any:
    """The decoder's config (the text config of a multimodal model)."""
    config = model.config
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def model_adapter(model: torch.nn.Module, registry: Registry | None = None) -> Any:
    """The loaded adapter object for `model`, chosen by its config's model_type among the registry's adapters."""
    model_type = getattr(text_config(model), "model_type", None) or type(model).__name__
    return (registry or get_registry()).adapter_for(model_type).load()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' apply_rotary_pos_emb for one tensor x [batch, heads, tokens, head_dim] with cos/sin
    [batch, tokens, rotary_dim] from a rotary embedding module: the first rotary_dim channels are rotated
    (x * cos + rotate_half(x) * sin), the others pass unchanged."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    width = cos.shape[-1]
    turned, kept = x[..., :width], x[..., width:]
    half = width // 2
    rotated_half = torch.cat((-turned[..., half:], turned[..., :half]), dim=-1)
    return torch.cat((turned * cos + rotated_half * sin, kept), dim=-1)


class Adapter:
    """Base class of adapter objects: the defaults described in the module docstring."""

    unsupported_kwargs: Mapping[str, str] = attention.UNSUPPORTED_KWARGS

    def __init__(self) -> None:
        self._rotary: weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module] = weakref.WeakKeyDictionary()

    def attention_modules(self, model: torch.nn.Module, geometry: ModelGeometry) -> list[torch.nn.Module]:
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
                f"layer_idx) for layer(s) {', '.join(map(str, missing[:8]))} of {geometry.num_layers}; kvcompress "
                "patches models whose attention goes through transformers' AttentionInterface"
            )
        return [found[i] for i in range(geometry.num_layers)]

    def pre_rope_keys(self, module: torch.nn.Module) -> tuple[torch.nn.Module, KeyReader] | None:
        """Where the keys before RoPE of attention module `module` can be captured; None: nowhere."""
        return None

    def rotary_embedding(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model's rotary embedding module: its submodule named rotary_emb."""
        found = self._rotary.get(model)
        if found is None:
            found = next((m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] == "rotary_emb"), None)
            if found is None:
                raise UnsupportedModelError(
                    f"{type(model).__name__} has no rotary_emb submodule; its adapter must override apply_rope"
                )
            self._rotary[model] = found
        return found

    def apply_rope(
        self, model: torch.nn.Module, layer: int, keys: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """Keys before RoPE [batch, kv_heads, tokens, head_dim] at absolute positions ([tokens] or [batch,
        tokens]) rotated into the keys the model's attention sees (and a DynamicCache would hold)."""
        rotary = self.rotary_embedding(model)
        position_ids = (positions if positions.dim() == 2 else positions[None]).to(keys.device)
        extra = {}
        if "layer_type" in inspect.signature(rotary.forward).parameters:
            extra["layer_type"] = text_config(model).layer_types[layer]
        cos, sin = rotary(keys, position_ids, **extra)
        return rotate(keys, cos, sin)


def keys_from_projection(module: torch.nn.Module, projected: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Keys before RoPE [batch, kv_heads, tokens, head_dim] from the key projection's output [batch, tokens,
    kv_heads * head_dim], with the module's k_norm applied as the model applies it: per head (Qwen3, Gemma3;
    the norm acts on the last dim, so the models' different transposes do not matter) or over all heads."""
    batch, tokens = projected.shape[:2]
    norm = getattr(module, "k_norm", None)
    if isinstance(norm, torch.nn.Module):
        weight = getattr(norm, "weight", None)
        if weight is not None and weight.numel() == projected.shape[-1] != head_dim:
            projected, norm = norm(projected), None
    keys = projected.view(batch, tokens, -1, head_dim)
    if isinstance(norm, torch.nn.Module):
        keys = norm(keys)
    return keys.transpose(1, 2)


class SeparateProjectionAdapter(Adapter):
    """Decoders with a separate key projection `k_proj` (and an optional `k_norm`) before RoPE."""

    def pre_rope_keys(self, module: torch.nn.Module) -> tuple[torch.nn.Module, KeyReader] | None:
        projection = getattr(module, "k_proj", None)
        return (projection, keys_from_projection) if isinstance(projection, torch.nn.Module) else None


__all__ = [
    "Adapter",
    "KeyReader",
    "SeparateProjectionAdapter",
    "UNSUPPORTED_KWARGS_ATTRIBUTE",
    "keys_from_projection",
    "model_adapter",
    "rotate",
]
