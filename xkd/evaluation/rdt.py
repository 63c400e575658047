"""`xkd rdt`: MergeDistill's relative deviation from teachers (RDT, Eq. 3) per language, from
the JSON of `xkd evaluate --mode classify|tag` runs: one of the student (or one per
language) and one per teacher. The arithmetic is metrics.rdt."""

from __future__ import annotations

import math
import sys
from pathlib import Path

from ..errors import BadInput
from ..storage.untrusted import parse_json
from .metrics import rdt


def _read_result(item: str, option: str) -> tuple[str, dict, list[str] | None]:
    """(name, evaluate --json object, languages to keep or None) from FILE[@LANG,LANG]."""
    path, at, langs = item.rpartition("@") if "@" in item else (item, "", "")
    file = Path(path)
    if not file.is_file():
        problem = "is a directory" if file.is_dir() else "does not exist"
        raise BadInput(f"{option} {item!r}: {file} {problem}. Give the JSON that `xkd evaluate ... --json` printed "
                       "(its last line) or the results.json it wrote.")
    try:
        text = file.read_text(encoding="utf-8")
        try:
            result = parse_json(text)  # a results.json
        except ValueError:  # captured stdout of --json: the object is its last line
            result = parse_json([line for line in text.split("\n") if line.strip()][-1])
    except (ValueError, IndexError, UnicodeDecodeError) as e:
        raise BadInput(f"{option} {item!r}: {file} is not the JSON of an xkd evaluation ({e}).") from None
    if not isinstance(result, dict) or "metric" not in result:
        raise BadInput(f"{option} {item!r}: {file} holds no evaluation result (no \"metric\"); give the output of "
                       "`xkd evaluate MODEL --mode classify|tag --json`.")
    if not isinstance(result["metric"], str) or not result["metric"]:
        raise BadInput(f"{option} {item!r}: in {file}, \"metric\" is {result['metric']!r}, not the name of a score; give "
                       "the output of `xkd evaluate MODEL --mode classify|tag --json` as it was written.")
    _scores(result, result["metric"], f"{option} {item!r}", file)
    keep = [lang.strip() for lang in langs.split(",") if lang.strip()] if at else None
    return Path(str(result.get("model", path))).name, result, keep


def _scores(result: dict, metric: str, where: str, file: Path) -> dict[str, float]:
    """result[metric] as {language: score}, or one paragraph saying what the file holds instead."""
    scores = result.get(metric)
    if not isinstance(scores, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in scores.values()):
        found = "missing" if scores is None else f"{type(scores).__name__} {str(scores)[:60]}"
        raise BadInput(f"{where}: in {file}, the scores of metric {metric!r} (key \"{metric}\") must be an object "
                       f"{{language: score}} of finite numbers, and they are {found}. Give the output of "
                       "`xkd evaluate MODEL --mode classify|tag --json` as it was written.")
    return scores


def _merged_student(files: list[str]) -> tuple[str, dict]:
    """One student result from one file, or from several (one per language, as when each
    language is fine-tuned in its own run): their per-language scores merged."""
    if not files:
        raise BadInput("give the student's evaluation: STUDENT.json (or one file per language).")
    name, merged = "", {}
    for item in files:
        name, result, keep = _read_result(item, "STUDENT")
        if keep is not None:
            raise BadInput(f"STUDENT {item!r}: languages are chosen per teacher (--teacher FILE@LANG,...), not on the "
                           "student.")
        if not merged:
            merged = dict(result, **{result["metric"]: dict(result[result["metric"]])})
            continue
        if result["metric"] != merged["metric"]:
            raise BadInput(f"STUDENT {item!r} reports {result['metric']}, {files[0]} {merged['metric']}: one task a run.")
        twice = sorted(set(result[result["metric"]]) & set(merged[merged["metric"]]))
        if twice:
            raise BadInput(f"STUDENT files {files[0]} and {item} both score {twice[0]}; give one score per language.")
        merged[merged["metric"]].update(result[result["metric"]])
    return name, merged


def rdt_from_files(students: list[str], teachers: list[str], metric: str | None = None) -> dict:
    if not teachers:
        raise BadInput("give at least one --teacher FILE (the evaluation of a teacher, from xkd evaluate --json).")
    name, student_result = _merged_student(students)
    student = students[0]
    metric = metric or student_result["metric"]
    scores = {}
    for item in teachers:
        teacher, result, keep = _read_result(item, "--teacher")
        if metric not in result or metric not in student_result:
            raise BadInput(f"metric {metric!r} is not in both {student} and {item}; they report "
                           f"{student_result['metric']} and {result['metric']}. Evaluate them on the same task.")
        if result.get("mode") != student_result.get("mode") or result.get("train") != student_result.get("train"):
            # Not an error: the same task may sit at other paths. But the reader must know.
            sys.stderr.write(f"xkd rdt: note: {item} was fine-tuned on {result.get('train')} and the student on "
                             f"{student_result.get('train')}; check that they are the same task.\n")
        values = _scores(result, metric, f"--teacher {item!r}", Path(item.rpartition("@")[0] or item))
        _scores(student_result, metric, f"STUDENT {student!r}", Path(student))
        if keep is not None:
            unknown = [lang for lang in keep if lang not in values]
            if unknown:
                raise BadInput(f"--teacher {item!r}: {unknown[0]} is not among its languages ({', '.join(values)}).")
            values = {lang: values[lang] for lang in keep}
        while teacher in scores:
            teacher += "'"
        scores[teacher] = values
    try:
        out = rdt(student_result[metric], scores)
    except ValueError as e:
        raise BadInput(f"xkd rdt: {e}.") from None
    return {"student": name, "metric": metric, "teachers": scores, "student_scores": student_result[metric], **out,
            "sign": "100 * (student - teacher) / teacher: positive when the student is better (the paper's tables)"}


def format_rdt(result: dict) -> str:
    teachers = list(result["teachers"])
    width = max(20, *(len(t) + 2 for t in teachers))  # a cell: "0.1234 (+12.3%)"
    lines = [f"RDT of {result['student']} on {result['metric']} ({result['sign']})",
             f"{'language':<10}{'student':>9}" + "".join(f"{t:>{width}}" for t in teachers)]
    for lang in result["languages"]:
        cells = []
        for t in teachers:
            deviation = result["per_language"][lang].get(t)
            cells.append(f"{result['teachers'][t][lang]:.4f} ({deviation:+.1f}%)" if deviation is not None else "-")
        lines.append(f"{lang:<10}{result['student_scores'][lang]:>9.4f}" + "".join(f"{c:>{width}}" for c in cells))
    lines.append("RDT per teacher: " + ", ".join(f"{t} {v:+.2f}%" for t, v in result["per_teacher"].items()))
    lines.append(f"RDT over all {result['pairs']} (language, teacher) pairs: {result['rdt']:+.2f}%")
    return "\n".join(lines)
