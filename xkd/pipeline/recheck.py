"""`xkd verify CACHE --teacher T`: a finished cache checked against the teacher that made it.

N rows are picked at random (seeded) across the finished shards and read back with their
stored masks (`input_ids` are what the teacher saw, masking applied; sentence pairs' token
types follow from `segment_b`), so nothing is masked again. The teacher runs on them once more
and every output the cache stores is compared with what it gives now: teacher_loss, top-k (ids,
logits, lognorm; or the q8 codec's log-probabilities), sampled draws, and every dense array
(hidden states at their stored positions, attention, sentence vectors, class logits, registered
kinds).

Tolerances. Two runs of one network differ by the rounding of each run, and a stored value
also by its own rounding to the stored dtype; nothing else may differ. So each comparison is

    |stored - recomputed| <= storage rounding + compute error

- Storage rounding: half a unit in the last place of the stored value in its own dtype
  (`np.spacing`; round-to-nearest never moves a value further), e.g. |v| x 2^-11 for fp16. Dense
  outputs come back from the teacher already cast to the stored dtype (on the device, as the
  pipeline casts them), so their re-run side adds its half ulp too. The q8 codec's error is the
  codec's own bound (storage/codec.py: q8_logprob_tolerance), taken at this run's value less its
  compute error, plus that error, as the codec's docstring prescribes for a value so known.
- Compute error, normwise: a forward pass in a dtype of unit roundoff u (fp32 2^-24, fp16 2^-11,
  bf16 2^-8) leaves each output vector y within λ x u x sqrt(n) x s x ||y||_inf of the exact
  one, where n is the hidden size (inner products of length n: Higham & Mary 2019, "A new
  approach to probabilistic rounding error analysis", Theorem 3.1: a sum of n rounded terms is
  within λ sqrt(n) u of exact with probability at least 1 - 2n exp(-λ²/2), so
  λ = sqrt(2 ln(2n / FALSE_ALARM)) bounds one inner product but for a FALSE_ALARM chance, 1e-12:
  λ is 8.2 at n = 256 and 8.4 at n = 1024, and a re-check of a million vectors raises a false
  alarm with probability below 1e-6) and s the stages the value passes through, whose errors add:
  embeddings, then each layer up to its own (hidden.L and attn.L: L + 1; cls: layers + 1), then
  one more for a head (MLM logits, pooling, a classifier, a registered kind: layers + 2). Two
  runs differ by at most the sum of their errors, so u is the cache's compute dtype's
  (manifest view.compute_dtype) plus this run's. ||y||_inf is the re-run's vector's largest
  magnitude: a token's hidden state, a token's attention over heads and keys, a sentence
  vector, a masked position's logits over the whole vocabulary. Measured against this model
  (fp16 and bf16 forward passes against fp32 on CPU): MiniLM's errors are 3u at layer 0 and
  6u at layer 6, where the model allows 20λu and 137λu; a 2-layer, width-32 BERT's 2u at layer 0
  (5.7λu allowed), 6u at layer 2 (17λu) and 8u in the logits (23λu). Without λ (λ = 1) the
  bound is not a bound: over all 2,000 rows of a width-256 BERT's fp32 cache, the teacher that
  made it differed once by 1.04 of it (docs/benchmarks.md, "verify"). In fp32 the compute term
  is 1e-5 to 1e-4 of a vector's scale, about fp16 storage's half ulp, so another checkpoint, or
  one layer's weights moved by 1%, fails (tests/test_verify_teacher.py); in fp16 or bf16 caches
  it is 4,000 or 32,000 times that, and such a small change may pass.

Derived checks (ctol: a masked position's logit tolerance, by the rule above):
- lognorm: logsumexp moves no more than its largest logit: ctol, plus fp32 sums over V terms in
  each run (2 log2(V) u_fp32) and the stored fp32's half ulp.
- teacher_loss (the mean of lognorm - the label's logit): 2 ctol at the row's worst position,
  plus the fp32 sums of both runs (2 (log2(V) + masked positions) u_fp32 x |loss|).
- top-k logits: each stored id's logit in this run against the stored value (ids and values
  together, so ids that swap order between near-equal logits compare as they should).
- top-k ids: no id left out may have a logit above the lowest stored one's by more than 2 ctol
  (each side may move by ctol); ids may tie or swap at the k-th place only within that.
- sampled draws (xkd/sampling.py): each draw's uniform u, paired with the stored ids expanded
  in order, must fall in its id's interval of this run's cumulative distribution:
  cdf(id - 1) - tol <= u x cdf(V - 1) <= cdf(id) + tol. A logit error of ctol moves each
  probability by a factor within exp(+-2 ctol), so each cdf value by at most expm1(2 ctol),
  and each fp32 softmax by SOFTMAX_ROUNDINGS u_fp32; both the bound and u x cdf(V - 1) move,
  hence tol = 2 (expm1(2 ctol) + 2 SOFTMAX_ROUNDINGS u_fp32).

The report names the first row (in cache order) that differs, the first output of it that
differs (in OUTPUT_ORDER, then dense arrays by name), where, the difference and the tolerance;
and the largest difference relative to its tolerance of every output. The teacher's weights'
hash against the manifest's is information only: a re-saved copy of the same weights has
another hash and the same outputs.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import BadInput
from ..names import resolve_teacher
from ..sampling import draw_uniforms, expand
from ..storage.reader import Cache
from .batching import PaddedBatch, length_buckets
from .masking import SIDE_CODES
from .options import DTYPES
from .teachers import LoadedTeacher, Outputs, TeacherSpec, describe_teacher

UNIT_ROUNDOFF = {"fp32": 2.0**-24, "fp16": 2.0**-11, "bf16": 2.0**-8}
FALSE_ALARM = 1e-12  # the chance that one inner product's rounding exceeds the bound (module docstring)


def confidence(n: int) -> float:
    """λ of the probabilistic bound λ sqrt(n) u for inner products of length n (Higham & Mary
    2019, Theorem 3.1: it fails with probability at most 2n exp(-λ²/2) = FALSE_ALARM)."""
    return math.sqrt(2 * math.log(2 * n / FALSE_ALARM))
U32 = UNIT_ROUNDOFF["fp32"]
# Rounded operations per probability in an fp32 softmax: subtracting the maximum, exp, the sum's
# share, the division.
SOFTMAX_ROUNDINGS = 4
DEVICES = ("auto", "cpu", "cuda")
TOKEN_BUDGET = 4096  # padded tokens per re-run batch
LOGIT_ELEMENTS = 1 << 25  # full-vocabulary fp32 logits alive at once (128 MiB), and their fp64 cdf twice that
OUTPUT_ORDER = ("teacher_loss", "topk_ids", "topk_logits", "lognorm", "sample_ids")
KIND_NAMES = {"mlm": "a masked LM", "encoder": "an encoder", "classifier": "a sequence classifier"}


@dataclass(frozen=True)
class Tolerances:
    """The compute error model of the module docstring."""

    unit: float  # the cache's compute dtype's unit roundoff plus this run's
    width: int  # hidden size: the length of the inner products
    layers: int

    def stages(self, output: str) -> int:
        """Embeddings, each layer up to the output's own, then a head where one follows."""
        if output.startswith(("hidden.", "attn.")) and output.split(".", 1)[1].isdigit():
            return int(output.split(".", 1)[1]) + 1
        return self.layers + (1 if output == "cls" else 2)

    def compute(self, output: str, scale):
        return confidence(self.width) * self.unit * math.sqrt(self.width) * self.stages(output) \
            * np.asarray(scale, dtype=np.float64)


