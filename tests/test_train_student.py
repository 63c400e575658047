"""train-student end to end: offline == online losses, a run that teaches, exact resume,
DDP on gloo, and clear errors. Caches are made by the real pipeline from tiny real teachers
with different vocabularies (bert-base-uncased for English, mBERT for Hindi)."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from xkd import load_vocab, open_cache
from xkd.cli import app
from xkd.storage import CacheWriter, outputs_json, write_shard_files
from xkd.storage.synthetic import synthetic_rows
from xkd.student.data import StreamConfig, StreamingDataset
from xkd.student.losses import distillation_cross_entropy
from xkd.student.methods import prepare
from xkd.student.models import Student, StudentConfig, build_student
from xkd.vocab import build_vocab

from conftest import (
    PARALLEL,
    ROOT,
    TATOEBA,
    TEST_DATA,
    VOCABS,
    build_tiny_bert,
    cache_teacher,
    independent_draws,
    requires_iitb,
)

IITB_VAL = f"parallel:{PARALLEL}/iitb-en-hi/val.en@en,{PARALLEL}/iitb-en-hi/val.hi@hi"
TINY = StudentConfig(hidden=32, layers=2, heads=2, dropout=0.0)
SAMPLE_N = 32


@pytest.fixture(scope="module")
def setup(client, tmp_path_factory):
    """English rows from an uncased teacher, Hindi rows from an mBERT-vocabulary teacher,
    top-8; a held-out pair of caches; a full-vocabulary top-k cache; and the union vocab.
    The teachers are peaky (init_range 1.0) so that there is something to distil."""
    root = tmp_path_factory.mktemp("train")
    en = build_tiny_bert(root / "en-teacher", VOCABS / "bert-base-uncased.vocab.txt", lowercase=True, seed=11, init_range=1.0)
    multi = build_tiny_bert(root / "hi-teacher", VOCABS / "bert-base-multilingual-cased.vocab.txt", lowercase=False,
                            seed=12, init_range=1.0)
    caches = {
        # with draws beside the top-k: kd_target=sampled reads them
        "en": cache_teacher(client, root / "train", en, TATOEBA, sides="src", max_pairs=96, topk=8, shard_size=48,
                            sample=SAMPLE_N),
        "hi": cache_teacher(client, root / "train", multi, TATOEBA, sides="tgt", max_pairs=48, topk=8, shard_size=48),
        "en_full": cache_teacher(client, root / "full", en, TATOEBA, sides="src", max_pairs=6, topk=30522),
    }
    if TEST_DATA.has_iitb:  # the held-out caches; without the IITB sample only the test using them skips
        caches["en_val"] = cache_teacher(client, root / "val", en, IITB_VAL, sides="src", max_pairs=24, topk=8)
        caches["hi_val"] = cache_teacher(client, root / "val", multi, IITB_VAL, sides="tgt", max_pairs=24, topk=8)
    vocab_dir = root / "vocab"
    build_vocab([str(en), str(multi)], vocab_dir, lang_teacher={"en": str(en), "hi": str(multi)})
    return {"caches": caches, "vocab": str(vocab_dir), "root": root, "teachers": {"en": en, "multi": multi}}


def mergedistill(vocab, cache_path, **options):
    """The method as train-student prepares it over one cache."""
    return prepare("mergedistill", {k: str(v) for k, v in options.items()}, [open_cache(cache_path)], vocab,
                   student=TINY).method


def first_batch(cache_path, vocab, method, batch_size=6):
    caches = [open_cache(cache_path)]
    ds = StreamingDataset(caches, StreamConfig(batch_size=batch_size, columns=method.plan.columns),
                          remap_tables=[vocab.map_for(caches[0].manifest)], collate=method.collate)
    batch = next(iter(ds))
    batch.pop("loader_state")
    return caches[0], batch


def teacher_rows_for(cache, batch, vocab):
    """The cached teacher-vocabulary rows behind each batch row (matched by example id and
    by the remapped ids, since an example has a row per side and mask epoch)."""
    table = vocab.map_for(cache.manifest)
    out = []
    for i, example_id in enumerate(batch["example_id"].tolist()):
        n = int(batch["attention_mask"][i].sum())
        [row] = [r for r in cache.examples_by_id(example_id)
                 if np.array_equal(table[r["input_ids"]], batch["input_ids"][i, :n].numpy())]
        out.append(row)
    return out


def online_teacher_logits(teacher_dir, rows) -> list[torch.Tensor]:
    """The teacher run now, on the inputs it saw: full-vocabulary logits at masked positions."""
    from transformers import BertForMaskedLM

    model = BertForMaskedLM.from_pretrained(teacher_dir).eval()
    with torch.inference_mode():
        return [model(input_ids=torch.tensor(r["input_ids"].astype(np.int64))[None])
                .logits[0, r["masked_positions"].astype(np.int64)].float()
                for r in rows]


def online_loss(student_logp, labels, teacher_logits, table, lam, target="full", k=None) -> torch.Tensor:
    """λ·CE(teacher, student) + (1−λ)·CE(gold, student), the teacher distribution built from
    the online logits and scattered into the union vocabulary."""
    logits = torch.cat(teacher_logits)
    union = torch.from_numpy(table.astype(np.int64))
    q = torch.zeros_like(student_logp)
    if target == "full":
        q[:, union[: logits.shape[1]]] = torch.softmax(logits, -1)  # rows scatter into distinct union ids
    else:  # the paper's top-k, renormalised
        values, ids = logits.topk(k, dim=-1)
        q.scatter_(1, union[ids], torch.softmax(values, -1))
    kd = -(q * student_logp).sum(-1).mean()
    mlm = -student_logp.gather(1, labels[:, None]).mean()
    return lam * kd + (1 - lam) * mlm


def student_logp(student, batch):
    from xkd.student.methods.base import masked_log_probs

    with torch.no_grad():
        return masked_log_probs(student, batch)


def reference_distillation(z_s, z_t, k, tau, target):
    """τ² · mean over rows of −Σ_j p_j log q_j from the equations, in float64 Python arithmetic
    over a small vocabulary: q = softmax(z_S / τ) over every token; p from the teacher's full
    logits restricted to its top k (renormalised at τ), or its exact top-k probabilities plus
    the tail mass 1 − Σ p_j against the student's mass outside the k tokens (τ = 1), or, with
    k = the whole vocabulary, the full softmax."""
    total = 0.0
    for s_row, t_row in zip(z_s.tolist(), z_t.tolist()):
        top = sorted(range(len(t_row)), key=lambda j: -t_row[j])[:k]
        s_norm = sum(math.exp(v / tau) for v in s_row)
        q = [math.exp(v / tau) / s_norm for v in s_row]
        if target == "tail":
            t_norm = sum(math.exp(v) for v in t_row)
            p = {j: math.exp(t_row[j]) / t_norm for j in top}
            tail_p, tail_q = 1 - sum(p.values()), 1 - sum(q[j] for j in top)
            total -= sum(p[j] * math.log(q[j]) for j in top) + tail_p * math.log(tail_q)
        else:
            top_norm = sum(math.exp(t_row[j] / tau) for j in top)
            total -= sum(math.exp(t_row[j] / tau) / top_norm * math.log(q[j]) for j in top)
    return tau**2 * total / len(z_s)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_distillation_cross_entropy_equals_the_equations_over_a_small_vocabulary(tau):
    """losses.distillation_cross_entropy, the KD term of mergedistill and tinybert, against the
    equations computed here from full teacher logits (M = 5 positions, V = 12, k = 4)."""
    generator = torch.Generator().manual_seed(7)
    z_s, z_t = torch.randn(5, 12, generator=generator) * 2, torch.randn(5, 12, generator=generator) * 3
    values, ids = z_t.topk(4, dim=-1)
    got = float(distillation_cross_entropy(z_s, values, tau, topk_ids=ids))
    assert got == pytest.approx(reference_distillation(z_s, z_t, 4, tau, "topk"), rel=1e-5)
    # A classifier's logits (no ids): the full softmax, i.e. k = V.
    assert float(distillation_cross_entropy(z_s, z_t, tau)) == pytest.approx(
        reference_distillation(z_s, z_t, 12, tau, "topk"), rel=1e-5)
    # The log-probabilities a method already has are reused at τ = 1 and ignored otherwise.
    stale = torch.log_softmax(z_s, -1)
    assert float(distillation_cross_entropy(z_s, values, tau, topk_ids=ids, student_logp=stale)) == pytest.approx(got, rel=1e-6)
    lognorm = torch.logsumexp(z_t, -1)
    if tau == 1.0:
        tail = float(distillation_cross_entropy(z_s, values, tau, topk_ids=ids, lognorm=lognorm))
        assert tail == pytest.approx(reference_distillation(z_s, z_t, 4, tau, "tail"), rel=1e-5)
    else:
        with pytest.raises(ValueError, match="τ = 1"):
            distillation_cross_entropy(z_s, values, tau, topk_ids=ids, lognorm=lognorm)


def test_mergedistill_at_temperature_2_is_tau_squared_times_the_soft_top_k_cross_entropy(setup):
    vocab = load_vocab(setup["vocab"])
    method = mergedistill(vocab, setup["caches"]["en"], lambda_schedule="constant", lambda_start=1.0, temperature=2)
    _, batch = first_batch(setup["caches"]["en"], vocab, method, batch_size=4)
    torch.manual_seed(3)
    student = Student(build_student(TINY, vocab.size, vocab.pad_id).eval())
    with torch.no_grad():
        kd = float(method.losses(batch, student, step=0)["kd"])
        logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    z_s = logits.reshape(-1, logits.shape[-1])[batch["masked_flat"]].double()
    p = torch.softmax(batch["topk_logits"].double() / 2, -1)
    expected = 4 * -(p * torch.log_softmax(z_s / 2, -1).gather(1, batch["topk_ids"])).sum(-1).mean()
    assert kd == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("lam", [1.0, 0.3])
def test_offline_equals_online_with_the_whole_vocabulary_as_k(setup, lam):
    """k = the teacher's whole vocabulary: the cached loss IS the full-softmax loss (up to
    the fp16 storage of logits; exactly equal once the online logits are rounded alike)."""
    vocab = load_vocab(setup["vocab"])
    method = mergedistill(vocab, setup["caches"]["en_full"], lambda_schedule="constant", lambda_start=lam)
    cache, batch = first_batch(setup["caches"]["en_full"], vocab, method)
    assert batch["topk_ids"].shape[1] == 30522
    torch.manual_seed(0)
    student = Student(build_student(TINY, vocab.size, vocab.pad_id).eval())
    offline = method.losses(batch, student, step=0)["loss"].detach()
    logits = online_teacher_logits(setup["teachers"]["en"], teacher_rows_for(cache, batch, vocab))
    table = vocab.map_for(cache.manifest)
    logp = student_logp(student, batch)
    rounded = [t.half().float() for t in logits]
    # Not bit-equal: the pipeline runs the MLM head on masked positions only, so its fp32
    # logits differ from this full forward by matmul-order noise, which flips the fp16
    # rounding of a few of the 30k logits by one ulp.
    assert float(offline) == pytest.approx(float(online_loss(logp, batch["labels"], rounded, table, lam)), rel=2e-5)
    assert float(offline) == pytest.approx(float(online_loss(logp, batch["labels"], logits, table, lam)), rel=2e-3)


def test_offline_top8_equals_the_top8_formula_on_online_logits(setup):
    vocab = load_vocab(setup["vocab"])
    method = mergedistill(vocab, setup["caches"]["en"], lambda_schedule="constant", lambda_start=0.5)
    for name, teacher in (("en", "en"), ("hi", "multi")):
        cache, batch = first_batch(setup["caches"][name], vocab, method, batch_size=8)
        torch.manual_seed(1)
        student = Student(build_student(TINY, vocab.size, vocab.pad_id).eval())
        offline = float(method.losses(batch, student, step=0)["loss"].detach())
        logits = online_teacher_logits(setup["teachers"][teacher], teacher_rows_for(cache, batch, vocab))
        logp = student_logp(student, batch)
        online = float(online_loss(logp, batch["labels"], logits, vocab.map_for(cache.manifest), 0.5, target="topk", k=8))
        assert offline == pytest.approx(online, rel=2e-3), name


def test_tail_target_equals_the_coarsened_online_distribution(setup):
    """kd_target=tail: −Σ_top p log q − p_tail log q_tail with p from the online full softmax."""
    vocab = load_vocab(setup["vocab"])
    method = mergedistill(vocab, setup["caches"]["en"], lambda_schedule="constant", lambda_start=1.0, kd_target="tail")
    cache, batch = first_batch(setup["caches"]["en"], vocab, method, batch_size=8)
    torch.manual_seed(2)
    student = Student(build_student(TINY, vocab.size, vocab.pad_id).eval())
    offline = float(method.losses(batch, student, step=0)["kd"].detach())
    logits = torch.cat(online_teacher_logits(setup["teachers"]["en"], teacher_rows_for(cache, batch, vocab)))
    p = torch.softmax(logits, -1)
    p_top, ids = p.topk(8, dim=-1)
    union_ids = torch.from_numpy(vocab.map_for(cache.manifest).astype(np.int64))[ids]
    logp = student_logp(student, batch)
    q_top = logp.gather(1, union_ids)
    q_tail = torch.log1p(-q_top.exp().sum(-1))
    online = float(-((p_top * q_top).sum(-1) + (1 - p_top.sum(-1)) * q_tail).mean())
    assert offline == pytest.approx(online, rel=2e-3)


def test_sampled_target_from_the_cache_equals_the_teachers_draws_online(setup):
    """kd_target=sampled: the cached draws are the teacher's, drawn again now from its online
    softmax with the row's uniforms, and the loss is −1/M Σ_m Σ_j (count_mj / N) log q_mj."""
    vocab = load_vocab(setup["vocab"])
    method = mergedistill(vocab, setup["caches"]["en"], lambda_schedule="constant", lambda_start=1.0, kd_target="sampled")
    assert "sample_ids" in method.plan.columns and "topk_logits" not in method.plan.columns
    cache, batch = first_batch(setup["caches"]["en"], vocab, method, batch_size=8)
    rows = teacher_rows_for(cache, batch, vocab)
    logits = online_teacher_logits(setup["teachers"]["en"], rows)
    draws = np.concatenate([independent_draws(z, r, SAMPLE_N) for z, r in zip(logits, rows)])
    stored = np.concatenate([np.repeat(r["sample_ids"], r["sample_counts"]) for r in rows]).reshape(-1, SAMPLE_N)
    assert np.array_equal(stored, draws)
    assert len(np.unique(draws)) > SAMPLE_N  # the teacher is peaky, yet the draws spread over many ids
    torch.manual_seed(3)
    student = Student(build_student(TINY, vocab.size, vocab.pad_id).eval())
    offline = float(method.losses(batch, student, step=0)["kd"].detach())
    logp = student_logp(student, batch).double()
    union = torch.from_numpy(vocab.map_for(cache.manifest).astype(np.int64))[torch.from_numpy(draws)]
    online = float(-logp.gather(1, union).mean(-1).mean())
    assert offline == pytest.approx(online, rel=1e-5)


