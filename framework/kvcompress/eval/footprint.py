"""What a filled cache holds: its bytes, its bits per element, and the float16 cache it stands in for."""

from __future__ import annotations

from typing import Any


def dense_cache_nbytes(cache: Any) -> int:
    """Bytes of keys and values a transformers DynamicCache holds."""
    total = 0
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if tensor is not None:
                total += tensor.numel() * tensor.element_size()
    return total


def fp16_nbytes(model: Any, tokens: int, batch: int = 1) -> int:
    """Bytes a float16 DynamicCache would hold for `tokens` tokens of this model (keys and values, all layers)."""
    from kvcompress.hf.cache import model_geometry

    g = model_geometry(model.config)
    return 2 * 2 * batch * g.num_layers * g.kv_heads * g.head_dim * tokens


def cache_figures(model: Any, cache: Any, rows: int = 1) -> dict[str, Any]:
    """bits_per_element, key_bits, value_bits, cache_bytes, fp16_bytes of a filled cache (stored bytes).

    rows: the cache holds that many equal sequences side by side; the bytes are one sequence's share (the
    per-layer constants, held once whatever the batch, counted whole)."""
    tokens = cache.get_seq_length()
    fp16 = fp16_nbytes(model, tokens)
    if hasattr(cache, "nbytes"):
        parts = cache.nbytes()
        return {
            "bits_per_element": cache.bits_per_element(),
            "key_bits": cache.key_bits(),
            "value_bits": cache.value_bits(),
            "cache_bytes": (parts["total"] - parts["constants"]) / rows + parts["constants"],
            "fp16_bytes": fp16,
        }
    # A dense cache stores each element in its dtype. Its bytes are not a measure of that: sliding-window layers
    # (Gemma-3) hold only their window, which cache_bytes shows.
    sizes = {t.element_size() for layer in cache.layers for t in (getattr(layer, "keys", None),) if t is not None}
    bits = 8.0 * max(sizes) if sizes else None
    return {
        "bits_per_element": bits, "key_bits": bits, "value_bits": bits,
        "cache_bytes": dense_cache_nbytes(cache) / rows, "fp16_bytes": fp16,
    }
