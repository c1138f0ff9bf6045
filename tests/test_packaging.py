"""The README's commands, .ci/run and the main job stay true to each other."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return [c.strip() for c in re.findall(r"```bash\n(python3 -m venv .*?)\n```", text)]


def test_readme_has_the_two_fresh_machine_commands():
    cmds = _readme_commands()
    assert len(cmds) == 2, cmds
    assert cmds[0].endswith("python -m bif_fast demo")
    assert cmds[1].endswith("python -m pytest -q tests")
    # Both set up the same way; only the last step differs.
    assert cmds[0].rsplit("&&", 1)[0] == cmds[1].rsplit("&&", 1)[0]


def test_ci_runs_the_readme_test_command_verbatim():
    ci = (ROOT / ".ci" / "run").read_text()
    block = ci.split("# BEGIN README TEST COMMAND")[1].split("\n", 1)[1].split("# END README TEST COMMAND")[0]
    lines = [ln.strip() for ln in block.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    assert lines == [_readme_commands()[1]]


def test_demo_matches_the_closed_form():
    from bif_fast.demo import run_demo

    res = run_demo(draws=4000, quiet=True)
    assert res["rel_err"] <= 10 * res["mc_scale"]
    # And it is a real estimate: fewer draws give a larger error (on this seed).
    assert run_demo(draws=200, quiet=True)["rel_err"] > res["rel_err"]


def test_linear_demo_command_runs():
    out = subprocess.run(
        [sys.executable, "-m", "bif_fast", "demo", "--linear"], capture_output=True, text=True, check=True
    )
    assert "closed form" in out.stdout


def test_readme_python_examples_run(tmp_path):
    blocks = re.findall(r"```python\n(.*?)\n```", (ROOT / "README.md").read_text(), flags=re.S)
    assert len(blocks) >= 4
    for code in blocks:
        # A block that imports an optional integration runs where it is installed (CI's step for it).
        optional = re.findall(r"^from (dattri|devinterp)[. ]", code, flags=re.M)
        if any(importlib.util.find_spec(name) is None for name in optional):
            continue
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=tmp_path)


def test_every_subpackage_is_installed():
    """A regular (non-editable) install ships every package under bif_fast/, not only those an editable
    install happens to find on the path."""
    from setuptools import find_packages

    tree = {str(p.parent.relative_to(ROOT)).replace("/", ".") for p in (ROOT / "bif_fast").rglob("__init__.py")}
    tree = {t for t in tree if "__pycache__" not in t}
    text = (ROOT / "pyproject.toml").read_text()
    include = re.search(r"\[tool\.setuptools\.packages\.find\]\ninclude = \[(.*?)\]", text)
    assert include, "pyproject.toml must find the packages (a hand-kept list misses new subpackages)"
    patterns = [s.strip().strip('"') for s in include.group(1).split(",")]
    found = set(find_packages(str(ROOT), include=patterns))
    assert tree <= found, sorted(tree - found)
