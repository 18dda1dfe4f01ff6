"""`kvcompress eval`: perplexity and needle retrieval of specs on a model, against the full-precision baseline.

Perplexity protocol (chunked decoding, so the continuation really reads the compressed cache):
    1. prefill the first `context` tokens through the cache; its last logit predicts continuation token 0;
    2. feed continuation tokens 0 .. continuation-2 in chunks of `chunk`; each chunk attends to the cache of
       everything before it, and its logits predict the next tokens;
    3. perplexity = exp(mean NLL over exactly `continuation` tokens).
The baseline runs the same protocol with a transformers DynamicCache and the model's own attention.

Needle retrieval (--task needle) is in kvcompress.eval.needle.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

from kvcompress.errors import KVCompressError
from kvcompress.spec import CacheSpec, load_spec

if TYPE_CHECKING:
    import torch

DEFAULT_TEXT = Path("/usr/share/common-licenses/GPL-3")
BASELINE = "baseline"


# ---------------------------------------------------------------------------------------------------
# Text


def pydoc_text() -> tuple[str, str]:
    """(text, source): Python's pydoc topics, long English prose present with every CPython."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics)), "pydoc_data.topics"


def default_text() -> tuple[str, str]:
    """(text, source): the GPL-3 license text where the system has it, else Python's pydoc topics."""
    if DEFAULT_TEXT.is_file():
        return DEFAULT_TEXT.read_text(encoding="utf-8"), str(DEFAULT_TEXT)
    return pydoc_text()


def read_text(path: str | None, default: Callable[[], tuple[str, str]] = default_text) -> tuple[str, str]:
    """(text, source) of --text FILE, or `default()` when no file is given."""
    if path is None:
        return default()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise KVCompressError(f"--text {path}: cannot read it ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise KVCompressError(f"--text {path}: not UTF-8 text") from None
    if not text.strip():
        raise KVCompressError(f"--text {path}: the file is empty")
    return text, str(path)


# ---------------------------------------------------------------------------------------------------
# Perplexity protocol


@dataclass(frozen=True)
class Protocol:
    """Token counts of one perplexity run."""

    context: int
    continuation: int
    chunk: int

    def __post_init__(self) -> None:
        for name in ("context", "continuation", "chunk"):
            if getattr(self, name) < 1:
                raise KVCompressError(f"--{name} must be at least 1, got {getattr(self, name)}")

    @property
    def tokens(self) -> int:
        """Tokens of text the protocol reads (the last one is only predicted, never fed)."""
        return self.context + self.continuation

    def chunks(self) -> list[tuple[int, int]]:
        """[start, stop) positions of the chunks fed after the prefill: continuation tokens 0 .. continuation-2."""
        fed_stop = self.context + self.continuation - 1
        return [(start, min(start + self.chunk, fed_stop)) for start in range(self.context, fed_stop, self.chunk)]


def tokenize_text(tokenizer: Any, text: str, protocol: Protocol, source: str) -> "torch.Tensor":
    """The first protocol.tokens tokens of `text` as input ids [1, tokens], or an error if it is too short."""
    import torch

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < protocol.tokens:
        raise KVCompressError(
            f"the text ({source}) has {len(ids)} tokens, fewer than --context {protocol.context} + --continuation "
            f"{protocol.continuation} = {protocol.tokens}; pass a longer --text FILE or smaller counts"
        )
    return torch.tensor([ids[: protocol.tokens]], dtype=torch.long)


def continuation_nll(
    model: Any,
    input_ids: "torch.Tensor",
    protocol: Protocol,
    cache: Any,
    step: Callable[[], None] | None = None,
) -> tuple[float, int]:
    """(summed negative log-likelihood, tokens scored) of the continuation, fed through `cache` in chunks.

    `step` is called after the prefill and after every chunk (progress reporting).
    """
    import torch
    import torch.nn.functional as F

    if input_ids.shape != (1, protocol.tokens):
        raise ValueError(f"input_ids must have shape (1, {protocol.tokens}), got {tuple(input_ids.shape)}")
    input_ids = input_ids.to(model.device)
    total = torch.zeros((), dtype=torch.float64, device=model.device)
    scored = 0
    with torch.inference_mode():
        out = model(input_ids=input_ids[:, : protocol.context], past_key_values=cache, use_cache=True, logits_to_keep=1)
        target = input_ids[:, protocol.context : protocol.context + 1]
        total += F.cross_entropy(out.logits[0, -1:].float(), target[0], reduction="sum").double()
        scored += 1
        if step is not None:
            step()
        for start, stop in protocol.chunks():
            out = model(input_ids=input_ids[:, start:stop], past_key_values=cache, use_cache=True)
            targets = input_ids[0, start + 1 : stop + 1]
            total += F.cross_entropy(out.logits[0].float(), targets, reduction="sum").double()
            scored += targets.numel()
            if step is not None:
                step()
    return total.item(), scored


# ---------------------------------------------------------------------------------------------------
# Caches: the baseline and the compressed one


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


@dataclass
class Runner:
    """How one row of the results gets its cache: the baseline's DynamicCache or a spec's CompressedCache."""

    name: str
    spec: CacheSpec | None

    @contextmanager
    def session(self, model: Any) -> Iterator[Callable[[], Any]]:
        """The model set up for this row while the context lasts; yields a factory of fresh, empty caches.

        A spec's row patches the model with kvcompress's attention and restores it on exit, so the
        baseline always runs the model's own attention.
        """
        if self.spec is None:
            from transformers import DynamicCache

            yield lambda: DynamicCache(config=model.config)
            return
        import kvcompress

        with kvcompress.patch(model, self.spec) as patched:
            yield patched.cache


def cache_figures(model: Any, cache: Any) -> dict[str, Any]:
    """bits_per_element, key_bits, value_bits, cache_bytes, fp16_bytes of a filled cache (stored bytes)."""
    tokens = cache.get_seq_length()
    fp16 = fp16_nbytes(model, tokens)
    if hasattr(cache, "nbytes"):
        return {
            "bits_per_element": cache.bits_per_element(),
            "key_bits": cache.key_bits(),
            "value_bits": cache.value_bits(),
            "cache_bytes": cache.nbytes()["total"],
            "fp16_bytes": fp16,
        }
    held = dense_cache_nbytes(cache)
    # fp16 holds 16 bits per element, so the dense cache's bits per element follow from the byte ratio.
    bits = 16 * held / fp16 if fp16 else None
    return {"bits_per_element": bits, "key_bits": bits, "value_bits": bits, "cache_bytes": held, "fp16_bytes": fp16}


# ---------------------------------------------------------------------------------------------------
# The eval command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `kvcompress eval`."""
    parser.add_argument("specs", nargs="*", metavar="SPEC", help="spec files to evaluate (none: baseline only)")
    parser.add_argument("--task", choices=("ppl", "needle"), default="ppl", help="perplexity (default) or needle retrieval")
    parser.add_argument("--model", default="smollm2", help="smollm2 (the embedded default) or a local transformers model directory")
    parser.add_argument("--text", metavar="FILE", help="UTF-8 text to read (default: a license text from the system)")
    parser.add_argument("--context", type=int, default=1024, help="ppl: tokens prefilled into the cache (default 1024)")
    parser.add_argument("--continuation", type=int, default=256, help="ppl: tokens scored after the context (default 256)")
    parser.add_argument("--chunk", type=int, default=16, help="ppl: continuation tokens fed per forward pass (default 16)")
    parser.add_argument("--lengths", default="512,1024,2048", help="needle: document lengths in tokens, comma-separated")
    parser.add_argument("--depths", default="0.1,0.5,0.9", help="needle: where the needle sits, fractions of the document")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="needle: tokens generated for the answer (default 32: SmolLM2 spends one token per digit)")
    parser.add_argument("--seed", type=int, default=0, help="needle: seed of the hidden numbers")
    parser.add_argument("--device", default="auto", help="torch device to run on (default: cuda when available, else cpu)")
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON to this file")


