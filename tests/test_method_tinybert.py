"""tinybert: stage-1 loss from the cache == the same loss from the teacher run now, the
paper's layer map, the cached attention == the teacher's, clear errors, the attention loss on
tensors, and short train-student runs of both stages. Caches are made by the real pipeline
(the stage-1 one through the documented cache-teachers invocation) from tiny 4-layer
teachers; the students have 2 layers and a different width, so the learned projections are
exercised."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from xkd import load_vocab, open_cache
from xkd.cli import app
from xkd.errors import BadInput
from xkd.pipeline import CacheTeachersOptions, cache_teachers
from xkd.storage import Ragged
from xkd.student.data import StreamConfig, StreamingDataset
from xkd.student.losses import attention_mse
from xkd.student.methods import prepare
from xkd.student.methods.tinybert import layer_map, unpack_attention
from xkd.student.models import Student, StudentConfig
from xkd.vocab import build_vocab

from conftest import ROOT, TATOEBA, VOCABS, build_tiny_bert, independent_draws

STUDENT = StudentConfig(hidden=24, layers=2, heads=2, dropout=0.0)  # teacher: 4 layers, width 32, 2 heads
MAX_LENGTH = 32
SAMPLE_N = 16
TOY = ROOT / "xkd" / "data"


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def setup(client, tmp_path_factory):
    root = tmp_path_factory.mktemp("tinybert")
    uncased = VOCABS / "bert-base-uncased.vocab.txt"
    teacher = build_tiny_bert(root / "teacher", uncased, lowercase=True, layers=4, seed=21, init_range=1.0)
    classifier = build_tiny_bert(root / "classifier", uncased, lowercase=True, kind="classifier", layers=4, seed=22)
    # The documented stage-1 invocation (docs/methods.md), for a 4-layer teacher and a 2-layer student,
    # with draws beside the top-k (kd_target=sampled reads them).
    r = invoke("cache-teachers", "--teacher", teacher, "--corpus", TATOEBA, "--sides", "src", "--max-pairs", 12,
               "--topk", 8, "--sample", SAMPLE_N, "--hidden-layers", "0,2,4", "--hidden-positions", "all",
               "--attention-layers", "2,4",
               "--max-length", MAX_LENGTH, "--out", root / "stage1", "--scheduler", client.scheduler.address)
    assert r.exit_code == 0, r.output
    [stage1] = [p for p in (root / "stage1").iterdir() if p.is_dir()]
    stage2 = cache_teachers(CacheTeachersOptions(teachers=[str(classifier)], corpus=TATOEBA, out=str(root / "stage2"),
                                                 sides="src", max_pairs=12, class_logits=True, hidden_layers=(0, 2, 4)),
                            client=client, log=io.StringIO())["caches"][0]["path"]
    # One union vocab serves both: the classifier shares the teacher's tokenizer.
    build_vocab([str(teacher)], root / "vocab", {"en": str(teacher)})
    return {"root": root, "teacher": teacher, "stage1": str(stage1), "stage2": stage2, "vocab": str(root / "vocab")}


def prepared(setup, cache_key, **options):
    vocab = load_vocab(setup["vocab"])
    options = {k: str(v) for k, v in options.items()}
    caches = [open_cache(setup[cache_key])]
    torch.manual_seed(0)
    ready = prepare("tinybert", options, caches, vocab, student=STUDENT)
    model, method = ready.model.eval(), ready.method
    ds = StreamingDataset(caches, StreamConfig(batch_size=5, columns=ready.plan.columns, dense=ready.plan.dense),
                          remap_tables=[vocab.map_for(caches[0].manifest)], collate=method.collate)
    batch = next(iter(ds))
    batch.pop("loader_state")
    return vocab, caches[0], method, Student(model), batch


def test_the_documented_cache_holds_token_aligned_hidden_states_and_attention(setup):
    c = open_cache(setup["stage1"])
    assert {n: (s.align, s.dim) for n, s in c.dense_specs.items()} == {
        **{f"hidden.{i}": ("token", 32) for i in (0, 2, 4)}, **{f"attn.{i}": ("token", 2 * MAX_LENGTH) for i in (2, 4)}}
    row = next(c.iter_examples())
    assert c.topk_k == 8 and len(row["hidden.2"]) == len(row["attn.4"]) == len(row["input_ids"])


def test_the_cached_attention_is_the_teachers(setup):
    """Every row's attn.<L>: per query token, head h's probabilities over the row's keys at
    [h*max_length, h*max_length + n), zeros after; equal to the teacher's eager attention run
    now on the row's cached input ids (the cache ran the teacher batched and padded)."""
    from transformers import BertForMaskedLM

    teacher = BertForMaskedLM.from_pretrained(setup["teacher"], attn_implementation="eager").eval()
    rows = list(open_cache(setup["stage1"]).iter_examples())
    assert len({len(r["input_ids"]) for r in rows}) > 1  # padding happened in the cached batches
    with torch.no_grad():
        for row in rows:
            n = len(row["input_ids"])
            maps = teacher(input_ids=torch.from_numpy(row["input_ids"].astype(np.int64))[None], output_attentions=True).attentions
            for layer in (2, 4):
                cached = row[f"attn.{layer}"].astype(np.float32).reshape(n, 2, MAX_LENGTH)
                assert not cached[:, :, n:].any()
                expected = maps[layer - 1][0].permute(1, 0, 2).numpy()
                np.testing.assert_allclose(cached[:, :, :n], expected, atol=1e-3, rtol=1e-3)
                np.testing.assert_allclose(cached.sum(-1), 1.0, atol=2e-3)


