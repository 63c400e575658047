"""`xkd evaluate MODEL --mode classify|tag`: a model judged the way the seed papers judge their
students (docs/evaluation.md).

MODEL (any Hugging Face encoder directory: an xkd student, a teacher, a checkpoint) gets a
fresh classification head, is fine-tuned on the --train data with the documented recipe
(finetune.Recipe), and is scored on every --test set, each named by its language:
accuracy for sequence classification (single texts or sentence pairs), span F1 (conlleval)
for BIO tags, token accuracy for other tags (POS). Testing on languages the model was not
fine-tuned on is the papers' zero-shot cross-lingual transfer; --seeds N repeats the whole
fine-tuning with N seeds and reports the mean and the sample standard deviation. With
--as-is, nothing is fine-tuned: MODEL's own head is scored, as papers 001-003 score their
distilled task students (xd, multikd, tinybert stage 2).

`xkd rdt` (rdt.py) reads the JSON of such evaluations, one of the student and one per teacher,
and reports MergeDistill's relative deviation from teachers.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import BadInput
from ..storage.untrusted import parse_json
from .finetune import Encoded, Recipe, TaskEncoder, fit, predict
from .metrics import is_bio, span_f1, token_accuracy
from .tasks import TaskSet, read_tasks, task_labels

MODES = ("classify", "tag")
TRUNCATED = "<cut by --max-length>"  # the prediction for a word the model never saw: never right
# The recipe evaluate uses unless told otherwise: BERT/XTREME's for XNLI and PAWS-X.
EVALUATE_RECIPE = Recipe(epochs=3, lr=2e-5, batch_size=32, max_length=128, warmup=0.1, weight_decay=0.01)


@dataclass
class TaskEvalOptions:
    model: str
    mode: str
    train: list[str]
    tests: list[str]
    recipe: Recipe = field(default_factory=lambda: EVALUATE_RECIPE)
    seeds: int = 1
    seed: int = 0  # seeds used: seed, seed + 1, ...
    vocab: str | None = None  # an xkd student's union vocab; default: the one it was trained with
    out: str | None = None  # default: eval/<model name>-<mode>
    device: str | None = None
    as_is: bool = False  # score MODEL's own head, no fine-tuning

    def __post_init__(self):
        from ..options import check_number

        if self.mode not in MODES:
            raise BadInput(f"--mode {self.mode!r}: give one of mlm, bitext, {', '.join(MODES)}.")
        check_number("--seeds", self.seeds, low=1, whole=True)
        if self.as_is and (self.train or self.seeds > 1):
            raise BadInput("--as-is scores MODEL's own head without fine-tuning: --train and --seeds do not apply.")
        if not self.tests or not (self.train or self.as_is):
            raise BadInput(f"--mode {self.mode} needs --train SPEC (the data to fine-tune on; or --as-is to score "
                           "MODEL's own head) and at least one --test SPEC (a language's test set).")
        from ..student.runtime import check_device

        check_device(self.device)  # --device cuda without CUDA: one paragraph now, not a traceback after reading


def run(values: dict) -> tuple[dict, str]:
    """The mode as `xkd evaluate` runs it: evaluate's parsed options -> (result, its table)."""
    mode, vocab, out = values["mode"], values["vocab"], values["out"]
    if values["model"] is None:
        raise BadInput(f"--mode {mode} needs MODEL: a Hugging Face encoder directory (a student, a teacher, ...).")
    recipe = Recipe(epochs=values["epochs"], lr=values["lr"], batch_size=values["batch_size"],
                    max_length=values["max_length"], warmup=values["warmup"], weight_decay=values["weight_decay"],
                    freeze_embeddings=values["freeze_embeddings"])
    result = evaluate_task(TaskEvalOptions(str(values["model"]), mode, list(values["train"]), list(values["test"]), recipe,
                                           values["seeds"], values["seed"], str(vocab) if vocab else None,
                                           str(out) if out else None, values["device"], values["as_is"]))
    return result, format_result(result)