def run(args: argparse.Namespace) -> int:
    """Run `kvcompress eval`; returns the exit status."""
    # Everything that can be wrong with the command line fails here, before the model loads.
    specs = [load_spec(path) for path in args.specs]
    _check_unique_names(specs)
    text, source = read_text(args.text)
    if args.task == "ppl":
        protocol = Protocol(args.context, args.continuation, args.chunk)
        task_settings: dict[str, Any] = asdict(protocol)
    else:
        from kvcompress.eval.needle import NeedleSettings

        needle_settings = NeedleSettings.from_strings(args.lengths, args.depths, args.max_new_tokens, args.seed)
        task_settings = asdict(needle_settings)
    if args.json:
        _check_writable(Path(args.json))
    device = resolve_device(args.device)

    from kvcompress.hf.loading import load_model

    model, tokenizer = load_model(args.model)
    model.to(device)
    # The text is checked against the tokenizer before the specs' caches are built, and both before measuring.
    if args.task == "ppl":
        input_ids = tokenize_text(tokenizer, text, protocol, source)
    else:
        from kvcompress.eval.needle import build_trials, evaluate_needle, format_needle_table

        trials = build_trials(tokenizer, text, source, needle_settings)
    runners = [Runner(BASELINE, None)] + [Runner(spec.name, spec) for spec in specs]
    check_runners(model, runners)
    header = run_header(args.model, model, source, args.task, task_settings)
    if args.task == "ppl":
        rows = evaluate_perplexity(model, input_ids, protocol, runners)
        print(format_perplexity_table(rows))
    else:
        rows = evaluate_needle(model, tokenizer, trials, runners, needle_settings)
        print(format_needle_table(rows, needle_settings))
    print(_footer(header))
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "results": rows}, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def check_runners(model: Any, runners: list[Runner]) -> None:
    """Build each runner's cache for this model once, so that what only the model reveals (layer overrides
    beyond its depth, a codebook file not yet calibrated, an unsupported architecture) fails before any
    measurement runs rather than after the baseline and the specs before it."""
    for runner in runners:
        with runner.session(model) as new_cache:
            new_cache()


