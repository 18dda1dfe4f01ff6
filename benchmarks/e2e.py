"""End-to-end prefill and decode speed of a model with each spec's cache, against a DynamicCache, as JSON.

For each context length: the prompt (the first LENGTH tokens of a text) is prefilled in one forward pass
through a fresh cache, then DECODE tokens are generated greedily, one forward pass per token. Prefill is
timed whole; decode is the median milliseconds per token over the steps after the warm-up steps. The
baseline is a transformers DynamicCache with the model's own attention; each spec runs with the model
patched by kvcompress (kvcompress.patch, the scoped form of kvcompress.cache_for) and restored after.
Configurations are interleaved in rounds (baseline, then every spec, --repeats times) so that the
machine's load hits all alike, and each is reported as a ratio to the baseline of the same length. Before the
rounds, untimed: one baseline prefill of the longest prompt (a process's first large forward pays for memory it
maps once: up to 1.3x the next ones) and a short (256-token) prefill and decode step with every spec (its first use loads
codebooks and kernels).

--long-decode K also generates K tokens and more for the chosen lengths and specs (and the baseline),
reporting ms/token over a window of steps near the first generated token and one around the K-th: they
should differ only by the attention over the K added tokens.

    python benchmarks/e2e.py [--specs specs/kivi-2.yaml ...] [--lengths 4096 8000] [--decode 32]
        [--repeats 3] [--threads N] [--dtype float32] [--long-decode 1000] [--json OUT] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from kvcompress import KVCompressError, load_spec
from kvcompress.eval.command import check_unique_names, resolve_device
from kvcompress.eval.footprint import cache_figures
from kvcompress.eval.report import run_header
from kvcompress.eval.runners import BASELINE, Runner
from kvcompress.eval.text import pydoc_text, read_text
from kvcompress.hf.keywords import with_cache
from kvcompress.methods import LayerContext
from kvcompress.spec import CacheSpec

ROOT = Path(__file__).parent.parent
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def missing_codebooks(spec: CacheSpec, model: str | None) -> list[Path]:
    """Codebook files the spec names for `model` (top level and layer overrides; `{model}` expanded, relative to
    the spec file) that do not exist."""
    pipelines = [spec.keys, spec.values]
    pipelines += [part for override in spec.layers.values() for part in (override.keys, override.values) if part]
    base = str(Path(spec.source).parent) if spec.source else None
    where = LayerContext(layer=0, num_layers=1, role="keys", head_dim=1, kv_heads=1, spec_dir=base, model=model)
    paths = {where.resolve_path(p.codebook.path) for p in pipelines if getattr(p.codebook, "path", None)}
    return sorted(path for path in paths if not path.is_file())


def prompt_ids(tokenizer: Any, text: str, source: str, tokens: int) -> torch.Tensor:
    """The first `tokens` tokens of `text` as input ids [1, tokens], or an error if the text is shorter."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < tokens:
        raise KVCompressError(f"the text ({source}) has {len(ids)} tokens, fewer than the longest length {tokens}")
    return torch.tensor([ids[:tokens]], dtype=torch.long)


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def run_once(model: Any, new_cache: Callable[[], Any], prompt: torch.Tensor, steps: int) -> dict[str, Any]:
    """Prefill `prompt` into a fresh cache and decode `steps` tokens greedily: prefill seconds, the seconds of
    each decode step (step i feeds generated token i + 1; the prefill's last logit gives token 1), and the
    cache's bytes right after the prefill."""
    device = model.device
    prompt = prompt.to(device)
    with torch.inference_mode():
        cache = new_cache()
        given = with_cache(model, cache)
        start = _clock(device)
        out = model(input_ids=prompt, **given, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1)
        prefill = _clock(device) - start
        figures = cache_figures(model, cache)
        step_seconds = []
        for _ in range(steps):
            start = _clock(device)
            out = model(input_ids=token[:, None], **given, use_cache=True)
            token = out.logits[:, -1].argmax(-1)
            step_seconds.append(_clock(device) - start)
    return {"prefill_s": prefill, "step_s": step_seconds, **figures}


def _ms(seconds: list[float]) -> float:
    return 1e3 * statistics.median(seconds)


