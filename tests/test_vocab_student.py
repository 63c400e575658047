"""The union vocab from the student's side: tokenizing raw text as in training, a
union-vocab copy of a cache, and a student initialised from a teacher checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from xkd.cli import app
from xkd.errors import BadInput
from xkd.storage import CacheWriter, DenseSpec, cache_key, open_cache, outputs_json, verify_cache, write_shard_files
from xkd.storage.synthetic import synthetic_rows
from xkd.vocab import build_vocab, init_union_embeddings, load_vocab, needs_remap, remap_cache, student_from_teacher

from conftest import PARALLEL, VOCABS

runner = CliRunner()
TATOEBA = PARALLEL / "tatoeba"


def sentences(name: str, n: int = 300) -> list[str]:
    return (TATOEBA / name).read_text(encoding="utf-8").split("\n")[:n]


@pytest.fixture(scope="module")
def vocab(tiny_teachers, tmp_path_factory):
    """en -> the lower-casing bert-base-uncased teacher, hi -> the mBERT teacher."""
    out = tmp_path_factory.mktemp("vocab") / "en-hi"
    build_vocab([str(tiny_teachers["en"]), str(tiny_teachers["multi"])], out,
                {"en": str(tiny_teachers["en"]), "hi": str(tiny_teachers["multi"])})
    return load_vocab(out)


# Tokenizing like in training ------------------------------------------------------------

@pytest.mark.parametrize("lang,file,teacher", [("en", "tatoeba.hin-eng.eng", "en"), ("hi", "tatoeba.hin-eng.hin", "multi")])
def test_inference_tokenization_equals_training_inputs_per_language(vocab, tiny_teachers, lang, file, teacher):
    """Training inputs are the teacher's tokenization remapped; vocab.tokenize(text, lang)
    must give exactly those ids, for every sentence of the language."""
    from transformers import AutoTokenizer

    texts = sentences(file)
    teacher_tok = AutoTokenizer.from_pretrained(str(tiny_teachers[teacher]))
    table = vocab.map_for(str(tiny_teachers[teacher]))
    training = [table[np.array(ids)] for ids in teacher_tok(texts, truncation=True, max_length=64)["input_ids"]]
    inference = vocab.tokenize(texts, lang, max_length=64)
    assert vocab.teacher_for(lang) == vocab.teacher(str(tiny_teachers[teacher]))["slug"]
    assert len(inference) == len(training) == len(texts)
    for a, b in zip(inference, training):
        assert a.dtype == np.int32 and np.array_equal(a, b)
    batch = vocab.encode(texts[:5], lang)
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert np.array_equal(batch["input_ids"][0, : len(training[0])], training[0])
    assert (batch["input_ids"][batch["attention_mask"] == 0] == vocab.pad_id).all()


def test_routing_matters_and_where_the_plain_union_tokenizer_differs(vocab, tiny_teachers):
    """The uncased teacher strips Hindi vowel signs, so Hindi routed to it would not be what
    the student saw; the plain union WordPiece (cased, since mBERT is) agrees with the mBERT
    route on Hindi but not with the lower-casing English route (docs/vocab.md)."""
    hindi, english = sentences("tatoeba.hin-eng.hin"), sentences("tatoeba.hin-eng.eng")
    routed_hi = vocab.tokenize(hindi, "hi")
    via_uncased = vocab.tokenize(hindi, teacher=str(tiny_teachers["en"]))
    assert sum(np.array_equal(a, b) for a, b in zip(routed_hi, via_uncased)) == 0
    assert "\u0947" not in "".join(vocab.tokens[i] for i in via_uncased[0])  # the vowel sign े is gone
    assert "\u0947" in "".join(vocab.tokens[i] for i in routed_hi[0])
    assert vocab.teacher_for("de") == vocab.teacher_for("hi")  # unrouted: the first teacher that keeps case/accents
    plain = vocab.student_tokenizer()
    agree_hi = np.mean([np.array_equal(a, b) for a, b in zip(routed_hi, plain(hindi)["input_ids"])])
    agree_en = np.mean([np.array_equal(a, b) for a, b in zip(vocab.tokenize(english, "en"), plain(english)["input_ids"])])
    assert agree_hi > 0.95
    assert agree_en < 0.05  # every sentence starts with a capital the English teacher lower-cased


# Materialising a union-vocab copy of a cache ----------------------------------------------------

def write_teacher_cache(root, teacher_dir, teacher_vocab_size: int, rows_per_shard=(70, 45), vocab_for_ids=None):
    specs = {"cls": DenseSpec("cls", "row", 8), "hidden.1": DenseSpec("hidden.1", "token", 4)}
    teacher = {"name": str(teacher_dir), "model_id": str(teacher_dir), "path": str(teacher_dir),
               "vocab_size": teacher_vocab_size, "model_vocab_size": teacher_vocab_size,
               "special_ids": {"pad": 0, "unk": 100, "cls": 101, "sep": 102, "mask": 103}}
    corpus = {"spec": "synthetic", "fingerprint": "f0"}
    meta = {"teacher": teacher, "corpus": corpus, "view": {"k": 8}, "outputs": outputs_json(8, specs)}
    key = cache_key(teacher, corpus, meta["view"])
    with CacheWriter(root, key, meta, planned_shards=len(rows_per_shard)) as writer:
        first = 0
        for shard_id, n in enumerate(rows_per_shard):
            rows, dense = synthetic_rows(shard_id, n, vocab=vocab_for_ids or teacher_vocab_size, k=8,
                                         first_example_id=first, dense_specs=specs)
            writer.commit(write_shard_files(root, shard_id, rows, dense, specs, has_topk=True, row_group_size=32))
            first += n
        writer.finish()
    return root


def test_remap_command_writes_a_union_copy_that_verifies(vocab, tiny_teachers, tmp_path):
    source = write_teacher_cache(tmp_path / "teacher-cache", tiny_teachers["multi"], 119547)
    out = tmp_path / "union-cache"
    result = runner.invoke(app, ["remap", str(source), "--vocab", str(vocab.path), "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["rows"] == 115 and summary["teacher"] == "tiny-mbert" and summary["vocab_hash"] == vocab.hash
    assert verify_cache(out)["ok"]
    assert runner.invoke(app, ["verify", str(out)]).exit_code == 0

    src, copy = open_cache(source), open_cache(out)
    assert copy.manifest["vocab"]["hash"] == vocab.hash and copy.manifest["vocab"]["size"] == vocab.size
    assert copy.manifest["teacher"] == src.manifest["teacher"]
    assert not needs_remap(copy.manifest, vocab) and needs_remap(src.manifest, vocab)
    assert [src.row_groups(s) for s in src.shard_ids] == [copy.row_groups(s) for s in copy.shard_ids]
    table = vocab.map_for("tiny-mbert")
    for a, b in zip(src.iter_examples(), copy.iter_examples()):
        for name in ("input_ids", "labels", "topk_ids"):
            assert np.array_equal(b[name], table[a[name]]), name
        for name in ("example_id", "lang", "masked_positions", "word_start", "topk_logits", "lognorm", "cls", "hidden.1"):
            assert np.array_equal(np.asarray(a[name]), np.asarray(b[name])), name
    # Re-running resumes: nothing left to write, the same bytes.
    before = (out / "manifest.json").read_bytes()
    again = remap_cache(source, vocab, out)
    assert again["rows_written_now"] == 0 and (out / "manifest.json").read_bytes() == before
    with pytest.raises(BadInput, match="already holds union ids"):
        remap_cache(out, vocab, tmp_path / "twice")


def test_remap_command_errors(vocab, tiny_teachers, tmp_path):
    # Ids beyond the teacher's vocabulary: a failure of the work naming the id, no traceback.
    bad = write_teacher_cache(tmp_path / "bad", tiny_teachers["en"], 30522, rows_per_shard=(40,), vocab_for_ids=200_000)
    result = runner.invoke(app, ["remap", str(bad), "--vocab", str(vocab.path), "--out", str(tmp_path / "o1")])
    assert result.exit_code == 1 and "out of range for a table of 30522 entries" in result.output
    assert "Traceback" not in result.output
    # A cache of a teacher the vocab does not have.
    other = write_teacher_cache(tmp_path / "other", VOCABS / "bert-base-cased.vocab.txt", 28996, rows_per_shard=(10,))
    result = runner.invoke(app, ["remap", str(other), "--vocab", str(vocab.path), "--out", str(tmp_path / "o2")])
    assert result.exit_code == 2 and "is not among the teachers" in result.output
    result = runner.invoke(app, ["remap", str(tmp_path / "nothing"), "--vocab", str(vocab.path), "--out", str(tmp_path / "o3")])
    assert result.exit_code == 2 and "no such directory" in result.output


# A student initialised from a teacher --------------------------------------------------------------

def test_student_from_teacher_copies_known_rows_and_initialises_the_rest_by_the_rule(vocab, tiny_teachers, tmp_path):
    import torch
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    teacher_dir = tiny_teachers["en"]
    teacher = AutoModelForMaskedLM.from_pretrained(str(teacher_dir))
    teacher_tok = AutoTokenizer.from_pretrained(str(teacher_dir))
    old = teacher.get_input_embeddings().weight.detach()
    old_bias = teacher.get_output_embeddings().bias.detach()
    model, tokenizer = student_from_teacher(str(teacher_dir), vocab, seed=3)
    new = model.get_input_embeddings().weight.detach()
    assert new.shape == (vocab.size, old.shape[1]) and model.config.vocab_size == vocab.size
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # still tied

    table = torch.from_numpy(vocab.map_for(str(teacher_dir)).astype(np.int64))
    assert torch.equal(new[table], old)  # 1. every row the teacher knows, exactly
    assert torch.equal(model.get_output_embeddings().bias.detach()[table], old_bias)

    known = set(table.tolist())
    unknown = [u for u in range(vocab.size) if u not in known]
    # 2. a token the teacher can spell: the mean of the pieces the teacher's tokenizer makes.
    spelled = 0
    fallback_rows = []
    for u in unknown:
        if spelled >= 200 and len(fallback_rows) >= 50:
            break
        token = vocab.tokens[u]
        if token.startswith("##") or not token.isalpha():
            continue
        pieces = teacher_tok.tokenize(token)
        if pieces == ["[UNK]"]:
            fallback_rows.append(u)
        elif len(pieces) > 1 and "[UNK]" not in pieces and spelled < 200:
            ids = teacher_tok.convert_tokens_to_ids(pieces)
            assert torch.allclose(new[u], old[ids].mean(0), atol=1e-6), token
            spelled += 1
    assert spelled == 200
    u = vocab.token_to_id["Hindi"]  # a cased token the uncased teacher knows lower-cased
    assert torch.equal(new[u], old[teacher_tok.convert_tokens_to_ids("hindi")])
    u = vocab.token_to_id["##\u00e9"]  # a continuation stays a continuation: ##é -> ##e
    assert torch.equal(new[u], old[teacher_tok.convert_tokens_to_ids("##e")])
    # 3. a token it cannot spell at all: the mean row plus seeded noise.
    assert len(fallback_rows) >= 50
    mean = old.mean(0)
    noise = torch.stack([new[u] - mean for u in fallback_rows])
    assert 0.015 < noise.std().item() < 0.025  # initializer_range 0.02
    assert abs(noise.mean().item()) < 0.005
    assert not torch.equal(new[fallback_rows[0]], new[fallback_rows[1]])
    hangul = fallback_rows[:2]

    again, _ = student_from_teacher(str(teacher_dir), vocab, seed=3)
    other_seed, _ = student_from_teacher(str(teacher_dir), vocab, seed=4)
    assert torch.equal(again.get_input_embeddings().weight, new)
    assert not torch.equal(other_seed.get_input_embeddings().weight[hangul[0]], new[hangul[0]])
    assert torch.equal(other_seed.get_input_embeddings().weight[table], old)

    # The student saves and loads anywhere transformers does, with its tokenizer.
    model.save_pretrained(tmp_path / "student")
    tokenizer.save_pretrained(tmp_path / "student")
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path / "student").eval()
    assert len(AutoTokenizer.from_pretrained(tmp_path / "student")) == vocab.size
    batch = vocab.encode(sentences("tatoeba.hin-eng.eng", 4), "en")
    inputs = {k: torch.from_numpy(v) for k, v in batch.items()}
    with torch.no_grad():
        assert torch.allclose(loaded(**inputs).logits, model(**inputs).logits, atol=1e-5)
        # On English the student computes what the teacher computes, in union ids.
        teacher_inputs = teacher_tok(sentences("tatoeba.hin-eng.eng", 4), padding=True, return_tensors="np")
        teacher_logits = teacher(**{k: torch.from_numpy(v) for k, v in teacher_inputs.items() if k != "token_type_ids"}).logits
        student_logits = model(**inputs).logits
        mask = inputs["attention_mask"].bool()
        assert torch.allclose(student_logits[..., table][mask], teacher_logits[mask], atol=1e-4)


def test_the_real_minilm_starts_a_union_student_with_a_fresh_head(minilm_dir, tmp_path):
    """MiniLM (a BertModel, no MLM head) ∪ mBERT, as the mmkd example uses it."""
    import torch
    from transformers import AutoModel

    build_vocab(["minilm", str(VOCABS / "bert-base-multilingual-cased.vocab.txt")], tmp_path / "v",
                {"en": "minilm", "hi": "bert-base-multilingual-cased"})
    vocab = load_vocab(tmp_path / "v")
    entry = vocab.teacher("minilm")
    assert entry["model_id"] == "sentence-transformers/all-MiniLM-L6-v2" and entry["path"] == str(minilm_dir)
    model, _ = student_from_teacher(str(minilm_dir), vocab)  # found by its path
    minilm = AutoModel.from_pretrained(str(minilm_dir))
    table = torch.from_numpy(vocab.map_for("sentence-transformers/all-MiniLM-L6-v2").astype(np.int64))
    assert torch.equal(model.get_input_embeddings().weight.detach()[table], minilm.get_input_embeddings().weight.detach())
    assert model.config.vocab_size == vocab.size
    layer = model.bert.encoder.layer[0].attention.self.query.weight
    assert torch.equal(layer, minilm.encoder.layer[0].attention.self.query.weight)
    batch = vocab.encode(sentences("tatoeba.hin-eng.hin", 3), "hi")
    with torch.no_grad():
        logits = model(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits
    assert logits.shape == (*batch["input_ids"].shape, vocab.size) and torch.isfinite(logits).all()
    matrix = init_union_embeddings(minilm.get_input_embeddings().weight, vocab, str(minilm_dir))
    assert torch.equal(matrix[table], minilm.get_input_embeddings().weight.detach())
    with pytest.raises(BadInput, match="none of the vocab's teachers"):
        student_from_teacher(str(minilm_dir), load_vocab_without(tmp_path, minilm_dir))


def load_vocab_without(tmp_path, minilm_dir):
    build_vocab([str(VOCABS / "beto-base-uncased.vocab.txt")], tmp_path / "beto")
    return load_vocab(tmp_path / "beto")
