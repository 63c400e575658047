"""tests/toytask.py: the multilingual toy task (classify, pairs, NER, POS, parallel) the project writes itself.

The checks recompute what the files promise independently of the generator: topics from a
keyword list built from the module's lexicon table, BIO validity, CoNLL layout, scripts.
"""

from __future__ import annotations

import subprocess
import sys
import unicodedata
from collections import Counter
from pathlib import Path

import pytest

import toytask
from conftest import VOCABS

ROOT = Path(__file__).resolve().parents[1]
MBERT_VOCAB = VOCABS / "bert-base-multilingual-cased.vocab.txt"
LANGS = ("en", "es", "hi")
SPLITS = ("train", "test")
N = {"train": 400, "test": 100}
PUNCT = ".,?¿!।"
BAD_CHARS = ("\r", "\u2028", "\u2029", "\u0085", "\ufeff", "\x0b", "\x0c")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    info = toytask.write_toy_task(out)
    return out, info


def expected_names(langs=LANGS, parallel=True):
    names = {f"{kind}.{lang}.{split}.{ext}" for kind, ext in
             (("classify", "tsv"), ("pairs", "tsv"), ("ner", "conll"), ("pos", "conll"))
             for lang in langs for split in SPLITS}
    if parallel:
        names |= {f"parallel.{lang}.txt" for lang in langs}
    return names


def tsv_rows(path: Path, fields: int) -> list[list[str]]:
    rows = []
    for line in path.read_text(encoding="utf-8").split("\n")[:-1]:
        row = line.split("\t")
        assert len(row) == fields, (path.name, line)
        assert all(row), (path.name, line)
        rows.append(row)
    return rows


def read_conll(path: Path) -> list[list[tuple[str, str]]]:
    """Strict reader: token<TAB>tag lines, one blank line after every sentence (the last too)."""
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n\n") and not text.endswith("\n\n\n"), f"{path.name} must end with one blank line"
    assert "\n\n\n" not in text, f"{path.name}: two blank lines in a row"
    sentences = []
    for block in text[:-2].split("\n\n"):
        sentence = []
        for line in block.split("\n"):
            fields = line.split("\t")
            assert len(fields) == 2 and all(fields), (path.name, line)
            assert " " not in fields[0], (path.name, line)
            sentence.append((fields[0], fields[1]))
        sentences.append(sentence)
    return sentences


def keywords() -> dict[str, dict[str, str]]:
    """{lang: {topic noun (lowercased): topic}} from the module's lexicon table."""
    table = {lang: {} for lang in LANGS}
    for topic, nouns in toytask.TOPIC_NOUNS.items():
        for row in nouns:
            for lang, word in (("en", row[0]), ("es", row[1].split()[-1]), ("hi", row[2])):
                assert word.lower() not in table[lang], f"{word} is a keyword of two topics"
                table[lang][word.lower()] = topic
            if len(row) > 4:  # Hindi oblique form
                table["hi"][row[4]] = topic
    return table


KEYWORDS = keywords()


def topic_of(text: str, lang: str) -> str:
    words = [w.strip(PUNCT).lower() for w in text.split()]
    topics = {KEYWORDS[lang][w] for w in words if w in KEYWORDS[lang]}
    assert len(topics) == 1, f"{lang} text {text!r} has topic words of {sorted(topics) or 'no topic'}"
    return topics.pop()


def test_files_exist_with_promised_line_counts(toy):
    out, info = toy
    assert set(info["files"]) == expected_names()
    assert set(p.name for p in out.iterdir()) == expected_names()  # no temp files left over
    assert info["dir"] == str(out) and info["langs"] == list(LANGS)
    assert info["labels"] == {"classify": ["food", "music", "sports", "weather"], "pairs": ["different", "same"],
                              "ner": ["B-LOC", "B-PER", "I-LOC", "I-PER", "O"],
                              "pos": sorted(info["labels"]["pos"])}
    assert {"DET", "NOUN", "VERB", "ADJ", "ADP", "PROPN", "PUNCT"} <= set(info["labels"]["pos"])
    for name, path in info["files"].items():
        assert Path(path) == out / name
    for lang in LANGS:
        for split in SPLITS:
            assert len(tsv_rows(out / f"classify.{lang}.{split}.tsv", 2)) == N[split]
            assert len(tsv_rows(out / f"pairs.{lang}.{split}.tsv", 3)) == N[split]
            for kind in ("ner", "pos"):
                assert len(read_conll(out / f"{kind}.{lang}.{split}.conll")) == N[split]
        lines = (out / f"parallel.{lang}.txt").read_text(encoding="utf-8").split("\n")
        assert lines[-1] == "" and len(lines) - 1 == toytask.DEFAULT_PARALLEL and all(lines[:-1])


