"""The README's extension examples are real code: the method example registers and trains."""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F

README = Path(__file__).parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_method_example_works(tiny_backbone):
    from mugcp_bench.registry import METHODS

    (block,) = [b for b in python_blocks() if "@METHODS.register" in b]
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    try:
        cls = METHODS.get("mine")
        m = cls(tiny_backbone, ["cat", "dog", "car"], cls.Config())
        out = m(torch.randn(2, 3, 32, 32))
        assert out.logits.shape == (2, 3)
        F.cross_entropy(out.logits, torch.tensor([0, 1])).backward()
        assert m.ctx.grad is not None and m.n_trainable() == 4 * tiny_backbone.text_width
        m.set_classnames(["a", "b"])
        assert m(torch.randn(1, 3, 32, 32)).logits.shape == (1, 2)
    finally:
        METHODS.unregister("mine")


def test_readme_dataset_example_registers():
    from mugcp_bench.registry import DATASETS

    (block,) = [b for b in python_blocks() if "ZhouJsonSpec" in b]
    exec(compile(block, "README.md", "exec"), {})
    try:
        spec = DATASETS.get("my_birds")
        assert spec.folder == "my-birds" and "{}" in spec.template
        assert DATASETS.canonical("birds") == "my_birds"
    finally:
        DATASETS.unregister("my_birds")


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
