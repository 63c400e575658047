"""The MBLM student (xkd/student/mblm.py): equivalence with BERT when branches are copies,
distinct branches and mixers against an independent implementation of eqs. 7-12
of Cross-Lingual Text Classification with Multilingual Distillation and Zero-Shot-Aware
Training (Yang et al., 2022) (values and gradients), zero-shot-aware detaching, the mixers,
save/load through the Auto classes, from_bert."""

from __future__ import annotations

import copy

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

from xkd.errors import BadInput
from xkd.student.mblm import (
    ZERO_SHOT,
    BranchMixer,
    MBLMConfig,
    MBLMForMaskedLM,
    MBLMForSequenceClassification,
    MBLMModel,
)

from conftest import VOCABS, build_tiny_bert

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


# (2) distinct branches against an independent implementation of Yang et al. (2022) eqs. 7-12 -----
#
# The reference below is written from the paper, not from mblm.py. It reuses only plain BERT modules
# of the model (the embeddings, one BertLayer per branch layer, the shared layers, the pooler's dense
# layer and the heads) and reads the mixers' trainable vectors; the branch routing, the mixers, the
# detaching of eq. 8 and the supervised / zero-shot handling are its own.

def distinct_mblm(model_class, languages, branch_layers, seed):
    """An MBLM from a random BERT whose branches then get distinct random weights and whose mixer
    submodules get distinct, far-from-uniform vectors. No dropout, so training mode is deterministic."""
    torch.manual_seed(seed)
    bert_class = BertForSequenceClassification if model_class is MBLMForSequenceClassification else BertForMaskedLM
    bert = bert_class(BertConfig(**TINY, **NO_DROPOUT, initializer_range=0.2))
    model = model_class.from_bert(bert, languages, branch_layers=branch_layers)
    with torch.no_grad():
        for branch in model.mblm.branches:
            for parameter in branch.parameters():
                parameter.add_(torch.randn_like(parameter), alpha=0.2)
        randomise_mixers(model.mblm, scale=0.5)
    # every branch differs from every other in every tensor, and so does every mixer vector
    mblm = model.mblm
    for a in range(len(languages)):
        for b in range(a):
            assert all(not torch.equal(p, q) for p, q in zip(mblm.branches[a].parameters(),
                                                            mblm.branches[b].parameters()))
    for mixer in [*mblm.inner_mixers, mblm.outer_mixer]:
        v = mixer.position_weights
        assert all(not torch.equal(v[a], v[b]) for a in range(len(v)) for b in range(a))
    return model


