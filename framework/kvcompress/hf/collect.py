"""Collecting a model's keys and values for calibration: what a transformers DynamicCache stores (post-RoPE).

The token stream is cut into windows of `context` tokens; each window runs from an empty DynamicCache, and
every layer's cached keys and values are read back. The first `skip` positions of each window are dropped
(a spec's sink tokens stay in full precision, so codebooks need not fit them).
"""

from __future__ import annotations

from typing import Any

import torch

from kvcompress.errors import KVCompressError
from kvcompress.hf.keywords import with_cache


def collect_kv(
    model: Any, input_ids: torch.Tensor, tokens: int, context: int = 1024, skip: int = 0, progress: bool = True
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (keys, values), each float32 [tokens, kv_heads, head_dim], from the first windows of input_ids.

    input_ids: int64 [n] token ids; tokens: how many key/value positions to collect per layer.
    """
    from tqdm.auto import tqdm
    from transformers import DynamicCache

    if context <= skip:
        raise KVCompressError(f"--context {context} must be larger than the {skip} sink positions skipped per window")
    per_window = context - skip
    windows = -(-tokens // per_window)
    if input_ids.numel() < windows * context:
        raise KVCompressError(
            f"calibration needs {windows} windows of {context} tokens ({windows * context} tokens), the text has "
            f"{input_ids.numel()}; pass a longer --text, or lower --tokens or --context"
        )
    keys: list[list[torch.Tensor]] = []
    values: list[list[torch.Tensor]] = []
    device = next(model.parameters()).device
    with torch.inference_mode():
        for w in tqdm(range(windows), desc="collecting keys/values", unit="window", disable=not progress):
            window = input_ids[w * context : (w + 1) * context].to(device).unsqueeze(0)
            # No config: every layer keeps every position. A config's sliding-window layers would keep only their
            # last window (Gemma-3: 511 of 1024 positions); the model's mask slides either way.
            cache = DynamicCache()
            model(input_ids=window, **with_cache(model, cache), use_cache=True)
            if not keys:
                keys = [[] for _ in cache.layers]
                values = [[] for _ in cache.layers]
            for index, layer in enumerate(cache.layers):
                # [1, kv_heads, context, head_dim] -> [context - skip, kv_heads, head_dim]
                keys[index].append(layer.keys[0, :, skip:].transpose(0, 1).float().cpu())
                values[index].append(layer.values[0, :, skip:].transpose(0, 1).float().cpu())
    return [(torch.cat(k)[:tokens], torch.cat(v)[:tokens]) for k, v in zip(keys, values)]
