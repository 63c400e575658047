"""mmkd (Multi-level Distillation of Semantic Knowledge for Pre-training Multilingual Language
Model, Li et al., 2022) and mlm's text source: offline == online for each objective, ablation
switches, deterministic TLM masking on both sides, word (not token) alignment across
vocabularies, training through the CLI, and clear errors.

The teacher is the real pretrained MiniLM (an English sentence encoder with the
bert-base-uncased tokenizer: its [CLS] vectors really differ between sentences, which a
random tiny teacher's do not); the student vocab is its union with mBERT (Hindi routed to
mBERT); the cache is made by the real pipeline with the documented invocation
(docs/methods.md, "mmkd"). Students are tiny and random."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from xkd import load_vocab, open_cache
from xkd.cli import app
from xkd.errors import BadInput
from xkd.student.data import StreamConfig, StreamingDataset
from xkd.student.methods import prepare
from xkd.student.methods.mmkd import frozen_projector
from xkd.student.models import Student, StudentConfig, build_student
from xkd.vocab import build_vocab

from conftest import TATOEBA, VOCABS

MBERT_VOCAB = str(VOCABS / "bert-base-multilingual-cased.vocab.txt")
LAST_LAYER = 6  # MiniLM's
TEACHER_WIDTH, STUDENT_WIDTH = 384, 48  # unequal: XWCL needs its projection
# The documented cache-teachers invocation (docs/methods.md, "mmkd"); tests add --scheduler
# to run it on the module's cluster instead of starting one per call.
MMKD_CACHE = ("--sides", "src", "--mask-prob", 0, "--hidden-layers", LAST_LAYER, "--hidden-positions", "word",
              "--sentence", "cls")


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def cache(client, out, teacher, *flags) -> str:
    r = invoke("cache-teachers", "--teacher", teacher, "--corpus", TATOEBA, "--out", out, *flags,
               "--scheduler", client.scheduler.address, "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout.strip().splitlines()[-1])["caches"][0]["path"]


@pytest.fixture(scope="module")
def setup(client, minilm_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("mmkd")
    teacher = minilm_dir
    build_vocab([str(teacher), MBERT_VOCAB], root / "vocab", {"en": str(teacher), "hi": MBERT_VOCAB})
    # English through mBERT's cased WordPiece: the student's English tokens differ from the teacher's.
    build_vocab([str(teacher), MBERT_VOCAB], root / "vocab-cased", {"en": MBERT_VOCAB, "hi": MBERT_VOCAB})
    return {
        "root": root, "teacher": teacher, "vocab": str(root / "vocab"), "vocab_cased": str(root / "vocab-cased"),
        "cache": cache(client, root / "caches", teacher, *MMKD_CACHE, "--max-pairs", 48, "--shard-size", 24),
    }


def method(setup, vocab_key="vocab", cache_key="cache", **options):
    """The method as train-student prepares it (heads built on the shared student)."""
    return prepare("mmkd", {k: str(v) for k, v in options.items()}, [open_cache(setup[cache_key])],
                   vocab_at(setup[vocab_key]), model=student_for(setup[vocab_key])).method


@functools.lru_cache(maxsize=None)
def vocab_at(path):
    return load_vocab(path)  # one instance per path: its tokenizers load once


@functools.lru_cache(maxsize=None)
def student_for(path):
    vocab = vocab_at(path)
    torch.manual_seed(0)
    return build_student(StudentConfig(hidden=STUDENT_WIDTH, layers=2, heads=2, dropout=0.0), vocab.size, vocab.pad_id).eval()


def first_batch(cache_path, vocab, m, batch_size=8):
    caches = [open_cache(cache_path)]
    ds = StreamingDataset(caches, StreamConfig(batch_size=batch_size, columns=m.plan.columns, dense=m.plan.dense),
                          remap_tables=[vocab.map_for(caches[0].manifest)], collate=m.collate)
    batch = next(iter(ds))
    batch.pop("loader_state")
    return batch


def prepared(setup, vocab_key="vocab", batch_size=8, **options):
    """(vocab, method with its heads, student, first batch); heads start alike in every call."""
    vocab = vocab_at(setup[vocab_key])
    torch.manual_seed(1)
    m = method(setup, vocab_key, **options)
    return vocab, m, Student(student_for(setup[vocab_key])), first_batch(setup["cache"], vocab, m, batch_size)


def loss_values(m, batch, student) -> dict[str, float]:
    with torch.no_grad():
        return {k: float(v) for k, v in m.losses(batch, student, 0).items()}


def texts_of(setup, batch):
    """(English, Hindi) texts of the batch rows, read back from the cache by example id."""
    c = open_cache(setup["cache"])
    rows = [c.examples_by_id(int(e))[0] for e in batch["example_id"]]
    return [r["text"] for r in rows], [r["pair_text"] for r in rows]


def online_teacher(setup, english):
    """The teacher run now on the English sentences: per sentence its word-first vectors of
    the last layer (words as its tokenizer's word_ids give them) and its [CLS]."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(setup["teacher"])
    model = AutoModel.from_pretrained(setup["teacher"]).eval()
    words, cls = [], []
    with torch.inference_mode():
        for text in english:
            enc = tokenizer(text, truncation=True, max_length=128)
            ids = enc["input_ids"]
            word_ids = enc.word_ids()
            starts = [i for i, w in enumerate(word_ids) if w is not None and (i == 0 or word_ids[i - 1] != w)]
            out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
            words.append(out.hidden_states[LAST_LAYER][0, starts].float())
            cls.append(out.last_hidden_state[0, 0].float())
    return words, torch.stack(cls)


def student_hidden(student, batch):
    with torch.no_grad():
        out = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], masked_flat=batch["tlm_flat"])
    return out, out.last_hidden_state.reshape(-1, out.last_hidden_state.shape[-1])


