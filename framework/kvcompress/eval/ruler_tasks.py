"""The RULER-style synthetic tasks (Hsieh et al. 2024, "RULER: What's the real context size of your long-context
language models?"): needles in a haystack (single, multi-key, multi-value, multi-query), variable tracking,
common-word and frequent-word extraction, built from the text on the machine.

A task builds one sample from a seeded random generator at a haystack size (sentences, text words, list
entries, coded words: `Task.unit`); kvcompress.eval.ruler finds the largest size whose prompt fits a length.
Prompts and answer prefixes follow RULER's templates; question answering (RULER's qa_1, qa_2) needs SQuAD
and HotpotQA, which a machine does not have, so it is not among them.
"""

from __future__ import annotations

import math
import random
import re
import string
import uuid
from dataclasses import dataclass
from typing import Callable

# RULER's noise haystack: one repeated line, so that only the inserted statements carry information.
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {kind} for {key} is: {value}."
# Where needles go in a text haystack: RULER's 40 evenly spaced depths, in percent of the sentences.
DEPTHS = tuple(round(100 * i / 39) for i in range(40))
# RULER's list tasks become harder at 4096 tokens and above (more repeats of each word).
LONG_LIST = 4096


@dataclass(frozen=True)
class Material:
    """What the tasks draw from: the text's words in order (the essay haystack) and its vocabulary (needle keys,
    the words of common-word extraction)."""

    words: tuple[str, ...]
    vocabulary: tuple[str, ...]

    @classmethod
    def from_text(cls, text: str) -> Material:
        words = tuple(text.split())
        vocabulary = tuple(sorted({w.lower() for w in re.findall(r"\b[a-zA-Z]{3,12}\b", text)}))
        return cls(words, vocabulary)


@dataclass(frozen=True)
class Sample:
    """One prompt of a task: the user's message, the start of the answer, the expected answers, and the
    statements that hold them as (offset in `content`, statement) (none for the word-counting tasks, whose
    answers are the list's most frequent words)."""

    content: str
    reply_prefix: str
    answers: tuple[str, ...]
    evidence: tuple[tuple[int, str], ...]


# build(material, rng, size, length): one sample of a task.
Builder = Callable[[Material, random.Random, int, int], Sample]


@dataclass(frozen=True)
class Task:
    """A task: its answer's token budget, what its size counts, the smallest size that makes a sample, and
    `build(material, rng, size, length)`. `max_size` bounds the size where the material does (distinct words)."""

    name: str
    budget: int
    unit: str
    min_size: int
    build: Builder
    max_size: Callable[[Material], int] | None = None


def weave(units: list[str], statements: list[str], positions: list[int], sep: str) -> tuple[str, list[int]]:
    """`units` joined by `sep` with statements[i] inserted before units[positions[i]] (a position of len(units)
    appends; equal positions keep the statements' order); returns the text and each statement's offset in it."""
    order = sorted(range(len(statements)), key=lambda i: positions[i])
    pieces: list[str] = []
    owners: list[int | None] = []
    placed = 0
    for index in range(len(units) + 1):
        while placed < len(order) and positions[order[placed]] <= index:
            pieces.append(statements[order[placed]])
            owners.append(order[placed])
            placed += 1
        if index < len(units):
            pieces.append(units[index])
            owners.append(None)
    offsets = [0] * len(statements)
    offset = 0
    for piece, owner in zip(pieces, owners):
        if owner is not None:
            offsets[owner] = offset
        offset += len(piece) + len(sep)
    return sep.join(pieces), offsets


def text_sentences(material: Material, size: int) -> list[str]:
    """The first `size` words of the text (repeated as RULER repeats its essays when the text is shorter),
    split into sentences."""
    words = [material.words[i % len(material.words)] for i in range(size)]
    return [s for s in re.split(r"(?<=[.!?])\s+", " ".join(words)) if s]


def random_value(kind: str, rng: random.Random, material: Material) -> str:
    """A needle key or value: a 7-digit number, a two-word key from the text's vocabulary, or a UUID."""
    if kind == "numbers":
        return str(rng.randint(1_000_000, 9_999_999))
    if kind == "words":
        first, second = rng.sample(material.vocabulary, 2)
        return f"{first}-{second}"
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def distinct_values(kind: str, count: int, rng: random.Random, material: Material, taken: set[str]) -> list[str]:
    """`count` values of `kind` none of which is in `taken` (which they join): keys must tell needles apart."""
    values = []
    while len(values) < count:
        value = random_value(kind, rng, material)
        if value not in taken:
            taken.add(value)
            values.append(value)
    return values


