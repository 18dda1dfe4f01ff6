"""Speed and memory of each spec's codecs at long context, printed as JSON.

For every spec and context length: bytes per token from the stored state, encode throughput, and the time
of one decoding step of attention read from the compressed state (scores through the keys' estimator,
softmax, value mix through the values' estimator), next to torch's scaled_dot_product_attention on a
float16 cache of the same shape (float32 on CPU, where float16 matmuls are slow). Runs on CUDA when
present (the Triton kernels are used there), otherwise on the CPU.

    python benchmarks/codecs.py [SPEC ...] [--contexts 1024 4096 16384] [--kv-heads 8 --head-dim 128]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from kvcompress import load_spec
from kvcompress.pipeline import build_codecs
from kvcompress.runtime import Observation

ROOT = Path(__file__).parent.parent


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of fn() over `repeats` runs after one warm-up."""
    fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return sorted(samples)[len(samples) // 2]


def bench_spec(path: Path, contexts: list[int], args: argparse.Namespace, device: torch.device) -> list[dict]:
    spec = load_spec(path)
    layer = build_codecs(spec, spec.min_layers(), args.head_dim, args.kv_heads)[0]
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

        def step():
            weights = torch.softmax(layer.keys.scores(query, key_state).float() * scale, dim=-1)
            return layer.values.mix(weights, value_state)

        reference_dtype = torch.float16 if device.type == "cuda" else torch.float32
        k_ref, v_ref, q_ref = keys.to(reference_dtype), values.to(reference_dtype), query.to(reference_dtype)

        def sdpa():
            return torch.nn.functional.scaled_dot_product_attention(q_ref, k_ref, v_ref)

        error = ((step() - sdpa().float()).norm() / sdpa().float().norm()).item()
        stored = key_state.nbytes() + value_state.nbytes()
        rows.append({
            "spec": spec.name,
            "context": tokens,
            "bits_per_element": stored * 8 / (2 * keys.numel()),
            "bytes": stored,
            "fp16_bytes": 2 * keys.numel() * 2,
            "encode_tokens_per_s": tokens / timed(encode, args.repeats, device),
            "attention_step_ms": 1e3 * timed(step, args.repeats, device),
            "sdpa_step_ms": 1e3 * timed(sdpa, args.repeats, device),
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
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
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