def direct_xwcl(m, batch, flat, teacher_words, tau=0.1, cosine=False):
    """Eq. 1 written out: −log softmax over the sentence's words, one query at a time."""
    terms = []
    with torch.no_grad():
        vectors = m.modules["xwcl_projection"](flat[batch["xwcl_flat"]])
    for q in range(len(vectors)):
        row, word = int(batch["xwcl_row"][q]), int(batch["xwcl_word"][q])
        sim = (lambda a, b: a @ b / (a.norm() * b.norm())) if cosine else (lambda a, b: a @ b)
        scores = torch.stack([sim(vectors[q], h) / tau for h in teacher_words[row]])
        terms.append(-(scores[word] - torch.logsumexp(scores, 0)))
    return float(torch.stack(terms).mean())


def direct_heads(m, name, flat, batch, teacher_cls):
    with torch.no_grad():
        cls = flat[batch["translation_flat"]]
        prediction = m.modules[f"{name}_predictor"](m.modules[f"{name}_projector"](cls))
        projection = m.modules[f"{name}_teacher_projector"](teacher_cls)
    return prediction, projection


def test_the_documented_cache_holds_what_mmkd_reads(setup):
    c = open_cache(setup["cache"])
    assert c.manifest["view"]["sides"] == ["src"] and c.manifest["corpus"]["langs"] == ["en", "hi"]
    assert {n: (s.align, s.dim) for n, s in c.dense_specs.items()} == {"hidden.6": ("word", 384), "cls": ("row", 384)}
    row = next(c.iter_examples())
    assert row["lang"] == "en" and row["text"] and row["pair_text"] and row["masked_positions"].size == 0
    assert row["hidden.6"].shape == (int(row["word_start"].sum()), 384)
    m = method(setup)
    assert m.plan.dense == ("hidden.6", "cls")
    assert set(m.modules) == {"xwcl_projection", "senta_projector", "senta_predictor", "senta_teacher_projector",
                              "struca_projector", "struca_predictor", "struca_teacher_projector"}
    assert not any(p.requires_grad for p in m.modules["senta_teacher_projector"].parameters())


