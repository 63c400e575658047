"""The zero-shot task (experiments/zero_shot_task.py): labels from the English side only,
balanced, the test sentences kept out of training and out of the distillation pairs, and each
test sentence's Hindi side the translation IITB pairs with it."""

from __future__ import annotations

import re
import sys

import pytest

from conftest import ROOT, TEST_DATA, requires_iitb

sys.path.insert(0, str(ROOT / "experiments"))
from zero_shot_task import TOPICS, build_task, read_lines, topic_of, write_task  # noqa: E402


def topics_named(english: str) -> set[str]:
    """The rule again, another way: lower-cased words against each topic's word set. A
    hyphenated compound names both its parts ("interest-tax") and itself ("e-mail")."""
    lower = english.lower()
    words = set(re.findall(r"[a-z]+", lower)) | set(re.findall(r"[a-z]+(?:-[a-z]+)+", lower))
    return {topic for topic, listed in TOPICS.items() if words & set(listed.split())}


def test_a_sentence_takes_the_one_topic_it_names():
    assert topic_of("Click the Save button") == "software"
    assert topic_of("The Ministry announced a new scheme.") == "government"
    assert topic_of("They worship God.") == "religion"
    assert topic_of("Godly sayings") is None            # whole words only
    assert topic_of("The government's new software") is None  # two topics: left out
    assert topic_of("Dynasties in Chinese history") is None


@requires_iitb
def test_the_task_is_balanced_and_its_test_stays_out_of_training(tmp_path):
    iitb = TEST_DATA.root / "parallel" / "iitb-en-hi"
    # As the task keeps them: a tab inside a sentence becomes a space.
    english, hindi, *more = ([line.replace("\t", " ").strip() for line in read_lines(iitb / name)]
                             for name in ("val.en", "val.hi", "train.en", "train.hi"))
    task = build_task(english, hindi, test_per_class=40, seed=3, more_pairs=more)

    test_labels = [label for *_, label in task.test]
    assert {topic: test_labels.count(topic) for topic in TOPICS} == {topic: 40 for topic in TOPICS}
    train_labels = [label for _, label in task.train]
    # At most per_class - 40 a topic: a training sentence whose translation is a test sentence's goes.
    assert all(task.per_class - 45 <= train_labels.count(topic) <= task.per_class - 40 for topic in TOPICS)
    # Every label is what the English side names, recomputed apart from the code under test.
    assert all(topics_named(text) == {label} for text, label in task.train)
    assert all(topics_named(en) == {label} for en, _, label in task.test)
    # The smallest topic sets the size, each distinct English sentence counted once.
    counts = {topic: len({line for line, h in zip(english, hindi) if h and topics_named(line) == {topic}})
              for topic in TOPICS}
    assert task.per_class == min(counts.values())
    # Each test sentence's Hindi side is IITB's translation of that very line.
    pairs = set(zip(english, hindi))
    assert all((en, hi) in pairs for en, hi, _ in task.test)
    tested = {en for en, _, _ in task.test}
    assert not tested & {text for text, _ in task.train}
    assert len(tested) == len(task.test)
    assert not tested & {en for en, _ in task.pairs}
    assert not {hi for _, hi, _ in task.test} & {hi for _, hi in task.pairs}
    # Every other non-empty pair of both splits is a distillation pair.
    every = [(e, h) for e, h in zip([*english, *more[0]], [*hindi, *more[1]]) if e and h]
    held = tested | {hi for _, hi, _ in task.test}
    assert task.pairs == [(e, h) for e, h in every if e not in held and h not in held]

    files = write_task(task, tmp_path)
    rows = read_lines(files["test.hi"])
    assert [row.split("\t") for row in rows] == [[hi, label] for _, hi, label in task.test]
    assert len(read_lines(files["pairs.en"])) == len(read_lines(files["pairs.hi"])) == len(task.pairs)


def test_too_few_sentences_for_the_test_is_refused():
    english = ["Click the button", "God is merciful", "The government decided"] * 3
    with pytest.raises(ValueError, match="smallest topic"):
        build_task(english, english, test_per_class=3)
