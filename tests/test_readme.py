"""The README is true: its examples run and its toy table matches the suite (CONTRIBUTING.md's examples:
tests/test_contributing.py)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_toy_table_matches_the_suite():
    from mugcp_bench.toy.suite import DATASETS

    section = README.read_text().split("## The toy world", 1)[1].split("\n## ", 1)[0]
    rows = [r.split("|")[1:-1] for r in section.splitlines() if r.startswith("| `toy_")]
    seen = []
    for cells in rows:
        names = [n.strip("` ") for n in cells[0].split("/")]
        stem = names[0].rsplit("_", 1)[0]  # `toy_objects_sketch` / `_noisy` -> toy_objects_noisy
        names = [names[0], *(stem + n if n.startswith("_") else n for n in names[1:])]
        for name in names:
            ds = DATASETS[name]
            assert int(cells[2]) == len(ds.classnames), name
            assert float(cells[5]) == round(100 / len(ds.classnames), 1), name
        seen += names
    assert sorted(seen) == sorted(DATASETS)


def test_readme_python_api_example_returns_the_tidy_dataframe(tmp_path, capsys):
    """The API block, pointed at the miniature data and the random tiny backbone, runs and returns the table."""
    from tests.miniature import build_miniature

    (block,) = [b for b in python_blocks() if "run_sweep(" in b]
    root = build_miniature(tmp_path / "data", ["dtd", "eurosat"])
    for old, new in [
        ('"/data/coop"', repr(str(root))),
        ('"ViT-B-16"', '"tiny"'),
        ('"openai"', '"random"'),
        ('"results"', repr(str(tmp_path / "results"))),
        ('"epochs": 2', '"epochs": 1'),
    ]:
        assert old in block, old
        block = block.replace(old, new)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    df = namespace["df"]
    assert len(df) == 2 * 2 * 2 * 2  # methods x datasets x seeds x (base, novel)
    assert set(df["method_label"]) == {"zsclip", "coop"} and set(df["seed"]) == {1, 2}
    assert df["accuracy"].between(0, 100).all() and (df["status"] == "complete").all()
    out = capsys.readouterr().out  # the printed summary: mean and std per method, dataset and class half
    assert "mean" in out and "coop" in out and "eurosat" in out