def niah(haystack: str, key_kind: str, value_kind: str, keys: int = 1, values: int = 1, queries: int = 1) -> Builder:
    """A needle-in-a-haystack builder: `keys` needles (each with `values` values) hidden in a haystack of
    `noise` lines, `essay` text or `needle` distractors; the question asks the values of `queries` keys."""

    def build(material: Material, rng: random.Random, size: int, length: int) -> Sample:
        taken: set[str] = set()
        key_list = distinct_values(key_kind, keys, rng, material, taken)
        values_of = {key: distinct_values(value_kind, values, rng, material, taken) for key in key_list}
        needles = [(key, NEEDLE.format(kind=value_kind, key=key, value=value)) for key in key_list for value in values_of[key]]
        rng.shuffle(needles)
        statements = [sentence for _, sentence in needles]
        if haystack == "essay":
            units = text_sentences(material, size)
            positions = sorted(int(len(units) * depth / 100) for depth in rng.sample(DEPTHS, len(statements)))
            sep = " "
        else:
            if haystack == "noise":
                units = [NOISE] * size
            else:
                units = [
                    NEEDLE.format(kind=value_kind, key=k, value=v)
                    for k, v in zip(distinct_values(key_kind, size, rng, material, taken),
                                    distinct_values(value_kind, size, rng, material, taken))
                ]
            positions = sorted(rng.sample(range(size + 1), len(statements)))
            sep = "\n"
        context, offsets = weave(units, statements, positions, sep)
        asked = rng.sample(key_list, queries)
        answers = tuple(value for key in asked for value in values_of[key])
        query = asked[0] if queries == 1 else ", ".join(asked[:-1]) + ", and " + asked[-1]
        one = queries * values == 1
        kind = value_kind[:-1] if one else value_kind
        verb = "is" if one else "are"
        head = (
            f"{'A' if one else 'Some'} special magic {kind} {verb} hidden within the following text. Make sure to "
            f"memorize it. I will quiz you about the {kind} afterwards.\n"
        )
        question = f"What {'is' if one else 'are all'} the special magic {kind} for {query} mentioned in the provided text?"
        content = f"{head}{context}\n{question}"
        reply_prefix = f"The special magic {kind} for {query} mentioned in the provided text {verb}"
        evidence = tuple(
            (len(head) + offset, sentence)
            for offset, (key, sentence) in zip(offsets, needles) if key in asked
        )
        return Sample(content, reply_prefix, answers, evidence)

    return build


def variable_tracking(hops: int = 4) -> Builder:
    """A chain VAR A = N, VAR B = VAR A, ... hidden in noise lines; the answer is every variable holding N.
    One worked example (of five noise lines) comes first, as in RULER."""

    def one(rng: random.Random, size: int) -> tuple[str, str, tuple[str, ...], list[tuple[int, str]]]:
        names: list[str] = []
        while len(names) < hops + 1:
            name = "".join(rng.choices(string.ascii_uppercase, k=5))
            if name not in names:
                names.append(name)
        value = str(rng.randint(10_000, 99_999))
        chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]}" for j in range(hops)]
        positions = sorted(rng.sample(range(size + 1), len(chain)))
        context, offsets = weave([NOISE] * size, chain, positions, "\n")
        head = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
        content = f"{head}{context}\nQuestion: Find all variables that are assigned the value {value} in the text above."
        prefix = (
            f"Answer: According to the chain(s) of variable assignment in the text above, {hops + 1} variables are "
            f"assigned the value {value}, they are:"
        )
        return content, prefix, tuple(names), [(len(head) + o, s) for o, s in zip(offsets, chain)]

    def build(material: Material, rng: random.Random, size: int, length: int) -> Sample:
        example, example_prefix, example_names, _ = one(rng, 5)
        shown = f"{example} {example_prefix} {' '.join(example_names)}\n"
        content, prefix, names, evidence = one(rng, size)
        return Sample(shown + content, prefix, names, tuple((len(shown) + o, s) for o, s in evidence))

    return build