def resolve_device(name: str) -> "torch.device":
    """--device: "auto" is cuda when torch sees a GPU, else cpu; anything else must be a device torch accepts."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise KVCompressError(f"--device {name!r}: not a torch device; use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KVCompressError(f"--device {name}: torch sees no CUDA device here; use --device cpu")
    return device


def evaluate_perplexity(model: Any, input_ids: "torch.Tensor", protocol: Protocol, runners: list[Runner]) -> list[dict[str, Any]]:
    """One result row per runner; the first runner must be the baseline, whose perplexity the others compare to."""
    steps_per_run = 1 + len(protocol.chunks())
    rows: list[dict[str, Any]] = []
    with progress(total=steps_per_run * len(runners), desc="perplexity") as bar:
        for runner in runners:
            bar.set_postfix_str(runner.name)
            with runner.session(model) as new_cache:
                started = time.perf_counter()
                cache = new_cache()
                nll, scored = continuation_nll(model, input_ids, protocol, cache, step=lambda: bar.update(1))
                seconds = time.perf_counter() - started
                figures = cache_figures(model, cache)
            ppl = math.exp(nll / scored)
            baseline_ppl = rows[0]["ppl"] if rows else ppl
            rows.append({
                "name": runner.name,
                "source": runner.spec.source if runner.spec is not None else None,
                **{k: figures[k] for k in ("bits_per_element", "key_bits", "value_bits")},
                "ppl": ppl,
                "baseline_ppl": baseline_ppl,
                "delta_pct": 100 * (ppl - baseline_ppl) / baseline_ppl,
                "cache_bytes": figures["cache_bytes"],
                "fp16_bytes": figures["fp16_bytes"],
                "seconds": seconds,
                "tokens_scored": scored,
            })
    return rows


def format_perplexity_table(rows: list[dict[str, Any]]) -> str:
    columns = [
        ("spec", "name", "{}"),
        ("bits/elem", "bits_per_element", "{:.3f}"),
        ("key bits", "key_bits", "{:.3f}"),
        ("val bits", "value_bits", "{:.3f}"),
        ("ppl", "ppl", "{:.3f}"),
        ("baseline", "baseline_ppl", "{:.3f}"),
        ("delta %", "delta_pct", "{:+.2f}"),
        ("cache KiB", "cache_bytes", "{:.1f}"),
        ("fp16 KiB", "fp16_bytes", "{:.1f}"),
        ("seconds", "seconds", "{:.1f}"),
    ]
    scale = {"cache_bytes": 1 / 1024, "fp16_bytes": 1 / 1024}
    return format_table(rows, columns, scale)


def format_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]], scale: dict[str, float] | None = None) -> str:
    """Rows as an aligned text table: the first column left-aligned, the rest right-aligned."""
    scale = scale or {}
    cells = [[title for title, _, _ in columns]]
    for row in rows:
        line = []
        for _, key, fmt in columns:
            value = row.get(key)
            line.append("-" if value is None else fmt.format(value * scale[key] if key in scale else value))
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = []
    for r in cells:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(lines)


def run_header(model_name: str, model: Any, text_source: str, task: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Where and how the results were measured."""
    import torch
    import transformers

    import kvcompress

    return {
        "model": model_name,
        "model_class": type(model).__name__,
        "model_dtype": str(model.dtype).removeprefix("torch."),
        "text": text_source,
        "task": task,
        "protocol": settings,
        "versions": {
            "kvcompress": kvcompress.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "machine": {
            "platform": platform.platform(),
            "processor": _cpu_name(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": str(model.device),
        },
    }


def _cpu_name() -> str:
    """The CPU model from /proc/cpuinfo where there is one (platform.processor() is often just the arch)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _footer(header: dict[str, Any]) -> str:
    v, m = header["versions"], header["machine"]
    return (
        f"model {header['model']} ({header['model_dtype']}), text {header['text']}, {header['task']} "
        f"{', '.join(f'{k}={val}' for k, val in header['protocol'].items())}; "
        f"torch {v['torch']}, transformers {v['transformers']}, kvcompress {v['kvcompress']}; "
        f"{m['platform']}, {m['processor']} x {m['cpu_count']}, {m['device']}"
    )


def _check_unique_names(specs: list[CacheSpec]) -> None:
    seen: dict[str, str | None] = {BASELINE: None}
    for spec in specs:
        if spec.name in seen:
            other = "the baseline row" if spec.name == BASELINE else seen[spec.name]
            raise KVCompressError(
                f"{spec.source}: spec name {spec.name!r} is also used by {other}; give each spec a distinct name"
            )
        seen[spec.name] = spec.source


def _check_writable(path: Path) -> None:
    if not path.parent.is_dir():
        raise KVCompressError(f"--json {path}: the directory {path.parent} does not exist")


def progress(total: int, desc: str) -> Any:
    """A tqdm progress bar on stderr (hidden when stderr is not a terminal)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, disable=None, leave=False, unit="step")

