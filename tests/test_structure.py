"""The package's shape: cheap imports, public submodules as attributes, no import cycle, no reaching into
another module's private attributes, and functions short enough to read."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "bif_fast"


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout


def test_public_submodules_are_attributes_and_import_stays_light():
    out = _run(
        "import sys, bif_fast\n"
        "print('triton' in sys.modules, 'bif_fast.losses' in sys.modules, 'bif_fast.compat' in sys.modules)\n"
        "fn = bif_fast.losses.causal_lm\n"
        "print(callable(fn), bif_fast.compat.__name__, 'triton' in sys.modules)\n"
        "try:\n    bif_fast.no_such_thing\nexcept AttributeError as e:\n    print('AttributeError', e)\n"
    )
    first, second, third = out.splitlines()
    assert first == "False False False"  # import bif_fast loads neither Triton nor the lazy submodules
    assert second == "True bif_fast.compat False"
    assert third.startswith("AttributeError") and "no_such_thing" in third


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = ast.parse(path.read_text(), str(path))
    return out


def _top_level_imports(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """bif_fast modules imported at module level (imports inside functions are deliberate lazy imports)."""
    found = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module in known:
                found.add(node.module)
            for alias in node.names:
                if f"{node.module}.{alias.name}" in known:
                    found.add(f"{node.module}.{alias.name}")
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in known)
    found.discard(name)
    return found


def test_no_import_cycle():
    mods = _modules()
    graph = {name: _top_level_imports(name, tree, set(mods)) for name, tree in mods.items()}
    # A package's __init__ re-exporting its submodules is not a cycle through them.
    graph = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            assert state.get(d) != 1, f"import cycle: {' -> '.join([*path, m, d])}"
            if d not in state:
                visit(d, [*path, m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


# The compile check compiles the private Triton kernels for sm_90 by design; _C is the compiled extension.
# ATen's own underscore ops (``aten._log_softmax``) are its public operator names, not a module's privates.
_ALLOWED_PRIVATE = {"bif_fast.tools.compile_check": "k._", "bif_fast._ext": "_C", "bif_fast.engine.capture": "aten._"}


def _owned_private_names(tree: ast.Module) -> set[str]:
    """Underscore names a module defines itself: top-level names, classes' members and ``self._x``."""
    owned = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            owned.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            owned.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            owned.add(node.attr)
    return {n for n in owned if n.startswith("_")}


def test_no_module_touches_another_modules_private_names():
    """A module may use its own underscore names (also on other instances of its own classes), never
    another module's: what the parts need of each other is public."""
    mods = _modules()
    offenders = []
    for name, tree in mods.items():
        owned = _owned_private_names(tree)
        allowed = _ALLOWED_PRIVATE.get(name)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bif_fast"):
                offenders += [f"{name}: from {node.module} import {a.name}" for a in node.names
                              if a.name.startswith("_") and not a.name.startswith("__")
                              and f"{node.module}.{a.name}" not in mods and a.name != allowed]  # fmt: skip
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                text = ast.unparse(node)
                if node.attr in owned or (allowed is not None and text.startswith(allowed)):
                    continue
                offenders.append(f"{name}:{node.lineno}: {text}")
    assert not offenders, "\n".join(offenders)


def test_functions_are_short_and_compute_bif_is_thin():
    long = []
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = node.body[1:] if ast.get_docstring(node) is not None else node.body
                lines = body[-1].end_lineno - body[0].lineno + 1 if body else 0
                limit = 60 if node.name == "compute_bif" else 80
                if lines > limit:
                    long.append(f"{name}.{node.name}: {lines} lines (limit {limit})")
    assert not long, "\n".join(long)
