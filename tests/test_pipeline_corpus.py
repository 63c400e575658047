"""Corpus readers, cleaning and sharding: stable example ids, lazy shard reads, bad input."""

from __future__ import annotations

import json

import pytest

from xkd.errors import BadInput
from xkd.names import parse_corpus
from xkd.pipeline.corpus import Cleaning, plan_corpus

EN = ["The cat sat on the mat .", "Good morning to all of you", "", "Rain is coming today", "नमस्ते is hello",
      "A long sentence with exactly eight words here", "Short one", "Last line of the file"]
HI = ["बिल्ली चटाई पर बैठी", "आप सबको सुप्रभात", "खाली नहीं", "आज बारिश आ रही है", "नमस्ते मतलब हेलो",
      "यह एक लंबा वाक्य है", "छोटा", "फ़ाइल की आख़िरी पंक्ति"]


def write_lines(path, lines, end="\n"):
    path.write_text("".join(line + end for line in lines), encoding="utf-8")
    return path


def all_examples(plan):
    return [ex for shard in plan.shards for ex in shard.examples()]


@pytest.fixture
def parallel_spec(tmp_path):
    en = write_lines(tmp_path / "c.en", EN)
    hi = write_lines(tmp_path / "c.hi", HI)
    return f"parallel:{en}@en,{hi}@hi"


def test_example_ids_are_corpus_positions_and_empty_lines_are_skipped(parallel_spec):
    plan = plan_corpus(parse_corpus(parallel_spec), Cleaning(), shard_size=3)
    examples = all_examples(plan)
    assert [ex.example_id for ex in examples] == [0, 1, 3, 4, 5, 6, 7]  # line 3 is empty on the en side
    assert examples[2].texts == ("Rain is coming today", "आज बारिश आ रही है")
    assert plan.skipped["empty"] == 1 and plan.examples == 7 and plan.records == 8
    assert [s.size for s in plan.shards] == [3, 3, 1]
    assert plan.langs == ("en", "hi")


def test_shards_seek_to_their_own_bytes_whatever_the_shard_size(parallel_spec):
    """Multi-byte UTF-8 lines: byte offsets, not characters, locate a shard."""
    reference = [(ex.example_id, ex.texts) for ex in all_examples(plan_corpus(parse_corpus(parallel_spec), Cleaning(), 100))]
    for size in (1, 2, 5):
        plan = plan_corpus(parse_corpus(parallel_spec), Cleaning(), size)
        assert [(ex.example_id, ex.texts) for ex in all_examples(plan)] == reference
        # A shard read on its own (as a worker does) gives the same examples.
        assert [ex.example_id for ex in plan.shards[-1].examples()] == [e for e, _ in reference][-plan.shards[-1].size:]


def test_a_corpus_that_changes_after_planning_is_caught_by_the_shard_reader(tmp_path):
    path = write_lines(tmp_path / "c.txt", [f"line number {i}" for i in range(10)])
    plan = plan_corpus(parse_corpus(f"text:{path}@en"), Cleaning(), 4)
    write_lines(path, [f"line number {i}" for i in range(9)])
    with pytest.raises(BadInput, match="c.txt changed after the run read it: lines 9-10 .* shard 2 holds"):
        plan.shards[2].examples()