@dataclass
class Finding:
    """The largest difference of one output in one row, relative to its tolerance."""

    output: str
    ratio: float  # difference / tolerance; above 1: the row differs
    difference: float
    tolerance: float
    where: str
    stored: float | int | None = None
    recomputed: float | int | None = None
    values: int = 0  # values compared

    def to_json(self) -> dict:
        """Strict JSON: a non-finite number (an inf ratio, a NaN loss) as its name, "inf" or "nan"."""
        return {k: str(v) if isinstance(v, float) and not math.isfinite(v) else v for k, v in dataclasses.asdict(self).items()}


def half_ulp(stored: np.ndarray) -> np.ndarray:
    """Half a unit in the last place of each stored value, in its own dtype (0 for integers)."""
    stored = np.asarray(stored)
    if not np.issubdtype(stored.dtype, np.floating):
        return np.zeros(stored.shape)
    with np.errstate(invalid="ignore"):
        return 0.5 * np.spacing(np.abs(stored)).astype(np.float64)


def ratios(stored, recomputed, tol) -> tuple[np.ndarray, np.ndarray]:
    """(|stored - recomputed|, that / tol), elementwise. Non-finite values compare equal only
    to the same value (fp16 overflows to inf in both runs); a NaN tolerance compares nothing."""
    stored, recomputed = np.asarray(stored), np.asarray(recomputed)
    s, r = stored.astype(np.float64), recomputed.astype(np.float64)
    tol = np.broadcast_to(np.asarray(tol, dtype=np.float64), s.shape)
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(s - r)
        out = np.divide(diff, tol, out=np.where(diff == 0, 0.0, np.inf), where=tol > 0)
        same_cast = stored == recomputed.astype(stored.dtype) if np.issubdtype(stored.dtype, np.floating) else s == r
    odd = ~np.isfinite(s) | ~np.isfinite(r)
    agree = same_cast | (np.isnan(s) & np.isnan(r))
    out[odd] = np.where(agree[odd], 0.0, np.inf)
    diff[odd] = np.where(agree[odd], 0.0, np.inf)
    return diff, out


