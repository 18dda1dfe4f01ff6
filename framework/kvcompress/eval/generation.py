"""Prompts for the generation tasks (needle, ruler), the model's greedy reply to one through a cache, and every
runner's replies to a list of them."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvcompress.eval.footprint import cache_figures
from kvcompress.eval.report import progress
from kvcompress.eval.runners import Runner
from kvcompress.hf.keywords import with_cache

if TYPE_CHECKING:
    import torch


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer frames messages with a chat template (instruct models do, base models do not)."""
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_ids(tokenizer: Any, content: str, reply_prefix: str = "") -> "torch.Tensor":
    """Input ids [1, n] asking `content`: as the user's message in the chat template where the tokenizer has
    one, else as plain text (then a space and the prefix); `reply_prefix` starts the model's answer (RULER's answer prefix), so the model
    continues it."""
    import torch

    if has_chat_template(tokenizer):
        framed = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
        # The rendered template carries its own special tokens, as apply_chat_template(tokenize=True) assumes.
        ids = tokenizer(framed + reply_prefix, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(f"{content} {reply_prefix}" if reply_prefix else content)["input_ids"]
    return torch.tensor([ids], dtype=torch.long)


def greedy_reply(model: Any, tokenizer: Any, input_ids: "torch.Tensor", cache: Any, max_new_tokens: int) -> str:
    """The model's greedy continuation of `input_ids` [1, n] (at most `max_new_tokens`, ending at EOS), generated
    with `cache` as its KV cache."""
    import torch
    from transformers import GenerationConfig

    eos = model.generation_config.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if isinstance(eos, list) else eos)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    input_ids = input_ids.to(model.device)
    with torch.inference_mode():
        output = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            **with_cache(model, cache),
            generation_config=config,
        )
    return tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True).strip()


@dataclass(frozen=True)
class RunnerReplies:
    """What one runner answered: a reply per prompt, in order; the bytes and bits of the cache of the longest
    prompt and its answer (kvcompress.eval.footprint.cache_figures); the seconds it took."""

    runner: Runner
    replies: list[str]
    figures: dict[str, Any]
    seconds: float


def answer_prompts(
    model: Any, tokenizer: Any, prompts: list[tuple["torch.Tensor", int]], runners: list[Runner], desc: str
) -> list[RunnerReplies]:
    """Each runner's greedy replies to the same (input ids, token budget) prompts, each in a fresh cache."""
    longest = max(range(len(prompts)), key=lambda i: prompts[i][0].shape[1])
    results = []
    with progress(total=len(prompts) * len(runners), desc=desc) as bar:
        for runner in runners:
            bar.set_postfix_str(runner.name)
            replies = []
            figures: dict[str, Any] = {}
            started = time.perf_counter()
            with runner.session(model) as new_cache:
                for index, (input_ids, budget) in enumerate(prompts):
                    cache = new_cache()
                    replies.append(greedy_reply(model, tokenizer, input_ids, cache, budget))
                    if index == longest:
                        figures = cache_figures(model, cache)
                    bar.update(1)
            results.append(RunnerReplies(runner, replies, figures, time.perf_counter() - started))
    return results
