"""Student models: plain Hugging Face masked LMs (and, for methods that distil class logits,
sequence classifiers over the same encoder), so a trained student loads anywhere
transformers does (AutoModelFor... + AutoTokenizer on the output directory)."""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import BadInput
from ..families import MLM_HEADS, STUDENT_ARCHITECTURES, family_of, position_offset
from ..options import check_memory, check_number, machine_memory
from ..segments import takes_token_types
from ..storage.untrusted import parse_json, refuse_links_out
from ..weights import config_size_problem, custom_code_problem, load_error_reason, safe_load_problem, weights_problem

ARCHITECTURES = STUDENT_ARCHITECTURES  # StudentConfig.architecture, train-student --architecture (xkd/families/)


@dataclass(frozen=True)
class StudentConfig:
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    intermediate: int = 0  # 0: 4 x hidden
    embedding_dim: int = 0  # 0: same as hidden; smaller: a factorised embedding (ALBERT-style)
    max_length: int = 512
    dropout: float = 0.1
    # bert: BERT (ALBERT with --embedding-dim); xlm-roberta: XLM-R (positions from the pad id, one token type)
    architecture: str = "bert"

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise BadInput(f"--architecture {self.architecture!r} is not a student architecture: give one of "
                           f"{', '.join(ARCHITECTURES)} (default bert).")
        if self.architecture != "bert" and self.embedding_dim not in (0, self.hidden):
            raise BadInput(f"--embedding-dim {self.embedding_dim} with --architecture {self.architecture}: a "
                           "factorised embedding is an ALBERT, i.e. a BERT student; drop --embedding-dim or use "
                           "--architecture bert.")
        for option, value, low in (("--hidden", self.hidden, 1), ("--layers", self.layers, 1), ("--heads", self.heads, 1),
                                   ("--intermediate", self.intermediate, 0), ("--embedding-dim", self.embedding_dim, 0),
                                   ("--max-length", self.max_length, 1)):
            check_number(option, value, low=low)
        # Dropout 1 zeroes every activation and scales by 1/(1-p) = inf: a NaN loss.
        check_number("--dropout", self.dropout, low=0, high=1, high_open=True, hint="a probability below 1")
        if self.hidden % self.heads:
            raise BadInput(f"--hidden {self.hidden} must be a multiple of --heads {self.heads}")
        check_student_memory(self, vocab_size=0)  # the vocab's share is checked once it is known (build_student)


# Training holds each parameter four times in fp32: the weight, its gradient and Adam's two moments.
TRAINING_BYTES_PER_PARAMETER = 16


def student_parameters(config: StudentConfig, vocab_size: int, pad_id: int = 0) -> dict[str, int]:
    """The parameters a student of this shape holds, by the option that sizes them (biases and
    layer norms, a few per mille, left out): the embeddings (vocab and positions x embedding
    width, plus ALBERT's projection), the layers (four attention matrices and the
    feed-forward pair each), and the masked-LM head's transform (its decoder is the tied
    embedding)."""
    width = config.hidden
    embedding = config.embedding_dim or width
    intermediate = config.intermediate or 4 * width
    positions = config.max_length + position_offset(config.architecture, pad_id)
    embeddings = (vocab_size + 2 + positions) * embedding + (embedding * width if embedding != width else 0) \
        + width * embedding
    layers = config.layers * (4 * width * width + 2 * width * intermediate)
    # Named by the option that grows them: the embedding width, and the layers' width or count
    return {"--embedding-dim" if config.embedding_dim else "--hidden": embeddings,
            "--layers" if config.layers > width else "--hidden": layers}


