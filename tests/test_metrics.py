"""xkd.evaluation.metrics on hand-worked examples: conlleval span rules, span F1 counts, token accuracy,
and RDT with the sign MergeDistill's tables use."""

from __future__ import annotations

import pytest

from xkd.evaluation.metrics import bio_spans, is_bio, rdt, relative_deviation, span_f1, token_accuracy


def test_b_starts_a_span_and_o_closes_it():
    assert bio_spans(["B-PER", "I-PER", "O", "B-LOC"]) == {("PER", 0, 2), ("LOC", 3, 4)}
    assert bio_spans([]) == set()
    assert bio_spans(["O", "O"]) == set()


def test_i_after_o_or_at_the_start_starts_a_span():
    assert bio_spans(["O", "I-PER", "I-PER", "O"]) == {("PER", 1, 3)}
    assert bio_spans(["I-MISC", "O"]) == {("MISC", 0, 1)}


def test_i_of_another_type_starts_a_new_span():
    assert bio_spans(["B-PER", "I-LOC", "I-LOC"]) == {("PER", 0, 1), ("LOC", 1, 3)}


def test_two_b_tags_are_two_spans():
    assert bio_spans(["B-PER", "B-PER"]) == {("PER", 0, 1), ("PER", 1, 2)}


def test_a_span_running_to_the_end_is_closed():
    assert bio_spans(["O", "B-ORG", "I-ORG"]) == {("ORG", 1, 3)}


@pytest.mark.parametrize("tag", ["PER", "E-PER", "B-", "b-PER", ""])
def test_tags_that_are_not_bio_are_named(tag):
    with pytest.raises(ValueError, match=f"tag '{tag}' at position 1"):
        bio_spans(["O", tag])


def test_is_bio():
    assert is_bio(["O", "B-PER", "I-PER", "B-LOC", "I-LOC"])
    assert is_bio(["I-PER"])
    assert not is_bio(["NOUN", "VERB", "ADP", "X"])
    assert not is_bio(["O", "B-PER", "X"])
    assert not is_bio(["O"])
    assert not is_bio([])


def test_span_f1_counts_worked_by_hand():
    gold = [
        ["B-PER", "I-PER", "O", "B-LOC"],       # PER(0,2) LOC(3,4)
        ["O", "B-ORG", "I-ORG", "I-ORG", "O"],  # ORG(1,4)
        ["O", "O"],                             # none
        ["B-LOC", "O"],                         # LOC(0,1)
    ]
    pred = [
        ["B-PER", "I-PER", "O", "B-ORG"],       # PER(0,2) correct; ORG(3,4) wrong type
        ["O", "B-ORG", "I-ORG", "O", "B-PER"],  # ORG(1,3) wrong end; PER(4,5) not in gold
        ["B-LOC", "O"],                         # LOC(0,1): matches sentence 4's gold, not this one's
        ["O", "O"],                             # misses LOC(0,1)
    ]
    # gold 4, predicted 5, correct 1: P = 1/5, R = 1/4, F1 = 2PR / (P + R) = (2/20) / (9/20) = 2/9.
    scores = span_f1(gold, pred)
    assert (scores["gold_spans"], scores["predicted_spans"], scores["correct_spans"]) == (4, 5, 1)
    assert scores["precision"] == pytest.approx(1 / 5)
    assert scores["recall"] == pytest.approx(1 / 4)
    assert scores["f1"] == pytest.approx(2 / 9)


def test_span_f1_perfect_prediction():
    gold = [["B-PER", "I-PER", "O"], ["I-LOC", "B-LOC"]]
    scores = span_f1(gold, [list(tags) for tags in gold])
    assert (scores["precision"], scores["recall"], scores["f1"]) == (1.0, 1.0, 1.0)
    assert scores["correct_spans"] == scores["gold_spans"] == 3


def test_span_f1_with_empty_denominators_is_zero_not_nan():
    gold = [["B-PER", "I-PER", "O"]]
    nothing_predicted = span_f1(gold, [["O", "O", "O"]])
    assert (nothing_predicted["precision"], nothing_predicted["recall"], nothing_predicted["f1"]) == (0.0, 0.0, 0.0)
    assert nothing_predicted["predicted_spans"] == 0
    no_spans_anywhere = span_f1([["O"]], [["O"]])
    assert (no_spans_anywhere["precision"], no_spans_anywhere["recall"], no_spans_anywhere["f1"]) == (0.0, 0.0, 0.0)


def test_span_f1_rejects_misaligned_input():
    with pytest.raises(ValueError, match="sentence 1: 2 gold tags but 1 predicted"):
        span_f1([["O"], ["O", "O"]], [["O"], ["O"]])
    with pytest.raises(ValueError, match="2 gold sentences but 1 predicted"):
        span_f1([["O"], ["O"]], [["O"]])