def test_sampled_target_refusals_name_the_option(setup, tmp_path):
    r = invoke("train-student", "--method", "mergedistill", "--caches", setup["caches"]["hi"], "--vocab", setup["vocab"],
               "--out", tmp_path / "o", "--steps", 1, "-o", "kd_target=sampled")
    assert r.exit_code == 2 and "--sample 16" in r.output and "kd_target=sampled" in r.output, r.output
    r = invoke("train-student", "--method", "mergedistill", "--caches", setup["caches"]["en"], "--vocab", setup["vocab"],
               "--out", tmp_path / "o", "--steps", 1, "-o", "kd_target=sampled", "-o", "temperature=2")
    assert r.exit_code == 2 and "temperature=1" in r.output and "Traceback" not in r.output, r.output


def test_mergedistill_on_two_languages_and_two_teachers_equals_the_papers_loss(setup):
    """L = λ·L_KD + (1−λ)·L_MLM (MergeDistill: Merging Pre-trained Language Models using
    Distillation, Khanuja et al., 2021) on one batch mixing English rows of one teacher
    and Hindi rows of another, computed here from the cached rows and the student's full
    forward: no xkd loss code, and λ from the annealing formula at an inner step."""
    vocab = load_vocab(setup["vocab"])
    caches = [open_cache(setup["caches"]["en"]), open_cache(setup["caches"]["hi"])]
    torch.manual_seed(4)
    ready = prepare("mergedistill", {"lambda_start": "0.8", "lambda_end": "0.2"}, caches, vocab, student=TINY,
                    total_steps=5)
    ds = StreamingDataset(caches, StreamConfig(batch_size=12, columns=ready.plan.columns),
                          remap_tables=[vocab.map_for(c.manifest) for c in caches], collate=ready.method.collate)
    batch = next(b for b in ds if len(set(b["lang"])) == 2)
    model = ready.model.eval()
    with torch.no_grad():
        parts = ready.method.losses(batch, Student(model), step=3)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    kd = mlm = 0.0
    n = 0
    for i, (example, source) in enumerate(zip(batch["example_id"].tolist(), batch["source"].tolist())):
        table = vocab.map_for(caches[source].manifest).astype(np.int64)
        width = int(batch["attention_mask"][i].sum())
        [row] = [r for r in caches[source].examples_by_id(example)
                 if np.array_equal(table[r["input_ids"]], batch["input_ids"][i, :width].numpy())]
        logp = torch.log_softmax(logits[i, row["masked_positions"].astype(np.int64)], -1).double()
        top_ids = torch.from_numpy(table[row["topk_ids"].astype(np.int64)].reshape(-1, 8))
        p = torch.softmax(torch.from_numpy(row["topk_logits"].astype(np.float64).reshape(-1, 8)), -1)
        kd += float(-(p * logp.gather(1, top_ids)).sum())
        mlm += float(-logp.gather(1, torch.from_numpy(table[row["labels"].astype(np.int64)])[:, None]).sum())
        n += len(row["masked_positions"])
    lam = 0.8 + (0.2 - 0.8) * 3 / 4
    assert float(parts["lambda"]) == pytest.approx(lam, abs=1e-7)
    assert float(parts["kd"]) == pytest.approx(kd / n, rel=1e-5)
    assert float(parts["mlm"]) == pytest.approx(mlm / n, rel=1e-5)
    assert float(parts["loss"]) == pytest.approx(lam * kd / n + (1 - lam) * mlm / n, rel=1e-5)


