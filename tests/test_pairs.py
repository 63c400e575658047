"""Sentence pairs (issue 12): `pairs:` corpora and `hf:` datasets with two text columns are
cached as pairs, each teacher reading both segments in its own template (BERT: [CLS] a [SEP]
b [SEP] with token types; RoBERTa: <s> a </s></s> b </s>), and what the cache holds equals the
teacher's own forward over `tokenizer(a, b)`: offline == online."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from xkd.errors import BadInput
from xkd.names import parse_corpus
from xkd.pipeline.corpus import Cleaning, plan_corpus
from xkd.storage import open_cache

from conftest import VOCABS, build_tiny_bert, cache_teacher

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EN = [
    ("The team won the match yesterday.", "The players celebrated their victory.", "same"),
    ("It rained all day in the city.", "The football final was exciting.", "different"),
    ("She cooked rice with fresh vegetables.", "Dinner was a spicy curry.", "same"),
    ("The orchestra played a quiet song.", "A storm is coming tonight with strong winds and heavy rain over the whole "
     "northern coast, and the airport will close early.", "different"),
    ("Tomatoes and onions are cheap this week.", "The market sells fruit.", "same"),
]
ES = [
    ("El equipo ganó el partido ayer.", "Los jugadores celebraron su victoria.", "same"),
    ("Llovió todo el día en la ciudad.", "La final de fútbol fue emocionante.", "different"),
    ("Ella cocinó arroz con verduras frescas.", "La cena fue un curry picante.", "same"),
    ("La orquesta tocó una canción tranquila.", "Se acerca una tormenta esta noche.", "different"),
    ("Los tomates y las cebollas están baratos.", "El mercado vende fruta.", "same"),
]
MAX_LENGTH = 24  # the long pair of line 4 is truncated (longest segment first)


def write_pairs(path, rows, labels=True):
    path.write_text("".join("\t".join(r if labels else r[:2]) + "\n" for r in rows), encoding="utf-8")
    return path


def build_tiny_roberta(out, seed: int = 3):
    """A random-weight RoBERTa sequence classifier with the real roberta-base byte-level BPE."""
    from transformers import RobertaConfig, RobertaForSequenceClassification, RobertaTokenizer

    source = VOCABS / "roberta-base"
    tokenizer = RobertaTokenizer(vocab=str(source / "vocab.json"), merges=str(source / "merges.txt"))
    tokenizer.save_pretrained(out)
    config = RobertaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=130, num_labels=2, pad_token_id=1,
                           bos_token_id=0, eos_token_id=2, type_vocab_size=1, initializer_range=0.3,
                           id2label={0: "different", 1: "same"}, label2id={"different": 0, "same": 1})
    torch.manual_seed(seed)
    RobertaForSequenceClassification(config).eval().save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def pair_teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair-teachers")
    # init_range 0.3: logits that depend on the input (BERT's 0.02 gives near-constant ones),
    # so that a wrong template or missing token types show in every comparison below.
    bert = build_tiny_bert(root / "bert-cls", VOCABS / "bert-base-multilingual-cased.vocab.txt", lowercase=False,
                           kind="classifier", num_labels=2, seed=5, init_range=0.3)
    config = json.loads((bert / "config.json").read_text())
    config.update(id2label={"0": "different", "1": "same"}, label2id={"different": 0, "same": 1})
    (bert / "config.json").write_text(json.dumps(config))
    return {"bert": bert, "roberta": build_tiny_roberta(root / "roberta-cls"),
            "mlm": build_tiny_bert(root / "bert-mlm", VOCABS / "bert-base-multilingual-cased.vocab.txt",
                                   lowercase=False, seed=6, init_range=0.2)}


def online(teacher_dir, a, b, kind="classifier", max_length=MAX_LENGTH):
    """The teacher's own forward over its tokenizer's encoding of the pairs, in fp32."""
    from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(teacher_dir))
    auto = AutoModelForSequenceClassification if kind == "classifier" else AutoModelForMaskedLM
    model = auto.from_pretrained(str(teacher_dir)).eval()
    enc = tokenizer(a, b, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**enc, output_hidden_states=True)
    return enc, out


def fp16_close(cached, exact):
    """fp16 storage rounds to 11 significant bits: |error| <= 2^-11 |x| (plus subnormals)."""
    cached, exact = np.asarray(cached, np.float64), np.asarray(exact, np.float64)
    np.testing.assert_array_less(np.abs(cached - exact), np.abs(exact) * 2.0**-11 + 1e-6)


def test_pair_specs_parse_and_plan(tmp_path):
    en = write_pairs(tmp_path / "en.tsv", EN)
    es = write_pairs(tmp_path / "es.tsv", ES)
    mono = parse_corpus(f"pairs:{en}@en")
    assert (mono.kind, mono.langs, mono.parallel) == ("pairs", ("en",), False)
    plan = plan_corpus(mono, Cleaning(), 2)
    examples = [ex for shard in plan.shards for ex in shard.examples()]
    assert [(ex.texts[0], ex.texts_b[0]) for ex in examples] == [(a, b) for a, b, _ in EN]
    assert plan.source.label_names == ("different", "same")
    assert [ex.label for ex in examples] == [1, 0, 1, 0, 1]
    assert plan.to_json()["pairs"] is True

    both = plan_corpus(parse_corpus(f"pairs:{en}@en,{es}@es"), Cleaning(), 10)
    ex = both.shards[0].examples()[2]
    assert (ex.texts, ex.texts_b, ex.label) == ((EN[2][0], ES[2][0]), (EN[2][1], ES[2][1]), 1)


def test_bad_pair_files_are_one_paragraph(tmp_path):
    en = write_pairs(tmp_path / "en.tsv", EN)
    bad = tmp_path / "bad.tsv"
    bad.write_text("only one field\n")
    with pytest.raises(BadInput, match=r"line 1: expected 2 or 3 tab-separated fields"):
        plan_corpus(parse_corpus(f"pairs:{bad}@en"), Cleaning(), 10)
    flipped = write_pairs(tmp_path / "flipped.tsv", [(a, b, "different" if y == "same" else "same") for a, b, y in ES])
    with pytest.raises(BadInput, match="a translated pair keeps its label"):
        plan_corpus(parse_corpus(f"pairs:{en}@en,{flipped}@es"), Cleaning(), 10)
    with pytest.raises(BadInput, match="pairs needs one file"):
        parse_corpus(f"pairs:{en}@en,{en}@es,{en}@de")
    with pytest.raises(BadInput, match="not an option of an hf: corpus"):
        parse_corpus("hf:some/dataset:en@en?columns=premise")


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_pair_classifier_cache_equals_the_teacher_forward(thread_client, pair_teachers, tmp_path, family):
    """Cached class logits, input ids and token types of a pair classifier are the teacher's
    own forward over tokenizer(a, b): BERT's template with token types, RoBERTa's without."""
    teacher = pair_teachers[family]
    corpus = f"pairs:{write_pairs(tmp_path / 'en.tsv', EN)}@en"
    cache = open_cache(cache_teacher(thread_client, tmp_path / "caches", teacher, corpus, max_length=MAX_LENGTH,
                                     text=True, shard_size=3))
    assert cache.has_pairs and cache.manifest["corpus"]["labels"] == ["different", "same"]
    from typer.testing import CliRunner

    from xkd.cli import app

    assert "(sentence pairs)" in CliRunner().invoke(app, ["inspect", str(cache.path)]).stdout
    assert CliRunner().invoke(app, ["verify", str(cache.path)]).exit_code == 0  # the pair columns' schema
    table = pq.read_table(sorted((cache.path / "shards").glob("*.parquet"))[0]).to_pylist()
    table += pq.read_table(sorted((cache.path / "shards").glob("*.parquet"))[1]).to_pylist()
    logits = np.concatenate([b.dense["class_logits"] for b in cache.iter_blocks()])
    enc, out = online(teacher, [a for a, _, _ in EN], [b for _, b, _ in EN])
    lengths = enc["attention_mask"].sum(1)
    for i, row in enumerate(table):
        assert row["input_ids"] == enc["input_ids"][i, : lengths[i]].tolist()
        segment_b = row["segment_b"]
        if family == "bert":
            types = enc["token_type_ids"][i, : lengths[i]].tolist()
            assert types == [int(p >= segment_b) for p in range(lengths[i])], "token types rebuilt from segment_b"
        else:  # <s> a </s></s> b </s>: the second segment starts after the doubled separator
            ids = row["input_ids"]
            assert ids[segment_b - 2 : segment_b] == [2, 2] and ids[0] == 0 and ids[-1] == 2
        assert row["class_label"] == (1 if EN[i][2] == "same" else 0)
    fp16_close(logits, out.logits.numpy())
    # The truncated pair (line 4) stores the text the teacher saw of each segment, no more.
    long_row = table[3]
    assert long_row["text"] == EN[3][0] and EN[3][1].startswith(long_row["text_b"])
    assert len(long_row["text_b"]) < len(EN[3][1])


def test_parallel_pairs_keep_both_segments_of_both_sides(thread_client, pair_teachers, tmp_path):
    """--sides src over a parallel pair corpus: the teacher reads the English pair; the row
    carries the Spanish pair (pair_text, pair_text_b) for students that read the translation."""
    corpus = f"pairs:{write_pairs(tmp_path / 'en.tsv', EN)}@en,{write_pairs(tmp_path / 'es.tsv', ES)}@es"
    cache = open_cache(cache_teacher(thread_client, tmp_path / "caches", pair_teachers["bert"], corpus,
                                     max_length=64, text=True, sides="src"))
    rows = [r for b in cache.iter_blocks(columns=("lang", "text", "text_b", "pair_text", "pair_text_b"))
            for r in zip(*(b.columns[c] for c in ("lang", "text", "text_b", "pair_text", "pair_text_b")))]
    assert [tuple(r) for r in rows] == [("en", a, b, c, d) for (a, b, _), (c, d, _) in zip(EN, ES)]


def test_mlm_teacher_on_pairs_matches_online_top1_and_hidden_states(thread_client, pair_teachers, tmp_path):
    """A masked LM over pairs: unmasked (--mask-prob 0) hidden states equal the forward with
    token types; with masking, the cached top-1 at each masked position is the online argmax."""
    teacher = pair_teachers["mlm"]
    corpus = f"pairs:{write_pairs(tmp_path / 'en.tsv', EN, labels=False)}@en"
    cache = open_cache(cache_teacher(thread_client, tmp_path / "plain", teacher, corpus, max_length=MAX_LENGTH,
                                     mask_prob=0.0, topk=0, hidden_layers=[2], hidden_positions="all"))
    hidden = np.concatenate([b.dense["hidden.2"] for b in cache.iter_blocks()])
    enc, out = online(teacher, [a for a, _, _ in EN], [b for _, b, _ in EN], kind="mlm")
    fp16_close(hidden, out.hidden_states[2][enc["attention_mask"].bool()].numpy())

    masked = open_cache(cache_teacher(thread_client, tmp_path / "masked", teacher, corpus, max_length=MAX_LENGTH,
                                      mask_prob=0.3, topk=4))
    from transformers import AutoModelForMaskedLM

    model = AutoModelForMaskedLM.from_pretrained(str(teacher)).eval()
    checked = 0
    for block in masked.iter_blocks(columns=("input_ids", "segment_b", "masked_positions", "topk_ids")):
        for r in range(block.num_rows):
            ids = torch.tensor(block.columns["input_ids"].row(r).astype(np.int64))[None]
            types = (torch.arange(ids.shape[1]) >= int(block.columns["segment_b"][r])).long()[None]
            with torch.no_grad():
                logits = model(input_ids=ids, token_type_ids=types).logits[0]
            positions = block.columns["masked_positions"].row(r).astype(np.int64)
            top1 = block.columns["topk_ids"].row(r).reshape(len(positions), 4)[:, 0]
            assert logits[positions].argmax(-1).tolist() == top1.tolist()
            checked += len(positions)
    assert checked > 5


def test_hf_dataset_with_two_text_columns_is_a_pair_corpus(thread_client, pair_teachers, tmp_path):
    """An hf: dataset (here a local JSON Lines file, as `datasets` reads it) whose spec names
    two text columns and a label column caches as pairs, exactly as the same pairs from a file."""
    data = tmp_path / "xnli-like.jsonl"
    data.write_text("".join(json.dumps({"premise": a, "hypothesis": b, "gold": y}) + "\n" for a, b, y in EN),
                    encoding="utf-8")  # string labels: class names, numbered in sorted order as in files
    spec = f"hf:{data}@en?text=premise,hypothesis&label=gold"
    parsed = parse_corpus(spec)
    assert parsed.options == {"columns": ("premise", "hypothesis"), "label": "gold"} and parsed.langs == ("en",)
    from_hf = open_cache(cache_teacher(thread_client, tmp_path / "hf", pair_teachers["bert"], spec,
                                       max_length=MAX_LENGTH))
    from_file = open_cache(cache_teacher(thread_client, tmp_path / "file", pair_teachers["bert"],
                                         f"pairs:{write_pairs(tmp_path / 'en.tsv', EN)}@en", max_length=MAX_LENGTH))
    cols = ("input_ids", "segment_b", "class_label")

    def rows(cache):
        blocks = list(cache.iter_blocks(columns=cols))
        return ([ids for b in blocks for ids in (b.columns["input_ids"].row(i).tolist() for i in range(b.num_rows))],
                np.concatenate([b.columns["segment_b"] for b in blocks]).tolist(),
                np.concatenate([b.columns["class_label"] for b in blocks]).tolist(),
                np.concatenate([b.dense["class_logits"] for b in blocks]))

    a, b = rows(from_hf), rows(from_file)
    assert a[:3] == b[:3]
    np.testing.assert_array_equal(a[3], b[3])
    with pytest.raises(BadInput, match="no column 'hypo'"):
        plan_corpus(parse_corpus(f"hf:{data}@en?text=premise,hypo"), Cleaning(), 10)


# Students on pairs: each method's loss from the cache equals the loss with the teacher run
# online on the same pairs (offline == online).



@pytest.fixture(scope="module")
def pair_setup(thread_client, pair_teachers, tmp_path_factory):
    from xkd.student.models import StudentConfig
    from xkd.vocab import build_vocab

    root = tmp_path_factory.mktemp("pair-students")
    en, es = write_pairs(root / "en.tsv", EN), write_pairs(root / "es.tsv", ES)
    teacher = pair_teachers["bert"]
    build_vocab([str(teacher)], root / "vocab")
    caches = root / "caches"
    return {
        "teacher": teacher, "vocab": str(root / "vocab"), "student": StudentConfig(hidden=32, layers=2, heads=2,
                                                                                    dropout=0.0),
        "parallel": cache_teacher(thread_client, caches, teacher, f"pairs:{en}@en,{es}@es", sides="src",
                                  max_length=64, text=True),
        "en": cache_teacher(thread_client, caches, teacher, f"pairs:{en}@en", max_length=64, text=True),
        "es": cache_teacher(thread_client, caches, teacher, f"pairs:{es}@es", max_length=64, text=True),
    }


def first_batch(method, options, setup, names, init_from=True, batch_size=5):
    from xkd import load_vocab
    from xkd.student.data import StreamConfig, StreamingDataset
    from xkd.student.methods import prepare
    from xkd.student.models import Student

    vocab = load_vocab(setup["vocab"])
    caches = [open_cache(setup[n]) for n in names]
    torch.manual_seed(0)
    prepared = prepare(method, options, caches, vocab, student=setup["student"],
                       init_from=str(setup["teacher"]) if init_from else None)
    plan = prepared.plan
    ds = StreamingDataset(caches, StreamConfig(batch_size=batch_size, columns=plan.columns, dense=plan.dense,
                                               mix=plan.mix), remap_tables=[vocab.map_for(c.manifest) for c in caches],
                          collate=prepared.method.collate)
    batch = next(iter(ds))
    batch.pop("loader_state")
    return prepared.method, prepared.model.eval(), Student(prepared.model.eval()), batch, vocab


def one_by_one(model, vocab, teacher_dir, pairs, lang):
    """The student's logits on each pair alone (no padding): ids routed through the union
    vocab, token types from the routed teacher's own tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(teacher_dir))
    out = []
    with torch.no_grad():
        for a, b in pairs:
            ids = torch.from_numpy(vocab.encode([a], lang, [b])["input_ids"])
            types = torch.tensor([tokenizer(a, b)["token_type_ids"]])
            assert types.shape == ids.shape and int(types.max()) == 1
            out.append(model(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=types).logits[0])
    return torch.stack(out).float()


