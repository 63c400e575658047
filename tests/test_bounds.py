"""Issue #20, numbers are bounded: no number read from a file or given as an option makes xkd
hang or die in the allocator.

A real cache (tiny random-weight teacher with the real bert-base-uncased vocab, real Tatoeba
pairs, four shards) is copied and edited to hold huge numbers where a manifest, a zarr.json or
a config.json has one; options are given huge values. Every command runs as a real
subprocess under a 4 GB address-space limit and a timeout, so a regression fails here instead
of eating the machine: exit 2 (or verify's and inspect's 1 for a damaged shard), one
paragraph naming the file or option and the bound, no traceback, nothing on disk changed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_reliability_caches import copy_of, edit_manifest, tree_digest

from xkd.errors import BadInput
from xkd.options import machine_memory
from xkd.pipeline import CacheTeachersOptions, cache_teachers
from xkd.pipeline.run import usable_cpus
from xkd.storage.shard import digest_of
from xkd.student.models import StudentConfig
from xkd.student.options import TrainStudentOptions

from conftest import ROOT, TATOEBA, VOCABS, build_tiny_bert

SHARDS, SHARD_SIZE = 4, 15
ROWS = SHARDS * SHARD_SIZE
STUDENT = ["--hidden", 32, "--layers", 1, "--heads", 2, "--batch-size", 4]
ADDRESS_SPACE = 4 << 30  # a regression allocating what a huge number implies fails here, not on the machine
HUGE = 10**15


def xkd(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m xkd.cli ARGS` under RLIMIT_AS and a timeout; never a traceback."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "xkd.cli", *map(str, args)], capture_output=True, text=True,
                            timeout=timeout, preexec_fn=limit, env=env, cwd=ROOT)
    assert "Traceback" not in result.stderr + result.stdout, result.stderr[-3000:]
    return result


def paragraph(result, command: str) -> str:
    """stderr ends with one paragraph (one line) of `xkd COMMAND: `."""
    lines = [line for line in result.stderr.strip().split("\n") if line]
    assert lines and lines[-1].startswith(f"xkd {command}: "), result.stderr
    return lines[-1]


def nothing_trained(out: Path) -> bool:
    """No student, checkpoint or metric in --out (claiming --out may have made the directory)."""
    return not any((out / name).exists() for name in ("config.json", "model.safetensors", "checkpoints")) and \
        not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").stat().st_size)


@pytest.fixture(scope="module")
def made(thread_client, tmp_path_factory):
    """A sound cache by the real pipeline (masked top-k, word-aligned hidden states and [CLS]
    vectors: what mlm and mmkd read) and a union vocab over its teacher."""
    root = tmp_path_factory.mktemp("bounds")
    teacher = build_tiny_bert(root / "teacher", VOCABS / "bert-base-uncased.vocab.txt", lowercase=True, seed=3)
    result = cache_teachers(CacheTeachersOptions(
        teachers=[str(teacher)], corpus=TATOEBA, out=str(root / "caches"), sides="src", topk=8, hidden_layers=(2,),
        hidden_positions="word", sentence=("cls",), max_pairs=ROWS, shard_size=SHARD_SIZE),
        client=thread_client, log=io.StringIO())
    sound = Path(result["caches"][0]["path"])
    vocab = root / "vocab"
    built = xkd("build-vocab", "--teachers", teacher, "--out", vocab)
    assert built.returncode == 0, built.stderr
    return {"root": root, "teacher": teacher, "sound": sound, "vocab": vocab, "digest": tree_digest(sound)}


def edit_zarr_json(root: Path, rel: str, edit) -> None:
    """Edit a zarr.json and record its new size and sha256 in the manifest, as a consistent
    forgery would: only the numbers against the chunk files can tell."""
    path = root / "shards" / rel
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta, indent=2))
    data = path.read_bytes()

    def record(m):
        shard = next(s for s in m["shards"] if s["id"] == int(rel[:5]))
        shard["files"][rel] = [len(data), hashlib.sha256(data).hexdigest()]
        shard["sha256"] = digest_of(shard["files"])
        shard["bytes"] = sum(size for size, _ in shard["files"].values())
    edit_manifest(root, record)


def shard(n):
    return lambda m: next(s for s in m["shards"] if s["id"] == n)


def planned_huge(m):
    m["planned_shards"] = 10**12


def planned_without_examples(m):  # no corpus to tie the plan to: the absolute bound holds
    m["planned_shards"] = 10**7
    m["corpus"].pop("examples")


def shard_id_huge(m):  # without a plan, the missing shards are the ids below the highest
    m["planned_shards"] = None
    shard(3)(m)["id"] = 10**12


def examples_huge(m):
    m["corpus"]["examples"] = HUGE


def mask_epochs_huge(m):
    m["view"]["mask"]["epochs"] = 10**8


def bytes_huge(m):
    shard(1)(m)["bytes"] = HUGE


def masked_huge(m):
    shard(2)(m)["masked"] = HUGE


def max_length_huge(m):
    m["view"]["max_length"] = 10**9


# edit: what the one paragraph of every command names
MANIFEST_CASES = {
    "planned-shards": (planned_huge, "`planned_shards` is 1,000,000,000,000, more than the 1,000,000 shards"),
    "planned-shards-no-corpus": (planned_without_examples, "more than the 1,000,000 shards a cache can plan"),
    "planned-beyond-corpus": (lambda m: m.update(planned_shards=50), "the corpus's 60 examples in shards of 15 make 4"),
    "shard-id": (shard_id_huge, "has id 1,000,000,000,000, beyond the 1,000,000 shards"),
    "examples": (examples_huge, "`corpus.examples` is 1,000,000,000,000,000, more than the corpus's 1,000 records"),
    "mask-epochs": (mask_epochs_huge, "`view.mask.epochs` is 100000000, not a count from 1 to 65,536"),
    "bytes": (bytes_huge, "counts 1,000,000,000,000,000 bytes, but its files add up to"),
    "masked": (masked_huge, "masked positions among only"),
    "max-length": (max_length_huge, "`view.max_length` is 1000000000"),
    "tokens": (lambda m: shard(0)(m).update(tokens=HUGE), "tokens, more than its 15 rows of at most"),
    "langs": (lambda m: shard(0)(m).update(langs={"en": 10**12}), "rows by language (`langs`), more than its 15 rows"),
    "model-vocab-size": (lambda m: m["teacher"].update(model_vocab_size=-5), "`teacher.model_vocab_size` is -5"),
    "hidden-size": (lambda m: m["teacher"].update(hidden_size=10**9), "`teacher.hidden_size` is 1000000000, not the width"),
    "example-ids": (lambda m: shard(1)(m).update(example_ids=[0, 10**18]), "`example_ids` [0, 1000000000000000000]"),
}


def train_args(root, made, tmp_path, method="mlm", *more):
    return ["train-student", "--method", method, "--caches", root, "--vocab", made["vocab"], "--out",
            tmp_path / "student", "--steps", 2, *STUDENT, *more]


@pytest.mark.parametrize("case", list(MANIFEST_CASES))
def test_a_huge_number_in_the_manifest_is_refused_by_every_command(made, tmp_path, case):
    edit, names = MANIFEST_CASES[case]
    root = copy_of(made, tmp_path)
    edit_manifest(root, edit)
    before = tree_digest(root)
    for command, args in (("verify", ["verify", root]), ("inspect", ["inspect", root]),
                          ("train-student", train_args(root, made, tmp_path))):
        result = xkd(*args, timeout=60)
        assert result.returncode == 2, (command, result.stderr)
        said = paragraph(result, command)
        assert f"{root / 'manifest.json'} is not a valid xkd manifest" in said and names in said, (command, said)
    assert nothing_trained(tmp_path / "student")
    assert tree_digest(root) == before
    assert tree_digest(made["sound"]) == made["digest"]


@pytest.mark.parametrize("rows", [HUGE, 16])
def test_a_shard_row_count_the_files_do_not_hold_is_found(made, tmp_path, rows):
    """rows: 10**15 (its per-language count too) is more than its [CLS] vectors' file holds:
    refused with the manifest. 16 fits the files, and inspect no longer believes it either:
    the Parquet footer holds 15."""
    root = copy_of(made, tmp_path)

    def edit(m):
        shard(1)(m)["rows"] = rows
        shard(1)(m)["langs"] = {"en": rows}
    edit_manifest(root, edit)
    inspect, verify = xkd("inspect", root, timeout=60), xkd("verify", root, timeout=60)
    train = xkd(*train_args(root, made, tmp_path), timeout=60)
    if rows == HUGE:
        for command, result in (("inspect", inspect), ("verify", verify), ("train-student", train)):
            assert result.returncode == 2, result.stderr
            assert "`outputs.dense.cls` has dim 32, but the entry of shard 1's 1,000,000,000,000,000 row(s) of it would " \
                "take 64,000,000,000,000,000 bytes" in paragraph(result, command)
    else:
        assert inspect.returncode == 1
        assert "shard 1 is damaged: the manifest counts 16 rows, 00001.parquet holds 15" in paragraph(inspect, "inspect")
        assert verify.returncode == 1 and "shard 00001: it has 15 rows, the manifest says 16" in verify.stderr
        assert train.returncode == 2 and "00001.parquet holds 15" in paragraph(train, "train-student")
    assert nothing_trained(tmp_path / "student")


ZARR = "00002.zarr/hidden.2/zarr.json"


def rows_huge(meta):  # as many rows as chunk rows: one chunk, claimed
    meta["shape"][0] = HUGE
    meta["chunk_grid"]["configuration"]["chunk_shape"][0] = HUGE


def width_huge(meta):
    meta["shape"][1] = 10**9
    meta["chunk_grid"]["configuration"]["chunk_shape"][1] = 10**9


def chunks_huge(meta):
    meta["chunk_grid"]["configuration"]["chunk_shape"][0] = HUGE


@pytest.mark.parametrize("edit", [rows_huge, width_huge, chunks_huge])
def test_a_zarr_json_claiming_more_than_its_chunks_hold_is_refused(made, tmp_path, edit):
    root = copy_of(made, tmp_path)
    edit_zarr_json(root, ZARR, edit)
    before = tree_digest(root)
    train = xkd(*train_args(root, made, tmp_path, "mmkd"), timeout=90)
    assert train.returncode == 2, train.stderr
    said = paragraph(train, "train-student")
    assert "shard 2 is damaged" in said and "hidden.2" in said, said
    verify = xkd("verify", root, timeout=60)
    assert verify.returncode == 1 and "shard 00002: " in verify.stderr and "00002.zarr/hidden.2" in verify.stderr, verify.stderr
    assert tree_digest(root) == before and nothing_trained(tmp_path / "student")


@pytest.mark.parametrize("name, dim, said", [
    # more than the files hold: mmkd sized its heads by it and allocated 128 GB
    ("cls", 10**9, "manifest.json is not a valid xkd manifest: `outputs.dense.cls` has dim 1,000,000,000, but the "
                   "entry of shard 0's 15 row(s) of it would take 30,000,000,000 bytes"),
    ("hidden.2", 10**9, "manifest.json is not a valid xkd manifest: `outputs.dense.hidden.2` has dim 1,000,000,000, "
                        "but the entry of shard 0's 1 word(s) of it would take 2,000,000,000 bytes"),
    # fits the files, but is not what the arrays hold: refused on open, before anything is sized by it
    ("cls", 16, "shard 0 is damaged: shards/00000.zarr/cls/zarr.json gives rows of shape (32,), the manifest's dim (16,)"),
    ("hidden.2", 64, "shard 0 is damaged: shards/00000.zarr/hidden.2/zarr.json gives rows of shape (32,), the "
                     "manifest's dim (64,)"),
])
def test_the_manifests_dense_width_must_be_what_the_zarr_arrays_hold(made, tmp_path, name, dim, said):
    root = copy_of(made, tmp_path)
    edit_manifest(root, lambda m: m["outputs"]["dense"][name].update(dim=dim))
    train = xkd(*train_args(root, made, tmp_path, "mmkd"), timeout=90)
    assert train.returncode == 2, train.stderr
    assert said.replace("shards/", f"{root}/shards/") in paragraph(train, "train-student")
    assert nothing_trained(tmp_path / "student")


def oversized_config(directory: Path, **sizes) -> Path:
    config = json.loads((directory / "config.json").read_text())
    config.update(sizes)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


OVERSIZED = [{"vocab_size": 10**9}, {"hidden_size": 10**6, "intermediate_size": 10**6}, {"num_hidden_layers": 10**6},
             {"num_labels": 10**9}, {"max_position_embeddings": 10**9}, {"intermediate_size": 10**9}]


@pytest.mark.parametrize("sizes", OVERSIZED)
def test_a_config_json_describing_more_than_its_weights_is_refused_before_building(made, tmp_path, sizes):
    """A teacher's (cache-teachers, on the client; build-vocab) and a checkpoint's (--init-from)
    config.json. Every size through cache-teachers; build-vocab and --init-from, which call the
    same check (weights.config_size_problem), with the first two sizes (each command is a process
    of its own: a check that failed would allocate in it, not in pytest)."""
    teacher = oversized_config(shutil.copytree(made["teacher"], tmp_path / "teacher"), **sizes)
    result = xkd("cache-teachers", "--teacher", teacher, "--corpus", TATOEBA, "--out", tmp_path / "caches",
                 "--max-pairs", 8, timeout=90)
    assert result.returncode == 2, result.stderr
    said = paragraph(result, "cache-teachers")
    assert f"{teacher / 'config.json'}: its config.json describes a model of at least" in said
    assert "the config does not belong to these weights" in said
    assert not (tmp_path / "caches").exists() or not any((tmp_path / "caches").iterdir())
    if sizes not in OVERSIZED[:2]:
        return
    vocab = xkd("build-vocab", "--teachers", teacher, "--out", tmp_path / "vocab", timeout=90)  # a map row per id
    assert vocab.returncode == 2 and f"{teacher / 'config.json'}: its config.json describes" in \
        paragraph(vocab, "build-vocab")
    assert not (tmp_path / "vocab").exists()
    init = xkd("train-student", "--method", "mlm", "--caches", made["sound"], "--vocab", made["vocab"], "--out",
               tmp_path / "student", "--steps", 2, "--batch-size", 4, "--init-from", teacher, timeout=90)
    assert init.returncode == 2 and "--init-from: " in paragraph(init, "train-student")
    assert nothing_trained(tmp_path / "student")


# Options ------------------------------------------------------------------------------

NOWHERE = "/nonexistent/cache"  # refused before it is looked at: the option's paragraph comes first


@pytest.mark.parametrize("option, said", [
    (["--steps", 10**22], "--steps 10000000000000000000000: give a whole number in [1, "),
    (["--workers", 10**7], "--workers 10000000: 10,000,000 DataLoader worker processes"),
    (["--hidden", 10**6, "--heads", 1], "--hidden 1000000: a student of"),
    (["--layers", 10**9], "--layers 1000000000: a student of"),
    (["--embedding-dim", 10**9], "--embedding-dim 1000000000: a student of"),
    (["--warmup", "1e30", "--steps", 2], "--warmup 1e+30 steps is more than --steps 2"),
    (["--warmup", 3, "--steps", 2], "--warmup 3 steps is more than --steps 2"),
])
def test_train_student_options_are_bounded_before_anything_is_read(made, tmp_path, option, said):
    result = xkd("train-student", "--method", "mlm", "--caches", NOWHERE, "--vocab", made["vocab"],
                 "--out", tmp_path / "student", *option, timeout=60)
    assert result.returncode == 2, result.stderr
    assert said in paragraph(result, "train-student")
    assert nothing_trained(tmp_path / "student")


def test_the_student_size_is_bounded_by_the_machines_memory_once_the_vocab_is_known(made, tmp_path):
    """10**6 fits without the vocab (positions x width: 8 GB) and not with it (30,522 rows more: 490 GB)."""
    assert 8.3e9 < machine_memory() < 490e9, "this case needs a machine with 8.3 to 490 GB"
    result = xkd(*train_args(made["sound"], made, tmp_path), "--embedding-dim", 10**6, timeout=90)
    assert result.returncode == 2, result.stderr
    said = paragraph(result, "train-student")
    gb = f"{machine_memory() / 1e9:,.1f} GB"
    assert said.startswith("xkd train-student: error: --embedding-dim 1000000: a student of") and gb in said
    assert "over a vocab of 30,522 tokens" in said and "Give at most " in said
    assert nothing_trained(tmp_path / "student")


@pytest.mark.parametrize("options, said", [
    (["-o", "head_hidden=100000000"], "--option head_hidden=100000000: --method mmkd's heads"),
    (["-o", "head_out=100000000"], "--option head_out=100000000: --method mmkd's heads"),
])
def test_method_head_widths_are_bounded_by_the_memory_they_imply(made, tmp_path, options, said):
    result = xkd(*train_args(made["sound"], made, tmp_path, "mmkd"), *options, timeout=90)
    assert result.returncode == 2, result.stderr
    message = paragraph(result, "train-student")
    assert said in message and "more than this machine's" in message, message
    assert nothing_trained(tmp_path / "student")


@pytest.mark.parametrize("option", ["mask_seed=100000000000000000000000000000", "max_length=100000000000000000000000"])
def test_a_whole_number_method_option_beyond_int64_is_refused(made, tmp_path, option):
    result = xkd("train-student", "--method", "mlm", "--caches", NOWHERE, "--vocab", made["vocab"],
                 "--out", tmp_path / "student", "-o", option, timeout=60)
    assert result.returncode == 2
    said = paragraph(result, "train-student")
    assert f"--option {option} for --method mlm:" in said and "give" in said


@pytest.mark.parametrize("batch", [ROWS + 1, 100000])
def test_a_batch_larger_than_the_caches_rows_is_refused_naming_the_rows(made, tmp_path, batch):
    args = train_args(made["sound"], made, tmp_path)
    args[args.index("--batch-size") + 1] = batch
    result = xkd(*args, timeout=90)
    assert result.returncode == 2, result.stderr
    said = paragraph(result, "train-student")
    assert f"--batch-size {batch:,}: the caches hold {ROWS} rows in all" in said and f"Give at most {ROWS}." in said
    assert nothing_trained(tmp_path / "student")


@pytest.mark.parametrize("option, said", [
    (["--mask-epochs", 100000000], "--mask-epochs 100000000: give a whole number in [1, 65536]"),
    (["--mask-epochs", 60000], "--mask-epochs 60000: a shard, built in one worker's memory at once"),
    (["--shard-size", 10**12], "--shard-size 1000000000000: a shard, built in one worker's memory at once"),
    (["--workers", 10**7], "--workers 10000000: 10,000,000 local worker processes"),
    (["--seed", 10**30], "--seed 1000000000000000000000000000000: give a whole number in [0, "),
    (["--cpu-threads", 10**6], "--cpu-threads 1000000: give a whole number in [1, 4096]"),  # any scheduler's machine
    (["--cpu-threads", usable_cpus() + 1], f"give a whole number in [1, {usable_cpus()}] (this machine has"),
])
def test_cache_teachers_options_are_bounded_before_anything_is_read(tmp_path, option, said):
    if option[0] == "--mask-epochs" and option[1] == 60000:
        assert 2048 * 2 * 60000 * 512 > machine_memory(), "this case needs a machine with less than 125 GB"
    result = xkd("cache-teachers", "--teacher", tmp_path / "no-teacher", "--corpus", "text:/nonexistent@en",
                 "--out", tmp_path / "caches", *option, timeout=60)
    assert result.returncode == 2, result.stderr
    message = paragraph(result, "cache-teachers")
    assert said in message, message
    assert not (tmp_path / "caches").exists()


def test_the_python_api_bounds_the_same_numbers():
    with pytest.raises(BadInput, match=r"--steps 1e\+22: give a whole number"):
        TrainStudentOptions(method="x", steps=1e22)
    with pytest.raises(BadInput, match="--hidden 1000000: a student of"):
        StudentConfig(hidden=10**6, heads=1)
    with pytest.raises(BadInput, match="--mask-epochs 100000000"):
        cache_teachers(CacheTeachersOptions(teachers=["x"], corpus="text:/nonexistent@en", mask_epochs=10**8))