def model_tokenizer(model_dir: Path, vocab_dir: str | None):
    """(TaskEncoder, what it is, the vocab dir used or None). An xkd student is tokenized
    through the union vocab it was trained with (its train_summary.json names it): the
    tokenizer saved beside it does not route languages to their teachers' tokenizers."""
    from transformers import AutoTokenizer

    if vocab_dir is None:
        try:
            trained_with = parse_json((model_dir / "train_summary.json").read_text(encoding="utf-8")).get("vocab")
        except (OSError, ValueError, AttributeError):  # not an xkd student (or its summary is unreadable)
            trained_with = None
        if trained_with:
            if not Path(trained_with).is_dir():
                raise BadInput(f"MODEL {model_dir} is an xkd student trained with the vocab {trained_with}, which is "
                               "gone; give --vocab DIR (the union vocab it was trained with) to tokenize as in training.")
            vocab_dir = trained_with
    if vocab_dir is not None:
        from ..vocab import load_vocab

        vocab = load_vocab(vocab_dir)
        return TaskEncoder(vocab=vocab), f"the union vocab {vocab_dir} (each language routed as in training)", vocab_dir
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:  # any failure means the directory holds no usable tokenizer
        raise BadInput(f"MODEL {model_dir}: its tokenizer cannot be loaded ({type(e).__name__}: {e}). Save the model "
                       "with its tokenizer, or give --vocab DIR for an xkd student.") from None
    return TaskEncoder(tokenizer), f"its own tokenizer ({type(tokenizer).__name__})", None


def resolve_model(name: str) -> Path:
    """MODEL as a directory: a path, or an alias / model id found offline (as teachers are)."""
    from ..names import resolve_teacher

    if Path(name).exists():
        return Path(name)
    resolved = resolve_teacher(name)
    if resolved.path is None:
        raise BadInput(f"MODEL {name!r} is on the Hugging Face hub only; download it first (hf download {resolved.model_id} "
                       "--local-dir DIR) and give DIR.")
    return resolved.path


def own_labels(model_dir: Path, mode: str, tests: list[TaskSet]) -> list[str]:
    """--as-is: MODEL's classes in its own id order (config.json id2label), which the test
    data's labels must be. Unnamed classes (LABEL_0, ...) are the class ids 0, 1, ...."""
    config = parse_json((model_dir / "config.json").read_text(encoding="utf-8"))
    head = "ForSequenceClassification" if mode == "classify" else "ForTokenClassification"
    if not any(a.endswith(head) for a in config.get("architectures") or []):
        raise BadInput(f"--as-is: MODEL {model_dir} is a {', '.join(config.get('architectures') or ['model'])}, not a "
                       f"…{head} with a head to score; fine-tune it instead (--train SPEC).")
    from transformers import AutoConfig

    from ..student import mblm  # noqa: F401  (registers MBLM students with the Auto classes)

    # Through transformers: a config.json with the default two classes names none of them.
    id2label = AutoConfig.from_pretrained(str(model_dir)).id2label or {}
    names = [str(id2label[k]) for k in sorted(id2label, key=int)]
    if all(n == f"LABEL_{i}" for i, n in enumerate(names)):
        names = [str(i) for i in range(len(names))]
    unknown = sorted(set().union(*(t.label_set() for t in tests)) - set(names))
    if unknown:
        raise BadInput(f"--as-is: the test data has label(s) {', '.join(unknown[:5])} that MODEL {model_dir} does not "
                       f"predict (its classes: {', '.join(names[:20])}). Score it on the task it was trained for, or "
                       "fine-tune it (--train SPEC).")
    return names


