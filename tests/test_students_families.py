"""Students of other families (issue 13): XLM-R-style students over a union vocab.

1. A union-vocab student initialised from an XLM-R teacher (`student_from_teacher`), whose
   position ids derive from the pad id: with the union's pad id (0, the teacher's is 1) the
   position table is shifted so that it computes what the teacher computes, checked against
   the teacher run directly on its own tokenization and against positions computed by hand.
2. A randomly initialised XLM-R student (`--architecture xlm-roberta`), trained and saved by
   `train-student --method mlm`, loading with AutoModelForMaskedLM and AutoTokenizer.
3. MBLM made from an XLM-R classifier: at init the XLM-R classifier itself (docs/mblm.md),
   one training step updating only the batch language's branch, save/Auto-load, and
   `multikd --option student=mblm` through the CLI.

The tiny XLM-R has random weights and a real SentencePiece Unigram tokenizer (tests/families.py).
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from xkd import load_vocab
from xkd.cli import app
from xkd.errors import BadInput
from xkd.student.models import Student, StudentConfig, build_student
from xkd.vocab import build_vocab, student_from_teacher

from conftest import cache_teacher
from families import build_family

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EN = ["The team won the match yesterday.", "It rained all day in the city, and the final was put off until Monday.",
      "Prices rose 3.5% to $1,200!", "She cooked rice."]
ES = ["El equipo ganó el partido ayer.", "Llovió todo el día en la ciudad.", "Ella cocinó arroz con verduras.",
      "Los precios subieron otra vez esta semana."]
# A second, WordPiece teacher (a bare vocab file): the union is more than the XLM-R's pieces.
WORDPIECE = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "team", "won", "match", "##es", "##ing", "rain",
             "##ed", "city", "el", "equipo", "perro", "casa", "東", "京", "##s", "!", ",", "."]
TINY = dict(hidden=32, layers=2, heads=2, dropout=0.0)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("students-families")
    mlm = build_family("xlmr", root / "xlmr-mlm", "mlm", seed=1)
    classifier = build_family("xlmr", root / "xlmr-cls", "classifier", seed=2)  # the same tokenizer
    wordpiece = root / "tiny-wordpiece.vocab.txt"
    wordpiece.write_text("\n".join(WORDPIECE) + "\n", encoding="utf-8")
    build_vocab([str(mlm), str(wordpiece)], root / "vocab", {"en": str(mlm), "es": str(mlm), "zh": str(wordpiece)})
    return {"root": root, "mlm": mlm, "classifier": classifier, "vocab": str(root / "vocab")}


def assert_close_at_scale(actual, expected, rtol=1e-5):
    """Equal up to float32 rounding: rtol relative to each value and to the tensor's magnitude."""
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * float(expected.abs().max()))


def as_torch(batch: dict) -> dict:
    return {k: torch.as_tensor(np.asarray(v)) for k, v in batch.items()}


def last_hidden(model, **inputs):
    with torch.no_grad():
        return model(**inputs, output_hidden_states=True).hidden_states[-1]


# 1. A student initialised from an XLM-R teacher --------------------------------------------------