def additive_attention_mask(mask):
    """BERT's extended attention mask: 0 for real tokens, the most negative float for padding."""
    return (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min


def paper_mixing_weights(v, branch_outputs, mask):
    """Eqs. 10-11 for one mixer submodule with trainable vector v. branch_outputs: H~(1..N_sp), each
    [B, n, d]. h(l) = v . H~(l), a dot product over the n positions giving one score per feature
    (padding positions left out, the choice docs/mblm.md states); w = softmax over the languages.
    -> [N_sp, B, d]"""
    n = mask.shape[1]
    v_tokens = v[:n].unsqueeze(0) * mask.float()  # [B, n]: v over this batch's real positions
    scores = torch.stack([(v_tokens.unsqueeze(-1) * H).sum(dim=1) for H in branch_outputs])  # eq. 10
    return torch.softmax(scores, dim=0)  # eq. 11: along the language dimension, feature by feature


def paper_mixer_submodule(v, branch_outputs, mask):
    """Eq. 12: the submodule's output, sum_l H~(l) (.) w(l)."""
    weights = paper_mixing_weights(v, branch_outputs, mask)
    return sum(H * w.unsqueeze(1) for H, w in zip(branch_outputs, weights))


def eq8_detach(H, branch, example_branches):
    """Eq. 8 per example: the output of `branch` is cut from the graph for every example whose
    language is another supervised language; zero-shot examples (no branch) keep every branch."""
    return torch.stack([row if k in (branch, ZERO_SHOT) else row.detach() for row, k in zip(H, example_branches)])


def paper_forward(model, ids, mask, languages_per_example, training):
    """(logits, hidden states) of an MBLM computed from eqs. 7-12."""
    mblm, languages, K = model.mblm, model.config.branch_languages, model.config.branch_layers
    n_sp = len(languages)
    example_branches = [languages.index(x) if x in languages else ZERO_SHOT for x in languages_per_example]
    attention = additive_attention_mask(mask)
    H0 = mblm.embeddings(input_ids=ids)
    hidden_states = [H0]
    branch_inputs = [H0] * n_sp  # H_0^(l) = H_0 for every supervised language l
    for i in range(K):
        # eq. 7: H~_i^(l) = Transformer_i^(l)(H_{i-1}^(l)), then eq. 8 while training
        H_tilde = [mblm.branches[l][i](branch_inputs[l], attention) for l in range(n_sp)]
        if training:
            H_tilde = [eq8_detach(H, l, example_branches) for l, H in enumerate(H_tilde)]
        if i < K - 1:  # eq. 9, inner mixer i: submodule M^(l) gives the input of branch l's next layer
            v = mblm.inner_mixers[i].position_weights
            branch_inputs = [paper_mixer_submodule(v[l], H_tilde, mask) for l in range(n_sp)]
            hidden_states.append(sum(branch_inputs) / n_sp)  # the documented report: mean of the inputs
        else:  # eq. 9, outer mixer: its one submodule feeds the shared layers
            H = paper_mixer_submodule(mblm.outer_mixer.position_weights[0], H_tilde, mask)
            hidden_states.append(H)
    for layer in mblm.shared_layers:
        H = layer(H, attention)
        hidden_states.append(H)
    if isinstance(model, MBLMForSequenceClassification):
        logits = model.classifier(torch.tanh(mblm.pooler.dense(H[:, 0])))  # BERT's pooler + classifier
    else:
        logits = model.cls(H)
    return logits, hidden_states


def assert_close_at_scale(actual, expected, rtol=1e-5):
    """Equal up to float32 rounding: rtol relative to each value and to the tensor's magnitude."""
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * float(expected.abs().max()))


def per_example(lang, size):
    return [lang] * size if isinstance(lang, str) else list(lang)


def lang_cases(languages):
    """A supervised batch for every branch, mixed batches (with and without a zero-shot example)
    and a zero-shot batch ('de' has no branch in any layout here)."""
    first, last = languages[0], languages[-1]
    return [*languages, [first, last, last, first], [last, "de", first, last], "de"]


DISTINCT_LAYOUTS = [
    pytest.param(MBLMForSequenceClassification, LANGS, 3, id="cls-3langs-K3"),
    pytest.param(MBLMForSequenceClassification, ["en", "fr"], 1, id="cls-2langs-K1"),
    pytest.param(MBLMForMaskedLM, ["en", "zh"], 2, id="mlm-2langs-K2"),
    pytest.param(MBLMForMaskedLM, LANGS, 4, id="mlm-3langs-K4-no-shared-layers"),
]


@pytest.mark.parametrize("model_class, languages, branch_layers", DISTINCT_LAYOUTS)
def test_distinct_branches_match_the_paper_equations(model_class, languages, branch_layers):
    model = distinct_mblm(model_class, languages, branch_layers, seed=20).eval()
    ids, mask = batch(seed=21)
    with torch.no_grad():
        for lang in lang_cases(languages) + [None]:
            got = model(ids, attention_mask=mask, lang=lang, output_hidden_states=True)
            logits, hidden = paper_forward(model, ids, mask, per_example(lang or "de", len(ids)), training=False)
            assert_close_at_scale(got.logits, logits)
            assert len(got.hidden_states) == len(hidden) == TINY["num_hidden_layers"] + 1
            for mine, theirs in zip(got.hidden_states, hidden):
                assert_close_at_scale(mine, theirs)

        # the setting can tell wirings apart: the first mixer's weights are far from uniform, and
        # (with inner mixers, which are not symmetric in the branches) exchanging two branches moves
        # the logits by far more than the tolerance above
        first = model.mblm.inner_mixers[0] if branch_layers > 1 else model.mblm.outer_mixer
        H0 = model.mblm.embeddings(input_ids=ids)
        outputs = [branch[0](H0, additive_attention_mask(mask)) for branch in model.mblm.branches]
        weights = torch.stack([paper_mixing_weights(v, outputs, mask) for v in first.position_weights])
        assert float(weights.max() - weights.min()) > 0.5
        if branch_layers > 1:
            swapped = copy.deepcopy(model)
            swapped.mblm.branches[0], swapped.mblm.branches[1] = swapped.mblm.branches[1], swapped.mblm.branches[0]
            reference = model(ids, attention_mask=mask).logits
            assert float((swapped(ids, attention_mask=mask).logits - reference).abs().max()) > \
                1e3 * 1e-5 * float(reference.abs().max())


