"""`mugcp-bench run` / `ablate` end to end on the tiny backbone and miniature datasets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mugcp_bench.registry import METHODS
from mugcp_bench.store.records import iter_run_files
from tests.cli_harness import cli, records
from tests.miniature import build_miniature

BASE = ["--backbone", "tiny", "--pretrained", "random", "--recipe", "toy"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return build_miniature(tmp_path_factory.mktemp("data"))


@pytest.mark.slow
def test_base2novel_sweep_of_every_method_then_nothing_to_train(data_root, tmp_path, capsys):
    methods = ",".join(METHODS.names())
    # one seed: every method trains, evaluates and is skipped on the rerun (several seeds: test_dry_run_counts, and the
    # executors' sweeps run two)
    args = ["run", "--methods", methods, "--datasets", "caltech101", "--seeds", "1", "--data-root", str(data_root)]
    args += [*BASE, "--results-dir", str(tmp_path), "--set", "epochs=1", "--json"]
    code, out, err = cli(args, capsys)
    assert code == 0, err
    recs = records(tmp_path)
    assert len(recs) == len(METHODS.names())
    for r in recs:
        assert r["status"] == "complete", r.get("reason")
        got = {(e["classes"], e["n_classes"]) for e in r["evaluations"]}
        assert got == {("base", 3), ("novel", 3)}  # 6 miniature Caltech classes: 3 base, 3 novel
        assert all(0 <= e["accuracy"] <= 100 for e in r["evaluations"])
    code, out, err = cli(args, capsys)
    assert code == 0
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary.get("skip") == len(recs) and "train" not in summary


def test_cross_dataset_and_domain_generalization_share_one_source_run(data_root, tmp_path, capsys):
    common = ["--methods", "coop", "--seeds", "1", "--data-root", str(data_root), *BASE, "--set", "epochs=1"]
    common += ["--results-dir", str(tmp_path), "--json"]
    code, out, err = cli(["run", "--protocol", "cross_dataset", "--datasets", "caltech101,dtd", *common], capsys)
    assert code == 0, err
    code, out, err = cli(["run", "--protocol", "domain_generalization", *common], capsys)
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary.get("evaluate") == 1 and "train" not in summary  # no retraining
    (rec,) = records(tmp_path)
    tags = sorted((e["protocol"], e["dataset"]) for e in rec["evaluations"])
    assert ("source", "imagenet") in tags and ("cross_dataset", "dtd") in tags
    assert {d for p, d in tags if p == "domain_generalization"} == {
        "imagenet_v2",
        "imagenet_sketch",
        "imagenet_a",
        "imagenet_r",
    }
    a = next(e for e in rec["evaluations"] if e["dataset"] == "imagenet_a")
    assert a["n_classes"] == 3  # ImageNet-A is evaluated over its own classes only (200-way on the real set)


@pytest.mark.numerics
@pytest.mark.parametrize("method", ["coop", "maple"])
def test_cached_evaluation_equals_naive(data_root, tmp_path, method):
    """A run's evaluation (cached image features, class text encoded once) predicts what the naive path does: a forward
    per test batch, as the reference code evaluates."""
    import torch
    from PIL import Image

    from mugcp_bench.datasets.base import get_spec
    from mugcp_bench.engine.trainer import evaluate, load_saved_state
    from mugcp_bench.paths import default_cache_dir
    from mugcp_bench.protocols import REAL_SUITE, get_protocol
    from mugcp_bench.runs.job import eval_split, execute, get_backbone
    from mugcp_bench.runs.options import RunSettings
    from mugcp_bench.runs.plan import plan
    from mugcp_bench.store import predictions
    from tests.numerics import assert_same_ranking

    settings = RunSettings(
        results_dir=tmp_path,
        data_root=data_root,
        cache_dir=default_cache_dir(),
        recipe="toy",
        overrides={"epochs": "1"},
    )
    bb = get_backbone("tiny", None, "cpu")
    (run,) = plan(settings, bb, [method], [get_protocol("base2novel")], REAL_SUITE, ("eurosat",), None, [1])
    execute(run, bb, settings)
    (rec,) = records(tmp_path)
    cls = METHODS.get(method)
    for target in run.evals:
        split = eval_split(run, target, settings)
        spec = get_spec(target.dataset)
        model = cls(bb, split.classnames, run.method_config, template=spec.template, dataset=spec.name)
        assert load_saved_state(run.record.model_path, model, checkpoint=False) is not None
        naive = evaluate(model, split.test, bb.test_transform, torch.device("cpu"), "fp32", 100, fast=False)
        (stored,) = [e for e in rec["evaluations"] if e["classes"] == target.classes]
        ref = stored["predictions"]
        got = predictions.read(run.record.dir / ref["file"], ref["sha256"])
        with torch.no_grad():  # the paths' logits differ by rounding: a near tie may go either way (tests.numerics)
            images = torch.stack([bb.test_transform(Image.open(d.impath).convert("RGB")) for d in split.test])
            logits = model(images, [d.relpath for d in split.test]).logits  # (N, C)
        ties = assert_same_ranking(got.pred, naive["predictions"], logits, k=1, msg=target.classes)
        if not ties.any():
            assert stored["accuracy"] == naive["accuracy"], target.classes


@pytest.mark.slow
def test_ablate_runs_full_method_and_variant(data_root, tmp_path, capsys):
    cls = METHODS.get("mugcp")
    drop = next(iter(cls.ablations))
    args = ["ablate", "--method", "mugcp", "--drop", drop, "--datasets", "eurosat", "--seeds", "1"]
    args += ["--data-root", str(data_root), *BASE, "--set", "epochs=1", "--results-dir", str(tmp_path)]
    code, _, err = cli(args, capsys)
    assert code == 0, err
    labels = sorted(r["method_label"] for r in records(tmp_path))
    assert labels == ["mugcp", f"mugcp-no-{drop}"]


BAD_INPUTS = [
    (["run", "--methods", "copo"], "unknown method 'copo'. Did you mean 'coop'?"),
    (
        ["run", "--methods", "coop", "--datasets", "caltek101"],
        "unknown dataset 'caltek101'. Did you mean 'caltech101'?",
    ),
    (["run", "--methods", "coop", "--protocol", "base2nvel"], "unknown protocol 'base2nvel'. Did you mean"),
    (
        ["run", "--methods", "coop", "--set", "n_cxt=8"],
        "unknown setting 'n_cxt' for method 'coop'. Did you mean 'n_ctx'?",
    ),
    (["run", "--methods", "coop", "--set", "epochs=two"], "--set epochs=two: expected int"),
    (["run", "--methods", "coop", "--set", "epochs"], "expected key=value"),
    (["run", "--methods", "coop", "--shots", "0"], "shots must be positive"),
    (["run", "--methods", "coop", "--set", "crop_min_scale=0"], "crop_min_scale of training must be in (0, 1]"),
    (["run", "--methods", "coop", "--seeds", "a"], "expected comma-separated integers"),
    (["ablate", "--method", "mugcp", "--drop", "amgg"], "has no ablation 'amgg'. Did you mean 'amg'?"),
]


@pytest.mark.parametrize("argv,message", BAD_INPUTS, ids=[m[:30] for _, m in BAD_INPUTS])
def test_bad_input_one_line_exit_2(argv, message, data_root, tmp_path, capsys):
    argv = [*argv, "--data-root", str(data_root), "--backbone", "tiny", "--pretrained", "random"]
    code, _, err = cli([*argv, "--results-dir", str(tmp_path / "r")], capsys)
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert not iter_run_files(tmp_path / "r")  # no run started


def test_unwritable_results_dir(data_root, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = cli(
        ["run", "--methods", "coop", "--data-root", str(data_root), *BASE, "--results-dir", str(blocker / "r")], capsys
    )
    assert code == 2 and "is not writable" in err


def test_missing_data_for_one_of_many_datasets(data_root, tmp_path, capsys):
    partial = build_miniature(tmp_path / "partial", ["caltech101"])
    args = ["run", "--methods", "coop", "--datasets", "caltech101,dtd", "--data-root", str(partial), *BASE]
    code, _, err = cli([*args, "--results-dir", str(tmp_path / "r")], capsys)
    assert code == 2 and "dtd" in err and "folder 'dtd' not found" in err
    assert not iter_run_files(tmp_path / "r")


def test_dry_run_counts(data_root, tmp_path, capsys):
    args = ["run", "--methods", "zsclip,coop", "--datasets", "dtd,eurosat", "--seeds", "1-3", "--dry-run", "--json"]
    code, out, err = cli([*args, "--data-root", str(data_root), *BASE, "--results-dir", str(tmp_path)], capsys)
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["runs"] == 12 and summary["train"] == 12
    assert not iter_run_files(tmp_path)


def test_the_default_methods_are_the_six_of_the_paper_tables_without_presets():
    """README: `run` without --methods trains zsclip, coop, cocoop, maple, dcp, mugcp (dcp-paper and dcp-instance
    subclass dcp and do not inherit its place in the default set)."""
    from mugcp_bench.runs.options import default_methods

    assert default_methods().split(",") == ["zsclip", "coop", "cocoop", "maple", "dcp", "mugcp"]


def test_methods_all_plans_every_method_and_no_composition(data_root, tmp_path, capsys):
    args = ["run", "--methods", "all", "--datasets", "dtd", "--seeds", "1", "--dry-run", "--json"]
    code, out, err = cli([*args, "--data-root", str(data_root), *BASE, "--results-dir", str(tmp_path)], capsys)
    assert code == 0, err
    planned = {r["label"].split()[0] for r in json.loads(out.strip().splitlines()[-1])["planned"]}
    assert planned == {m for m in METHODS.names() if "+" not in m}
    assert {"kgcoop", "promptsrc", "mma", "zsclip", "mugcp"} <= planned


def test_keep_going_records_failures_and_exits_1(data_root, tmp_path, capsys):
    broken = build_miniature(tmp_path / "broken", ["dtd", "eurosat"])
    test_list = json.loads((broken / "eurosat" / "split_zhou_EuroSAT.json").read_text())["test"]
    victim = broken / "eurosat" / "2750" / test_list[0][0]
    victim.write_bytes(b"corrupt")
    args = ["run", "--methods", "zsclip", "--datasets", "eurosat,dtd", "--seeds", "1", "--keep-going"]
    code, _, err = cli([*args, "--data-root", str(broken), *BASE, "--results-dir", str(tmp_path / "r")], capsys)
    assert code == 1 and "failed runs" in err
    by_ds = {r["key"]["train_dataset"]: r for r in records(tmp_path / "r")}
    assert by_ds["dtd"]["status"] == "complete"
    assert by_ds["eurosat"]["status"] == "failed" and str(victim) in by_ds["eurosat"]["reason"]


def test_a_damaged_image_is_read_again_after_a_cached_zero_shot_evaluation(tmp_path, capsys):
    """zsclip's evaluation is cached once per test list; damaging one image of that list makes the next run read
    the images again (and fail naming it), never reuse the clean tree's numbers."""
    tree = build_miniature(tmp_path / "data", ["eurosat"])
    args = ["run", "--methods", "zsclip", "--datasets", "eurosat", "--seeds", "1", "--data-root", str(tree), *BASE]
    code, _, err = cli([*args, "--results-dir", str(tmp_path / "clean")], capsys)
    assert code == 0, err
    test_list = json.loads((tree / "eurosat" / "split_zhou_EuroSAT.json").read_text())["test"]
    victim = tree / "eurosat" / "2750" / test_list[0][0]
    victim.write_bytes(b"corrupt")
    code, _, err = cli([*args, "--results-dir", str(tmp_path / "damaged"), "--keep-going"], capsys)
    assert code == 1, err
    (record,) = records(tmp_path / "damaged")
    assert record["status"] == "failed" and str(victim) in record["reason"]


