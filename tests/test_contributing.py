"""CONTRIBUTING.md's examples are real code: the method trains a step, the dataset and the describer register and
work through the same paths as the built-ins."""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from click.testing import CliRunner

from mugcp_bench.registry import DATASETS, DESCRIBERS, EXECUTORS, METHODS

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


def test_the_method_example_is_one_file_and_gets_its_place_and_colour_in_the_report(tmp_path, capsys):
    """Nothing but the example's file: a sweep runs it, and the report orders it by its report_order and draws it in
    its own colour (from its run records; the report imports no method)."""
    from mugcp_bench import run_sweep
    from mugcp_bench.report.aggregate import build_report
    from mugcp_bench.report.plots import _entry_style
    from mugcp_bench.report.structure import Options
    from mugcp_bench.report.tidy import load_results
    from tests.miniature import build_miniature

    run_example("@METHODS.register")
    try:
        data = build_miniature(tmp_path / "data", ["dtd"])
        kw = {"backbone": "tiny", "pretrained": "random", "recipe": "toy", "datasets": "dtd", "seeds": "1"}
        result = run_sweep(methods="mine,cocoop,zsclip,coop", data_root=data, results_dir=tmp_path / "r", **kw)
        assert not result.failed and len(result.trained) == 4
        (table,) = build_report(load_results(tmp_path / "r"), ["base2novel"], Options()).tables
        assert list(table.entries["entry"]) == ["zsclip", "coop", "mine", "cocoop"]  # report_order 0, 100, 150, 200
        colour, _ = _entry_style(table)["mine"]
        assert colour == METHODS.get("mine").color and colour not in {
            c.color for _, c in METHODS.items() if c.name != "mine"
        }
    finally:
        METHODS.unregister("mine")


def test_executor_example_runs_a_sweep(tmp_path):
    from mugcp_bench import run_sweep
    from tests.miniature import build_miniature

    run_example("@EXECUTORS.register")
    try:
        data = build_miniature(tmp_path / "data", ["dtd"])
        kw = {"backbone": "tiny", "pretrained": "random", "recipe": "toy", "datasets": "dtd", "sets": {"epochs": 1}}
        result = run_sweep(methods="coop", seeds="1,2", executor="reverse", data_root=data, results_dir=tmp_path, **kw)
        assert not result.failed and [r.status for r in result.runs] == ["complete", "complete"]
        assert result.plan.executor == "reverse"
    finally:
        EXECUTORS.unregister("reverse")


def test_report_table_example_renders_in_every_format():
    from mugcp_bench.report.aggregate import build_report
    from mugcp_bench.report.structure import Options
    from mugcp_bench.report.tables import render
    from mugcp_bench.report.tidy import load_results

    namespace: dict = {}
    exec(compile(example("def status_table"), "CONTRIBUTING.md", "exec"), namespace)
    results = load_results(Path(__file__).parent / "fixtures" / "results")
    report = build_report(results, ["base2novel"], Options())
    report.row_tables.append(namespace["status_table"](results))
    md = render(report, "md")
    assert "### Runs by status" in md and "| mugcp-no-amg | 3 | 0 | 1 |" in md
    assert "Runs by status" in render(report, "table") and "status" in render(report, "csv")


def test_protocol_example_plans_and_reports(tmp_path):
    from mugcp_bench.protocols import PROTOCOLS, plan_protocol, real_suite
    from mugcp_bench.report.aggregate import build_report
    from mugcp_bench.report.structure import Options
    from mugcp_bench.report.tidy import load_results
    from tests.factories import evaluation, make_key, make_record, write_record

    run_example("PROTOCOLS[")
    try:
        protocol = PROTOCOLS["base2novel_4shot"]
        ((train, evals),) = plan_protocol(protocol, real_suite(), ("dtd",), None)
        assert (train.classes, train.shots) == ("base", 4) and [e.classes for e in evals] == ["base", "novel"]
        for seed in (1, 2):
            evs = [evaluation(e.protocol, e.dataset, e.classes, 60.0 + seed, 100) for e in evals]
            write_record(tmp_path, make_record(make_key(shots=4, seed=seed), evaluations=evs))
        (table,) = build_report(load_results(tmp_path), ["base2novel_4shot"], Options()).tables
        assert table.title.startswith("Base-to-novel generalization, 4 shots")
        assert [c.group for c in table.columns] == ["base", "novel", "hm"]
    finally:
        del PROTOCOLS["base2novel_4shot"]
