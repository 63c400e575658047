"""Fail when a module of xkd imports against the layering of docs/design.md.

    python tools/check_layers.py [PACKAGE_DIR]     # default: xkd/ next to this file's parent

Dependencies point one way: cli -> pipeline/student -> vocab/storage, and pipeline and vocab
-> names. Checked here, on every import statement (module level or inside a function, since
lazy imports are still dependencies):
- errors, durable and sampling are leaves that every layer may import (durable imports nothing of xkd
  but errors);
- storage imports nothing of xkd but the leaves;
- names imports nothing of xkd but the leaves and families;
- families (the model family declarations) imports nothing of xkd but errors, so that names,
  pipeline, vocab and student may all look a family up;
- vocab imports neither pipeline nor student;
- student/methods never imports pipeline (a method cannot load a teacher);
- lines and sampling (the draws the pipeline makes, the students and verify read) import
  nothing of xkd; readers (the reading rules the pipeline's corpora and
  evaluation's task data share) nothing but errors and lines;
- evaluation sits above vocab, pipeline and student (none of them imports it), and reads task
  data through readers, never through the pipeline's corpus reader;
- nothing imports cli.
Exit 0 when clean; else 1, one line per offending import (file:line: what and which rule).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = "xkd"

# Below every layer: each may import them.
LEAVES = ("xkd.errors", "xkd.durable", "xkd.sampling")

# (modules the rule applies to, the xkd modules they may not import, why)
RULES = [
    ("xkd.durable", lambda target: target != "xkd.errors", "durable imports nothing of xkd but xkd.errors"),
    ("xkd.storage", lambda target: target not in LEAVES,
     "storage imports nothing of xkd but the leaves xkd.errors, xkd.durable and xkd.sampling"),
    ("xkd.names", lambda target: target not in (*LEAVES, "xkd.families"),
     "names imports nothing of xkd but xkd.errors, xkd.durable and xkd.families"),
    ("xkd.families", lambda target: target != "xkd.errors", "families imports nothing of xkd but xkd.errors"),
    ("xkd.vocab", lambda target: target.startswith(("xkd.pipeline", "xkd.student")),
     "vocab sits below pipeline and student"),
    ("xkd.student.methods", lambda target: target.startswith("xkd.pipeline"),
     "a method never imports pipeline (it cannot load a teacher)"),
    ("xkd.lines", lambda target: True, "lines imports nothing of xkd"),
    ("xkd.sampling", lambda target: True, "sampling imports nothing of xkd"),
    ("xkd.readers", lambda target: target not in ("xkd.errors", "xkd.lines"),
     "readers imports nothing of xkd but xkd.errors and xkd.lines"),
    *((layer, lambda target: _within(target, "xkd.evaluation"), f"evaluation sits above {layer}: the CLI and the demo run it")
      for layer in ("xkd.vocab", "xkd.pipeline", "xkd.student")),
    ("xkd.evaluation", lambda target: _within(target, "xkd.pipeline.corpus"),
     "evaluation reads task data through xkd.readers, not the pipeline's corpus reader"),
    ("xkd", lambda target: target == "xkd.cli", "nothing imports the CLI"),
]


def module_name(path: Path, package_dir: Path) -> str:
    parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(tree: ast.AST, module: str, is_package: bool, package_dir: Path):
    """(line, absolute module name) for every import in the tree. `from M import a` imports
    the submodule M.a when there is one (`from . import cli`), else M itself."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            submodules = [f"{target}.{a.name}" for a in node.names if _exists(f"{target}.{a.name}", package_dir)]
            for name in submodules or [target]:
                yield node.lineno, name


def _exists(module: str, package_dir: Path) -> bool:
    path = package_dir.parent.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def violations(package_dir: Path) -> list[str]:
    found = []
    for path in sorted(package_dir.rglob("*.py")):
        module = module_name(path, package_dir)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for line, target in imported_modules(tree, module, path.name == "__init__.py", package_dir):
            if not _within(target, PACKAGE) or target == PACKAGE:
                continue  # outside xkd, or the package root (the path to its submodules)
            for scope, forbidden, why in RULES:
                if not _within(module, scope) or (scope != PACKAGE and _within(target, scope)):
                    continue  # the rule is about other modules; a layer may import itself
                if forbidden(target):
                    found.append(f"{path}:{line}: {module} imports {target} ({why})")
    return found


def _within(module: str, scope: str) -> bool:
    return module == scope or module.startswith(scope + ".")


def main(argv: list[str]) -> int:
    package_dir = Path(argv[0]) if argv else Path(__file__).resolve().parents[1] / PACKAGE
    found = violations(package_dir)
    for line in found:
        print(line)
    if found:
        print(f"{len(found)} import(s) against the layering of docs/design.md (tools/check_layers.py).", file=sys.stderr)
        return 1
    print(f"layering: {sum(1 for _ in package_dir.rglob('*.py'))} modules of {package_dir} import along docs/design.md's layers")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
