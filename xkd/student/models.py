"""Student models: plain Hugging Face masked LMs, so a trained student loads anywhere
transformers does (AutoModelForMaskedLM + AutoTokenizer on the output directory)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import BadInput


@dataclass(frozen=True)
class StudentConfig:
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    intermediate: int = 0  # 0: 4 x hidden
    embedding_dim: int = 0  # 0: same as hidden; smaller: a factorised embedding (ALBERT-style)
    max_length: int = 512
    dropout: float = 0.1

    def __post_init__(self):
        if self.hidden % self.heads:
            raise BadInput(f"--hidden {self.hidden} must be a multiple of --heads {self.heads}")


def build_student(config: StudentConfig, vocab_size: int, pad_id: int):
    """A randomly initialised student over the union vocabulary.

    A reduced embedding dimension (MergeDistill keeps parameters near mBERT's by shrinking
    the 290k-row embedding) uses ALBERT's factorised embedding with one parameter group per
    layer, i.e. a BERT with an embedding projection and no layer sharing.
    """
    from transformers import AlbertConfig, AlbertForMaskedLM, BertConfig, BertForMaskedLM

    common = dict(
        vocab_size=vocab_size, hidden_size=config.hidden, num_hidden_layers=config.layers,
        num_attention_heads=config.heads, intermediate_size=config.intermediate or 4 * config.hidden,
        max_position_embeddings=config.max_length, hidden_dropout_prob=config.dropout,
        attention_probs_dropout_prob=config.dropout, pad_token_id=pad_id,
    )
    if config.embedding_dim and config.embedding_dim != config.hidden:
        albert = AlbertConfig(**common, embedding_size=config.embedding_dim,
                              num_hidden_groups=config.layers, inner_group_num=1, hidden_act="gelu")
        return AlbertForMaskedLM(albert)
    return BertForMaskedLM(BertConfig(**common))


_MLM_HEADS = ("cls", "predictions", "lm_head")  # BERT / ALBERT / RoBERTa-style attribute names


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
        if masked_flat is None:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        out = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        hidden = out.last_hidden_state
        head = next(getattr(self.model, name) for name in _MLM_HEADS if hasattr(self.model, name))
        return StudentOutput(
            logits=head(hidden.reshape(-1, hidden.shape[-1])[masked_flat]),
            last_hidden_state=hidden,
            hidden_states=getattr(out, "hidden_states", None),
            attentions=getattr(out, "attentions", None),
        )
