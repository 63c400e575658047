"""cache-teachers end to end on a real dask LocalCluster (2 worker processes, one per module).

The key test is offline == online: what the cache holds equals what the teacher computes when
run directly, within the storage dtype.
"""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from xkd import open_cache
from xkd.cli import app
from xkd.errors import BadInput
from xkd.pipeline import CacheTeachersOptions, cache_teachers

from conftest import PARALLEL, build_tiny_bert

TATOEBA = (f"parallel:{PARALLEL}/tatoeba/tatoeba.hin-eng.eng@en,"
           f"{PARALLEL}/tatoeba/tatoeba.hin-eng.hin@hi")


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    cluster = LocalCluster(host="127.0.0.1", n_workers=2, threads_per_worker=1, processes=True,
                           dashboard_address=None, silence_logs=logging.ERROR,
                           scheduler_kwargs={"dashboard_address": ":0"})
    with Client(cluster) as c:
        yield c
    cluster.close()


def run(client, **kwargs) -> dict:
    log = io.StringIO()
    result = cache_teachers(CacheTeachersOptions(**kwargs), client=client, log=log)
    result["log"] = log.getvalue()
    return result


def cache_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def rows_of(path) -> list[dict]:
    return list(open_cache(path).iter_examples())


def close(cached, direct, what, rtol=1e-3, atol=1e-3):
    np.testing.assert_allclose(np.asarray(cached, np.float32), np.asarray(direct, np.float32), rtol=rtol, atol=atol, err_msg=what)


def test_offline_equals_online_for_a_masked_lm(client, tiny_teachers, tmp_path):
    """Top-k ids and logits, log-normaliser, teacher loss, hidden states, [CLS] and pooled
    vectors from the cache equal a direct forward pass of the HF model on the cached ids."""
    from transformers import AutoTokenizer, BertForMaskedLM

    teacher = tiny_teachers["multi"]
    result = run(client, teachers=[str(teacher)], corpus=TATOEBA, out=str(tmp_path), max_pairs=12, shard_size=5,
                 topk=8, mask_epochs=2, hidden_layers=(0, 2), hidden_positions="all", sentence=("cls", "pooled"),
                 token_budget=300)
    [info] = result["caches"]
    assert info["rows"] == 12 * 2 * 2 and info["complete"] and info["shards"] == 3 and info["masked"] > 0
    model = BertForMaskedLM.from_pretrained(teacher).eval()
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    rows = rows_of(info["path"])
    assert [(r["example_id"], r["side"], r["mask_epoch"]) for r in rows[:4]] == [
        (0, "src", 0), (0, "src", 1), (0, "tgt", 0), (0, "tgt", 1)]
    masked_total = 0
    with torch.inference_mode():
        for row in rows:
            ids = torch.tensor(row["input_ids"].astype(np.int64))[None]
            out = model(input_ids=ids, output_hidden_states=True)
            positions = row["masked_positions"].astype(np.int64)
            logits = out.logits[0, positions].float()
            lognorm = torch.logsumexp(logits, -1)
            top = logits.topk(8, dim=-1).values
            cached_ids = torch.from_numpy(row["topk_ids"].astype(np.int64))
            # Each cached logit is the true logit of its id, and the cached values are the
            # true top-8 values: so the ids are a top-8 (ties may order differently).
            close(row["topk_logits"], logits.gather(1, cached_ids), "top-k logits vs their ids")
            close(row["topk_logits"], top, "top-k values")
            close(row["lognorm"], lognorm, "log-normaliser", rtol=1e-5, atol=1e-4)
            labels = torch.from_numpy(row["labels"].astype(np.int64))
            close(row["teacher_loss"], (lognorm - logits.gather(1, labels[:, None])[:, 0]).mean(), "teacher loss",
                  rtol=1e-5, atol=1e-4)
            for layer in (0, 2):
                close(row[f"hidden.{layer}"], out.hidden_states[layer][0], f"hidden.{layer}")
            last = out.hidden_states[-1][0]
            close(row["cls"], last[0], "cls")
            close(row["pooled"], last.mean(0), "pooled (mean: a masked LM has no pooler)")
            # Labels written back give the teacher's own tokenization of the stored text.
            restored = row["input_ids"].copy()
            restored[positions] = row["labels"]
            assert restored.tolist() == tokenizer(row["text"], truncation=True, max_length=128)["input_ids"]
            masked_total += positions.size
    assert masked_total == info["masked"]