def test_xwcl_senta_struca_offline_equal_the_teacher_run_online(setup):
    vocab, m, student, batch = prepared(setup)
    offline = loss_values(m, batch, student)
    english, _ = texts_of(setup, batch)
    words, cls = online_teacher(setup, english)
    _, flat = student_hidden(student, batch)
    # Online word vectors, rounded as the cache stores them, give the same loss to float
    # noise; unrounded, within fp16 storage error.
    assert all(len(w) == int(batch["teacher_word_mask"][r].sum()) for r, w in enumerate(words))
    assert offline["xwcl"] == pytest.approx(direct_xwcl(m, batch, flat, [w.half().float() for w in words]), rel=1e-4)
    assert offline["xwcl"] == pytest.approx(direct_xwcl(m, batch, flat, words), rel=5e-3)
    _, m_cos, _, batch_cos = prepared(setup, xwcl_similarity="cosine", xwcl_tau=0.05)
    cosine = loss_values(m_cos, batch_cos, student)["xwcl"]
    assert cosine == pytest.approx(direct_xwcl(m_cos, batch_cos, flat, words, tau=0.05, cosine=True), rel=5e-3)
    prediction, projection = direct_heads(m, "senta", flat, batch, cls)
    p, z = prediction / prediction.norm(dim=1, keepdim=True), projection / projection.norm(dim=1, keepdim=True)
    assert offline["senta"] == pytest.approx(float(((p - z) ** 2).sum(1).mean()), rel=2e-3)
    prediction, projection = direct_heads(m, "struca", flat, batch, cls)
    p, z = prediction / prediction.norm(dim=1, keepdim=True), projection / projection.norm(dim=1, keepdim=True)
    target = torch.softmax(z @ z.T / 0.1, 1)
    log_q = torch.log_softmax(p @ p.T / 0.1, 1)
    direct = float((target * (target.log() - log_q)).sum() / len(p))
    assert offline["struca"] == pytest.approx(direct, rel=5e-3) and direct > 1e-3  # the batch has structure
    assert offline["loss"] == pytest.approx(offline["tlm"] + offline["xwcl"] + offline["senta"] + offline["struca"], rel=1e-6)