def worst(output: str, stored, recomputed, tol, where: Callable[[tuple], str]) -> Finding:
    """The element of largest difference / tolerance, located by `where(index)`."""
    stored, recomputed = np.asarray(stored), np.asarray(recomputed)
    if not stored.size:
        return Finding(output, 0.0, 0.0, 0.0, "nothing stored")
    diff, ratio = ratios(stored, recomputed, tol)
    at = np.unravel_index(int(np.nanargmax(np.where(np.isnan(ratio), -1, ratio))), ratio.shape)
    tol_at = float(np.broadcast_to(np.asarray(tol, dtype=np.float64), stored.shape)[at])
    return Finding(output, float(ratio[at]), float(diff[at]), tol_at, where(at), stored[at].item(), recomputed[at].item(),
                   int(stored.size))


# Choosing what runs ------------------------------------------------------------------------


def choose_device(device: str, dtype: str, cache_dtype: str) -> tuple[str, str]:
    """(torch device, compute dtype): CUDA where asked for or, under auto, where there is one;
    fp32 on CPU; on CUDA the cache's own fp16 or bf16 unless --dtype says otherwise."""
    if device not in DEVICES:
        raise BadInput(f"--device must be one of {', '.join(DEVICES)}, not {device!r}.")
    if dtype not in DTYPES:
        raise BadInput(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}.")
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise BadInput("--device cuda: torch sees no CUDA device here. Give --device cpu (or auto).")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = cache_dtype if device == "cuda" and cache_dtype in ("fp16", "bf16") else "fp32"
    return ("cuda:0" if device == "cuda" else "cpu"), dtype


def check_teacher_fits(cache: Cache, spec: TeacherSpec, outputs: Outputs) -> None:
    """Refuse, in one paragraph, a teacher that cannot have made the cache: another kind, vocabulary
    or shape (width, layers, heads), too few positions. Different weights are the re-run's to find."""
    manifest = cache.manifest
    if manifest.get("vocab"):
        source = (manifest["vocab"].get("source_cache") or {}).get("path", "the cache it was made from")
        raise BadInput(f"cache {cache.path} is a union-vocab copy (xkd remap): its ids are in vocab "
                       f"{manifest['vocab'].get('dir')}, not teacher {spec.name!r}'s. Verify {source} against the teacher.")
    made_by = manifest.get("teacher") or {}
    problems = []
    if spec.kind != made_by.get("kind"):
        problems.append(f"it is {KIND_NAMES.get(spec.kind, spec.kind)}, the cache's teacher "
                        f"{KIND_NAMES.get(made_by.get('kind'), made_by.get('kind'))}")
    for key, what in (("vocab_size", "its tokenizer's vocabulary has {} ids"), ("model_vocab_size", "its output "
                      "vocabulary has {} ids"), ("hidden_size", "it is {} wide"), ("num_layers", "it has {} layers"),
                      ("num_heads", "it has {} attention heads")):
        if made_by.get(key) is not None and getattr(spec, key) != made_by[key]:
            problems.append(f"{what.format(f'{getattr(spec, key):,}')}, the cache's teacher {made_by[key]:,}")
    if not problems:
        try:
            spec.check_outputs(outputs, int(manifest["view"]["max_length"]))
        except BadInput as e:
            problems.append(str(e).rstrip("."))
    if not problems:
        for name, mine in outputs.dense_specs(spec).items():
            stored = cache.dense_specs.get(name)
            if stored is not None and (mine.dim, mine.align) != (stored.dim, stored.align):
                problems.append(f"its {name} is {mine.dim} wide ({mine.align}-aligned), the cache's {stored.dim} "
                                f"({stored.align}-aligned)")
    if problems:
        raise BadInput(
            f"teacher {spec.name!r} ({spec.path}) cannot have made cache {cache.path}: {'; '.join(problems)}. The cache "
            f"was made by {made_by.get('name')!r} ({made_by.get('model_id')}); give that teacher (an alias, a hub id or "
            "its directory), or a copy of it.")


