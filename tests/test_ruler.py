"""kvcompress.eval.ruler and ruler_tasks: the generators (deterministic per seed, answers where claimed), the
fitting to a length, the scoring and its summary (the command end to end is in test_eval.py)."""

from __future__ import annotations

import random
import re
from collections import Counter

import pytest

pytest.importorskip("transformers")

from kvcompress.errors import KVCompressError  # noqa: E402
from kvcompress.eval import ruler  # noqa: E402
from kvcompress.eval.ruler_tasks import NEEDLE, NOISE, TASKS, Material, weave  # noqa: E402

NIAH = [name for name in TASKS if name.startswith("niah")]
# Answers per sample of each needle task: values per key times keys asked.
EXPECTED_ANSWERS = {"niah_multivalue": 4, "niah_multiquery": 4}


@pytest.fixture(scope="module")
def material(text) -> Material:
    return Material.from_text(text)


@pytest.fixture(scope="module")
def prompts(tokenizer, text):
    """Two seeds of every task at two lengths of the tiny tokenizer (which spends more tokens per word than
    SmolLM2's: its vt prompt takes 1300 tokens at the least)."""
    settings = ruler.RulerSettings((2048, 3072), seeds=(0, 1), samples=1)
    return ruler.build_prompts(tokenizer, text, "default", settings, 4096)


def test_weave_puts_each_statement_before_its_unit_and_reports_its_offset():
    text, offsets = weave(["a.", "b.", "c."], ["X", "Y", "Z"], [3, 0, 0], " ")
    assert text == "Y Z a. b. c. X"
    assert [text[o] for o in offsets] == ["X", "Y", "Z"]


def test_prompts_are_the_same_for_a_seed_and_differ_between_seeds(tokenizer, text, prompts):
    again = ruler.build_prompts(tokenizer, text, "default", ruler.RulerSettings((2048, 3072), seeds=(0, 1)), 4096)
    assert [p.sample for p in again] == [p.sample for p in prompts]
    assert all((a.input_ids == b.input_ids).all() for a, b in zip(again, prompts))
    by_seed = {(p.task, p.length): {} for p in prompts}
    for p in prompts:
        by_seed[p.task, p.length][p.seed] = p.sample
    assert all(samples[0] != samples[1] for samples in by_seed.values())
    assert [(p.length, p.seed, p.task) for p in prompts] == [
        (n, s, t) for n in (2048, 3072) for s in (0, 1) for t in TASKS
    ]


def test_each_prompt_and_its_answer_budget_fill_the_length(tokenizer, prompts):
    for p in prompts:
        tokens = p.input_ids.shape[1]
        assert tokens + TASKS[p.task].budget <= p.length, p.task
        # The haystack grows until the prompt nearly fills the room left for the answer.
        assert tokens > 0.6 * (p.length - TASKS[p.task].budget), (p.task, tokens)
        assert tokenizer.decode(p.input_ids[0]).endswith("<|im_start|>assistant\n" + p.sample.reply_prefix)


@pytest.mark.parametrize("task", NIAH)
def test_needles_hold_the_answers_where_the_sample_says(prompts, task):
    for p in (p for p in prompts if p.task == task):
        content, answers = p.sample.content, p.sample.answers
        assert len(answers) == EXPECTED_ANSWERS.get(task, 1) and len(set(answers)) == len(answers)
        assert p.sample.evidence, task
        for offset, statement in p.sample.evidence:
            assert content[offset : offset + len(statement)] == statement
        # Every answer sits in exactly one statement, which names a key the question asks for.
        question = content.rsplit("\n", 1)[1]
        for answer in answers:
            holding = [s for _, s in p.sample.evidence if s.endswith(f" {answer}.")]
            assert len(holding) == 1 and content.count(answer) == 1
            key = re.match(r"One of the special magic \w+ for (\S+) is:", holding[0]).group(1)
            assert key in question and key in p.sample.reply_prefix


def test_needle_haystacks_are_what_each_task_names(prompts):
    for p in prompts:
        body = p.sample.content
        if p.task == "niah_single_1":
            assert body.count(NOISE) == p.size
        if p.task in ("niah_multikey_2", "niah_multikey_3"):
            # `size` distractor needles plus the real one, each a line
            assert len(re.findall(r"^One of the special magic", body, flags=re.M)) == p.size + 1
        if p.task == "niah_multikey_3":
            assert re.search(r"for [0-9a-f-]{36} is: [0-9a-f-]{36}\.", body)
        if p.task == "niah_multikey_1":
            assert body.count("One of the special magic numbers for") == 4


def test_variable_tracking_chains_the_value_through_every_answer(prompts):
    for p in (p for p in prompts if p.task == "vt"):
        statements = [s for _, s in p.sample.evidence]
        offsets = [o for o, _ in p.sample.evidence]
        assert offsets == sorted(offsets)  # the chain reads in order
        value = re.fullmatch(r"VAR [A-Z]{5} = (\d{5})", statements[0]).group(1)
        names = [re.match(r"VAR ([A-Z]{5}) =", s).group(1) for s in statements]
        assert tuple(names) == p.sample.answers and len(set(names)) == 5
        assert all(s == f"VAR {names[i + 1]} = VAR {names[i]}" for i, s in enumerate(statements[1:]))
        assert f"assigned the value {value} in the text above" in p.sample.content and value in p.sample.reply_prefix
        assert p.sample.content.count(NOISE) == p.size + 5  # the worked example's five lines come first


