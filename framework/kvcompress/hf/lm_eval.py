"""The lm-evaluation-harness (0.4.x) model `kvcompress`: the harness's HFLM with its requests read through a
kvcompress cache.

    kvcompress lm-eval --model kvcompress --model_args pretrained=smollm2,spec=specs/kivi-4.yaml --tasks ...

    import kvcompress.hf.lm_eval, lm_eval                      # importing this module registers the model
    lm_eval.simple_evaluate(model="kvcompress", model_args="pretrained=smollm2,spec=specs/kivi-4.yaml", ...)

The harness scores a (context, continuation) request with one forward pass over both, and kvcompress computes
a forward's own tokens densely (a prompt is one dense segment), so that pass would never read the compressed
cache. Here every log-likelihood request runs kvcompress's perplexity protocol instead
(kvcompress.eval.perplexity): the context but its last token is prefilled into a fresh cache, then that token
and the continuation are fed `score_chunk` tokens per forward, each chunk attending to the cache of everything
before it, so every continuation token is predicted from the cached context (the continuations of one
context, a multiple-choice question's choices, share its prefill and run side by side). Rolling
log-likelihoods (perplexity tasks) are the harness's windows, each scored the same way; generation passes a
fresh cache to `generate`, so every token after the first reads it. Without a spec the same protocol runs
with a transformers DynamicCache and the model's own attention: the baseline.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

from kvcompress.errors import KVCompressError
from kvcompress.eval.perplexity import continuation_scores
from kvcompress.eval.runners import BASELINE, Runner
from kvcompress.hf.cache import resolve_spec
from kvcompress.hf.keywords import with_cache
from kvcompress.hf.loading import DEFAULT_MODEL, load_model
from kvcompress.spec import CacheSpec

MODEL_NAME = "kvcompress"
logger = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HarnessArgumentError(KVCompressError):
    """A --model_args value the kvcompress model of lm-evaluation-harness cannot use."""


@register_model(MODEL_NAME)
class KVCompressLM(HFLM):
    """HFLM whose log-likelihoods and generations read a kvcompress cache (see the module docstring).

    pretrained: a kvcompress model name (smollm2, or any other kvcompress.hf.loading knows), a local
        transformers directory, or a loaded model (then pass `tokenizer` too); nothing is downloaded.
    spec: a spec file, a spec dict or a CacheSpec; None runs the baseline (DynamicCache, the model's attention).
    score_chunk: continuation tokens fed per forward pass after the context's prefill.
    dtype: the weights' dtype when `pretrained` is loaded here (float32, bfloat16 or float16); a loaded model
        keeps its own.
    batch_size: requests per generate() call; log-likelihood requests are grouped by context instead (each
        context through its own cache, its continuations side by side).
    Other keyword arguments are HFLM's (max_length, add_bos_token, prefix_token_id, chat_template_args, ...).
    """

    def __init__(
        self,
        pretrained: str | Path | torch.nn.Module = DEFAULT_MODEL,
        spec: str | Path | dict | CacheSpec | None = None,
        score_chunk: int = 16,
        dtype: str = "float32",
        device: str | None = None,
        batch_size: int | str = 1,
        tokenizer: Any = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(score_chunk, int) or isinstance(score_chunk, bool) or score_chunk < 1:
            raise HarnessArgumentError(f"score_chunk must be a whole number of at least 1, got {score_chunk!r}")
        # The harness's --batch_size arrives as text.
        size = int(batch_size) if isinstance(batch_size, str) and batch_size.strip().isdigit() else batch_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise HarnessArgumentError(
                f"batch_size must be a whole number of at least 1, got {batch_size!r} (the kvcompress model groups "
                "log-likelihood requests by context, so there is no batch size to detect)"
            )
        self.spec = None if spec is None else resolve_spec(spec)
        if isinstance(pretrained, torch.nn.Module):
            if tokenizer is None:
                raise HarnessArgumentError("a loaded model needs its tokenizer: pass tokenizer=... beside it")
            model, self.model_label = pretrained, getattr(pretrained, "name_or_path", type(pretrained).__name__)
        else:
            if dtype not in DTYPES:
                raise HarnessArgumentError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}; pass dtype=float32")
            model, loaded_tokenizer = load_model(str(pretrained), dtype=DTYPES[dtype])
            tokenizer = tokenizer or loaded_tokenizer
            self.model_label = str(pretrained)
            model.to(_device(device))
        super().__init__(pretrained=model, tokenizer=tokenizer, backend="causal", batch_size=size, **kwargs)
        self.score_chunk = score_chunk
        # The model stays patched (a spec's row) for the adapter's life: the harness calls it until it is done.
        self._session = ExitStack()
        runner = Runner(BASELINE if self.spec is None else self.spec.name, self.spec)
        self.new_cache = self._session.enter_context(runner.session(self.model))
        # A spec that does not fit the model (layer overrides, codebooks of another model) fails here, not midway.
        self.new_cache()

    def close(self) -> None:
        """Restore the model's own attention (a spec patched it); the adapter cannot score after this."""
        self._session.close()

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str] | None, list[int], list[int]]],
        disable_tqdm: bool = False,
        override_bs: int | None = None,
    ) -> list[tuple[float, bool]]:
        """(log-likelihood, greedy) of each request's continuation, in request order.

        Requests with the same context (a multiple-choice question's choices) share one prefill into a fresh
        cache; their continuations are then scored side by side (kvcompress.eval.perplexity.continuation_scores).
        Like HFLM, the oldest context tokens are dropped where context and continuation do not fit in
        max_length + 1 tokens (the last token is only predicted). `override_bs`, HFLM's batch size for rolling
        windows, has no use here.
        """
        groups: dict[tuple[int, ...], list[int]] = {}
        for index, (_, context, continuation) in enumerate(requests):
            if not context or not continuation:
                raise KVCompressError("a log-likelihood request needs at least one context and one continuation token")
            if len(continuation) > self.max_length:
                raise KVCompressError(
                    f"a continuation of {len(continuation)} tokens does not fit max_length {self.max_length}; pass "
                    "a larger max_length in --model_args"
                )
            kept = (context + continuation)[-(self.max_length + 1):][: -len(continuation)]
            groups.setdefault(tuple(kept), []).append(index)
        results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
        for context, indices in tqdm(
            groups.items(), disable=disable_tqdm or self.rank != 0, desc="Running loglikelihood requests"
        ):
            # The context's last token is fed with each continuation rather than prefilled: a prefill computes its
            # own tokens densely, so the forward that predicts a continuation's first token must be a later one
            # for that prediction to read the context from the cache. (A one-token context leaves nothing cached.)
            lead = list(context[-1:]) if len(context) > 1 else []
            prefill = torch.tensor(context[: len(context) - len(lead)], dtype=torch.long)
            rows = [torch.tensor(lead + requests[i][2], dtype=torch.long) for i in indices]
            scores = continuation_scores(self.model, prefill, rows, self.score_chunk, self.new_cache())
            for index, (log_probs, greedy) in zip(indices, scores):
                results[index] = (float(log_probs[len(lead):].sum()), bool(greedy[len(lead):].all()))
                # Rolling requests have no key; loglikelihood_rolling caches their sums itself (as HFLM does).
                if requests[index][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[index][0], results[index])
        return results

    def _model_generate(
        self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs: Any
    ) -> torch.Tensor:
        """HFLM's generation, through a fresh cache: every token after the first reads it."""
        cache = with_cache(self.model, self.new_cache())
        return super()._model_generate(context, max_length, stop, **cache, **generation_kwargs)

    def get_model_info(self) -> dict:
        """What the results record about the model: kvcompress's name for it, the spec, the protocol (no hub lookup)."""
        return {
            "pretrained": self.model_label,
            "model_num_parameters": self.model.num_parameters(),
            "model_dtype": str(self.model.dtype),
            "kvcompress_spec": None if self.spec is None else self.spec.name,
            "kvcompress_spec_source": None if self.spec is None else self.spec.source,
            "score_chunk": self.score_chunk,
        }


def _device(requested: str | None) -> str:
    """Where to put a model loaded here. The harness asks for cuda:0 unless told otherwise; like HFLM, a
    machine without CUDA runs on the CPU then."""
    if requested is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("device %s: CUDA is not available, running on the CPU", requested)
        return "cpu"
    return requested