def test_a_classifier_teachers_cached_attention_is_its_own(setup, client, tmp_path):
    """Classifiers run through their task model (the base's output is captured by a hook);
    their attention must come from that same forward."""
    from transformers import BertForSequenceClassification

    cache = cache_teachers(CacheTeachersOptions(teachers=[str(setup["root"] / "classifier")], corpus=TATOEBA,
                                                out=str(tmp_path), sides="src", max_pairs=4, attention_layers=(4,),
                                                max_length=MAX_LENGTH), client=client, log=io.StringIO())
    model = BertForSequenceClassification.from_pretrained(setup["root"] / "classifier", attn_implementation="eager").eval()
    with torch.no_grad():
        for row in open_cache(cache["caches"][0]["path"]).iter_examples():
            n = len(row["input_ids"])
            out = model(input_ids=torch.from_numpy(row["input_ids"].astype(np.int64))[None], output_attentions=True)
            cached = row["attn.4"].astype(np.float32).reshape(n, 2, MAX_LENGTH)[:, :, :n]
            np.testing.assert_allclose(cached, out.attentions[3][0].permute(1, 0, 2).numpy(), atol=1e-3, rtol=1e-3)
            np.testing.assert_allclose(row["class_logits"].astype(np.float32), out.logits[0].numpy(), atol=1e-2)


def test_attention_layers_out_of_range_name_the_option(setup, tmp_path):
    r = invoke("cache-teachers", "--teacher", setup["teacher"], "--corpus", TATOEBA, "--attention-layers", "0,5",
               "--out", tmp_path)
    assert r.exit_code == 2 and "--attention-layers [0, 5]" in r.output and "layers 1 to 4" in r.output


def test_the_layer_map_is_the_papers():
    assert layer_map("uniform", 4, 12) == {1: 3, 2: 6, 3: 9, 4: 12}
    assert layer_map("uniform", 2, 4) == {1: 2, 2: 4}
    assert layer_map("2:4,1:1", 2, 4) == {1: 1, 2: 4}
    with pytest.raises(BadInput, match="out of range"):
        layer_map("3:4", 2, 4)
    with pytest.raises(BadInput, match="student:teacher pairs"):
        layer_map("every third", 2, 4)


