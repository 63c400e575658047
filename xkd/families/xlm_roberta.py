"""XLM-R: SentencePiece Unigram (`▁` word starts, `<s> <pad>=1 </s> <unk>`), RoBERTa's model:
position ids from the pad id, one token type.

CamemBERT and XLM-R XL are the same model under other names."""

from dataclasses import replace

from .roberta import FAMILY as ROBERTA

# RoBERTa's model (what it declares of positions and the MLM head carries over), with its own
# tokenizer, checkpoints and student.
FAMILY = replace(
    ROBERTA,
    name="xlm-roberta",
    model_types=("xlm-roberta", "xlm-roberta-xl", "camembert"),
    convention="sentencepiece",
    aliases=(("xlmr", "FacebookAI/xlm-roberta-base"),),
    student_classes=("XLMRobertaConfig", "XLMRobertaForMaskedLM"),
    # One token type, as XLM-R; bos/eos: XLMRobertaConfig's defaults (0, 2) are XLM-R's ids, not the union's.
    student_config=(("type_vocab_size", 1), ("bos_token_id", None), ("eos_token_id", None)),
)
