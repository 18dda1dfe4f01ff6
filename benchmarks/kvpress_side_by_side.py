"""Token eviction side by side with kvpress, the anchor: kvpress 0.5's StreamingLLM, SnapKV and KNorm presses
and kvcompress's evictors of the same names on the default model (SmolLM2-135M-Instruct), same tokens, same
protocol; quality and the bytes each cache actually holds, as JSON and a markdown table.

kvpress runs in its own virtual environment (benchmarks/.venv-kvpress, created on first use with kvpress 0.5.x,
the transformers it supports and this environment's torch version), through benchmarks/kvpress_worker.py.
Both sides read the converted checkpoint kvcompress.hf.loading makes (offline) and the token ids tokenized
here once.

Protocol, for each method and evicted fraction (0: no eviction; kvpress without a press, kvcompress with a
float32 cache that evicts nothing):
    perplexity: the first --context tokens of the text are prefilled with eviction, then --continuation tokens
        are scored one token per forward (kvcompress.eval.perplexity with chunk 1; kvpress evicts only in a
        prefill, kvcompress only at the end of a forward of several tokens, so neither evicts again);
    bytes: what the cache holds right after that prefill (kvpress: the DynamicCache's key and value
        tensors; kvcompress: cache.nbytes() less the per-layer constants);
    needle: kvcompress.eval.needle's trials (the question after the document, in the chat template), the
        whole prompt prefilled with eviction, then a greedy answer; correct when it states the number.
kvcompress's specs store tokens as float32 (the core's `float` quantizer, no full-precision window), so only
eviction differs from a plain cache. Both keep int(T x (1 - ratio)) tokens per layer and KV head of a prompt of
T tokens, sinks and SnapKV's observation window included (kvcompress: `budget`, set per prompt).

    python benchmarks/kvpress_side_by_side.py [--quick] [--text FILE] [--context 1024] [--continuation 64]
        [--lengths 2048,4096] [--depths 0.5] [--ratios 0.25 0.5 0.75] [--methods streaming snapkv knorm]
        [--threads N] [--pip-args="--index-url URL"] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

import kvcompress
from kvcompress import KVCompressError
from kvcompress.eval.generation import greedy_reply
from kvcompress.eval.needle import NeedleSettings, Trial, build_trials, retrieved
from kvcompress.eval.perplexity import Protocol, continuation_nll, tokenize_text
from kvcompress.eval.report import run_header
from kvcompress.eval.text import read_text
from kvcompress.spec import CacheSpec, parse_spec

HERE = Path(__file__).parent
VENV = HERE / ".venv-kvpress"
WORKER = HERE / "kvpress_worker.py"
KVPRESS = "kvpress==0.5.*"
# Per method: kvpress's press options and kvcompress's spec fields, both at kvpress's defaults.
METHODS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "streaming": ({"n_sink": 4}, {"sinks": 4, "evict": {"method": "streaming"}}),
    "snapkv": ({"window_size": 64, "kernel_size": 5}, {"evict": {"method": "snapkv", "window": 64, "kernel": 5}}),
    "knorm": ({}, {"evict": {"method": "knorm"}}),
}
FLOAT32 = {"quantizer": {"method": "float", "dtype": "float32"}}


def our_spec(method: str, ratio: float, tokens: int) -> CacheSpec:
    """kvcompress's spec for `method` evicting `ratio` of a prompt of `tokens` tokens ("none": a float32 cache,
    no eviction). The budget is kvpress's count, int(tokens x (1 - ratio)): `keep: 1 - ratio` would round
    to the nearest token instead, one more than kvpress where the fraction is .5 or above."""
    # compress_run 1: no full-precision tail either, so every token is a candidate, as in kvpress
    fields: dict[str, Any] = {"name": f"{method}-{ratio:g}", "window": 0, "sinks": 0, "compress_run": 1,
                              "keys": FLOAT32, "values": FLOAT32}
    if method != "none":
        extra = METHODS[method][1]
        fields.update(extra, evict={**extra["evict"], "budget": max(1, int(tokens * (1 - ratio)))})
    return parse_spec(fields)


def runs(methods: list[str], ratios: list[float]) -> list[dict[str, Any]]:
    """The (method, ratio) pairs measured: no eviction first, then every method at every ratio."""
    return [{"method": "none", "ratio": 0.0}] + [{"method": m, "ratio": r} for m in methods for r in ratios]


def _env() -> dict[str, str]:
    """The environment of the kvpress side: no PYTHONPATH (it must not see kvcompress), no network for models."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    return {**env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _kvpress_version(python: Path) -> str | None:
    probe = subprocess.run([str(python), "-c", "from importlib.metadata import version; print(version('kvpress'))"],
                           capture_output=True, text=True, env=_env())
    return probe.stdout.strip() if probe.returncode == 0 else None