def test_stage1_loss_from_the_cache_equals_the_teacher_run_online(setup):
    from transformers import BertForMaskedLM

    vocab, cache, method, student, batch = prepared(setup, "stage1")
    assert dict(method.plan.layer_map) == {1: 2, 2: 4}
    assert method.plan.dense == ("hidden.0", "hidden.2", "hidden.4", "attn.2", "attn.4")
    assert set(method.modules) == {"embedding_projection", "hidden_projection"}  # 24 -> 32
    assert method.plan.attention and not method.plan.notes
    with torch.no_grad():
        parts = method.losses(batch, student, step=0)
    table = torch.from_numpy(vocab.map_for(cache.manifest).astype(np.int64))
    teacher = BertForMaskedLM.from_pretrained(setup["teacher"], attn_implementation="eager").eval()
    w_e, w_h = method.modules["embedding_projection"], method.modules["hidden_projection"]
    pred, embedding, hidden, attention, n_masked, n_tokens, n_pairs = 0.0, 0.0, 0.0, 0.0, 0, 0, 0
    with torch.no_grad():
        for i, example_id in enumerate(batch["example_id"].tolist()):
            n = int(batch["attention_mask"][i].sum())
            [row] = [r for r in cache.examples_by_id(example_id)
                     if np.array_equal(table[r["input_ids"].astype(np.int64)].numpy(), batch["input_ids"][i, :n].numpy())]
            ids = torch.from_numpy(row["input_ids"].astype(np.int64))[None]
            t = teacher(input_ids=ids, output_hidden_states=True, output_attentions=True)
            s = student(input_ids=batch["input_ids"][i:i + 1, :n], attention_mask=torch.ones(1, n, dtype=torch.long),
                        masked_flat=torch.from_numpy(row["masked_positions"].astype(np.int64)), output_hidden_states=True,
                        output_attentions=True)
            values, top = t.logits[0, row["masked_positions"].astype(np.int64)].topk(8, dim=-1)
            logp = torch.log_softmax(s.logits, -1)
            pred -= float((torch.softmax(values, -1) * logp.gather(1, table[top])).sum())
            n_masked += len(row["masked_positions"])
            embedding += float(((w_e(s.hidden_states[0][0]) - t.hidden_states[0][0]) ** 2).sum())
            hidden += sum(float(((w_h(s.hidden_states[m][0]) - t.hidden_states[g][0]) ** 2).sum()) for m, g in ((1, 2), (2, 4)))
            # TinyBERT's 1/h Σ_heads MSE over the real (query, key) pairs; 2 heads.
            attention += sum(float(((s.attentions[m - 1][0] - t.attentions[g - 1][0]) ** 2).sum()) for m, g in ((1, 2), (2, 4)))
            n_tokens += n
            n_pairs += n * n
    assert n_masked > 0
    assert float(parts["pred"]) == pytest.approx(pred / n_masked, rel=2e-3)
    assert float(parts["embedding"]) == pytest.approx(embedding / (n_tokens * 32), rel=2e-3)
    assert float(parts["hidden"]) == pytest.approx(hidden / (n_tokens * 32), rel=2e-3)
    assert float(parts["attention"]) == pytest.approx(attention / (n_pairs * 2), rel=2e-3)
    assert float(parts["loss"]) == pytest.approx(
        float(sum(parts[k] for k in ("pred", "embedding", "hidden", "attention", "gold"))), rel=1e-6)