def test_xlmr_teacher_initialises_a_student_that_computes_as_the_teacher(setup, tmp_path):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    vocab = load_vocab(setup["vocab"])
    teacher = AutoModelForMaskedLM.from_pretrained(str(setup["mlm"])).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(setup["mlm"]))
    old_pad, new_pad = teacher.config.pad_token_id, vocab.pad_id
    assert (old_pad, new_pad) == (1, 0)  # the case the shift exists for
    model, _ = student_from_teacher(str(setup["mlm"]), vocab)
    embeddings = model.roberta.embeddings
    assert model.config.model_type == "xlm-roberta" and model.config.pad_token_id == new_pad
    assert embeddings.padding_idx == new_pad and embeddings.position_embeddings.padding_idx == new_pad
    assert model.config.type_vocab_size == 1 and embeddings.token_type_embeddings.num_embeddings == 1
    assert torch.equal(embeddings.token_type_embeddings.weight, teacher.roberta.embeddings.token_type_embeddings.weight)

    table = torch.from_numpy(vocab.map_for(str(setup["mlm"])).astype(np.int64))
    teacher_rows = teacher.get_input_embeddings().weight
    assert torch.equal(model.get_input_embeddings().weight[table], teacher_rows)
    # Position rows by hand: the k-th real token reads row pad + 1 + k in both, padding reads row pad.
    old_table, new_table = teacher.roberta.embeddings.position_embeddings.weight, embeddings.position_embeddings.weight
    real = old_table.shape[0] - old_pad - 1
    assert new_table.shape[0] == new_pad + 1 + real == model.config.max_position_embeddings
    assert torch.equal(new_table[new_pad + 1: new_pad + 1 + real], old_table[old_pad + 1:])
    assert torch.equal(new_table[new_pad], old_table[old_pad])

    for lang, texts in (("en", EN), ("es", ES)):
        teacher_batch = tokenizer(texts, padding=True, return_tensors="pt")
        student_batch = as_torch(vocab.encode(texts, lang))
        # The same tokens in union ids, every one of them a row copied from the teacher.
        assert torch.equal(table[teacher_batch["input_ids"]], student_batch["input_ids"])
        assert torch.equal(teacher_batch["attention_mask"], student_batch["attention_mask"])
        expected = last_hidden(teacher, **teacher_batch)
        got = last_hidden(model, **student_batch)
        assert_close_at_scale(got, expected)  # padding positions included
        with torch.no_grad():
            logits = model(**student_batch).logits[..., table]  # the MLM head too, restricted to the teacher's ids
            assert_close_at_scale(logits, teacher(**teacher_batch).logits)
        for i, text in enumerate(texts):  # batched with padding == one by one == the teacher's positions by hand
            one = as_torch(vocab.encode([text], lang))
            n = one["input_ids"].shape[1]
            alone = last_hidden(model, **one)
            assert_close_at_scale(got[i, :n], alone[0])
            by_hand = last_hidden(teacher, input_ids=tokenizer([text], return_tensors="pt")["input_ids"],
                                  position_ids=torch.arange(n)[None] + old_pad + 1)
            assert_close_at_scale(alone[0], by_hand[0])

    # Without the shift (the teacher's table under the union's pad id) every position moves by one.
    unshifted = copy.deepcopy(model)
    unshifted.roberta.embeddings.position_embeddings = copy.deepcopy(teacher.roberta.embeddings.position_embeddings)
    unshifted.roberta.embeddings.position_embeddings.padding_idx = new_pad
    student_batch = as_torch(vocab.encode(EN, "en"))
    wrong, right = last_hidden(unshifted, **student_batch), last_hidden(model, **student_batch)
    real_tokens = student_batch["attention_mask"].bool()
    assert float((wrong - right)[real_tokens].abs().max()) > 0.3 * float(right.abs().max())

    # Saved, it loads through the Auto classes and computes the same.
    model.save_pretrained(tmp_path / "student")
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path / "student").eval()
    assert loaded.roberta.embeddings.padding_idx == new_pad
    with torch.no_grad():
        torch.testing.assert_close(loaded(**student_batch).logits, model(**student_batch).logits, rtol=0, atol=0)


# 2. A random XLM-R student ------------------------------------------------------------------------

def test_random_xlmr_student_reads_positions_from_the_unions_pad(setup):
    from transformers import XLMRobertaForMaskedLM

    vocab = load_vocab(setup["vocab"])
    config = StudentConfig(**TINY, max_length=24, architecture="xlm-roberta")
    torch.manual_seed(0)
    model = build_student(config, vocab.size, vocab.pad_id).eval()
    assert isinstance(model, XLMRobertaForMaskedLM)
    assert model.config.pad_token_id == vocab.pad_id and model.roberta.embeddings.padding_idx == vocab.pad_id
    assert model.config.max_position_embeddings == 24 + vocab.pad_id + 1 and model.config.type_vocab_size == 1
    assert model.config.vocab_size == vocab.size

    batch = as_torch(vocab.encode(ES + ["uno dos tres cuatro cinco seis siete ocho nueve diez once doce trece"], "es",
                                  max_length=24))
    assert batch["input_ids"].shape[1] == 24  # a text of max_length tokens fits
    lengths = batch["attention_mask"].sum(1)
    by_hand = torch.where(batch["attention_mask"].bool(), torch.arange(24)[None] + vocab.pad_id + 1, vocab.pad_id)
    assert_close_at_scale(last_hidden(model, **batch), last_hidden(model, **batch, position_ids=by_hand))
    # The Student wrapper finds XLM-R's head (lm_head) and runs it at the masked positions only.
    masked_flat = torch.tensor([1, 3, 24 + 2, 4 * 24 + int(lengths[4]) - 2])
    with torch.no_grad():
        full = model(**batch).logits.reshape(-1, vocab.size)[masked_flat]
        token_types = {"token_type_ids": torch.zeros_like(batch["input_ids"])}  # dropped: XLM-R has one type
        got = Student(model)(batch["input_ids"], batch["attention_mask"], masked_flat=masked_flat, **token_types).logits
    assert_close_at_scale(got, full)


