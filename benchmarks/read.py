"""Time of one layer's decode-step read of packed state, per shipped spec, against dense SDPA; JSON out.

A read is what attention does with the compressed part of a layer's cache at one decoding step: scores of n
queries per KV head through the keys' codec, softmax, and the value mix through the values' codec. Codecs are
built with kvcompress.testing.make_codec from one layer's key and value pipelines of each spec (rvq gets
random codebooks of the spec's shape; a pruner observes Gaussian queries), and read two ways:

    estimator  the estimators the spec names (the decode estimator where it names none)
    decode     the decode estimator for both roles: decode the whole state to floats, then matmul

next to torch's scaled_dot_product_attention on float32 keys and values of the same shape. The machine is
shared and noisy, so every repeat times the three back to back and ratios are medians of per-repeat ratios.

    python benchmarks/read.py [SPEC ...] [--tokens 4096 8000] [--repeats 30] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from kvcompress import load_spec
from kvcompress.runtime import Observation
from kvcompress.testing import make_codec

ROOT = Path(__file__).parent.parent


def stage(method) -> dict | None:
    return None if method is None else method.model_dump(mode="json")


def random_codebook(pipeline):
    """A callable(ctx) giving random rvq codebooks of the pipeline's shape, or None without a codebook stage."""
    if pipeline.codebook is None:
        return None
    from kvcompress_rvq.testing import random_codebooks

    q = pipeline.quantizer
    return lambda ctx: random_codebooks(q.depth, q.codebook_size, q.group, q.layout)


def codec(pipeline, role: str, args: argparse.Namespace, decode: bool):
    return make_codec(
        stage(pipeline.quantizer), role=role, head_dim=args.head_dim, kv_heads=args.kv_heads, layer=args.layer,
        num_layers=args.layers, estimator=None if decode else stage(pipeline.estimator),
        transform=stage(pipeline.transform), codebook=random_codebook(pipeline), pruner=stage(pipeline.pruner),
    )


def clock(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench(path: Path, args: argparse.Namespace) -> list[dict]:
    spec = load_spec(path)
    spec.check_layers(args.layers)
    plan = spec.layer(args.layer)
    read_with = {
        "estimator": (codec(plan.keys, "keys", args, False), codec(plan.values, "values", args, False)),
        "decode": (codec(plan.keys, "keys", args, True), codec(plan.values, "values", args, True)),
    }
    keys_codec, values_codec = read_with["estimator"]
    block = keys_codec.token_block * values_codec.token_block
    rows = []
    for count in args.tokens:
        tokens = count - count % block
        generator = torch.Generator().manual_seed(0)
        shape = (1, args.kv_heads, tokens, args.head_dim)
        keys, values = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
        query = torch.randn(1, args.kv_heads, args.n, args.head_dim, generator=generator)
        observation = Observation(
            queries=torch.randn(1, args.kv_heads * args.n, 32, args.head_dim, generator=generator), pre_rope_keys=keys
        )
        key_state, value_state = keys_codec.encode(keys, observation), values_codec.encode(values, observation)
        scale = args.head_dim**-0.5

        def reader(pair):
            k, v = pair
            return lambda: v.mix(torch.softmax(k.scores(query, key_state) * scale, dim=-1), value_state)

        runs = {name: reader(pair) for name, pair in read_with.items()}
        runs["sdpa"] = lambda: torch.nn.functional.scaled_dot_product_attention(query, keys, values)
        exact = runs["sdpa"]()
        errors = {name: ((run() - exact).norm() / exact.norm()).item() for name, run in runs.items() if name != "sdpa"}
        for run in runs.values():  # warm-up (and compilation, where an estimator compiles)
            run()
        samples = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, run in runs.items():
                samples[name].append(clock(run))
        ms = {name: 1e3 * statistics.median(times) for name, times in samples.items()}
        ratio = {
            name: statistics.median(a / b for a, b in zip(samples[name], samples["sdpa"])) for name in read_with
        }
        rows.append({
            "spec": spec.name,
            "tokens": tokens,
            "estimators": [stage(p.estimator)["method"] if p.estimator else "decode" for p in (plan.keys, plan.values)],
            "estimator_ms": round(ms["estimator"], 4),
            "decode_ms": round(ms["decode"], 4),
            "sdpa_ms": round(ms["sdpa"], 4),
            "estimator_vs_sdpa": round(ratio["estimator"], 2),
            "decode_vs_sdpa": round(ratio["decode"], 2),
            "estimator_rel_error": errors["estimator"],
            "decode_rel_error": errors["decode"],
        })
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("specs", nargs="*", help="spec files (default: every file in specs/)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 8000])
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--n", type=int, default=3, help="queries per KV head (query heads per KV head x 1)")
    parser.add_argument("--layers", type=int, default=30, help="layers of the model the specs are built for")
    parser.add_argument("--layer", type=int, default=2, help="the layer whose pipelines are read")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 is steadier on a busy machine")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    paths = [Path(p) for p in args.specs] or sorted((ROOT / "specs").glob("*.yaml"))
    results = []
    for path in paths:
        results.extend(bench(path, args))
        print(json.dumps(results[-1]), file=sys.stderr)
    report = {
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "batch": 1,
        "kv_heads": args.kv_heads,
        "n": args.n,
        "head_dim": args.head_dim,
        "layer": args.layer,
        "results": results,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