def test_crlf_files_and_a_byte_order_mark_read_like_plain_lines(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes("\ufeffEins zwei\r\nDrei vier\r\n".encode())
    plan = plan_corpus(parse_corpus(f"text:{path}@de"), Cleaning(), 10)
    assert [ex.texts for ex in all_examples(plan)] == [("Eins zwei",), ("Drei vier",)]
    assert plan.langs == ("de",) and not plan.source.parallel


def test_mismatched_line_counts_name_both_files(tmp_path):
    en = write_lines(tmp_path / "a.en", EN)
    hi = write_lines(tmp_path / "a.hi", HI[:5])
    with pytest.raises(BadInput) as err:
        plan_corpus(parse_corpus(f"parallel:{en}@en,{hi}@hi"), Cleaning(), 4)
    msg = str(err.value)
    assert str(hi) in msg and str(en) in msg and "5 lines" in msg and "line 6" in msg


def test_invalid_utf8_fails_naming_file_and_line_or_is_skipped_and_counted(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"fine line\nbad \xff\xfe line\nanother fine line\n")
    with pytest.raises(BadInput) as err:
        plan_corpus(parse_corpus(f"text:{path}@en"), Cleaning(), 10)
    assert f"{path}, line 2" in str(err.value) and "UTF-8" in str(err.value) and "--skip-bad-lines" in str(err.value)
    plan = plan_corpus(parse_corpus(f"text:{path}@en"), Cleaning(skip_bad_lines=True), 10)
    assert [ex.example_id for ex in all_examples(plan)] == [0, 2]
    assert plan.skipped["invalid_utf8"] == 1


def test_malformed_tsv_line_is_named(tmp_path):
    path = write_lines(tmp_path / "c.tsv", ["hello\tनमस्ते", "no tab here", "a\tb\tc"])
    with pytest.raises(BadInput, match=r"line 2: expected 2 tab-separated fields"):
        plan_corpus(parse_corpus(f"tsv:{path}@en,hi"), Cleaning(), 10)
    plan = plan_corpus(parse_corpus(f"tsv:{path}@en,hi"), Cleaning(skip_bad_lines=True), 10)
    assert plan.examples == 1 and plan.skipped["malformed"] == 2


def test_empty_corpus_is_a_clear_error(tmp_path):
    path = write_lines(tmp_path / "empty.txt", ["", "   "])
    with pytest.raises(BadInput, match=r"yields no examples: 2 records read \(2 empty\)"):
        plan_corpus(parse_corpus(f"text:{path}@en"), Cleaning(), 10)
    (tmp_path / "zero.txt").write_bytes(b"")
    with pytest.raises(BadInput, match="yields no examples"):
        plan_corpus(parse_corpus(f"text:{tmp_path / 'zero.txt'}@en"), Cleaning(), 10)


def test_mmkd_length_filter_and_pair_cap(parallel_spec):
    plan = plan_corpus(parse_corpus(parallel_spec), Cleaning(min_tokens=3, max_tokens=7), 10)
    kept = {ex.example_id for ex in all_examples(plan)}
    # 5: eight English words; 6: "Short one" / "छोटा" are too short.
    assert kept == {0, 1, 3, 4, 7} and plan.skipped["length"] == 2
    capped = plan_corpus(parse_corpus(parallel_spec), Cleaning(min_tokens=3, max_tokens=7, max_pairs=3), 2)
    assert [ex.example_id for ex in all_examples(capped)] == [0, 1, 3]
    assert capped.skipped["cap"] == 2 and [s.size for s in capped.shards] == [2, 1]
    with pytest.raises(BadInput, match="--min-tokens 9 is above --max-tokens 3"):
        Cleaning(min_tokens=9, max_tokens=3)


def test_fingerprint_follows_the_bytes_not_the_path(tmp_path, parallel_spec):
    a = plan_corpus(parse_corpus(parallel_spec), Cleaning(), 10)
    copy_dir = tmp_path / "copy"
    copy_dir.mkdir()
    en = write_lines(copy_dir / "x.en", EN)
    hi = write_lines(copy_dir / "x.hi", HI)
    b = plan_corpus(parse_corpus(f"parallel:{en}@en,{hi}@hi"), Cleaning(), 10)
    assert a.fingerprint == b.fingerprint
    write_lines(hi, HI[:-1] + ["बदली हुई पंक्ति"])
    assert plan_corpus(parse_corpus(f"parallel:{en}@en,{hi}@hi"), Cleaning(), 10).fingerprint != a.fingerprint


def test_bundled_sample_is_an_english_hindi_parallel_corpus():
    plan = plan_corpus(parse_corpus("sample"), Cleaning(), 32)
    examples = all_examples(plan)
    assert plan.langs == ("en", "hi") and plan.source.parallel
    assert len(examples) == plan.examples >= 60 and sum(plan.skipped.values()) == 0
    assert all(any("\u0900" <= ch <= "\u097f" for ch in ex.texts[1]) for ex in examples)  # Devanagari side


def test_named_hub_corpus_reads_local_files_given_by_option(tmp_path, parallel_spec):
    en, hi = (p.rpartition("@")[0] for p in parallel_spec.removeprefix("parallel:").split(","))
    spec = parse_corpus("opus-en-hi", files=f"{en},{hi}")
    assert spec.kind == "parallel" and spec.paths == (en, hi) and spec.langs == ("en", "hi")
    tsv = write_lines(tmp_path / "p.tsv", ["a b\tक ख"])
    assert parse_corpus("opus-en-hi", files=str(tsv)).kind == "tsv"
    with pytest.raises(BadInput, match="--corpus-files replaces the files of a registered hub corpus"):
        parse_corpus("sample", files=str(tsv))


def test_datasets_files_translation_and_text_columns(tmp_path):
    rows = [{"translation": {"en": e, "hi": h}, "label": i % 3} for i, (e, h) in enumerate(zip(EN, HI))]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    plan = plan_corpus(parse_corpus(f"hf:{path}:en-hi"), Cleaning(), 4)
    examples = all_examples(plan)
    assert plan.langs == ("en", "hi") and [ex.example_id for ex in examples] == [0, 1, 3, 4, 5, 6, 7]
    assert examples[0].texts == (EN[0], HI[0]) and examples[2].label == 0 and examples[3].label == 1
    mono = tmp_path / "mono.jsonl"
    mono.write_text("".join(json.dumps({"text": t}) + "\n" for t in EN if t), encoding="utf-8")
    mono_plan = plan_corpus(parse_corpus(f"hf:{mono}"), Cleaning(), 100)
    assert not mono_plan.source.parallel and mono_plan.examples == 7
