"""A trained student as the tools people already use expect it, beside the Hugging Face files
train-student saves (docs/students.md):

- students trained on sentence vectors (xd with target=pooled; mmkd, whose SentA and StrucA
  align the [CLS]) get the sentence-transformers files: modules.json, sentence_bert_config.json,
  config_sentence_transformers.json, 1_Pooling/ with the pooling they were trained with, 2_Dense/
  with xd's projection head when one was trained, and Normalize when the trained vector is
  L2-normalised. `SentenceTransformer(DIR)` then computes the vector training optimised;
- classifier students get their teachers' class names in config.json (id2label), so
  `pipeline("text-classification")` answers with them, not LABEL_0;
- every student gets a model card, README.md, with YAML front matter the hub reads
  (library_name, language, base_model, tags, pipeline_tag), made from xkd_student.json (what
  training knew: method, options, teachers, caches, how sentences are pooled),
  train_summary.json (steps, final losses), xkd_tokenizer.json when present (for which
  languages AutoTokenizer reproduces the training ids) and evaluation.json;
- `xkd evaluate` records its results in evaluation.json (record_evaluation) and redraws the card.

The sentence-transformers files use the classic layout (`sentence_transformers.models.*`
module names, `pooling_mode_*` flags, as the MiniLM teacher's own directory), which every
sentence-transformers release since 2.x loads, 6.x included. Student layer: imports neither
the pipeline nor the CLI.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from dataclasses import asdict
from pathlib import Path

from ..durable import atomic_write_bytes
from ..families import position_offset
from ..storage.remote import absolute
from ..storage.untrusted import parse_json, remove_tree
from ..storage.view import view_of

STUDENT_INFO = "xkd_student.json"
EVALUATION = "evaluation.json"
CARD = "README.md"
SUMMARY = "train_summary.json"
TOKENIZER_INFO = "xkd_tokenizer.json"  # written with the student's tokenizer, when it routes languages
SENTENCE_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json")
SENTENCE_MODULE_DIR = re.compile(r"^\d+_(Pooling|Dense|Normalize)$")
POOLING_FLAGS = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens",
                 "max": "pooling_mode_max_tokens", "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens"}
PIPELINE_TAGS = ("sentence-similarity", "text-classification", "fill-mask", "feature-extraction")
NOT_CARD_RESULTS = ("seconds", "seeds", "epoch_losses", "per_seed", "masked_positions", "examples")


# What a student was trained to compute ---------------------------------------------------


def sentence_vector(method) -> dict | None:
    """How a student trained by `method` (the Method instance) makes the sentence vector its
    training optimised, or None when it was not trained on one:
    - xd, target=pooled: its plan's pooling (the teacher's, or --option pooling=), then the
      projection head when the widths differ, then L2 normalisation when the plan normalises;
    - mmkd with SentA or StrucA on: the last layer's [CLS], which both objectives align (through
      heads, on L2-normalised vectors: directions are what they train, hence Normalize). The
      heads are left out: their outputs live in the space of a random frozen projection of the
      teacher's [CLS], meaningful only beside it; the paper takes the [CLS] as the sentence
      representation (MMKD, Li et al. 2022, sec. 5)."""
    name, config, plan = method.name, method.config, method.plan
    if name == "xd" and getattr(plan, "target", None) == "pooled":
        return {"pooling": plan.pooling, "normalize": bool(plan.normalize),
                "projection": "projection" in method.modules, "max_length": int(config.max_length)}
    if name == "mmkd" and (config.senta or config.struca):
        return {"pooling": "cls", "normalize": True, "projection": False, "max_length": int(config.max_length)}
    return None


def trained_sentence_head(student_dir):
    """(pooling, projection) that the student's sentence-transformers modules apply after the
    encoder: the pooling mode and the Dense module as an nn.Linear (None without one). None
    for a student without modules.json. `xkd evaluate --mode bitext` uses it by default, so
    that its vectors are the ones SentenceTransformer(student_dir) gives."""
    import torch

    student_dir = Path(student_dir)
    modules = read_json(student_dir / "modules.json")
    if not isinstance(modules, list):
        return None
    pooling, projection = None, None
    for module in modules:
        kind, where = str(module.get("type", "")), student_dir / str(module.get("path", ""))
        if kind.endswith(".Pooling"):
            flags = read_json(where / "config.json") or {}
            pooling = next((mode for mode, flag in POOLING_FLAGS.items() if flags.get(flag)), None)
        elif kind.endswith(".Dense"):
            from safetensors.torch import load_file

            config = read_json(where / "config.json") or {}
            tensors = load_file(str(where / "model.safetensors"))
            projection = torch.nn.Linear(int(config["in_features"]), int(config["out_features"]),
                                         bias=bool(config.get("bias", True)))
            with torch.no_grad():
                projection.weight.copy_(tensors["linear.weight"])
                if projection.bias is not None:
                    projection.bias.copy_(tensors["linear.bias"])
    return (pooling, projection) if pooling else None


def pipeline_tag(model, sentence: dict | None) -> str:
    if sentence is not None:
        return "sentence-similarity"
    kind = type(model).__name__
    if kind.endswith("ForSequenceClassification"):
        return "text-classification"
    if kind.endswith("ForMaskedLM"):
        return "fill-mask"
    return "feature-extraction"


def _generic_names(id2label: dict) -> bool:
    return all(str(name) == f"LABEL_{int(i)}" for i, name in id2label.items())


def name_classes(model, method, caches) -> list[str] | None:
    """Give a classifier student its teachers' class names (config.id2label / label2id) when
    it has only LABEL_0, LABEL_1, ...: the names the method recorded (xd, multikd put them in
    their plan, in the student's class order), else the caches' teacher labels when every
    cache names the same classes, as many as the student has (tinybert stage 2 distils the
    cached logits in the teacher's own order). Names copied from an --init-from classifier
    are kept. Returns the names now in the config, or None."""
    from ..storage import view_of

    if not type(model).__name__.endswith("ForSequenceClassification"):
        return None
    config = model.config
    current = {int(i): str(n) for i, n in (config.id2label or {}).items()}
    if current and not _generic_names(current):
        return [current[i] for i in sorted(current)]
    names = getattr(method.plan, "label_names", None)
    if not names:
        found = {tuple(view_of(c).teacher_labels or ()) for c in caches}
        names = found.pop() if len(found) == 1 else None
    if not names or len(names) != config.num_labels or len(set(names)) != len(names) or _generic_names(dict(enumerate(names))):
        return None
    config.id2label = {i: str(n) for i, n in enumerate(names)}
    config.label2id = {str(n): i for i, n in enumerate(names)}
    return [str(n) for n in names]


# Writing ---------------------------------------------------------------------------------


def _write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n").encode("utf-8"))


def read_json(path: Path):
    """A JSON file's content, or None when it is missing or unreadable (a card is drawn from
    what there is)."""
    try:
        return parse_json(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def remove_sentence_transformers(out: Path) -> None:
    """Drop the sentence-transformers files of an earlier student in `out` (--overwrite with a
    method that trains no sentence vector): modules.json first, so that no reader ever sees it
    point at a module directory already gone."""
    for name in SENTENCE_FILES:
        (out / name).unlink(missing_ok=True)
    for entry in out.iterdir() if out.is_dir() else ():
        if entry.is_dir() and SENTENCE_MODULE_DIR.match(entry.name):
            remove_tree(entry)  # a link is removed, never followed


def _versions() -> dict:
    from importlib import metadata

    found = {}
    for key, dist in (("sentence_transformers", "sentence-transformers"), ("transformers", "transformers"),
                      ("pytorch", "torch")):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[key] = metadata.version(dist)
    return found


def max_seq_length(model, trained_max_length: int) -> int:
    """The tokens per text training used, within the positions the model has (XLM-R-style
    position ids start after the pad id, so pad_id + 1 rows are not positions of tokens)."""
    config = model.config
    positions = int(getattr(config, "max_position_embeddings", trained_max_length) or trained_max_length)
    positions -= position_offset(getattr(config, "model_type", ""), getattr(config, "pad_token_id", None) or 0)
    return max(1, min(int(trained_max_length), positions))


def write_sentence_transformers(out: Path, model, sentence: dict, projection=None) -> list[str]:
    """The sentence-transformers files for `sentence` (sentence_vector's dict) in `out`, the
    module directories first and modules.json last. `projection`: xd's trained nn.Linear,
    saved as a Dense module with identity activation (its weights under `linear.`, as
    sentence-transformers names them). Returns the module types in order."""
    from safetensors.torch import save as safetensors_bytes

    remove_sentence_transformers(out)
    width = int(model.config.hidden_size)
    modules = [("", "sentence_transformers.models.Transformer")]
    pooling_dir = out / "1_Pooling"
    pooling_dir.mkdir()
    _write_json(pooling_dir / "config.json", {"word_embedding_dimension": width,
                                              **{flag: mode == sentence["pooling"] for mode, flag in POOLING_FLAGS.items()}})
    modules.append(("1_Pooling", "sentence_transformers.models.Pooling"))
    if projection is not None:
        dense_dir = out / "2_Dense"
        dense_dir.mkdir()
        _write_json(dense_dir / "config.json", {"in_features": int(projection.in_features),
                                                "out_features": int(projection.out_features), "bias": projection.bias is not None,
                                                "activation_function": "torch.nn.modules.linear.Identity"})
        tensors = {"linear.weight": projection.weight.detach().float().cpu().contiguous()}
        if projection.bias is not None:
            tensors["linear.bias"] = projection.bias.detach().float().cpu().contiguous()
        atomic_write_bytes(dense_dir / "model.safetensors", safetensors_bytes(tensors))
        modules.append(("2_Dense", "sentence_transformers.models.Dense"))
    if sentence["normalize"]:
        # Normalize has no files: sentence-transformers reads nothing from its directory.
        modules.append((f"{len(modules)}_Normalize", "sentence_transformers.models.Normalize"))
    _write_json(out / "sentence_bert_config.json",
                {"max_seq_length": max_seq_length(model, sentence["max_length"]), "do_lower_case": False})
    _write_json(out / "config_sentence_transformers.json",
                {"__version__": _versions(), "prompts": {}, "default_prompt_name": None, "similarity_fn_name": "cosine"})
    _write_json(out / "modules.json", [{"idx": i, "name": str(i), "path": path, "type": kind}
                                       for i, (path, kind) in enumerate(modules)])
    return [kind for _, kind in modules]


def base_model_id(init_from: str | None) -> str | None:
    """--init-from's hub id when it has one (an alias, a hub id found offline); None for a
    local directory (its id is not known) or none given."""
    if not init_from:
        return None
    from ..errors import BadInput
    from ..names import resolve_teacher

    try:
        resolved = resolve_teacher(init_from)
    except BadInput:
        return None
    return None if resolved.source == "local directory" else resolved.model_id


def student_info(method, model, caches, *, init_from: str | None = None, vocab=None) -> dict:
    """What the model card says of a run that only training knows (xkd_student.json)."""
    from .. import __version__

    sentence = sentence_vector(method)
    teachers, cache_rows, languages = {}, [], []
    for view in map(view_of, caches):
        labels = list(view.teacher_labels) if view.teacher_labels else None
        teachers.setdefault(view.teacher, {"name": view.teacher, "model_id": view.teacher_model_id, "kind": view.teacher_kind,
                                           "source": view.teacher_source, "labels": labels, "pooling": view.pooling or None})
        langs = list(view.corpus_langs)
        languages += [lang for lang in langs if lang not in languages]
        cache_rows.append({"path": absolute(view.path), "key": view.key, "teacher": view.teacher,
                           "corpus": view.corpus_spec, "languages": langs, "rows": view.rows})
    if sentence is not None:
        projection = method.modules["projection"] if sentence["projection"] else None
        sentence = {**sentence, "width": int(projection.out_features if projection is not None else model.config.hidden_size),
                    "max_seq_length": max_seq_length(model, sentence["max_length"])}
    config = model.config
    id2label = {int(i): str(n) for i, n in (getattr(config, "id2label", None) or {}).items()}
    return {
        "xkd_version": __version__,
        "method": method.name,
        "paper": getattr(method, "paper", ""),
        "options": asdict(method.config),
        "pipeline_tag": pipeline_tag(model, sentence),
        "sentence_vector": sentence,
        "labels": [id2label[i] for i in sorted(id2label)] if pipeline_tag(model, sentence) == "text-classification" else None,
        "init_from": init_from,
        "base_model": base_model_id(init_from),
        "teachers": list(teachers.values()),
        "caches": cache_rows,
        "languages": languages,
        "architecture": type(model).__name__,
        "hidden_size": int(getattr(config, "hidden_size", 0) or 0),
        "layers": int(getattr(config, "num_hidden_layers", 0) or 0),
        "vocab_size": int(getattr(config, "vocab_size", 0) or 0),
        "vocab": str(Path(vocab.path).resolve()) if vocab is not None else None,
    }


def write_student_extras(out, method, model, caches, *, init_from: str | None = None, vocab=None) -> dict:
    """After save_student: the sentence-transformers files (or none, removing an earlier
    student's) and xkd_student.json (the model card follows the final summary). An earlier evaluation.json is removed:
    it measured other weights. Returns xkd_student.json's content."""
    out = Path(out)
    info = student_info(method, model, caches, init_from=init_from, vocab=vocab)
    if info["sentence_vector"] is not None:
        write_sentence_transformers(out, model, info["sentence_vector"],
                                    method.modules["projection"] if info["sentence_vector"]["projection"] else None)
    else:
        remove_sentence_transformers(out)
    (out / EVALUATION).unlink(missing_ok=True)
    _write_json(out / STUDENT_INFO, info)
    return info


# Evaluation records ------------------------------------------------------------------------


def evaluation_key(mode: str, inputs: list[str], **details) -> str:
    """`mode:input,input` plus ` name=value` for each detail given (not None, not False): the
    key under which evaluation.json keeps a result; the same evaluation run again replaces it."""
    key = f"{mode}:{','.join(str(i) for i in inputs)}"
    for name, value in details.items():
        if value is None or value is False:
            continue
        key += f" {name.replace('_', '-')}" + ("" if value is True else f"={value}")
    return key


@contextlib.contextmanager
def _locked(directory: Path):
    """Hold an exclusive lock on the student directory itself (no lock file left behind), so
    that two evaluations finishing together both land in evaluation.json."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock; the last writer wins
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def is_student(model_dir) -> bool:
    return (Path(model_dir) / SUMMARY).is_file()


def record_evaluation(model_dir, key: str, result: dict, warn=None) -> Path | None:
    """Keep `result` under `key` in MODEL's evaluation.json (written atomically) and redraw its
    model card, when MODEL is an xkd student (it has train_summary.json); None otherwise. A
    student directory that cannot be written is a warning, not a failure: the evaluation
    itself is done and reported."""
    path = Path(model_dir)
    if not is_student(path):
        return None
    try:
        with _locked(path):
            records = read_json(path / EVALUATION)
            records = records if isinstance(records, dict) else {}
            records[key] = result
            _write_json(path / EVALUATION, records)
            write_model_card(path)
    except OSError as e:
        (warn or (lambda msg: sys.stderr.write(msg + "\n")))(
            f"xkd evaluate: warning: the result was not recorded in {path / EVALUATION} ({e.strerror or e}); "
            "the evaluation itself is complete.")
        return None
    return path / EVALUATION


# The model card ----------------------------------------------------------------------------

def front_matter(meta: dict) -> str:
    """The card's YAML header, in `meta`'s order, without the empty fields. PyYAML quotes a
    string that would read back as something else (the language code `no` stays a string, not
    false), as huggingface_hub does when it writes a card."""
    import yaml

    fields = {key: value for key, value in meta.items() if value not in (None, [])}
    return f"---\n{yaml.safe_dump(fields, sort_keys=False, allow_unicode=True)}---\n"


def _fmt(value) -> str:
    if isinstance(value, bool) or value is None:
        return str(value).lower() if value is not None else "none"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _render_result(key: str, result: dict) -> str:
    """One evaluation as one line of a table cell: the numbers that matter for its mode."""
    if not isinstance(result, dict):
        return _cell(result)
    mode = key.split(":", 1)[0]
    if mode == "bitext":
        parts = [f"{name.removeprefix('accuracy_').replace('_to_', '→')} {value:.4f}"
                 for name, value in result.items() if name.startswith("accuracy_") and isinstance(value, (int, float))]
        return f"retrieval accuracy {', '.join(parts)} ({result.get('pairs')} pairs, {result.get('pooling')} pooling)"
    if mode == "mlm" and isinstance(result.get("per_cache"), list):
        parts = [f"{c.get('teacher')}: MLM loss {_fmt(c.get('mlm_loss'))}, accuracy {_fmt(c.get('accuracy'))} "
                 f"(teacher {_fmt(c.get('teacher_accuracy'))}), KL to teacher {_fmt(c.get('kl_to_teacher'))}"
                 for c in result["per_cache"] if isinstance(c, dict)]
        return "; ".join(parts)
    metric = result.get("metric")
    if mode in ("classify", "tag") and isinstance(result.get(metric), dict):
        std = result.get("std") or {}
        zero_shot = set(result.get("zero_shot") or ())
        parts = [f"{lang}{'*' if lang in zero_shot else ''} {value:.4f}" + (f" ± {std[lang]:.4f}" if lang in std else "")
                 for lang, value in result[metric].items()]
        how = "own head, as is" if result.get("as_is") else f"fine-tuned on {', '.join(result.get('train_languages') or [])}"
        return f"{metric} {', '.join(parts)} ({how}; * zero-shot)"
    parts = [f"{name} {_fmt(value)}" for name, value in result.items()
             if isinstance(value, (int, float)) and not isinstance(value, bool) and name not in NOT_CARD_RESULTS]
    return ", ".join(parts)


def _tokenizer_section(tokenizer_info, info: dict) -> list[str]:
    """What AutoTokenizer (so pipelines and sentence-transformers) gets right. xkd_tokenizer.json,
    saved with the student's tokenizer, says for which languages it reproduces the training
    ids ("*": all); the others need xkd.load_student_tokenizer, which routes by language."""
    used = "`AutoTokenizer.from_pretrained(DIR)`, which pipelines and sentence-transformers use,"
    if isinstance(tokenizer_info, dict):
        exact = [str(x) for x in tokenizer_info.get("auto_tokenizer_exact_for") or []]
        routes = tokenizer_info.get("routes") if isinstance(tokenizer_info.get("routes"), dict) else {}
        default = tokenizer_info.get("default")
        not_exact = tokenizer_info.get("auto_tokenizer_not_exact_for")
        if not isinstance(not_exact, list):
            not_exact = [lang for lang, teacher in routes.items() if teacher != default or not exact]
        lines = ["In training, each language was tokenized by its teacher's tokenizer, as the union vocabulary routes "
                 "it" + (f" ({', '.join(f'{k} → {v}' for k, v in routes.items())}; any other language → {default})"
                         if routes else f" (every language → {default})" if default else "") + "."]
        if "*" in exact:
            return [*lines, f"{used} reproduces those token ids for every language.", ""]
        if exact:
            unrouted = tokenizer_info.get("auto_tokenizer_exact_for_unrouted", True) is not False
            lines.append(f"{used} reproduces those token ids for {', '.join(exact)}"
                         + (" and every language not routed to another teacher" if unrouted else "")
                         + f"; not for {', '.join(not_exact) or 'any listed language'}.")
        else:
            lines.append(f"{used} reproduces those token ids for no language exactly (it is the union vocabulary's "
                         "plain WordPiece: the default teacher's tokenizer cannot carry union ids).")
        example = (not_exact or [*routes] or ["hi"])[0]
        return [*lines, "To tokenize every language as training did: `tok = xkd.load_student_tokenizer(DIR)`, then "
                f'`tok(texts, language="{example}")`.', ""]
    vocab = info.get("vocab") or "the vocab it was trained with"
    return [f"The saved tokenizer ({used}) is the union vocabulary's WordPiece. In training, each language was "
            f"tokenized by its teacher's tokenizer, as the union vocab `{vocab}` routes it "
            "(`xkd.load_vocab(VOCAB).encode(texts, lang)`; `xkd evaluate` tokenizes that way), which can split some "
            "words differently (xkd's docs/vocab.md).", ""]


def _usage(name: str, info: dict, tag: str, mask_token: str) -> list[str]:
    sentence = info.get("sentence_vector")
    if tag == "sentence-similarity" and sentence:
        steps = [f"{sentence['pooling']} pooling over the last hidden state"]
        if sentence.get("projection"):
            steps.append(f"the linear projection to {sentence['width']} dimensions trained with it (2_Dense)")
        if sentence.get("normalize"):
            steps.append("L2 normalisation")
        bitext = "`xkd evaluate DIR --mode bitext` compares the same vectors (normalised): by default it applies these modules."
        return ["```python", "from sentence_transformers import SentenceTransformer", "",
                f'model = SentenceTransformer("{name}")', 'vectors = model.encode(["A sentence.", "Another one."])',
                "```", "", f"The vector is the one training optimised: {', then '.join(steps)}; at most "
                f"{sentence['max_seq_length']} tokens per text. {bitext}", ""]
    if tag == "fill-mask":
        return ["```python", "from transformers import pipeline", "", f'fill = pipeline("fill-mask", model="{name}")',
                f'fill("The capital of France is {mask_token}.")', "```", ""]
    if tag == "text-classification":
        labels = info.get("labels") or []
        mblm = (info.get("architecture") or "").startswith("MBLM")
        return ["```python", *(["import xkd.student.mblm  # registers MBLM with the Auto classes"] if mblm else []),
                "from transformers import pipeline", "", f'classify = pipeline("text-classification", model="{name}")',
                'classify("A sentence to classify.")', "```", "",
                f"Classes (the teachers' names, in the student's order): {', '.join(labels) or 'unnamed'}.", ""]
    return ["```python", "from transformers import AutoModel, AutoTokenizer", "",
            f'model = AutoModel.from_pretrained("{name}")', f'tokenizer = AutoTokenizer.from_pretrained("{name}")',
            "```", ""]


def _training_section(info: dict, summary: dict, method: str, architecture: str, teachers: list) -> list[str]:
    """How the student was trained: method, options, initialisation, shape, steps and final
    losses, then the teachers and caches it was distilled from."""
    lines = ["## Training", "", "| | |", "|---|---|", f"| method | `{method}` |"]
    options = info.get("options") or {}
    if options:
        lines.append(f"| options | {_cell(', '.join(f'`{k}={_fmt(v)}`' for k, v in options.items()))} |")
    if info.get("init_from"):
        base = f" ({info['base_model']})" if info.get("base_model") else ""
        lines.append(f"| initialised from | `{_cell(info['init_from'])}`{base} |")
    if architecture:
        shape = ", ".join(f"{label} {info[key]:,}" for key, label in (("layers", "layers"), ("hidden_size", "hidden"),
                                                                      ("vocab_size", "vocabulary")) if info.get(key))
        lines.append(f"| student | {architecture}" + (f" ({shape})" if shape else "") + " |")
    if summary:
        done, total = summary.get("steps"), summary.get("steps_total")
        lines.append(f"| steps | {done} of {total}" + (" (partial: the run has not finished)" if summary.get("partial") else "")
                     + " |")
        from .report import NOT_LOSSES

        final = {k: v for k, v in (summary.get("final") or {}).items() if k not in NOT_LOSSES}
        if final:
            lines.append(f"| final losses | {_cell(', '.join(f'{k} {_fmt(v)}' for k, v in final.items()))} |")
    lines.append("")
    if teachers:
        lines += ["### Teachers", "", "| teacher | model | kind |", "|---|---|---|"]
        lines += [f"| `{_cell(t.get('name'))}` | {_cell(t.get('model_id'))} | {_cell(t.get('kind'))} |" for t in teachers]
        lines.append("")
    caches = info.get("caches") or [{"path": p} for p in summary.get("caches") or []]
    if caches:
        lines += ["### Caches", "", "| cache | teacher | corpus | languages | rows |", "|---|---|---|---|---|"]
        lines += [f"| `{_cell(c.get('path'))}` | {_cell(c.get('teacher') or '')} | {_cell(c.get('corpus') or '')} | "
                  f"{_cell(', '.join(c.get('languages') or []))} | {_cell(c.get('rows') or '')} |" for c in caches]
        lines.append("")
    return [*lines, "The loss curves are in `losses.png`, the logged values in `metrics.jsonl`.", ""]


def model_card(student_dir) -> str:
    """README.md of a student directory, from the files in it (any may be missing)."""
    path = Path(student_dir)
    info = read_json(path / STUDENT_INFO) or {}
    summary = read_json(path / SUMMARY) or {}
    evaluations = read_json(path / EVALUATION) or {}
    config = read_json(path / "config.json") or {}
    tokenizer_config = read_json(path / "tokenizer_config.json") or {}
    name = path.resolve().name
    method = info.get("method") or summary.get("method") or "unknown"
    architecture = info.get("architecture") or next(iter(config.get("architectures") or []), "")
    tag = info.get("pipeline_tag") or ("text-classification" if architecture.endswith("ForSequenceClassification")
                                       else "fill-mask" if architecture.endswith("ForMaskedLM") else "feature-extraction")
    sentence = info.get("sentence_vector")
    languages = info.get("languages") or sorted(summary.get("languages") or {})
    meta = {
        "library_name": "sentence-transformers" if sentence else "transformers",
        "language": languages,
        "base_model": info.get("base_model"),
        "tags": ["xkd", "knowledge-distillation", "cross-lingual", method,
                 *(["sentence-transformers"] if sentence else [])],
        "pipeline_tag": tag,
    }
    teachers = info.get("teachers") or []
    teacher_names = ", ".join("`" + str(t.get("name")) + "`" for t in teachers) or "its teachers"
    lines = [front_matter(meta), f"# {name}", "",
             f"A student distilled with xkd (cross-lingual knowledge distillation) by **{method}**"
             + (f" ({info['paper']})" if info.get("paper") else "")
             + f" from cached outputs of {teacher_names}"
             + (f", for {', '.join(languages)}" if languages else "") + ". Training read the caches only; no teacher "
             "was loaded.", "", "## Use it", "", *_usage(name, info, tag, tokenizer_config.get("mask_token") or "[MASK]")]

    lines += _training_section(info, summary, method, architecture, teachers)

    lines += ["## Tokenizer", "", *_tokenizer_section(read_json(path / TOKENIZER_INFO), info)]
    if isinstance(evaluations, dict) and evaluations:
        lines += ["## Evaluation", "", "Recorded by `xkd evaluate` on these weights:", "", "| evaluation | result |",
                  "|---|---|"]
        lines += [f"| `{_cell(key)}` | {_cell(_render_result(key, result))} |" for key, result in evaluations.items()]
        lines.append("")
    return "\n".join(lines)


def write_model_card(student_dir) -> Path:
    path = Path(student_dir) / CARD
    atomic_write_bytes(path, model_card(student_dir).encode("utf-8"))
    return path