def ensure_venv(venv: Path, pip_args: list[str], log: Callable[[str], None]) -> Path:
    """The python of a virtual environment holding kvpress 0.5.x: `venv`, created (or completed) when needed.
    torch is pinned to this environment's version so both sides run the same torch; pip picks the
    transformers kvpress accepts."""
    python = venv / "bin" / "python"
    found = _kvpress_version(python) if python.exists() else None
    if found is not None and found.startswith("0.5."):
        return python
    fix = (f"fix the cause (pip needs PyPI or a mirror; pass --pip-args=\"--index-url URL\" for another index) "
           f"or delete {venv} and run again")
    if not python.exists():
        log(f"creating {venv}")
        made = subprocess.run([sys.executable, "-m", "venv", str(venv)], env=_env())
        if made.returncode != 0:
            raise KVCompressError(f"`{sys.executable} -m venv {venv}` failed (exit {made.returncode}); {fix}")
    torch_pin = f"torch=={torch.__version__.split('+')[0]}"
    command = [str(python), "-m", "pip", "install", torch_pin, KVPRESS, *pip_args]
    log(f"installing: {shlex.join(command)}")
    installed = subprocess.run(command, env=_env())
    if installed.returncode != 0:
        raise KVCompressError(f"`{shlex.join(command)}` failed (exit {installed.returncode}, pip's output above); {fix}")
    found = _kvpress_version(python)
    if found is None or not found.startswith("0.5."):
        raise KVCompressError(f"{venv} holds kvpress {found} after installing {KVPRESS}; {fix}")
    return python


@contextmanager
def kvpress_worker(python: Path, request: dict[str, Any], scratch: Path) -> Iterator[Callable[[], dict[str, Any]]]:
    """The worker started on `request` (see kvpress_worker.py) in the background; yields the call that waits
    for its result, and stops it if the block fails first. Both sides run at once: they measure quality and
    bytes, not time."""
    request_path, result_path = scratch / "request.json", scratch / "result.json"
    request_path.write_text(json.dumps(request))
    worker = subprocess.Popen([str(python), str(WORKER), str(request_path), str(result_path)], env=_env())

    def result() -> dict[str, Any]:
        if worker.wait() != 0:
            raise KVCompressError(f"the kvpress worker failed (exit {worker.returncode}, its output above)")
        return json.loads(result_path.read_text())

    try:
        yield result
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()


def held_bytes(cache: Any) -> int:
    """Bytes a kvcompress cache holds for its tokens: nbytes() less the per-layer constants."""
    parts = cache.nbytes()
    return parts["total"] - parts["constants"]


