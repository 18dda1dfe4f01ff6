"""The GPU check: kernel tests compiled on CUDA, every Triton path against the torch path, and decode speed against
SDPA on a float16 cache, as JSON and a markdown table.

On a machine with a CUDA GPU (`make gpu-check`):
1. pytest on the kernel test files: the Triton kernels compiled on CUDA tensors against their references;
2. per shipped spec, layer geometry (SmolLM2: 9 query heads, 3 KV heads, head_dim 64; Llama-3-8B: 32, 8, 128),
   context and batch: a layer of a CompressedCache filled with `context` tokens, then one decode step through the
   cache and attention path (layer.read() -> kvcompress.hf.attention.attend: whatever reader the cache uses, fused
   kernels included), once with KVCOMPRESS_KERNELS=triton and once with =torch (each filling its own cache, so the
   encode kernels are checked too: the relative difference of the outputs), and timed against SDPA on a float16
   cache of the same shape, interleaved (benchmarks/codecs.py);
3. end-to-end decode of SmolLM2 in float16 against its DynamicCache with SDPA (benchmarks/e2e.py).

--smoke runs the same code at tiny shapes, on a tiny random model and without pytest, where the kernel tests run
(kvcompress.testing.kernel_devices): on the CPU under TRITON_INTERPRET=1 without a GPU, compiled on CUDA with one.
`make test` runs it, to keep this script working where no GPU is.

    python benchmarks/gpu_check.py [--specs specs/kivi-2.yaml ...] [--contexts 4096 16384 65536 131072]
        [--batches 1 8] [--json benchmarks/results/gpu_check.json] [--markdown benchmarks/results/gpu_check.md]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
from contextlib import contextmanager
from functools import cache
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import torch

ROOT = Path(__file__).parent.parent
# Every test marked `triton` (kernel against reference), wherever a package keeps it.
KERNEL_TESTS = ["-m", "triton", "tests", *sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("plugins/*/tests"))]


class Geometry(NamedTuple):  # not a dataclass: the tests load this file as a module outside sys.modules
    name: str
    query_heads: int
    kv_heads: int
    head_dim: int


GEOMETRIES = (Geometry("smollm2", 9, 3, 64), Geometry("llama-3-8b", 32, 8, 128))
SMOKE_GEOMETRY = Geometry("tiny", 4, 2, 64)
# Relative difference allowed between a layer's output through the Triton and the torch paths: they differ only by
# float summation order (and a QJL sign bit where a projection is within rounding of zero).
PATHS_AGREE = 1e-3


@cache
def sibling(name: str) -> Any:
    """benchmarks/NAME.py as a module (benchmarks/ is not a package, and codecs.py shadows the stdlib's name)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", Path(__file__).parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextmanager
def kernels(choice: str) -> Iterator[None]:
    """KVCOMPRESS_KERNELS=choice inside the block (kvcompress_kernels.dispatch reads it at every call)."""
    from kvcompress_kernels.dispatch import OVERRIDE_ENV

    before = os.environ.get(OVERRIDE_ENV)
    os.environ[OVERRIDE_ENV] = choice
    try:
        yield
    finally:
        if before is None:
            del os.environ[OVERRIDE_ENV]
        else:
            os.environ[OVERRIDE_ENV] = before


def layer_config(spec: Any, geometry: Geometry) -> Any:
    """A Llama config of the geometry, deep enough that its last layer takes the spec's base pipeline."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=geometry.query_heads * geometry.head_dim, num_attention_heads=geometry.query_heads,
        num_key_value_heads=geometry.kv_heads, head_dim=geometry.head_dim, num_hidden_layers=spec.min_layers() + 1,
        intermediate_size=64, vocab_size=128,
    )


class DecodeStep:
    """The last layer of a CompressedCache holding `context` tokens, and one decode step over it through the
    cache and attention path; the new token is not stored, so every step is the same."""

    def __init__(self, spec: Any, geometry: Geometry, context: int, batch: int, device: torch.device, seed: int = 0):
        from kvcompress.hf.cache import CompressedCache

        self.layer = CompressedCache(spec, layer_config(spec, geometry)).layers[-1]
        generator = torch.Generator(device=device).manual_seed(seed)
        dtype = torch.float16 if device.type == "cuda" else torch.float32

        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=generator, device=device, dtype=dtype)

        # the dense cache SDPA reads: the stored tokens, then the new one (views of it, not copies: GPU memory)
        kv = (batch, geometry.kv_heads, context + 1, geometry.head_dim)
        self.dense = (randn(*kv), randn(*kv))
        self.keys, self.values = (x[:, :, :context] for x in self.dense)
        self.new = tuple(x[:, :, context:] for x in self.dense)
        self.query = randn(batch, geometry.query_heads, 1, geometry.head_dim)
        self.scale = geometry.head_dim**-0.5
        # the prompt's forward: what a pruner observes (its last 32 queries, the keys as their own pre-RoPE form)
        layer = self.layer
        layer.begin_forward()
        layer.update(self.keys, self.values)
        if "queries" in layer.observes:
            layer.observe("queries", randn(batch, geometry.query_heads, 32, geometry.head_dim))
        if "pre_rope_keys" in layer.observes:
            layer.observe("pre_rope_keys", self.keys)
        layer.read()
        layer.end_forward()

    def __call__(self) -> torch.Tensor:
        from kvcompress.hf.attention import attend

        layer = self.layer
        layer.begin_forward()
        layer.update(*self.new)
        segments, first = layer.read()
        output = attend(self.query, segments, first, None, self.scale)
        layer.abort_forward()
        return output

    def sdpa(self) -> torch.Tensor:
        """The same step on a dense cache."""
        keys, values = self.dense
        return torch.nn.functional.scaled_dot_product_attention(self.query, keys, values, scale=self.scale, enable_gqa=True)


def check_layer(spec: Any, geometry: Geometry, context: int, batch: int, device: torch.device, repeats: int) -> dict:
    """One row: the Triton and torch paths' outputs compared, and the decode step timed against SDPA."""
    with kernels("torch"):
        reference = DecodeStep(spec, geometry, context, batch, device)()
    with kernels("triton"):
        step = DecodeStep(spec, geometry, context, batch, device)
        output = step()
        samples = sibling("codecs").interleaved({"kvcompress": step, "sdpa": step.sdpa}, repeats, device)
    exact = step.sdpa().float()
    return {
        "spec": spec.name,
        "geometry": geometry.name,
        "context": context,
        "batch": batch,
        "triton_vs_torch": ((output.float() - reference.float()).norm() / reference.float().norm()).item(),
        "error_vs_exact": ((output.float().transpose(1, 2) - exact).norm() / exact.norm()).item(),
        "kvcompress_ms": 1e3 * statistics.median(samples["kvcompress"]),
        "sdpa_ms": 1e3 * statistics.median(samples["sdpa"]),
        "ratio": statistics.median(a / b for a, b in zip(samples["kvcompress"], samples["sdpa"])),
        "bytes": sum(step.layer.nbytes().values()),
        "fp16_bytes": 2 * 2 * step.keys.numel(),
    }


def run_kernel_tests() -> dict:
    """pytest on the kernel tests: compiled kernels on CUDA tensors (kvcompress.testing.kernel_devices)."""
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", *KERNEL_TESTS], cwd=ROOT, capture_output=True, text=True)
    return {"returncode": done.returncode, "summary": done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""}


def end_to_end(model: Any, specs: list[Any], contexts: list[int], batches: list[int], args: argparse.Namespace) -> list[dict]:
    """Decode ms/token of the model with each spec's cache against its DynamicCache (benchmarks/e2e.py)."""
    from kvcompress.eval.runners import BASELINE, Runner

    e2e = sibling("e2e")
    runners = [Runner(BASELINE, None)] + [Runner(spec.name, spec) for spec in specs]
    rows = []
    for batch in batches:
        prompt = torch.randint(0, model.config.vocab_size, (batch, max(contexts)), generator=torch.Generator().manual_seed(0))
        for row in e2e.benchmark(model, prompt, contexts, runners, decode=args.decode, repeats=args.e2e_repeats):
            rows.append({"batch": batch, **row})
    return rows


def failures(report: dict) -> list[str]:
    """What makes the check fail: kernel tests that failed, layers that raised, Triton and torch paths that differ."""
    found = []
    tests = report.get("kernel_tests")
    if tests and tests["returncode"]:
        found.append(f"kernel tests failed: {tests['summary']} (run pytest -m triton to see them)")
    for row in report["layers"]:
        where = f"{row['spec']} on a {row['geometry']} layer, {row['context']} tokens, batch {row['batch']}"
        if "error" in row:
            found.append(f"{where}: {row['error']}")
        elif "triton_vs_torch" in row and row["triton_vs_torch"] > PATHS_AGREE:
            found.append(f"{where}: the Triton and torch paths differ by {row['triton_vs_torch']:.1e} (relative)")
    return found


def markdown(layers: list[dict], e2e_rows: list[dict]) -> str:
    lines = ["| spec | layer | context | batch | kvcompress ms | SDPA ms (fp16 cache on CUDA) | ratio | triton vs torch | bytes / fp16 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in layers:
        if "error" in r or "skipped" in r:
            lines.append(f"| {r['spec']} | {r['geometry']} | {r['context']} | {r['batch']} | {r.get('error') or r['skipped']} | | | | |")
        else:
            lines.append(f"| {r['spec']} | {r['geometry']} | {r['context']} | {r['batch']} | {r['kvcompress_ms']:.3f} | "
                         f"{r['sdpa_ms']:.3f} | {r['ratio']:.2f} | {r['triton_vs_torch']:.1e} | {r['bytes'] / r['fp16_bytes']:.3f} |")
    lines += ["", "| config | context | batch | decode ms/token | ratio to DynamicCache + SDPA |", "|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['length']} | {r['batch']} | {r['decode_ms']:.2f} | {r['decode_ratio']:.2f} |" for r in e2e_rows]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--specs", nargs="+", metavar="SPEC", help="spec files (default: every specs/*.yaml)")
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384, 65536, 131072])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--decode", type=int, default=8, help="end-to-end tokens generated per run (default 8)")
    parser.add_argument("--e2e-repeats", type=int, default=2, help="end-to-end rounds over all configs (default 2)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes: on the CPU, interpreted, without a GPU; compiled on CUDA with one")
    parser.add_argument("--json", metavar="OUT", help="write the JSON here (default: stdout)")
    parser.add_argument("--markdown", metavar="OUT", help="write the markdown tables here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.contexts, args.batches, args.repeats, args.decode, args.e2e_repeats = [96], [1], 1, 3, 1
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    from kvcompress import KVCompressError, load_spec
    from kvcompress.testing import interpret_triton_without_gpu, kernel_devices

    interpret_triton_without_gpu()  # before any kernel module is imported; nothing where a GPU answers
    devices = kernel_devices()
    if args.smoke and devices:
        device, geometries = devices[0], (SMOKE_GEOMETRY,)
    elif torch.cuda.is_available():
        device, geometries = torch.device("cuda"), GEOMETRIES
    else:
        raise SystemExit("gpu_check needs a CUDA GPU (and Triton); --smoke runs its code on the CPU at tiny shapes")
    paths = [Path(p) for p in args.specs] if args.specs else sorted((ROOT / "specs").glob("*.yaml"))
    specs = [load_spec(path) for path in paths]
    report: dict[str, Any] = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter)",
                              "torch": torch.__version__}
    if not args.smoke:
        report["kernel_tests"] = run_kernel_tests()
    layers = []
    for spec in specs:
        for geometry in geometries:
            for context in args.contexts:
                for batch in args.batches:
                    where = {"spec": spec.name, "geometry": geometry.name, "context": context, "batch": batch}
                    try:
                        layers.append(check_layer(spec, geometry, context, batch, device, args.repeats))
                    except KVCompressError as exc:  # a spec this shape cannot take (codebooks of another head_dim)
                        layers.append({**where, "skipped": f"{type(exc).__name__}: {exc}"})
                    except Exception as exc:  # a kernel that fails here is a finding: reported, and the rest still run
                        layers.append({**where, "error": f"{type(exc).__name__}: {exc}"})
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    report["layers"] = layers
    if args.smoke:
        from kvcompress.testing import tiny_model

        model = tiny_model("llama", head_dim=64).to(device)
    else:
        from kvcompress.hf.loading import load_model

        model = load_model("smollm2", dtype=torch.float16)[0].to(device)
    e2e = sibling("e2e")
    from kvcompress.hf.cache import model_name

    runnable = [spec for spec in specs if not e2e.missing_codebooks(spec, model_name(model.config))]
    with kernels("triton"):
        report["end_to_end"] = end_to_end(model, runnable, args.contexts, args.batches, args)
    e2e.write_json(report, args.json)
    if args.markdown:
        Path(args.markdown).write_text(markdown(layers, report["end_to_end"]) + "\n")
    return report


if __name__ == "__main__":
    problems = failures(main())
    print("\n".join(problems) or "gpu check passed", file=sys.stderr)
    sys.exit(1 if problems else 0)