def common_words(common: int = 10) -> Builder:
    """A numbered list of words in which `common` words repeat more often than the rest (30 against 3 times at
    4096 tokens and above, 6 against 1 below, as RULER); the answer is those words. One worked example first."""

    def listing(rng: random.Random, material: Material, distinct: int, often: int, rarely: int) -> tuple[str, list[str]]:
        words = rng.sample(material.vocabulary, distinct)
        frequent = words[:common]
        entries = frequent * often + words[common:] * rarely
        rng.shuffle(entries)
        return " ".join(f"{i + 1}. {word}" for i, word in enumerate(entries)), frequent

    def ask(context: str) -> str:
        return (
            "Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones "
            f"that appear most often.\n{context}\nQuestion: What are the {common} most common words in the above list?"
        )

    prefix = f"Answer: The top {common} words that appear most often in the list are:"

    def build(material: Material, rng: random.Random, size: int, length: int) -> Sample:
        long = length >= LONG_LIST
        example, example_words = listing(rng, material, 40 if long else 20, 10 if long else 3, 3 if long else 1)
        numbered = " ".join(f"{i + 1}. {word}" for i, word in enumerate(example_words))
        context, frequent = listing(rng, material, size, 30 if long else 6, 3 if long else 1)
        content = f"{ask(example)} {prefix} {numbered}\n{ask(context)}"
        return Sample(content, prefix, tuple(frequent), ())

    return build


def frequent_words(alpha: float = 2.0, top: int = 3) -> Builder:
    """Coded words (6 random letters) drawn with Zipf counts (the k-th most frequent: size * k^-alpha / zeta(alpha)
    times); the most frequent is '...' (noise, to be ignored), the answer is the next `top`. The vocabulary
    has length // 50 words, as RULER's."""

    zeta = sum(k**-alpha for k in range(1, 100_000))  # zeta(2) = pi^2 / 6 to 1e-5; no scipy needed

    def build(material: Material, rng: random.Random, size: int, length: int) -> Sample:
        vocabulary_size = max(length // 50, top + 2)
        coded: list[str] = []
        while len(coded) < vocabulary_size:
            word = "".join(rng.choices(string.ascii_lowercase, k=6))
            if word not in coded:
                coded.append(word)
        coded[0] = "..."
        counts = [math.floor(size * k**-alpha / zeta) for k in range(1, vocabulary_size + 1)]
        entries = [word for word, count in zip(coded, counts) for _ in range(count)]
        rng.shuffle(entries)
        content = (
            "Read the following coded text and track the frequency of each coded word. Find the three most frequently "
            f"appeared coded words. {' '.join(entries)}\nQuestion: Do not provide any explanation. Please ignore the "
            "dots '....'. What are the three most frequently appeared words in the above coded text?"
        )
        prefix = "Answer: According to the coded text above, the three most frequently appeared words are:"
        return Sample(content, prefix, tuple(coded[1 : top + 1]), ())

    return build


# RULER's synthetic tasks and its token budgets for the answer (niah 128, vt 30, cwe 120, fwe 50).
TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("niah_single_1", 128, "noise lines", 1, niah("noise", "words", "numbers")),
        Task("niah_single_2", 128, "text words", 16, niah("essay", "words", "numbers")),
        Task("niah_single_3", 128, "text words", 16, niah("essay", "words", "uuids")),
        Task("niah_multikey_1", 128, "text words", 16, niah("essay", "words", "numbers", keys=4)),
        Task("niah_multikey_2", 128, "distractor needles", 1, niah("needle", "words", "numbers")),
        Task("niah_multikey_3", 128, "distractor needles", 1, niah("needle", "uuids", "uuids")),
        Task("niah_multivalue", 128, "text words", 16, niah("essay", "words", "numbers", values=4)),
        Task("niah_multiquery", 128, "text words", 16, niah("essay", "words", "numbers", keys=4, queries=4)),
        Task("vt", 30, "noise lines", 5, variable_tracking()),
        Task("cwe", 120, "distinct words", 12, common_words(), max_size=lambda m: len(m.vocabulary)),
        # Below 80 coded words the 3rd and 4th most frequent can tie, and the answer would not be unique.
        Task("fwe", 50, "coded words", 80, frequent_words()),
    )
}
