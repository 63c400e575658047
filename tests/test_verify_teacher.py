"""`xkd verify CACHE --teacher T` (issue 23): a cache re-checked against the teacher that made it.

Real parts throughout: tiny BertForMaskedLM teachers with the real bert-base-uncased vocabulary,
the real MiniLM encoder, caches made by the real pipeline, the real CLI. The right teacher (and a
re-saved copy of it) must pass; another checkpoint of the same architecture, and the right one
with one matrix moved by 1%, must fail, naming a row and an output; a value rewritten in a cache
whose checksums were re-recorded (so that they cannot catch it) must be found.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from xkd.cli import app
from xkd.pipeline.recheck import Tolerances, half_ulp, recheck_cache
from xkd.storage.shard import digest_of

from conftest import PARALLEL, TATOEBA, VOCABS, build_tiny_bert, cache_teacher

pytestmark = pytest.mark.usefixtures("one_torch_thread")
EN_VOCAB = VOCABS / "bert-base-uncased.vocab.txt"


def invoke(*args):
    return CliRunner().invoke(app, ["verify", *map(str, args)])


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def variant(src: Path, out: Path, change=None, **save) -> Path:
    """A copy of teacher `src` saved anew by transformers, its weights changed by `change(model)`."""
    import torch
    from transformers import BertForMaskedLM

    model = BertForMaskedLM.from_pretrained(src)
    if change is not None:
        with torch.no_grad():
            change(model)
    model.save_pretrained(out, **save)
    for f in src.iterdir():
        if f.name != "config.json" and not f.name.endswith(".safetensors"):
            shutil.copy(f, out / f.name)
    return out


def nudge(model) -> None:
    """1% noise (of its own spread) on the output matrix of the second layer's feed-forward block."""
    import torch

    weight = model.bert.encoder.layer[1].output.dense.weight
    weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)) * weight.std() * 0.01)


@pytest.fixture(scope="module")
def setup(thread_client, tmp_path_factory, minilm_dir):
    root = tmp_path_factory.mktemp("verify-teacher")
    right = build_tiny_bert(root / "right", EN_VOCAB, lowercase=True, seed=1, init_range=0.2)
    teachers = {
        "right": right,
        "other": build_tiny_bert(root / "other", EN_VOCAB, lowercase=True, seed=2, init_range=0.2),
        "nudged": variant(right, root / "nudged", nudge),
        "resaved": variant(right, root / "resaved", max_shard_size="1MB"),  # sharded: other files, other hash
        "multi": build_tiny_bert(root / "multi", VOCABS / "bert-base-multilingual-cased.vocab.txt", lowercase=False,
                                 seed=1, init_range=0.2),
        "minilm": minilm_dir,
    }
    caches = root / "caches"
    lines = (PARALLEL / "tatoeba" / "tatoeba.hin-eng.eng").read_text(encoding="utf-8").split("\n")[:16]
    pairs = root / "pairs.tsv"
    pairs.write_text("".join(f"{a}\t{b}\n" for a, b in zip(lines[::2], lines[1::2])), encoding="utf-8")
    return {"root": root, "teachers": teachers, "caches": {
        "mlm": cache_teacher(thread_client, caches, right, TATOEBA, sides="both", max_pairs=12, topk=8, sample=8,
                             hidden_layers=(0, 2), attention_layers=(2,), shard_size=6),
        "q8": cache_teacher(thread_client, caches, right, TATOEBA, sides="src", max_pairs=12, topk=8, topk_codec="q8"),
        # sentence pairs: token types rebuilt from segment_b
        "pairs": cache_teacher(thread_client, caches, right, f"pairs:{pairs}@en", topk=8, hidden_layers=(2,)),
        "minilm": cache_teacher(thread_client, caches, minilm_dir, TATOEBA, sides="src", max_pairs=12, hidden_layers=(6,),
                                hidden_positions="word"),
    }}


STORED = {
    "mlm": {"teacher_loss", "topk_ids", "topk_logits", "lognorm", "sample_ids", "hidden.0", "hidden.2", "attn.2"},
    "q8": {"teacher_loss", "topk_ids", "topk_logits"},  # the log-normaliser is folded into q8's log-probabilities
    "pairs": {"teacher_loss", "topk_ids", "topk_logits", "lognorm", "hidden.2"},
    "minilm": {"teacher_loss", "cls", "pooled", "hidden.6"},
}


