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
