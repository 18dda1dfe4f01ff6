"""The `kvcompress eval` command: its arguments, the checks that run before the model loads, and the run.

The tasks are kvcompress.eval.perplexity (the default), kvcompress.eval.needle (--task needle) and
kvcompress.eval.ruler (--task ruler); --plot draws the rows with kvcompress.eval.plot.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvcompress.errors import KVCompressError
from kvcompress.hf.loading import DTYPE_HELP, DTYPES, MODEL_HELP
from kvcompress.methods import DEFAULT_MODEL
from kvcompress.eval.perplexity import Protocol, evaluate_perplexity, format_perplexity_table, tokenize_text
from kvcompress.eval.report import format_footer, run_header
from kvcompress.eval.runners import BASELINE, Runner, check_runners
from kvcompress.eval.text import read_text
from kvcompress.spec import CacheSpec, load_spec

if TYPE_CHECKING:
    import torch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `kvcompress eval`."""
    parser.add_argument("specs", nargs="*", metavar="SPEC", help="spec files to evaluate (none: baseline only)")
    parser.add_argument("--task", choices=("ppl", "needle", "ruler"), default="ppl", help="perplexity (default), needle retrieval or RULER-style long-context tasks")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help=DTYPE_HELP)
    parser.add_argument("--text", metavar="PATH", help="UTF-8 text to read, a file or a directory of files (default: a "
                        "license text from the system; /usr/share/common-licenses gives about 40 ppl windows)")
    parser.add_argument("--context", type=int, default=1024, help="ppl: tokens prefilled into the cache (default 1024)")
    parser.add_argument("--continuation", type=int, default=256, help="ppl: tokens scored after the context (default 256)")
    parser.add_argument("--chunk", type=int, default=16, help="ppl: continuation tokens fed per forward pass (default 16)")
    parser.add_argument(
        "--windows", type=int, default=4,
        help="ppl: disjoint slices of the text, each context + continuation tokens with a fresh cache; the table "
        "pools them and shows the spread of the per-window deltas (+-) and the standard error of the pooled delta "
        "(se: how far another seed of the method would move it) (default 4)",
    )
    parser.add_argument(
        "--batch", type=int, default=8,
        help="ppl: windows run side by side in one cache (default 8); memory grows with it, the figures do not change",
    )
    parser.add_argument("--lengths", default="512,1024,2048", help="needle: document lengths in tokens; ruler: prompt plus answer budget in tokens; comma-separated")
    parser.add_argument("--depths", default="0.1,0.5,0.9", help="needle: where the needle sits, fractions of the document")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="needle: tokens generated for the answer (default 32: SmolLM2 spends one token per digit)")
    parser.add_argument("--seed", default="0", help="needle: seed of the hidden numbers; ruler: seeds of the prompts, comma-separated (0,1,2: scores per seed and their spread)")
    parser.add_argument("--samples", type=int, default=1, help="ruler: prompts per task, length and seed (default 1)")
    parser.add_argument("--ruler-tasks", metavar="TASKS", help="ruler: comma-separated subset of the tasks (default: all)")
    parser.add_argument("--device", default="auto", help="torch device to run on (default: cuda when available, else cpu)")
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON to this file")
    parser.add_argument("--plot", metavar="FILE", help="also draw quality against bits per element and bytes held (.png or .svg; needs matplotlib)")


def run(args: argparse.Namespace) -> int:
    """Run `kvcompress eval`; returns the exit status."""
    # Everything that can be wrong with the command line fails here, before the model loads.
    specs = [load_spec(path) for path in args.specs]
    check_unique_names(specs)
    text, source = read_text(args.text)
    if args.task == "ppl":
        protocol = Protocol(args.context, args.continuation, args.chunk, args.windows)
        if args.batch < 1:
            raise KVCompressError(f"--batch must be at least 1, got {args.batch}")
        task_settings: dict[str, Any] = asdict(protocol)
    elif args.task == "needle":
        from kvcompress.eval.needle import NeedleSettings

        needle_settings = NeedleSettings.from_strings(args.lengths, args.depths, args.max_new_tokens, args.seed)
        task_settings = asdict(needle_settings)
    else:
        from kvcompress.eval.ruler import RulerSettings

        ruler_settings = RulerSettings.from_strings(args.lengths, args.seed, args.samples, args.ruler_tasks)
        task_settings = asdict(ruler_settings)
    if args.json:
        _check_writable(Path(args.json))
    if args.plot:
        from kvcompress.eval.plot import check_plot_path

        check_plot_path(Path(args.plot))
    device = resolve_device(args.device)

    from kvcompress.hf.cache import check_spec, model_geometry
    from kvcompress.hf.loading import load_config, load_model, torch_dtype

    config = load_config(args.model)
    for spec in specs:  # the model's shape, from its config: a spec it refuses fails before the weights load
        check_spec(spec, config)
    model, tokenizer = load_model(args.model, torch_dtype(args.dtype))
    model.to(device)
    # The text is checked against the tokenizer before the specs' caches are built, and both before measuring.
    if args.task == "ppl":
        input_ids = tokenize_text(tokenizer, text, protocol, source)
    elif args.task == "needle":
        from kvcompress.eval.needle import build_trials, evaluate_needle, format_needle_table

        trials = build_trials(tokenizer, text, source, needle_settings)
    else:
        from kvcompress.eval.ruler import build_prompts, evaluate_ruler, format_ruler_tables

        prompts = build_prompts(tokenizer, text, source, ruler_settings, model_geometry(config).context)
    runners = [Runner(BASELINE, None)] + [Runner(spec.name, spec) for spec in specs]
    check_runners(model, runners)
    header = run_header(args.model, model, source, args.task, task_settings)
    if args.task == "ppl":
        rows = evaluate_perplexity(model, input_ids, protocol, runners, args.batch)
        print(format_perplexity_table(rows))
    elif args.task == "needle":
        rows = evaluate_needle(model, tokenizer, trials, runners, needle_settings)
        print(format_needle_table(rows, needle_settings))
    else:
        rows = evaluate_ruler(model, tokenizer, prompts, runners, ruler_settings)
        print(format_ruler_tables(rows, ruler_settings))
    print(format_footer(header))
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "results": rows}, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        from kvcompress.eval.plot import plot_data, save_plot

        save_plot(plot_data(header, rows), Path(args.plot))
        print(f"wrote {args.plot}")
    return 0


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
    if device.type not in ("cpu", "cuda"):
        # meta tensors hold no data and other backends are untested: a run there would fail mid-evaluation
        raise KVCompressError(f"--device {name}: evaluation runs on cpu or cuda[:N]; use --device cpu or --device cuda")
    return device


def check_unique_names(specs: list[CacheSpec]) -> None:
    seen: dict[str, str | None] = {BASELINE: None}
    for spec in specs:
        if spec.name in seen:
            other = "the baseline row" if spec.name == BASELINE else seen[spec.name]
            raise KVCompressError(
                f"{spec.source}: spec name {spec.name!r} is also used by {other}; give each spec a distinct name"
            )
        seen[spec.name] = spec.source


def _check_writable(path: Path) -> None:
    """Fail before the evaluation, not after it, when the results could not be written."""
    if path.is_dir():
        raise KVCompressError(f"--json {path}: is a directory; give a file name, e.g. {path / 'results.json'}")
    if not path.parent.is_dir():
        raise KVCompressError(f"--json {path}: the directory {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise KVCompressError(f"--json {path}: not writable here; choose another place")