def pick_rows(cache: Cache, n: int, seed: int) -> list[tuple[int, int]]:
    """n (shard, row in shard) drawn without replacement across the finished shards, in cache order."""
    shard_ids = cache.shard_ids
    counts = np.array([cache.shard(s)["rows"] for s in shard_ids], dtype=np.int64)
    total = int(counts.sum())
    chosen = np.sort(np.random.default_rng(seed).choice(total, size=min(n, total), replace=False))
    starts = np.concatenate([[0], np.cumsum(counts)])
    where = np.searchsorted(starts, chosen, side="right") - 1
    return [(shard_ids[w], int(c - starts[w])) for w, c in zip(where, chosen)]


def read_rows(cache: Cache, picked: list[tuple[int, int]]) -> list[dict]:
    """Each picked row as Block.example gives it (attention padded per token), with its place."""
    out, blocks = [], {}
    for shard_id, row in picked:
        sizes = np.cumsum(cache.row_groups(shard_id))
        group = int(np.searchsorted(sizes, row, side="right"))
        if (shard_id, group) not in blocks:
            blocks = {(shard_id, group): cache.read_block(shard_id, group)}  # rows come in order: one block at a time
        first = int(sizes[group - 1]) if group else 0
        example = blocks[(shard_id, group)].example(row - first)
        example.update(shard=shard_id, row=row)
        out.append(example)
    return out