def test_stage1_sampled_pred_from_the_cache_equals_the_teachers_draws_online(setup):
    """kd_target=sampled: L_pred = −1/M Σ_m Σ_j (count_mj / N) log q_mj over draws made again
    from the teacher's online softmax."""
    from transformers import BertForMaskedLM

    vocab, cache, method, student, batch = prepared(setup, "stage1", kd_target="sampled")
    with torch.no_grad():
        pred = float(method.losses(batch, student, step=0)["pred"])
    table = torch.from_numpy(vocab.map_for(cache.manifest).astype(np.int64))
    teacher = BertForMaskedLM.from_pretrained(setup["teacher"]).eval()
    total, n_masked = 0.0, 0
    with torch.no_grad():
        for i, example_id in enumerate(batch["example_id"].tolist()):
            n = int(batch["attention_mask"][i].sum())
            [row] = [r for r in cache.examples_by_id(example_id)
                     if np.array_equal(table[r["input_ids"].astype(np.int64)].numpy(), batch["input_ids"][i, :n].numpy())]
            positions = row["masked_positions"].astype(np.int64)
            logits = teacher(input_ids=torch.from_numpy(row["input_ids"].astype(np.int64))[None]).logits[0, positions]
            draws = independent_draws(logits, row, SAMPLE_N)
            assert np.array_equal(np.repeat(row["sample_ids"], row["sample_counts"]), draws.ravel())
            s = student(input_ids=batch["input_ids"][i:i + 1, :n], attention_mask=torch.ones(1, n, dtype=torch.long),
                        masked_flat=torch.from_numpy(positions))
            total -= float(torch.log_softmax(s.logits.double(), -1).gather(1, table[torch.from_numpy(draws)]).mean(-1).sum())
            n_masked += len(positions)
    assert n_masked > 0
    assert pred == pytest.approx(total / n_masked, rel=1e-4)


def test_weights_and_the_gold_mlm_term(setup):
    _, _, method, student, batch = prepared(setup, "stage1", hidden_weight=0.5, embedding_weight=0, gold_weight=0.25,
                                            attention_weight=2)
    assert method.plan.dense == ("hidden.2", "hidden.4", "attn.2", "attn.4")
    with torch.no_grad():
        parts = method.losses(batch, student, step=0)
    assert set(parts) == {"loss", "pred", "hidden", "attention", "gold"}
    with torch.no_grad():  # L_gold: the gold-label cross-entropy at the masked positions, from the student's logits
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    gold = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1])[batch["masked_flat"]], batch["labels"])
    assert float(parts["gold"]) == pytest.approx(float(gold), rel=1e-5)
    expected = parts["pred"] + 0.5 * parts["hidden"] + 2 * parts["attention"] + 0.25 * parts["gold"]
    assert float(parts["loss"]) == pytest.approx(float(expected), rel=1e-6)
    _, _, method, _, _ = prepared(setup, "stage1", attention_weight=0)
    assert not method.plan.attention and "attn.2" not in method.plan.dense


def test_stage1_pred_at_temperature_2_is_tau_squared_times_the_soft_top_k_cross_entropy(setup):
    """L_pred at τ = 2 from the batch's cached top-k and the student's logits, computed here:
    τ² · −Σ_j softmax(z_T,top-k / τ)_j · log softmax(z_S / τ)_j, mean over masked positions."""
    _, _, method, student, batch = prepared(setup, "stage1", temperature=2)
    with torch.no_grad():
        parts = method.losses(batch, student, step=0)
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    z_s = logits.reshape(-1, logits.shape[-1])[batch["masked_flat"]].double()
    p = torch.softmax(batch["topk_logits"].double() / 2, -1)
    expected = 4 * -(p * torch.log_softmax(z_s / 2, -1).gather(1, batch["topk_ids"])).sum(-1).mean()
    assert float(parts["pred"]) == pytest.approx(float(expected), rel=1e-5)


def test_a_missing_hidden_layer_names_the_cache_teachers_option(setup):
    with pytest.raises(BadInput, match=r"--hidden-layers 0,1,3 --hidden-positions all"):
        prepared(setup, "stage1", layer_map="1:1,2:3")
    with pytest.raises(BadInput, match="not an option of --method tinybert"):
        prepared(setup, "stage1", hidden_wieght=1)
    with pytest.raises(BadInput, match="stage=3"):
        prepared(setup, "stage1", stage=3)


