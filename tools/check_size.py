"""Fail when a function in xkd/ runs past 60 lines without saying why.

    python tools/check_size.py [PACKAGE_DIR]     # default: xkd/ next to this file's parent

A long function is usually several steps that want names of their own. Where one reads best
whole (a sequence that must happen in one order under one lock, say), a comment on the line
right above its `def` (or its first decorator) that starts with `# Long:` says why.
Exit 0 when clean; else 1, one line per function (file:line: name, length).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

MAX_LINES = 60
MARK = "# Long:"


def long_functions(path: Path):
    """(line, name, length) of every function in `path` over MAX_LINES lines without the mark."""
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    for node in ast.walk(ast.parse(text)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        length = node.end_lineno - node.lineno + 1
        first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
        above = lines[first - 2].strip() if first >= 2 else ""
        if length > MAX_LINES and not above.startswith(MARK):
            yield node.lineno, node.name, length


def main(argv: list[str]) -> int:
    package = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent.parent / "xkd"
    found = [f"{path}:{line}: {name} is {length} lines (over {MAX_LINES}): split it, or say why above it ({MARK} ...)"
             for path in sorted(package.rglob("*.py")) for line, name, length in long_functions(path)]
    print("\n".join(found)) if found else None
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
