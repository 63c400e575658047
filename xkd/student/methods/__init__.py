"""The method registry, and `prepare`: the one sequence that turns (method name, options,
caches, vocab) into a method ready to train and its student. train-student, the tests and
the benchmarks all go through it, so nothing reads a method's needs twice.

The contract a method fulfils is in base.py; docs/adding-a-method.md walks through it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from ...errors import BadInput
from ...storage import view_of
from .base import Method, Need, OptionSpec, Plan, option_specs, parse_options

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    specs = option_specs(cls.Config)  # every field declared with option(...), or fail at import
    names = {s.name for s in specs}
    for spec in specs:
        if unknown := [other for other, _ in spec.used_when if other not in names]:
            raise TypeError(f"{cls.__name__}.Config.{spec.name}: used_when names {unknown}, not options of the method")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    _load_builtin()
    if name not in METHODS:
        raise BadInput(f"--method {name!r} is not a known method. Available: {', '.join(sorted(METHODS))}.")
    return METHODS[name]


def available() -> list[str]:
    _load_builtin()
    return sorted(METHODS)


def _load_builtin() -> None:
    # Importing a method module registers it; a new method adds one name here.
    from . import mergedistill, mlm, mmkd, multikd, tinybert, xd  # noqa: F401


@dataclass
class Prepared:
    method: Method
    model: object  # the student: a transformers model
    plan: Plan


def method_config(name: str, options: dict):
    """The method's typed config from `--option` pairs (or a config already parsed)."""
    cls = get_method(name)
    return options if isinstance(options, cls.Config) else parse_options(name, cls.Config, dict(options or {}))


def prepare(name: str, options, caches: list, vocab, *, student=None, init_from: str | None = None,
            init_teacher: str | None = None, total_steps: int = 1, model=None) -> Prepared:
    """Parse the options (a dict, or the config method_config made), plan from the caches
    (storage.Cache objects), build the student (or take `model`, one built_student made
    earlier for the same plan) and the method's heads. Raises BadInput for anything the
    user must change."""
    from ..models import StudentConfig, student_shape

    cls = get_method(name)
    config = method_config(name, options)
    student = student or StudentConfig()
    views = [view_of(c) for c in caches]
    if not cls.reads_sentence_pairs and (paired := [v.path for v in views if v.has_pairs]):
        readers = [m for m in available() if METHODS[m].reads_sentence_pairs]
        raise BadInput(f"--method {name} does not read sentence pairs, but {paired[0]} holds them. Methods that train "
                       f"on pairs: {', '.join(readers)}.")
    plan = cls.plan_for(config, views, student_shape(student, init_from))
    for note in plan.notes:
        warnings.warn(f"--method {name}: {note}.", stacklevel=2)
    if model is None:
        model = cls.build_student(config, plan, vocab, student, init_from, init_teacher)
    method = cls(config, plan, vocab=vocab, total_steps=total_steps)
    method.build_heads(model)
    return Prepared(method, model, plan)


def cannot_use(name: str, options, cache, student=None) -> str | None:
    """Why --method `name` cannot learn from `cache` on its own (a missing output, sentence
    pairs it does not read, ...), or None when it can: how a workspace picks default caches."""
    from ..models import StudentConfig, student_shape

    cls = get_method(name)
    config = method_config(name, options)
    view = view_of(cache)
    if not cls.reads_sentence_pairs and view.has_pairs:
        return "sentence pairs, which this method does not read"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cls.plan_for(config, [view], student_shape(student or StudentConfig()))
    except BadInput as e:
        return str(e).split(". ")[0].removeprefix(f"--method {name} ")
    return None


__all__ = ["METHODS", "Method", "Need", "OptionSpec", "Plan", "Prepared", "available", "get_method", "method_config",
           "prepare", "register", "cannot_use"]