def load_for_task(model_dir: Path, mode: str, labels: list[str], seed: int, device, as_is: bool = False):
    """MODEL with a fresh head of len(labels) classes (its encoder weights as saved), or
    with its own head (`as_is`)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    from ..student import mblm  # noqa: F401  (registers MBLM students with the Auto classes)
    from ..student.models import quiet_transformers

    auto = AutoModelForSequenceClassification if mode == "classify" else AutoModelForTokenClassification
    torch.manual_seed(seed)  # the head's initialisation is part of what a seed varies
    id2label = dict(enumerate(labels))
    head = {} if as_is else dict(num_labels=len(labels), id2label=id2label, label2id={v: k for k, v in id2label.items()},
                                 ignore_mismatched_sizes=True)
    try:
        with quiet_transformers():
            model = auto.from_pretrained(str(model_dir), dtype=torch.float32, **head)
    except (ValueError, OSError, KeyError) as e:
        raise BadInput(f"MODEL {model_dir} cannot take a {'sequence' if mode == 'classify' else 'token'} "
                       f"classification head ({type(e).__name__}: {str(e).splitlines()[0][:200]}).") from None
    return model.to(device)


def score(data: TaskSet, encoded: Encoded, logits: list[np.ndarray], labels: list[str], metric: str) -> float:
    if data.kind != "conll":
        return float(np.mean([int(l.argmax()) == labels.index(y) for l, y in zip(logits, data.labels)]))
    predicted = []
    for words, word_logits, first in zip(data.words, logits, encoded.first_tokens):
        tags = [labels[i] for i in word_logits.argmax(-1)] if len(first) else []
        # Words past --max-length were never seen: "O" (no entity) for BIO, wrong for POS.
        predicted.append(tags + ["O" if metric == "f1" else TRUNCATED] * (len(words) - len(tags)))
    return span_f1(data.tags, predicted)["f1"] if metric == "f1" else token_accuracy(data.tags, predicted)


def read_task_files(opts: TaskEvalOptions) -> tuple[list, list, list[str]]:
    """(train sets, test sets, the test languages): files of the mode's kind, one test set a language."""
    train = read_tasks(opts.train, "--train") if opts.train else []
    tests = read_tasks(opts.tests, "--test")
    wanted = "conll" if opts.mode == "tag" else "labeled: or pairs:"
    if any(t.mode != opts.mode for t in [*train, *tests]):
        raise BadInput(f"--mode {opts.mode} reads {wanted} files; "
                       f"{next(t.spec for t in [*train, *tests] if t.mode != opts.mode)} is not one.")
    langs = [t.lang for t in tests]
    if len(set(langs)) != len(langs):
        twice = next(lang for lang in langs if langs.count(lang) > 1)
        raise BadInput(f"two --test files are in {twice}; results are reported per language, so give one test set per "
                       "language (evaluate other sets in another run).")
    return train, tests, langs


