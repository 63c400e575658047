"""Labelled task data for fine-tuning and evaluation: `xkd evaluate --mode classify|tag` and
`xkd finetune-teacher` read it.

Three kinds of spec, each one language:
- `labeled:PATH@LANG`: one text and its label a line (text<TAB>label);
- `pairs:PATH@LANG`: a sentence pair and its label a line (text_a<TAB>text_b<TAB>label);
- `conll:PATH@LANG`: CoNLL-style tagging, one token a line with its tag in the last
  whitespace-separated column (the first is the token), a blank line between sentences;
  `#` comment lines and `-DOCSTART-` lines are skipped.
A bare `PATH@LANG` is a labeled file (finetune-teacher's original form). A `datasets`
dataset (a hub id, or a local file or save_to_disk directory) is read with the corpus spec
syntax: `hf:DATASET[:CONFIG]@LANG?text=COL[,COL_B]&label=COL&split=SPLIT` for sequence
tasks, `hf:DATASET[:CONFIG]@LANG?tokens=COL&tags=COL&split=SPLIT` for tagging (a ClassLabel
column's ids become its names).

Labeled and pair files are read by the pipeline's own corpus reader, so a label parses here
exactly as a cached corpus's `class_label` does. Labels are kept as written (class names, or
class ids as strings): the label set of a run is the sorted union over its training files,
and a test file naming a label the training data lacks is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .errors import BadInput
from .lines import read_lines
from .names import language_code

TASK_SPEC_HELP = ("labeled:PATH@LANG (text<TAB>label a line), pairs:PATH@LANG (text_a<TAB>text_b<TAB>label a line), "
                  "conll:PATH@LANG (a token and its tag a line, a blank line between sentences), or "
                  "hf:DATASET[:CONFIG]@LANG?text=COL[,COL_B]&label=COL&split=SPLIT (tagging: ?tokens=COL&tags=COL)")


@dataclass
class TaskSet:
    """One language's examples of a task. Sequence tasks fill texts (and texts_b for pairs)
    and labels; tagging fills words and tags (one list per sentence)."""

    spec: str
    kind: str  # "labeled" | "pairs" | "conll" (hf: datasets read as one of these)
    lang: str
    texts: list[str] = field(default_factory=list)
    texts_b: list[str] | None = None
    labels: list[str] = field(default_factory=list)
    words: list[list[str]] = field(default_factory=list)
    tags: list[list[str]] = field(default_factory=list)

    @property
    def mode(self) -> str:
        return "tag" if self.kind == "conll" else "classify"

    def __len__(self) -> int:
        return len(self.words) if self.kind == "conll" else len(self.texts)

    def label_set(self) -> set[str]:
        return {t for sentence in self.tags for t in sentence} if self.kind == "conll" else set(self.labels)


def parse_task_spec(spec: str, option: str) -> tuple[str, str, str]:
    """(kind, path, lang) of a task spec, the file checked to exist."""
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in ("labeled", "pairs", "conll"):
        kind, rest = "labeled", spec
    path, at, lang = rest.rpartition("@")
    if not at or not path or not lang:
        raise BadInput(f"{option} {spec!r} must be PATH@LANG with its kind in front: {TASK_SPEC_HELP}.")
    if not Path(path).is_file():
        raise BadInput(f"{option} {spec!r}: file {path} does not exist (or is not a file).")
    return kind, path, language_code(lang, f"{option} {spec!r}")


def read_task(spec: str, option: str = "--data") -> TaskSet:
    if spec.startswith("hf:"):
        return read_hf_task(spec, option)
    kind, path, lang = parse_task_spec(spec, option)
    if kind == "conll":
        words, tags = read_conll(path, f"{option} {spec!r}")
        return TaskSet(spec, kind, lang, words=words, tags=tags)
    from .names import CorpusSpec

    return _sequence_task(spec, CorpusSpec(kind, (path,), (lang,), spec=f"{kind}:{path}@{lang}"), option)


def _sequence_task(spec: str, corpus, option: str) -> TaskSet:
    """Labeled texts or pairs through the pipeline's corpus reader (a CorpusSpec)."""
    from .pipeline.corpus import Cleaning, plan_corpus

    plan = plan_corpus(corpus, Cleaning(), 1 << 30)
    if plan.source.parallel:
        raise BadInput(f"{option} {spec!r} names two languages; task data is one language a spec (@LANG).")
    examples = [ex for shard in plan.shards for ex in shard.examples()]
    unlabelled = [ex.example_id for ex in examples if ex.label < 0]
    if unlabelled:
        raise BadInput(f"{option} {spec!r}: example {unlabelled[0] + 1} has no label; every example of task data "
                       f"needs one ({TASK_SPEC_HELP}).")
    names = plan.source.label_names
    data = TaskSet(spec, "pairs" if plan.source.has_pairs else "labeled", plan.langs[0],
                   texts=[ex.texts[0] for ex in examples],
                   labels=[names[ex.label] if names else str(ex.label) for ex in examples])
    if plan.source.has_pairs:
        data.texts_b = [ex.texts_b[0] for ex in examples]
    return data