def test_lambda_is_annealed_linearly_from_start_to_end(setup, tmp_path):
    """Teacher annealing (Clark et al. 2019, as MergeDistill): λ moves linearly from
    lambda_start at the first optimiser step to lambda_end at the last."""
    out = tmp_path / "anneal"
    r = invoke(*train_args(setup, out, 7, "--log-every", 1, "--option", "lambda_start=0.9",
                           "--option", "lambda_end=0.1"))
    assert r.exit_code == 0, r.output
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in logged] == list(range(1, 8))
    for rec in logged:  # the record of step k is the k-th optimiser step, index k - 1 of 0..6
        lam = 0.9 + (0.1 - 0.9) * (rec["step"] - 1) / 6
        assert rec["lambda"] == pytest.approx(lam, abs=2e-6)
        assert rec["loss"] == pytest.approx(lam * rec["kd"] + (1 - lam) * rec["mlm"], rel=1e-4, abs=1e-5)


def invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result


def train_args(setup, out, steps, *extra):
    c = setup["caches"]
    return ["train-student", "--method", "mergedistill", "--caches", c["en"], "--caches", c["hi"],
            "--vocab", setup["vocab"], "--out", out, "--steps", steps, "--batch-size", 8, "--hidden", 32,
            "--layers", 2, "--heads", 2, "--lr", 3e-3, "--warmup", 0.1, "--log-every", 5, *extra]


