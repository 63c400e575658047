"""A union-vocab student initialised from a teacher checkpoint (train-student --init-from).

The rule for each row of the union's embedding matrix (docs/vocab.md):

1. a token the teacher knows gets the teacher's row, copied exactly;
2. otherwise the token is re-tokenized by the teacher's own tokenizer (its normaliser, then
   its subword model; a `##` continuation stays a continuation), and if that gives pieces
   none of which is the teacher's unknown token, the row is the mean of those pieces' rows
   (so `Hindi` from a cased teacher starts as `hindi` of an uncased one);
3. otherwise (the teacher cannot spell it, or it is one of the five special tokens the
   teacher lacks) the row is the mean of all the teacher's rows plus Gaussian noise of
   standard deviation `noise_std` (default: the model's initializer_range, 0.02 for BERT),
   drawn from a generator seeded with `seed`, so that these rows start distinct.

The same rule, without noise, gives the MLM decoder's bias; an untied decoder matrix gets
the rule of the embeddings. A tied decoder stays tied.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import BadInput
from ..families import MLM_HEADS, positions_after_pad
from ..weights import load_error_reason
from .canonical import BYTELEVEL, CANONICAL_SPECIALS, WORDPIECE, surface_text
from .teachers import tokenizer_fingerprint
from .vocabdir import Vocab, load_vocab


@dataclass
class RowPlan:
    """Where each union row comes from: `source[u]` is the teacher id copied (or -1);
    union ids `decomposed` take the mean of teacher ids pieces.values[offsets[i]:offsets[i+1]];
    union ids `fallback` take the mean row plus noise."""

    source: np.ndarray
    decomposed: np.ndarray
    pieces_values: np.ndarray
    pieces_offsets: np.ndarray
    fallback: np.ndarray
    teacher_size: int


class _Speller:
    """Re-tokenizes a canonical token with one teacher's tokenizer; None when the teacher
    cannot spell it without its unknown token."""

    def __init__(self, tokenizer, convention: str):
        self.tokenizer = tokenizer
        self.convention = convention
        backend = tokenizer.backend_tokenizer
        self.normalizer = backend.normalizer
        self.model = backend.model
        self.unk = tokenizer.unk_token_id

    def __call__(self, canonical: str) -> list[int] | None:
        word_start, text = surface_text(canonical)
        if self.convention != WORDPIECE:
            if self.convention == BYTELEVEL and word_start:
                text = " " + text
            ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        else:
            # The subword model itself, so that a continuation is tokenized as one.
            if self.normalizer is not None:
                text = self.normalizer.normalize_str(text)
            ids = []
            for k, word in enumerate(text.split()):
                ids.extend(tok.id for tok in self.model.tokenize(word if (k or word_start) else "##" + word))
        return None if not ids or (self.unk is not None and self.unk in ids) else ids


def plan_rows(vocab: Vocab, teacher) -> RowPlan:
    """Apply the module's rule to every union token for one teacher of the vocab (memoised
    on the vocab: it depends on nothing else)."""
    entry = vocab.teacher(teacher)
    plans = vocab.__dict__.setdefault("_row_plans", {})
    if entry["slug"] not in plans:
        plans[entry["slug"]] = _plan_rows(vocab, entry)
    return plans[entry["slug"]]


def _plan_rows(vocab: Vocab, entry: dict) -> RowPlan:
    table = vocab.map_for(entry["slug"])
    n_tokens = int(entry["tokens"])
    source = np.full(vocab.size, -1, dtype=np.int64)
    source[table[:n_tokens]] = np.arange(n_tokens)
    spell = _Speller(vocab.teacher_tokenizer(entry["slug"]), entry["convention"])
    specials = {vocab.token_to_id[t] for t in CANONICAL_SPECIALS.values()}
    tokens = vocab.tokens
    decomposed, values, offsets, fallback = [], [], [0], []
    for u in np.flatnonzero(source < 0).tolist():
        pieces = None if u in specials else spell(tokens[u])
        if pieces:
            decomposed.append(u)
            values.extend(pieces)
            offsets.append(len(values))
        else:
            fallback.append(u)
    return RowPlan(
        source=source, decomposed=np.array(decomposed, dtype=np.int64),
        pieces_values=np.array(values, dtype=np.int64), pieces_offsets=np.array(offsets, dtype=np.int64),
        fallback=np.array(fallback, dtype=np.int64), teacher_size=n_tokens,
    )


def apply_plan(plan: RowPlan, teacher_rows, *, seed: int = 0, noise_std: float = 0.0):
    """The union's rows (a [V_union, d] matrix or a [V_union] vector) from a teacher's."""
    import torch

    teacher_rows = teacher_rows.detach().to(torch.float32)
    known_rows = teacher_rows[: plan.teacher_size]
    out = torch.empty((plan.source.size, *teacher_rows.shape[1:]), dtype=torch.float32)
    known = torch.from_numpy(np.flatnonzero(plan.source >= 0))
    out[known] = known_rows[torch.from_numpy(plan.source[plan.source >= 0])]
    if plan.decomposed.size:
        counts = np.diff(plan.pieces_offsets)
        segment = torch.from_numpy(np.repeat(np.arange(plan.decomposed.size), counts))
        sums = torch.zeros((plan.decomposed.size, *teacher_rows.shape[1:]), dtype=torch.float32)
        sums.index_add_(0, segment, known_rows[torch.from_numpy(plan.pieces_values)])
        shape = (-1,) + (1,) * (teacher_rows.dim() - 1)
        out[torch.from_numpy(plan.decomposed)] = sums / torch.from_numpy(counts).to(torch.float32).reshape(shape)
    if plan.fallback.size:
        mean = known_rows.mean(dim=0)
        rows = mean.expand(plan.fallback.size, *mean.shape).clone()
        if noise_std:
            generator = torch.Generator().manual_seed(seed)
            rows += torch.randn(rows.shape, generator=generator) * noise_std
        out[torch.from_numpy(plan.fallback)] = rows
    return out.to(teacher_rows.dtype)


def init_union_embeddings(teacher_embeddings, vocab: Vocab | str, teacher, *, seed: int = 0,
                          noise_std: float = 0.02):
    """A [union size, dim] embedding matrix from a teacher's [teacher size, dim] one."""
    vocab = vocab if isinstance(vocab, Vocab) else load_vocab(vocab)
    return apply_plan(plan_rows(vocab, teacher), teacher_embeddings, seed=seed, noise_std=noise_std)


