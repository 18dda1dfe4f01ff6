"""kvpress's half of benchmarks/kvpress_side_by_side.py: runs inside the kvpress virtual environment and
imports only kvpress, transformers and torch (never kvcompress), so kvpress runs with the transformers it
supports.

    python benchmarks/kvpress_worker.py REQUEST.json RESULT.json

The request holds the model directory, the token ids (perplexity text, needle prompts: tokenized once by
kvcompress, so both sides read identical tokens), the presses and ratios. For each press and ratio, the
result holds the continuation's summed NLL, the bytes and tokens the DynamicCache holds after the press,
and the generated ids of every needle prompt; kvcompress scores them.

Protocol, kvpress's own usage (kvpress.pipeline): the prompt is prefilled inside `with press(model):`, which
prunes each layer's cache after its attention; later tokens run outside the press with explicit position
ids, because the pruned cache no longer counts the evicted tokens.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from importlib.metadata import version
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, DynamicCache

import kvpress

PRESSES = {"streaming": "StreamingLLMPress", "snapkv": "SnapKVPress", "knorm": "KnormPress"}


def make_press(method: str, ratio: float, options: dict[str, Any]) -> Any:
    """The kvpress press of `method` evicting `ratio` of the tokens, None for no eviction."""
    if method == "none":
        return None
    return getattr(kvpress, PRESSES[method])(compression_ratio=ratio, **options)


def held(cache: DynamicCache) -> dict[str, int]:
    """Bytes of the keys and values tensors the cache holds, and the tokens of its first layer."""
    tensors = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    return {"bytes": sum(t.numel() * t.element_size() for t in tensors), "tokens": int(cache.layers[0].keys.shape[2])}


def prefill(model: Any, press: Any, ids: torch.Tensor) -> tuple[torch.Tensor, DynamicCache, dict[str, int]]:
    """Last logit of the prompt, its (pruned) cache, and what the cache holds right after the press."""
    cache = DynamicCache()
    with torch.inference_mode():
        if press is None:
            out = model(input_ids=ids, past_key_values=cache, logits_to_keep=1)
        else:
            with press(model):
                out = model(input_ids=ids, past_key_values=cache, logits_to_keep=1)
    return out.logits[0, -1], cache, held(cache)


def step(model: Any, token: torch.Tensor, cache: DynamicCache, position: int) -> torch.Tensor:
    """Logits of one token fed at its true position."""
    with torch.inference_mode():
        out = model(input_ids=token.view(1, 1), past_key_values=cache, position_ids=torch.tensor([[position]]))
    return out.logits[0, -1]


def perplexity(model: Any, press: Any, ids: list[int], context: int) -> dict[str, Any]:
    """Summed NLL of ids[context:], the context prefilled with the press and the rest fed one token at a time."""
    tokens = torch.tensor([ids])
    logits, cache, after_press = prefill(model, press, tokens[:, :context])
    nll = 0.0
    for position in range(context, len(ids)):
        if position > context:
            logits = step(model, tokens[0, position - 1], cache, position - 1)
        nll += F.cross_entropy(logits.float()[None], tokens[0, position : position + 1]).item()
    return {"nll": nll, "scored": len(ids) - context, **after_press}


def generate(model: Any, press: Any, ids: list[int], max_new_tokens: int) -> dict[str, Any]:
    """Greedy answer ids (kvpress.pipeline's loop) to a prompt prefilled whole with the press."""
    stop = model.generation_config.eos_token_id
    stop = set(stop if isinstance(stop, list) else [stop])
    logits, cache, after_press = prefill(model, press, torch.tensor([ids]))
    reply = [int(logits.argmax())]
    while len(reply) < max_new_tokens and reply[-1] not in stop:
        reply.append(int(step(model, torch.tensor(reply[-1]), cache, len(ids) + len(reply) - 1).argmax()))
    return {"reply_ids": reply, **after_press}


def main(request_path: str, result_path: str) -> None:
    request = json.loads(open(request_path, encoding="utf-8").read())
    torch.set_num_threads(request["threads"])
    model = AutoModelForCausalLM.from_pretrained(request["model"], dtype=torch.float32, local_files_only=True).eval()
    rows = []
    for run in request["runs"]:
        press = make_press(run["method"], run["ratio"], request["options"].get(run["method"], {}))
        print(f"kvpress: {run['method']} {run['ratio']}", file=sys.stderr, flush=True)
        started = time.perf_counter()
        ppl = perplexity(model, press, request["ppl_ids"], request["context"])
        needle = [generate(model, press, ids, request["max_new_tokens"]) for ids in request["needle_ids"]]
        rows.append({**run, "ppl": ppl, "needle": needle, "seconds": time.perf_counter() - started})
    versions = {name: version(name) for name in ("kvpress", "transformers", "torch")}
    result = {"versions": {**versions, "python": platform.python_version()}, "torch_threads": torch.get_num_threads(),
              "rows": rows}
    with open(result_path, "w", encoding="utf-8") as out:
        json.dump(result, out, indent=2)


if __name__ == "__main__":
    main(*sys.argv[1:])