def test_no_describe_fails_before_training_naming_the_missing(data_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MUGCP_CACHE", str(tmp_path / "empty-cache"))
    args = ["run", "--methods", "mugcp", "--datasets", "dtd", "--seeds", "1", "--no-describe"]
    code, _, err = cli([*args, "--data-root", str(data_root), *BASE, "--results-dir", str(tmp_path / "r")], capsys)
    assert code == 2
    line = next(x for x in err.splitlines() if x.startswith("error:"))
    assert "have no cached description" in line and "mugcp-bench describe" in line
    (rec,) = records(tmp_path / "r")
    assert rec["status"] == "failed" and "train_s" not in rec["timings"]


def test_our_warnings_reach_stderr_and_open_clip_random_init_warning_does_not(data_root, tmp_path, capsys):
    args = ["run", "--methods", "zsclip", "--datasets", "caltech101", "--seeds", "1", "--data-root", str(data_root)]
    code, _, err = cli([*args, *BASE, "--results-dir", str(tmp_path)], capsys)
    assert code == 0, err
    assert "No pretrained weights" not in err  # open_clip's warning on every random init is hidden
    broken = tmp_path / "runs" / "base2novel" / "dtd" / "coop" / "tiny" / "shots16" / "seed9-x" / "run.json"
    broken.parent.mkdir(parents=True)
    broken.write_text("{not json")
    code, _, err = cli(["report", "--results-dir", str(tmp_path)], capsys)
    assert code == 0, err
    assert "skipping unreadable run record" in err  # a warning of ours is shown, not swallowed by the root level