def _find_teacher(vocab: Vocab, teacher_dir: Path, names: list[str]):
    for name in names:
        try:
            return vocab.teacher(name)
        except BadInput:
            continue
    from transformers import AutoTokenizer

    fingerprint = tokenizer_fingerprint(AutoTokenizer.from_pretrained(str(teacher_dir)))
    try:
        return vocab.teacher(fingerprint)
    except BadInput:
        raise BadInput(
            f"--init-from {teacher_dir}: its tokenizer is none of the vocab's teachers ({', '.join(vocab.teacher_names)}), "
            "so its rows cannot be placed in the union. Initialise from one of them, or rebuild the vocab with it."
        ) from None


def student_from_teacher(teacher: str, vocab: Vocab | str, teacher_name: str | None = None, *, seed: int = 0,
                         noise_std: float | None = None):
    """(masked-LM model, tokenizer) of a union-vocab student initialised from a teacher
    checkpoint (an alias, model id or directory; a model without an MLM head, like MiniLM,
    gets a fresh head). `teacher_name` is the teacher's name in the vocab; by default it is
    found from `teacher` or the checkpoint's tokenizer. Save both with save_pretrained."""
    import torch
    from torch import nn
    from transformers import AutoModelForMaskedLM

    from ..names import resolve_teacher

    vocab = vocab if isinstance(vocab, Vocab) else load_vocab(vocab)
    resolved = resolve_teacher(teacher)
    if resolved.path is None:
        raise BadInput(f"--init-from {teacher!r}: the checkpoint must be available locally (it resolved to the hub).")
    entry = _find_teacher(vocab, resolved.path, [n for n in (teacher_name, teacher, resolved.model_id) if n])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # a head the checkpoint lacks is initialised reproducibly
        try:
            model = AutoModelForMaskedLM.from_pretrained(str(resolved.path), dtype=torch.float32)
        except Exception as e:  # transformers raises many types (shapes, dtypes, files); all mean "cannot load"
            raise BadInput(f"--init-from {teacher!r}: transformers cannot load the model in {resolved.path} "
                           f"({load_error_reason(e)}). Give a directory that save_pretrained wrote, whose config.json "
                           "describes its weights.") from None
    config = model.config
    # Position ids computed from the pad id (RoBERTa, XLM-R: a real token's position is pad_id +
    # 1 + its index among real tokens, padding gets pad_id): the union's pad id shifts the table.
    if positions_after_pad(config.model_type) and config.pad_token_id != vocab.pad_id:
        _move_position_pad(model, teacher, int(config.pad_token_id), vocab.pad_id)
    std = float(getattr(config, "initializer_range", 0.02)) if noise_std is None else noise_std
    plan = plan_rows(vocab, entry)
    old_in = model.get_input_embeddings()
    old_out = model.get_output_embeddings()
    tied = old_out is not None and old_out.weight.data_ptr() == old_in.weight.data_ptr()
    new_in = nn.Embedding(vocab.size, old_in.embedding_dim, padding_idx=vocab.pad_id)
    new_in.weight.data = apply_plan(plan, old_in.weight, seed=seed, noise_std=std)
    model.set_input_embeddings(new_in)
    if old_out is not None:
        new_out = nn.Linear(old_out.in_features, vocab.size, bias=old_out.bias is not None)
        new_out.weight = new_in.weight if tied else nn.Parameter(apply_plan(plan, old_out.weight, seed=seed + 1, noise_std=std))
        if old_out.bias is not None:
            new_out.bias = nn.Parameter(apply_plan(plan, old_out.bias))
        model.set_output_embeddings(new_out)
        for name in MLM_HEADS:  # the head, whatever its family calls it
            head = getattr(model, name, None)
            if isinstance(getattr(head, "bias", None), nn.Parameter) and new_out.bias is not None:
                # RoBERTa/XLM-R: lm_head.bias is the decoder's bias (tied when saved and loaded),
                # but set_output_embeddings leaves it at the teacher's size.
                head.bias = new_out.bias
    config.vocab_size = vocab.size
    table = vocab.map_for(entry["slug"])
    for attr in ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id"):
        old = getattr(config, attr, None)
        if isinstance(old, int) and 0 <= old < table.size:
            setattr(config, attr, int(table[old]))
    config.pad_token_id = vocab.pad_id
    return model.eval(), vocab.student_tokenizer()


