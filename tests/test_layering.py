"""The package's layering holds: the import-linter contracts of pyproject.toml (no cycles, wings in layers, a report
and a store that never import torch, methods that never import the run wing, click only in the commands), and the
report and store wings really import without torch."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT = Path(sys.executable).with_name("lint-imports")


def installed_tree(dest: Path) -> Path:
    """The package as it is installed (methods/ and datasets/ are mapped to mugcp_bench.methods and .datasets by
    setuptools' package-dir), copied to `dest`: import-linter reads packages from the file system."""
    pkg = dest / "mugcp_bench"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "mugcp_bench", pkg, ignore=ignore)
    shutil.copytree(ROOT / "methods", pkg / "methods", ignore=ignore)
    shutil.copytree(ROOT / "datasets", pkg / "datasets", ignore=ignore)
    return dest


def test_import_contracts_hold(tmp_path):
    tree = installed_tree(tmp_path)
    res = subprocess.run(
        [str(LINT), "--no-cache", str(ROOT / "pyproject.toml")],
        cwd=tree,
        env={"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert "0 broken" in res.stdout and "BROKEN" not in res.stdout


@pytest.mark.parametrize(
    "module",
    ["mugcp_bench.report.aggregate", "mugcp_bench.report.plots", "mugcp_bench.store.records",
     "mugcp_bench.store.claims", "mugcp_bench.commands.report"],
)  # fmt: skip
def test_the_report_and_the_store_import_without_torch(module):
    code = f"import sys, {module}; bad = [m for m in ('torch', 'open_clip') if m in sys.modules]; assert not bad, bad"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