def test_architecture_option_errors(setup, tmp_path):
    with pytest.raises(BadInput, match="--architecture 'gpt2' is not a student architecture"):
        StudentConfig(architecture="gpt2")
    with pytest.raises(BadInput, match="--embedding-dim 16 with --architecture xlm-roberta"):
        StudentConfig(hidden=32, heads=2, embedding_dim=16, architecture="xlm-roberta")
    assert StudentConfig(hidden=32, heads=2, embedding_dim=32, architecture="xlm-roberta").embedding_dim == 32
    base = ["train-student", "--method", "mlm", "--caches", str(tmp_path / "none"), "--vocab", setup["vocab"],
            "--out", str(tmp_path / "out")]
    for extra, message in (
            (["--architecture", "gpt2"], "is not a student architecture: give one of bert, xlm-roberta"),
            (["--architecture", "xlm-roberta", "--embedding-dim", "64"], "a factorised embedding is an ALBERT")):
        result = CliRunner().invoke(app, base + extra)
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1  # one paragraph
    assert not (tmp_path / "out").exists()


# Caches for the CLI runs ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def caches(setup, thread_client):
    root = setup["root"]
    en, es = root / "en.txt", root / "es.txt"
    en.write_text("\n".join(EN) + "\n", encoding="utf-8")
    es.write_text("\n".join(ES) + "\n", encoding="utf-8")
    out = root / "caches"
    return {
        "mlm": cache_teacher(thread_client, out, setup["mlm"], f"text:{en}@en", topk=4, max_length=32),
        "en": cache_teacher(thread_client, out, setup["classifier"], f"text:{en}@en", text=True, max_length=32),
        "es": cache_teacher(thread_client, out, setup["classifier"], f"text:{es}@es", text=True, max_length=32),
    }


