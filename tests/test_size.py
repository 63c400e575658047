"""tools/check_size.py: no function in xkd/ runs past 60 lines without a comment saying why,
and the check catches one that does (planted in a throwaway package)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "tools" / "check_size.py"


def check(package: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CHECK), str(package)], capture_output=True, text=True, timeout=60)


def test_no_function_in_the_package_is_long_without_saying_why():
    r = check(ROOT / "xkd")
    assert r.returncode == 0, r.stdout + r.stderr


def function(name: str, body_lines: int, above: str = "") -> str:
    return f"{above}\ndef {name}():\n" + "".join(f"    x{i} = {i}\n" for i in range(body_lines))


def test_a_long_function_is_caught_unless_a_comment_says_why(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "a.py").write_text(function("short", 59) + function("long", 60) + function("justified", 80, "# Long: why"))
    (package / "b.py").write_text(function("decorated", 70, "# Long: why\n@staticmethod"))
    r = check(package)
    assert r.returncode == 1
    assert [line.split(": ")[1].split(" is ")[0] for line in r.stdout.strip().split("\n")] == ["long"], r.stdout
