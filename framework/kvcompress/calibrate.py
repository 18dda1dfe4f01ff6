"""`kvcompress calibrate SPEC --model M [--text FILE] --out FILE`: learn a spec's codebooks from a model.

Runs the model over calibration text, collects every layer's keys and values as the cache stores them
(kvcompress.hf.collect), passes them through each (layer, role) pipeline's transform, and asks its codebook
method to learn from what the quantizer will see. (A pruner before a codebook is refused at validation: the
channels it keeps change with every prompt.)

The file written is safetensors (never pickle):
    tensors   "layers.{layer}.{role}.{name}" for each tensor the learner returns
    metadata  format    "kvcompress-codebooks/1"
              model     the model's name or path as transformers records it (config._name_or_path)
              spec      the spec's name; spec_file: the spec file
              num_layers, head_dim, kv_heads: the model's cache geometry
              entries   JSON: "{layer}.{role}" -> {"quantizer": stage dict, "codebook": stage dict,
                                                    "transform": stage dict or null}
              text, tokens, seconds: what calibration read and how long it took
Codebook methods read it back in their factories and check it against the model and spec they serve.

The default calibration text is Python's pydoc topics, kept apart from the text `kvcompress eval` measures on.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from kvcompress.errors import KVCompressError
from kvcompress.hf.loading import DTYPES, MODEL_HELP
from kvcompress.methods import DEFAULT_MODEL, ROLES, LayerContext
from kvcompress.plugins import Registry, get_registry
from kvcompress.spec import CacheSpec, load_spec

FILE_FORMAT = "kvcompress-codebooks/1"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("spec", metavar="SPEC", help="spec file whose codebook stages to learn")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="the dtype the model runs in (default float32)")
    parser.add_argument(
        "--text", metavar="PATH",
        help="calibration text (UTF-8), a file or a directory of files; default: Python's pydoc topics, apart from "
        "the evaluation text",
    )
    parser.add_argument("--out", metavar="FILE", required=True, help="codebook file to write (safetensors)")
    parser.add_argument("--tokens", type=int, default=4096, help="key/value positions collected per layer")
    parser.add_argument("--context", type=int, default=1024, help="tokens per forward window")
    parser.add_argument(
        "--threads", type=int,
        help="torch CPU threads (default: torch's choice; 1 is faster on a machine busy with other work)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def calibration_text(path: str | None) -> tuple[str, str]:
    """(text, source): the --text file, or Python's pydoc topics (kept apart from eval's license text)."""
    from kvcompress.eval.text import pydoc_text, read_text

    return read_text(path, default=pydoc_text)


def learn_plan(spec: CacheSpec, num_layers: int, registry: Registry) -> list[tuple[int, str, Any, Any]]:
    """(layer, role, codebook method, pipeline) for every pipeline whose codebook stage learns."""
    plan = []
    for layer in range(num_layers):
        resolved = spec.layer(layer)
        for role in ROLES:
            pipeline = getattr(resolved, role)
            if pipeline.codebook is None:
                continue
            method = registry.get("codebook", pipeline.codebook.method)
            if method.learn is not None:
                plan.append((layer, role, method, pipeline))
    return plan


def calibrate(
    spec: CacheSpec,
    model: Any,
    input_ids: Any,
    tokens: int,
    context: int,
    registry: Registry | None = None,
    progress: bool = True,
) -> tuple[dict[str, Any], dict[str, str]]:
    """(tensors, metadata) of the codebook file for `spec` on `model`, learned from input_ids [n]."""
    from tqdm.auto import tqdm

    from kvcompress.hf.cache import model_geometry
    from kvcompress.hf.collect import collect_kv
    from kvcompress.pipeline import build_transform

    registry = registry or get_registry()
    geometry = model_geometry(model.config)
    spec.check_layers(geometry.num_layers)
    plan = learn_plan(spec, geometry.num_layers, registry)
    if not plan:
        raise KVCompressError(
            f"spec {spec.name!r} has no codebook stage with a learner; nothing to calibrate "
            "(add e.g. codebook: {method: kmeans, path: ...} to a pipeline whose quantizer needs one)"
        )
    model_name = getattr(model.config, "_name_or_path", None) or "unknown"
    spec_dir = str(Path(spec.source).resolve().parent) if spec.source else None
    collected = collect_kv(model, input_ids, tokens, context=context, skip=spec.sinks, progress=progress)
    tensors: dict[str, Any] = {}
    entries: dict[str, dict[str, Any]] = {}
    for layer, role, method, pipeline in tqdm(plan, desc="learning codebooks", unit="codebook", disable=not progress):
        samples = collected[layer][ROLES.index(role)]  # [tokens, kv_heads, head_dim]
        ctx = LayerContext(
            layer=layer, num_layers=geometry.num_layers, role=role, head_dim=geometry.head_dim,
            kv_heads=geometry.kv_heads, spec_dir=spec_dir, model=model_name, transform=pipeline.transform,
        )
        if pipeline.transform is not None:
            # the transform's [batch, heads, tokens, head_dim] layout, so per-head transforms see their heads
            transform = build_transform(pipeline.transform, ctx, registry)
            samples = transform.forward(samples.transpose(0, 1).unsqueeze(0))[0].transpose(0, 1)
        learned = method.learn(pipeline.codebook, pipeline.quantizer, samples.reshape(-1, geometry.head_dim), ctx)
        for name, tensor in learned.items():
            tensors[f"layers.{layer}.{role}.{name}"] = tensor.detach().cpu().contiguous()
        entries[f"{layer}.{role}"] = {
            "quantizer": pipeline.quantizer.model_dump(mode="json"),
            "codebook": pipeline.codebook.model_dump(mode="json"),
            "transform": pipeline.transform.model_dump(mode="json") if pipeline.transform is not None else None,
        }
    metadata = {
        "format": FILE_FORMAT,
        "model": model_name,
        "spec": spec.name,
        "spec_file": spec.source or "",
        "num_layers": str(geometry.num_layers),
        "head_dim": str(geometry.head_dim),
        "kv_heads": str(geometry.kv_heads),
        "tokens": str(tokens),
        "entries": json.dumps(entries, sort_keys=True),
    }
    return tensors, metadata


def save(path: Path, tensors: dict[str, Any], metadata: dict[str, str]) -> None:
    """Write the file atomically (a temporary file renamed over the target)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(tensors, str(scratch), metadata=metadata)
        scratch.replace(path)
    finally:
        scratch.unlink(missing_ok=True)


