"""MBLM: the multi-branch multilingual student of Yang et al. (2022, "Cross-Lingual Text
Classification with Multilingual Distillation and Zero-Shot-Aware Training"), as Hugging
Face models.

A BERT (or an XLM-R: `config.family`) whose bottom K transformer layers exist once per
supervised language (a "branch").
Every example goes through every branch. After each branch layer a mixer combines the
branch outputs feature-wise: the inner mixers (layers 1..K-1) give each branch its next
input, the outer mixer (layer K) gives the one input of the shared upper layers (paper,
section "Zero-Shot-Aware Training", eqs. 7-12). In training, the outputs of the branches
that do not match an example's language are detached (eq. 8), so a batch in language k
updates only branch k; examples of a language without a branch (zero-shot) detach nothing.

Importing this module registers the classes with the Auto classes, so a saved MBLM loads
with AutoConfig / AutoModel / AutoModelForSequenceClassification / AutoModelForMaskedLM
once `import xkd.student.mblm` has run. See docs/mblm.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForMaskedLM,
    BertModel,
    PreTrainedModel,
    XLMRobertaModel,
    initialization as init,
)
from transformers.loss.loss_utils import ForSequenceClassificationLoss
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import BaseModelOutputWithPooling, MaskedLMOutput, SequenceClassifierOutput
from transformers.models.bert.modeling_bert import BertEmbeddings, BertLayer, BertOnlyMLMHead, BertPooler
from transformers.models.xlm_roberta.modeling_xlm_roberta import XLMRobertaClassificationHead, XLMRobertaEmbeddings

from ..errors import BadInput

ZERO_SHOT = -1  # branch id of a language that has no branch of its own


class _Parts(NamedTuple):
    encoder: type  # the model MBLM is made from (from_bert)
    embeddings: type
    classifier: type | None  # its sequence-classification head; None: BERT's (pooled [CLS], dropout, linear)


# config.family (a family's name, xkd/families/) -> its parts. Their layers are the same (BertLayer's
# parameters and computation); XLM-R differs in its embeddings (position ids from the pad id,
# one token type) and its classification head (on <s>: dropout, dense, tanh, dropout, out_proj).
PARTS = {"bert": _Parts(BertModel, BertEmbeddings, None),
         "xlm-roberta": _Parts(XLMRobertaModel, XLMRobertaEmbeddings, XLMRobertaClassificationHead)}
FAMILIES = {family: parts.encoder for family, parts in PARTS.items()}

Lang = str | Sequence[str] | Sequence[int] | torch.Tensor | None


class MBLMConfig(BertConfig):
    """A BERT config plus the branch layout.

    branch_languages: the supervised languages, one branch each, in branch-id order.
    branch_layers: K, how many bottom transformer layers are replicated per branch
    (1 <= K <= num_hidden_layers; the paper uses K = 4 of 12).
    family: "bert" (default) or "xlm-roberta", the encoder it is made from: XLM-R's
    embeddings (positions from pad_token_id) and, for classification, XLM-R's head.
    """

    model_type = "xkd-mblm"

    branch_languages: list[str] | None = None
    branch_layers: int = 4
    family: str = "bert"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.family not in FAMILIES:
            raise BadInput(f"MBLMConfig family={self.family!r}: MBLM is made from one of {', '.join(FAMILIES)}.")
        languages = list(self.branch_languages or [])
        if not languages:
            raise BadInput("MBLMConfig needs branch_languages: the supervised languages, one branch each "
                           "(for example ['en', 'fr', 'zh']).")
        if len(set(languages)) != len(languages):
            raise BadInput(f"MBLMConfig branch_languages {languages} names a language twice; give each "
                           "supervised language once.")
        if not 1 <= self.branch_layers <= self.num_hidden_layers:
            raise BadInput(f"MBLMConfig branch_layers={self.branch_layers} must be between 1 and "
                           f"num_hidden_layers={self.num_hidden_layers}: it is how many bottom layers are "
                           "replicated per language branch.")
        self.branch_languages = languages

    def branch_id(self, lang: str) -> int:
        """The branch of `lang`, or ZERO_SHOT (-1) when it has none."""
        languages = self.branch_languages
        return languages.index(lang) if lang in languages else ZERO_SHOT


class BranchMixer(nn.Module):
    """Mixes N branch representations into `n_outputs` representations (paper eqs. 10-12, Fig. 3).

    Output submodule m has a trainable vector v_m over sequence positions. Its score for
    branch l is h_l = v_m . H_l (a dot product over positions, giving one score per hidden
    feature); the mixing weights are softmax over branches, per feature, and the output is
    sum_l w_l * H_l. Padding positions are left out of the dot product so a sequence mixes the
    same however much padding its batch has. v starts at zero: uniform mixing.
    """

    def __init__(self, n_outputs: int, max_positions: int):
        super().__init__()
        self.position_weights = nn.Parameter(torch.zeros(n_outputs, max_positions))

    def mixing_weights(self, branch_states: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        """branch_states [N, B, T, d], token_mask [B, T] (1 = real token) -> weights [B, outputs, N, d]."""
        length = branch_states.shape[2]
        positions = self.position_weights[:, :length].to(branch_states.dtype)
        scores = torch.einsum("ot,bt,nbtd->bond", positions, token_mask.to(branch_states.dtype), branch_states)
        return scores.softmax(dim=2)

    def forward(self, branch_states: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        """-> [outputs, B, T, d]"""
        weights = self.mixing_weights(branch_states, token_mask)
        return torch.einsum("bond,nbtd->obtd", weights, branch_states)


class MBLMPreTrainedModel(PreTrainedModel):
    config: MBLMConfig
    config_class = MBLMConfig
    base_model_prefix = "mblm"
    _supports_sdpa = True
    _supports_attention_backend = True
    _no_split_modules = ["BertEmbeddings", "XLMRobertaEmbeddings", "BertLayer"]

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, BranchMixer):
            init.zeros_(module.position_weights)
        elif isinstance(module, (BertEmbeddings, XLMRobertaEmbeddings)):
            init.copy_(module.position_ids, torch.arange(module.position_ids.shape[-1]).expand((1, -1)))
            init.zeros_(module.token_type_ids)
        elif isinstance(module, BertOnlyMLMHead):
            init.zeros_(module.predictions.bias)

    @classmethod
    def from_bert(cls, bert: PreTrainedModel | str | Path, branch_languages: Sequence[str], branch_layers: int = 4,
                  **config_overrides):
        """An MBLM initialised from a BERT or an XLM-R: embeddings, pooler and upper layers
        copied once, the bottom `branch_layers` layers copied into every branch (paper,
        "Experimental Setup"), mixers uniform. `bert` is such a model or a directory holding
        one; its head is copied too when it matches (a classifier with the same num_labels, a
        masked-LM head). `config_overrides` go to MBLMConfig (e.g. num_labels=3). Returned in
        eval mode, as from_pretrained returns models."""
        source = _load_bert(bert, cls) if isinstance(bert, (str, Path)) else bert
        encoder = _encoder_of(source)
        source_config = source.config.to_dict()
        for key in ("model_type", "architectures", "transformers_version", "_name_or_path"):
            source_config.pop(key, None)
        if "num_labels" in config_overrides:
            source_config.pop("id2label", None)
            source_config.pop("label2id", None)
        config = MBLMConfig(**{**source_config, **config_overrides, "branch_languages": list(branch_languages),
                               "branch_layers": branch_layers, "family": encoder.config.model_type})
        model = cls(config)
        model.mblm.copy_from_bert(encoder)
        model._copy_head_from_bert(source)
        return model.eval()

    def _copy_head_from_bert(self, source: PreTrainedModel) -> None:
        pass


def _load_bert(directory: str | Path, target: type) -> PreTrainedModel:
    config = AutoConfig.from_pretrained(directory)
    if config.model_type not in FAMILIES:
        raise BadInput(f"MBLM.from_bert: {directory} holds a {config.model_type!r} model, not a BERT or an XLM-R; "
                       "MBLM branches are BERT layers, so initialise it from a BERT or XLM-R checkpoint.")
    architectures = set(config.architectures or [])
    if target is MBLMForSequenceClassification and any(a.endswith("ForSequenceClassification") for a in architectures):
        return AutoModelForSequenceClassification.from_pretrained(directory)
    if target is MBLMForMaskedLM and any(a.endswith(("ForMaskedLM", "ForPreTraining")) for a in architectures):
        return AutoModelForMaskedLM.from_pretrained(directory)
    return AutoModel.from_pretrained(directory)


def _encoder_of(source: PreTrainedModel) -> BertModel | XLMRobertaModel:
    encoders = tuple(FAMILIES.values())
    prefix = getattr(source, "base_model_prefix", "")
    encoder = source if isinstance(source, encoders) else getattr(source, prefix, None)
    if not isinstance(encoder, encoders):
        raise BadInput(f"MBLM.from_bert needs a BERT or XLM-R model (BertModel, XLMRobertaModel or one of their "
                       f"*For* head models), got {type(source).__name__}.")
    return encoder


class MBLMModel(MBLMPreTrainedModel):
    """Shared embeddings -> K branch layers with mixers -> shared upper layers (-> pooler)."""

    def __init__(self, config: MBLMConfig, add_pooling_layer: bool = True):
        super().__init__(config)
        n_branches, depth = len(config.branch_languages), config.branch_layers
        # XLM-R's: the same parameters as BERT's, position ids from config.pad_token_id
        self.embeddings = PARTS[config.family].embeddings(config)
        self.branches = nn.ModuleList(
            nn.ModuleList(BertLayer(config, layer_idx=i) for i in range(depth)) for _ in range(n_branches))
        self.inner_mixers = nn.ModuleList(
            BranchMixer(n_branches, config.max_position_embeddings) for _ in range(depth - 1))
        self.outer_mixer = BranchMixer(1, config.max_position_embeddings)
        self.shared_layers = nn.ModuleList(
            BertLayer(config, layer_idx=i) for i in range(depth, config.num_hidden_layers))
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.word_embeddings = value

    def branch_ids(self, lang: Lang, batch_size: int, device: torch.device) -> torch.Tensor:
        """`lang` as one branch id per example (ZERO_SHOT = -1 for languages without a branch).

        lang: None (no language: nothing is detached), a language code for the whole batch,
        a list of codes or of branch ids per example, or a tensor of branch ids."""
        if lang is None:
            return torch.full((batch_size,), ZERO_SHOT, dtype=torch.long, device=device)
        if isinstance(lang, str):
            return torch.full((batch_size,), self.config.branch_id(lang), dtype=torch.long, device=device)
        if isinstance(lang, torch.Tensor):
            ids = lang.to(device=device, dtype=torch.long).reshape(-1)
        else:
            ids = torch.tensor([self.config.branch_id(x) if isinstance(x, str) else int(x) for x in lang],
                               dtype=torch.long, device=device)
        n_branches = len(self.config.branch_languages)
        if ids.numel() != batch_size:
            raise BadInput(f"MBLM forward: lang gives {ids.numel()} languages for a batch of {batch_size} "
                           "examples; pass one language code for the batch or one per example.")
        if ((ids < ZERO_SHOT) | (ids >= n_branches)).any():
            raise BadInput(f"MBLM forward: branch ids in lang must be -1 (zero-shot) or 0..{n_branches - 1} "
                           f"(branches {self.config.branch_languages}); got {sorted(set(ids.tolist()))}.")
        return ids

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        lang: Lang = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if kwargs.get("output_attentions"):
            raise ValueError("MBLM does not return attentions (a branch layer has one per branch).")
        output_hidden_states = output_hidden_states if output_hidden_states is not None else \
            self.config.output_hidden_states
        return_dict = return_dict if return_dict is not None else self.config.return_dict

        hidden = self.embeddings(input_ids=input_ids, position_ids=position_ids, token_type_ids=token_type_ids,
                                 inputs_embeds=inputs_embeds)
        batch_size, length = hidden.shape[:2]
        token_mask = attention_mask if attention_mask is not None else \
            torch.ones(batch_size, length, dtype=torch.long, device=hidden.device)
        layer_mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden,
                                               attention_mask=attention_mask)
        all_hidden = [hidden] if output_hidden_states else None

        hidden = self._branches_forward(hidden, token_mask, layer_mask,
                                        self.branch_ids(lang, batch_size, hidden.device), all_hidden)
        for layer in self.shared_layers:
            hidden = layer(hidden, layer_mask)
            if all_hidden is not None:
                all_hidden.append(hidden)

        pooled = self.pooler(hidden) if self.pooler is not None else None
        hidden_states = tuple(all_hidden) if all_hidden is not None else None
        if not return_dict:
            return tuple(x for x in (hidden, pooled, hidden_states) if x is not None)
        return BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=pooled,
                                          hidden_states=hidden_states)

    def _branches_forward(self, embedded, token_mask, layer_mask, branch_ids, all_hidden):
        """Layers 1..K: every branch, then a mixer, per layer; returns the outer mixer's output.

        Zero-shot-aware training (eq. 8): while training, a branch's layer output is detached for
        the examples whose language is another supervised language. When the whole batch is in
        one supervised language the other branches run under no_grad instead, which is the same
        gradient without keeping their activations."""
        n_branches = len(self.branches)
        detaching = self.training and torch.is_grad_enabled()
        batch_branches = branch_ids.unique().tolist()
        only_branch = batch_branches[0] if detaching and len(batch_branches) == 1 else ZERO_SHOT
        # keeps[l, b]: example b's gradient may flow through branch l
        keeps = (branch_ids == ZERO_SHOT)[None, :] | (branch_ids[None, :] == torch.arange(
            n_branches, device=branch_ids.device)[:, None])
        mixed_batch = detaching and only_branch == ZERO_SHOT and not bool(keeps.all())

        inputs = [embedded] * n_branches
        for depth in range(len(self.branches[0])):
            outputs = []
            for branch_id, branch in enumerate(self.branches):
                frozen = only_branch != ZERO_SHOT and branch_id != only_branch
                with torch.no_grad() if frozen else contextlib.nullcontext():
                    outputs.append(branch[depth](inputs[branch_id], layer_mask))
            stacked = torch.stack(outputs)
            if mixed_batch:
                stacked = torch.where(keeps[:, :, None, None], stacked, stacked.detach())
            if depth < len(self.inner_mixers):
                inputs = list(self.inner_mixers[depth](stacked, token_mask).unbind(0))
                if all_hidden is not None:
                    # one tensor per layer, as BERT reports: the branches' inputs, averaged
                    all_hidden.append(torch.stack(inputs).mean(0))
            else:
                hidden = self.outer_mixer(stacked, token_mask)[0]
                if all_hidden is not None:
                    all_hidden.append(hidden)
        return hidden

    def copy_from_bert(self, bert: BertModel | XLMRobertaModel) -> None:
        """Copy a BertModel's (or an XLMRobertaModel's) weights in (shapes must match the config)."""
        depth = self.config.branch_layers
        if bert.config.model_type != self.config.family:
            raise BadInput(f"MBLM.from_bert: the encoder is a {bert.config.model_type!r} model but the MBLM config's "
                           f"family is {self.config.family!r}.")
        if bert.config.num_hidden_layers != self.config.num_hidden_layers:
            raise BadInput(f"MBLM.from_bert: the BERT has {bert.config.num_hidden_layers} layers but the MBLM "
                           f"config has {self.config.num_hidden_layers}.")
        self.embeddings.load_state_dict(bert.embeddings.state_dict())
        for branch in self.branches:
            for i, layer in enumerate(branch):
                layer.load_state_dict(bert.encoder.layer[i].state_dict())
        for i, layer in enumerate(self.shared_layers):
            layer.load_state_dict(bert.encoder.layer[depth + i].state_dict())
        if self.pooler is not None and bert.pooler is not None:
            self.pooler.load_state_dict(bert.pooler.state_dict())
        with torch.no_grad():
            for mixer in [*self.inner_mixers, self.outer_mixer]:
                mixer.position_weights.zero_()


class _MBLMWithHead(MBLMPreTrainedModel):
    """What every MBLM task model shares: the encoder, then the subclass's head on its output
    (`_logits`) and loss (`_loss`), returned as `_output_class` (or a tuple)."""

    _output_class: type

    def _logits(self, outputs: BaseModelOutputWithPooling) -> torch.Tensor:
        raise NotImplementedError

    def _loss(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        lang: Lang = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput | MaskedLMOutput | tuple:
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.mblm(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                            position_ids=position_ids, inputs_embeds=inputs_embeds, lang=lang,
                            output_hidden_states=output_hidden_states, return_dict=True)
        logits = self._logits(outputs)
        loss = self._loss(labels, logits) if labels is not None else None
        if not return_dict:
            rest = (logits,) + ((outputs.hidden_states,) if outputs.hidden_states is not None else ())
            return ((loss,) + rest) if loss is not None else rest
        return self._output_class(loss=loss, logits=logits, hidden_states=outputs.hidden_states)


class MBLMForSequenceClassification(_MBLMWithHead):
    """MBLM with its family's sequence-classification head: BERT's (pooled [CLS] -> dropout ->
    linear) or XLM-R's (no pooler; <s> -> dropout -> dense -> tanh -> dropout -> out_proj)."""

    _output_class = SequenceClassifierOutput

    def __init__(self, config: MBLMConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        if (head := PARTS[config.family].classifier) is not None:
            self.mblm = MBLMModel(config, add_pooling_layer=False)
            self.classifier = head(config)
        else:
            self.mblm = MBLMModel(config)
            dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
            self.dropout = nn.Dropout(dropout)
            self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def _logits(self, outputs: BaseModelOutputWithPooling) -> torch.Tensor:
        if PARTS[self.config.family].classifier is not None:  # it reads <s> itself
            return self.classifier(outputs.last_hidden_state)
        return self.classifier(self.dropout(outputs.pooler_output))

    def _loss(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return ForSequenceClassificationLoss(labels, logits, self.config)

    def _copy_head_from_bert(self, source: PreTrainedModel) -> None:
        # BertForSequenceClassification or XLMRobertaForSequenceClassification: the family's own head
        config = source.config
        if (type(source).__name__.endswith("ForSequenceClassification") and config.model_type == self.config.family
                and config.num_labels == self.num_labels):
            self.classifier.load_state_dict(source.classifier.state_dict())


class MBLMForMaskedLM(_MBLMWithHead):
    """MBLM with BERT's masked-LM head (decoder tied to the word embeddings), also for the
    xlm-roberta family: XLM-R's head (dense -> gelu -> layer_norm -> decoder + bias) is the same
    function, its weights copied under BERT's names."""

    _tied_weights_keys = {
        "cls.predictions.decoder.weight": "mblm.embeddings.word_embeddings.weight",
        "cls.predictions.decoder.bias": "cls.predictions.bias",
    }
    _output_class = MaskedLMOutput

    def __init__(self, config: MBLMConfig):
        super().__init__(config)
        self.mblm = MBLMModel(config, add_pooling_layer=False)
        self.cls = BertOnlyMLMHead(config)
        self.post_init()

    def get_output_embeddings(self):
        return self.cls.predictions.decoder

    def set_output_embeddings(self, new_embeddings):
        self.cls.predictions.decoder = new_embeddings
        self.cls.predictions.bias = new_embeddings.bias

    def _logits(self, outputs: BaseModelOutputWithPooling) -> torch.Tensor:
        return self.cls(outputs.last_hidden_state)

    def _loss(self, labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits.view(-1, self.config.vocab_size), labels.view(-1))

    def _copy_head_from_bert(self, source: PreTrainedModel) -> None:
        if isinstance(source, BertForMaskedLM):
            self.cls.predictions.transform.load_state_dict(source.cls.predictions.transform.state_dict())
            with torch.no_grad():
                self.cls.predictions.bias.copy_(source.cls.predictions.bias)
        elif type(source).__name__ == "XLMRobertaForMaskedLM":
            if self.config.hidden_act != "gelu":
                raise BadInput(f"MBLM.from_bert: XLM-R's masked-LM head applies gelu, but the config's hidden_act is "
                               f"{self.config.hidden_act!r}, which BERT's head would apply instead.")
            head = source.lm_head
            self.cls.predictions.transform.load_state_dict({
                "dense.weight": head.dense.weight, "dense.bias": head.dense.bias,
                "LayerNorm.weight": head.layer_norm.weight, "LayerNorm.bias": head.layer_norm.bias})
            with torch.no_grad():
                self.cls.predictions.bias.copy_(head.decoder.bias)


AutoConfig.register(MBLMConfig.model_type, MBLMConfig, exist_ok=True)
AutoModel.register(MBLMConfig, MBLMModel, exist_ok=True)
AutoModelForSequenceClassification.register(MBLMConfig, MBLMForSequenceClassification, exist_ok=True)
AutoModelForMaskedLM.register(MBLMConfig, MBLMForMaskedLM, exist_ok=True)

__all__ = ["FAMILIES", "ZERO_SHOT", "BranchMixer", "MBLMConfig", "MBLMForMaskedLM", "MBLMForSequenceClassification",
           "MBLMModel", "MBLMPreTrainedModel"]
