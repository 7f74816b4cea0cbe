"""The import contract of pyproject.toml ([tool.importlinter]) holds, and it catches an upward import."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def _lint(src: Path) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin"}
    return subprocess.run([str(LINT), "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=src,
                          env=env, capture_output=True, text=True, timeout=120)


def test_the_tree_keeps_the_import_contract():
    run = _lint(ROOT / "src")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "2 kept, 0 broken" in run.stdout


def test_an_upward_import_and_a_cycle_break_the_contract(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT / "src" / "lmforge", src / "lmforge", ignore=shutil.ignore_patterns("__pycache__"))
    layers = src / "lmforge" / "models" / "layers.py"  # a model block reaching up into the training loop
    layers.write_text(layers.read_text() + "\n\ndef _bad():\n    from lmforge.training.loop import train\n")
    report = src / "lmforge" / "evaluation" / "report.py"  # and report <-> compare in a cycle again
    report.write_text(report.read_text() + "\n\ndef _cycle():\n    from lmforge.evaluation import compare\n")
    run = _lint(src)
    assert run.returncode != 0
    assert "0 kept, 2 broken" in run.stdout
    assert "lmforge.models.layers -> lmforge.training.loop" in run.stdout
    assert "- .report -> .compare (1 import)" in run.stdout  # the cycle, and the import that breaks it


def _imports(graph, module: str) -> set[str]:
    """What ``module`` imports directly; ``from pkg import sub`` counts as importing ``pkg`` too (its
    ``__init__`` runs first, so a package whose ``__init__`` imports its modules is in a cycle with them)."""
    out = set()
    for imported in graph.find_modules_directly_imported_by(module):
        out.add(imported)
        parent = imported.rpartition(".")[0]
        for detail in graph.get_import_details(importer=module, imported=imported):
            if detail["line_contents"].startswith(f"from {parent} import "):
                out.add(parent)
    return out


def _cycles(graph) -> list[list[str]]:
    """Strongly connected components of more than one module in the direct-import graph (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in _imports(graph, v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def test_no_module_level_import_cycle_at_all():
    """acyclic_siblings does not see a cycle through a package's own __init__ (``from lmforge.cli import options``
    inside lmforge.cli's modules, whose __init__ imports main, which imports them): check every module."""
    import grimp

    assert _cycles(grimp.build_graph("lmforge", include_external_packages=False)) == []
