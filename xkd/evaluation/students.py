"""A trained student as `xkd evaluate --mode mlm|bitext` reads it: MODEL and --vocab resolved
and checked before anything heavy is loaded, then the model loaded once its files and its
vocabulary are known to fit (transformers would fail deep inside otherwise)."""

from __future__ import annotations

from pathlib import Path

from ..errors import BadInput
from ..storage.untrusted import parse_json
from ..student.models import check_model_dir


def student_and_vocab(values: dict) -> tuple[str | None, str]:
    """(MODEL, --vocab) of an mlm or bitext run, from evaluate's parsed options: --vocab
    defaults to the one MODEL's train_summary.json names. MODEL is None only for bitext
    --init-from (the student before training)."""
    model, vocab, mode = values["model"], values["vocab"], values["mode"]
    if model is None and (mode == "mlm" or values["init_from"] is None):
        raise BadInput(f"--mode {mode} needs MODEL: a trained student (the --out of train-student)"
                       + (", or --init-from TEACHER for the student before training." if mode == "bitext" else "."))
    if model is not None and vocab is None and not Path(model).is_dir():  # else: "needs --vocab", about the wrong thing
        raise BadInput(f"MODEL {model}: {'is not a directory' if Path(model).exists() else 'does not exist'}; --mode "
                       f"{mode} evaluates a trained student: give its directory (the --out of train-student).")
    if vocab is None and model is not None:
        from ..workspace import trained_vocab

        vocab = trained_vocab(model)
    if vocab is None and model is None:
        raise BadInput("--init-from needs --vocab: the union vocab the student is made over (xkd build-vocab).")
    if vocab is None:
        raise BadInput(f"--mode {mode} needs --vocab: the vocab dir the student was trained with (an xkd student's "
                       "train_summary.json names it; this MODEL's does not, or its vocab has moved).")
    return (str(model) if model is not None else None), str(vocab)


def load_student(model_dir: str, vocab=None):
    """A trained student, after checking that its files are whole and (given `vocab`) that
    it was trained with that vocab: otherwise transformers fails deep inside with a
    deserialisation error, a "size mismatch", or an IndexError at the first batch."""
    from transformers import AutoModelForMaskedLM

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise BadInput(f"{model_dir} is not a saved student (no config.json): give the --out of train-student.")
    config = check_model_dir(path, "MODEL")
    if vocab is not None:
        check_student_vocab(path, config, vocab)
    try:
        return AutoModelForMaskedLM.from_pretrained(path).eval()
    except (OSError, ValueError, RuntimeError) as e:
        first = (str(e).strip().split("\n") or [""])[0][:200]
        raise BadInput(f"MODEL {model_dir} cannot be loaded as a masked-LM student ({type(e).__name__}: {first}). "
                       "Give the --out of a finished train-student run.") from None


def check_student_vocab(path: Path, config: dict, vocab) -> None:
    """The student's vocabulary is the union `vocab`: the same size and, where the student's
    train_summary.json records it, the same union (hash)."""
    try:
        summary = parse_json((path / "train_summary.json").read_text(encoding="utf-8"))
        summary = summary if isinstance(summary, dict) else {}
    except (OSError, ValueError):
        summary = {}  # a student saved by other means: its size is all there is to compare
    trained_with = summary.get("vocab")
    use = f"--vocab {trained_with}" if trained_with else "the --vocab it was trained with"
    size = config.get("vocab_size")
    if size != vocab.size:
        raise BadInput(f"{path} was trained with a union vocab of {size:,} tokens, but --vocab {vocab.path} has "
                       f"{vocab.size:,}: evaluate with {use}." if isinstance(size, int) else
                       f"{path}/config.json gives no vocab_size; --vocab {vocab.path} has {vocab.size:,} tokens.")
    if summary.get("vocab_hash") not in (None, vocab.hash):
        raise BadInput(f"{path} was trained with another union vocab of the same size ({size:,} tokens, hash "
                       f"{summary['vocab_hash']}) than --vocab {vocab.path} ({vocab.size:,} tokens, hash {vocab.hash}): "
                       f"evaluate with {use}.")