def test_offline_equals_online_for_real_minilm_on_tatoeba(client, minilm_dir, tmp_path):
    """The real pretrained MiniLM: word-start hidden states, [CLS], and the pooled vector
    following its sentence-transformers config (mean pooling, then L2 normalisation)."""
    from transformers import AutoModel

    result = run(client, teachers=["minilm"], corpus=TATOEBA, out=str(tmp_path), max_pairs=32, shard_size=16,
                 hidden_layers=(3, 6), hidden_positions="word", sides="src")
    [info] = result["caches"]
    assert info["rows"] == 32 and info["masked"] == 0 and info["kind"] == "encoder"
    cache = open_cache(info["path"])
    assert cache.topk_k is None and set(cache.dense_specs) == {"hidden.3", "hidden.6", "cls", "pooled"}
    assert cache.manifest["teacher"]["pooling"] == {"mode": "mean", "normalize": True, "from": "1_Pooling/config.json"}
    model = AutoModel.from_pretrained(minilm_dir).eval()
    with torch.inference_mode():
        for row in cache.iter_examples():
            assert row["side"] == "src" and row["lang"] == "en" and row["pair_text"]
            out = model(input_ids=torch.tensor(row["input_ids"].astype(np.int64))[None], output_hidden_states=True)
            words = torch.from_numpy(row["word_start"])
            for layer in (3, 6):
                close(row[f"hidden.{layer}"], out.hidden_states[layer][0][words], f"hidden.{layer} at word starts")
            last = out.last_hidden_state[0]
            close(row["cls"], last[0], "cls")
            close(row["pooled"], torch.nn.functional.normalize(last.mean(0), dim=0), "pooled", atol=2e-4)
            assert np.isnan(row["teacher_loss"])


def test_two_teachers_with_different_vocabularies_share_example_ids(client, tiny_teachers, tmp_path):
    result = run(client, teachers=[str(tiny_teachers["en"]), str(tiny_teachers["multi"])], corpus="sample",
                 out=str(tmp_path), shard_size=32, topk=4, whole_word=True)
    en, multi = (open_cache(c["path"]) for c in result["caches"])
    assert en.path != multi.path and {c["teacher"] for c in result["caches"]} == {str(t) for t in tiny_teachers.values()}
    assert en.manifest["teacher"]["vocab_size"] == 30522 and multi.manifest["teacher"]["vocab_size"] == 119547
    en_rows, multi_rows = list(en.iter_examples()), list(multi.iter_examples())
    keys = lambda rows: [(int(r["example_id"]), r["side"], r["lang"], int(r["pair_id"])) for r in rows]  # noqa: E731
    assert keys(en_rows) == keys(multi_rows) and len(en_rows) == 160
    different = sum(not np.array_equal(a["input_ids"], b["input_ids"]) for a, b in zip(en_rows, multi_rows))
    assert different == 160  # each teacher tokenized its own copy
    for cache, rows in ((en, en_rows), (multi, multi_rows)):
        assert all(r["topk_ids"].max() < cache.manifest["teacher"]["model_vocab_size"] for r in rows if r["topk_ids"].size)
    hindi = [r for r in multi_rows if r["lang"] == "hi"]
    assert hindi[0]["text"] == "सूरज पूरब में उगता है।" and hindi[0]["pair_text"] == "The sun rises in the east."