def test_attention_loss_on_cached_layout_equals_a_direct_computation():
    """A teacher's attention packed as the cache would hold it (per query token: heads x
    max_length, head-major, zero-padded keys) unpacks to its maps, and the loss is
    1/h Σ_heads mean over real (query, key) pairs of the squared difference."""
    torch.manual_seed(0)
    heads, max_length, lengths = 2, 8, [5, 3]
    width = max(lengths)
    mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long()
    teacher = torch.softmax(torch.randn(2, heads, width, width).masked_fill(mask[:, None, None] == 0, -1e9), -1)
    student = torch.softmax(torch.randn(2, heads, width, width).masked_fill(mask[:, None, None] == 0, -1e9), -1)
    rows = []
    for b, n in enumerate(lengths):
        packed = torch.zeros(n, heads, max_length)
        packed[:, :, :n] = teacher[b, :, :n, :n].permute(1, 0, 2)
        rows.append(packed.reshape(n, heads * max_length).numpy().astype(np.float16))
    ragged = Ragged(np.concatenate(rows), np.array([0, lengths[0], sum(lengths)], dtype=np.int64))
    unpacked = unpack_attention(ragged, width, heads, max_length)
    for b, n in enumerate(lengths):
        assert torch.allclose(unpacked[b, :, :n, :n], teacher[b, :, :n, :n], atol=1e-3)
    squared = sum(float(((student[b, h, :n, :n] - teacher[b, h, :n, :n]) ** 2).sum())
                  for b, n in enumerate(lengths) for h in range(heads))
    direct = squared / (heads * sum(n * n for n in lengths))
    assert float(attention_mse(student, unpacked, mask)) == pytest.approx(direct, rel=2e-3)
    assert float(attention_mse(teacher, teacher, mask)) == 0.0


def test_train_student_tinybert_stage1_saves_a_loadable_masked_lm(setup, tmp_path):
    from transformers import AutoModelForMaskedLM

    r = invoke("train-student", "--method", "tinybert", "--caches", setup["stage1"], "--vocab", setup["vocab"],
               "--out", tmp_path / "s1", "--steps", 3, "--batch-size", 4, "--hidden", 24, "--layers", 2, "--heads", 2,
               "--log-every", 1, "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "hidden" in r.output and "embedding" in r.output
    model = AutoModelForMaskedLM.from_pretrained(tmp_path / "s1")
    assert model.config.num_hidden_layers == 2 and model.config.vocab_size == load_vocab(setup["vocab"]).size


def test_train_student_tinybert_stage2_distils_class_logits(setup, tmp_path):
    from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification

    vocab, cache, method, student, batch = prepared(setup, "stage2", stage=2, temperature=2)
    assert not method.plan.attention and "--attention-layers 2,4" in method.plan.notes[0]  # hidden only
    with torch.no_grad():
        parts = method.losses(batch, student, step=0)
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    target = torch.softmax(batch["teacher_logits"] / 2, -1)
    soft_ce = float(-(target * torch.log_softmax(logits / 2, -1)).sum(-1).mean())
    assert float(parts["pred"]) == pytest.approx(2**2 * soft_ce, rel=1e-5)  # τ² (Hinton et al.), as in stage 1
    assert {"pred", "embedding", "hidden"} <= set(parts)
    common = ("--vocab", setup["vocab"], "--batch-size", 4, "--hidden", 24, "--layers", 2, "--heads", 2, "--device", "cpu")
    r = invoke("train-student", "--method", "tinybert", "--caches", setup["stage1"], "--out", tmp_path / "s1",
               "--steps", 1, *common)
    assert r.exit_code == 0, r.output
    # Stage 2 starts from the stage-1 student: its union-vocab encoder under a new head.
    start = prepare("tinybert", {"stage": "2"}, [open_cache(setup["stage2"])], vocab, student=STUDENT,
                    init_from=str(tmp_path / "s1")).model
    stage1 = AutoModelForMaskedLM.from_pretrained(tmp_path / "s1")
    assert torch.equal(start.bert.encoder.layer[1].output.dense.weight, stage1.bert.encoder.layer[1].output.dense.weight)
    assert torch.equal(start.bert.embeddings.word_embeddings.weight, stage1.bert.embeddings.word_embeddings.weight)
    r = invoke("train-student", "--method", "tinybert", "--option", "stage=2", "--caches", setup["stage2"],
               "--init-from", tmp_path / "s1", "--out", tmp_path / "s2", "--steps", 3,
               *common[:4], *common[-2:])  # no shape options: --init-from keeps the stage-1 student's (issue 20)
    assert r.exit_code == 0, r.output
    assert "pred" in r.output and "hidden" in r.output
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "s2")
    assert model.config.num_labels == 3
    r = invoke("train-student", "--method", "tinybert", "--option", "stage=2", "--caches", setup["stage1"],
               "--vocab", setup["vocab"], "--out", tmp_path / "bad", "--steps", 1, "--batch-size", 4)
    assert r.exit_code == 2 and "--class-logits" in r.output