def test_inspect_says_how_top_k_and_the_draws_are_stored(setup):
    """The q8 cache holds codes, not logits or a log-normaliser, and says so; the sampled one
    gives N and the seed. Both pass the integrity check."""
    q8 = CliRunner().invoke(app, ["inspect", str(setup["caches"]["q8"])])
    assert q8.exit_code == 0 and "top-k k=8, codec q8" in q8.output, q8.output
    columns = {line.split()[0] for line in q8.output.split("\n")[q8.output.split("\n").index("") + 2:] if line}
    assert "topk_codes" in columns and not {"topk_logits", "lognorm", "sample_ids"} & columns, columns
    sampled = CliRunner().invoke(app, ["inspect", str(setup["caches"]["mlm"])])
    assert sampled.exit_code == 0 and "top-k k=8, codec fp16; sampled N=8, seed 0" in sampled.output, sampled.output
    for name in ("q8", "mlm"):
        assert CliRunner().invoke(app, ["verify", str(setup["caches"][name])]).exit_code == 0


@pytest.mark.parametrize("cache", ["mlm", "q8", "pairs", "minilm"])
def test_the_teacher_that_made_a_cache_passes(setup, cache):
    """Every stored output is compared, every value within its tolerance: exit 0, one summary line."""
    teacher = setup["teachers"]["right" if cache != "minilm" else "minilm"]
    r = invoke(setup["caches"][cache], "--teacher", teacher, "--rows", 16, "--json")
    assert r.exit_code == 0, r.output
    report = last_json(r.stdout)["recheck"]
    assert set(report["outputs"]) == STORED[cache]
    assert report["ok"] and report["rows"] == min(16, report["rows_total"]) and report["weights_sha256"]["same"]
    assert all(o["values"] > 0 and o["worst"]["ratio"] <= 1 for o in report["outputs"].values()), report["outputs"]


@pytest.mark.parametrize("cache", ["mlm", "q8"])
def test_another_checkpoint_of_the_same_architecture_fails_naming_a_row_and_an_output(setup, cache):
    r = invoke(setup["caches"][cache], "--teacher", setup["teachers"]["other"], "--rows", 8, "--json")
    assert r.exit_code == 1, r.output
    first = last_json(r.stdout)["recheck"]["first_difference"]
    assert {"shard", "row", "example_id", "side", "mask_epoch"} <= set(first) and first["output"] in STORED[cache]
    assert first["difference"] > first["tolerance"]
    [paragraph] = r.stderr.strip().splitlines()
    assert f"row {first['row']} of shard {first['shard']} (example {first['example_id']}" in paragraph
    assert f"{first['output']} at " in paragraph and "Traceback" not in r.output


def test_one_matrix_moved_by_one_percent_fails_from_its_layer_on(setup):
    """Noise on the second layer's feed-forward output: the outputs it feeds (hidden.2, the logits)
    differ, those computed before it (the embeddings, layer 2's attention) stay within tolerance,
    so the tolerances are tight enough to tell, not merely loose enough to pass."""
    report = recheck_cache(setup["caches"]["mlm"], str(setup["teachers"]["nudged"]), rows=12)
    assert not report["ok"] and report["differing_rows"] == 12
    ratio = {name: o["worst"]["ratio"] for name, o in report["outputs"].items()}
    assert ratio["hidden.2"] > 10 and ratio["topk_logits"] > 1 and ratio["teacher_loss"] > 1, ratio
    assert ratio["hidden.0"] <= 1 and ratio["attn.2"] <= 1, ratio


def test_a_resaved_copy_of_the_right_weights_passes(setup):
    r = invoke(setup["caches"]["mlm"], "--teacher", setup["teachers"]["resaved"], "--rows", 8)
    assert r.exit_code == 0, r.output
    integrity, summary = r.stdout.strip().splitlines()
    assert "checksums, schema and offsets verified" in integrity and "8 of 24 rows re-run match" in summary
    assert "the teacher's weights hash differently from the manifest's, as a re-saved copy's would" in summary