def test_classifier_and_encoder_kinds(client, tmp_path):
    """A sequence classifier caches its class logits; a BertModel encoder with a pooler
    caches the pooler output as its pooled vector."""
    from transformers import BertForSequenceClassification, BertModel

    from conftest import VOCABS

    clf = build_tiny_bert(tmp_path / "clf", VOCABS / "bert-base-uncased.vocab.txt", lowercase=True, kind="classifier", seed=3)
    enc = build_tiny_bert(tmp_path / "enc", VOCABS / "bert-base-uncased.vocab.txt", lowercase=True, kind="encoder", seed=4)
    result = run(client, teachers=[str(clf), str(enc)], corpus="sample", out=str(tmp_path / "caches"), sides="src",
                 max_pairs=20, sentence=("pooled",))
    clf_info, enc_info = result["caches"]
    assert (clf_info["kind"], enc_info["kind"]) == ("classifier", "encoder") and clf_info["masked"] == 0
    clf_model = BertForSequenceClassification.from_pretrained(clf).eval()
    enc_model = BertModel.from_pretrained(enc).eval()
    with torch.inference_mode():
        for row in rows_of(clf_info["path"]):
            ids = torch.tensor(row["input_ids"].astype(np.int64))[None]
            close(row["class_logits"], clf_model(input_ids=ids).logits[0], "class logits")
            close(row["pooled"], clf_model.bert(input_ids=ids).pooler_output[0], "classifier pooled")
        for row in rows_of(enc_info["path"]):
            ids = torch.tensor(row["input_ids"].astype(np.int64))[None]
            close(row["pooled"], enc_model(input_ids=ids).pooler_output[0], "encoder pooler output")
    assert open_cache(enc_info["path"]).manifest["teacher"]["pooling"]["mode"] == "pooler"


def test_impossible_outputs_are_clear_errors_before_any_work(client, tiny_teachers, tmp_path):
    with pytest.raises(BadInput, match=r"no masked-LM head .* Drop --topk"):
        run(client, teachers=["minilm"], corpus="sample", out=str(tmp_path), topk=8)
    with pytest.raises(BadInput, match="not a sequence classifier"):
        run(client, teachers=[str(tiny_teachers["en"])], corpus="sample", out=str(tmp_path), class_logits=True)
    with pytest.raises(BadInput, match=r"--hidden-layers \[7\]: .* layers 0 \(embeddings\) to 2"):
        run(client, teachers=[str(tiny_teachers["en"])], corpus="sample", out=str(tmp_path), hidden_layers=(7,))
    assert not any(tmp_path.iterdir())  # nothing was created


def test_resume_rewrites_only_missing_shards_and_ends_byte_identical(client, tiny_teachers, tmp_path):
    opts = dict(teachers=[str(tiny_teachers["en"])], corpus="sample", out=str(tmp_path), shard_size=16, topk=4,
                hidden_layers=(1,), hidden_positions="cls")
    first = run(client, **opts)
    [info] = first["caches"]
    root = Path(info["path"])
    assert info["shards"] == 5 and info["shards_run"] == 5
    reference = cache_bytes(root)
    (root / "shards" / "00002.parquet").unlink()  # a lost shard file
    second = run(client, **opts)
    assert second["caches"][0]["shards_run"] == 1 and "shard 2 is damaged" in second["log"]
    assert cache_bytes(root) == reference
    third = run(client, **opts)
    assert third["caches"][0]["shards_run"] == 0 and "resuming, 5 of 5" in third["log"]
    other_seed = run(client, **{**opts, "seed": 1})
    assert other_seed["caches"][0]["path"] != info["path"]  # another setting, another cache


