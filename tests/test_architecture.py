"""The package's layering, checked from the module graph.

Imports only point down: faces (CLI, viewer) -> reports -> inference / training -> bundle ->
evaluation / models -> io -> errors. Layers of equal rank do not import each other (inference
never imports training's loop, io knows no model), and nothing below the faces imports a UI
library. Every ``import`` statement counts, including those inside functions and
``TYPE_CHECKING`` blocks: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "xraycls"

RANKS = {
    "xraycls": 0,  # the package's __init__ (version only)
    "xraycls.errors": 0,
    "xraycls.io": 1,
    "xraycls.models": 2,  # weights files are published with io's atomic writer
    "xraycls.evaluation": 2,
    "xraycls.bundle": 3,
    "xraycls.training": 4,
    "xraycls.inference": 4,
    "xraycls.reports": 5,
    "xraycls.viewer": 6,
    "xraycls.cli": 6,
    "xraycls.__main__": 7,  # runs the CLI
}
"""Rank of each top-level part; a module may import only parts of lower rank, or its own part."""

FACES = {"xraycls.viewer", "xraycls.cli", "xraycls.__main__"}
UI_LIBRARIES = {"streamlit", "typer", "click", "rich"}
"""Only faces talk to people. (``rich`` progress bars are created by the CLI and passed down as
callbacks.)"""


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(module: str, path: Path, *, runtime_only: bool = False) -> set[str]:
    """Absolute names of everything ``module`` imports (relative imports resolved).

    ``runtime_only`` leaves out imports under ``if TYPE_CHECKING:``, which cannot form a cycle
    at run time.
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    typing_only: set[int] = set()
    if runtime_only:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                typing_only.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names.add(prefix)
            # ``from xraycls.io import dicom`` imports the submodule xraycls.io.dicom.
            names.update(f"{prefix}.{a.name}" for a in node.names)
    return names


def _part(name: str) -> str | None:
    """The top-level part (a key of RANKS) a module name belongs to, or None if not ours."""
    if name != "xraycls" and not name.startswith("xraycls."):
        return None
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else "xraycls"


MODULES = _modules()


def test_every_module_has_a_layer() -> None:
    unknown = sorted(m for m in MODULES if _part(m) not in RANKS)
    assert not unknown, f"modules outside the layer map (add them to RANKS): {unknown}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module: str) -> None:
    own = _part(module)
    assert own is not None
    bad = []
    for name in sorted(_imports(module, MODULES[module])):
        target = _part(name)
        if target is None or target == own:
            continue
        if target not in RANKS:
            continue  # ``from xraycls import __version__`` and the like resolve to xraycls.X
        if RANKS[target] >= RANKS[own] and target != "xraycls":
            bad.append(f"{name} ({target}, rank {RANKS[target]})")
    assert not bad, f"{module} (rank {RANKS[own]}) imports upward or sideways: {bad}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _part(m) not in FACES))
def test_no_ui_library_below_the_faces(module: str) -> None:
    used = {n.split(".")[0] for n in _imports(module, MODULES[module])} & UI_LIBRARIES
    assert not used, f"{module} imports {sorted(used)}; only the CLI and the viewer may"


def test_no_import_cycles_between_modules() -> None:
    graph = {
        m: {
            n
            for n in _imports(m, p, runtime_only=True)
            if n in MODULES and n != m and n != _package_of(m)
        }
        for m, p in MODULES.items()
    }
    # A package's __init__ re-exporting its modules is not a cycle with them.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if _package_of(n) == m or m.startswith(n + "."):
                continue
            if state.get(n) == 1:
                cycle = [*stack[stack.index(n) :], n]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def _package_of(module: str) -> str:
    return module.rpartition(".")[0]


def test_the_rule_catches_an_upward_import(tmp_path: Path) -> None:
    """The checker itself: an io module importing inference is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from xraycls.inference.predictor import Predictor\n")
    names = _imports("xraycls.io.bad", bad)
    assert "xraycls.inference.predictor" in names
    assert RANKS[_part("xraycls.inference.predictor")] > RANKS[_part("xraycls.io.bad")]