def evaluate_task(opts: TaskEvalOptions, progress=None) -> dict:
    from ..student.export import evaluation_key, record_evaluation
    from ..student.models import check_model_dir
    from ..student.runtime import resolve_device

    say = progress or (lambda msg: sys.stderr.write(msg + "\n"))
    started = time.time()
    model_dir = resolve_model(opts.model)
    check_model_dir(model_dir, "MODEL")
    train, tests, langs = read_task_files(opts)
    labels = own_labels(model_dir, opts.mode, tests) if opts.as_is else task_labels(train, tests)
    metric = "accuracy" if opts.mode == "classify" or not is_bio(labels) else "f1"
    encoder, tokenized_by, vocab_used = model_tokenizer(model_dir, opts.vocab)
    max_length = opts.recipe.max_length
    train_encoded = [encoder.encode(t, labels, max_length) for t in train]
    test_encoded = [encoder.encode(t, labels, max_length) for t in tests]
    device = resolve_device(opts.device)
    train_langs = sorted({t.lang for t in train})
    trained = (f"fine-tuned on {sum(len(t) for t in train):,} examples ({', '.join(train_langs)})" if train
               else "its own head as is (no fine-tuning)")
    say(f"evaluate: {model_dir} --mode {opts.mode}: {len(labels)} labels, {trained}, tested on {', '.join(langs)}; "
        f"{opts.seeds} seed(s) on {device}; tokenized with {tokenized_by}")
    per_seed: dict[str, list[float]] = {lang: [] for lang in langs}
    losses = []
    for i in range(opts.seeds):
        seed = opts.seed + i
        model = load_for_task(model_dir, opts.mode, labels, seed, device, opts.as_is)
        if train:
            losses.append(fit(model, train_encoded, opts.recipe, encoder.pad_id, seed, device,
                              say=lambda msg, seed=seed: say(f"evaluate: seed {seed}: {msg}")))
        for data, encoded in zip(tests, test_encoded):
            logits = predict(model, encoded, encoder.pad_id, device, batch_size=opts.recipe.batch_size)
            value = score(data, encoded, logits, labels, metric)
            per_seed[data.lang].append(value)
        say(f"evaluate: seed {seed}: " + "  ".join(f"{lang} {v[-1]:.4f}" for lang, v in per_seed.items()))
        del model
    result = {
        "model": str(model_dir), "mode": opts.mode, "metric": metric,
        metric: {lang: float(np.mean(v)) for lang, v in per_seed.items()},
        "seeds": opts.seeds, "per_seed": per_seed,
        "train": list(opts.train), "train_languages": train_langs, "as_is": opts.as_is,
        # As is, the languages the model was trained on are not known here: none is marked.
        "zero_shot": [lang for lang in langs if lang not in train_langs] if train else [],
        "tests": {t.lang: {"spec": t.spec, "examples": len(t)} for t in tests},
        "labels": labels, "recipe": None if opts.as_is else asdict(opts.recipe),
        "tokenized_with": vocab_used or "model",
        "epoch_losses": losses, "seconds": round(time.time() - started, 1),
    }
    if opts.seeds > 1:  # the sample standard deviation over seeds, as papers report it
        result["std"] = {lang: float(np.std(v, ddof=1)) for lang, v in per_seed.items()}
    write_outputs(result, Path(opts.out) if opts.out else Path("eval") / f"{model_dir.name}-{opts.mode}")
    # An xkd student keeps what it was measured on (evaluation.json, shown in its model card).
    key = evaluation_key(opts.mode, list(opts.tests), train=",".join(opts.train) or None, as_is=opts.as_is,
                         seeds=opts.seeds if opts.seeds > 1 else None)
    record_evaluation(model_dir, key, result, warn=say)
    return result


def write_outputs(result: dict, out: Path) -> None:
    """results.json and a bar chart per language (<metric>.png) in `out`."""
    from ..chart import bar_chart_png
    from ..durable import atomic_write_bytes

    out.mkdir(parents=True, exist_ok=True)
    metric, scores = result["metric"], result[result["metric"]]
    png = out / f"{metric}.png"
    result["outputs"] = {"json": str(out / "results.json"), "png": str(png)}
    langs = list(scores)
    names = [f"{lang}*" if lang in result["zero_shot"] else lang for lang in langs]
    std = result.get("std")
    bar_chart_png(png, f"{Path(result['model']).name}: {metric} ({result['mode']}, * zero-shot)", names,
                  [scores[lang] for lang in langs], [std[lang] for lang in langs] if std else None, y_label=metric)
    atomic_write_bytes(out / "results.json", (json.dumps(result, indent=1) + "\n").encode())


def format_result(result: dict) -> str:
    metric, scores, std = result["metric"], result[result["metric"]], result.get("std")
    how = ("its own head, not fine-tuned" if result["as_is"] else
           f"fine-tuned on {', '.join(result['train_languages'])} ({result['seeds']} seed{'s' if result['seeds'] > 1 else ''}"
           f"{', mean ± sample std' if std else ''}); * = zero-shot")
    head = f"{metric} of {result['model']}, {how}"
    lines = [head, f"{'language':<12}{'examples':>10}  {metric}"]
    for lang, value in scores.items():
        shown = f"{value:.4f}" + (f" ± {std[lang]:.4f}" if std else "")
        name = f"{lang}*" if lang in result["zero_shot"] else lang
        lines.append(f"{name:<12}{result['tests'][lang]['examples']:>10,}  {shown}")
    lines.append(f"wrote {result['outputs']['json']} and {result['outputs']['png']} ({result['seconds']} s)")
    return "\n".join(lines)


__all__ = ["EVALUATE_RECIPE", "MODES", "TaskEvalOptions", "evaluate_task", "format_result", "run"]
