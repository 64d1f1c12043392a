"""The real `mugcp-bench` entry point run in-process, and the run records a command left (shared by the CLI tests)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mugcp_bench.commands.cli import main
from mugcp_bench.store.records import iter_run_files


def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run the real entry point in-process; returns (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def records(results: Path) -> list[dict]:
    """Every run.json under a results directory, parsed."""
    return [json.loads(p.read_text()) for p in iter_run_files(results)]
