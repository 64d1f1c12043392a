"""CONTRIBUTING.md's examples are real code: the method trains a step, the dataset and the describer register and
work through the same paths as the built-ins."""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from click.testing import CliRunner

from mugcp_bench.registry import DATASETS, DESCRIBERS, METHODS

GUIDE = Path(__file__).parents[1] / "CONTRIBUTING.md"


def example(marker: str) -> str:
    """The one ```python block of CONTRIBUTING.md that contains `marker`."""
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.S) if marker in b]
    return block


def run_example(marker: str) -> None:
    exec(compile(example(marker), "CONTRIBUTING.md", "exec"), {})


def test_method_example_trains_and_changes_classes(tiny_backbone):
    run_example("@METHODS.register")
    try:
        cls = METHODS.get("mine")
        m = cls(tiny_backbone, ["cat", "dog", "car"], cls.Config())
        out = m(torch.randn(2, 3, 32, 32))
        assert out.logits.shape == (2, 3)
        F.cross_entropy(out.logits, torch.tensor([0, 1])).backward()
        assert m.ctx.grad is not None and m.n_trainable() == 4 * tiny_backbone.text_width
        m.set_classnames(["a", "b"])
        assert m(torch.randn(1, 3, 32, 32)).logits.shape == (1, 2)
        assert cls.recipe("toy", "base2novel", 16, "toy_objects")["epochs"] == 3
    finally:
        METHODS.unregister("mine")


def test_dataset_example_registers_with_its_names(tmp_path: Path):
    from mugcp_bench.datasets import check_datasets, dataset_names

    run_example("register_dataset(")
    try:
        spec = DATASETS.get("birds")
        assert spec.name == "my_birds" and spec.folder == "my-birds" and "{}" in spec.template
        assert "my_birds" in dataset_names("all")
        (result,) = check_datasets(tmp_path, ["birds"])
        assert result.status == "missing folder" and "my-birds" in result.message
    finally:
        DATASETS.unregister("my_birds")
    assert "birds" not in DATASETS


def test_describer_example_describes_through_the_command(tmp_path: Path, monkeypatch):
    from mugcp_bench.commands.describe import describe
    from mugcp_bench.describers import DescriberOptions
    from mugcp_bench.describers.cache import DescriptionCache
    from mugcp_bench.toy.suite import DATASETS as TOY
    from mugcp_bench.toy.suite import SuiteSizes, write_dataset
    from tests.test_describers import write_images

    run_example("@DESCRIBERS.register")
    try:
        describer = DESCRIBERS.get("filename").from_options(DescriberOptions())
        assert describer.describe(write_images(tmp_path / "data", 1)) == ["a picture named img0 0."]
        root = tmp_path / "toy"
        write_dataset(TOY["toy_shapes"], root, SuiteSizes(train=1, val=1, test=1), seed=0)
        monkeypatch.setenv("MUGCP_CACHE", str(tmp_path / "cache"))
        args = ["--data-root", str(root), "--datasets", "toy_shapes", "--describer", "filename", "--shots", "1"]
        result = CliRunner().invoke(describe, [*args, "--seeds", "1"])
        assert result.exit_code == 0, result.output
        assert "filename-v1" in result.output
        assert DescriptionCache().load("filename-v1", "filename_v1")  # the texts are in the shared cache
    finally:
        DESCRIBERS.unregister("filename")