def run_ours(
    model: Any, tokenizer: Any, ppl_ids: torch.Tensor, protocol: Protocol, trials: list[Trial],
    max_new_tokens: int, pairs: list[dict[str, Any]], log: Callable[[str], None] = lambda line: None,
) -> list[dict[str, Any]]:
    """kvcompress's rows, in the worker's form: per (method, ratio), the continuation's NLL and the bytes held
    after the prefill, and the needle replies (scored)."""
    rows = []
    for pair in pairs:
        log(f"kvcompress: {pair['method']} {pair['ratio']}")
        started = time.perf_counter()
        with kvcompress.patch(model, our_spec(pair["method"], pair["ratio"], protocol.context)) as patched:
            cache = patched.cache()
            after_prefill: list[int] = []

            def record() -> None:
                # continuation_nll calls this after the prefill, then after every token: keep the first
                if not after_prefill:
                    after_prefill.append(held_bytes(cache))

            nll, scored = continuation_nll(model, ppl_ids, protocol, cache, step=record)
            needle = []
            for trial in trials:
                spec = our_spec(pair["method"], pair["ratio"], trial.input_ids.shape[1])
                reply = greedy_reply(model, tokenizer, trial.input_ids, patched.cache(spec), max_new_tokens)
                needle.append({"reply": reply, "correct": retrieved(reply, trial.number)})
        rows.append({**pair, "ppl": {"nll": nll, "scored": scored, "bytes": after_prefill[0]}, "needle": needle,
                     "seconds": time.perf_counter() - started})
    return rows


def score_kvpress(tokenizer: Any, rows: list[dict[str, Any]], trials: list[Trial]) -> None:
    """Decode and score the worker's needle replies as kvcompress.eval.generation.greedy_reply and needle.retrieved do."""
    for row in rows:
        for reply, trial in zip(row["needle"], trials):
            reply["reply"] = tokenizer.decode(reply.pop("reply_ids"), skip_special_tokens=True).strip()
            reply["correct"] = retrieved(reply["reply"], trial.number)


