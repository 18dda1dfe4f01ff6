"""Perplexity of the continuation of a text, read through a cache (`kvcompress eval`, the default task).

Protocol (chunked decoding, so the continuation really reads the compressed cache):
    1. prefill the first `context` tokens through the cache; its last logit predicts continuation token 0;
    2. feed continuation tokens 0 .. continuation-2 in chunks of `chunk`; each chunk attends to the cache of
       everything before it, and its logits predict the next tokens;
    3. perplexity = exp(mean NLL over exactly `continuation` tokens).
The protocol runs on `windows` disjoint consecutive slices of the text, each with a fresh cache; the
reported perplexity pools every scored token, and the spread of the per-window deltas says how much one
slice of text moves a figure (a single 256-token window moves a method by several percent). The standard error
of the pooled delta, from the per-token NLL differences against the baseline, says how much the figure itself
would move with another draw of the method's error (another rotation seed): about 16 % of perplexity over the
square root of the tokens scored at 3 bits on SmolLM2, so a figure settles to within 0.3 % only over several
thousand tokens (docs/results.md).
The baseline runs the same protocol with a transformers DynamicCache and the model's own attention.
Windows run side by side, a batch at a time, and the specs share each batch's prefill: a prompt over an
empty cache attends in full precision to itself whatever the spec, so one forward fills every spec's cache
(kvcompress.hf.fanout), exactly as separate prefills would.
"""

from __future__ import annotations

import math
import statistics
import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator

from kvcompress.errors import KVCompressError
from kvcompress.eval.footprint import cache_figures
from kvcompress.eval.report import format_table, progress
from kvcompress.eval.runners import Runner
from kvcompress.hf.keywords import with_cache

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Protocol:
    """Token counts of one perplexity run."""

    context: int
    continuation: int
    chunk: int
    windows: int = 1

    def __post_init__(self) -> None:
        for name in ("context", "continuation", "chunk", "windows"):
            if getattr(self, name) < 1:
                raise KVCompressError(f"--{name} must be at least 1, got {getattr(self, name)}")

    @property
    def tokens(self) -> int:
        """Tokens of text one window reads (the last one is only predicted, never fed)."""
        return self.context + self.continuation

    def chunks(self) -> list[tuple[int, int]]:
        """[start, stop) positions of the chunks fed after the prefill: continuation tokens 0 .. continuation-2."""
        fed_stop = self.context + self.continuation - 1
        return [(start, min(start + self.chunk, fed_stop)) for start in range(self.context, fed_stop, self.chunk)]


def tokenize_text(tokenizer: Any, text: str, protocol: Protocol, source: str) -> "torch.Tensor":
    """The windows of `text` as input ids [windows, tokens]: its first windows * tokens tokens, cut in order
    into disjoint slices; an error if the text is too short."""
    import torch

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    needed = protocol.windows * protocol.tokens
    if len(ids) < needed:
        fitting = len(ids) // protocol.tokens
        hint = f" (--windows {fitting} fits)" if fitting else ""
        raise KVCompressError(
            f"the text ({source}) has {len(ids)} tokens, fewer than --windows {protocol.windows} x (--context "
            f"{protocol.context} + --continuation {protocol.continuation}) = {needed}; pass a longer --text FILE "
            f"or smaller counts{hint}"
        )
    return torch.tensor(ids[:needed], dtype=torch.long).reshape(protocol.windows, protocol.tokens)