def benchmark(
    model: Any,
    prompt: torch.Tensor,
    lengths: list[int],
    runners: list[Runner],
    decode: int = 32,
    repeats: int = 3,
    warmup: int = 2,
    long_decode: int | None = None,
    long_window: int = 8,
    long_lengths: list[int] | None = None,
    long_names: list[str] | None = None,
    log: Callable[[str], None] = lambda line: None,
) -> list[dict[str, Any]]:
    """One row per length and runner (the first runner must be the baseline): prefill_s, decode_ms and their
    ratios to the baseline of the same length, the cache's bytes after the prefill, and with `long_decode`
    the ms/token near the first and around the long_decode-th generated token."""
    if runners[0].spec is not None:
        raise ValueError("the first runner must be the baseline (spec None)")
    if decode <= warmup:
        raise KVCompressError(f"--decode {decode} must exceed the {warmup} warm-up steps")
    if long_decode is not None and long_decode < warmup + 2 * long_window:
        raise KVCompressError(f"--long-decode {long_decode} must be at least {warmup + 2 * long_window} tokens")
    log("warm-up (untimed)")
    for runner in runners:
        with runner.session(model) as new_cache:
            run_once(model, new_cache, prompt[:, : max(lengths) if runner.spec is None else min(256, *lengths)], 1)
    rows = []
    for length in lengths:
        samples: dict[str, list[dict[str, Any]]] = {runner.name: [] for runner in runners}
        for round_index in range(repeats):
            for runner in runners:
                log(f"length {length} round {round_index + 1}/{repeats}: {runner.name}")
                with runner.session(model) as new_cache:
                    samples[runner.name].append(run_once(model, new_cache, prompt[:, :length], decode))
        by_name = {}
        for runner in runners:
            runs = samples[runner.name]
            steps = [s for run in runs for s in run["step_s"][warmup:]]
            by_name[runner.name] = {
                "length": length,
                "name": runner.name,
                "source": runner.spec.source if runner.spec is not None else None,
                "prefill_s": statistics.median(run["prefill_s"] for run in runs),
                "decode_ms": _ms(steps),
                # The mean counts the steps that move a block of the window into packed form.
                "decode_mean_ms": 1e3 * statistics.fmean(steps),
                "decode_steps_timed": len(steps),
                "prefill_runs_s": [run["prefill_s"] for run in runs],
                **{key: runs[0][key] for key in ("cache_bytes", "fp16_bytes", "bits_per_element")},
            }
        base = by_name[BASELINE]
        for row in by_name.values():
            row["prefill_ratio"] = row["prefill_s"] / base["prefill_s"]
            row["decode_ratio"] = row["decode_ms"] / base["decode_ms"]
        if long_decode is not None and (long_lengths is None or length in long_lengths):
            chosen = [r for r in runners if r.spec is None or long_names is None or r.name in long_names]
            for runner in chosen:
                log(f"length {length} long decode {long_decode}: {runner.name}")
                with runner.session(model) as new_cache:
                    run = run_once(model, new_cache, prompt[:, :length], long_decode + long_window // 2)
                by_name[runner.name]["long_decode"] = long_windows(run["step_s"], long_decode, long_window, warmup)
            for runner in chosen:
                window = by_name[runner.name]["long_decode"]
                for key in ("first_ms", "kth_ms"):
                    window[key.replace("_ms", "_ratio")] = window[key] / base["long_decode"][key]
        rows.extend(by_name.values())
    return rows


def long_windows(step_seconds: list[float], k: int, window: int, warmup: int) -> dict[str, Any]:
    """ms/token over `window` steps after the warm-up (near the first generated token) and over `window`
    steps centred on the one that feeds the k-th generated token (step k - 1, counting from 0)."""
    first = (warmup, warmup + window)
    kth = (k - 1 - window // 2, k - 1 - window // 2 + window)
    return {
        "k": k,
        "window": window,
        # 1-based generated tokens fed by the steps of each window
        "first_tokens": [first[0] + 1, first[1]],
        "kth_tokens": [kth[0] + 1, kth[1]],
        "first_ms": _ms(step_seconds[first[0] : first[1]]),
        "kth_ms": _ms(step_seconds[kth[0] : kth[1]]),
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table (long-decode columns when any row has them)."""
    long = any("long_decode" in row for row in rows)
    titles = ["length", "config", "prefill s", "prefill ratio", "decode ms/token", "decode ratio", "mean ms/token",
              "cache MiB", "fp16 MiB"]
    if long:
        k = next(row["long_decode"]["k"] for row in rows if "long_decode" in row)
        titles += ["first token ms", f"token {k} ms", f"token {k} ratio"]
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    for row in rows:
        cells = [str(row["length"]), row["name"], f"{row['prefill_s']:.2f}", f"{row['prefill_ratio']:.2f}",
                 f"{row['decode_ms']:.1f}", f"{row['decode_ratio']:.2f}", f"{row['decode_mean_ms']:.1f}",
                 f"{row['cache_bytes'] / 2**20:.1f}", f"{row['fp16_bytes'] / 2**20:.1f}"]
        if long:
            w = row.get("long_decode")
            cells += [f"{w['first_ms']:.1f}", f"{w['kth_ms']:.1f}", f"{w['kth_ratio']:.2f}"] if w else ["-"] * 3
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(report: dict[str, Any], path: str | None) -> None:
    """The report as indented JSON in `path` (its folder made), or on stdout without one."""
    text = json.dumps(report, indent=2)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")
    else:
        print(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--specs", nargs="+", metavar="SPEC", help="spec files (default: every specs/*.yaml)")
    parser.add_argument("--model", default="smollm2", help="smollm2 (default) or a local transformers model directory")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--device", default="auto", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--text", metavar="FILE", help="UTF-8 text of the prompts (default: Python's pydoc topics)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8000], help="prompt tokens (default 4096 8000)")
    parser.add_argument("--decode", type=int, default=32, help="tokens generated per run (default 32)")
    parser.add_argument("--warmup", type=int, default=2, help="decode steps left out of the median (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over all configurations (default 3)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's default)")
    parser.add_argument("--long-decode", type=int, metavar="K", help="also time the steps near the K-th generated token")
    parser.add_argument("--long-window", type=int, default=8, help="steps per long-decode window (default 8)")
    parser.add_argument("--long-lengths", type=int, nargs="+", help="lengths of the long decode (default: all)")
    parser.add_argument("--long-specs", nargs="+", metavar="NAME", help="spec names of the long decode (default: all)")
    parser.add_argument("--json", metavar="OUT", help="write the JSON here instead of stdout")
    parser.add_argument("--markdown", action="store_true", help="also print the results as a markdown table")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    paths = [Path(p) for p in args.specs] if args.specs else sorted((ROOT / "specs").glob("*.yaml"))
    specs, skipped = [], []
    for path in paths:
        spec = load_spec(path)
        missing = missing_codebooks(spec, args.model)
        if missing:
            names = ", ".join(map(str, missing))
            skipped.append({"spec": str(path), "reason": f"codebook file {names} missing; calibrate it with `make demo`"})
            print(f"skipping {path}: {skipped[-1]['reason']}", file=sys.stderr)
        else:
            specs.append(spec)
    check_unique_names(specs)
    text, source = read_text(args.text, default=pydoc_text)
    device = resolve_device(args.device)

    from kvcompress.hf.loading import load_model

    model, tokenizer = load_model(args.model, dtype=DTYPES[args.dtype])
    model.to(device)
    prompt = prompt_ids(tokenizer, text, source, max(args.lengths))
    runners = [Runner(BASELINE, None)] + [Runner(spec.name, spec) for spec in specs]
    settings = {key: getattr(args, key) for key in ("lengths", "decode", "warmup", "repeats", "long_decode",
                                                     "long_window", "long_lengths", "long_specs")}
    header = run_header(args.model, model, source, "e2e", settings)
    rows = benchmark(
        model, prompt, args.lengths, runners, decode=args.decode, repeats=args.repeats, warmup=args.warmup,
        long_decode=args.long_decode, long_window=args.long_window, long_lengths=args.long_lengths,
        long_names=args.long_specs, log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    write_json({"header": header, "skipped": skipped, "results": rows}, args.json)
    if args.markdown:
        print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
