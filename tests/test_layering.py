"""The lint's own checks of the package. tools/check_layers.py: the package imports along the
direction of docs/design.md ("Packages and layering"), and the check really catches each kind
of import against it (planted in a copy of the package). tools/check_size.py: no function runs
past 60 lines without a comment saying why, and the check catches one that does."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "tools" / "check_layers.py"
CHECK_SIZE = ROOT / "tools" / "check_size.py"


def check(package: Path, tool: Path = CHECK) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(tool), str(package)], capture_output=True, text=True, timeout=60)


def test_the_package_imports_along_the_layers():
    r = check(ROOT / "xkd")
    assert r.returncode == 0, r.stdout + r.stderr


def plant(path: Path, line: str, *, in_function: bool = False) -> None:
    text = path.read_text(encoding="utf-8")
    code = f"\n\ndef _planted():\n    {line}\n" if in_function else f"\n{line}\n"
    path.write_text(text + code, encoding="utf-8")


def test_each_rule_catches_a_planted_import(tmp_path):
    package = tmp_path / "xkd"
    shutil.copytree(ROOT / "xkd", package, ignore=shutil.ignore_patterns("__pycache__", "data"))
    plant(package / "storage" / "shard.py", "from ..vocab import load_vocab", in_function=True)
    plant(package / "storage" / "reader.py", "from .. import names")
    plant(package / "names.py", "import xkd.storage")
    plant(package / "vocab" / "build.py", "from ..pipeline.corpus import read_corpus", in_function=True)
    plant(package / "vocab" / "union.py", "from xkd.student import run")
    plant(package / "student" / "methods" / "xd.py", "from ...pipeline import teachers", in_function=True)
    plant(package / "evaluation" / "downstream.py", "from ..cli import app", in_function=True)
    plant(package / "student" / "export.py", "from ..evaluation import MODES", in_function=True)
    plant(package / "evaluation" / "tasks.py", "from ..pipeline.corpus import plan_corpus", in_function=True)
    plant(package / "readers.py", "from .names import parse_corpus", in_function=True)
    plant(package / "student" / "run.py", "from .. import cli")
    # allowed: storage's own modules and errors, a method importing the vocab and storage layers
    plant(package / "storage" / "view.py", "from ..errors import BadInput\nfrom . import shard")
    plant(package / "student" / "methods" / "mlm.py", "from ...vocab import load_vocab")
    plant(package / "evaluation" / "finetune.py", "from ..pipeline.tokenize import load_tokenizer", in_function=True)
    r = check(package)
    assert r.returncode == 1
    lines = r.stdout.strip().split("\n")
    flagged = {line.split(":")[0].split("xkd/", 1)[1] for line in lines}
    assert flagged == {"storage/shard.py", "storage/reader.py", "names.py", "vocab/build.py", "vocab/union.py",
                       "student/methods/xd.py", "evaluation/downstream.py", "student/run.py", "student/export.py",
                       "evaluation/tasks.py", "readers.py"}, r.stdout
    assert any("nothing imports the CLI" in line for line in lines)
    assert any("a method never imports pipeline" in line for line in lines)
    assert any("evaluation sits above xkd.student" in line for line in lines)


def test_no_function_in_the_package_is_long_without_saying_why():
    r = check(ROOT / "xkd", CHECK_SIZE)
    assert r.returncode == 0, r.stdout + r.stderr


def function(name: str, body_lines: int, above: str = "") -> str:
    return f"{above}\ndef {name}():\n" + "".join(f"    x{i} = {i}\n" for i in range(body_lines))


def test_a_long_function_is_caught_unless_a_comment_says_why(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "a.py").write_text(function("short", 59) + function("long", 60) + function("justified", 80, "# Long: why"))
    (package / "b.py").write_text(function("decorated", 70, "# Long: why\n@staticmethod"))
    r = check(package, CHECK_SIZE)
    assert r.returncode == 1
    assert [line.split(": ")[1].split(" is ")[0] for line in r.stdout.strip().split("\n")] == ["long"], r.stdout
