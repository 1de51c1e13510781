"""The package's shape: layers point one way and no module cycles (import-linter's contracts in
pyproject.toml), checked on every test run so that CI keeps it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[2]


def test_import_contracts_are_kept():
    lint = Path(sys.executable).with_name("lint-imports")
    run = subprocess.run([str(lint), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "2 kept, 0 broken" in run.stdout


def test_data_and_infer_are_siblings_and_core_imports_no_shell():
    """The contract's two claims users rely on, read straight from the import graph: training
    data and inference never import each other, and the pure core never imports Ray's shell."""
    graph = grimp.build_graph("segray")
    for a, b in (("segray.data", "segray.infer"), ("segray.infer", "segray.data")):
        assert not graph.find_illegal_dependencies_for_layers(layers=[b, a]), f"{a} imports {b}"
    shell = ("segray.io", "segray.data", "segray.infer", "segray.train", "segray.cli", "segray.demo")
    for module in graph.find_descendants("segray.core"):
        imported = graph.find_modules_directly_imported_by(module)
        assert not [m for m in imported if m.startswith(shell)], module
