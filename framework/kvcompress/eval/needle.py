"""Needle retrieval (`kvcompress eval --task needle`): can the model still find one fact in a long document
whose keys and values sit in the compressed cache?

A random 6-7 digit number is hidden as "The special magic number is N." at several depths of documents cut
from the text to several lengths; an instruct model is asked for it through its chat template, a base model
(no chat template) reads the document, the question and the start of the answer (RULER's base-model framing)
and continues it; both answer greedily. An answer is correct when it contains the number (digit groups
separated by commas or spaces count). The same trials (same numbers, same prompts) run for the baseline and every spec.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvcompress.errors import KVCompressError
from kvcompress.eval.generation import answer_prompts, has_chat_template, prompt_ids
from kvcompress.eval.lists import parse_list
from kvcompress.eval.report import format_table
from kvcompress.eval.runners import Runner

if TYPE_CHECKING:
    import torch

NEEDLE = "The special magic number is {number}."
QUESTION = "What is the special magic number mentioned in the text?"
# What a base model continues: the first words of the answer, as RULER's answer prefix does.
BASE_ANSWER_PREFIX = "The special magic number mentioned in the text is"
# How far back from the chosen depth the needle may move to sit at a sentence end instead of mid-sentence.
SNAP_CHARS = 400


@dataclass(frozen=True)
class NeedleSettings:
    """The grid of trials: one per (length, depth)."""

    lengths: tuple[int, ...]
    depths: tuple[float, ...]
    max_new_tokens: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.lengths or any(n < 16 for n in self.lengths):
            raise KVCompressError(f"--lengths must be document lengths of at least 16 tokens, got {list(self.lengths)}")
        if not self.depths or any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise KVCompressError(f"--depths must be fractions between 0 and 1, got {list(self.depths)}")
        if self.max_new_tokens < 1:
            raise KVCompressError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")

    @classmethod
    def from_strings(cls, lengths: str, depths: str, max_new_tokens: int, seed: str) -> NeedleSettings:
        """Settings from the comma-separated --lengths and --depths and the one --seed of the command line."""
        seeds = parse_list(seed, int, "--seed", "0")
        if len(seeds) != 1:
            raise KVCompressError(f"--seed {seed}: the needle task takes one seed (several are for --task ruler)")
        return cls(
            parse_list(lengths, int, "--lengths", "512,1024,2048"),
            parse_list(depths, float, "--depths", "0.1,0.5,0.9"),
            max_new_tokens,
            seeds[0],
        )


@dataclass(frozen=True)
class Trial:
    """One needle prompt: `length` document tokens with the needle at fraction `depth`, as input ids (chat-framed
    for an instruct model)."""

    length: int
    depth: float
    number: str
    input_ids: "torch.Tensor" = field(repr=False)


def insert_needle(document: str, position: int, sentence: str) -> str:
    """`document` with `sentence` inserted at the last sentence end before `position` (or at `position` when
    no sentence ends within SNAP_CHARS before it)."""
    ends = [m.end() for m in re.finditer(r"[.!?:;]\s", document[max(0, position - SNAP_CHARS) : position])]
    if ends:
        position = max(0, position - SNAP_CHARS) + ends[-1]
    before, after = document[:position].rstrip(), document[position:].lstrip()
    return " ".join(part for part in (before, sentence, after) if part)


def build_trials(tokenizer: Any, text: str, source: str, settings: NeedleSettings) -> list[Trial]:
    """One trial per (length, depth), lengths outermost; numbers drawn from a generator seeded with settings.seed."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    longest = max(settings.lengths)
    if len(ids) < longest:
        raise KVCompressError(
            f"the text ({source}) has {len(ids)} tokens, fewer than the longest --lengths {longest}; pass a longer "
            "--text FILE or shorter lengths"
        )
    rng = random.Random(settings.seed)
    answer_prefix = "" if has_chat_template(tokenizer) else BASE_ANSWER_PREFIX
    trials = []
    for length in settings.lengths:
        document = tokenizer.decode(ids[:length])
        for depth in settings.depths:
            number = str(rng.randint(100_000, 9_999_999))
            position = len(tokenizer.decode(ids[: round(depth * length)]))
            haystack = insert_needle(document, position, NEEDLE.format(number=number))
            input_ids = prompt_ids(tokenizer, f"{haystack}\n\n{QUESTION}", answer_prefix)
            trials.append(Trial(length=length, depth=depth, number=number, input_ids=input_ids))
    return trials


def retrieved(reply: str, number: str) -> bool:
    """Whether `reply` states `number` (digit groups joined by commas, spaces or thin spaces count as one)."""
    joined = re.sub(r"(?<=\d)[,\s\u2009\u202f](?=\d)", "", reply)
    return number in re.findall(r"\d+", joined)


def evaluate_needle(
    model: Any, tokenizer: Any, trials: list[Trial], runners: list[Runner], settings: NeedleSettings
) -> list[dict[str, Any]]:
    """One result row per runner: accuracy overall, per length and per depth, and every answer."""
    rows = []
    prompts = [(trial.input_ids, settings.max_new_tokens) for trial in trials]
    for result in answer_prompts(model, tokenizer, prompts, runners, "needle"):
        answers = [
            {
                "length": trial.length,
                "depth": trial.depth,
                "prompt_tokens": trial.input_ids.shape[1],
                "number": trial.number,
                "reply": reply,
                "correct": retrieved(reply, trial.number),
            }
            for trial, reply in zip(trials, result.replies)
        ]
        rows.append({
            "name": result.runner.name,
            "source": result.runner.spec.source if result.runner.spec is not None else None,
            # Bytes and bits of the cache of the longest prompt and its answer.
            **result.figures,
            "accuracy": _accuracy(answers),
            "correct": sum(a["correct"] for a in answers),
            "trials": len(answers),
            "by_length": {str(n): _accuracy([a for a in answers if a["length"] == n]) for n in settings.lengths},
            "by_depth": {str(d): _accuracy([a for a in answers if a["depth"] == d]) for d in settings.depths},
            "seconds": result.seconds,
            "answers": answers,
        })
    return rows


def _accuracy(answers: list[dict[str, Any]]) -> float:
    return sum(a["correct"] for a in answers) / len(answers)


def format_needle_table(rows: list[dict[str, Any]], settings: NeedleSettings) -> str:
    columns = [
        ("spec", "name", "{}"),
        ("bits/elem", "bits_per_element", "{:.3f}"),
        ("accuracy", "accuracy", "{:.3f}"),
        *[(f"@{n}", f"length {n}", "{:.3f}") for n in settings.lengths],
        ("correct", "score", "{}"),
        ("seconds", "seconds", "{:.1f}"),
    ]
    flat = [
        {**row, **{f"length {n}": acc for n, acc in row["by_length"].items()}, "score": f"{row['correct']}/{row['trials']}"}
        for row in rows
    ]
    return format_table(flat, columns)
