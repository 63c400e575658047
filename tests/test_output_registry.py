"""A new dense output kind added in one declaration (xkd/pipeline/outputs.py's registry): this file
declares "mean_last" (the mean of the last layer's states over a row's real tokens, stored as
float32), caches it with the real pipeline, and checks the stored values against the teacher
re-run by transformers. Nothing else in xkd changes for it: the pipeline, the manifest, the
recorded command, the writer and the reader handle it from the declaration."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from transformers import AutoModel

from xkd import open_cache
from xkd.pipeline import CacheTeachersOptions, cache_teachers
from xkd.pipeline.outputs import KINDS, OutputKind, register
from xkd.storage import DenseSpec

from conftest import TATOEBA, VOCABS, build_tiny_bert


def _mean_last(forward, outputs) -> dict:
    mask = forward.attention.unsqueeze(-1).to(forward.base.last_hidden_state.dtype)
    return {"mean_last": (forward.base.last_hidden_state * mask).sum(1) / mask.sum(1)}


@pytest.fixture
def mean_last():
    kind = register(OutputKind(
        "mean_last", wanted=lambda o: "mean_last" in o.extra,
        arrays=lambda o, t: [DenseSpec("mean_last", "row", t.hidden_size, dtype="float32")],
        produce=_mean_last, help="mean of the last layer over real tokens"))
    yield kind
    del KINDS["mean_last"]


def test_a_kind_declared_in_one_place_is_cached_and_read(mean_last, thread_client, tmp_path):
    teacher = build_tiny_bert(tmp_path / "t", VOCABS / "bert-base-uncased.vocab.txt", lowercase=True, seed=4, kind="encoder")
    opts = CacheTeachersOptions(teachers=[str(teacher)], corpus=TATOEBA, out=str(tmp_path / "caches"), sides="src",
                                max_pairs=20, sentence=(), extra_outputs=("mean_last",))
    result = cache_teachers(opts, client=thread_client, log=io.StringIO())
    cache = open_cache(result["caches"][0]["path"])
    assert cache.dense_specs["mean_last"].dtype == "float32" and cache.dense_specs["mean_last"].align == "row"
    manifest = cache.manifest
    assert manifest["view"]["outputs"]["extra"] == ["mean_last"]
    args = manifest["made_by"]["args"]  # the recorded command asks for it again
    assert args[args.index("--output") + 1] == "mean_last"

    model = AutoModel.from_pretrained(teacher).eval()
    rows = list(cache.iter_examples(columns=["input_ids"]))
    assert len(rows) == 20
    for row in rows:
        with torch.inference_mode():
            states = model(input_ids=torch.from_numpy(row["input_ids"].astype(np.int64))[None]).last_hidden_state[0]
        expected = states.mean(0).numpy()
        assert row["mean_last"].dtype == np.float32
        # fp32 on both sides; sums of 32 values of magnitude ~1: rounding of a few ulps
        np.testing.assert_allclose(row["mean_last"], expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_an_unknown_output_is_one_paragraph(tmp_path):
    from typer.testing import CliRunner

    from xkd.cli import app

    result = CliRunner().invoke(app, ["cache-teachers", "--teacher", str(tmp_path / "none"), "--corpus", TATOEBA,
                                      "--out", str(tmp_path / "c"), "--output", "no_such_kind", "--json"])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert "--output no_such_kind: no such output kind" in result.output, result.output


def test_the_built_in_kinds_keep_their_manifests():
    """Declaring the kinds in the registry changed no cache key: the view of each built-in kind is
    what it was (a key names a cache; a changed view would orphan every existing cache)."""
    from xkd.pipeline.teachers import Outputs

    outputs = Outputs(8, (1, 2), "word", ("cls", "pooled"), True, (1,), 128)
    assert json.dumps(outputs.to_json(), sort_keys=True) == json.dumps({
        "topk": 8, "hidden_layers": [1, 2], "hidden_positions": "word", "sentence": ["cls", "pooled"],
        "class_logits": True, "attention_layers": [1], "attention_keys": 128}, sort_keys=True)
