"""The q8 top-k codec (xkd/storage/codec.py): each value within the bound it states, the KD
loss from q8 codes against the fp16 cache's on the real MiniLM teacher over IITB text, and the
bytes a q8 shard spends per masked position."""

from __future__ import annotations

import io
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from xkd.errors import XkdError
from xkd.storage.codec import Q8_FLOOR, decode_q8, encode_q8, q8_logprob_tolerance
from xkd.storage.schema import TOPK_CODECS
from xkd.storage.shard import DEFAULT_ROW_GROUP_SIZE, PARQUET_OPTIONS
from xkd.storage.synthetic import synthetic_rows

from conftest import ROOT, requires_iitb

sys.path.insert(0, str(ROOT / "bench"))
# bench/topk_codec.py: the MiniLM masked LM, the masking and the loss computation, which its
# bench runs over more lines.
from topk_codec import K, kd_loss_differences, loss_table, masked_logits, within_target  # noqa: E402


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


@pytest.fixture(scope="module")
def minilm_logits(minilm_dir):
    """The teacher's and a random student's logits at every masked position (topk_codec.masked_logits)."""
    return masked_logits(minilm_dir, SENTENCES)


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
    (lognorm) and the renormalised top-k at τ = 1 and 2 (kd_loss_differences). Asserted, for
    the mean over all positions: q8's loss within 1e-3 nats of the exact one (float64 from the
    fp32 logits, by reference_losses), and within 1e-3 nats of the fp16 cache's by xkd's
    distillation_cross_entropy, give or take the fp16 cache's own error against the exact loss
    (which reaches 1.4e-3 at x3, where fp16 rounds logits near 40 to 1/32). Printed: the table
    bench/topk_codec.py writes for more lines (pytest -s)."""
    assert len(minilm_logits.teacher) >= 2000
    teachers, records = kd_loss_differences(minilm_logits.teacher, minilm_logits.student)
    assert [t["sharpen"] for t in teachers] == [1.0, 3.0] and len(records) == 2 * 2 * 3
    for r in records:  # xkd's loss is the one computed independently
        for name in ("fp16", "q8"):
            assert abs(r["xkd"][name] - r["reference"][name]) <= 1e-4, r
    table = loss_table(teachers, records)
    print("\n" + "\n".join(table))  # pytest -s shows the whole table
    failures = [line for line, r in zip(table[2:], records) if not within_target(r)]
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
