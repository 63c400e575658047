"""The MBLM student (xkd/student/mblm.py): equivalence with BERT when branches are copies,
zero-shot-aware detaching, the mixers, save/load through the Auto classes, from_bert."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
)

from conftest import VOCABS, build_tiny_bert
from xkd.errors import BadInput
from xkd.student.mblm import (
    ZERO_SHOT,
    BranchMixer,
    MBLMConfig,
    MBLMForMaskedLM,
    MBLMForSequenceClassification,
    MBLMModel,
)

LANGS = ["en", "fr", "zh"]
TINY = dict(vocab_size=120, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=40, num_labels=3)
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def batch(seed=0, size=4, length=12):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, TINY["vocab_size"], (size, length), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, length - 4:] = 0  # one padded row, so masks are exercised
    ids[1, length - 4:] = 0
    return ids, mask


def random_mblm(seed=0, languages=LANGS, branch_layers=2, **overrides):
    """Randomly initialised, so branches differ; mixers randomised too (not uniform)."""
    torch.manual_seed(seed)
    model = MBLMForSequenceClassification(MBLMConfig(**{**TINY, **overrides}, branch_languages=languages,
                                                     branch_layers=branch_layers))
    randomise_mixers(model.mblm)
    return model


def randomise_mixers(mblm: MBLMModel, scale=0.3):
    with torch.no_grad():
        for mixer in [*mblm.inner_mixers, mblm.outer_mixer]:
            mixer.position_weights.normal_(0, scale)


def grad_size(parameters) -> float:
    return sum(float(p.grad.abs().sum()) for p in parameters if p.grad is not None)


# (1) mixing identical branches is the identity ------------------------------------------------

@pytest.mark.parametrize("languages", [["en"], LANGS])
def test_identical_branches_reproduce_bert_classifier(languages):
    torch.manual_seed(1)
    bert = BertForSequenceClassification(BertConfig(**TINY)).eval()
    mblm = MBLMForSequenceClassification.from_bert(bert, languages, branch_layers=2)
    randomise_mixers(mblm.mblm)  # any mix of equal tensors is that tensor
    ids, mask = batch()
    with torch.no_grad():
        expected = bert(ids, attention_mask=mask, output_hidden_states=True)
        for lang in ["en", "de", None, [0, ZERO_SHOT, 0, 0]]:
            got = mblm(ids, attention_mask=mask, lang=lang, output_hidden_states=True)
            torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=1e-5)
            assert len(got.hidden_states) == len(expected.hidden_states) == TINY["num_hidden_layers"] + 1
            for mine, theirs in zip(got.hidden_states, expected.hidden_states):
                torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)


def test_identical_branches_reproduce_bert_masked_lm():
    torch.manual_seed(2)
    bert = BertForMaskedLM(BertConfig(**TINY)).eval()
    with torch.no_grad():
        bert.cls.predictions.bias.normal_()
    mblm = MBLMForMaskedLM.from_bert(bert, LANGS, branch_layers=3)
    randomise_mixers(mblm.mblm)
    ids, mask = batch(seed=3)
    with torch.no_grad():
        torch.testing.assert_close(mblm(ids, attention_mask=mask, lang="fr").logits,
                                   bert(ids, attention_mask=mask).logits, atol=1e-5, rtol=1e-5)
    assert mblm.cls.predictions.decoder.weight is mblm.mblm.embeddings.word_embeddings.weight


# (2) zero-shot-aware detaching ------------------------------------------------------------------

def backward(model, lang, seed=0):
    model.zero_grad(set_to_none=True)
    ids, mask = batch(seed)
    labels = torch.tensor([0, 1, 2, 1])
    out = model(ids, attention_mask=mask, labels=labels, lang=lang)
    out.loss.backward()
    return out


def test_supervised_batch_updates_only_its_branch_and_shared_parts():
    model = random_mblm().train()
    backward(model, "fr")
    mblm = model.mblm
    fr = LANGS.index("fr")
    for branch_id, branch in enumerate(mblm.branches):
        if branch_id == fr:
            assert grad_size(branch.parameters()) > 0
        else:
            assert grad_size(branch.parameters()) == 0, f"branch {LANGS[branch_id]} got a gradient"
    for shared in [mblm.embeddings, mblm.shared_layers, mblm.pooler, model.classifier, mblm.outer_mixer]:
        assert grad_size(shared.parameters()) > 0
    # the inner mixer's submodule feeding branch fr learns; those feeding detached branches do not
    inner_grad = mblm.inner_mixers[0].position_weights.grad
    assert float(inner_grad[fr].abs().sum()) > 0
    assert float(inner_grad[[i for i in range(len(LANGS)) if i != fr]].abs().sum()) == 0


def test_zero_shot_batch_updates_every_branch():
    model = random_mblm().train()
    backward(model, "de")
    for branch in model.mblm.branches:
        assert grad_size(branch.parameters()) > 0
    # every submodule of the inner mixer learns (one row per branch it feeds)
    assert bool((model.mblm.inner_mixers[0].position_weights.grad.abs().sum(dim=1) > 0).all())


def test_detaching_changes_gradients_not_values():
    model = random_mblm(**NO_DROPOUT).train()
    supervised = backward(model, "en")
    shared_grad_supervised = [p.grad.clone() for p in model.mblm.shared_layers.parameters()]
    zero_shot = backward(model, "de")
    shared_grad_zero_shot = [p.grad.clone() for p in model.mblm.shared_layers.parameters()]
    torch.testing.assert_close(supervised.logits, zero_shot.logits)
    with torch.no_grad():
        ids, mask = batch()
        torch.testing.assert_close(model.eval()(ids, attention_mask=mask).logits, supervised.logits)
    # detaching acts below the shared layers only
    for a, b in zip(shared_grad_supervised, shared_grad_zero_shot):
        torch.testing.assert_close(a, b)


def test_mixed_language_batch_detaches_per_example():
    """Each branch's gradient from a mixed batch is the sum of the gradients from the examples
    of its own language (per-example losses summed, no dropout: examples are independent)."""
    model = random_mblm(**NO_DROPOUT).train()
    ids, mask = batch(seed=5)
    labels = torch.tensor([0, 1, 2, 1])
    languages = ["en", "fr", "en", "fr"]

    def branch_grads(rows, lang):
        model.zero_grad(set_to_none=True)
        logits = model(ids[rows], attention_mask=mask[rows], lang=lang).logits
        torch.nn.functional.cross_entropy(logits, labels[rows], reduction="sum").backward()
        return [[None if p.grad is None else p.grad.clone() for p in branch.parameters()]
                for branch in model.mblm.branches]

    mixed = branch_grads([0, 1, 2, 3], languages)
    english = branch_grads([0, 2], "en")
    french = branch_grads([1, 3], "fr")
    for mine, alone in zip(mixed[0], english[0]):
        torch.testing.assert_close(mine, alone, atol=1e-6, rtol=1e-4)
    for mine, alone in zip(mixed[1], french[1]):
        torch.testing.assert_close(mine, alone, atol=1e-6, rtol=1e-4)
    assert all(g is None or float(g.abs().sum()) == 0 for g in mixed[2])  # zh: no example of its own


# (3) mixers ---------------------------------------------------------------------------------------

def test_mixer_weights_follow_the_paper_and_sum_to_one():
    torch.manual_seed(3)
    mixer = BranchMixer(n_outputs=3, max_positions=16)
    with torch.no_grad():
        mixer.position_weights.normal_()
    states = torch.randn(3, 2, 5, 8)  # branches, batch, length, hidden
    token_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        weights = mixer.mixing_weights(states, token_mask)
        mixed = mixer(states, token_mask)
    assert weights.shape == (2, 3, 3, 8)  # batch, outputs, branches, hidden
    torch.testing.assert_close(weights.sum(dim=2), torch.ones(2, 3, 8))
    assert float(weights.min()) > 0
    # eqs. 10-12 for output 1, example 1: h_l = v . H_l over real tokens, softmax over l
    v = mixer.position_weights.detach()[1, :3]
    scores = torch.stack([v @ states[l, 1, :3] for l in range(3)])
    torch.testing.assert_close(weights[1, 1], scores.softmax(dim=0))
    torch.testing.assert_close(mixed[1, 1], sum(states[l, 1] * scores.softmax(dim=0)[l] for l in range(3)))


def test_mixers_start_uniform_and_train():
    model = MBLMForSequenceClassification(MBLMConfig(**TINY, branch_languages=LANGS, branch_layers=3)).train()
    mblm = model.mblm
    assert len(mblm.inner_mixers) == 2 and mblm.outer_mixer.position_weights.shape[0] == 1
    states = torch.randn(3, 2, 6, TINY["hidden_size"])
    weights = mblm.inner_mixers[0].mixing_weights(states, torch.ones(2, 6))
    torch.testing.assert_close(weights, torch.full_like(weights, 1 / 3))

    mixer_params = [p for name, p in model.named_parameters() if "mixer" in name]
    assert len(mixer_params) == 3 and all(p.requires_grad for p in mixer_params)
    before = [p.detach().clone() for p in mixer_params]
    optimiser = torch.optim.SGD(mixer_params, lr=1.0)
    backward(model, "de")
    optimiser.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, mixer_params))


def test_padding_does_not_change_logits():
    # large weights make branches (hence mixes) differ enough that counting pads would show
    model = random_mblm(seed=4, initializer_range=0.3).eval()
    randomise_mixers(model.mblm, scale=1.0)
    ids, mask = batch(seed=6)
    with torch.no_grad():
        short = model(ids[1:2, :8], attention_mask=mask[1:2, :8], lang="zh").logits
        padded = model(ids[1:2], attention_mask=mask[1:2], lang="zh").logits
    torch.testing.assert_close(short, padded, atol=1e-5, rtol=1e-5)


# (4) save / load --------------------------------------------------------------------------------

def test_save_and_auto_load_round_trip(tmp_path):
    model = random_mblm(seed=7).eval()
    model.save_pretrained(tmp_path / "cls")
    config = AutoConfig.from_pretrained(tmp_path / "cls")
    assert isinstance(config, MBLMConfig)
    assert config.branch_languages == LANGS and config.branch_layers == 2 and config.num_labels == 3
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "cls").eval()
    assert isinstance(loaded, MBLMForSequenceClassification)
    ids, mask = batch(seed=8)
    with torch.no_grad():
        for lang in ["fr", "de"]:
            assert torch.equal(loaded(ids, attention_mask=mask, lang=lang).logits,
                               model(ids, attention_mask=mask, lang=lang).logits)
        base = AutoModel.from_pretrained(tmp_path / "cls").eval()
        assert isinstance(base, MBLMModel)
        assert torch.equal(base(ids, attention_mask=mask).pooler_output,
                           model.mblm(ids, attention_mask=mask).pooler_output)


def test_masked_lm_save_and_auto_load_round_trip(tmp_path):
    torch.manual_seed(9)
    model = MBLMForMaskedLM(MBLMConfig(**TINY, branch_languages=LANGS, branch_layers=2)).eval()
    randomise_mixers(model.mblm)
    model.save_pretrained(tmp_path / "mlm")
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path / "mlm").eval()
    assert isinstance(loaded, MBLMForMaskedLM)
    assert loaded.cls.predictions.decoder.weight is loaded.mblm.embeddings.word_embeddings.weight
    ids, mask = batch(seed=10)
    labels = torch.full_like(ids, -100)
    labels[:, 3] = ids[:, 3]
    with torch.no_grad():
        mine, theirs = model(ids, attention_mask=mask, labels=labels), loaded(ids, attention_mask=mask, labels=labels)
    assert torch.equal(mine.logits, theirs.logits) and torch.equal(mine.loss, theirs.loss)
    assert float(mine.loss) > 0


# (5) from_bert ----------------------------------------------------------------------------------

def assert_copied(mblm: MBLMModel, bert, branch_layers: int):
    def same(a, b):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)

    same(mblm.embeddings, bert.embeddings)
    for branch in mblm.branches:
        assert len(branch) == branch_layers
        for i, layer in enumerate(branch):
            same(layer, bert.encoder.layer[i])
    assert len(mblm.shared_layers) == bert.config.num_hidden_layers - branch_layers
    for i, layer in enumerate(mblm.shared_layers):
        same(layer, bert.encoder.layer[branch_layers + i])
    same(mblm.pooler, bert.pooler)
    for mixer in [*mblm.inner_mixers, mblm.outer_mixer]:
        assert not mixer.position_weights.any()
    assert len(mblm.inner_mixers) == branch_layers - 1


def test_from_bert_model_copies_weights_exactly():
    torch.manual_seed(11)
    bert = BertForSequenceClassification(BertConfig(**TINY))
    model = MBLMForSequenceClassification.from_bert(bert, LANGS, branch_layers=3)
    assert not model.training
    assert_copied(model.mblm, bert.bert, 3)
    assert torch.equal(model.classifier.weight, bert.classifier.weight)
    assert torch.equal(model.classifier.bias, bert.classifier.bias)
    # the branches are copies, not shared tensors: training one leaves the others alone
    assert model.mblm.branches[0][0].output.dense.weight.data_ptr() != \
        model.mblm.branches[1][0].output.dense.weight.data_ptr()


def test_from_bert_directory_uses_default_depth(tmp_path):
    directory = build_tiny_bert(tmp_path / "bert", VOCABS / "bert-base-uncased.vocab.txt", lowercase=True,
                                kind="classifier", layers=6, num_labels=3, seed=12)
    model = MBLMForSequenceClassification.from_bert(directory, ["en", "hi"])
    bert = BertForSequenceClassification.from_pretrained(directory)
    assert model.config.branch_layers == 4 and model.config.branch_languages == ["en", "hi"]
    assert_copied(model.mblm, bert.bert, 4)
    assert torch.equal(model.classifier.weight, bert.classifier.weight)
    # a new label count keeps the encoder and starts a fresh head
    relabelled = MBLMForSequenceClassification.from_bert(directory, ["en"], branch_layers=2, num_labels=5)
    assert relabelled.config.num_labels == 5 and relabelled.classifier.out_features == 5
    assert_copied(relabelled.mblm, bert.bert, 2)


# configuration and the lang argument -------------------------------------------------------------

@pytest.mark.parametrize("layout, message", [
    (dict(branch_languages=[]), "needs branch_languages"),
    (dict(branch_languages=["en", "en"]), "twice"),
    (dict(branch_languages=["en"], branch_layers=5), "between 1 and"),
    (dict(branch_languages=["en"], branch_layers=0), "between 1 and"),
])
def test_config_rejects_bad_layouts(layout, message):
    with pytest.raises(BadInput, match=message):
        MBLMConfig(**TINY, **layout)


def test_lang_forms_map_to_branch_ids():
    mblm = random_mblm().mblm
    cpu = torch.device("cpu")
    assert mblm.branch_ids("zh", 2, cpu).tolist() == [2, 2]
    assert mblm.branch_ids("de", 2, cpu).tolist() == [ZERO_SHOT, ZERO_SHOT]
    assert mblm.branch_ids(None, 1, cpu).tolist() == [ZERO_SHOT]
    assert mblm.branch_ids(["fr", "sw", 0], 3, cpu).tolist() == [1, ZERO_SHOT, 0]
    assert mblm.branch_ids(torch.tensor([2, -1]), 2, cpu).tolist() == [2, ZERO_SHOT]
    with pytest.raises(BadInput, match="branch ids"):
        mblm.branch_ids([3], 1, cpu)
    with pytest.raises(BadInput, match="for a batch of 2"):
        mblm.branch_ids(["en"], 2, cpu)