def rewrite_column(cache: Path, shard: int, column: str, change) -> None:
    """Change one shard's list column with pyarrow, then record the new file's size and sha256 in
    the manifest: a rewrite that checksums cannot catch."""
    path = cache / "shards" / f"{shard:05d}.parquet"
    table = pq.read_table(path)
    values = table[column].combine_chunks()
    flat = values.values.to_numpy(zero_copy_only=False).copy()
    change(flat, values.offsets.to_numpy())
    new = pa.ListArray.from_arrays(values.offsets, pa.array(flat, type=values.type.value_type))
    index = table.schema.get_field_index(column)
    pq.write_table(table.set_column(index, table.schema.field(index), new), path,
                   row_group_size=pq.ParquetFile(path).metadata.row_group(0).num_rows, write_page_checksum=True)
    manifest = json.loads((cache / "manifest.json").read_text())
    record = next(s for s in manifest["shards"] if s["id"] == shard)
    grown = path.stat().st_size - record["files"][path.name][0]
    record["files"][path.name] = [path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest()]
    record["bytes"] += grown
    manifest["totals"]["bytes"] += grown
    record["sha256"] = digest_of(record["files"])
    (cache / "manifest.json").write_text(json.dumps(manifest))


def test_a_stored_value_changed_after_the_fact_is_named(setup, tmp_path):
    """One top-k logit of shard 0's row 1 raised by 0.05 (a dozen fp16 ulps), and in shard 1's row
    0 the first draw's id halved: the checksums agree, the teacher does not."""
    cache = Path(shutil.copytree(setup["caches"]["mlm"], tmp_path / "cache"))

    def raise_logit(flat, offsets):
        flat[offsets[1]] += np.float16(0.05)

    def move_draw(flat, offsets):
        flat[offsets[0]] //= 2  # below the next id, so each position's ids still ascend

    rewrite_column(cache, 0, "topk_logits", raise_logit)
    rewrite_column(cache, 1, "sample_ids", move_draw)
    plain = invoke(cache)
    assert plain.exit_code == 0, plain.output
    r = invoke(cache, "--teacher", setup["teachers"]["right"], "--rows", 1000, "--json")
    assert r.exit_code == 1, r.output
    report = last_json(r.stdout)["recheck"]
    first = report["first_difference"]
    assert (first["shard"], first["row"], first["output"], first["outputs"]) == (0, 1, "topk_logits", ["topk_logits"])
    assert first["where"].startswith("masked position 0 (token ") and abs(first["difference"] - 0.05) < 0.01
    moved = report["outputs"]["sample_ids"]["worst"]
    assert report["differing_rows"] == 2 and (moved["shard"], moved["row"]) == (1, 0) and moved["ratio"] > 1
    assert moved["where"].startswith("masked position 0 (token ") and ", draw 0: id " in moved["where"]


@pytest.mark.parametrize("teacher, said", [
    ("multi", ("cannot have made cache", "its tokenizer's vocabulary has 119,547 ids, the cache's teacher 30,522")),
    ("minilm", ("cannot have made cache", "it is an encoder, the cache's teacher a masked LM")),
    (None, ("is not a directory of a saved model",)),
])
def test_a_teacher_that_cannot_have_made_the_cache_is_refused(setup, teacher, said):
    path = setup["teachers"][teacher] if teacher else setup["root"] / "no-such-teacher"
    r = invoke(setup["caches"]["mlm"], "--teacher", path)
    assert r.exit_code == 2, r.output
    [paragraph] = r.stderr.strip().splitlines()
    assert all(s in paragraph for s in said), paragraph


def test_rerun_options_without_a_teacher_are_refused(setup):
    r = invoke(setup["caches"]["mlm"], "--rows", 8)
    assert r.exit_code == 2 and "--rows applies to the re-run of a teacher" in r.stderr, r.output


def test_half_an_ulp_bounds_fp16_rounding_and_nothing_less_does():
    """The storage term against numpy's own rounding: never exceeded, and reached (within 1%)."""
    x = np.random.default_rng(0).standard_normal(100_000).astype(np.float32) * np.float32(30)
    stored = x.astype(np.float16)
    error = np.abs(stored.astype(np.float64) - x)
    bound = half_ulp(stored)
    assert (error <= bound).all() and (error / bound).max() > 0.99


def test_the_compute_term_counts_stages_up_to_each_output():
    tol = Tolerances(unit=2.0**-24, width=64, layers=4)
    assert [tol.stages(name) for name in ("hidden.0", "hidden.4", "attn.2", "cls", "pooled", "logits")] == [1, 5, 3, 5, 6, 6]
    # λ = sqrt(2 ln(2n / 1e-12)): Higham & Mary's bound holds but for a 1e-12 chance per inner product
    lam = math.sqrt(2 * math.log(2 * 64 / 1e-12))
    assert 7.5 < lam < 8.5
    assert tol.compute("hidden.0", 2.0) == pytest.approx(lam * 2.0**-24 * 8 * 1 * 2.0)
