"""Teachers: identity, kinds, loading (once per worker process) and batched inference.

Three kinds, read from the checkpoint's config.json `architectures`:
- mlm: a masked LM (…ForMaskedLM / …ForPreTraining); top-k at masked positions;
- classifier: a sequence classifier (…ForSequenceClassification); class logits;
- encoder: anything else (e.g. a sentence-transformers BertModel); hidden states and
  sentence vectors only.
Every kind can store hidden states, [CLS] and pooled sentence vectors.

Inference reduces on the device (docs/design.md, "Stage one", step 3): the encoder runs once;
the masked positions' final hidden states are gathered and only they go through the MLM head
(full-vocabulary logits exist for masked positions only); logsumexp, top-k and the loss are
computed there in fp32; hidden states are gathered at the requested positions and cast to
fp16 before they leave the device.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import BadInput
from ..families import position_offset
from ..names import ResolvedTeacher
from ..sampling import inverse_cdf
from ..segments import takes_token_types
from ..storage import DenseSpec
from ..storage.shard import sha256_file
from ..storage.untrusted import parse_json
from ..weights import config_size_problem, custom_code_problem, safe_load_problem, weights_problem
from .batching import PaddedBatch
from .masking import Vocabulary
from .options import DTYPES
from .outputs import Forward, dense_specs, wanted as wanted_kinds
from .tokenize import load_tokenizer, special_ids, tokenizer_sha256

KINDS = ("mlm", "encoder", "classifier")
WEIGHT_PATTERNS = ("config.json", "*.safetensors", "pytorch_model*.bin", "*.index.json")
MAX_LOADED_TEACHERS = 2  # per worker process; more would crowd GPU memory
LOGIT_CHUNK_ELEMENTS = 1 << 26  # fp32 logits alive at once: 256 MiB


def kind_of(config: dict) -> str:
    archs = config.get("architectures") or []
    if any(a.endswith(("ForMaskedLM", "ForPreTraining")) for a in archs):
        return "mlm"
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "classifier"
    return "encoder"


DAMAGED = ("The teacher directory is damaged or incomplete: save the model again (save_pretrained), or "
           "download it again.")


class TeacherLoadFailed(BadInput):
    """A worker could not build the teacher the client described: every shard would fail the
    same way, so the run stops at once (run.run_on_worker)."""


def read_json(file: Path, what: str) -> object:
    """A JSON file of a teacher directory, or one paragraph naming the file and the line."""
    try:
        return parse_json(file.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInput(f"teacher {what}: {file} is not valid JSON ({e}). {DAMAGED}") from None


def read_config(path: Path, name: str) -> dict:
    """config.json, checked on the client so that a broken one is one paragraph here, not a
    failure in every worker: it parses, transformers knows its model type, and it holds the
    sizes xkd reads. Sizes a family spells its own way (DistilBERT: dim, n_layers, n_heads)
    are returned under the standard names as well."""
    file = path / "config.json"
    custom = custom_code_problem(path)
    if custom is not None:
        raise BadInput(
            f"teacher {name!r}: {custom[0]} asks for the model's own Python code (auto_map: {custom[1]}), which xkd "
            "never runs (it does not pass trust_remote_code), and without it transformers would build another model. "
            "Use a checkpoint of an architecture transformers has built in, saved without auto_map."
        )
    config = read_json(file, repr(name))
    if not isinstance(config, dict):
        raise BadInput(f"teacher {name!r}: {file} holds {type(config).__name__}, not a JSON object. {DAMAGED}")
    if (oversized := config_size_problem(path, config)) is not None:  # before AutoConfig: it allocates num_labels names
        raise BadInput(f"teacher {name!r}: {file}: {oversized}. {DAMAGED}")
    from transformers import AutoConfig

    try:
        spelling = AutoConfig.from_pretrained(str(path)).attribute_map  # standard name -> this family's
    except Exception as e:  # transformers raises several types; all mean "cannot build this model"
        raise BadInput(f"teacher {name!r}: transformers cannot read {file} ({type(e).__name__}: {e}). {DAMAGED}") from None
    for key, own in spelling.items():
        if key not in config and own in config:
            config[key] = config[own]
    for key in ("hidden_size", "num_hidden_layers"):
        value = config.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise BadInput(f"teacher {name!r}: {file} has no usable {key!r} (found {value!r}). {DAMAGED}")
    return config


def check_weight_files(path: Path, name: str) -> None:
    """Every weight file reads as far as can be told without loading it (xkd/weights.py).
    Loading happens in the workers, where a failure would be retried and repeated."""
    found = weights_problem(path)
    if found is not None:
        file, problem = found
        raise BadInput(f"teacher {name!r}: {file} is truncated or damaged: {problem}. {DAMAGED}")
    refused = safe_load_problem(path)
    if refused is not None:
        file, problem = refused
        raise BadInput(f"teacher {name!r}: {file}: {problem}. Save the model as model.safetensors from a copy you "
                       "trust (save_pretrained), or use another checkpoint.")


def weights_sha256(path: Path) -> str:
    """One hash over the config and weight files: a teacher's identity, revision included."""
    files = sorted({f for pattern in WEIGHT_PATTERNS for f in path.glob(pattern) if f.is_file()})
    if not any(f.name != "config.json" for f in files):
        raise BadInput(f"teacher {path}: no weight files (*.safetensors or pytorch_model*.bin) in the directory.")
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}\0{sha256_file(f)}\n".encode())
    return h.hexdigest()