def shared_context_logits(
    model: Any, context: "torch.Tensor", rows: "torch.Tensor", chunk: int, cache: Any
) -> Iterator[tuple["torch.Tensor", "torch.Tensor"]]:
    """(logits [rows, n, vocab], targets [rows, n]) of each forward scoring `rows` [rows, length] as
    continuations of one `context` [tokens]: the context's prefill (its last position predicts each row's first
    token), then, with the cache repeated once per row, the rows side by side, `chunk` tokens per forward, each
    predicting the next tokens from the cache of everything before it. Causal attention keeps what follows a
    row's end (padding of a shorter row) out of that row's scores. Call under torch.inference_mode."""
    rows = rows.to(model.device)
    out = model(input_ids=context[None].to(model.device), **with_cache(model, cache), use_cache=True, logits_to_keep=1)
    yield out.logits.expand(rows.shape[0], -1, -1), rows[:, :1]
    if rows.shape[0] > 1:
        cache.batch_repeat_interleave(rows.shape[0])
    for start in range(0, rows.shape[1] - 1, chunk):
        stop = min(start + chunk, rows.shape[1] - 1)
        out = model(input_ids=rows[:, start:stop], **with_cache(model, cache), use_cache=True)
        yield out.logits, rows[:, start + 1 : stop + 1]