def train(args, out):
    # --init-from keeps the checkpoint's shape: the shape options are refused with it (issue 20)
    shape = [] if "--init-from" in args else ["--hidden", "32", "--layers", "2", "--heads", "2"]
    result = CliRunner().invoke(app, ["train-student", *args, *shape,
                                      "--steps", "2", "--batch-size", "4", "--lr", "1e-3", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["steps"] == 2


def test_train_student_mlm_with_an_xlmr_architecture(setup, caches, tmp_path):
    from transformers import AutoModelForMaskedLM, AutoTokenizer, XLMRobertaForMaskedLM

    vocab = load_vocab(setup["vocab"])
    out = tmp_path / "student"
    train(["--method", "mlm", "--caches", caches["mlm"], "--vocab", setup["vocab"], "--architecture", "xlm-roberta"],
          out)
    model = AutoModelForMaskedLM.from_pretrained(out).eval()
    assert isinstance(model, XLMRobertaForMaskedLM) and model.config.vocab_size == vocab.size
    assert model.config.pad_token_id == vocab.pad_id and model.config.type_vocab_size == 1
    assert model.config.max_position_embeddings == StudentConfig().max_length + vocab.pad_id + 1
    assert len(AutoTokenizer.from_pretrained(out)) == vocab.size
    # The tied decoder bias was saved at the union's size and trained; positions still from the pad id.
    bias = model.lm_head.bias.detach()
    assert torch.equal(bias, model.lm_head.decoder.bias) and float(bias.abs().sum()) > 0
    batch = as_torch(vocab.encode(EN, "en"))
    positions = torch.arange(batch["input_ids"].shape[1])[None] + vocab.pad_id + 1
    by_hand = torch.where(batch["attention_mask"].bool(), positions, vocab.pad_id)
    assert_close_at_scale(last_hidden(model, **batch), last_hidden(model, **batch, position_ids=by_hand))
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 2


# 3. MBLM over XLM-R -------------------------------------------------------------------------------

def test_mblm_from_an_xlmr_classifier_is_the_classifier_trains_its_branch_and_reloads(setup, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from xkd.student.mblm import MBLMForSequenceClassification

    source = AutoModelForSequenceClassification.from_pretrained(str(setup["classifier"])).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(setup["classifier"]))
    model = MBLMForSequenceClassification.from_bert(source, ["en", "es"], branch_layers=1)
    assert model.config.family == "xlm-roberta"
    with torch.no_grad():  # any mixing of identical branches is that branch (docs/mblm.md)
        for mixer in [*model.mblm.inner_mixers, model.mblm.outer_mixer]:
            mixer.position_weights.normal_(0, 0.3)
    batch = tokenizer(ES[:3] + EN[1:2], padding=True, return_tensors="pt")  # padded rows included
    with torch.no_grad():
        expected = source(**batch, output_hidden_states=True)
        for lang in ("es", "en", "de", None):
            got = model(**batch, lang=lang, output_hidden_states=True)
            assert_close_at_scale(got.logits, expected.logits)
            assert len(got.hidden_states) == len(expected.hidden_states)
            for mine, theirs in zip(got.hidden_states, expected.hidden_states):
                assert_close_at_scale(mine, theirs)

    # One training step on a Spanish batch: the loss is finite, only the Spanish branch is updated.
    model.train()
    labels = torch.tensor([0, 1, 1, 0])
    loss = model(**batch, labels=labels, lang="es").loss
    assert torch.isfinite(loss)
    loss.backward()
    es, en = model.config.branch_id("es"), model.config.branch_id("en")
    grad = [sum(float(p.grad.abs().sum()) for p in branch.parameters() if p.grad is not None)
            for branch in model.mblm.branches]
    assert grad[es] > 0 and grad[en] == 0
    for shared in (model.mblm.embeddings, model.mblm.shared_layers, model.classifier):
        assert all(p.grad is not None for p in shared.parameters() if p.requires_grad and p.dim() > 0)
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.sub_(0.1 * p.grad)
    model.eval()

    model.save_pretrained(tmp_path / "mblm")
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "mblm").eval()
    assert type(loaded) is MBLMForSequenceClassification and loaded.config.family == "xlm-roberta"
    with torch.no_grad():
        before = model(**batch, lang="es").logits
        torch.testing.assert_close(loaded(**batch, lang="es").logits, before, rtol=0, atol=0)
        assert float((before - expected.logits).abs().max()) > 0  # the step changed the model


def test_multikd_builds_and_trains_an_xlmr_mblm_from_the_union_vocab(setup, caches, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from xkd import open_cache
    from xkd.student.mblm import MBLMForSequenceClassification
    from xkd.student.methods import prepare

    vocab = load_vocab(setup["vocab"])
    teacher = AutoModelForSequenceClassification.from_pretrained(str(setup["classifier"])).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(setup["classifier"]))
    prepared = prepare("multikd", {"student": "mblm", "branch_layers": "1"},
                       [open_cache(caches["en"]), open_cache(caches["es"])], vocab,
                       student=StudentConfig(**TINY), init_from=str(setup["classifier"]))
    model = prepared.model
    assert isinstance(model, MBLMForSequenceClassification) and model.config.family == "xlm-roberta"
    assert model.config.branch_languages == ["en", "es"] and model.config.pad_token_id == vocab.pad_id
    # Before training, on text of either language, the MBLM student is the teacher (union ids, union pad id).
    for lang, texts in (("en", EN), ("es", ES)):
        with torch.no_grad():
            got = model(**as_torch(vocab.encode(texts, lang)), lang=lang).logits
            expected = teacher(**tokenizer(texts, padding=True, return_tensors="pt")).logits
        assert_close_at_scale(got, expected)

    out = tmp_path / "mblm-student"
    train(["--method", "multikd", "--option", "student=mblm", "--option", "branch_layers=1", "--caches", caches["en"],
           "--caches", caches["es"], "--vocab", setup["vocab"], "--init-from", str(setup["classifier"])], out)
    loaded = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert type(loaded) is MBLMForSequenceClassification and loaded.config.family == "xlm-roberta"
    assert len(AutoTokenizer.from_pretrained(out)) == vocab.size
    with torch.no_grad():
        logits = loaded(**as_torch(vocab.encode(ES, "es"))).logits
    assert logits.shape == (len(ES), 2) and torch.isfinite(logits).all()