def _weight_names(path: Path) -> list[str]:
    names: list[str] = []
    for f in sorted(path.glob("*.safetensors")):
        from safetensors import safe_open

        with safe_open(str(f), "np") as st:
            names += list(st.keys())
    if not names:
        import torch

        for f in sorted(path.glob("pytorch_model*.bin")):
            names += list(torch.load(f, map_location="cpu", mmap=True, weights_only=True))
    return names


# sentence-transformers' names for the poolings xkd computes (xkd/pooling.py): up to version 5
# a Pooling config sets one boolean `pooling_mode_<name>` key, from version 6 one `pooling_mode`.
ST_POOLING_FLAGS = {"cls_token": "cls", "mean_tokens": "mean", "max_tokens": "max", "mean_sqrt_len_tokens": "mean_sqrt_len"}
ST_POOLING_MODES = {"cls": "cls", "mean": "mean", "max": "max", "mean_sqrt_len_tokens": "mean_sqrt_len"}


def pooling_config(path: Path, kind: str) -> dict:
    """How the model itself pools a sentence: a sentence-transformers directory says so in
    modules.json (Pooling, then Normalize if listed); otherwise BERT's pooler output where
    the loaded model has one, else the mean over the tokens."""
    modules_file = path / "modules.json"
    if modules_file.is_file():
        modules = read_json(modules_file, str(path))
        pooling = next((m for m in modules if m.get("type", "").endswith(".Pooling")), None)
        if pooling is not None:
            config_file = path / pooling["path"] / "config.json"
            cfg = read_json(config_file, str(path))
            named = cfg.get("pooling_mode")
            if named is None:
                modes = [ST_POOLING_FLAGS.get(flag, flag) for flag in
                         (key.removeprefix("pooling_mode_") for key, on in cfg.items() if key.startswith("pooling_mode_") and on)]
            else:
                modes = [ST_POOLING_MODES.get(name, name) for name in ([named] if isinstance(named, str) else named)]
            if len(modes) != 1 or modes[0] not in ST_POOLING_MODES.values():
                raise BadInput(
                    f"{config_file}: this model pools a sentence by {' + '.join(modes) or 'nothing'}, which xkd does "
                    f"not compute; xkd's teachers pool by one of {', '.join(ST_POOLING_MODES.values())}. Save the model "
                    "with one of those Pooling modes, or give the transformer directory alone (without modules.json) "
                    "to cache outputs other than its sentence vector.")
            normalize = any(m.get("type", "").endswith(".Normalize") for m in modules)
            return {"mode": modes[0], "normalize": normalize, "from": f"{pooling['path']}/config.json"}
    # A masked LM loads without its pooler even when the checkpoint has one.
    if kind != "mlm" and any(n.endswith("pooler.dense.weight") for n in _weight_names(path)):
        return {"mode": "pooler", "normalize": False, "from": "the model's pooler"}
    return {"mode": "mean", "normalize": False, "from": "default (mean over tokens)"}


