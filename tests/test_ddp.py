"""DDP (issue #10): for every method, training on two gloo processes equals one process
accumulating the same two batches per step (--grad-accum 2, dropout 0), the method's heads
included; and after training both ranks hold bitwise the same student and heads.

Rank r takes batches r, r + 2, ...; one process with --grad-accum 2 takes batches 2g and
2g + 1 for step g; DDP averages the two ranks' gradients, which is the same sum. The
configurations are the ones that used to break: xd (the student's masked-LM head unused),
heads outside DDP (xd's projection, mmkd's projectors and predictors, tinybert's
projections), and multikd with MBLM (one language per batch freezes the other branches).

Caches come from the real pipeline, from tiny random-weight teachers with real tokenizers
(English: bert-base-uncased WordPiece, 32 wide; Hindi: mBERT's); the students are 24 wide, so
the methods build their projection heads. Cost on two cores: all configurations run in ONE
torchrun launch (tests/_ddp_train_proc.py), while the one-process references run here.
How close "equals" is (float32 reduction order) is explained in _ddp_train_proc.py.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
from _ddp_train_proc import assert_same_metrics, train_options, update_error, update_rtol

from xkd.pipeline import CacheTeachersOptions, cache_teachers
from xkd.student.run import train_student
from xkd.vocab import build_vocab

from conftest import ROOT, TATOEBA, VOCABS, build_tiny_bert

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

STEPS, LR, BATCH_SIZE = 3, 1e-3, 4
STUDENT = {"hidden": 24, "layers": 2, "heads": 2, "dropout": 0.0}  # the teachers are 32 wide


def config(method, caches, options=None, heads=(), seed=0) -> dict:
    """A configuration: --option values are strings, as the CLI passes them; `heads`: the
    method heads it must build (the point of the configuration)."""
    return {"method": method, "caches": caches, "options": options or {}, "heads": set(heads), "seed": seed}


CONFIGS = {
    "mergedistill": config("mergedistill", ["mlm"]),
    "mlm": config("mlm", ["mlm"]),
    "xd-pooled": config("xd", ["sentences"], {"target": "pooled"}, ["projection"]),
    "xd-class_logits": config("xd", ["classes_en"], {"target": "class_logits"}),
    "mmkd": config("mmkd", ["sentences"], {"head_hidden": "32", "head_out": "16"},
                   ["xwcl_projection", "senta_projector", "senta_predictor", "struca_projector", "struca_predictor"]),
    "multikd-plain": config("multikd", ["classes_en", "classes_hi"], {"student": "plain"}),
    # One language per batch (mix "batch"): only that language's branch gets a gradient. With
    # seed 2 the two ranks' batches are both Hindi at step 1, Hindi and English at step 2, both
    # English at step 3 (test_the_mblm_run_meets_branches_used_by_one_rank_and_by_none).
    "multikd-mblm": config("multikd", ["classes_en", "classes_hi"], {"student": "mblm", "branch_layers": "1"}, seed=2),
    "tinybert-1": config("tinybert", ["mlm"], {"stage": "1"}, ["embedding_projection", "hidden_projection"]),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(log, script, *args, nproc=2) -> subprocess.Popen:
    """Real processes on gloo, one torch thread each (two cores). Output goes to a file (a
    pipe nobody reads while the references train could fill and stall them); a session of
    their own, so that a failing test can end the launcher and its workers together."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(script), *map(str, args)]
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def cache(client, out, teacher, **options) -> str:
    result = cache_teachers(CacheTeachersOptions(teachers=[str(teacher)], corpus=TATOEBA, out=str(out), max_pairs=24,
                                                 max_length=32, **options), client=client, log=io.StringIO())
    return result["caches"][0]["path"]


def build_caches(client, root) -> dict:
    uncased, cased = VOCABS / "bert-base-uncased.vocab.txt", VOCABS / "bert-base-multilingual-cased.vocab.txt"
    en = build_tiny_bert(root / "en", uncased, lowercase=True, seed=41, init_range=1.0)
    # Peaky (init_range 1.0): class logits far from uniform, so that there is a loss to follow.
    en_classifier = build_tiny_bert(root / "en-classifier", uncased, lowercase=True, kind="classifier", seed=42,
                                    init_range=1.0)
    hi_classifier = build_tiny_bert(root / "hi-classifier", cased, lowercase=False, kind="classifier", seed=43,
                                    init_range=1.0)
    build_vocab([str(en), str(hi_classifier)], root / "vocab", {"en": str(en), "hi": str(hi_classifier)})
    return {
        "vocab": str(root / "vocab"),
        # mergedistill, mlm, tinybert stage 1: top-k, and hidden states of every layer at every token
        "mlm": cache(client, root / "caches", en, sides="src", topk=8, hidden_layers=(0, 1, 2)),
        # xd (pooled) and mmkd: text with its translation, word-aligned last layer, [CLS], pooled
        "sentences": cache(client, root / "caches", en, sides="src", mask_prob=0.0, hidden_layers=(2,),
                           hidden_positions="word", sentence=("cls", "pooled")),
        # xd (class_logits) and multikd: one classifier teacher per language
        "classes_en": cache(client, root / "caches", en_classifier, sides="src", class_logits=True),
        "classes_hi": cache(client, root / "caches", hi_classifier, sides="tgt", class_logits=True),
    }