def gradients(model):
    return {name: torch.zeros_like(p) if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("model_class, languages, branch_layers", DISTINCT_LAYOUTS)
def test_distinct_branches_gradients_follow_eq8(model_class, languages, branch_layers):
    """In training, every parameter's gradient equals the one through the paper's graph (eq. 8 per
    example); a branch gets a gradient exactly when the batch holds an example of its language or a
    zero-shot example."""
    model = distinct_mblm(model_class, languages, branch_layers, seed=22).train()
    ids, mask = batch(seed=23)
    with torch.no_grad():
        probe = torch.randn(model(ids, attention_mask=mask).logits.shape, generator=torch.Generator().manual_seed(24))
    for lang in lang_cases(languages):
        model.zero_grad(set_to_none=True)
        logits = model(ids, attention_mask=mask, lang=lang).logits
        (logits * probe).sum().backward()
        got = gradients(model)

        model.zero_grad(set_to_none=True)
        expected_logits, _ = paper_forward(model, ids, mask, per_example(lang, len(ids)), training=True)
        (expected_logits * probe).sum().backward()
        expected = gradients(model)

        assert_close_at_scale(logits.detach(), expected_logits.detach())
        assert got.keys() == expected.keys()
        # float32 rounding relative to each tensor's scale, plus a floor at the scale of the largest
        # gradient for tensors whose exact gradient is zero (attention key biases: softmax ignores them)
        largest = max(float(g.abs().max()) for g in expected.values())
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=2e-5,
                                       atol=2e-5 * float(expected[name].abs().max()) + 1e-6 * largest,
                                       msg=lambda m, name=name, lang=lang: f"{name}, lang={lang}: {m}")
        example_langs = per_example(lang, len(ids))
        for branch_id, language in enumerate(languages):
            trained = any(x == language or x not in languages for x in example_langs)
            size = sum(float(got[name].abs().sum()) for name in got if name.startswith(f"mblm.branches.{branch_id}."))
            assert (size > 0) == trained, f"lang={lang}: branch {language} gradient {size}"


def test_detached_branches_still_shape_the_forward_values():
    """A batch in French trains only the French branch, yet the other branches' outputs are mixed
    into its forward pass: changing them changes the training-mode logits."""
    model = distinct_mblm(MBLMForSequenceClassification, LANGS, 2, seed=25).train()
    ids, mask = batch(seed=26)
    fr = LANGS.index("fr")
    model.zero_grad(set_to_none=True)
    out = model(ids, attention_mask=mask, lang="fr").logits
    out.sum().backward()
    logits = out.detach()
    for branch_id, branch in enumerate(model.mblm.branches):
        assert (grad_size(branch.parameters()) > 0) == (branch_id == fr)
    for other in [i for i in range(len(LANGS)) if i != fr]:
        changed = copy.deepcopy(model)
        with torch.no_grad():
            for parameter in changed.mblm.branches[other].parameters():
                parameter.add_(torch.randn_like(parameter), alpha=0.1)
            moved = changed(ids, attention_mask=mask, lang="fr").logits
        assert float((moved - logits).abs().max()) > 1e-3 * float(logits.abs().max())


# (3) zero-shot-aware detaching ------------------------------------------------------------------

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


# (4) mixers ---------------------------------------------------------------------------------------

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


# (5) save / load --------------------------------------------------------------------------------

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


# (6) from_bert ----------------------------------------------------------------------------------

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