def batches(examples: list[dict], vocab: int) -> list[np.ndarray]:
    """Length-bucketed batches, split again so that their masked positions' logits fit LOGIT_ELEMENTS."""
    lengths = np.array([len(e["input_ids"]) for e in examples], dtype=np.int64)
    n_masked = np.array([len(e["masked_positions"]) for e in examples], dtype=np.int64)
    limit = max(1, LOGIT_ELEMENTS // vocab)
    out = []
    for bucket in length_buckets(lengths, TOKEN_BUDGET):
        start, masked = 0, 0
        for i, r in enumerate(bucket):
            if i > start and masked + n_masked[r] > limit:
                out.append(bucket[start:i])
                start, masked = i, 0
            masked += n_masked[r]
        out.append(bucket[start:])
    return out


# Comparing ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What the cache stores that the comparisons need to know."""

    topk: int
    codec: str  # "fp16" or "q8"
    sample: int  # draws per masked position; 0: none
    seed: int  # the masks' seed, which the draws follow
    vocab: int  # the teacher's output vocabulary
    dense: dict  # name -> storage.DenseSpec
    heads: dict  # attention output -> heads
    q8_tolerance: Callable | None = None  # storage/codec.py's, for q8 caches


def stored_draws(row: dict, n: int) -> np.ndarray | None:
    """A row's (masked positions, n) draws, or None where its counts do not sum to n per position."""
    ids, counts = np.asarray(row["sample_ids"]), np.asarray(row["sample_counts"], dtype=np.int64)
    m = len(row["masked_positions"])
    if len(ids) != len(counts) or int(counts.sum()) != m * n or (counts == 0).any():
        return None
    draws = expand(ids, counts, n) if m else np.zeros((0, n), np.int64)
    # each position's counts must end exactly at a multiple of n
    ends = np.cumsum(counts)
    return draws if np.isin(np.arange(1, m + 1) * n, ends).all() else None


def logit_facts(teacher: LoadedTeacher, batch: PaddedBatch, rows: list[dict], plan: Plan) -> dict[str, np.ndarray]:
    """What the comparisons need from this run's full logits at the masked positions (row-major):
    per position the log-normaliser, the largest |logit| and the label's logit; at the stored ids,
    their logits and the largest logit left out; at the stored draws, the cdf before and at each
    id and the total (sampling.inverse_cdf's cdf)."""
    import torch

    z = teacher.masked_logits(batch)
    dev, width = z.device, z.shape[1]
    out = {"lognorm": torch.logsumexp(z, -1), "scale": z.abs().amax(-1),
           "label": z.gather(1, torch.from_numpy(batch.labels).to(dev)[:, None]).squeeze(1)}
    if plan.topk:
        ids = np.concatenate([r["topk_ids"].reshape(-1, plan.topk) for r in rows]).astype(np.int64)
        ids = torch.from_numpy(ids).to(dev).clamp_(max=width - 1)  # ids outside are reported before they are read
        out["at_ids"] = z.gather(1, ids)
        out["left_out"], out["left_out_id"] = z.scatter(1, ids, float("-inf")).max(1)
    if plan.sample:
        draws = [stored_draws(r, plan.sample) for r in rows]
        draws = np.concatenate([d if d is not None else np.zeros((len(r["masked_positions"]), plan.sample), np.int64)
                                for d, r in zip(draws, rows)]).astype(np.int64)
        draws = torch.from_numpy(draws).to(dev).clamp_(0, width - 1)
        cdf = torch.softmax(z, dim=-1).cumsum(-1, dtype=torch.float64)
        out["cdf_at"] = cdf.gather(1, draws)
        out["cdf_below"] = torch.where(draws > 0, cdf.gather(1, (draws - 1).clamp(min=0)), 0.0)
        out["cdf_total"] = cdf[:, -1]
        del cdf
    return {name: value.cpu().numpy() for name, value in out.items()}


def position_where(row: dict, p: int) -> str:
    return f"masked position {p} (token {int(row['masked_positions'][p])})"


def loss_finding(row: dict, facts: dict | None, tol: Tolerances, vocab: int) -> Finding:
    stored = np.asarray([row["teacher_loss"]], dtype=np.float32)
    m = len(row["masked_positions"])
    if facts is None or not m:  # no masked position: NaN in both
        return worst("teacher_loss", stored, np.array([np.nan]), np.zeros(1), lambda at: "the row (nothing masked)")
    recomputed = np.mean(facts["lognorm"].astype(np.float64) - facts["label"])
    ctol = tol.compute("logits", facts["scale"].max())
    sums = 2 * (math.log2(vocab) + m) * U32 * abs(recomputed)
    return worst("teacher_loss", stored, np.array([recomputed]), half_ulp(stored) + 2 * ctol + sums,
                 lambda at: f"the row's mean over {m} masked position{'s' if m > 1 else ''}")


def topk_findings(row: dict, facts: dict, tol: Tolerances, plan: Plan) -> list[Finding]:
    ids, values = np.asarray(row["topk_ids"]).reshape(-1, plan.topk), np.asarray(row["topk_logits"]).reshape(-1, plan.topk)
    lognorm = np.asarray(row["lognorm"])
    ctol = tol.compute("logits", facts["scale"])[:, None]
    sums = 2 * math.log2(plan.vocab) * U32
    bad = next(((p, int(i)) for p, i in zip(*np.nonzero(ids >= plan.vocab))), None)
    repeated = next((p for p in range(len(ids)) if len(set(ids[p].tolist())) < plan.topk), None)
    if bad is not None or repeated is not None:
        problem = (f"id {bad[1]} lies outside the teacher's {plan.vocab:,} ids" if bad is not None
                   else f"ids {ids[repeated].tolist()} repeat one")
        p = bad[0] if bad is not None else repeated
        return [Finding("topk_ids", math.inf, math.inf, 0.0, f"{position_where(row, p)}: {problem}")]
    lowest = facts["at_ids"].argmin(1)
    gap = facts["left_out"] - facts["at_ids"][np.arange(len(ids)), lowest]
    found = [worst("topk_ids", np.maximum(gap, 0), np.zeros(len(gap)), 2 * ctol[:, 0], lambda at: (
        f"{position_where(row, at[0])}: id {int(facts['left_out_id'][at[0]])}, not stored, has logit "
        f"{facts['left_out'][at[0]]:.6g}, above stored id {int(ids[at[0], lowest[at[0]]])}'s "
        f"{facts['at_ids'][at[0], lowest[at[0]]]:.6g}"))]
    found[0].stored = found[0].recomputed = None

    def where(at: tuple) -> str:
        return f"{position_where(row, at[0])}, id {int(ids[at])}"

    if plan.codec == "q8":
        # Decoded log-probabilities (lognorm 0 as read). This run's logp is within eps of the one the
        # cache encoded (the logit's and the lognorm's errors), and the codec bounds its own error at
        # a value known to within eps: q8_logprob_tolerance(logp - eps) + eps (storage/codec.py).
        recomputed = facts["at_ids"].astype(np.float64) - facts["lognorm"][:, None]
        stored = values.astype(np.float64) - lognorm[:, None]
        eps = 2 * ctol + sums
        found.append(worst("topk_logits", stored, recomputed, plan.q8_tolerance(recomputed - eps) + eps, where))
    else:
        found.append(worst("topk_logits", values, facts["at_ids"], half_ulp(values) + ctol, where))
        found.append(worst("lognorm", lognorm, facts["lognorm"], half_ulp(lognorm) + ctol[:, 0] + sums,
                           lambda at: position_where(row, at[0])))
    return found


def sample_finding(row: dict, facts: dict, tol: Tolerances, plan: Plan) -> Finding:
    n, m = plan.sample, len(row["masked_positions"])
    draws = stored_draws(row, n)
    if draws is None:
        counts = np.asarray(row["sample_counts"], dtype=np.int64)
        return Finding("sample_ids", math.inf, math.inf, 0.0, f"the row's sample_counts ({len(counts)} of them, summing to "
                       f"{int(counts.sum())}) are not {m} masked positions' {n} draws each, with their sample_ids")
    uniforms = draw_uniforms(plan.seed, int(row["example_id"]), SIDE_CODES[str(row["side"])], int(row["mask_epoch"]), m, n)
    target = uniforms * facts["cdf_total"][:, None]
    outside = np.maximum(np.maximum(facts["cdf_below"] - target, target - facts["cdf_at"]), 0)
    ctol = tol.compute("logits", facts["scale"])[:, None]
    bound = 2 * (np.expm1(2 * ctol) + 2 * SOFTMAX_ROUNDINGS * U32)
    found = worst("sample_ids", outside, np.zeros_like(outside), np.broadcast_to(bound, outside.shape), lambda at: (
        f"{position_where(row, at[0])}, draw {at[1]}: id {int(draws[at])} spans [{facts['cdf_below'][at]:.7g}, "
        f"{facts['cdf_at'][at]:.7g}) of this run's cdf, the draw's uniform x total is {target[at]:.7g}"))
    found.stored = found.recomputed = None
    return found


def dense_finding(name: str, stored: np.ndarray, recomputed: np.ndarray, tol: Tolerances, plan: Plan) -> Finding:
    spec = plan.dense[name]
    stored, recomputed = np.asarray(stored), np.asarray(recomputed)
    if stored.shape != recomputed.shape:
        return Finding(name, math.inf, math.inf, 0.0, f"stored shape {stored.shape}, this run's {recomputed.shape}")
    # the scale of a vector's finite values: an element that overflowed fp16 (inf in both runs) sets no tolerance
    magnitude = np.abs(recomputed.astype(np.float64))
    scale = np.where(np.isfinite(magnitude), magnitude, 0).max(axis=-1, keepdims=True) if stored.size else 0.0
    bound = half_ulp(stored) + half_ulp(recomputed) + tol.compute(name, scale)
    unit = {"token": "token", "word": "word"}.get(spec.align)

    def where(at: tuple) -> str:
        column = at[-1]
        if name in plan.heads:
            keys = spec.dim // plan.heads[name]
            column_text = f"head {column // keys}, key {column % keys}"
        else:
            column_text = f"dim {column}"
        return f"{unit} {at[0]}, {column_text}" if unit else column_text

    return worst(name, stored, recomputed, bound, where)


def split_rows(values: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
    return np.split(values, np.cumsum(counts)[:-1])


def dense_by_row(result: dict, rows: list[dict], plan: Plan) -> list[dict]:
    """infer's dense arrays (row-major over the batch's rows) cut into each row's part."""
    counts = {"row": np.ones(len(rows), dtype=np.int64),
              "token": np.array([len(r["input_ids"]) for r in rows], dtype=np.int64),
              "word": np.array([int(np.asarray(r["word_start"]).sum()) for r in rows], dtype=np.int64)}
    per_row = [{} for _ in rows]
    for name, spec in plan.dense.items():
        for i, part in enumerate(split_rows(result[name], counts[spec.align])):
            per_row[i][name] = part[0] if spec.align == "row" else part
    return per_row


def check_batch(teacher: LoadedTeacher, outputs: Outputs, tol: Tolerances, plan: Plan, rows: list[dict]) -> list[list]:
    """Re-run the teacher on rows (one batch) and compare; per row, one Finding per output."""
    segment_b = np.array([r["segment_b"] for r in rows], dtype=np.uint16) if "segment_b" in rows[0] else None
    batch = PaddedBatch.build(np.arange(len(rows)), [r["input_ids"] for r in rows], [r["word_start"] for r in rows],
                              [r["masked_positions"] for r in rows], [r["labels"] for r in rows], teacher.pad_id, segment_b)
    dense = [{} for _ in rows]
    if plan.dense:  # first, so that a teacher switched to eager attention for attn.L runs so throughout, as it did
        dense = dense_by_row(teacher.infer(batch, dataclasses.replace(outputs, topk=0, sample=0)), rows, plan)
    facts = [None] * len(rows)
    if teacher.spec.kind == "mlm" and batch.masked_rows.size:
        n_masked = np.array([len(r["masked_positions"]) for r in rows], dtype=np.int64)
        flat = logit_facts(teacher, batch, rows, plan)
        cut = {name: split_rows(values, n_masked) for name, values in flat.items()}
        facts = [{name: cut[name][i] for name in cut} for i in range(len(rows))]
    found = []
    for row, row_facts, row_dense in zip(rows, facts, dense):
        findings = [loss_finding(row, row_facts, tol, plan.vocab)]
        if row_facts is not None and plan.topk:
            findings += topk_findings(row, row_facts, tol, plan)
        if row_facts is not None and plan.sample:
            findings.append(sample_finding(row, row_facts, tol, plan))
        findings += [dense_finding(name, row[name], row_dense[name], tol, plan) for name in sorted(plan.dense)]
        found.append(findings)
    return found


def make_plan(cache: Cache, outputs: Outputs, spec: TeacherSpec) -> Plan:
    q8_tolerance = None
    if cache.topk_k and cache.topk_codec == "q8":
        from ..storage.codec import q8_logprob_tolerance as q8_tolerance
    heads = {name: cache.attention_heads(name) for name in cache.dense_specs if cache.is_attention(name)}
    return Plan(topk=cache.topk_k or 0, codec=cache.topk_codec if cache.topk_k else "fp16", sample=outputs.sample,
                seed=int(cache.manifest["view"]["mask"]["seed"]), vocab=spec.model_vocab_size,
                dense=dict(cache.dense_specs), heads=heads, q8_tolerance=q8_tolerance)


def recheck_cache(cache: str | Cache, teacher: str, *, rows: int = 64, seed: int = 0, device: str = "auto",
                  dtype: str = "auto", progress: Callable[[int, int], None] | None = None) -> dict:
    """Re-run `teacher` (an alias, hub id or directory) on `rows` random rows of the cache (drawn
    with `seed`) and compare every stored output (module docstring); the report (format_recheck)."""
    started = time.perf_counter()
    if rows < 1:
        raise BadInput(f"--rows must be at least 1, not {rows}.")
    if seed < 0:
        raise BadInput(f"--seed must be 0 or more, not {seed}.")
    cache = cache if isinstance(cache, Cache) else Cache(cache)
    view = cache.manifest["view"]
    outputs = Outputs.from_json(view["outputs"])
    spec = describe_teacher(resolve_teacher(teacher))
    check_teacher_fits(cache, spec, outputs)
    cache_dtype = view.get("compute_dtype", "fp32")
    device, dtype = choose_device(device, dtype, cache_dtype)
    loaded = LoadedTeacher(spec, device, dtype)
    tol = Tolerances(UNIT_ROUNDOFF[cache_dtype] + UNIT_ROUNDOFF[dtype], spec.hidden_size, spec.num_layers)
    plan = make_plan(cache, outputs, spec)
    examples = read_rows(cache, pick_rows(cache, rows, seed))
    findings: list = [None] * len(examples)
    done = 0
    for batch_rows in batches(examples, spec.model_vocab_size):
        for i, found in zip(batch_rows, check_batch(loaded, outputs, tol, plan, [examples[i] for i in batch_rows])):
            findings[i] = found
        done += len(batch_rows)
        if progress is not None:
            progress(done, len(examples))
    report = summarise(examples, findings)
    made_by = cache.manifest.get("teacher") or {}
    report.update(cache=str(cache.path), teacher=spec.name, teacher_path=spec.path, device=device, dtype=dtype,
                  cache_dtype=cache_dtype, rows_total=len(cache), seed=seed,
                  weights_sha256={"teacher": spec.weights_sha256, "cache": made_by.get("weights_sha256"),
                                  "same": spec.weights_sha256 == made_by.get("weights_sha256")},
                  seconds=round(time.perf_counter() - started, 3))
    return report


def summarise(examples: list[dict], findings: list[list[Finding]]) -> dict:
    """ok, the first row that differs (in cache order) and its first output that differs, and
    per output the values compared and the largest difference relative to its tolerance."""
    def place(row: dict) -> dict:
        return {"shard": int(row["shard"]), "row": int(row["row"])}

    values: dict[str, int] = {}
    worst_of: dict[str, tuple[Finding, dict]] = {}
    first, differing = None, 0
    for row, found in zip(examples, findings):
        for f in found:
            values[f.output] = values.get(f.output, 0) + f.values
            if f.output not in worst_of or f.ratio > worst_of[f.output][0].ratio:
                worst_of[f.output] = (f, place(row))
        bad = [f for f in found if not f.ratio <= 1]
        if bad:
            differing += 1
        if bad and first is None:
            order = {name: i for i, name in enumerate(OUTPUT_ORDER)}
            bad.sort(key=lambda f: (order.get(f.output, len(order)), f.output))
            first = {**place(row), "example_id": int(row["example_id"]), "side": str(row["side"]),
                     "mask_epoch": int(row["mask_epoch"]), **bad[0].to_json(), "outputs": [f.output for f in bad]}
    outputs = {name: {"values": values[name], "worst": {**at, **f.to_json()}} for name, (f, at) in worst_of.items()}
    return {"ok": first is None, "rows": len(examples), "differing_rows": differing, "first_difference": first,
            "outputs": outputs}


def _number(x) -> str:
    return "n/a" if x is None else f"{x:.6g}" if isinstance(x, float) else str(x)


def format_recheck(report: dict) -> str:
    """One line when every row matches; else a paragraph naming the first row and output that differ."""
    if report["weights_sha256"]["same"]:
        weights = "the teacher's weights hash as the manifest records"
    elif report["ok"]:
        weights = "the teacher's weights hash differently from the manifest's, as a re-saved copy's would"
    else:
        weights = "the teacher's weights hash differently from the manifest's"
    ran = f"teacher {report['teacher']!r} on {report['device']} in {report['dtype']}, the cache made in {report['cache_dtype']}"
    if not report["outputs"]:
        return f"{report['cache']}: no finished rows to re-run the teacher on."
    if report["ok"]:
        top = max(report["outputs"].values(), key=lambda o: o["worst"]["ratio"])["worst"]
        values = sum(o["values"] for o in report["outputs"].values())
        return (f"{report['cache']}: {report['rows']} of {report['rows_total']} rows re-run match ({ran}): {values:,} values "
                f"in {len(report['outputs'])} outputs ({', '.join(report['outputs'])}); largest difference "
                f"{top['ratio']:.3g} of its tolerance ({top['output']}); {weights}; {report['seconds']:.1f} s.")
    d = report["first_difference"]
    values = f" (stored {_number(d['stored'])}, re-run {_number(d['recomputed'])})" if d["stored"] is not None else ""
    return (f"{report['cache']}: row {d['row']} of shard {d['shard']} (example {d['example_id']}, side {d['side']}, mask "
            f"epoch {d['mask_epoch']}) differs from the re-run of {ran}: {d['output']} at {d['where']}{values} differs by "
            f"{_number(d['difference'])}, over its tolerance {_number(d['tolerance'])}"
            + (f"; the row's {', '.join(d['outputs'][1:])} differ too" if len(d["outputs"]) > 1 else "")
            + f". {report['differing_rows']} of {report['rows']} rows checked differ; {weights}. Either this is not the "
            "teacher that made the cache, or the cache's values were changed after it was written.")