def final_state(out) -> dict:
    """The last checkpoint's student ("model") and heads ("method")."""
    [*_, last] = sorted((out / "checkpoints").glob("step-*"))
    state = torch.load(last / "state.pt", map_location="cpu", weights_only=False)
    return {"model": state["model"], "method": state["method"]}


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(thread_client, tmp_path_factory):
    """Every configuration trained three ways: on two DDP processes (one launch for all), in
    one process accumulating two batches, and for zero steps' worth of change (lr 0: the
    initial weights, to measure updates from)."""
    root = tmp_path_factory.mktemp("ddp")
    paths = build_caches(thread_client, root)
    runs = {
        name: {"name": name, "method": c["method"], "caches": [paths[k] for k in c["caches"]], "vocab": paths["vocab"],
               "options": c["options"], "student": STUDENT, "batch_size": BATCH_SIZE, "seed": c["seed"],
               "ddp_out": str(root / name / "ddp")}
        for name, c in CONFIGS.items()
    }
    spec = root / "spec.json"
    spec.write_text(json.dumps({"runs": list(runs.values()), "steps": STEPS, "lr": LR}))
    log = root / "torchrun.log"
    with open(log, "w") as log_file:
        launch = torchrun(log_file, ROOT / "tests" / "_ddp_train_proc.py", spec)
    try:
        for name, run in runs.items():  # meanwhile, the one-process references
            train_student(train_options(run, str(root / name / "single"), steps=STEPS, grad_accum=2, lr=LR))
            train_student(train_options(run, str(root / name / "initial"), steps=1, grad_accum=1, lr=0.0))
        launch.wait(timeout=900)
    finally:
        if launch.poll() is None:
            os.killpg(launch.pid, signal.SIGKILL)
            launch.wait()
    assert launch.returncode == 0, log.read_text()[-4000:]
    return {name: root / name for name in runs} | {"spec": spec}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ddp_on_two_gloo_processes_equals_one_process_accumulating_two_batches(runs, name):
    out = runs[name]
    before, single, ddp = final_state(out / "initial"), final_state(out / "single"), final_state(out / "ddp")
    heads = CONFIGS[name]["heads"]
    assert {k.split(".")[0] for k in single["method"]} >= heads  # the heads the configuration is about exist
    for part in ("model", "method"):
        assert ddp[part].keys() == single[part].keys() == before[part].keys(), part
        error, worst = update_error(before[part], single[part], ddp[part])
        assert error <= update_rtol(STEPS), f"{part}: DDP update off by {error:.3g} of the update (worst: {worst})"
    for head in heads:  # the heads were trained, not left as built
        key = next(k for k in single["method"] if k.startswith(head + ".") and k.endswith("weight"))
        assert not torch.equal(single["method"][key], before["method"][key]), key
    # Every step's losses and gradient norm: both ranks' batches, as one process logs them.
    assert [m["step"] for m in metrics(out / "single")] == list(range(1, STEPS + 1))
    assert_same_metrics(metrics(out / "single"), metrics(out / "ddp"))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_both_ranks_end_with_bitwise_equal_student_and_heads(runs, name):
    rank0, rank1 = (json.loads((runs[name] / "ddp" / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["steps"] == rank1["steps"] == STEPS
    assert rank0["weights_sha256"] == rank1["weights_sha256"]
    # and what rank 0 saved is what it reported
    from xkd.student.checkpoints import state_sha256

    saved = final_state(runs[name] / "ddp")
    assert rank0["weights_sha256"] == {part: state_sha256(saved[part]) for part in ("model", "method")}


def test_the_mblm_run_meets_branches_used_by_one_rank_and_by_none(runs):
    """What makes multikd-mblm a test of unused parameters: the languages of its batches
    (batch 2g + r is rank r's at step g + 1), read as the loader plans them."""
    from xkd import open_cache
    from xkd.student.data import StreamConfig, StreamingDataset

    [run] = [r for r in json.loads(runs["spec"].read_text())["runs"] if r["name"] == "multikd-mblm"]
    caches = [open_cache(c) for c in run["caches"]]
    stream = StreamingDataset(caches, StreamConfig(batch_size=BATCH_SIZE, seed=run["seed"], mix="batch",
                                                   columns=("example_id", "lang")),
                              remap_tables=[None] * len(caches), collate=lambda rows: {"langs": set(rows["lang"])})
    batches = (batch["langs"] for batch in stream)
    steps = [(next(batches), next(batches)) for _ in range(STEPS)]
    assert [a == b for a, b in steps] == [True, False, True], steps  # same language, different, same
    assert {lang for a, b in steps for lang in a | b} == {"en", "hi"}