def check_student_memory(config: StudentConfig, vocab_size: int, pad_id: int = 0) -> None:
    """One paragraph when training a student of this shape cannot fit in this machine's
    memory, naming the option that sizes most of it; before anything is allocated."""
    parts = student_parameters(config, vocab_size, pad_id)
    total = sum(parts.values())
    option = max(parts, key=parts.get)
    value = {"--embedding-dim": config.embedding_dim, "--hidden": config.hidden, "--layers": config.layers}[option]
    shape = (f"--hidden {config.hidden} --layers {config.layers} --max-length {config.max_length}"
             + (f" --embedding-dim {config.embedding_dim}" if config.embedding_dim else "")
             + (f" over a vocab of {vocab_size:,} tokens" if vocab_size else ""))
    largest = None
    if option == "--embedding-dim" and vocab_size:  # its parameters grow linearly with it: the largest that fits
        per_unit = vocab_size + 2 + config.max_length + 2 * config.hidden
        layers = total - parts["--embedding-dim"]
        largest = max(0, (machine_memory() // TRAINING_BYTES_PER_PARAMETER - layers) // per_unit)
    check_memory(option, value, total * TRAINING_BYTES_PER_PARAMETER,
                 f"a student of {total:,} parameters ({shape}), trained with {TRAINING_BYTES_PER_PARAMETER} bytes per "
                 "parameter (fp32 weights, gradients and Adam's two moments),", largest=largest,
                 after="Give a smaller student. Nothing was written.")


# Saved models ---------------------------------------------------------------------------


def check_model_dir(path, what: str) -> dict:
    """A saved model directory's config.json, after checking that its config and weights are
    whole: a truncated weights file otherwise surfaces as a deserialisation traceback deep in
    transformers. `what` names the option or argument in the message."""
    path = Path(path)
    if any((path / name).is_file() for name in ("xkd_student.json", "train_summary.json")):
        # A student xkd wrote: what is loaded from it stays inside it, as for its tokenizer.
        refuse_links_out(path, "student directory")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise BadInput(f"{what} {path} is not a saved model (no config.json): give a directory that save_pretrained wrote.")
    try:
        config = parse_json(config_path.read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise BadInput(f"{what}: {config_path} is damaged ({e}); save or train the model again.") from None
    found = weights_problem(path)
    if found is not None:
        file, problem = found
        raise BadInput(f"{what}: {file} is damaged: {problem}. Copy it again or re-run the command that wrote it "
                       "(for a student, train-student; its checkpoints are kept).")
    oversized = config_size_problem(path, config)  # the model is built from config.json before its weights load
    if oversized is not None:
        raise BadInput(f"{what}: {config_path}: {oversized}. Copy the model again or re-run the command that wrote it.")
    check_loadable(path, what)
    return config


def check_loadable(path: Path, what: str) -> None:
    """What would stop transformers loading the model, as one paragraph naming the directory,
    checked before it is loaded: code of its own (auto_map; xkd never passes
    trust_remote_code), weights the safe loader refuses, a config transformers cannot read."""
    custom = custom_code_problem(path)
    if custom is not None:
        raise BadInput(f"{what} {path}: {custom[0]} asks for the model's own Python code (auto_map: {custom[1]}), which "
                       "xkd never runs (it does not pass trust_remote_code), and without it transformers would build "
                       "another model. Give a model of an architecture transformers has built in, saved without auto_map.")
    refused = safe_load_problem(path)
    if refused is not None:
        raise BadInput(f"{what} {path}: {refused[0]}: {refused[1]}. Save the model as model.safetensors from a copy "
                       "you trust (save_pretrained), or give another model.")
    from transformers import AutoConfig

    from . import mblm  # noqa: F401  (registers MBLM students with the Auto classes)

    try:
        AutoConfig.from_pretrained(str(path))
    except Exception as e:  # transformers raises several types; all mean "cannot build this model"
        raise BadInput(f"{what} {path}: transformers cannot read {Path(path) / 'config.json'} ({load_error_reason(e)}). "
                       "Give a directory that save_pretrained wrote.") from None


@dataclass(frozen=True)
class StudentShape:
    """What a method's plan may ask of the student before it is built."""

    layers: int
    hidden: int
    heads: int


def student_shape(config: StudentConfig, init_from: str | None = None) -> StudentShape:
    """The shape of the student train-student will build: from --init-from's config.json
    (a teacher, or a student directory), else from the student options."""
    if init_from:
        cfg = check_model_dir(init_dir(init_from), "--init-from")
        try:
            return StudentShape(int(cfg["num_hidden_layers"]), int(cfg["hidden_size"]), int(cfg["num_attention_heads"]))
        except (KeyError, TypeError, ValueError):
            raise BadInput(f"--init-from {init_from}: its config.json gives no num_hidden_layers, hidden_size and "
                           "num_attention_heads; give a BERT-style encoder.") from None
    return StudentShape(config.layers, config.hidden, config.heads)


def init_dir(init_from: str) -> Path:
    """Where an --init-from checkpoint (a directory, or a teacher alias or id) lives."""
    path = Path(init_from)
    if (path / "config.json").is_file():
        return path
    from ..names import resolve_teacher

    resolved = resolve_teacher(init_from)
    if resolved.path is None:
        raise BadInput(f"--init-from {init_from!r}: the checkpoint must be available locally (it resolved to the hub).")
    return Path(resolved.path)


def build_student(config: StudentConfig, vocab_size: int, pad_id: int):
    """A randomly initialised student over the union vocabulary.

    A reduced embedding dimension (MergeDistill keeps parameters near mBERT's by shrinking
    the 290k-row embedding) uses ALBERT's factorised embedding with one parameter group per
    layer, i.e. a BERT with an embedding projection and no layer sharing.

    Otherwise the masked LM its family declares. `architecture="xlm-roberta"`: an
    XLMRobertaForMaskedLM, whose position ids are computed from the pad id (the k-th real
    token reads row pad_id + 1 + k, padding reads row pad_id), so it has max_length + pad_id +
    1 position rows; one token type, as XLM-R.
    """
    import transformers

    check_student_memory(config, vocab_size, pad_id)  # before a matrix is allocated
    common = dict(
        vocab_size=vocab_size, hidden_size=config.hidden, num_hidden_layers=config.layers,
        num_attention_heads=config.heads, intermediate_size=config.intermediate or 4 * config.hidden,
        max_position_embeddings=config.max_length + position_offset(config.architecture, pad_id),
        hidden_dropout_prob=config.dropout, attention_probs_dropout_prob=config.dropout, pad_token_id=pad_id,
    )
    if config.embedding_dim and config.embedding_dim != config.hidden:  # a bert student (StudentConfig checks)
        albert = transformers.AlbertConfig(**common, embedding_size=config.embedding_dim,
                                           num_hidden_groups=config.layers, inner_group_num=1, hidden_act="gelu")
        return transformers.AlbertForMaskedLM(albert)
    family = family_of(config.architecture)  # its declaration names the classes (xkd/families/)
    config_class, model_class = (getattr(transformers, name) for name in family.student_classes)
    return model_class(config_class(**common, **dict(family.student_config)))


def _pre_dropout_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention that returns the attention probabilities BEFORE dropout: the output is
    the same as transformers' eager attention (dropout applied to the probabilities that
    weight the values), but the maps handed back are the softmax itself, the quantity
    TinyBERT's L_attn compares with the teacher's (cached in inference mode, no dropout)."""
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1)
    dropped = torch.nn.functional.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(dropped, value).transpose(1, 2).contiguous(), probs


PRE_DROPOUT_ATTENTION = "xkd_pre_dropout_eager"


def use_pre_dropout_attention(model) -> None:
    """Make `model` return pre-dropout attention maps (output_attentions=True)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    AttentionInterface.register(PRE_DROPOUT_ATTENTION, _pre_dropout_attention)
    # The same additive float mask eager attention gets (padding keys at -inf).
    ALL_MASK_ATTENTION_FUNCTIONS.register(PRE_DROPOUT_ATTENTION, eager_mask)
    model.set_attn_implementation(PRE_DROPOUT_ATTENTION)



@dataclass
class StudentOutput:
    logits: object = None
    last_hidden_state: object = None
    hidden_states: object = None
    attentions: object = None


class Student(torch.nn.Module):
    """The student as methods call it, and as DDP wraps it.

    Given `masked_flat` (flat indices into batch x length), the masked-LM head runs only at
    those positions: on a union vocabulary of ~290k tokens the vocabulary projection is most
    of a small student's step, and only ~15% of positions are masked.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, masked_flat=None, **kwargs):
        if "token_type_ids" in kwargs and not takes_token_types(self.model.config):
            kwargs.pop("token_type_ids")
        if masked_flat is None:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        out = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        hidden = out.last_hidden_state
        head = next(getattr(self.model, name) for name in MLM_HEADS if hasattr(self.model, name))
        return StudentOutput(
            logits=head(hidden.reshape(-1, hidden.shape[-1])[masked_flat]),
            last_hidden_state=hidden,
            hidden_states=getattr(out, "hidden_states", None),
            attentions=getattr(out, "attentions", None),
        )


# Sequence-classifier students (xd, multikd, tinybert stage 2) ------------------------


@contextlib.contextmanager
def quiet_transformers():
    """Loading an encoder under a new head reports every unused and new weight; here that is
    the intent, not news."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def classifier_student(vocab, config, init_from: str | None, init_teacher: str | None, num_labels: int,
                       label_names: list[str] | None = None):
    """A sequence classifier over the union vocab: the encoder of the default masked-LM
    student (random, or `init_from` through the union-vocab embedding initialisation) under
    a classification head. When `init_from` has a pooler (a BERT encoder such as MiniLM, or a
    classifier) it is copied; when it is a sequence classifier with the same number of
    classes, its classifier is copied too, so the student starts as the teacher."""
    from transformers import AutoModelForSequenceClassification

    if init_from:
        from ..vocab import student_from_teacher

        with quiet_transformers():
            masked_lm = student_from_teacher(init_from, vocab, init_teacher)[0]
    else:
        masked_lm = build_student(config, vocab.size, vocab.pad_id)
    cfg = copy.deepcopy(masked_lm.config)
    cfg.architectures = None
    cfg.num_labels = num_labels
    if label_names and len(label_names) == num_labels:
        cfg.id2label = dict(enumerate(label_names))
        cfg.label2id = {name: i for i, name in enumerate(label_names)}
    model = AutoModelForSequenceClassification.from_config(cfg)
    missing, unexpected = model.base_model.load_state_dict(masked_lm.base_model.state_dict(), strict=False)
    if unexpected or any(not k.startswith("pooler.") for k in missing):
        raise BadInput(f"the student's encoder does not fit a {type(model).__name__} (missing {missing[:3]}, "
                       f"unexpected {unexpected[:3]}).")
    if init_from:
        with quiet_transformers():
            _copy_head(model, init_from, num_labels)
    return model.eval()


def _copy_head(model, init_from: str, num_labels: int) -> None:
    from transformers import AutoModel, AutoModelForSequenceClassification

    from ..names import resolve_teacher

    path = resolve_teacher(init_from).path
    config = parse_json((Path(path) / "config.json").read_text())
    source_is_classifier = any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or [])
    if source_is_classifier and len(config.get("id2label") or {}) == num_labels:
        source = AutoModelForSequenceClassification.from_pretrained(str(path), dtype=torch.float32)
        model.classifier.load_state_dict(source.classifier.state_dict())
        model.config.id2label, model.config.label2id = dict(source.config.id2label), dict(source.config.label2id)
        encoder = source.base_model
    else:
        encoder = AutoModel.from_pretrained(str(path), dtype=torch.float32)
    ours = getattr(model.base_model, "pooler", None)
    theirs = getattr(encoder, "pooler", None)
    if ours is not None and theirs is not None:
        ours.load_state_dict(theirs.state_dict())


def is_classifier(model) -> bool:
    return type(model).__name__.endswith("ForSequenceClassification")