@dataclass(frozen=True)
class Outputs:
    """What to compute and store for a teacher (the outputs part of the cache's view)."""

    topk: int = 0
    hidden_layers: tuple[int, ...] = ()
    hidden_positions: str = "all"
    sentence: tuple[str, ...] = ()
    class_logits: bool = False
    # attn.<L>: per token, heads x attention_keys probabilities (keys zero-padded to the
    # view's max length), so rows of any length share one dense width.
    attention_layers: tuple[int, ...] = ()
    attention_keys: int = 0
    # Kinds registered in outputs.py without options of their own (cache-teachers --output NAME).
    extra: tuple[str, ...] = ()
    # Draws per masked position from the teacher's softmax (xkd/sampling.py); 0: none.
    sample: int = 0
    # How top-k is stored: "fp16" (logits fp16 and the log-normaliser fp32) or "q8" (storage/codec.py).
    topk_codec: str = "fp16"

    def dense_specs(self, teacher: "TeacherSpec") -> dict[str, DenseSpec]:
        """Every dense array, as computed and as stored (outputs.py declares each kind)."""
        return dense_specs(self, teacher)

    def to_json(self) -> dict:
        d = asdict(self)
        # Absent at their defaults, so that the cache keys of every earlier cache stay as they were.
        for name, default in (("sample", 0), ("topk_codec", "fp16")):
            if d[name] == default:
                del d[name]
        if not self.extra:  # absent rather than empty: the cache keys of every earlier cache stay as they were
            del d["extra"]
        else:
            d["extra"] = list(self.extra)
        d["hidden_layers"] = list(self.hidden_layers)
        d["sentence"] = list(self.sentence)
        if not self.hidden_layers:
            d["hidden_positions"] = None
        # Absent rather than empty, so caches without attention keep the keys they always had.
        if self.attention_layers:
            d["attention_layers"] = list(self.attention_layers)
        else:
            del d["attention_layers"], d["attention_keys"]
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Outputs":
        """The outputs a cache's manifest records (view.outputs), as they were asked for."""
        d = {name: value for name, value in d.items() if name in cls.__dataclass_fields__}
        for name in ("hidden_layers", "sentence", "attention_layers", "extra"):
            if name in d:
                d[name] = tuple(d[name] or ())
        if d.get("hidden_positions") is None:
            d.pop("hidden_positions", None)
        return cls(**d)


@dataclass(frozen=True)
class TeacherSpec:
    """Everything a worker needs to load a teacher, and the manifest's teacher block."""

    name: str
    model_id: str
    source: str
    path: str
    kind: str
    weights_sha256: str
    tokenizer_sha256: str
    vocab_size: int  # the tokenizer's
    model_vocab_size: int  # width of the MLM logits (top-k ids range over it)
    special_ids: dict
    hidden_size: int
    num_layers: int
    num_heads: int
    num_labels: int
    max_positions: int
    lowercase: bool
    pooling: dict = field(default_factory=dict)
    labels: list = field(default_factory=list)  # a classifier's class names in id order (id2label)

    def to_json(self) -> dict:
        return asdict(self)

    def identity(self) -> dict:
        """The part of the teacher that changes cached bytes (names and places do not)."""
        return {"kind": self.kind, "weights_sha256": self.weights_sha256,
                "tokenizer_sha256": self.tokenizer_sha256, "pooling": self.pooling}

    def check_outputs(self, outputs: Outputs, max_length: int) -> None:
        """Refuse what this teacher cannot produce, naming the option to change."""
        if outputs.topk and self.kind != "mlm":
            raise BadInput(
                f"teacher {self.name!r} is {'an encoder' if self.kind == 'encoder' else 'a sequence classifier'} "
                f"with no masked-LM head (architectures in config.json: not …ForMaskedLM), so it has no "
                "top-k to cache. Drop --topk (or give --topk 0) for it, or use a masked-LM checkpoint."
            )
        if outputs.sample and self.kind != "mlm":
            raise BadInput(f"teacher {self.name!r} has no masked-LM head (architectures in config.json: not …ForMaskedLM), "
                           "so it has no distribution to draw from. Drop --sample for it, or use a masked-LM checkpoint.")
        if outputs.topk > self.model_vocab_size:
            raise BadInput(f"--topk {outputs.topk} is larger than teacher {self.name!r}'s vocabulary ({self.model_vocab_size}).")
        for kind in wanted_kinds(outputs):
            problem = kind.check(outputs, self)
            if problem:
                raise BadInput(problem)
        if max_length > self.max_positions:
            raise BadInput(f"--max-length {max_length} exceeds teacher {self.name!r}'s {self.max_positions} positions.")