def compare(ours: list[dict[str, Any]], theirs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (method, ratio): both sides' perplexity, needle score, and bytes held (also as a fraction of
    the same side's no-eviction cache), and how many needle replies are the same text."""
    base = {"ours": ours[0]["ppl"]["bytes"], "kvpress": theirs[0]["ppl"]["bytes"]}
    table = []
    for mine, other in zip(ours, theirs):
        row: dict[str, Any] = {"method": mine["method"], "ratio": mine["ratio"]}
        for side, result in (("ours", mine), ("kvpress", other)):
            ppl = result["ppl"]
            row[f"ppl_{side}"] = math.exp(ppl["nll"] / ppl["scored"])
            row[f"needle_{side}"] = sum(a["correct"] for a in result["needle"])
            row[f"bytes_{side}"] = ppl["bytes"]
            row[f"held_{side}"] = ppl["bytes"] / base[side]
        row["ppl_delta_pct"] = 100 * (row["ppl_ours"] - row["ppl_kvpress"]) / row["ppl_kvpress"]
        row["trials"] = len(mine["needle"])
        row["same_replies"] = sum(a["reply"] == b["reply"] for a, b in zip(mine["needle"], other["needle"]))
        table.append(row)
    return table


def markdown(table: list[dict[str, Any]]) -> str:
    """The comparison as a markdown table."""
    titles = ["method", "evicted", "ppl kvpress", "ppl ours", "ppl diff %", "needle kvpress", "needle ours",
              "same replies", "KiB kvpress", "held kvpress", "KiB ours", "held ours"]
    lines = ["| " + " | ".join(titles) + " |", "|---|" + "---:|" * (len(titles) - 1)]
    for row in table:
        n = row["trials"]
        cells = [row["method"], f"{row['ratio']:.0%}", f"{row['ppl_kvpress']:.3f}", f"{row['ppl_ours']:.3f}",
                 f"{row['ppl_delta_pct']:+.2f}", f"{row['needle_kvpress']}/{n}", f"{row['needle_ours']}/{n}",
                 f"{row['same_replies']}/{n}", f"{row['bytes_kvpress'] / 1024:.0f}", f"{row['held_kvpress']:.3f}",
                 f"{row['bytes_ours'] / 1024:.0f}", f"{row['held_ours']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny context, one needle, ratio 0.5")
    parser.add_argument("--text", metavar="FILE", help="UTF-8 text of both tasks (default: a license text from the system)")
    parser.add_argument("--context", type=int, default=1024, help="perplexity: tokens prefilled with eviction (default 1024)")
    parser.add_argument("--continuation", type=int, default=64, help="perplexity: tokens scored after it (default 64)")
    parser.add_argument("--lengths", default="2048,4096", help="needle: document lengths in tokens (default 2048,4096)")
    parser.add_argument("--depths", default="0.5", help="needle: needle depths, fractions of the document (default 0.5)")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="needle: answer tokens (default 24)")
    parser.add_argument("--seed", type=int, default=0, help="needle: seed of the hidden numbers")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5, 0.75], help="evicted fractions")
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=list(METHODS))
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                        help="torch threads of each side (default: half the CPUs, as both sides run at once)")
    parser.add_argument("--venv", type=Path, default=VENV, help=f"kvpress's virtual environment (default {VENV})")
    parser.add_argument("--pip-args", default="", help="extra arguments for pip when it installs kvpress, e.g. --pip-args=\"--index-url URL\"")
    parser.add_argument("--json", type=Path, default=HERE / "results" / "kvpress_side_by_side.json",
                        help="where the JSON goes (default benchmarks/results/kvpress_side_by_side.json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.context, args.continuation, args.lengths, args.depths, args.ratios = 256, 8, "512", "0.5", [0.5]
    if any(not 0 < r < 1 for r in args.ratios):
        parser.error(f"--ratios must lie strictly between 0 and 1, got {args.ratios}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr, flush=True)
    torch.set_num_threads(args.threads)
    python = ensure_venv(args.venv, shlex.split(args.pip_args), log)

    from kvcompress.hf.loading import ensure_converted, load_model

    model_dir = ensure_converted()  # the checkpoint both sides load
    model, tokenizer = load_model(str(model_dir), dtype=torch.float32)
    text, source = read_text(args.text)
    protocol = Protocol(args.context, args.continuation, chunk=1)
    ppl_ids = tokenize_text(tokenizer, text, protocol, source)
    settings = NeedleSettings.from_strings(args.lengths, args.depths, args.max_new_tokens, args.seed)
    trials = build_trials(tokenizer, text, source, settings)
    pairs = runs(args.methods, args.ratios)

    request = {
        "model": str(model_dir), "threads": torch.get_num_threads(), "runs": pairs,
        "options": {method: options for method, (options, _) in METHODS.items()},
        "context": protocol.context, "ppl_ids": ppl_ids[0].tolist(),
        "needle_ids": [trial.input_ids[0].tolist() for trial in trials], "max_new_tokens": args.max_new_tokens,
    }
    with tempfile.TemporaryDirectory(prefix="kvpress-side-") as scratch, \
            kvpress_worker(python, request, Path(scratch)) as kvpress_result:
        ours = run_ours(model, tokenizer, ppl_ids, protocol, trials, args.max_new_tokens, pairs, log)
        theirs = kvpress_result()
    score_kvpress(tokenizer, theirs["rows"], trials)
    table = compare(ours, theirs["rows"])

    header = run_header(str(model_dir), model, source, "kvpress side by side",
                        {**asdict(protocol), **asdict(settings), "ratios": args.ratios})
    header["kvpress_side"] = {"versions": theirs["versions"], "torch_threads": theirs["torch_threads"], "venv": str(args.venv)}
    trial_rows = [{"number": t.number, "length": t.length, "depth": t.depth, "prompt_tokens": t.input_ids.shape[1]} for t in trials]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"header": header, "trials": trial_rows, "table": table, "kvcompress": ours,
                                     "kvpress": theirs["rows"]}, indent=2) + "\n")
    print(markdown(table))
    v, kv = header["versions"], theirs["versions"]
    print(f"\nkvcompress {v['kvcompress']} (transformers {v['transformers']}, torch {v['torch']}) vs kvpress {kv['kvpress']} "
          f"(transformers {kv['transformers']}, torch {kv['torch']}); {header['machine']['processor']} x "
          f"{header['machine']['cpu_count']}; JSON in {args.json}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KVCompressError as exc:
        sys.exit(f"error: {exc}")