def evaluate(setup, model_dir):
    c = setup["caches"]
    r = invoke("evaluate", model_dir, "--caches", c["en_val"], "--caches", c["hi_val"], "--vocab", setup["vocab"], "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout.strip().splitlines()[-1])


@requires_iitb
def test_training_lowers_kl_to_both_teachers_and_saves_a_hf_student(setup, tmp_path):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    before = tmp_path / "untrained"
    torch.manual_seed(0)
    vocab = load_vocab(setup["vocab"])
    build_student(StudentConfig(hidden=32, layers=2, heads=2), vocab.size, vocab.pad_id).save_pretrained(before)
    out = tmp_path / "student"
    r = invoke(*train_args(setup, out, 120, "--option", "lambda_schedule=constant", "--option", "lambda_start=0.9", "--json"))
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 120 and set(summary["final"]) >= {"loss", "kd", "mlm"}
    assert set(summary["languages"]) == {"en", "hi"}
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["kd"] < logged[0]["kd"]
    kl_before = {r["teacher"]: r["kl_to_teacher"] for r in evaluate(setup, before)["per_cache"]}
    after = evaluate(setup, out)
    kl_after = {r["teacher"]: r["kl_to_teacher"] for r in after["per_cache"]}
    assert all(kl_after[t] < 0.8 * kl_before[t] for t in kl_before), (kl_before, kl_after)
    # The deviation is relative to each teacher's accuracy; random teachers may have none to compare with.
    pairs = [(r["accuracy"], r["teacher_accuracy"]) for r in after["per_cache"] if r["teacher_accuracy"] > 0]
    expected = 100 * np.mean([(s - t) / t for s, t in pairs]) if pairs else None
    assert after["mlm_accuracy_deviation_percent"] == (pytest.approx(expected) if pairs else None)
    assert "rdt_percent" not in after  # MergeDistill's RDT is on task scores (xkd rdt), not this
    model = AutoModelForMaskedLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.vocab_size == len(tokenizer) == vocab.size


def weights(path) -> dict:
    from transformers import AutoModelForMaskedLM

    return AutoModelForMaskedLM.from_pretrained(path).state_dict()


def test_stopped_and_resumed_run_ends_with_identical_weights_and_its_config_replays_it(setup, tmp_path):
    whole, split, replay = tmp_path / "whole", tmp_path / "split", tmp_path / "replay"
    common = ("--dropout", 0.1, "--save-every", 4, "--seed", 3, "-o", "lambda_start=0.8")
    assert invoke(*train_args(setup, whole, 12, *common)).exit_code == 0
    r = invoke(*train_args(setup, split, 12, *common, "--stop-after", 5))
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (split / "checkpoints").iterdir()) == ["step-00000004", "step-00000005"]
    r = invoke(*train_args(setup, split, 12, *common, "--resume", "--workers", 1))
    assert r.exit_code == 0, r.output
    a, b = weights(whole), weights(split)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lines = lambda p: [json.loads(l)["step"] for l in (p / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert lines(split) == lines(whole)
    # The run's config.yaml replays it byte for byte, and records the method's resolved options
    r = invoke("train-student", "--config", split / "config.yaml", "--out", replay)
    assert r.exit_code == 0, r.output
    assert (replay / "model.safetensors").read_bytes() == (whole / "model.safetensors").read_bytes()
    config = yaml.safe_load((replay / "config.yaml").read_text())
    assert config["method_options"]["lambda_start"] == 0.8 and config["workers"] == 1 and "out" not in config
    # Flags beside --config override the file's values
    r = invoke("train-student", "--config", split / "config.yaml", "--out", tmp_path / "other", "--seed", 4, "--steps", 5)
    assert r.exit_code == 0, r.output
    other = yaml.safe_load((tmp_path / "other" / "config.yaml").read_text())
    assert (other["seed"], other["steps"], other["method_options"]["lambda_start"]) == (4, 5, 0.8)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_on_two_gloo_processes_equals_one_process_accumulating_two_batches(setup, tmp_path):
    """Rank r takes batch 2g+r; DDP averages the two ranks' gradients, which is what one
    process accumulating batches 2g and 2g+1 does (dropout off: RNG streams differ), up to
    the order of float32 reductions (here also two threads against one): the update may differ
    by a few epsilon of its size per step, never by an element-wise constant (see
    _ddp_train_proc.py). tests/test_ddp.py does the same for every method, heads included."""
    from _ddp_train_proc import assert_same_metrics, update_error, update_rtol

    steps, initial, single, ddp = 5, tmp_path / "initial", tmp_path / "single", tmp_path / "ddp"
    # lr 0: the initial weights, which the updates are measured from
    assert invoke(*train_args(setup, initial, 1, "--dropout", 0, "--lr", 0)).exit_code == 0
    assert invoke(*train_args(setup, single, steps, "--dropout", 0, "--grad-accum", 2)).exit_code == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "xkd.cli", *map(str, train_args(setup, ddp, steps, "--dropout", 0))]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    error, worst = update_error(weights(initial), weights(single), weights(ddp))
    assert error <= update_rtol(steps), f"DDP update off by {error:.3g} of the update (worst: {worst})"
    metrics = lambda p: [json.loads(line) for line in (p / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert_same_metrics(metrics(single), metrics(ddp))


def test_method_whose_outputs_the_cache_lacks_is_a_clear_error(setup, tmp_path):
    root = tmp_path / "no-topk"
    meta = {"teacher": {"name": "x"}, "corpus": {}, "view": {}, "outputs": outputs_json(None, {})}
    with CacheWriter(root, "k", meta, planned_shards=1) as w:
        rows, _ = synthetic_rows(0, 8, vocab=100, k=1)
        for name in ("topk_ids", "topk_logits", "lognorm"):
            rows.pop(name)
        w.commit(write_shard_files(root, 0, rows))
    r = invoke("train-student", "--method", "mergedistill", "--caches", root, "--vocab", setup["vocab"],
               "--out", tmp_path / "o", "--steps", 1)
    assert r.exit_code == 2
    assert "needs the cached output 'topk'" in r.output and "--topk 8" in r.output and "Traceback" not in r.output
    r = invoke("train-student", "--method", "nope", "--caches", root, "--vocab", setup["vocab"], "--out", tmp_path / "o")
    assert r.exit_code == 2 and "mergedistill" in r.output and "mlm" in r.output