def test_deterministic_and_seed_dependent(toy, tmp_path):
    out, _ = toy
    again = toytask.write_toy_task(tmp_path / "again")
    for name, path in again["files"].items():
        assert Path(path).read_bytes() == (out / name).read_bytes(), name
    other = toytask.write_toy_task(tmp_path / "other", seed=1)
    for name, path in other["files"].items():
        assert Path(path).read_bytes() != (out / name).read_bytes(), name
    # The examples do not depend on which languages are written.
    english = toytask.write_toy_task(tmp_path / "en", langs=("en",))
    assert set(english["files"]) == expected_names(("en",))
    for name, path in english["files"].items():
        assert Path(path).read_bytes() == (out / name).read_bytes(), name


def test_classify_balanced_aligned_and_decided_by_topic_words(toy):
    out, info = toy
    for split in SPLITS:
        rows = {lang: tsv_rows(out / f"classify.{lang}.{split}.tsv", 2) for lang in LANGS}
        labels = [label for _, label in rows["en"]]
        for lang in LANGS:
            assert [label for _, label in rows[lang]] == labels, f"{lang} labels differ line by line from en"
            assert len({text for text, _ in rows[lang]}) > 0.9 * N[split], "too many repeated sentences"
            for text, label in rows[lang]:
                assert topic_of(text, lang) == label, (lang, text, label)
        counts = Counter(labels)
        assert set(counts) == set(info["labels"]["classify"])
        for _label, count in counts.items():
            assert abs(count - N[split] / 4) <= 0.1 * N[split] / 4, (split, counts)
        # Translations, not copies: the texts differ across languages.
        assert sum(a[0] == b[0] for a, b in zip(rows["en"], rows["es"])) < 0.05 * N[split]


def test_pairs_balanced_and_labels_match_topics(toy):
    out, _ = toy
    for split in SPLITS:
        rows = {lang: tsv_rows(out / f"pairs.{lang}.{split}.tsv", 3) for lang in LANGS}
        labels = [row[2] for row in rows["en"]]
        counts = Counter(labels)
        assert set(counts) == {"same", "different"}
        assert abs(counts["same"] - N[split] / 2) <= 0.1 * N[split] / 2, counts
        for lang in LANGS:
            assert [row[2] for row in rows[lang]] == labels
            for a, b, label in rows[lang]:
                same = topic_of(a, lang) == topic_of(b, lang)
                assert label == ("same" if same else "different"), (lang, a, b, label)
        # Each segment alone says nothing about the label: all four topics occur on both sides of both labels.
        for label in ("same", "different"):
            firsts = {topic_of(a, "en") for a, _, lab in rows["en"] if lab == label}
            assert len(firsts) == 4


def test_conll_bio_and_same_tokens(toy):
    out, info = toy
    ner_labels, pos_labels = set(info["labels"]["ner"]), set(info["labels"]["pos"])
    for split in SPLITS:
        entities_by_lang = {}
        for lang in LANGS:
            ner = read_conll(out / f"ner.{lang}.{split}.conll")
            pos = read_conll(out / f"pos.{lang}.{split}.conll")
            assert len(ner) == len(pos) == N[split]
            seen = Counter()
            entities = []
            for ns, ps in zip(ner, pos):
                assert [t for t, _ in ns] == [t for t, _ in ps], (lang, ns, ps)
                prev = "O"
                counts = Counter()
                for (token, tag), (_, ptag) in zip(ns, ps):
                    assert tag in ner_labels and ptag in pos_labels, (lang, token, tag, ptag)
                    if tag.startswith("I-"):
                        assert prev in (f"B-{tag[2:]}", tag), f"{lang}: {tag} after {prev} in {ns}"
                    if tag.startswith("B-"):
                        counts[tag[2:]] += 1
                    if tag != "O":
                        assert token[0].isupper() or lang == "hi" or token == "de", (lang, token, tag)
                    if token in PUNCT:
                        assert ptag == "PUNCT"
                    prev = tag
                    seen[tag] += 1
                entities.append(counts)
            entities_by_lang[lang] = entities
            # Multi-word names and cities occur: I- tags are used.
            assert seen["B-PER"] and seen["I-PER"] and seen["B-LOC"] and seen["I-LOC"], (lang, seen)
        # Sentence i is the same sentence in every language: the same entities.
        assert entities_by_lang["en"] == entities_by_lang["es"] == entities_by_lang["hi"]


