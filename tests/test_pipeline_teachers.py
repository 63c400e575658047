"""Teacher inference in one process: the device-side reductions against full logits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from xkd.errors import BadInput
from xkd.names import parse_corpus, resolve_teacher
from xkd.pipeline import teachers as teachers_module
from xkd.pipeline.batching import PaddedBatch, length_buckets
from xkd.pipeline.corpus import Cleaning, plan_corpus
from xkd.pipeline.masking import MaskConfig
from xkd.pipeline.run import teacher_slug
from xkd.pipeline.teachers import LoadedTeacher, Outputs, describe_teacher
from xkd.pipeline.work import View, build_rows


@pytest.fixture(scope="module")
def mlm_batch(tiny_teachers):
    spec = describe_teacher(resolve_teacher(str(tiny_teachers["multi"])))
    teacher = LoadedTeacher(spec, "cpu", "fp32")
    view = View(64, MaskConfig(prob=0.3, seed=1), "both", Outputs(topk=5), True, "fp32")
    plan = plan_corpus(parse_corpus("sample"), Cleaning(), 20)
    rows = build_rows(plan.shards[0].examples(), plan.langs, True, view, teacher)
    [everything] = length_buckets(np.array([len(r) for r in rows.input_ids]), 10**6)
    batch = PaddedBatch.build(everything, rows.input_ids, rows.word_start, rows.positions, rows.labels, rows.pad_id)
    with torch.inference_mode():
        full = teacher.model(input_ids=torch.from_numpy(batch.input_ids),
                             attention_mask=torch.from_numpy(batch.attention_mask)).logits
    logits = full[torch.from_numpy(batch.masked_rows), torch.from_numpy(batch.masked_cols)].float()
    return teacher, view, batch, logits


def check_against_full_logits(result, logits, batch):
    np.testing.assert_allclose(result["lognorm"], torch.logsumexp(logits, -1).numpy(), rtol=1e-6, atol=1e-5)
    top = logits.topk(5, dim=-1)
    np.testing.assert_allclose(result["topk_logits"].astype(np.float32), top.values.half().float().numpy(), rtol=1e-3, atol=1e-3)
    # The ids' true logits are the stored values: a valid top-5 (ties may order differently).
    at_ids = logits.gather(1, torch.from_numpy(result["topk_ids"].astype(np.int64))).numpy()
    np.testing.assert_allclose(result["topk_logits"].astype(np.float32), at_ids, rtol=1e-3, atol=1e-3)
    per_position = torch.logsumexp(logits, -1) - logits.gather(1, torch.from_numpy(batch.labels)[:, None])[:, 0]
    rows = batch.masked_rows
    expected = np.array([per_position.numpy()[rows == r].mean() if (rows == r).any() else np.nan
                         for r in range(len(batch.rows))], dtype=np.float32)
    np.testing.assert_allclose(result["teacher_loss"], expected, rtol=1e-5, atol=1e-5)


def test_masked_position_head_in_small_chunks_equals_full_logits(mlm_batch, monkeypatch):
    teacher, view, batch, logits = mlm_batch
    assert batch.masked_rows.size > 20
    monkeypatch.setattr(teachers_module, "LOGIT_CHUNK_ELEMENTS", teacher.spec.model_vocab_size * 7)
    check_against_full_logits(teacher.infer(batch, view.outputs), logits, batch)


def test_models_without_a_single_head_module_use_full_logits(mlm_batch):
    teacher, view, batch, logits = mlm_batch
    head, teacher.head = teacher.head, None
    try:
        check_against_full_logits(teacher.infer(batch, view.outputs), logits, batch)
    finally:
        teacher.head = head


def test_teacher_kind_pooling_and_identity(tiny_teachers, minilm_dir):
    en = describe_teacher(resolve_teacher(str(tiny_teachers["en"])))
    minilm = describe_teacher(resolve_teacher("minilm"))
    assert (en.kind, en.pooling["mode"], en.lowercase) == ("mlm", "mean", True)
    assert (minilm.kind, minilm.hidden_size, minilm.num_layers) == ("encoder", 384, 6)
    assert minilm.pooling == {"mode": "mean", "normalize": True, "from": "1_Pooling/config.json"}
    assert minilm.special_ids == {"pad": 0, "unk": 100, "cls": 101, "sep": 102, "mask": 103}
    # The identity ignores how the teacher was named: an alias and its directory share caches.
    assert describe_teacher(resolve_teacher(str(minilm_dir))).identity() == minilm.identity()
    assert en.identity() != describe_teacher(resolve_teacher(str(tiny_teachers["multi"]))).identity()


def test_teacher_slugs_name_cache_directories():
    assert teacher_slug("bert-base") == "bert-base"
    assert teacher_slug("google/muril-base-cased") == "google--muril-base-cased"
    assert teacher_slug("/models/my teacher/") == "my-teacher"


@pytest.mark.parametrize("mode, normalize", [("cls", True), ("max", False), ("mean_sqrt_len_tokens", True)])
def test_a_sentence_transformers_6_pooling_is_read(tiny_teachers, tmp_path, mode, normalize):
    """sentence-transformers 6 writes one `pooling_mode` key, not the boolean flags of 5: each
    mode is read as the model's own, and its vector is the one sentence-transformers encodes."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Normalize, Pooling, Transformer

    body = Transformer(str(tiny_teachers["en"]))
    modules = [body, Pooling(body.get_embedding_dimension(), pooling_mode=mode)] + ([Normalize()] if normalize else [])
    model = SentenceTransformer(modules=modules, device="cpu")
    model.save(str(tmp_path / "st"))
    assert "pooling_mode" in json.loads((tmp_path / "st" / "1_Pooling" / "config.json").read_text())

    spec = describe_teacher(resolve_teacher(str(tmp_path / "st")))
    assert spec.pooling == {"mode": mode.removesuffix("_tokens"), "normalize": normalize, "from": "1_Pooling/config.json"}
    teacher = LoadedTeacher(spec, "cpu", "fp32")
    texts = ["the cat sat on the mat", "a dog", "rain falls on the quiet hills today"]
    encoded = teacher.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        base = teacher.model.base_model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"])
        ours = teacher.pool(base, encoded["attention_mask"])
    theirs = model.encode(texts, convert_to_tensor=True)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5 * float(theirs.abs().max()))


@pytest.mark.parametrize("mode", ["weightedmean", ["mean", "max"]])
def test_a_pooling_xkd_does_not_compute_is_refused(tiny_teachers, tmp_path, mode):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Pooling, Transformer

    body = Transformer(str(tiny_teachers["en"]))
    SentenceTransformer(modules=[body, Pooling(body.get_embedding_dimension(), pooling_mode=mode)],
                        device="cpu").save(str(tmp_path / "st"))
    with pytest.raises(BadInput, match="1_Pooling/config.json: this model pools a sentence by .*which xkd does not compute"):
        describe_teacher(resolve_teacher(str(tmp_path / "st")))
