"""Zero-shot transfer to Hindi on a labelled task: an English-only teacher, a Hindi student.

    ./dev experiment zero-shot [--seeds 3] [--steps 300] [--batch-size 16] [--lr 1e-4]

The task (experiments/zero_shot_task.py): IITB validation sentences labelled by topic
(religion, software, government) from their English side, balanced, 150 test sentences per
class in both languages; IITB's test split is not used. Chance is 1/3.

The recipe, every step a command a user would type, timed with one clock:
1. `xkd finetune-teacher --base minilm`: the real MiniLM fine-tuned on the English training
   sentences only: the teacher.
2. `xkd evaluate TEACHER --as-is` on the English and the Hindi test sentences: the teacher's
   own Hindi score (MiniLM's uncased normaliser strips Devanagari's combining marks).
3. `xkd cache-teachers --class-logits` over translation pairs (IITB train plus every
   validation pair but the test pairs, unlabelled): the teacher's class logits of each
   English side, cached once.
4. `xkd build-vocab`: the teacher's vocabulary with mBERT's for Hindi.
5. For each seed, `xkd train-student --method xd --option target=class_logits --init-from
   TEACHER`: the student's logits of the Hindi side (and of the English side) pulled onto the
   teacher's logits of the English side (XD), and `xkd evaluate STUDENT --as-is`. No Hindi
   label is ever read: Hindi is zero-shot.

Writes docs/zero-shot.md (its "## Reading the numbers" section is written by hand and kept).
About 16 minutes on 2 idle CPU cores with the defaults (52 while they were shared with other work).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from minilm_en_hi import IITB, ROOT, XKD, build_vocab, command_rows, fresh_work, run, write_keeping_hand_written  # noqa: E402
from zero_shot_task import TOPICS, build_task, read_lines, write_task  # noqa: E402

REPORT = ROOT / "docs" / "zero-shot.md"
LANGUAGES = ("en", "hi")


def prepare_task(args, work: Path):
    task = build_task(read_lines(IITB / "val.en"), read_lines(IITB / "val.hi"), test_per_class=args.test_per_class,
                      more_pairs=(read_lines(IITB / "train.en"), read_lines(IITB / "train.hi")))
    return task, write_task(task, work / "task")


def test_specs(files: dict) -> list:
    return [a for lang in LANGUAGES for a in ("--test", f"labeled:{files[f'test.{lang}']}@{lang}")]


def score(model: Path, files: dict, work: Path, log: list) -> dict:
    """{lang: accuracy} of a classifier's own head on the test sentences."""
    result, _ = run([XKD, "evaluate", model, "--mode", "classify", "--as-is", *test_specs(files),
                     "--out", work / "eval" / model.name, "--json"], log)
    return result["accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="students, seeds 0..N-1")
    parser.add_argument("--steps", type=int, default=300, help="distillation steps per student")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", default="1e-4", help="the student's peak learning rate")
    parser.add_argument("--max-length", type=int, default=48, help="student tokens per text")
    parser.add_argument("--max-tokens", type=int, default=48, help="longest cached pair, in teacher tokens")
    parser.add_argument("--test-per-class", type=int, default=150)
    parser.add_argument("--teacher-epochs", type=int, default=3)
    parser.add_argument("--work", default=str(ROOT / "runs" / "zero-shot"))
    args = parser.parse_args()
    work = fresh_work(args.work)
    log: list = []
    t0 = time.perf_counter()

    task, files = prepare_task(args, work)
    teacher = work / "teacher"
    run([XKD, "finetune-teacher", "--base", "minilm", "--data", f"labeled:{files['train.en']}@en", "--out", teacher,
         "--epochs", args.teacher_epochs, "--lr", "5e-5", "--batch-size", 16, "--held-out", 0, "--json"], log)
    teacher_accuracy = score(teacher, files, work, log)
    cached, _ = run([XKD, "cache-teachers", "--teacher", teacher, "--corpus",
                     f"parallel:{files['pairs.en']}@en,{files['pairs.hi']}@hi", "--sides", "src", "--class-logits",
                     "--max-tokens", args.max_tokens, "--out", work / "caches", "--json"], log)
    cache = cached["caches"][0]
    vocab = build_vocab(work, log, teacher)
    students = {}
    for seed in range(args.seeds):
        out = work / f"student-seed{seed}"
        _, timing = run([XKD, "train-student", "--method", "xd", "--option", "target=class_logits",
                         "--option", f"max_length={args.max_length}", "--caches", cache["path"], "--vocab", vocab,
                         "--init-from", teacher, "--steps", args.steps, "--batch-size", args.batch_size, "--lr", args.lr,
                         "--warmup", "0.1", "--seed", seed, "--log-every", 25, "--out", out, "--json"], log)
        students[seed] = score(out, files, work, log), timing

    total = time.perf_counter() - t0
    write_report(args, task, cache, teacher_accuracy, students, log, total)


def mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):.3f} ± {std:.3f}"