def test_text_hygiene(toy):
    out, info = toy
    for name, path in info["files"].items():
        data = Path(path).read_bytes()
        assert not data.startswith(b"\xef\xbb\xbf"), name
        text = data.decode("utf-8")
        assert text.endswith("\n"), name
        assert unicodedata.normalize("NFC", text) == text, name
        for bad in BAD_CHARS:
            assert bad not in text, (name, bad)
        fields = {"tsv": 3 if name.startswith("pairs") else 2, "conll": 2, "txt": 1}[name.rsplit(".", 1)[1]]
        for line in text.split("\n")[:-1]:
            if name.endswith(".conll") and line == "":
                continue
            parts = line.split("\t")
            assert len(parts) == fields, (name, line)
            assert all(p and p == p.strip() and len(p.splitlines()) == 1 for p in parts), (name, line)


def _letters(text: str) -> list[str]:
    return [c for c in text if unicodedata.category(c)[0] in "LM"]


def test_hindi_is_devanagari_and_others_are_latin(toy):
    out, info = toy
    for name, path in info["files"].items():
        lang = name.split(".")[1]
        for line in Path(path).read_text(encoding="utf-8").split("\n"):
            parts = line.split("\t")
            # Only the text/token fields: labels and tags are English names.
            text = " ".join(parts if name.endswith(".txt") else parts[:-1])
            for c in _letters(text):
                devanagari = 0x0900 <= ord(c) <= 0x097F
                if lang == "hi":
                    assert devanagari, (name, line, c)
                else:
                    assert not devanagari and ord(c) < 0x0250, (name, line, c)


def test_task_learnable_from_english_and_transfer_only_partial(toy):
    """A word-level learner on English train alone solves English test; Spanish only partly (names,
    cities and a few loanwords are shared), Hindi not at all (no shared words).

    The learner keeps the words seen under one label only in train, and predicts the label most of a
    test sentence's kept words point to (none: no prediction, counted wrong).
    """
    out, _ = toy
    seen: dict[str, set] = {}
    for text, label in tsv_rows(out / "classify.en.train.tsv", 2):
        for w in text.split():
            seen.setdefault(w.strip(PUNCT).lower(), set()).add(label)
    cue = {w: labels.pop() for w, labels in seen.items() if len(labels) == 1}

    def accuracy(lang):
        rows = tsv_rows(out / f"classify.{lang}.test.tsv", 2)
        right = 0
        for text, label in rows:
            votes = Counter(cue[w] for w in (w.strip(PUNCT).lower() for w in text.split()) if w in cue)
            right += bool(votes) and votes.most_common(1)[0][0] == label
        return right / len(rows)

    en, es, hi = accuracy("en"), accuracy("es"), accuracy("hi")
    assert en >= 0.95, en
    assert 0.05 < es < en - 0.2, es
    assert hi == 0, hi


def test_real_tokenizer_has_no_unknowns(toy):
    """The multilingual BERT vocabulary covers every word of every language (no [UNK])."""
    if not MBERT_VOCAB.is_file():
        pytest.skip(f"no {MBERT_VOCAB}")
    transformers = pytest.importorskip("transformers")
    tok = transformers.BertTokenizer(str(MBERT_VOCAB), do_lower_case=False)
    out, _ = toy
    for lang in LANGS:
        words = set()
        for text, _ in tsv_rows(out / f"classify.{lang}.train.tsv", 2):
            words.update(text.split())
        pieces = tok.tokenize(" ".join(sorted(words)))
        assert "[UNK]" not in pieces, lang
        if lang == "hi":  # Devanagari words really are split into several pieces
            assert len(pieces) > 1.5 * len(words)


def test_bad_arguments_rejected(tmp_path):
    for kwargs in ({"langs": ("fr",)}, {"langs": ()}, {"langs": ("en", "en")}, {"train": 0}, {"seed": -1},
                   {"test": 2.5}):
        with pytest.raises(ValueError):
            toytask.write_toy_task(tmp_path / "bad", **kwargs)


def test_cli_runs(tmp_path):
    python = ROOT / ".venv" / "bin" / "python"
    python = python if python.exists() else Path(sys.executable)
    out = tmp_path / "cli"
    script = str(ROOT / "tests" / "toytask.py")
    proc = subprocess.run([str(python), script, str(out), "--train", "12", "--test", "8", "--seed", "3"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().split("\n")
    assert len(lines) == len(expected_names()) + 1
    assert set(p.name for p in out.iterdir()) == expected_names()
    for line in lines[:-1]:
        count, path = line.split()
        assert int(count) == Path(path).read_bytes().count(b"\n"), line
    assert lines[-1].startswith("wrote ")
    assert (out / "classify.hi.train.tsv").read_text(encoding="utf-8").count("\n") == 12
    assert (out / "classify.en.train.tsv").read_bytes() == \
        Path(toytask.write_toy_task(tmp_path / "api", train=12, test=8, seed=3)["files"]["classify.en.train.tsv"]).read_bytes()
    bad = subprocess.run([str(python), script, str(tmp_path / "x"), "--langs", "fr"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "langs" in bad.stderr