def numbered_words(listing: str) -> list[str]:
    return re.findall(r"\d+\. (\S+)", listing)


def test_common_words_are_the_list_s_most_frequent(prompts):
    for p in (p for p in prompts if p.task == "cwe"):
        listing = p.sample.content.rsplit("appear most often.\n", 1)[1].split("\nQuestion:")[0]
        counts = Counter(numbered_words(listing))
        assert len(counts) == p.size
        assert {counts[w] for w in p.sample.answers} == {6} and len(p.sample.answers) == 10  # below 4096 tokens
        assert {c for w, c in counts.items() if w not in p.sample.answers} == {1}


def test_long_lengths_repeat_common_words_more(material):
    sample = TASKS["cwe"].build(material, random.Random(3), 40, 4096)
    listing = sample.content.rsplit("appear most often.\n", 1)[1].split("\nQuestion:")[0]
    counts = Counter(numbered_words(listing))
    assert {counts[w] for w in sample.answers} == {30}
    assert {c for w, c in counts.items() if w not in sample.answers} == {3}


def test_frequent_words_are_the_three_most_frequent_after_the_noise(prompts):
    for p in (p for p in prompts if p.task == "fwe"):
        coded = p.sample.content.split("coded words. ", 1)[1].split("\nQuestion:")[0].split()
        ranked = Counter(coded).most_common()
        assert ranked[0][0] == "..."
        assert tuple(word for word, _ in ranked[1:4]) == p.sample.answers
        assert ranked[3][1] > ranked[4][1]  # strictly: the answer is unique


def test_a_length_too_short_for_a_task_names_it_and_the_least_length(tokenizer, text):
    with pytest.raises(KVCompressError, match=r"--lengths 160: too short for ruler task fwe.*use lengths of at least"):
        ruler.build_prompts(tokenizer, text, "default", ruler.RulerSettings((160,), tasks=("fwe",)), 4096)


def test_lengths_beyond_the_model_context_and_poor_texts_are_refused(tokenizer, text):
    with pytest.raises(KVCompressError, match="longer than the model's context of 2048"):
        ruler.build_prompts(tokenizer, text, "default", ruler.RulerSettings((1024, 4096)), 2048)
    with pytest.raises(KVCompressError, match="distinct words.*--text"):
        ruler.build_prompts(tokenizer, "the same few words " * 200, "x.txt", ruler.RulerSettings((512,)), 4096)


def test_settings_parse_and_validate():
    s = ruler.RulerSettings.from_strings("2048,4096", "0,1,2", 3, "vt,cwe")
    assert s.lengths == (2048, 4096) and s.seeds == (0, 1, 2) and s.samples == 3 and s.tasks == ("vt", "cwe")
    assert ruler.RulerSettings.from_strings("512", "0", 1, None).tasks == tuple(TASKS)
    with pytest.raises(KVCompressError, match="--ruler-tasks: unknown task"):
        ruler.RulerSettings.from_strings("512", "0", 1, "vt,qa_1")
    with pytest.raises(KVCompressError, match="--seed must list distinct seeds"):
        ruler.RulerSettings.from_strings("512", "1,1", 1, None)
    with pytest.raises(KVCompressError, match="--seed '0,x'"):
        ruler.RulerSettings.from_strings("512", "0,x", 1, None)
    with pytest.raises(KVCompressError, match="--samples must be at least 1"):
        ruler.RulerSettings.from_strings("512", "0", 0, None)


def test_string_match_all_scores_the_fraction_of_answers_found_ignoring_case():
    assert ruler.string_match_all(" 1234567.", ("1234567",)) == 1.0
    assert ruler.string_match_all("ab-cd, EF\x00gh", ("AB-CD", "ef", "zz", "gh")) == 0.75
    assert ruler.string_match_all("I do not know", ("1234567",)) == 0.0
    assert ruler.postprocess("  a\tb\x01c  ") == "a\nb\nc"


def test_summary_gives_the_mean_over_samples_per_seed_then_the_spread_over_seeds():
    settings = ruler.RulerSettings((512,), seeds=(0, 1), samples=2, tasks=("vt", "cwe"))
    scores = {("vt", 0): [1.0, 0.5], ("vt", 1): [0.0, 0.5], ("cwe", 0): [0.2, 0.2], ("cwe", 1): [0.6, 0.2]}
    replies = [
        {"task": task, "length": 512, "seed": seed, "score": score}
        for (task, seed), values in scores.items() for score in values
    ]
    summary = ruler.summarize(replies, settings)
    vt = summary["tasks"]["vt"]["512"]
    assert vt["by_seed"] == {"0": 75.0, "1": 25.0} and vt["mean"] == 50.0
    assert vt["std"] == pytest.approx(35.355, abs=1e-3)  # sample standard deviation of 75 and 25
    average = summary["average"]["512"]
    assert average["by_seed"] == pytest.approx({"0": 47.5, "1": 32.5}) and average["mean"] == pytest.approx(40.0)
    one_seed = ruler.summarize([r for r in replies if r["seed"] == 0], ruler.RulerSettings((512,), (0,), 2, ("vt", "cwe")))
    assert one_seed["tasks"]["vt"]["512"]["std"] is None
