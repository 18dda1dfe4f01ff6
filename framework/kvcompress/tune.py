"""`kvcompress tune CANDIDATE... --budget BITS --out FILE`: a spec whose layers get the bits they need.

Each candidate spec offers its keys pipeline and its values pipeline. For every layer and role, each offered
pipeline is tried alone, every other layer and role held in full precision, on windows of calibration text read the
way `kvcompress eval` reads them (prefill, then the continuation in chunks through the cache). Its
sensitivity is the KL divergence of the model's next-token distributions from the full-precision model's,
summed over the continuation; its cost is the bits per element the framework's own accounting gives it in
that run. A knapsack over bits then picks one pipeline per layer and role with the least summed sensitivity
whose average bits stay within the budget, and writes it as a spec with per-layer overrides.

Layers other than the probed one keep every token in their full-precision window, so a probe costs about
one plain forward of the windows' continuations: the probes share the windows' prefill (kvcompress.hf.fanout). The calibration text is Python's pydoc topics unless --text names another file; the text `kvcompress eval`
measures on by default is refused, so a tuned spec is never fitted to its own evaluation.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvcompress.errors import KVCompressError
from kvcompress.hf.loading import MODEL_HELP
from kvcompress.methods import DEFAULT_MODEL, ROLES, STAGES
from kvcompress.spec import CacheSpec, PipelineSpec, load_spec, parse_spec

if TYPE_CHECKING:
    import torch

# Costs are compared in units of 1/BITS_RESOLUTION bit per element per (layer, role).
BITS_RESOLUTION = 4096
# Bytes the caches of one group of probes may hold (float32 keys and values of every window outside the probed layer).
PROBE_GROUP_BYTES = 2 * 2**30
FLOAT32 = {"quantizer": {"method": "float", "dtype": "float32"}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `kvcompress tune`."""
    parser.add_argument("candidates", nargs="+", metavar="SPEC", help="specs whose keys and values pipelines each layer may use")
    parser.add_argument(
        "--budget", required=True, type=_budgets,
        help="average bits per element of the packed cache, by the framework's accounting; several, comma-separated, "
        "share one measurement and write one spec each",
    )
    parser.add_argument("--out", required=True, help="the spec file to write (YAML); with several budgets it must contain {budget}")
    parser.add_argument("--name", help="the tuned spec's name (default: tuned-BUDGET); with several budgets it must contain {budget}")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    parser.add_argument("--text", metavar="PATH", help="calibration text, a file or a directory of files (default: "
                        "Python's pydoc topics; never the evaluation text)")
    parser.add_argument("--context", type=int, default=512, help="tokens prefilled per window (default 512)")
    parser.add_argument("--continuation", type=int, default=64, help="tokens scored per window (default 64)")
    parser.add_argument("--chunk", type=int, default=16, help="continuation tokens fed per forward (default 16)")
    parser.add_argument("--windows", type=int, default=8, help="calibration windows (default 8: more calibration text tuned better at every budget, docs/results.md)")
    parser.add_argument("--seed", type=int, default=0, help="which windows of the calibration text are read")
    parser.add_argument(
        "--sensitivity", metavar="FILE",
        help="JSON of the measured sensitivities: read when it exists and was measured with the same candidates, "
        "model, text, windows and seed; otherwise measured and written there (tune other budgets without measuring again)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _budgets(text: str) -> list[float]:
    try:
        budgets = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give bits per element, e.g. 3.0 or 2.5,3,4") from None
    for budget in budgets:
        if not 0 < budget <= 32:
            raise argparse.ArgumentTypeError(f"{budget:g}: the average bits per element must be between 0 and 32")
    return budgets


@dataclass(frozen=True)
class Option:
    """One pipeline a (layer, role) may use: where it came from and its stages."""

    source: str
    pipeline: PipelineSpec

    def stages(self) -> dict[str, Any]:
        """The pipeline's stages as spec data, the unset ones left out (and `center` where it is on)."""
        stages: dict[str, Any] = {
            name: stage.model_dump(mode="json") for name in STAGES if (stage := getattr(self.pipeline, name)) is not None
        }
        return {**stages, "center": self.pipeline.center} if self.pipeline.center else stages

    def relocated(self, target_dir: Path) -> "Option":
        """This option as a spec file in `target_dir` writes it: file paths its stages name relative to the
        candidate's own file rewritten to lead to the same files from there (MethodSpec.relocated)."""
        source_dir = Path(self.source).resolve().parent
        moved = {
            name: stage.relocated(source_dir, target_dir) for name in STAGES if (stage := getattr(self.pipeline, name)) is not None
        }
        return Option(self.source, self.pipeline.model_copy(update=moved))

    def override(self, default: "Option") -> dict[str, Any]:
        """This option as a layer override of `default`: its stages, and `center: false` where only the default
        centers (an override inherits what it leaves out)."""
        stages = self.stages()
        return {**stages, "center": False} if default.pipeline.center and not self.pipeline.center else stages


@dataclass
class Sensitivity:
    """kl[layer][role][option] and bits[layer][role][option] of every option tried alone."""

    options: dict[str, list[Option]]
    kl: list[dict[str, list[float]]]
    bits: list[dict[str, list[float]]]


def gather_options(candidates: list[CacheSpec]) -> tuple[dict[str, Any], dict[str, list[Option]]]:
    """(the shared layout: window, sinks, compress_run; the distinct pipelines per role) of the candidates,
    or an error naming what the tuner cannot combine."""
    first = candidates[0]
    layout = {"window": first.window, "sinks": first.sinks, "compress_run": first.compress_run}
    options: dict[str, list[Option]] = {role: [] for role in ROLES}
    for spec in candidates:
        where = spec.source or spec.name
        if spec.layers:
            raise KVCompressError(f"{where}: a candidate for tune must be uniform; remove its `layers` overrides")
        if spec.evict is not None:
            raise KVCompressError(
                f"{where}: tune chooses quantizers for a fixed set of tokens; remove `evict` from the candidate "
                "(add it to the tuned spec afterwards)"
            )
        theirs = {"window": spec.window, "sinks": spec.sinks, "compress_run": spec.compress_run}
        if theirs != layout:
            raise KVCompressError(
                f"{where}: window/sinks/compress_run {theirs} differ from {first.source or first.name}'s {layout}; "
                "candidates must share them, since every layer of the tuned spec has one layout"
            )
        for role in ROLES:
            option = Option(where, getattr(spec, role))
            if all(option.pipeline != known.pipeline for known in options[role]):
                options[role].append(option)
    return layout, options


def check_blocks(candidates: list[CacheSpec], config: Any) -> None:
    """Check each candidate against the model (check_spec: a SpecError for a shape the model refuses) and refuse
    a quantizer whose token block does not divide the shared compress_run: the layers that took it would compress
    in longer runs and hold up to a block more tokens in full precision, which bits per element does not count,
    so the knapsack would compare unequal caches at equal bits."""
    from kvcompress.hf.cache import check_spec

    for spec in candidates:
        codecs = check_spec(spec, config)[0]  # a candidate is uniform: layer 0 stands for every layer
        for role in ROLES:
            block = getattr(codecs, role).token_block
            if spec.compress_run % block:
                raise KVCompressError(
                    f"{spec.source or spec.name}: its {role} compress tokens in blocks of {block}, which do not divide "
                    f"compress_run {spec.compress_run}; the layers that took them would hold up to {block - 1} tokens "
                    f"beyond the window in full precision where the others hold up to {spec.compress_run - 1}, which "
                    "bits per element does not count. Give every "
                    f"candidate a compress_run that is a multiple of every block (e.g. compress_run: {math.lcm(block, spec.compress_run)})"
                )


def probe_spec(layout: dict[str, Any], layer: int, role: str, option: Option, tokens: int) -> CacheSpec:
    """`role` of `layer` uses `option`, that layer's other role float32; every other layer holds all `tokens`
    in its full-precision window, so it runs as the model's own attention and costs the probe nothing. Read
    from where the candidate lives, so relative codebook paths resolve as they do for the candidate."""
    return parse_spec({
        "name": f"probe-{layer}-{role}", **layout, "window": tokens, "keys": FLOAT32, "values": FLOAT32,
        "layers": {str(layer): {"window": layout["window"], role: option.stages()}},
    }, source=option.source)


def measure(
    model: Any, windows: "torch.Tensor", protocol: Any, layout: dict[str, Any], options: dict[str, list[Option]],
    progress: bool = True,
) -> Sensitivity:
    """The sensitivity and cost of every option at every layer and role (see the module's docstring).

    The windows run side by side, and the probes share their prefill: a prompt over empty caches attends to
    itself in full precision whatever the spec, so one forward fills a group of probes' caches
    (kvcompress.hf.fanout) and each probe runs only its chunks. Groups are sized so that their caches, which
    hold the windows' keys and values in float32 outside the probed layer, stay within PROBE_GROUP_BYTES."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm
    from transformers import DynamicCache

    import kvcompress
    from kvcompress.eval.footprint import fp16_nbytes
    from kvcompress.eval.perplexity import chunk_logits, continuation_logits, prefill_logits
    from kvcompress.hf.cache import model_geometry
    from kvcompress.hf.fanout import PrefillFanout

    geometry = model_geometry(model.config)
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        # (log-probabilities, probabilities) per forward, the exponent taken once rather than in every probe
        log_probs = (F.log_softmax(logits.float(), dim=-1) for logits, _ in continuation_logits(model, windows, protocol, cache))
        references = [(ref, ref.exp()) for ref in log_probs]
    del cache

    def divergence(logits: "torch.Tensor", reference: tuple["torch.Tensor", "torch.Tensor"]) -> float:
        ref, probs = reference
        return float((probs * (ref - F.log_softmax(logits.float(), dim=-1))).sum())

    kl = [{role: [] for role in ROLES} for _ in range(geometry.num_layers)]
    bits = [{role: [] for role in ROLES} for _ in range(geometry.num_layers)]
    trials = [(layer, role, option) for layer in range(geometry.num_layers) for role in ROLES for option in options[role]]
    float32_bytes = 2 * fp16_nbytes(model, protocol.tokens, batch=windows.shape[0])  # a probe's cache, all in float32
    group = max(1, PROBE_GROUP_BYTES // float32_bytes)
    with tqdm(total=len(trials), desc="sensitivity", unit="trial", disable=not progress) as bar:
        for start in range(0, len(trials), group):
            batch = trials[start : start + group]
            specs = [probe_spec(layout, layer, role, option, protocol.tokens) for layer, role, option in batch]
            with kvcompress.patch(model, specs[0]) as patched, torch.inference_mode():
                caches = [patched.cache(spec) for spec in specs]
                first = divergence(prefill_logits(model, windows, protocol, PrefillFanout(caches))[0], references[0])
                for (layer, role, _), cache in zip(batch, caches):
                    total = first + sum(
                        divergence(logits, reference)
                        for (logits, _), reference in zip(chunk_logits(model, windows, protocol, cache), references[1:])
                    )
                    store = getattr(cache.layers[layer], "key_store" if role == "keys" else "value_store")
                    elements = store.held_tokens() * geometry.head_dim
                    if not elements:
                        raise KVCompressError(
                            f"layer {layer} {role}: no token was compressed in the calibration windows; raise --context "
                            f"above the window + sinks ({layout['window']} + {layout['sinks']})"
                        )
                    kl[layer][role].append(total)
                    bits[layer][role].append(8 * store.payload_nbytes() / elements)
                    bar.update(1)
            del caches
    return Sensitivity(options=options, kl=kl, bits=bits)


def choose(losses: list[list[float]], costs: list[list[float]], budget: float) -> list[int]:
    """For each item, the index of its option, so that the summed loss is least with mean cost <= budget
    (a knapsack solved exactly over costs in units of 1/BITS_RESOLUTION)."""
    import torch

    units = [[math.ceil(c * BITS_RESOLUTION - 1e-6) for c in row] for row in costs]
    capacity = math.floor(budget * len(units) * BITS_RESOLUTION + 1e-6)
    cheapest = sum(min(row) for row in units)
    if cheapest > capacity:
        lowest = sum(min(row) for row in costs) / len(costs)
        raise KVCompressError(
            f"--budget {budget}: the cheapest choice of the candidates averages {lowest:.4f} bits per element; "
            "raise the budget or add a candidate with fewer bits"
        )
    best = torch.full((capacity + 1,), math.inf, dtype=torch.float64)
    best[0] = 0.0
    picks = []
    for row_units, row_losses in zip(units, losses):
        candidates = torch.full((len(row_units), capacity + 1), math.inf, dtype=torch.float64)
        for j, (u, loss) in enumerate(zip(row_units, row_losses)):
            if u <= capacity:
                candidates[j, u:] = best[: capacity + 1 - u] + loss
        best, pick = candidates.min(dim=0)
        picks.append(pick)
    spent = int(best.argmin())
    chosen = []
    for row_units, pick in zip(reversed(units), reversed(picks)):
        j = int(pick[spent])
        chosen.append(j)
        spent -= row_units[j]
    return chosen[::-1]


def tuned_spec_data(
    name: str, description: str, layout: dict[str, Any], options: dict[str, list[Option]], chosen: list[dict[str, int]],
) -> dict[str, Any]:
    """Spec data: each role's top-level pipeline is the chosen option with the fewest stages (so that every
    other choice is expressible as an override), and layers whose choice differs get overrides, layers with
    the same overrides sharing one selection."""
    defaults = {}
    for role in ROLES:
        used = sorted({c[role] for c in chosen}, key=lambda j: (len(options[role][j].stages()), -sum(c[role] == j for c in chosen)))
        defaults[role] = used[0]
    groups: dict[tuple, list[int]] = {}
    for layer, choice in enumerate(chosen):
        key = tuple(choice[role] if choice[role] != defaults[role] else None for role in ROLES)
        if any(j is not None for j in key):
            groups.setdefault(key, []).append(layer)
    layers = {}
    for key, members in groups.items():
        layers[_selection(members)] = {
            role: options[role][j].override(options[role][defaults[role]]) for role, j in zip(ROLES, key) if j is not None
        }
    data = {"name": name, "description": description, **layout}
    data.update({role: options[role][defaults[role]].stages() for role in ROLES})
    if layers:
        data["layers"] = dict(sorted(layers.items(), key=lambda item: int(item[0].split(",")[0].split("-")[0])))
    return data


def _selection(layers: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    parts, start = [], layers[0]
    for previous, current in zip(layers, layers[1:] + [None]):
        if current != previous + 1:
            parts.append(str(start) if start == previous else f"{start}-{previous}")
            start = current
    return ",".join(parts)


def check_written(spec: CacheSpec, options: dict[str, list[Option]], chosen: list[dict[str, int]]) -> None:
    """The written spec resolves, layer by layer, to exactly the chosen pipelines."""
    for layer, choice in enumerate(chosen):
        plan = spec.layer(layer)
        for role in ROLES:
            # compared as data: a resolved plan and a validated spec hold the same stages in different classes
            if getattr(plan, role).model_dump(mode="json") != options[role][choice[role]].pipeline.model_dump(mode="json"):
                raise KVCompressError(
                    f"layer {layer} {role}: the candidates' pipelines differ in stages that per-layer overrides "
                    "cannot remove; give the candidates the same stages (e.g. all with or all without a transform)"
                )


def read_sensitivity(path: Path, settings: dict[str, Any], options: dict[str, list[Option]]) -> Sensitivity | None:
    """The sensitivities stored in `path` if they were measured with `settings`, else None (measure again)."""
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise KVCompressError(f"--sensitivity {path}: not a file tune wrote ({exc}); remove it to measure again") from None
    if {key: stored.get(key) for key in settings} != json.loads(json.dumps(settings)):
        print(f"{path}: measured with other candidates, model, text or protocol; measuring again")
        return None
    return Sensitivity(options=options, kl=stored["kl"], bits=stored["bits"])


def calibration_windows(tokenizer: Any, text: str, source: str, protocol: Any, seed: int) -> "torch.Tensor":
    """`protocol.windows` disjoint windows [windows, tokens] of the text, at slots chosen by `seed`."""
    import torch

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    slots = len(ids) // protocol.tokens
    if slots < protocol.windows:
        raise KVCompressError(
            f"the calibration text ({source}) has {len(ids)} tokens, room for {slots} windows of {protocol.tokens}; "
            "pass a longer --text, or fewer --windows or smaller --context/--continuation"
        )
    chosen = torch.randperm(slots, generator=torch.Generator().manual_seed(seed))[: protocol.windows].sort().values
    table = torch.tensor(ids[: slots * protocol.tokens], dtype=torch.long).reshape(slots, protocol.tokens)
    return table[chosen]


def run(args: argparse.Namespace) -> int:
    """Run `kvcompress tune`; returns the exit status."""
    import yaml

    from kvcompress.calibrate import calibration_text
    from kvcompress.eval.perplexity import Protocol
    from kvcompress.eval.text import DEFAULT_TEXT, text_files

    candidates = [load_spec(path) for path in args.candidates]
    layout, options = gather_options(candidates)
    if args.text is not None and DEFAULT_TEXT.resolve() in {file.resolve() for file in text_files(args.text)}:
        raise KVCompressError(
            f"--text {args.text}: that is (or holds) {DEFAULT_TEXT}, the text `kvcompress eval` measures on; tune on "
            "other text (default: Python's pydoc topics) so the tuned spec is not fitted to its own evaluation"
        )
    text, source = calibration_text(args.text)
    protocol = Protocol(args.context, args.continuation, args.chunk, args.windows)
    several = len(args.budget) > 1
    for flag, value in (("--out", args.out), ("--name", args.name)):
        if several and value is not None and "{budget}" not in value:
            raise KVCompressError(f"{flag} {value}: with several budgets it must contain {{budget}}, e.g. specs/tuned-{{budget}}.yaml")
    outs = [Path(args.out.replace("{budget}", f"{budget:g}")) for budget in args.budget]
    for out in outs:
        if not out.parent.is_dir():
            raise KVCompressError(f"--out {out}: the directory {out.parent} does not exist")
    from kvcompress.hf.loading import load_config, load_model

    config = load_config(args.model)
    check_blocks(candidates, config)
    started = time.perf_counter()
    model, tokenizer = load_model(args.model)
    settings = {
        "model": getattr(model.config, "_name_or_path", args.model), "text": source, "seed": args.seed,
        "protocol": [protocol.context, protocol.continuation, protocol.chunk, protocol.windows], "layout": layout,
        "options": {role: [o.pipeline.model_dump(mode="json") for o in options[role]] for role in ROLES},
    }
    found = read_sensitivity(Path(args.sensitivity), settings, options) if args.sensitivity else None
    if found is None:
        windows = calibration_windows(tokenizer, text, source, protocol, args.seed)
        found = measure(model, windows, protocol, layout, options, progress=not args.quiet)
        if args.sensitivity:
            Path(args.sensitivity).write_text(json.dumps({**settings, "kl": found.kl, "bits": found.bits}) + "\n")
    items = [(layer, role) for layer in range(len(found.kl)) for role in ROLES]
    for budget, out in zip(args.budget, outs):
        picks = choose([found.kl[l][r] for l, r in items], [found.bits[l][r] for l, r in items], budget)
        chosen: list[dict[str, int]] = [{} for _ in found.kl]
        for (layer, role), j in zip(items, picks):
            chosen[layer][role] = j
        predicted_bits = sum(found.bits[l][r][j] for (l, r), j in zip(items, picks)) / len(items)
        predicted_kl = sum(found.kl[l][r][j] for (l, r), j in zip(items, picks))
        name = (args.name or "tuned-{budget}").replace("{budget}", f"{budget:g}")
        description = (
            f"Tuned by `kvcompress tune` for {budget:g} bits per element on {args.model}, calibration text "
            f"{source} ({protocol.windows} "
            f"windows of {protocol.context} + {protocol.continuation} tokens, seed {args.seed}), from "
            f"{', '.join(c.source or c.name for c in candidates)}: {predicted_bits:.4f} bits per element, summed KL "
            f"of the layers tried alone {predicted_kl:.4g} nats."
        )
        written = {role: [option.relocated(out.parent) for option in options[role]] for role in ROLES}
        data = tuned_spec_data(name, description, layout, written, chosen)
        out.write_text(yaml.safe_dump(data, sort_keys=False, width=110))
        check_written(load_spec(out), written, chosen)
        print(format_choices(found, chosen))
        print(f"wrote {out}: {predicted_bits:.4f} bits per element (budget {budget:g})")
    print(f"tuned in {time.perf_counter() - started:.0f} s")
    return 0


def format_choices(found: Sensitivity, chosen: list[dict[str, int]]) -> str:
    """One line per layer: each role's chosen option, its bits, and its KL."""
    lines = []
    for layer, choice in enumerate(chosen):
        parts = []
        for role in ROLES:
            j = choice[role]
            parts.append(f"{role} {Path(found.options[role][j].source).stem} {found.bits[layer][role][j]:.3f} b KL {found.kl[layer][role][j]:.3g}")
        lines.append(f"layer {layer:>3}: " + "; ".join(parts))
    return "\n".join(lines)
