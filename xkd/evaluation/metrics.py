"""Task metrics for `xkd evaluate --mode classify|tag` and `xkd rdt`.

Span F1 follows conlleval, the script NER results (WikiAnn/PAN-X in XTREME included) are
reported with, so numbers from here compare with published ones. RDT is MergeDistill's
relative deviation from teachers. Pure Python: no model, no numpy.
"""

from __future__ import annotations

from collections.abc import Iterable

Span = tuple[str, int, int]


def _is_span_tag(tag: str) -> bool:
    return tag.startswith(("B-", "I-")) and len(tag) > 2


def bio_spans(tags: list[str]) -> set[Span]:
    """The (type, start, end_exclusive) spans of one sentence's BIO tags, as conlleval reads them.

    "B-X" starts a span of type X. "I-X" continues the open span when that span has type X;
    otherwise (after "O", at the start, or after a span of another type) it starts a new
    span of type X, as conlleval does, rather than being dropped. "O" closes the open span.
    Any other tag raises ValueError naming it.
    """
    spans: set[Span] = set()
    open_type: str | None = None
    open_start = 0
    for position, tag in enumerate(tags):
        if tag == "O":
            prefix, span_type = "O", None
        elif _is_span_tag(tag):
            prefix, span_type = tag[0], tag[2:]
        else:
            raise ValueError(f"tag {tag!r} at position {position} is not BIO: expected 'O', 'B-TYPE' or 'I-TYPE'")
        if prefix == "I" and span_type == open_type:
            continue
        if open_type is not None:
            spans.add((open_type, open_start, position))
        open_type, open_start = span_type, position
    if open_type is not None:
        spans.add((open_type, open_start, len(tags)))
    return spans


def is_bio(tag_names: Iterable[str]) -> bool:
    """Whether a tag set is BIO (so `xkd evaluate --mode tag` reports span F1) rather than, say, POS.

    Every tag must be "O" or start with "B-"/"I-", and at least one must be a span tag: a
    set of only "O" has no spans, and POS tags such as NOUN or X are not BIO.
    """
    tag_names = list(tag_names)
    return any(map(_is_span_tag, tag_names)) and all(tag == "O" or _is_span_tag(tag) for tag in tag_names)


def _check_aligned(gold: list[list[str]], pred: list[list[str]]) -> None:
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold sentences but {len(pred)} predicted; give one prediction per sentence")
    for index, (gold_tags, pred_tags) in enumerate(zip(gold, pred)):
        if len(gold_tags) != len(pred_tags):
            raise ValueError(f"sentence {index}: {len(gold_tags)} gold tags but {len(pred_tags)} predicted; "
                             "give one predicted tag per token")


def _ratio(numerator: int, denominator: int) -> float:
    # An empty denominator scores 0.0, as conlleval prints it, so a run with no spans is
    # reported (and averaged) instead of becoming NaN.
    return numerator / denominator if denominator else 0.0


def span_f1(gold: list[list[str]], pred: list[list[str]]) -> dict:
    """Micro-averaged span precision, recall and F1 over all sentences, with the span counts.

    A predicted span is correct when its type, start and end all match a gold span of the
    same sentence. Scores whose denominator is 0 are 0.0. Raises ValueError when the
    sentence counts or any sentence's lengths differ, or a tag is not BIO.
    """
    _check_aligned(gold, pred)
    gold_count = predicted_count = correct_count = 0
    for gold_tags, pred_tags in zip(gold, pred):
        gold_spans, pred_spans = bio_spans(gold_tags), bio_spans(pred_tags)
        gold_count += len(gold_spans)
        predicted_count += len(pred_spans)
        correct_count += len(gold_spans & pred_spans)
    precision = _ratio(correct_count, predicted_count)
    recall = _ratio(correct_count, gold_count)
    return {
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * correct_count, gold_count + predicted_count),
        "gold_spans": gold_count,
        "predicted_spans": predicted_count,
        "correct_spans": correct_count,
    }


def token_accuracy(gold: list[list[str]], pred: list[list[str]]) -> float:
    """The fraction of tokens whose predicted tag equals the gold tag, over all sentences.

    Raises ValueError when the lengths differ or there are no tokens at all (an accuracy
    over nothing is not 0).
    """
    _check_aligned(gold, pred)
    total = sum(len(tags) for tags in gold)
    if total == 0:
        raise ValueError("no tokens to score: every sentence is empty")
    correct = sum(g == p for gold_tags, pred_tags in zip(gold, pred) for g, p in zip(gold_tags, pred_tags))
    return correct / total


def relative_deviation(student: float, teacher: float) -> float:
    """100 * (student - teacher) / teacher: positive when the student beats the teacher."""
    if teacher == 0:
        raise ValueError("the teacher's score is 0, so a deviation relative to it is undefined")
    return 100 * (student - teacher) / teacher


def rdt(student: dict[str, float], teachers: dict[str, dict[str, float]]) -> dict:
    """MergeDistill's relative deviation from teachers (RDT, in %), per pair and averaged.

    Sign: Eq. 3 of the MergeDistill paper prints (P_T - P_S) / P_T, but its tables and text
    use the opposite sign (Student_similar "outperforms" its teachers with RDT +0.6; a
    deviation of 5% or less is "RDT >= -5%"). This follows the tables:
    deviation = 100 * (P_S - P_T) / P_T, positive when the student beats the teacher.

    `student` maps a language to the student's score; `teachers` maps a teacher name to
    its per-language scores. Every language a teacher has must be one the student has
    (ValueError otherwise); student languages no teacher covers are ignored. Returns:

    - "per_language": {language: {teacher: deviation}}
    - "per_teacher": {teacher: mean deviation over that teacher's languages}
    - "rdt": the mean over every (language, teacher) pair
    - "languages": the sorted languages with at least one pair; "pairs": the pair count

    The two readings in the paper are both covered. With one monolingual teacher per
    language (Table 2), "rdt" is exactly Eq. 3's average over the n languages. With one
    multilingual teacher over many languages (Table 4, RDT(Student, mBERT)), it is that
    teacher's "per_teacher" value (and "rdt" too when it is the only teacher).
    """
    if not teachers:
        raise ValueError("no teacher scores given: RDT compares the student with at least one teacher")
    per_language: dict[str, dict[str, float]] = {}
    per_teacher: dict[str, float] = {}
    for teacher, scores in teachers.items():
        if not scores:
            raise ValueError(f"teacher {teacher!r} has no scores, so the student cannot be compared with it")
        missing = sorted(set(scores) - set(student))
        if missing:
            raise ValueError(f"teacher {teacher!r} has scores for {', '.join(missing)} but the student does not; "
                             f"the student has {', '.join(sorted(student)) or 'no languages'}")
        deviations = []
        for language, teacher_score in scores.items():
            if teacher_score == 0:
                raise ValueError(f"teacher {teacher!r} scores 0 on {language}, so a deviation from it is undefined")
            deviation = relative_deviation(student[language], teacher_score)
            per_language.setdefault(language, {})[teacher] = deviation
            deviations.append(deviation)
        per_teacher[teacher] = sum(deviations) / len(deviations)
    all_deviations = [deviation for by_teacher in per_language.values() for deviation in by_teacher.values()]
    return {
        "per_language": per_language,
        "per_teacher": per_teacher,
        "rdt": sum(all_deviations) / len(all_deviations),
        "languages": sorted(per_language),
        "pairs": len(all_deviations),
    }
