"""The keyword a transformers model takes its KV cache under: `cache` from transformers 5.24, `past_key_values`
before. 5.24 renamed it and takes the old name with a FutureWarning until 5.40, which drops it from the models'
forwards (a name a forward does not know goes to its **kwargs, where nothing may read it); so the core asks the
model which name it takes."""

from __future__ import annotations

import inspect
from typing import Any

CACHE_KEYWORDS = ("cache", "past_key_values")


def cache_keyword(model: Any) -> str:
    """`cache` where the model's forward (or generate) takes it, else `past_key_values`."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def with_cache(model: Any, cache: Any) -> dict[str, Any]:
    """The keyword argument that hands `cache` to `model`'s forward or generate: {cache_keyword(model): cache}."""
    return {cache_keyword(model): cache}