def test_token_accuracy():
    # 3 tokens, the second one wrong.
    assert token_accuracy([["NOUN", "VERB"], ["ADP"]], [["NOUN", "ADJ"], ["ADP"]]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="no tokens"):
        token_accuracy([[]], [[]])
    with pytest.raises(ValueError, match="sentence 0"):
        token_accuracy([["NOUN"]], [["NOUN", "VERB"]])


def test_relative_deviation_is_positive_when_the_student_wins():
    assert relative_deviation(0.9, 0.75) == pytest.approx(100 * (0.9 - 0.75) / 0.75)
    assert relative_deviation(0.6, 0.75) < 0
    with pytest.raises(ValueError, match="0"):
        relative_deviation(0.5, 0.0)


def test_rdt_one_multilingual_teacher():
    result = rdt({"en": 0.80, "hi": 0.66}, {"mbert": {"en": 0.82, "hi": 0.60}})
    en = 100 * (0.80 - 0.82) / 0.82  # -2.44: the student is behind the teacher
    hi = 100 * (0.66 - 0.60) / 0.60  # +10.0: the student beats the teacher
    assert result["per_language"]["en"]["mbert"] == pytest.approx(en)
    assert result["per_language"]["hi"]["mbert"] == pytest.approx(hi)
    assert result["per_teacher"]["mbert"] == pytest.approx((en + hi) / 2)
    assert result["rdt"] == pytest.approx((en + hi) / 2)
    assert result["languages"] == ["en", "hi"]
    assert result["pairs"] == 2


def test_rdt_monolingual_teachers_ignores_uncovered_student_languages():
    result = rdt({"en": 0.9, "de": 0.8, "fr": 0.5}, {"bert": {"en": 0.92}, "deepset": {"de": 0.75}})
    en = 100 * (0.9 - 0.92) / 0.92
    de = 100 * (0.8 - 0.75) / 0.75
    assert result["per_language"] == {"en": {"bert": pytest.approx(en)}, "de": {"deepset": pytest.approx(de)}}
    assert result["per_teacher"] == {"bert": pytest.approx(en), "deepset": pytest.approx(de)}
    assert result["rdt"] == pytest.approx((en + de) / 2)
    assert result["languages"] == ["de", "en"]
    assert result["pairs"] == 2


def test_rdt_two_teachers_on_one_language():
    result = rdt({"hi": 70.0, "en": 80.0}, {"mbert": {"hi": 60.0, "en": 82.0}, "muril": {"hi": 75.0}})
    mbert_hi, mbert_en, muril_hi = 100 * (70 - 60) / 60, 100 * (80 - 82) / 82, 100 * (70 - 75) / 75
    assert result["per_language"]["hi"] == {"mbert": pytest.approx(mbert_hi), "muril": pytest.approx(muril_hi)}
    assert result["per_teacher"]["mbert"] == pytest.approx((mbert_hi + mbert_en) / 2)
    assert result["per_teacher"]["muril"] == pytest.approx(muril_hi)
    assert result["rdt"] == pytest.approx((mbert_hi + mbert_en + muril_hi) / 3)
    assert result["pairs"] == 3


def test_rdt_matches_the_signs_in_mergedistill_table_2():
    # Student_similar, NER F1: the paper reports RDT +0.6 (the student beats its teachers).
    similar = rdt({"en": 89.8, "de": 93.9, "it": 95.2, "es": 94.7},
                  {"BERT": {"en": 89.5}, "DeepsetBERT": {"de": 93.0}, "ItalianBERT": {"it": 94.5}, "BETO": {"es": 94.2}})
    assert round(similar["rdt"], 1) == 0.6
    # Student_dissimilar, UDPOS F1: the paper reports RDT -1.1.
    dissimilar = rdt({"ar": 96.4, "zh": 96.8, "en": 96.3, "fi": 95.5, "tr": 92.9},
                     {"AraBERT": {"ar": 96.3}, "ChineseBERT": {"zh": 96.9}, "BERT": {"en": 96.6},
                      "FinBERT": {"fi": 97.9}, "BERTurk": {"tr": 95.6}})
    assert round(dissimilar["rdt"], 1) == -1.1


def test_rdt_errors():
    with pytest.raises(ValueError, match="'mbert' has scores for ta but the student does not"):
        rdt({"en": 0.8}, {"mbert": {"en": 0.8, "ta": 0.5}})
    with pytest.raises(ValueError, match="no teacher scores"):
        rdt({"en": 0.8}, {})
    with pytest.raises(ValueError, match="'mbert' has no scores"):
        rdt({"en": 0.8}, {"mbert": {}})
    with pytest.raises(ValueError, match="'mbert' has scores for en but the student does not"):
        rdt({}, {"mbert": {"en": 0.8}})
    with pytest.raises(ValueError, match="'mbert' scores 0 on en"):
        rdt({"en": 0.8}, {"mbert": {"en": 0.0}})