def test_cli_runs_on_an_existing_scheduler_prints_json_last_and_replays_from_its_config(client, tiny_teachers, tmp_path):
    result = CliRunner().invoke(app, [
        "cache-teachers", "--teacher", str(tiny_teachers["multi"]), "--corpus", "sample", "--out", str(tmp_path / "a"),
        "--scheduler", client.scheduler.address, "--topk", "3", "--sides", "tgt", "--whole-word", "--hidden-layers", "1",
        "--json",
    ])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    [info] = summary["caches"]
    assert info["rows"] == 80 and info["masked"] > 0 and info["bytes"] > 0 and Path(info["path"]).is_dir()
    assert "shards 1/1" in result.stderr and "tokens/s" in result.stderr and "ETA" in result.stderr
    assert "cache: " + info["path"] in result.stdout
    # The run's config.yaml replays it: the same cache, byte for byte, under another --out
    config = Path(info["path"]) / "config.yaml"
    assert "scheduler" not in yaml.safe_load(config.read_text())  # where it ran is not part of what it made
    replay = CliRunner().invoke(app, ["cache-teachers", "--config", str(config), "--out", str(tmp_path / "b"),
                                      "--scheduler", client.scheduler.address, "--json"])
    assert replay.exit_code == 0, replay.stderr
    [again] = json.loads(replay.stdout.strip().splitlines()[-1])["caches"]
    assert Path(again["path"]).name == Path(info["path"]).name
    assert cache_bytes(Path(again["path"])) == cache_bytes(Path(info["path"]))
    # A flag given beside --config overrides the file: another setting, another cache
    other = CliRunner().invoke(app, ["cache-teachers", "--config", str(config), "--out", str(tmp_path / "c"), "--topk", "2",
                                     "--scheduler", client.scheduler.address, "--json"])
    assert other.exit_code == 0, other.stderr
    [changed] = json.loads(other.stdout.strip().splitlines()[-1])["caches"]
    assert open_cache(changed["path"]).manifest["view"]["outputs"]["topk"] == 2


def test_cli_bad_input_exits_2_with_one_paragraph(tmp_path):
    bad = tmp_path / "a.en"
    bad.write_text("one\ntwo\n")
    short = tmp_path / "a.hi"
    short.write_text("एक\n")
    runner = CliRunner()
    result = runner.invoke(app, ["cache-teachers", "--teacher", "minilm", "--corpus", f"parallel:{bad}@en,{short}@hi",
                                 "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "has 1 lines but" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["cache-teachers", "--teacher", "no-such-teacher-xyz", "--corpus", "sample"])
    assert result.exit_code == 2 and "does not resolve" in result.output


def test_killed_worker_mid_shard_gives_a_byte_identical_cache(client, tiny_teachers, tmp_path):
    """SIGKILL a worker while shards run: dask retries its task elsewhere, nothing is
    duplicated, and the finished cache has the same bytes as an uninterrupted run."""
    opts = dict(teachers=[str(tiny_teachers["multi"])], corpus=TATOEBA, max_pairs=80, shard_size=4, topk=8,
                hidden_layers=(0, 1, 2), hidden_positions="all", sentence=("cls", "pooled"), mask_epochs=2)
    reference = run(client, out=str(tmp_path / "reference"), **opts)["caches"][0]
    pids_before = client.run(os.getpid)

    manifest = tmp_path / "killed" / Path(reference["path"]).name / "manifest.json"
    killed = {}

    def kill_a_busy_worker_after_two_shards():
        deadline = time.time() + 120
        while time.time() < deadline:
            if manifest.exists() and len(json.loads(manifest.read_text())["shards"]) >= 2:
                busy = [addr for addr, keys in client.processing().items() if keys]
                if busy:
                    killed["shards_done"] = len(json.loads(manifest.read_text())["shards"])
                    os.kill(pids_before[busy[0]], signal.SIGKILL)
                    killed["pid"] = pids_before[busy[0]]
                    return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_a_busy_worker_after_two_shards)
    killer.start()
    outcome = {"result": run(client, out=str(tmp_path / "killed"), **opts)}
    killer.join()
    assert "pid" in killed, "no worker was busy while shards ran"
    done_at_kill = killed["shards_done"]
    result = outcome["result"]["caches"][0]
    assert done_at_kill < reference["shards"] == result["shards"] == 20
    assert result["complete"] and result["rows"] == reference["rows"]
    assert cache_bytes(Path(result["path"])) == cache_bytes(Path(reference["path"]))
    client.wait_for_workers(2, timeout=120)
    assert killed["pid"] not in client.run(os.getpid).values()  # the worker really died