def teacher_online(teacher_dir, pairs):
    """The teacher's logits on the pairs, as the caches of `pair_setup` (--max-length 64) saw them."""
    enc, out = online(teacher_dir, [a for a, _ in pairs], [b for _, b in pairs], max_length=64)
    return out.logits.float()


def by_id(rows, ids):
    return [rows[int(i)] for i in ids]


def test_xd_on_pairs_offline_equals_the_teacher_online(pair_setup):
    """xd over a parallel pair corpus: the student reads the Spanish pair (and the English
    one), the target is the teacher's logits on the English pair."""
    m, model, student, batch, vocab = first_batch("xd", {}, pair_setup, ["parallel"])
    assert "token_type_ids" in batch and batch["token_type_ids"].shape == batch["input_ids"].shape
    with torch.no_grad():
        offline = {k: float(v) for k, v in m.losses(batch, student, 0).items()}
    english = by_id([(a, b) for a, b, _ in EN], batch["example_id"])
    spanish = by_id([(a, b) for a, b, _ in ES], batch["example_id"])
    target = teacher_online(pair_setup["teacher"], english).half().float()  # the cache stores fp16
    on_es = one_by_one(model, vocab, pair_setup["teacher"], spanish, "es")
    on_en = one_by_one(model, vocab, pair_setup["teacher"], english, "en")
    assert offline["xd"] == pytest.approx(float((on_es - target).pow(2).sum(-1).mean()), rel=1e-4)
    assert offline["source"] == pytest.approx(float((on_en - target).pow(2).sum(-1).mean()), rel=1e-3, abs=1e-7)
    # Initialised from the teacher, the student is the teacher on English pairs: token types
    # included (without them this gap is of the order of the logits).
    assert offline["source"] < 1e-6 < offline["xd"]


