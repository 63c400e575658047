"""The q8 top-k codec (xkd/storage/codec.py): each value within the bound it states, the KD
loss from q8 codes against the fp16 cache's on the real MiniLM teacher over IITB text, and the
bytes a q8 shard spends per masked position."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from xkd.errors import XkdError
from xkd.lines import read_lines
from xkd.masking import choose_positions, corrupt
from xkd.storage.codec import Q8_FLOOR, decode_q8, encode_q8, q8_logprob_tolerance
from xkd.storage.schema import TOPK_CODECS
from xkd.storage.shard import DEFAULT_ROW_GROUP_SIZE, PARQUET_OPTIONS
from xkd.storage.synthetic import synthetic_rows
from xkd.student.losses import distillation_cross_entropy

from conftest import PARALLEL, requires_iitb

K = 8


def test_the_codecs_are_named_and_codes_survive_a_second_encoding():
    assert TOPK_CODECS == ("fp16", "q8")
    # A union-vocab copy (xkd remap) reads q8 values decoded and encodes them again.
    codes = np.arange(256, dtype=np.uint8)
    assert np.array_equal(encode_q8(decode_q8(codes)), codes)


def test_every_value_decodes_within_its_stated_bound():
    rng = np.random.default_rng(0)
    values = np.concatenate([
        np.linspace(-30, 0.05, 400_001),  # dense, past both ends of the range
        -rng.exponential(3.0, 200_000),  # where top-k log-probabilities lie
        np.log(rng.random(100_000)),
        [0.0, -0.0, 1e-7, 0.03, Q8_FLOOR, np.nextafter(np.float32(Q8_FLOOR), np.float32(0)),
         np.nextafter(np.float32(Q8_FLOOR), np.float32(-1)), -1e30, np.finfo(np.float32).min, -np.inf],
    ]).astype(np.float32)
    decoded = decode_q8(encode_q8(values))
    assert decoded.dtype == np.float32 and np.isfinite(decoded).all()
    error = np.abs(decoded.astype(np.float64) - values)
    bound = q8_logprob_tolerance(values)
    assert (error <= bound).all(), values[error > bound][:5]
    # The bound is the one documented: fine where the probability mass is, never coarse.
    inside = (values >= Q8_FLOOR) & (values <= 0)
    assert bound[inside].max() <= 0.32
    assert bound[(values >= -1) & (values <= 0)].max() <= 0.0165
    assert bound[(values >= -0.1) & (values <= 0)].max() <= 0.0065
    # In probability: |p_hat - p| <= p (exp(bound) - 1) <= 0.0065 for every p.
    assert (np.exp(values[inside]) * np.expm1(bound[inside])).max() <= 0.0065
    assert q8_logprob_tolerance(np.float32(-np.inf)) == np.inf
    # A value below the floor decodes to a probability under 3e-9: it can gain no more than that.
    assert np.exp(decoded[values < Q8_FLOOR]).max() <= 3e-9


def test_codes_are_monotone_and_use_every_level():
    descending = np.linspace(0, -25, 300_001, dtype=np.float32)
    codes = encode_q8(descending)
    assert (np.diff(codes.astype(int)) >= 0).all()
    assert set(codes.tolist()) == set(range(256))
    assert (np.diff(decode_q8(np.arange(256, dtype=np.uint8))) < 0).all()
    # Sorted top-k rows stay sorted after a round trip.
    rows = np.sort(-np.random.default_rng(1).exponential(2.0, (1000, K)), axis=1)[:, ::-1].astype(np.float32)
    assert (np.diff(decode_q8(encode_q8(rows)), axis=1) <= 0).all()


def test_each_code_decodes_to_its_bins_mean_probability():
    """Decoding to a bin's mean probability (not its midpoint in log p, which overstates p by
    a factor of about 1 + width²/24) keeps the probabilities, and so the KD loss, unbiased."""
    grid = np.linspace(Q8_FLOOR, 0, 4_000_001, dtype=np.float64)
    codes = encode_q8(grid.astype(np.float32))
    counts = np.bincount(codes, minlength=256)
    mean_p = np.bincount(codes, weights=np.exp(grid), minlength=256) / np.maximum(counts, 1)
    inner = np.arange(255)  # the last bin also holds everything below the floor
    assert (counts[inner] >= 90).all()
    assert np.abs(np.log(mean_p[inner]) - decode_q8(inner.astype(np.uint8))).max() <= 1e-4


def test_shapes_and_overflowed_values():
    x = -np.random.default_rng(2).exponential(2.0, (3, 5, K)).astype(np.float32)
    assert encode_q8(x).shape == x.shape and encode_q8(x).dtype == np.uint8
    assert decode_q8(encode_q8(x)).shape == x.shape
    assert encode_q8(np.float32(-1.0)).shape == ()
    for bad in (np.nan, np.inf):
        with pytest.raises(XkdError, match="NaN or \\+inf"):
            encode_q8(np.array([-1.0, bad], dtype=np.float32))


# -- The KD loss on the real MiniLM teacher ---------------------------------------------------

SENTENCES = {"en": 280, "hi": 150}
MAX_LENGTH = 64
CHUNK = 600  # positions per loss evaluation: (600, 30,522) float64 is 150 MB


def masked_lm_from_minilm(path):
    """MiniLM (sentence-transformers' all-MiniLM-L6-v2, a BertModel without an MLM head) as a
    BertForMaskedLM: the real encoder; the decoder tied to the real word embeddings; the head's
    transform with dense = identity (bias 0) and LayerNorm weight 1, bias 0; decoder bias 0.
    Its logits are the similarities of each position's normalised, GELU'd final hidden state
    to the real token embeddings."""
    from transformers import BertForMaskedLM
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the head's weights are missing from the checkpoint: set below
    try:
        model = BertForMaskedLM.from_pretrained(path).eval()
    finally:
        hf_logging.set_verbosity(verbosity)
    head = model.cls.predictions
    with torch.no_grad():
        head.transform.dense.weight.copy_(torch.eye(model.config.hidden_size))
        head.transform.dense.bias.zero_()
        head.transform.LayerNorm.weight.fill_(1.0)
        head.transform.LayerNorm.bias.zero_()
        head.bias.zero_()
    assert head.decoder.weight.data_ptr() == model.bert.embeddings.word_embeddings.weight.data_ptr()
    return model


def masked_iitb(tokenizer, lang: str, n: int, seed: int):
    """The first n IITB training lines of `lang` with 8 words or more, tokenised (<= 64 tokens),
    with 15% of each line's non-special tokens masked BERT's way (xkd.masking: 80% [MASK],
    10% a random token, 10% unchanged); as batches of lines of similar length (less padding
    to run), each (input ids, attention mask, masked)."""
    lines = [line for line in read_lines(PARALLEL / "iitb-en-hi" / f"train.{lang}") if len(line.split()) >= 8][:n]
    lengths = [len(ids) for ids in tokenizer(lines, truncation=True, max_length=MAX_LENGTH)["input_ids"]]
    order = np.argsort(lengths, kind="stable")
    special = np.array(tokenizer.all_special_ids)
    for batch in np.array_split(order, -(-len(order) // 64)):
        enc = tokenizer([lines[i] for i in batch], truncation=True, max_length=MAX_LENGTH, padding=True,
                        return_tensors="np", return_special_tokens_mask=True)
        ids = enc["input_ids"].copy()
        masked = np.zeros(ids.shape, dtype=bool)
        for row, line in enumerate(batch):
            rng = np.random.default_rng([seed, line])
            candidate = (enc["attention_mask"][row] == 1) & (enc["special_tokens_mask"][row] == 0)
            positions = choose_positions(rng, np.where(candidate, np.arange(ids.shape[1]), -1), 0.15)
            masked[row, positions] = True
            ids[row] = corrupt(rng, ids[row], positions, tokenizer.mask_token_id, len(tokenizer), special)
        yield torch.from_numpy(ids), torch.from_numpy(enc["attention_mask"]), torch.from_numpy(masked)


@pytest.fixture(scope="module")
def minilm_logits(minilm_dir):
    """(teacher logits, random student logits) at every masked position, float32, (M, V)."""
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    torch.manual_seed(0)
    teacher = masked_lm_from_minilm(minilm_dir)
    tokenizer = BertTokenizerFast.from_pretrained(minilm_dir)
    # A tiny random student over the same vocabulary; initializer_range 0.2 (not BERT's 0.02,
    # at which its log-probabilities are uniform to within 0.1 nats) so that the top-k
    # targets' errors, which weigh differences of log q between the k tokens, show.
    student = BertForMaskedLM(BertConfig(vocab_size=teacher.config.vocab_size, hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, intermediate_size=64, initializer_range=0.2)).eval()
    teacher_logits, student_logits = [], []
    with torch.no_grad():
        for seed, (lang, n) in enumerate(SENTENCES.items()):
            for ids, attention, masked in masked_iitb(tokenizer, lang, n, seed):
                # Each head runs on the masked positions only, as the pipeline's does.
                for model, out in ((teacher, teacher_logits), (student, student_logits)):
                    hidden = model.bert(input_ids=ids, attention_mask=attention).last_hidden_state
                    out.append(model.cls(hidden[masked]))
    return torch.cat(teacher_logits).float(), torch.cat(student_logits).float()


def chunks(n: int):
    return [slice(start, start + CHUNK) for start in range(0, n, CHUNK)]


def student_side(student_logits: torch.Tensor, topk_ids: torch.Tensor) -> dict[float, tuple]:
    """Per τ, in float64: log softmax(z_S / τ) at the top-k ids (M, k) and, at τ = 1, the log of
    the student's mass on every other token (M,), as log(1 − its top-k mass): exact to within
    1e-16 / that mass, which is far above 1e-9 here."""
    out = {}
    for tau in (1.0, 2.0):
        lse = torch.cat([torch.logsumexp(student_logits[rows].double() / tau, dim=-1) for rows in chunks(len(topk_ids))])
        top = student_logits.gather(1, topk_ids).double() / tau - lse[:, None]
        out[tau] = (top, torch.log1p(-top.exp().sum(-1)) if tau == 1.0 else None)
    assert out[1.0][1].exp().min() > 1e-9
    return out


def reference_losses(values: torch.Tensor, lognorm: torch.Tensor, student: dict) -> dict[str, torch.Tensor]:
    """Per position, in float64, independently of xkd's losses: the tail target's
    −Σ_j p_j log q_j − p_tail log q_tail (p_j = exp(v_j − lognorm), p_tail = max(0, 1 − Σ p_j)),
    and the renormalised top-k target's τ² · −Σ_j softmax(v / τ)_j log softmax(z_S / τ)_j."""
    values, lognorm = values.double(), lognorm.double()
    logq_top, logq_tail = student[1.0]
    p = torch.exp(values - lognorm[:, None])
    p_tail = (1 - p.sum(-1)).clamp_min(0)
    out = {"tail": -(p * logq_top).sum(-1) - torch.where(p_tail > 0, p_tail * logq_tail, torch.zeros_like(p_tail))}
    for tau in (1.0, 2.0):
        out[f"topk τ={tau:g}"] = tau**2 * -(torch.softmax(values / tau, dim=-1) * student[tau][0]).sum(-1)
    return out


def xkd_loss(target: str, values, lognorm, student_logits, topk_ids, student_logp) -> float:
    """distillation_cross_entropy (what students train with), mean over every position."""
    total = 0.0
    for rows in chunks(len(values)):
        if target == "tail":
            loss = distillation_cross_entropy(student_logits[rows], values[rows], 1.0, topk_ids[rows], lognorm[rows],
                                              student_logp=student_logp[rows])
        else:
            tau = float(target.split("=")[1])
            loss = distillation_cross_entropy(student_logits[rows], values[rows], tau, topk_ids[rows],
                                              student_logp=student_logp[rows])
        total += float(loss) * len(values[rows])
    return total / len(values)


@requires_iitb
def test_kd_loss_from_q8_codes_is_within_1e_3_nats_of_the_fp16_caches(minilm_logits):
    """The real MiniLM teacher (masked_lm_from_minilm) over 430 IITB lines, 280 English and 150
    Hindi (its uncased vocabulary drops Devanagari vowel signs: a flatter teacher still), 15%
    of tokens masked: ~2,300 positions. Its raw similarities make a flat teacher (median top-1
    probability 0.004); sharpened x3 (its logits times 3, i.e. the head's LayerNorm weight 3)
    it is a peaked one, closer to a trained MLM (median top-1 probability 0.3, logits up to ~40).

    As the pipeline does: top-k and logsumexp from the fp32 logits; the fp16 cache stores the
    top-k logits as fp16 and the logsumexp as fp32; the q8 cache the codes of their difference.
    Students: the teacher itself (q = p) and a random tiny BERT. Targets: the tail target
    (lognorm) and the renormalised top-k at τ = 1 and 2. Asserted, for the mean over all
    positions: q8's loss within 1e-3 nats of the exact one (float64 from the fp32 logits, by
    reference_losses), and within 1e-3 nats of the fp16 cache's by xkd's
    distillation_cross_entropy, give or take the fp16 cache's own error against the exact loss
    (which reaches 1.4e-3 at x3, where fp16 rounds logits near 40 to 1/32). Printed: the
    per-position differences (pytest -s)."""
    teacher_logits, random_logits = minilm_logits
    assert len(teacher_logits) >= 2000
    topk_ids = teacher_logits.topk(K, dim=-1).indices  # sharpening keeps the order
    random_student = (random_logits, student_side(random_logits, topk_ids))
    lines, failures = [], []
    for sharpen in (1.0, 3.0):
        teacher = teacher_logits * sharpen
        lognorm = torch.logsumexp(teacher, dim=-1)
        top = teacher.gather(1, topk_ids)
        itself = student_side(teacher, topk_ids)
        exact = itself[1.0][0]  # the teacher's own log-probabilities, float64
        caches = {
            "fp16": (top.half().float(), lognorm),
            "q8": (torch.from_numpy(decode_q8(encode_q8((top - lognorm[:, None]).numpy()))), torch.zeros_like(lognorm)),
            "exact": (exact, torch.zeros_like(lognorm)),
        }
        lines.append(f"x{sharpen:g}: {len(top)} positions, median top-1 p {exact[:, 0].exp().median():.3f}, "
                     f"median top-{K} mass {exact.exp().sum(-1).median():.3f}")
        for student_name, (student, side) in (("teacher itself", (teacher, itself)), ("random student", random_student)):
            logp = torch.cat([torch.log_softmax(student[rows], dim=-1) for rows in chunks(len(student))])
            reference = {name: reference_losses(*cache, side) for name, cache in caches.items()}
            for target in reference["exact"]:
                per_position = {name: reference[name][target] - reference["exact"][target] for name in ("q8", "fp16")}
                means = {name: xkd_loss(target, *caches[name], student, topk_ids, logp) for name in ("fp16", "q8")}
                for name in means:  # xkd's loss is the one computed here
                    assert abs(means[name] - float(reference[name][target].mean())) <= 1e-4, (sharpen, student_name, target)
                q8_vs_fp16 = means["q8"] - means["fp16"]
                q8_vs_exact, fp16_vs_exact = (float(per_position[name].mean()) for name in ("q8", "fp16"))
                largest = {"q8 - fp16": per_position["q8"] - per_position["fp16"], **{
                    f"{name} - exact": per_position[name] for name in ("q8", "fp16")}}
                lines.append(
                    f"  {student_name:14s} {target:9s} mean q8 - fp16 {q8_vs_fp16:+.1e}, q8 - exact {q8_vs_exact:+.1e}, "
                    f"fp16 - exact {fp16_vs_exact:+.1e}; per position max "
                    + ", ".join(f"|{name}| {float(d.abs().max()):.1e}" for name, d in largest.items()))
                if abs(q8_vs_exact) > 1e-3 or abs(q8_vs_fp16) > 1e-3 + abs(fp16_vs_exact):
                    failures.append(lines[-1])
    print("\n" + "\n".join(lines))  # pytest -s shows the whole table
    assert not failures, "\n".join(failures)


# -- Bytes -------------------------------------------------------------------------------------


def test_q8_topk_costs_at_most_24_bytes_per_masked_position():
    """Synthetic shards as bench/storage.py writes them (4 x 4,000 rows, 120k vocabulary, k = 8),
    their top-k ids and q8 codes written with the shard writer's Parquet options. Byte counts
    are exact and repeatable, so the budget is asserted."""
    sizes = {"topk_ids": 0, "topk_codes": 0}
    positions = 0
    for shard in range(4):
        rows = synthetic_rows(shard, 4000, vocab=120_000, k=K, first_example_id=shard * 4000)[0]
        ids = rows["topk_ids"]
        logprobs = rows["topk_logits"].values.astype(np.float32).reshape(-1, K) - rows["lognorm"].values[:, None]
        offsets = pa.array(ids.offsets.astype(np.int32))
        table = pa.table({
            "topk_ids": pa.ListArray.from_arrays(offsets, pa.array(ids.values, pa.uint32())),
            "topk_codes": pa.ListArray.from_arrays(offsets, pa.array(encode_q8(logprobs).ravel(), pa.uint8())),
        })
        buffer = io.BytesIO()
        pq.write_table(table, buffer, row_group_size=DEFAULT_ROW_GROUP_SIZE, **PARQUET_OPTIONS)
        meta = pq.ParquetFile(io.BytesIO(buffer.getvalue())).metadata
        for group in range(meta.num_row_groups):
            for column in range(meta.num_columns):
                chunk = meta.row_group(group).column(column)
                sizes[chunk.path_in_schema.split(".")[0]] += chunk.total_compressed_size
        positions += len(logprobs)
    per_position = {name: size / positions for name, size in sizes.items()}
    print(f"q8 top-k bytes per masked position: {per_position}")  # pytest -s shows it
    # Parquet stores uint8 as 4-byte ints: byte-stream-split on the codes leaves three streams
    # of zeros that zstd removes (7.2 B a position; 9.7 B without it).
    assert "topk_codes.list.element" in PARQUET_OPTIONS["use_byte_stream_split"]
    assert sum(per_position.values()) <= 24.0, per_position
