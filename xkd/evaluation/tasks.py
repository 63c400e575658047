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

Lines, labels and dataset columns are read by the rules the pipeline reads a corpus with
(xkd.readers), so a label parses here exactly as a cached corpus's `class_label` does, and an
example whose text is empty is skipped as there. Labels are kept as written (class names, or
class ids as strings): the label set of a run is the sorted union over its training files,
and a test file naming a label the training data lacks is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BadInput
from ..lines import read_lines
from ..names import language_code
from ..readers import (
    cell_text,
    check_columns,
    check_label,
    class_names,
    dataset_class_id,
    dataset_class_names,
    load_hf_dataset,
    tab_fields,
)

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
    return _sequence_file(spec, kind, path, lang, option)


# Per kind: (texts a line has, the numbers of tab-separated fields it may have, what they are).
# A pair line without its label (two fields) is a corpus's unlabelled pair: refused as such.
_LAYOUTS = {"labeled": (1, (2,), "text<TAB>label"), "pairs": (2, (2, 3), "text_a<TAB>text_b[<TAB>label]")}


def _sequence_file(spec: str, kind: str, path: str, lang: str, option: str) -> TaskSet:
    """Labeled texts or pairs of a file, its lines read as a labeled: or pairs: corpus's."""
    where = f"{option} {spec!r}"
    try:
        lines = read_lines(path)
    except UnicodeDecodeError as e:
        raise BadInput(f"{where}: {path} is not UTF-8 text ({e}).") from None
    n_texts, counts, layout = _LAYOUTS[kind]
    data = TaskSet(spec, kind, lang, texts_b=[] if kind == "pairs" else None)
    labels = set()
    for number, line in enumerate(lines, 1):
        fields, problem = tab_fields(line, counts, layout)
        if problem:
            raise BadInput(f"{where}: {path}, line {number}: {problem}. Fix the file.")
        label = check_label(fields[n_texts].strip(), f"{where}: {path}, line {number}") if len(fields) > n_texts else None
        labels.add(label)
        _add(data, [f.strip() for f in fields[:n_texts]], label, number, where)
    class_names(labels - {None}, f"{where}: {path}")  # refuses a mix of class ids and names, as a corpus's
    return _checked_examples(data, f"{path} ({len(lines)} lines)", where)


def _add(data: TaskSet, texts: list[str], label: str | None, number: int, where: str) -> None:
    """One example (number: its line or row, from 1), unless a text is empty: skipped, as a
    corpus skips it."""
    if not all(texts):
        return
    if label is None:
        raise BadInput(f"{where}: example {number} has no label; every example of task data needs one "
                       f"({TASK_SPEC_HELP}).")
    data.texts.append(texts[0])
    data.labels.append(label)
    if data.texts_b is not None:
        data.texts_b.append(texts[1])


def _checked_examples(data: TaskSet, what: str, where: str) -> TaskSet:
    if not data.texts:
        raise BadInput(f"{where}: {what} holds no example with its text{'s' if data.texts_b is not None else ''} "
                       f"and label ({TASK_SPEC_HELP}).")
    return data


def _sequence_dataset(spec: str, corpus, option: str) -> TaskSet:
    """Labeled texts or pairs of a datasets dataset: its text=COL[,COL_B] columns (default
    text) and label=COL (default label, when there is one), read as an hf: corpus's."""
    where = f"{option} {spec!r}"
    ds = load_hf_dataset(corpus.dataset, corpus.config, corpus.options.get("split", "train"), where)
    columns = tuple(corpus.options.get("columns") or ("text",))
    label_column = corpus.options.get("label") or ("label" if "label" in ds.column_names else "")
    check_columns(ds, (*columns, label_column), where)
    names = dataset_class_names(ds, label_column, where)
    data = TaskSet(spec, "pairs" if len(columns) == 2 else "labeled", corpus.langs[0],
                   texts_b=[] if len(columns) == 2 else None)
    labels = ds[label_column] if label_column else [None] * len(ds)
    for row, (label, *values) in enumerate(zip(labels, *(ds[c] for c in columns))):
        texts = [cell_text(v, f"{where}: column {c!r}, row {row}") for c, v in zip(columns, values)]
        class_id = dataset_class_id(label, names, f"{where}, column {label_column!r}, row {row}")
        _add(data, texts, None if class_id < 0 else names[class_id] if names else str(class_id), row + 1, where)
    return _checked_examples(data, f"the dataset ({len(ds)} rows)", where)


def read_hf_task(spec: str, option: str) -> TaskSet:
    from ..names import parse_corpus

    corpus = parse_corpus(spec)
    if len(corpus.langs) != 1:
        raise BadInput(f"{option} {spec!r}: name the data's language after the dataset, e.g. "
                       "hf:facebook/xnli:hi@hi?text=premise,hypothesis&label=label&split=test.")
    if not ("tokens" in corpus.options or "tags" in corpus.options):
        return _sequence_dataset(spec, corpus, option)
    if not ("tokens" in corpus.options and "tags" in corpus.options):
        raise BadInput(f"{option} {spec!r}: tagging data needs both tokens=COL and tags=COL.")
    ds = load_hf_dataset(corpus.dataset, corpus.config, corpus.options.get("split", "train"), f"{option} {spec!r}")
    check_columns(ds, (corpus.options["tokens"], corpus.options["tags"]), f"{option} {spec!r}")
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
