"""The model family declarations (xkd/families/) against what the families' models and
tokenizers do: a tiny model of each family in tests/families.py, with its real tokenizer,
is looked up by its config.json model_type, and its declared word convention, MLM head and
position offset are checked by running it. Then the registry itself: the aliases xkd has
always had, nothing declared twice, the docs' alias table, and the student architectures."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from xkd.families import FAMILIES, MLM_HEADS, STUDENT_ARCHITECTURES, TEACHER_ALIASES, family_of, position_offset

from families import FAMILIES as TEST_FAMILIES, build_family

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("declared")
    return {family: build_family(family, root / family, "mlm", seed=3) for family in TEST_FAMILIES}


def load(path):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    return AutoModelForMaskedLM.from_pretrained(str(path)).eval(), AutoTokenizer.from_pretrained(str(path))


def real_ids(tokenizer, length: int) -> torch.Tensor:
    """One row of `length` ids that are no special token (position ids count real tokens)."""
    specials = set(tokenizer.all_special_ids)
    word = next(i for i in range(len(tokenizer)) if i not in specials)
    return torch.full((1, length), word, dtype=torch.long)


@pytest.mark.parametrize("test_family", TEST_FAMILIES)
def test_a_family_declares_what_its_models_and_tokenizers_do(models, test_family):
    from xkd.vocab.teachers import backend_spec, convention_of

    model, tokenizer = load(models[test_family])
    config = model.config
    family = family_of(config.model_type)
    assert family is not None and config.model_type in family.model_types
    # The convention its tokenizer.json states.
    assert convention_of(backend_spec(tokenizer), test_family) == family.convention
    # The MLM head: the one module that maps final hidden states to the model's own logits.
    ids = real_ids(tokenizer, 12)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        hidden = model.base_model(input_ids=ids).last_hidden_state
        if family.mlm_head is None:
            assert not any(hasattr(model, name) for name in MLM_HEADS)
        else:
            torch.testing.assert_close(getattr(model, family.mlm_head)(hidden), logits)
    # The position offset: the longest input the model takes is its table less the offset.
    longest = config.max_position_embeddings - position_offset(config.model_type, config.pad_token_id)
    with torch.no_grad():
        assert model(input_ids=real_ids(tokenizer, longest)).logits.shape[1] == longest
        if getattr(model.base_model.embeddings, "position_embeddings", None) is not None:  # absolute positions
            with pytest.raises((IndexError, RuntimeError)):
                model(input_ids=real_ids(tokenizer, longest + 1))


def test_the_aliases_are_those_xkd_always_had():
    from xkd.names import TEACHER_ALIASES as resolved_by

    assert TEACHER_ALIASES == {
        "bert-base": "google-bert/bert-base-uncased",
        "bert-base-cased": "google-bert/bert-base-cased",
        "mbert": "google-bert/bert-base-multilingual-cased",
        "muril": "google/muril-base-cased",
        "xlmr": "FacebookAI/xlm-roberta-base",
        "mdeberta": "microsoft/mdeberta-v3-base",
        "distilmbert": "distilbert/distilbert-base-multilingual-cased",
        "roberta-base": "FacebookAI/roberta-base",
        "minilm": "sentence-transformers/all-MiniLM-L6-v2",
    }
    assert resolved_by is TEACHER_ALIASES


def test_nothing_is_declared_twice_and_every_convention_has_a_canonical_form():
    from xkd.vocab.canonical import CONVENTIONS

    for what in (lambda f: f.model_types, lambda f: [alias for alias, _ in f.aliases]):
        declared = [value for family in FAMILIES for value in what(family)]
        assert len(declared) == len(set(declared)), declared
    assert {f.convention for f in FAMILIES} <= set(CONVENTIONS)
    assert all(family_of(f.name) is f for f in FAMILIES)


def test_the_docs_alias_table_lists_every_alias():
    table = dict(re.findall(r"^\| `([^`]+)` \| (\S+) \|", (DOCS / "pipeline.md").read_text(encoding="utf-8"), re.M))
    assert table == TEACHER_ALIASES


@pytest.mark.parametrize("architecture", STUDENT_ARCHITECTURES)
def test_a_student_architecture_builds_its_declared_class_and_its_head_serves_masked_positions(architecture):
    from xkd.student.models import Student, StudentConfig, build_student

    pad_id, max_length = 3, 16
    model = build_student(StudentConfig(hidden=32, layers=1, heads=2, max_length=max_length, architecture=architecture),
                          60, pad_id).eval()
    assert type(model).__name__ == family_of(architecture).student_classes[1]
    ids = torch.full((2, max_length), 7)  # max_length real tokens fit, whatever the offset
    mask = torch.ones_like(ids)
    masked = torch.tensor([1, 5, 20])
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
        heads = Student(model)(ids, mask, masked_flat=masked).logits
    torch.testing.assert_close(heads, full.reshape(-1, full.shape[-1])[masked])


def test_mblm_is_made_from_declared_families_only():
    from xkd.student.mblm import PARTS

    assert all(family_of(name) is not None and family_of(name).name == name for name in PARTS)
