"""A labelled English-Hindi task built from IITB validation pairs, for zero-shot transfer.

The rule: an English sentence belongs to a topic when it names a word of that topic's list
and of no other topic's (whole words, any case); sentences naming none, or several, are left
out. The label is read from the English side only and carried to the Hindi side through the
pair: a translation keeps what a sentence is about, which is why topics were chosen over
rules that translation may break (length, punctuation, a named word's form). How often the
Hindi side holds a word of the same topic (HINDI_WORDS, a check only: never used to label or
select) is reported as evidence that the labels survive.

Only IITB's validation split is read; its test split is not used (and not shipped in
../shared/data). Classes are balanced by a seeded draw of as many sentences from each topic as
the smallest has, then split per class into the English training set and the test set (both
languages, the same sentences). Every other pair, of the validation split and of IITB train,
may serve unlabelled as a translation pair for distillation (the training sentences' own
translations among them, as XD distils on the translated training set); a pair holding a test
sentence on either side never does.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

TOPICS = {
    "religion": "god gods allah lord prophet prophets faith believer believers disbeliever disbelievers unbeliever "
                "unbelievers worship worshipped worshipping hell paradise heaven sin sins mercy messenger messengers "
                "temple temples religion religions religious holy pray prayer prayers praying divine angel angels soul",
    "software": "file files click clicked clicking window windows folder folders menu menus button buttons select "
                "selected selecting selection error errors server servers password passwords user users download "
                "downloads downloading install installed installing installation setting settings option options "
                "directory directories toolbar toolbars keyboard computer computers software program programs "
                "application applications printer printers desktop browser email emails e-mail icon icons internet "
                "network online website data image images tab tabs font fonts plugin plugins message messages",
    "government": "government ministry minister ministers scheme schemes tax taxes policy policies parliament court "
                  "courts act law laws bank banks loan loans finance financial election elections state states "
                  "national crore rupees budget department departments commission committee public officer officers "
                  "constitution",
}
# Hindi words of each topic (stems: matched anywhere in the line). Only for the report.
HINDI_WORDS = {
    "religion": "अल्लाह ईश्वर परमेश्वर खुदा ख़ुदा प्रभु रब नबी रसूल ईमान जहन्नम नरक जन्नत स्वर्ग पाप दया मंदिर धर्म पूजा "
                "प्रार्थना फ़रिश्त फरिश्त आत्मा इनकार",
    "software": "फ़ाइल फाइल क्लिक विंडो फ़ोल्डर फोल्डर मेन्यू मेनू बटन चुन त्रुटि सर्वर कूटशब्द पासवर्ड उपयोक्ता उपयोगकर्ता "
                "डाउनलोड संस्थापित इंस्टॉल सेटिंग विकल्प निर्देशिका कुंजीपटल कंप्यूटर कम्प्यूटर सॉफ्टवेयर प्रोग्राम अनुप्रयोग "
                "प्रिंटर डेस्कटॉप ब्राउज़र ईमेल ई-मेल प्रतीक इंटरनेट नेटवर्क ऑनलाइन वेबसाइट डेटा आंकड़ छवि टैब फ़ॉन्ट फॉन्ट "
                "प्लगइन संदेश",
    "government": "सरकार मंत्रालय मंत्री योजना कर नीति संसद न्यायालय अदालत अधिनियम कानून क़ानून बैंक ऋण वित्त चुनाव राज्य "
                  "राष्ट्रीय करोड़ रुपये रुपए बजट विभाग आयोग समिति सार्वजनिक अधिकारी संविधान",
}
_ENGLISH = {topic: re.compile(r"\b(?:%s)\b" % "|".join(map(re.escape, words.split())), re.IGNORECASE)
            for topic, words in TOPICS.items()}
_HINDI = {topic: re.compile("|".join(map(re.escape, words.split()))) for topic, words in HINDI_WORDS.items()}


def topic_of(english: str) -> str | None:
    """The one topic an English sentence names, or None (it names none, or several)."""
    named = [topic for topic, pattern in _ENGLISH.items() if pattern.search(english)]
    return named[0] if len(named) == 1 else None


@dataclass
class Task:
    train: list[tuple[str, str]]            # (English text, label)
    test: list[tuple[str, str, str]]        # (English text, Hindi text, label)
    pairs: list[tuple[str, str]]            # distillation pairs, no test sentence on either side: (English, Hindi)
    per_class: int                          # examples of each class before the split
    hindi_agreement: dict[str, float]       # topic -> share of its Hindi sides naming a word of that topic


def read_lines(path: Path) -> list[str]:
    # "\n" only: str.splitlines() would also split at U+2028 and friends inside a sentence.
    lines = path.read_text(encoding="utf-8").split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


def build_task(english: list[str], hindi: list[str], *, test_per_class: int, seed: int = 0,
               more_pairs: tuple[list[str], list[str]] = ([], [])) -> Task:
    """The task from line-aligned validation sides; `more_pairs` (IITB train) only adds
    distillation pairs. IITB repeats sentences (verses, interface strings), so a sentence
    counts once, and no pair with a test sentence on either side is kept for training or
    distillation."""
    if len(english) != len(hindi):
        raise ValueError(f"the two sides differ in length: {len(english)} English lines, {len(hindi)} Hindi")
    # A tab inside a sentence would read as a field separator in the labelled files.
    english, hindi = ([line.replace("\t", " ").strip() for line in side] for side in (english, hindi))
    more_pairs = tuple([line.replace("\t", " ").strip() for line in side] for side in more_pairs)
    by_topic: dict[str, list[int]] = {topic: [] for topic in TOPICS}
    seen: set[str] = set()
    for i, text in enumerate(english):
        topic = topic_of(text)
        if topic and text not in seen and hindi[i]:
            seen.add(text)
            by_topic[topic].append(i)
    per_class = min(len(rows) for rows in by_topic.values())
    if per_class <= test_per_class:
        raise ValueError(f"only {per_class} sentences in the smallest topic; "
                         f"--test-per-class {test_per_class} leaves none to train on")
    rng = random.Random(seed)
    chosen = {topic: rng.sample(rows, per_class) for topic, rows in by_topic.items()}
    test = [(english[i], hindi[i], topic) for topic, rows in chosen.items() for i in rows[:test_per_class]]
    held_out = {en for en, _, _ in test} | {hi for _, hi, _ in test}

    def kept(en: str, hi: str) -> bool:
        return bool(en and hi) and en not in held_out and hi not in held_out

    train = [(english[i], topic) for topic, rows in chosen.items() for i in rows[test_per_class:]
             if kept(english[i], hindi[i])]
    rng.shuffle(train)
    rng.shuffle(test)
    pairs = [(en, hi) for en, hi in zip([*english, *more_pairs[0]], [*hindi, *more_pairs[1]]) if kept(en, hi)]
    agreement = {topic: sum(bool(_HINDI[topic].search(hindi[i])) for i in rows) / len(rows)
                 for topic, rows in by_topic.items()}
    return Task(train, test, pairs, per_class, agreement)


def write_task(task: Task, out: Path) -> dict[str, Path]:
    """The task as files xkd reads: labeled TSVs (evaluate, finetune-teacher) and line-aligned
    translation pairs (cache-teachers' parallel corpus)."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"train.en": out / "train.en.tsv", "test.en": out / "test.en.tsv", "test.hi": out / "test.hi.tsv",
             "pairs.en": out / "pairs.en", "pairs.hi": out / "pairs.hi"}

    def write(path: Path, rows: list[tuple[str, ...]]) -> None:
        path.write_text("".join("\t".join(row) + "\n" for row in rows), encoding="utf-8")

    write(files["train.en"], task.train)
    write(files["test.en"], [(en, label) for en, _, label in task.test])
    write(files["test.hi"], [(hi, label) for _, hi, label in task.test])
    write(files["pairs.en"], [(en,) for en, _ in task.pairs])
    write(files["pairs.hi"], [(hi,) for _, hi in task.pairs])
    return files
