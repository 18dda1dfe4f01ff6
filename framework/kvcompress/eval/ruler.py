"""RULER-style long-context tasks (`kvcompress eval --task ruler`): the prompts of kvcompress.eval.ruler_tasks
fitted to each length, answered greedily by the baseline and every spec, and scored as RULER scores them.

Each (task, length, seed) has `samples` prompts; a prompt and its answer budget fit in `length` tokens, as in
RULER (the haystack is the largest that fits). The instruct model is asked through its chat template and
continues RULER's answer prefix; a base model reads the plain text. A reply scores the fraction of the
expected answers it contains, case-insensitively (RULER's string_match_all); a task's score at a seed is the
mean over its samples in percent; tables show the mean over seeds and the sample standard deviation.
"""

from __future__ import annotations

import random
import re
import statistics
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvcompress.errors import KVCompressError
from kvcompress.eval.generation import answer_prompts, prompt_ids
from kvcompress.eval.lists import parse_list
from kvcompress.eval.report import format_table
from kvcompress.eval.ruler_tasks import TASKS, Material, Sample, Task
from kvcompress.eval.runners import Runner

if TYPE_CHECKING:
    import torch

# The fewest distinct words the text must have: cwe's worked example lists 40 of them at long lengths.
MIN_VOCABULARY = 64