def _move_position_pad(model, teacher: str, old_pad: int, new_pad: int) -> None:
    """Give a model whose position ids derive from the pad id (RoBERTa, XLM-R) the union's pad
    id without moving any position: it reads position row pad + 1 + k for its k-th real token
    (and row pad for padding), so the table is shifted by old_pad - new_pad rows, keeping the
    same number of real positions; `padding_idx` (the attribute the position-id code reads)
    and the table's padding_idx become the union's. Token types are untouched."""
    import torch
    from torch import nn

    embeddings = getattr(model.base_model, "embeddings", None)
    old = getattr(embeddings, "position_embeddings", None)
    if not isinstance(old, nn.Embedding) or getattr(embeddings, "padding_idx", None) != old_pad:
        raise BadInput(
            f"--init-from {teacher!r}: a {model.config.model_type} model computes position ids from its pad id "
            f"({old_pad}), but its embeddings are not laid out as RoBERTa's (a position table and padding_idx), so "
            f"they cannot be moved to the union's pad id {new_pad}. Initialise from a BERT- or XLM-R-style teacher."
        )
    shift = old_pad - new_pad
    size = old.num_embeddings - shift  # as many real positions as before
    if size <= new_pad + 1:
        raise BadInput(f"--init-from {teacher!r}: its {old.num_embeddings} position rows leave no real position "
                       f"once moved to the union's pad id {new_pad}.")
    weight = torch.zeros(size, old.embedding_dim, dtype=old.weight.dtype)
    rows = torch.arange(max(0, -shift), size)  # rows below new_pad - old_pad are never read
    weight[rows] = old.weight.detach()[rows + shift]
    moved = nn.Embedding(size, old.embedding_dim, padding_idx=new_pad)
    moved.weight.data = weight
    embeddings.position_embeddings = moved
    embeddings.padding_idx = new_pad
    for name in ("position_ids", "token_type_ids"):  # [1, max positions] buffers, resized with the table
        buffer = getattr(embeddings, name, None)
        if isinstance(buffer, torch.Tensor):
            value = torch.arange(size) if name == "position_ids" else torch.zeros(size, dtype=buffer.dtype)
            setattr(embeddings, name, value.to(buffer.dtype).expand(1, -1))
    model.config.max_position_embeddings = size