def run(args: argparse.Namespace) -> int:
    import torch

    from kvcompress.hf.loading import load_model, torch_dtype

    if args.threads is not None:
        if args.threads < 1:
            raise KVCompressError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.tokens < 1:
        raise KVCompressError(f"--tokens must be at least 1, got {args.tokens}")
    spec = load_spec(args.spec)  # validated before the model loads
    text, source = calibration_text(args.text)
    started = time.perf_counter()
    model, tokenizer = load_model(args.model, torch_dtype(args.dtype))
    # Only as much text as the windows need is tokenized (pydoc topics is ~1 MB); 16 characters per token
    # is far above any tokenizer's average, and the full text is the fallback.
    windows = -(-args.tokens // max(1, args.context - spec.sinks))
    ids = tokenizer(text[: windows * args.context * 16], add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    if ids.numel() < windows * args.context:
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    tensors, metadata = calibrate(spec, model, ids, args.tokens, args.context, progress=not args.quiet)
    seconds = time.perf_counter() - started
    metadata.update(text=source, seconds=f"{seconds:.1f}")
    out = Path(args.out)
    save(out, tensors, metadata)
    size = out.stat().st_size
    entries = len(json.loads(metadata["entries"]))
    print(
        f"wrote {out}: codebooks of {entries} layer/role pipelines for {metadata['model']} "
        f"({size / 2**20:.2f} MiB), learned from {args.tokens} tokens of {source} in {seconds:.0f} s",
        file=sys.stderr,
    )
    return 0