def topk_dtype(outputs: Outputs) -> str:
    """The dtype top-k logits leave the device in: fp16, as stored, or fp32 for the q8 codec."""
    return "float16" if outputs.topk_codec == "fp16" else "float32"


def describe_teacher(resolved: ResolvedTeacher) -> TeacherSpec:
    """Hash and describe a teacher without loading its weights (the client does this)."""
    path = resolved.path
    if path is None:  # online: fetch once into the HF cache so workers read local files
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(resolved.model_id))
        except Exception as e:  # network, auth, missing repo: all mean "cannot get it"
            raise BadInput(f"teacher {resolved.name!r}: downloading {resolved.model_id} failed ({e}).") from None
    # The weight files first: a truncated one is named as such, not as weights the config does not fit
    check_weight_files(path, resolved.name)
    config = read_config(path, resolved.name)
    kind = kind_of(config)
    tokenizer = load_tokenizer(path)
    # RoBERTa and XLM-R: positions start after the padding index
    max_positions = int(config.get("max_position_embeddings", 512)) - position_offset(config.get("model_type"),
                                                                                      config.get("pad_token_id", 1))
    return TeacherSpec(
        name=resolved.name, model_id=resolved.model_id, source=resolved.source, path=str(path), kind=kind,
        weights_sha256=weights_sha256(path), tokenizer_sha256=tokenizer_sha256(path),
        vocab_size=len(tokenizer), model_vocab_size=int(config.get("vocab_size", len(tokenizer))),
        special_ids=special_ids(tokenizer), hidden_size=int(config["hidden_size"]),
        num_layers=int(config["num_hidden_layers"]), num_heads=int(config.get("num_attention_heads", 0)),
        num_labels=int(len(config.get("id2label") or {}) or 0),
        max_positions=max_positions, lowercase=bool(getattr(tokenizer, "do_lower_case", False)),
        pooling=pooling_config(path, kind),
        labels=[str(name) for _, name in sorted((config.get("id2label") or {}).items(), key=lambda kv: int(kv[0]))]
        if kind == "classifier" else [],
    )


def resolve_compute(dtype: str, device_type: str) -> str:
    if dtype not in DTYPES:
        raise BadInput(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}.")
    if dtype == "auto":
        return "fp16" if device_type == "cuda" else "fp32"
    return dtype


# Loaded teachers (worker side) --------------------------------------------------------