def recomputed_attention(model, hidden_in: torch.Tensor, attention_mask: torch.Tensor, layer: int) -> torch.Tensor:
    """softmax(Q Kᵀ / sqrt(d) + mask) of one BERT layer, from its input states and its own
    query/key weights: the pre-dropout attention probabilities, computed without xkd."""
    attn = model.bert.encoder.layer[layer - 1].attention.self
    b, t, _ = hidden_in.shape
    q = attn.query(hidden_in).view(b, t, attn.num_attention_heads, -1).transpose(1, 2)
    k = attn.key(hidden_in).view(b, t, attn.num_attention_heads, -1).transpose(1, 2)
    scores = q @ k.transpose(2, 3) / attn.attention_head_size ** 0.5
    scores = scores.masked_fill(attention_mask[:, None, None, :] == 0, float("-inf"))
    return torch.softmax(scores, dim=-1)


def test_attention_loss_uses_pre_dropout_maps_with_dropout_on(setup):
    """In training mode Hugging Face returns attention maps after dropout (rows summing to
    0.7-1.1, a tenth of them zeroed). L_attn must compare the probabilities themselves."""
    vocab = load_vocab(setup["vocab"])
    caches = [open_cache(setup["stage1"])]
    torch.manual_seed(0)
    ready = prepare("tinybert", {"layer_map": "1:2"}, caches, vocab,
                    student=StudentConfig(hidden=24, layers=2, heads=2, dropout=0.3))
    model, method = ready.model, ready.method
    ds = StreamingDataset(caches, StreamConfig(batch_size=5, columns=ready.plan.columns, dense=ready.plan.dense),
                          remap_tables=[vocab.map_for(caches[0].manifest)], collate=method.collate)
    batch = next(iter(ds))
    # Dropout everywhere but in attention: layer 1's input is then the same in train and eval
    # mode, so its pre-dropout maps are exactly its eval-mode maps.
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout) and not name.endswith("attention.self.dropout"):
            module.p = 0.0
    student = Student(model)
    mask = batch["attention_mask"]
    model.eval()
    with torch.no_grad():
        eval_maps = student(input_ids=batch["input_ids"], attention_mask=mask, output_attentions=True).attentions[0]
    model.train()
    torch.manual_seed(1)
    with torch.no_grad():
        out = student(input_ids=batch["input_ids"], attention_mask=mask, output_attentions=True, output_hidden_states=True)
        expected = recomputed_attention(model, out.hidden_states[0], mask, 1)
        real = (mask.bool()[:, None, :, None] & mask.bool()[:, None, None, :]).expand(-1, 2, -1, -1)
        torch.testing.assert_close(out.attentions[0][real], expected[real], rtol=1e-5, atol=1e-6)
        rows = out.attentions[0].sum(-1)[mask.bool()[:, None, :].expand(-1, 2, -1)]
        torch.testing.assert_close(rows, torch.ones_like(rows), rtol=0, atol=1e-5)
        # The student's own eval-mode maps as the teacher's: L_attn is 0 with dropout on.
        # packed as the cache stores them: per row of n tokens, per query, per head, its n keys
        lengths = mask.sum(1).tolist()
        packed = torch.cat([eval_maps[r, :, :n, :n].permute(1, 0, 2).reshape(-1) for r, n in enumerate(lengths)])
        parts = method.losses({**batch, "attn.2": packed}, student, step=0)
    assert float(parts["attention"]) < 1e-10