def test_multikd_on_pairs_offline_equals_each_languages_teacher_online(pair_setup):
    m, model, student, batch, vocab = first_batch("multikd", {}, pair_setup, ["en", "es"], batch_size=4)
    lang = batch["lang"][0]
    assert set(batch["lang"]) == {lang}  # one language a batch (mix=batch)
    with torch.no_grad():
        offline = float(m.losses(batch, student, 0)["kd"])
    rows = [(a, b) for a, b, _ in (EN if lang == "en" else ES)]
    pairs = by_id(rows, batch["example_id"])
    teacher = teacher_online(pair_setup["teacher"], pairs).half().float()
    on_student = one_by_one(model, vocab, pair_setup["teacher"], pairs, lang)
    tau = 8.0
    expected = -(torch.softmax(teacher / tau, -1) * torch.log_softmax(on_student / tau, -1)).sum(-1).mean()
    assert offline == pytest.approx(float(expected), rel=1e-4)


def test_tinybert_stage2_on_pairs_reads_the_cached_pair_with_its_token_types(pair_setup):
    """Stage 2 reads the teacher's own pair ids from the cache (remapped) and rebuilds the
    token types from segment_b: the prediction loss equals the student's soft cross-entropy
    against the teacher, both run online on tokenizer(a, b)."""
    from transformers import AutoTokenizer

    m, model, student, batch, vocab = first_batch("tinybert", {"stage": "2"}, pair_setup, ["en"])
    tokenizer = AutoTokenizer.from_pretrained(str(pair_setup["teacher"]))
    pairs = by_id([(a, b) for a, b, _ in EN], batch["example_id"])
    for i, (a, b) in enumerate(pairs):
        enc = tokenizer(a, b, truncation=True, max_length=64)
        n = len(enc["input_ids"])
        assert batch["token_type_ids"][i, :n].tolist() == enc["token_type_ids"]
        assert batch["input_ids"][i, :n].tolist() == vocab.encode([a], "en", [b])["input_ids"][0].tolist()
    with torch.no_grad():
        offline = float(m.losses(batch, student, 0)["pred"])
    teacher = teacher_online(pair_setup["teacher"], pairs).half().float()
    on_student = one_by_one(model, vocab, pair_setup["teacher"], pairs, "en")
    tau = m.config.temperature
    expected = -(torch.softmax(teacher / tau, -1) * torch.log_softmax(on_student / tau, -1)).sum(-1).mean()
    assert offline == pytest.approx(float(expected), rel=1e-4)


def test_methods_that_do_not_read_pairs_refuse_pair_caches(pair_setup):
    from xkd import load_vocab
    from xkd.student.methods import prepare

    with pytest.raises(BadInput, match="does not read sentence pairs.*Methods that train on pairs: multikd, tinybert, xd"):
        prepare("mmkd", {}, [open_cache(pair_setup["parallel"])], load_vocab(pair_setup["vocab"]),
                student=pair_setup["student"])
