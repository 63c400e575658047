"""cache-teachers' options: one declaration per flag (see xkd/options.py for what a
declaration gives). Light on purpose: the CLI imports it to build its parameters."""

from __future__ import annotations

from dataclasses import dataclass

from ..families import TEACHER_ALIASES
from ..options import check_options, comma_list, option
from ..storage.manifest import MAX_MASK_EPOCHS
from ..storage.schema import TOPK_CODECS
from .outputs import HIDDEN_POSITIONS, SENTENCE_VECTORS

SIDES = ("both", "src", "tgt")
DTYPES = ("auto", "fp16", "bf16", "fp32")
# Torch threads per worker on another scheduler's machines, whose cores the client cannot count:
# more than any one machine has (a huge count dies in every worker's allocator).
MAX_CPU_THREADS = 4096
# Draws per masked position: a shard holds its positions' uniforms (8 bytes each) while it runs.
MAX_SAMPLE_OPTION = 1024


def _layers(text: str | None, flag: str) -> tuple[int, ...]:
    return comma_list(text, flag, cast=int)


def _sentence(text: str | None, flag: str) -> tuple[str, ...] | None:
    if text is None:
        return None
    return comma_list("" if text == "none" else text, flag, SENTENCE_VECTORS)


@dataclass(frozen=True)
class CacheTeachersOptions:
    """The command's options. None means "by teacher kind": masked LMs get top-k (k=8) and
    15% masking; encoders get [CLS] and pooled vectors and no masking; classifiers get class
    logits and no masking."""

    teachers: tuple[str, ...] = option((), "--teacher", required=True, help=f"Alias ({', '.join(TEACHER_ALIASES)}), HF "
                                       "model id or model dir; repeat for several.")
    corpus: str = option(None, "--corpus", required=True, help="A corpus name (sample, opus-en-hi) or spec: text:PATH@LANG, "
                         "labeled:PATH@LANG (text<TAB>label), parallel:SRC@L1,TGT@L2, tsv:PATH@L1,L2, hf:DATASET[:CONFIG].")
    out: str = option("caches", "--out", replay=False, help="Cache root, a directory or an object-store URL "
                      "(s3://bucket/prefix): each teacher's cache is OUT/<teacher>-<key> (default: the workspace's caches/).")
    corpus_files: str | None = option(None, "--corpus-files", help="Read a named hub corpus from local files: SRC,TGT or one "
                                      "TSV (e.g. opus-en-hi offline).")
    split: str = option("train", "--split", help="Split of an hf: dataset.")
    topk: int | None = option(None, "--topk", low=0, whole=True, hint="top logits kept per masked position; 0: none",
                              help="Store the top-k logits and log-normaliser at masked positions (masked LMs; default 8; "
                              "0: off).")
    topk_codec: str = option("fp16", "--topk-codec", choices=TOPK_CODECS,
                             help="How top-k is stored: fp16 (logits, and the log-normaliser in fp32) or q8 (one byte per "
                             "log-probability, at most 24 B per masked position at k=8; docs/pipeline.md gives its error "
                             "bound).")
    sample: int = option(0, "--sample", low=0, high=MAX_SAMPLE_OPTION, whole=True, hint="draws per masked position; 0: none",
                         help="Store N token ids drawn from the teacher's softmax at each masked position, with their "
                         "counts: an unbiased KD target (random-sampling KD; kd_target=sampled). Beside top-k, or instead "
                         "of it with --topk 0. The draws follow --seed.")
    mask_prob: float | None = option(None, "--mask-prob", low=0, high=1, high_open=True, hint="e.g. 0.15; 0: no masking",
                                     help="Masking probability (default 0.15 for masked LMs, 0 otherwise).")
    no_mask: bool = option(False, "--no-mask", replay=False, help="Teachers see unmasked text (same as --mask-prob 0).")
    whole_word: bool = option(False, "--whole-word", help="Mask whole words.")
    mask_epochs: int = option(1, "--mask-epochs", low=1, high=MAX_MASK_EPOCHS, whole=True,
                              hint="a row's mask epoch is stored as uint16", help="Cache this many maskings of each example.")
    seed: int = option(0, "--seed", low=0, high=2**63 - 1, whole=True, help="Seed of the masks and of --sample's draws.")
    max_length: int = option(128, "--max-length", low=3, high=65535, whole=True, hint="tokens per row, specials included",
                             help="Tokens per row, special tokens included.")
    hidden_layers: tuple[int, ...] = option((), "--hidden-layers", typed_as=str | None, parse=_layers,
                                            help="Store hidden states of these layers, e.g. 0,6,12 (0: embeddings).")
    hidden_positions: str = option("all", "--hidden-positions", choices=tuple(HIDDEN_POSITIONS),
                                   help="all | word (first sub-token of each word) | cls.")
    attention_layers: tuple[int, ...] = option((), "--attention-layers", typed_as=str | None, parse=_layers,
                                               help="Store the attention probabilities of these layers (1-based): per "
                                               "token, each head's probabilities over the row's real keys (TinyBERT; large).")
    sentence: tuple[str, ...] | None = option(None, "--sentence", typed_as=str | None, parse=_sentence,
                                              help="Sentence vectors to store: cls,pooled (pooled follows the model's "
                                              "pooling config; default for encoders; 'none': none).")
    class_logits: bool | None = option(None, "--class-logits/--no-class-logits", help="Store class logits (default on for "
                                       "sequence classifiers).")
    extra_outputs: tuple[str, ...] = option((), "--output", help="Store an output kind registered in "
                                            "xkd/pipeline/outputs.py that has no option of its own (repeatable; "
                                            "docs/pipeline.md, \"Adding an output kind\").")
    sides: str = option("both", "--sides", choices=SIDES, help="Parallel corpora: which sides the teacher runs on: src | "
                        "tgt | both.")
    text: bool = option(True, "--text/--no-text", help="Store each row's raw text and its pair's text.")
    min_tokens: int = option(0, "--min-tokens", low=0, whole=True, hint="0: no lower bound", help="Keep records whose every "
                             "side has at least this many whitespace tokens (MMKD: 10).")
    max_tokens: int = option(0, "--max-tokens", low=0, whole=True, hint="0: no upper bound",
                             help="... and at most this many (MMKD: 128; 0: no bound).")
    max_pairs: int = option(0, "--max-pairs", low=0, whole=True, hint="0: no cap", help="Cap the examples of the corpus "
                            "(one language pair) to the first N kept (0: no cap).")
    skip_bad_lines: bool = option(False, "--skip-bad-lines", help="Skip and count invalid UTF-8 or malformed lines instead "
                                  "of stopping.")
    shard_size: int = option(2048, "--shard-size", low=1, whole=True, hint="examples per shard",
                             help="Examples per shard (the unit of work, retry and resume).")
    token_budget: int = option(16384, "--token-budget", low=1, whole=True, hint="padded tokens per batch",
                               help="Padded tokens per batch (rows x longest row; length-bucketed).")
    dtype: str = option("auto", "--dtype", choices=DTYPES, help="Compute dtype: auto (fp16 on CUDA, fp32 on CPU) | fp16 | "
                        "bf16 | fp32.")
    # Where and on how many processes it runs are not recorded in config.yaml: they change
    # nothing in the cache, and a replay on another machine takes that machine's defaults.
    scheduler: str = option("local", "--scheduler", replay=False,
                            help="local (a LocalCluster) or a dask scheduler address tcp://host:port.")
    workers: int | None = option(None, "--workers", replay=False, low=1, whole=True,
                                 hint="local worker processes; leave it out for the default",
                                 help="Local workers (default: one per GPU, else 1).")
    cpu_threads: int | None = option(None, "--cpu-threads", replay=False, low=1, high=MAX_CPU_THREADS, whole=True,
                                     hint="torch threads per worker; leave it out for the default",
                                     help="Torch threads per worker on CPU (default: cores / local workers).")

    def __post_init__(self):
        for name in ("teachers", "extra_outputs", "hidden_layers", "attention_layers"):  # lists from Python callers
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.sentence is not None:
            object.__setattr__(self, "sentence", tuple(self.sentence))
        if self.no_mask:  # --no-mask is --mask-prob 0, recorded as such
            object.__setattr__(self, "mask_prob", 0.0)
            object.__setattr__(self, "no_mask", False)
        for flag, layers in (("--hidden-layers", self.hidden_layers), ("--attention-layers", self.attention_layers)):
            # their range depends on the teacher (TeacherSpec.check_outputs says which)
            bad = [v for v in layers if not isinstance(v, int) or isinstance(v, bool)]
            if bad:
                from ..errors import BadInput

                raise BadInput(f"{flag} {bad}: layers are whole numbers, e.g. {flag} 3,6.")
        check_options(self)