# Long: the report is one page of text, tables and the command log, written in order.
def write_report(args, task, cache: dict, teacher: dict, students: dict, log: list, total: float) -> None:
    chance = 1 / len(TOPICS)
    student_scores = {lang: [accuracy[lang] for accuracy, _ in students.values()] for lang in LANGUAGES}
    lines = [
        "# Zero-shot transfer to Hindi: a task result on CPU",
        "",
        f"Run with `./dev experiment zero-shot --seeds {args.seeds} --steps {args.steps} --batch-size {args.batch_size} "
        f"--lr {args.lr}` (experiments/zero_shot_hi.py) on {date.today().isoformat()}, 2-core CPU, no GPU. "
        f"Total wall time: **{total / 60:.1f} min**.",
        "",
        "**Task.** IITB English-Hindi validation pairs labelled by topic from their English side: a sentence "
        "naming a word of exactly one topic's list (" + ", ".join(TOPICS) + "; experiments/zero_shot_task.py) "
        f"takes that topic. Balanced: {task.per_class} sentences per topic drawn, {args.test_per_class} per topic "
        f"kept for the test ({len(task.test)} sentences, each in English and in its Hindi translation), the other "
        f"{len(task.train)} English sentences for the teacher's training. Chance is {chance:.3f}. IITB's test split "
        "is not used. The label survives translation: the Hindi side names a word of the same topic in "
        + ", ".join(f"{share:.0%} ({topic})" for topic, share in task.hindi_agreement.items())
        + " of the sentences (a short Hindi word list, so a lower bound; never used to label or to select).",
        "",
        "**Recipe.** The teacher is the real MiniLM (all-MiniLM-L6-v2) fine-tuned on the English training "
        "sentences. The student is the teacher with a union vocabulary (its own for English, mBERT's for Hindi; "
        "docs/vocab.md), distilled with XD over translation pairs: its class logits of the Hindi side and of the "
        f"English side pulled onto the teacher's logits of the English side. Pairs: IITB train and the validation "
        f"pairs outside the test, unlabelled, {cache['rows']:,} cached; each student sees "
        f"{args.steps * args.batch_size:,} of them ({args.steps} steps of {args.batch_size}, lr {args.lr}). "
        "No Hindi label is read anywhere: Hindi is zero-shot.",
        "",
        "## Accuracy",
        "",
        "| model | English | Hindi (zero-shot) | training wall s | training CPU s |",
        "|---|---:|---:|---:|---:|",
        f"| chance | {chance:.3f} | {chance:.3f} | | |",
        f"| teacher (MiniLM fine-tuned on English, its own tokenizer) | {teacher['en']:.3f} | {teacher['hi']:.3f} | | |",
    ]
    for seed, (accuracy, timing) in students.items():
        lines.append(f"| student, seed {seed} | {accuracy['en']:.3f} | {accuracy['hi']:.3f} | "
                     f"{timing['seconds']:.0f} | {timing['cpu_seconds']:.0f} |")
    lines += [
        f"| **student, mean ± std over {len(students)} seeds** | {mean_std(student_scores['en'])} | "
        f"**{mean_std(student_scores['hi'])}** | | |",
        "",
        f"Hindi, student mean − chance: **{100 * (statistics.mean(student_scores['hi']) - chance):+.1f} points**; "
        f"student mean − teacher: {100 * (statistics.mean(student_scores['hi']) - teacher['hi']):+.1f} points. "
        f"The binomial standard error of one accuracy near 0.5 on {len(task.test)} sentences is "
        f"{100 * (0.25 / len(task.test)) ** 0.5:.1f} points; std is over seeds (n − 1).",
        "",
        "## Commands and times",
        "",
        *command_rows(log),
        "",
    ]
    previous = REPORT.read_text() if REPORT.exists() else ""
    print(write_keeping_hand_written(REPORT, previous, lines))


if __name__ == "__main__":
    main()