class LoadedTeacher:
    def __init__(self, spec: TeacherSpec, device: str, dtype: str):
        import torch
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        self.spec = spec
        self.device = torch.device(device)
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
        auto = {"mlm": transformers.AutoModelForMaskedLM, "classifier": transformers.AutoModelForSequenceClassification,
                "encoder": transformers.AutoModel}[spec.kind]
        self.model = auto.from_pretrained(spec.path, dtype=self.dtype).to(self.device).eval()
        self.base = self.model.base_model
        self.head = None
        if spec.kind == "mlm":
            others = [m for name, m in self.model.named_children() if name != self.model.base_model_prefix]
            # The head alone (applied to masked positions only) where the model is base + one
            # head module, as BERT and XLM-R are; otherwise full logits, then a gather.
            self.head = others[0] if len(others) == 1 else None
        self.tokenizer = load_tokenizer(spec.path)
        specials = np.array(sorted(self.tokenizer.all_special_ids), dtype=np.int64)
        self.vocab = Vocabulary(spec.special_ids["mask"] if spec.special_ids["mask"] is not None else -1,
                                len(self.tokenizer), specials)
        self.pad_id = spec.special_ids["pad"] if spec.special_ids["pad"] is not None else 0
        self.takes_token_types = takes_token_types(self.model.config)

    def infer(self, batch: PaddedBatch, outputs: Outputs) -> dict[str, np.ndarray]:
        """One padded batch -> host arrays: topk_ids (M,k) uint32, topk_logits (M,k) fp16,
        lognorm (M,) fp32 and teacher_loss (B,) fp32 for the M masked positions in row-major
        order; hidden.<l> at the requested positions, cls, pooled, class_logits (fp16)."""
        import torch

        dev = self.device
        with torch.inference_mode():
            inputs = self._model_inputs(batch)
            attention = inputs["attention_mask"]
            kinds = wanted_kinds(outputs)
            want_hidden = any(kind.hidden_states for kind in kinds)
            want_attention = any(kind.attentions for kind in kinds)
            if want_attention:
                self.use_eager_attention()
            base, logits = self._run_model(inputs, want_hidden, want_attention)
            out = self._masked_lm_outputs(batch, inputs, base.last_hidden_state, outputs)
            if kinds:  # the dense outputs, each computed by its declaration (outputs.py), cast on the device
                forward = Forward(base, logits, attention, torch.from_numpy(batch.word_start).to(dev), self.pool)
                dtypes = {spec.name: spec.dtype for spec in dense_specs(outputs, self.spec).values()}
                for kind in kinds:
                    for name, values in kind.produce(forward, outputs).items():
                        out[name] = values.to(getattr(torch, dtypes[name])).cpu().numpy()
        return out

    def _model_inputs(self, batch: PaddedBatch) -> dict:
        """The batch as the model's keyword inputs, on the device. Sentence pairs: token types as
        the teacher's tokenizer would give them (BERT); models without them (RoBERTa, XLM-R) read
        the pair from its template alone."""
        import torch

        inputs = {"input_ids": torch.from_numpy(batch.input_ids).to(self.device, non_blocking=True),
                  "attention_mask": torch.from_numpy(batch.attention_mask).to(self.device, non_blocking=True)}
        if batch.token_type_ids is not None and self.takes_token_types:
            inputs["token_type_ids"] = torch.from_numpy(batch.token_type_ids).to(self.device, non_blocking=True)
        return inputs

    def _run_model(self, inputs: dict, want_hidden: bool, want_attention: bool):
        """(the base model's output, the classifier's logits or None). A classifier runs whole, its
        base's output caught by a hook on the way; other teachers run their base alone."""
        if self.spec.kind == "classifier":
            captured = {}
            hook = self.base.register_forward_hook(lambda _m, _a, out: captured.__setitem__("base", out))
            try:
                logits = self.model(**inputs, output_hidden_states=want_hidden,
                                    output_attentions=want_attention).logits
            finally:
                hook.remove()
            base = captured["base"]
        else:
            logits = None
            base = self.base(**inputs, output_hidden_states=want_hidden, output_attentions=want_attention)
        return base, logits

    def _masked_lm_outputs(self, batch: PaddedBatch, inputs: dict, sequence, outputs: Outputs) -> dict[str, np.ndarray]:
        """topk_ids, topk_logits and lognorm at the masked positions (empty where the teacher is no
        MLM or nothing is masked, when top-k is asked for) and teacher_loss per row (NaN where no
        position is masked)."""
        import torch

        dev = self.device
        out: dict[str, np.ndarray] = {}
        n_rows = inputs["input_ids"].shape[0]
        loss = torch.full((n_rows,), float("nan"), dtype=torch.float32, device=dev)
        if self.spec.kind == "mlm" and batch.masked_rows.size:
            rows = torch.from_numpy(batch.masked_rows).to(dev)
            cols = torch.from_numpy(batch.masked_cols).to(dev)
            labels = torch.from_numpy(batch.labels).to(dev)
            full = None
            if self.head is None:
                full = self.model(**inputs).logits
            picked = sequence[rows, cols] if full is None else None
            # Full-vocabulary logits exist for one chunk of masked positions at a time, so
            # memory stays bounded whatever the batch (mBERT: 0.5 GB per 1,000 positions).
            chunk = max(1, LOGIT_CHUNK_ELEMENTS // self.spec.model_vocab_size)
            parts = {"lognorm": [], "label": [], "values": [], "ids": [], "draws": []}
            uniforms = torch.from_numpy(batch.uniforms).to(dev) if outputs.sample else None
            for start in range(0, rows.numel(), chunk):
                span = slice(start, start + chunk)
                if full is None:
                    mlm_logits = self.head(picked[span]).float()
                else:
                    mlm_logits = full[rows[span], cols[span]].float()
                parts["lognorm"].append(torch.logsumexp(mlm_logits, dim=-1))
                parts["label"].append(mlm_logits.gather(1, labels[span, None]).squeeze(1))
                if outputs.topk:
                    values, ids = mlm_logits.topk(outputs.topk, dim=-1)
                    parts["values"].append(values)
                    parts["ids"].append(ids)
                if outputs.sample:
                    parts["draws"].append(inverse_cdf(mlm_logits, uniforms[span]))
                del mlm_logits
            lognorm = torch.cat(parts["lognorm"])
            per_position = lognorm - torch.cat(parts["label"])
            counts = torch.zeros(n_rows, dtype=torch.float32, device=dev).index_add_(0, rows, torch.ones_like(per_position))
            sums = torch.zeros(n_rows, dtype=torch.float32, device=dev).index_add_(0, rows, per_position)
            loss = torch.where(counts > 0, sums / counts.clamp(min=1), loss)
            if outputs.topk:
                out["topk_ids"] = torch.cat(parts["ids"]).to(torch.int32).cpu().numpy().view(np.uint32)
                # q8 codes are made from the fp32 values (storage/shard.py), not from their fp16 rounding
                out["topk_logits"] = torch.cat(parts["values"]).to(getattr(torch, topk_dtype(outputs))).cpu().numpy()
                out["lognorm"] = lognorm.cpu().numpy()
            if outputs.sample:
                out["sample_draws"] = torch.cat(parts["draws"]).cpu().numpy()
        else:
            if outputs.topk:
                out["topk_ids"] = np.zeros((0, outputs.topk), np.uint32)
                out["topk_logits"] = np.zeros((0, outputs.topk), topk_dtype(outputs))
                out["lognorm"] = np.zeros(0, np.float32)
            if outputs.sample:
                out["sample_draws"] = np.zeros((0, outputs.sample), np.int64)
        out["teacher_loss"] = loss.cpu().numpy()
        return out

    def masked_logits(self, batch: PaddedBatch):
        """Full-vocabulary fp32 logits (M, V), a torch tensor on the device, at the batch's masked
        positions in row-major order, computed as _masked_lm_outputs computes them (`xkd verify
        --teacher` re-ranks, re-normalises and re-draws from them: pipeline/recheck.py). M x V x 4
        bytes at once: the caller keeps M small."""
        import torch

        dev = self.device
        with torch.inference_mode():
            inputs = self._model_inputs(batch)
            rows, cols = torch.from_numpy(batch.masked_rows).to(dev), torch.from_numpy(batch.masked_cols).to(dev)
            if self.head is None:
                return self.model(**inputs).logits[rows, cols].float()
            return self.head(self.base(**inputs).last_hidden_state[rows, cols]).float()

    def use_eager_attention(self) -> None:
        # Fused attention kernels (sdpa, flash) never materialise the probabilities.
        if self.model.config._attn_implementation != "eager":
            self.model.set_attn_implementation("eager")

    def pool(self, base, attention):
        import torch

        from ..pooling import pool_tokens

        mode = self.spec.pooling["mode"]
        if mode == "pooler":
            pooled = base.pooler_output.float()
        else:
            pooled = pool_tokens(base.last_hidden_state.float(), attention, mode)
        if self.spec.pooling.get("normalize"):
            pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
        return pooled


_LOADED: "OrderedDict[tuple, LoadedTeacher]" = OrderedDict()
_LOAD_LOCK = threading.Lock()


def worker_device(device_type: str) -> str:
    """This process's device. Local GPU clusters tell each worker its GPU in XKD_CUDA_DEVICE;
    workers of an existing cluster see theirs as cuda:0 (CUDA_VISIBLE_DEVICES)."""
    if device_type == "cuda":
        return f"cuda:{int(os.environ.get('XKD_CUDA_DEVICE', '0'))}"
    return "cpu"


def get_teacher(spec: TeacherSpec, device: str, dtype: str) -> LoadedTeacher:
    """The process-wide loaded copy of a teacher: loaded on first use, then reused."""
    key = (spec.path, spec.weights_sha256, spec.kind, device, dtype)
    with _LOAD_LOCK:
        teacher = _LOADED.get(key)
        if teacher is None:
            while len(_LOADED) >= MAX_LOADED_TEACHERS:
                _LOADED.popitem(last=False)
                if device.startswith("cuda"):
                    import torch

                    torch.cuda.empty_cache()
            teacher = _LOADED[key] = LoadedTeacher(spec, device, dtype)
        _LOADED.move_to_end(key)
        return teacher