def test_stage2_adds_the_gold_class_cross_entropy(setup, client, tmp_path):
    """Limitations of Knowledge Distillation for Zero-shot Transfer Learning (Soltan et al., 2021)
    trains both stages with the standard cross-entropy on gold labels besides the
    distillation losses: in stage 2 on the task's class labels (rows without one skipped)."""
    labeled = cache_teachers(CacheTeachersOptions(teachers=[str(setup["root"] / "classifier")], out=str(tmp_path),
                                                  corpus=f"labeled:{TOY}/toy-en.tsv@en", class_logits=True,
                                                  hidden_layers=(0, 2, 4)), client=client, log=io.StringIO())
    setup = {**setup, "labeled": labeled["caches"][0]["path"]}
    _, cache, method, student, batch = prepared(setup, "labeled", stage=2, gold_weight=0.5, hidden_weight=0,
                                                embedding_weight=0)
    assert (batch["class_label"] >= 0).all()
    with torch.no_grad():
        parts = method.losses(batch, student, step=0)
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    gold = -torch.log_softmax(logits, -1).gather(1, batch["class_label"][:, None]).mean()
    soft = -(torch.softmax(batch["teacher_logits"], -1) * torch.log_softmax(logits, -1)).sum(-1).mean()
    assert float(parts["gold"]) == pytest.approx(float(gold), rel=1e-5)
    assert float(parts["loss"]) == pytest.approx(float(soft + 0.5 * gold), rel=1e-5)
    # The labels the batch carries are the corpus's, row by row.
    labels = {int(r["example_id"]): int(r["class_label"]) for r in cache.iter_examples()}
    assert batch["class_label"].tolist() == [labels[e] for e in batch["example_id"].tolist()]


def test_stage2_gold_labels_follow_the_teachers_class_order(setup, client, tmp_path):
    """A labeled corpus numbers classes by sorted name (food, sports, weather); a teacher whose
    id2label orders them otherwise has its logits in its own order, so the gold ids must be
    mapped into that order by name, as multikd does, or the gold term trains the wrong class."""
    import json
    import shutil

    named = tmp_path / "named-classifier"
    shutil.copytree(setup["root"] / "classifier", named)
    config = json.loads((named / "config.json").read_text())
    config["id2label"] = {"0": "weather", "1": "food", "2": "sports"}
    config["label2id"] = {"weather": 0, "food": 1, "sports": 2}
    (named / "config.json").write_text(json.dumps(config))
    cached = cache_teachers(CacheTeachersOptions(teachers=[str(named)], out=str(tmp_path / "caches"),
                                                 corpus=f"labeled:{TOY}/toy-en.tsv@en", class_logits=True,
                                                 hidden_layers=(0, 2, 4)), client=client, log=io.StringIO())
    setup = {**setup, "named": cached["caches"][0]["path"]}
    _, cache, method, student, batch = prepared(setup, "named", stage=2, hidden_weight=0, embedding_weight=0)
    names = [line.split("\t")[1] for line in (TOY / "toy-en.tsv").read_text(encoding="utf-8").split("\n") if line]
    assert batch["class_label"].tolist() == [config["label2id"][names[e]] for e in batch["example_id"].tolist()]
    assert student.model.config.id2label == {0: "weather", 1: "food", 2: "sports"}