def prefill_logits(
    model: Any, input_ids: "torch.Tensor", protocol: Protocol, cache: Any
) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(logits [rows, 1, vocab], targets [rows, 1]) of the windows' contexts, `input_ids` [rows, tokens],
    prefilled through `cache` (a PrefillFanout fills several caches at once): the last context position
    predicts the first continuation token. Call under torch.inference_mode."""
    input_ids = input_ids.to(model.device)
    context = protocol.context
    out = model(input_ids=input_ids[:, :context], **with_cache(model, cache), use_cache=True, logits_to_keep=1)
    return out.logits, input_ids[:, context : context + 1]


def chunk_logits(
    model: Any, input_ids: "torch.Tensor", protocol: Protocol, cache: Any
) -> Iterator[tuple["torch.Tensor", "torch.Tensor"]]:
    """(logits [rows, n, vocab], targets [rows, n]) of each chunk of the windows' continuations, `input_ids`
    [rows, tokens], fed through `cache`, which holds their contexts. Call under torch.inference_mode."""
    input_ids = input_ids.to(model.device)
    for start, stop in protocol.chunks():
        out = model(input_ids=input_ids[:, start:stop], **with_cache(model, cache), use_cache=True)
        yield out.logits, input_ids[:, start + 1 : stop + 1]


def continuation_logits(
    model: Any, input_ids: "torch.Tensor", protocol: Protocol, cache: Any
) -> Iterator[tuple["torch.Tensor", "torch.Tensor"]]:
    """(logits [rows, n, vocab], targets [rows, n]) of each forward of the windows `input_ids` [rows, tokens]
    side by side: the prefill's last position, then each chunk of the continuation fed through `cache`. Call
    under torch.inference_mode."""
    if input_ids.dim() != 2 or input_ids.shape[1] != protocol.tokens:
        raise ValueError(f"input_ids must have shape (rows, {protocol.tokens}), got {tuple(input_ids.shape)}")
    yield prefill_logits(model, input_ids, protocol, cache)
    yield from chunk_logits(model, input_ids, protocol, cache)


def continuation_scores(
    model: Any, context: "torch.Tensor", continuations: "list[torch.Tensor]", chunk: int, cache: Any
) -> "list[tuple[torch.Tensor, torch.Tensor]]":
    """(log-probability, greedy) of each token of each continuation of one context, read through `cache`
    (shared_context_logits: one prefill, the continuations side by side). For each continuation: its float32
    log-probabilities and whether each token was the most likely one there, both [len] tensors."""
    import torch

    if context.dim() != 1 or context.numel() < 1 or not continuations or min(c.numel() for c in continuations) < 1:
        raise ValueError("continuation_scores needs a 1-d context and continuations of at least one token each")
    lengths = [c.numel() for c in continuations]
    rows = torch.zeros(len(continuations), max(lengths), dtype=torch.long)
    for row, continuation in enumerate(continuations):
        rows[row, : lengths[row]] = continuation
    log_probs, greedy = [], []
    with torch.inference_mode():
        for logits, targets in shared_context_logits(model, context, rows, chunk, cache):
            logits = logits.float()
            log_probs.append(logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0])
            greedy.append(logits.argmax(-1) == targets)
    scores, hits = torch.cat(log_probs, 1), torch.cat(greedy, 1)
    return [(scores[row, :length], hits[row, :length]) for row, length in enumerate(lengths)]


def token_nll(steps: Iterator[tuple["torch.Tensor", "torch.Tensor"]], step: Callable[[], None] | None = None) -> "torch.Tensor":
    """Negative log-likelihood [rows, targets] (float64) of each target of each row over the forwards `steps`
    yields ((logits [rows, n, vocab], targets [rows, n])), in order; `step` is called after each forward."""
    import torch
    import torch.nn.functional as F

    parts = []
    for logits, targets in steps:
        nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
        parts.append(nll.view(targets.shape).double())
        if step is not None:
            step()
    return torch.cat(parts, 1) if parts else torch.zeros(0, 0, dtype=torch.float64)


def continuation_nll(
    model: Any,
    input_ids: "torch.Tensor",
    protocol: Protocol,
    cache: Any,
    step: Callable[[], None] | None = None,
) -> tuple[float, int]:
    """(summed negative log-likelihood, tokens scored) of the windows' continuations, `input_ids` [rows,
    tokens] side by side, fed through `cache` in chunks.

    `step` is called after the prefill and after every chunk (progress reporting).
    """
    import torch

    with torch.inference_mode():
        nll = token_nll(continuation_logits(model, input_ids, protocol, cache), step)
    return nll.sum().item(), input_ids.shape[0] * protocol.continuation


def evaluate_perplexity(
    model: Any, input_ids: "torch.Tensor", protocol: Protocol, runners: list[Runner], batch: int = 8
) -> list[dict[str, Any]]:
    """One result row per runner over the windows of `input_ids` [windows, tokens]; the first runner is the
    reference whose perplexity the others compare to (pooled, and window by window): the baseline.

    Windows run `batch` at a time, side by side in one cache. The specs' runners share each batch's prefill
    (kvcompress.hf.fanout: one forward fills every spec's cache, exactly as separate prefills would), so a
    spec's `seconds` are its chunked forwards plus an equal share of that prefill; a runner without a spec
    (the baseline's DynamicCache) runs its own. Bytes are those one window holds (a batch's cache, its
    per-layer constants counted once).
    """
    import torch

    from kvcompress.hf.fanout import PrefillFanout

    if input_ids.shape != (protocol.windows, protocol.tokens):
        raise ValueError(f"input_ids must have shape ({protocol.windows}, {protocol.tokens}), got {tuple(input_ids.shape)}")
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    dense = [i for i, runner in enumerate(runners) if runner.spec is None]
    compressed = [i for i, runner in enumerate(runners) if runner.spec is not None]
    chunks = len(protocol.chunks())
    groups = input_ids.split(batch)
    steps = len(groups) * (len(dense) * (1 + chunks) + (1 + len(compressed) * chunks if compressed else 0))
    window_nll: list[list[torch.Tensor]] = [[] for _ in runners]  # per batch: [rows, continuation] float64
    seconds = [0.0] * len(runners)
    figures: dict[int, dict[str, Any]] = {}
    with progress(total=steps, desc="perplexity") as bar:
        for group in groups:
            for i in dense:
                bar.set_postfix_str(runners[i].name)
                with runners[i].session(model) as new_cache, torch.inference_mode():
                    started = time.perf_counter()
                    cache = new_cache()
                    nll = token_nll(continuation_logits(model, group, protocol, cache), lambda: bar.update(1))
                    seconds[i] += time.perf_counter() - started
                    window_nll[i].append(nll)
                    if i not in figures:  # the first batch: a full one when there are several
                        figures[i] = cache_figures(model, cache, rows=group.shape[0])
            if not compressed:
                continue
            with ExitStack() as stack, torch.inference_mode():
                bar.set_postfix_str("prefill")
                caches = [stack.enter_context(runners[i].session(model))() for i in compressed]
                started = time.perf_counter()
                first = token_nll(iter([prefill_logits(model, group, protocol, PrefillFanout(caches))]))
                shared = (time.perf_counter() - started) / len(compressed)
                bar.update(1)
                for i, cache in zip(compressed, caches):
                    bar.set_postfix_str(runners[i].name)
                    started = time.perf_counter()
                    nll = torch.cat([first, token_nll(chunk_logits(model, group, protocol, cache), lambda: bar.update(1))], 1)
                    seconds[i] += time.perf_counter() - started + shared
                    window_nll[i].append(nll)
                    if i not in figures:
                        figures[i] = cache_figures(model, cache, rows=group.shape[0])
    scored = protocol.windows * protocol.continuation
    token_nlls = [torch.cat(parts) for parts in window_nll]
    rows: list[dict[str, Any]] = []
    for i, runner in enumerate(runners):
        window_ppl = [math.exp(nll / protocol.continuation) for nll in token_nlls[i].sum(1).tolist()]
        ppl = math.exp(token_nlls[i].sum().item() / scored)
        baseline = rows[0] if rows else {"ppl": ppl, "window_ppl": window_ppl}
        window_delta = [100 * (p - b) / b for p, b in zip(window_ppl, baseline["window_ppl"])]
        rows.append({
            "name": runner.name,
            "source": runner.spec.source if runner.spec is not None else None,
            **{k: figures[i][k] for k in ("bits_per_element", "key_bits", "value_bits")},
            "ppl": ppl,
            "baseline_ppl": baseline["ppl"],
            "delta_pct": 100 * (ppl - baseline["ppl"]) / baseline["ppl"],
            "delta_spread_pct": statistics.stdev(window_delta) if len(window_delta) > 1 else 0.0,
            "delta_stderr_pct": delta_stderr(token_nlls[i] - token_nlls[0], ppl / baseline["ppl"]),
            "window_ppl": window_ppl,
            "window_delta_pct": window_delta,
            "cache_bytes": figures[i]["cache_bytes"],
            "fp16_bytes": figures[i]["fp16_bytes"],
            "seconds": seconds[i],
            "tokens_scored": scored,
        })
    return rows


def delta_stderr(differences: "torch.Tensor", ratio: float) -> float:
    """Standard error, in percent of the reference's perplexity, of a pooled delta 100 (ratio - 1), ratio =
    exp(mean of `differences`): the per-token NLL differences from the reference (all scored tokens, any
    shape). A method's quantization error moves each token's NLL by a mostly independent amount (another
    seed of the same method: correlation about 0.2 on SmolLM2), so the figure moves between seeds by about
    this much; it shrinks as one over the square root of the tokens scored."""
    n = differences.numel()
    if n < 2:
        return 0.0
    return 100 * ratio * differences.double().std().item() / math.sqrt(n)


def format_perplexity_table(rows: list[dict[str, Any]]) -> str:
    columns = [
        ("spec", "name", "{}"),
        ("bits/elem", "bits_per_element", "{:.3f}"),
        ("key bits", "key_bits", "{:.3f}"),
        ("val bits", "value_bits", "{:.3f}"),
        ("ppl", "ppl", "{:.3f}"),
        ("baseline", "baseline_ppl", "{:.3f}"),
        ("delta %", "delta_pct", "{:+.2f}"),
        ("+-", "delta_spread_pct", "{:.2f}"),
        ("se", "delta_stderr_pct", "{:.2f}"),
        ("cache KiB", "cache_bytes", "{:.1f}"),
        ("fp16 KiB", "fp16_bytes", "{:.1f}"),
        ("seconds", "seconds", "{:.1f}"),
    ]
    scale = {"cache_bytes": 1 / 1024, "fp16_bytes": 1 / 1024}
    return format_table(rows, columns, scale)