@dataclass(frozen=True)
class RulerSettings:
    """Which prompts run: every task at every length and seed, `samples` prompts each."""

    lengths: tuple[int, ...]
    seeds: tuple[int, ...] = (0,)
    samples: int = 1
    tasks: tuple[str, ...] = tuple(TASKS)

    def __post_init__(self) -> None:
        if not self.lengths or any(n < 1 for n in self.lengths):
            raise KVCompressError(f"--lengths must be positive token counts, got {list(self.lengths)}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise KVCompressError(f"--seed must list distinct seeds, got {list(self.seeds)}")
        if self.samples < 1:
            raise KVCompressError(f"--samples must be at least 1, got {self.samples}")
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise KVCompressError(f"--ruler-tasks: unknown task(s) {unknown}; choose among {', '.join(TASKS)}")

    @classmethod
    def from_strings(cls, lengths: str, seeds: str, samples: int, tasks: str | None) -> RulerSettings:
        """Settings from the command line's comma-separated --lengths, --seed and --ruler-tasks (None: all)."""
        return cls(
            parse_list(lengths, int, "--lengths", "2048,4096"),
            parse_list(seeds, int, "--seed", "0,1,2"),
            samples,
            tuple(TASKS) if tasks is None else parse_list(tasks, str, "--ruler-tasks", "niah_single_1,vt"),
        )


@dataclass(frozen=True)
class Prompt:
    """One sample of a task at a length and seed: its haystack size, the sample, and its input ids."""

    task: str
    length: int
    seed: int
    index: int
    size: int
    sample: Sample
    input_ids: "torch.Tensor" = field(repr=False)


def fit(task: Task, material: Material, tokenizer: Any, length: int, seed: str) -> tuple[int, Sample, "torch.Tensor"]:
    """(size, sample, input ids) of the largest haystack whose prompt plus the task's answer budget fits in
    `length` tokens; every size is built from a generator seeded with `seed`, so the result is reproducible."""

    def make(size: int) -> tuple[Sample, "torch.Tensor"]:
        sample = task.build(material, random.Random(seed), size, length)
        return sample, prompt_ids(tokenizer, sample.content, sample.reply_prefix)

    room = length - task.budget
    low = task.min_size
    high = min(length, task.max_size(material)) if task.max_size is not None else length
    sample, ids = make(low)
    if ids.shape[1] > room or high < low:
        raise KVCompressError(
            f"--lengths {length}: too short for ruler task {task.name}, whose smallest prompt ({low} {task.unit}) "
            f"takes {ids.shape[1]} tokens and its answer {task.budget}; use lengths of at least "
            f"{ids.shape[1] + task.budget} or leave the task out with --ruler-tasks"
        )
    best = (low, sample, ids)
    while low < high:
        middle = (low + high + 1) // 2
        sample, ids = make(middle)
        if ids.shape[1] <= room:
            low, best = middle, (middle, sample, ids)
        else:
            high = middle - 1
    return best


def build_prompts(tokenizer: Any, text: str, source: str, settings: RulerSettings, context: int | None) -> list[Prompt]:
    """Every prompt of the run, lengths outermost, then seeds, tasks and samples; `context` is the model's
    (None: unknown, not checked)."""
    too_long = [n for n in settings.lengths if context is not None and n > context]
    if too_long:
        raise KVCompressError(f"--lengths {too_long}: longer than the model's context of {context} tokens")
    material = Material.from_text(text)
    if len(material.vocabulary) < MIN_VOCABULARY:
        raise KVCompressError(
            f"the text ({source}) has {len(material.vocabulary)} distinct words, fewer than the {MIN_VOCABULARY} the "
            "ruler tasks draw keys and word lists from; pass a longer --text FILE"
        )
    prompts = []
    for length in settings.lengths:
        for seed in settings.seeds:
            for name in settings.tasks:
                for index in range(settings.samples):
                    size, sample, ids = fit(TASKS[name], material, tokenizer, length, f"{seed}/{name}/{length}/{index}")
                    prompts.append(Prompt(name, length, seed, index, size, sample, ids))
    return prompts


def postprocess(reply: str) -> str:
    """RULER's clean-up of a prediction: control characters become line breaks, the ends are stripped."""
    return re.sub(r"[\x00-\x1f]", "\n", reply.strip()).strip()


def string_match_all(reply: str, answers: tuple[str, ...]) -> float:
    """The fraction of `answers` that `reply` contains, ignoring case (RULER's metric for these tasks)."""
    text = postprocess(reply).lower()
    return sum(answer.lower() in text for answer in answers) / len(answers)


def evaluate_ruler(model: Any, tokenizer: Any, prompts: list[Prompt], runners: list[Runner], settings: RulerSettings) -> list[dict[str, Any]]:
    """One row per runner: scores per task, length and seed, the averages over tasks, and every reply."""
    rows = []
    budgets = [(p.input_ids, TASKS[p.task].budget) for p in prompts]
    for result in answer_prompts(model, tokenizer, budgets, runners, "ruler"):
        replies = [
            {
                "task": p.task,
                "length": p.length,
                "seed": p.seed,
                "index": p.index,
                "prompt_tokens": p.input_ids.shape[1],
                "answers": list(p.sample.answers),
                "reply": reply,
                "score": string_match_all(reply, p.sample.answers),
            }
            for p, reply in zip(prompts, result.replies)
        ]
        rows.append({
            "name": result.runner.name,
            "source": result.runner.spec.source if result.runner.spec is not None else None,
            # Bytes and bits of the cache of the longest prompt and its answer.
            **result.figures,
            **summarize(replies, settings),
            "seconds": result.seconds,
            "replies": replies,
        })
    return rows


def summarize(replies: list[dict[str, Any]], settings: RulerSettings) -> dict[str, Any]:
    """`tasks`: per task and length, the score in percent per seed (mean over samples), their mean and sample
    standard deviation (None with one seed); `average`: the same for the mean over tasks."""
    per_seed: dict[tuple[str, int, int], list[float]] = {}
    for r in replies:
        per_seed.setdefault((r["task"], r["length"], r["seed"]), []).append(r["score"])
    scores = {key: 100 * statistics.fmean(values) for key, values in per_seed.items()}
    tasks = {
        task: {str(n): _spread({s: scores[task, n, s] for s in settings.seeds}) for n in settings.lengths}
        for task in settings.tasks
    }
    average = {
        str(n): _spread({s: statistics.fmean(scores[t, n, s] for t in settings.tasks) for s in settings.seeds})
        for n in settings.lengths
    }
    return {"average": average, "tasks": tasks}


def _spread(by_seed: dict[int, float]) -> dict[str, Any]:
    values = list(by_seed.values())
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "by_seed": {str(seed): value for seed, value in by_seed.items()},
    }


def _cell(summary: dict[str, Any]) -> str:
    return f"{summary['mean']:.1f}" + ("" if summary["std"] is None else f" ±{summary['std']:.1f}")


def format_ruler_tables(rows: list[dict[str, Any]], settings: RulerSettings) -> str:
    """One table per length: a row per task and their average, a column per runner (scores in percent)."""
    spread = f"mean ± sample std over seeds {','.join(map(str, settings.seeds))}" if len(settings.seeds) > 1 else f"seed {settings.seeds[0]}"
    blocks = []
    columns = [("task", "task", "{}")] + [(row["name"], row["name"], "{}") for row in rows]
    for n in map(str, settings.lengths):
        lines = [{"task": task, **{row["name"]: _cell(row["tasks"][task][n]) for row in rows}} for task in settings.tasks]
        lines.append({"task": "average", **{row["name"]: _cell(row["average"][n]) for row in rows}})
        lines.append({"task": "bits/elem", **{row["name"]: f"{row['bits_per_element']:.3f}" for row in rows}})
        title = f"ruler @ {n} tokens: score % ({spread}; {settings.samples} sample(s) per task and seed)"
        blocks.append(f"{title}\n{format_table(lines, columns)}")
    return "\n\n".join(blocks)