def read_hf_task(spec: str, option: str) -> TaskSet:
    from .names import parse_corpus

    corpus = parse_corpus(spec)
    if len(corpus.langs) != 1:
        raise BadInput(f"{option} {spec!r}: name the data's language after the dataset, e.g. "
                       "hf:facebook/xnli:hi@hi?text=premise,hypothesis&label=label&split=test.")
    if not ("tokens" in corpus.options or "tags" in corpus.options):
        return _sequence_task(spec, corpus, option)
    if not ("tokens" in corpus.options and "tags" in corpus.options):
        raise BadInput(f"{option} {spec!r}: tagging data needs both tokens=COL and tags=COL.")
    from .pipeline.corpus import load_hf_dataset

    ds = load_hf_dataset(corpus.dataset, corpus.config, corpus.options.get("split", "train"), spec)
    missing = [c for c in (corpus.options["tokens"], corpus.options["tags"]) if c not in ds.column_names]
    if missing:
        raise BadInput(f"{option} {spec!r}: the dataset has no column {missing[0]!r}; its columns are {ds.column_names}.")
    feature = ds.features[corpus.options["tags"]]
    names = getattr(getattr(feature, "feature", None), "names", None)  # Sequence(ClassLabel): tag ids -> names
    words = [list(map(str, row)) for row in ds[corpus.options["tokens"]]]
    tags = [[names[t] if names else str(t) for t in row] for row in ds[corpus.options["tags"]]]
    bad = next((i for i, (w, t) in enumerate(zip(words, tags)) if len(w) != len(t)), None)
    if bad is not None:
        raise BadInput(f"{option} {spec!r}: row {bad} has {len(words[bad])} tokens but {len(tags[bad])} tags.")
    keep = [i for i, w in enumerate(words) if w]
    return TaskSet(spec, "conll", corpus.langs[0], words=[words[i] for i in keep], tags=[tags[i] for i in keep])


def read_conll(path: str, where: str) -> tuple[list[list[str]], list[list[str]]]:
    """(words, tags) per sentence of a CoNLL-style file (lines split at "\\n" only)."""
    try:
        lines = read_lines(path)
    except UnicodeDecodeError as e:
        raise BadInput(f"{where}: {path} is not UTF-8 text ({e}).") from None
    words: list[list[str]] = []
    tags: list[list[str]] = []
    sentence_words: list[str] = []
    sentence_tags: list[str] = []
    for number, line in enumerate(lines + [""], 1):
        fields = line.split()
        if not fields:
            if sentence_words:
                words.append(sentence_words)
                tags.append(sentence_tags)
            sentence_words, sentence_tags = [], []
            continue
        if line.startswith("#") or fields[0] == "-DOCSTART-":
            continue
        if len(fields) < 2:
            raise BadInput(f"{where}: {path}, line {number}: {line.strip()!r} has no tag. Each line is a token and its "
                           "tag (the tag in the last column), a blank line between sentences.")
        sentence_words.append(fields[0])
        sentence_tags.append(fields[-1])
    if not words:
        raise BadInput(f"{where}: {path} holds no tagged sentence (a token and its tag a line).")
    return words, tags


def read_tasks(specs: list[str], option: str) -> list[TaskSet]:
    if not specs:
        raise BadInput(f"{option}: give at least one file, {TASK_SPEC_HELP}.")
    return [read_task(spec, option) for spec in specs]


def task_labels(train: list[TaskSet], tests: list[TaskSet] = ()) -> list[str]:
    """The run's label set, in class-id order: the sorted class names (or tags) of the
    training data, or 0..max for class ids. Test data may not add labels."""
    modes = {t.mode for t in [*train, *tests]}
    if len(modes) > 1:
        raise BadInput("the --train and --test files mix tagging (conll:) and sequence (labeled:, pairs:) data; "
                       "give one kind of task.")
    kinds = {t.kind for t in [*train, *tests] if t.kind != "conll"}
    if len(kinds) > 1:
        raise BadInput("the --train and --test files mix single texts (labeled:) and sentence pairs (pairs:); a "
                       "model is fine-tuned for one input kind.")
    if train[0].mode == "classify":
        by_id = [t for t in train if all(label.isdigit() for label in t.label_set())]
        if by_id and len(by_id) != len(train):
            named = next(t for t in train if t not in by_id)
            raise BadInput(f"{named.spec} labels classes by name but {by_id[0].spec} by id; use one kind in every file.")
        if by_id:  # class ids: the label list is 0..max, so that id i stays class i
            top = max(int(label) for t in train for label in t.label_set())
            return _checked([str(i) for i in range(top + 1)], train, tests)
    return _checked(sorted(set().union(*(t.label_set() for t in train))), train, tests)


def _checked(labels: list[str], train: list[TaskSet], tests) -> list[str]:
    if len(labels) < 2:
        what = "tag" if train[0].mode == "tag" else "class"
        raise BadInput(f"{train[0].spec}: the training data has one {what} only ({', '.join(labels)}); a model needs at "
                       "least 2 to learn from.")
    for test in tests:
        unseen = sorted(test.label_set() - set(labels))
        if unseen:
            raise BadInput(f"--test {test.spec!r} has label(s) {', '.join(unseen[:5])} that the training data does "
                           f"not (it has {', '.join(labels[:20])}); a model cannot predict a label it was not "
                           "trained on.")
    return labels
