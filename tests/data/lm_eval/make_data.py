"""Writes the JSONL data of the local lm-evaluation-harness tasks beside this file, from kvcompress's default
text (the GPL-3 licence text, kvcompress.eval.text). Seeded: running it again gives the same files.

    python tests/data/lm_eval/make_data.py

recall.jsonl: passages of the text with two door codes hidden at random depths; the question asks for one of
them, the choices are both codes and two other numbers (kvc_recall, kvc_recall_gen).
text.jsonl: disjoint slices of the text, for rolling log-likelihood (kvc_text).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from kvcompress.eval.text import default_text

HERE = Path(__file__).parent
SEED = 13
RECALL_ITEMS = 40
PASSAGE_WORDS = (300, 450)
TEXT_DOCS = 6
DOC_WORDS = 500
COLORS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple", "grey", "brown"]


def sentences_at(words: list[str], start: int, count: int) -> list[str]:
    """`count` words of the text from the first sentence start at or after `start`."""
    while start > 0 and not words[start - 1].endswith("."):
        start += 1
    return words[start : start + count]


def insert_at_sentence_end(words: list[str], depth: float, sentence: str) -> list[str]:
    """`sentence` placed after the first sentence end at or beyond `depth` of the passage."""
    index = int(depth * len(words))
    while index < len(words) and not words[index - 1].endswith("."):
        index += 1
    return words[:index] + sentence.split() + words[index:]


def recall_items(words: list[str], rng: random.Random) -> list[dict]:
    items = []
    for _ in range(RECALL_ITEMS):
        count = rng.randint(*PASSAGE_WORDS)
        passage = sentences_at(words, rng.randrange(len(words) - 2 * count), count)
        asked, other = rng.sample(COLORS, 2)
        codes = rng.sample(range(1000, 10000), 4)
        facts = [(asked, codes[0]), (other, codes[1])]
        rng.shuffle(facts)
        for depth, (color, code) in zip(sorted(rng.uniform(0.1, 0.9) for _ in facts), facts):
            passage = insert_at_sentence_end(passage, depth, f"The access code for the {color} door is {code}.")
        choices = [str(code) for code in codes]
        rng.shuffle(choices)
        items.append({"passage": " ".join(passage), "color": asked, "choices": choices,
                      "answer": choices.index(str(codes[0])), "code": str(codes[0])})
    return items


def text_docs(words: list[str]) -> list[dict]:
    return [{"text": " ".join(words[i * DOC_WORDS : (i + 1) * DOC_WORDS])} for i in range(TEXT_DOCS)]


def write(name: str, rows: list[dict]) -> None:
    with (HERE / name).open("w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row) + "\n")


def main() -> None:
    text, source = default_text()
    words = text.split()
    write("recall.jsonl", recall_items(words, random.Random(SEED)))
    write("text.jsonl", text_docs(words))
    print(f"wrote {HERE}/recall.jsonl and text.jsonl from {source}")


if __name__ == "__main__":
    main()
