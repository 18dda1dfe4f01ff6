"""Speed and memory of each spec's codecs at long context, printed as JSON.

For every spec and context length: bytes per token from the stored state, encode throughput, and the time
of one decoding step of attention read from the compressed state through the layer's reader (what the
cache runs: a fused reader where one is installed, else the keys' estimator scores, softmax and the
values' estimator mix), the same step through the decode estimator (decode the state to floats, then
matmul), and torch's scaled_dot_product_attention on a float16 cache of the same shape (float32 on CPU,
where float16 matmuls are slow). The machine may be shared and noisy: every repeat times the three back to
back, and the ratios to SDPA are medians of per-repeat ratios. Runs on CUDA when present (the Triton
kernels are used there), otherwise on the CPU.

    python benchmarks/codecs.py [SPEC ...] [--contexts 1024 4096 16384] [--kv-heads 8 --head-dim 128] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from kvcompress import load_spec
from kvcompress.builtin_runtime import DecodeEstimator
from kvcompress.pipeline import EstimatorReader, build_codecs
from kvcompress.runtime import Observation

ROOT = Path(__file__).parent.parent


def clock(fn, device: torch.device) -> float:
    """Seconds of one fn() call (synchronized on CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def interleaved(runs: dict, repeats: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds of each run per repeat, the runs timed back to back in every repeat, after one warm-up."""
    for run in runs.values():
        run()
    samples = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            samples[name].append(clock(run, device))
    return samples


def bench_spec(path: Path, contexts: list[int], args: argparse.Namespace, device: torch.device) -> list[dict]:
    spec = load_spec(path)
    layer = build_codecs(spec, spec.min_layers(), args.head_dim, args.kv_heads)[0]
    # the same codecs read through the decode estimator: the state decoded to floats, then matmul
    decoding = EstimatorReader(*(replace(codec, estimator=DecodeEstimator(codec.quantizer)) for codec in (layer.keys, layer.values)))
    rows = []
    for context in contexts:
        tokens = context - context % layer.token_block
        generator = torch.Generator(device=device).manual_seed(0)
        shape = (1, args.kv_heads, tokens, args.head_dim)
        keys = torch.randn(shape, generator=generator, device=device)
        values = torch.randn(shape, generator=generator, device=device)
        query = torch.randn(1, args.kv_heads, args.group, args.head_dim, generator=generator, device=device)
        # What a pruner would observe: Gaussian prompt queries, and the keys as their own pre-RoPE form.
        prompt_queries = torch.randn(1, args.kv_heads * args.group, 32, args.head_dim, generator=generator, device=device)
        observation = Observation(queries=prompt_queries, pre_rope_keys=keys)

        def encode():
            return layer.keys.encode(keys, observation), layer.values.encode(values, observation)

        key_state, value_state = encode()
        scale = args.head_dim**-0.5
        reference_dtype = torch.float16 if device.type == "cuda" else torch.float32
        k_ref, v_ref, q_ref = keys.to(reference_dtype), values.to(reference_dtype), query.to(reference_dtype)
        runs = {
            "attention": lambda: layer.reader.attend(query, key_state, value_state, None, scale, None)[0],
            "decode": lambda: decoding.attend(query, key_state, value_state, None, scale, None)[0],
            "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q_ref, k_ref, v_ref),
        }
        exact = runs["sdpa"]().float()
        error = ((runs["attention"]() - exact).norm() / exact.norm()).item()
        samples = interleaved(runs, args.repeats, device)
        ms = {name: 1e3 * statistics.median(times) for name, times in samples.items()}
        ratio = {name: statistics.median(a / b for a, b in zip(samples[name], samples["sdpa"])) for name in ("attention", "decode")}
        stored = key_state.nbytes() + value_state.nbytes()
        rows.append({
            "spec": spec.name,
            "context": tokens,
            "bits_per_element": stored * 8 / (2 * keys.numel()),
            "bytes": stored,
            "fp16_bytes": 2 * keys.numel() * 2,
            "encode_tokens_per_s": tokens / statistics.median(interleaved({"encode": encode}, args.repeats, device)["encode"]),
            "attention_step_ms": ms["attention"],
            "decode_step_ms": ms["decode"],
            "sdpa_step_ms": ms["sdpa"],
            "attention_vs_sdpa": ratio["attention"],
            "decode_vs_sdpa": ratio["decode"],
            "sdpa_dtype": str(reference_dtype).removeprefix("torch."),
            "output_rel_error_vs_exact": error,
        })
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("specs", nargs="*", help="spec files (default: every file in specs/)")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--group", type=int, default=3, help="query heads per KV head (one decoding step)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 is steadier on a busy machine")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    paths = [Path(p) for p in args.specs] or sorted((ROOT / "specs").glob("*.yaml"))
    results = []
    for path in paths:
        try:
            results.extend(bench_spec(path, args.contexts, args, device))
        except Exception as exc:  # one spec that cannot run here (e.g. missing codebooks) must not hide the rest
            results.append({"spec": str(path), "error": f"{type(exc).__name__}: {exc}"})
    report = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "kv_heads": args.kv_heads,
        "head_dim": args.head_dim,
        "results": results,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