def test_tlm_is_gold_cross_entropy_on_both_sides_of_the_pair(setup):
    vocab, m, student, batch = prepared(setup, xwcl="false", senta="false", struca="false")
    english, hindi = texts_of(setup, batch)
    n = len(english)
    ids, width = batch["input_ids"], batch["input_ids"].shape[1]
    assert ids.shape[0] == n  # the TLM block only
    originals = torch.zeros_like(ids)
    both_sides = []
    for r in range(n):
        src, tgt = vocab.tokenize(english[r], "en"), vocab.tokenize(hindi[r], "hi")
        pair = np.concatenate([src, tgt[1:]])  # [CLS] en [SEP] hi [SEP]
        assert batch["attention_mask"][r].sum() == len(pair)
        originals[r, : len(pair)] = torch.from_numpy(pair.astype(np.int64))
        masked = batch["tlm_flat"][(batch["tlm_flat"] // width) == r] % width
        both_sides.append((masked < len(src)).any() and (masked >= len(src)).any())
        special = np.isin(pair, [vocab.cls_id, vocab.sep_id])
        assert not special[masked.numpy()].any()
        keep = torch.ones(len(pair), dtype=torch.bool)
        keep[masked] = False
        assert torch.equal(ids[r, : len(pair)][keep], originals[r, : len(pair)][keep])
        candidates = int((~special).sum())
        assert len(masked) == max(1, round(0.15 * candidates))
    assert sum(both_sides) >= n // 2  # 15% of ~20 tokens: most rows have a mask on each side
    labels = originals.reshape(-1)[batch["tlm_flat"]]
    assert torch.equal(batch["tlm_labels"], labels)
    assert (ids.reshape(-1)[batch["tlm_flat"]] == vocab.mask_id).float().mean() > 0.5
    out, _ = student_hidden(student, batch)
    direct = torch.nn.functional.cross_entropy(out.logits, labels)
    assert loss_values(m, batch, student)["tlm"] == pytest.approx(float(direct), rel=1e-6)


def test_masks_are_a_function_of_example_epoch_and_seed(setup):
    vocab = vocab_at(setup["vocab"])
    c = open_cache(setup["cache"])
    rows_batches = []
    for seed in (0, 0, 1):
        m = method(setup, mask_seed=seed)
        rows_batches.append(first_batch(setup["cache"], vocab, m, batch_size=16))
    a, b, other = rows_batches
    for key in ("input_ids", "tlm_flat", "tlm_labels", "xwcl_flat", "xwcl_word"):
        assert torch.equal(a[key], b[key]), key
    assert not torch.equal(a["input_ids"], other["input_ids"])
    # The same example in another batch composition is masked the same way.
    vocab, m, _, small = prepared(setup, batch_size=3)
    first = int(small["example_id"][0])
    r = int((a["example_id"] == first).nonzero()[0])
    n_a, n_s = len(a["example_id"]), len(small["example_id"])
    tlm_a = a["input_ids"][r][a["attention_mask"][r].bool()]
    tlm_s = small["input_ids"][0][small["attention_mask"][0].bool()]
    assert torch.equal(tlm_a, tlm_s)
    xwcl_a = a["input_ids"][n_a + r][a["attention_mask"][n_a + r].bool()]
    xwcl_s = small["input_ids"][n_s][small["attention_mask"][n_s].bool()]
    assert torch.equal(xwcl_a, xwcl_s)
    # mlm's text source builds the same TLM inputs.
    mlm = prepare("mlm", {"source": "text"}, [c], vocab, model=student_for(setup["vocab"])).method
    text_batch = first_batch(setup["cache"], vocab, mlm, batch_size=16)
    assert torch.equal(text_batch["input_ids"], a["input_ids"][:n_a, : text_batch["input_ids"].shape[1]])
    assert torch.equal(text_batch["labels"], a["tlm_labels"])


def test_switching_an_objective_off_removes_exactly_its_term(setup):
    vocab, m, student, batch = prepared(setup)
    full = loss_values(m, batch, student)
    for off in ("tlm", "xwcl", "senta", "struca"):
        vocab, m, student, batch = prepared(setup, **{off: "false"})
        parts = loss_values(m, batch, student)
        assert set(parts) == {"loss", "tlm", "xwcl", "senta", "struca"} - {off}, off
        for name in parts:
            if name != "loss":
                assert parts[name] == pytest.approx(full[name], rel=1e-4, abs=1e-6), (off, name)
        assert parts["loss"] == pytest.approx(sum(v for k, v in parts.items() if k != "loss"), rel=1e-6)
    assert prepared(setup, xwcl="false")[1].plan.dense == ("cls",)
    assert prepared(setup, senta="false", struca="false")[1].plan.dense == ("hidden.6",)
    vocab, m, student, batch = prepared(setup, struca_weight=0.25)
    parts = loss_values(m, batch, student)
    assert parts["loss"] == pytest.approx(parts["tlm"] + parts["xwcl"] + parts["senta"] + 0.25 * parts["struca"], rel=1e-6)


def test_xwcl_aligns_words_when_the_student_tokenizes_english_unlike_the_teacher(setup):
    from transformers import AutoTokenizer

    vocab, m, student, batch = prepared(setup, vocab_key="vocab_cased", batch_size=16)
    english, _ = texts_of(setup, batch)
    teacher_tok = AutoTokenizer.from_pretrained(setup["teacher"])
    student_tok = vocab.teacher_tokenizer(vocab.teacher_for("en"))
    assert vocab.teacher_for("en") == vocab.teacher_for("hi")  # English goes through mBERT here
    n = len(english)
    differ = 0
    for q in range(len(batch["xwcl_flat"])):
        row, word = int(batch["xwcl_row"][q]), int(batch["xwcl_word"][q])
        pos = int(batch["xwcl_flat"][q]) - (n + row) * batch["input_ids"].shape[1]  # within the XWCL row
        s, t = student_tok(english[row]), teacher_tok(english[row])
        differ += [x.lower() for x in s.tokens()] != t.tokens()
        # The query sits on the first sub-token of the student's word `word`, which spells
        # the same word the teacher's word `word` does.
        assert s.token_to_word(pos) is not None and (pos == 1 or s.token_to_word(pos - 1) != s.token_to_word(pos))
        student_words = sorted(set(w for w in s.word_ids() if w is not None))
        teacher_words = sorted(set(w for w in t.word_ids() if w is not None))
        s_span = s.word_to_chars(student_words[word])
        t_span = t.word_to_chars(teacher_words[word])
        assert english[row][s_span.start : s_span.end] == english[row][t_span.start : t_span.end]
        assert s.token_to_word(pos) == student_words[word]
    assert differ > 0  # the vocabularies really split English differently
    words, _ = online_teacher(setup, english)
    assert batch["teacher_word_mask"].sum(1).tolist() == [len(w) for w in words]  # every word aligned
    _, flat = student_hidden(student, batch)
    offline = loss_values(m, batch, student)["xwcl"]
    assert offline == pytest.approx(direct_xwcl(m, batch, flat, [w.half().float() for w in words]), rel=1e-4)


def test_train_student_mmkd_end_to_end_keeps_the_teacher_projectors_frozen(setup, tmp_path):
    from transformers import AutoModelForMaskedLM

    out = tmp_path / "student"
    r = invoke("train-student", "--method", "mmkd", "--caches", setup["cache"], "--vocab", setup["vocab"], "--out", out,
               "--steps", 12, "--batch-size", 8, "--hidden", STUDENT_WIDTH, "--layers", 2, "--heads", 2, "--lr", 3e-3,
               "--log-every", 2, "--dropout", 0, "--option", "projector_seed=7", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 12 and set(summary["final"]) >= {"loss", "tlm", "xwcl", "senta", "struca"}
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(x[k]) for x in logged for k in ("loss", "tlm", "xwcl", "senta", "struca"))
    # Dot-product InfoNCE at tau 0.1 on a random student is spiky; TLM falls steadily.
    assert logged[-1]["tlm"] < logged[0]["tlm"] - 0.3, logged
    model = AutoModelForMaskedLM.from_pretrained(out)
    assert model.config.vocab_size == vocab_at(setup["vocab"]).size
    state = torch.load(out / "checkpoints" / "step-00000012" / "state.pt", weights_only=False)["method"]
    for offset, name in enumerate(("senta", "struca")):
        fresh = frozen_projector(TEACHER_WIDTH, 768, 128, 7 + offset).state_dict()
        for key, value in fresh.items():
            assert torch.equal(state[f"{name}_teacher_projector.{key}"], value), (name, key)
    assert state["xwcl_projection.weight"].shape == (TEACHER_WIDTH, STUDENT_WIDTH)


def test_mlm_text_source_trains_on_an_encoder_cache(setup, tmp_path):
    r = invoke("train-student", "--method", "mlm", "--option", "source=text", "--caches", setup["cache"], "--vocab",
               setup["vocab"], "--out", tmp_path / "mlm", "--steps", 10, "--batch-size", 8, "--hidden", 32,
               "--layers", 1, "--heads", 2, "--lr", 3e-3, "--log-every", 2, "--json")
    assert r.exit_code == 0, r.output
    logged = [json.loads(line) for line in (tmp_path / "mlm" / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["mlm"] < logged[0]["mlm"]
    r = invoke("train-student", "--method", "mlm", "--option", "source=words", "--caches", setup["cache"], "--vocab",
               setup["vocab"], "--out", tmp_path / "bad", "--steps", 1)
    assert r.exit_code == 2 and "source=words" in r.output


def test_caches_without_word_level_states_or_with_both_sides_are_clear_errors(setup, client, tmp_path):
    tokens = cache(client, tmp_path, setup["teacher"], "--sides", "src", "--mask-prob", 0, "--hidden-layers", LAST_LAYER,
                   "--hidden-positions", "all", "--sentence", "cls", "--max-pairs", 8)
    both = cache(client, tmp_path, setup["teacher"], "--sides", "both", "--mask-prob", 0, "--sentence", "cls", "--max-pairs", 8)
    args = ("--vocab", setup["vocab"], "--out", tmp_path / "o", "--steps", 1, "--hidden", 32, "--layers", 1, "--heads", 2)
    r = invoke("train-student", "--method", "mmkd", "--caches", tokens, *args)
    assert r.exit_code == 2, r.output
    assert "'hidden.<layer>' aligned to words" in r.output and "--hidden-positions word" in r.output
    assert "Traceback" not in r.output
    r = invoke("train-student", "--method", "mmkd", "--caches", both, *args)
    assert r.exit_code == 2 and "needs the cached output 'hidden.*'" in r.output and "--hidden-positions word" in r.output
    setup = {**setup, "tokens": tokens, "both": both}
    m = method(setup, cache_key="tokens", xwcl="false")  # without XWCL, no word-level states are needed
    assert m.plan.dense == ("cls",)
    with pytest.raises(BadInput, match="--sides src"):
        method(setup, cache_key="both", xwcl="false")
    with pytest.raises(BadInput, match="xwcl_tua"):
        method(setup, xwcl_tua=0.2)
    with pytest.raises(BadInput, match="every objective is off"):
        method(setup, tlm="false", xwcl="no", senta="0", struca="off")
