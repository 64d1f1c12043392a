"""`run --grid` crosses settings into runs of their own, and `report --by-config` shows each as an entry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mugcp_bench import run_sweep
from tests.cli_harness import cli, records
from tests.miniature import build_miniature

ARGS = ["--methods", "coop", "--datasets", "dtd", "--backbone", "tiny", "--pretrained", "random", "--recipe", "toy"]
ARGS += ["--seeds", "1,2", "--set", "epochs=1"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return build_miniature(tmp_path_factory.mktemp("data"), ["dtd"])


def test_every_combination_is_a_run_and_the_report_names_entries_by_what_differs(data_root, tmp_path, capsys):
    results = tmp_path / "r"
    args = ["run", *ARGS, "--data-root", str(data_root), "--results-dir", str(results), "--set", "ctx_init="]
    args += ["--grid", "n_ctx=2,4", "--grid", "lr=0.002,0.01"]
    code, out, _ = cli([*args, "--dry-run", "--json"], capsys)
    plan = json.loads(out)
    assert code == 0 and plan["runs"] == 8  # 2 × 2 settings × 2 seeds
    assert len({r["id"] for r in plan["planned"]}) == 8 and len({r["label"] for r in plan["planned"]}) == 8
    assert "coop dtd base 16-shot seed 1 (epochs=1, ctx_init=, n_ctx=2, lr=0.01)" in plan["runs_planned"]
    code, _, err = cli(args, capsys)
    assert code == 0, err
    recs = records(results)
    combos = {(r["config"]["method"]["n_ctx"], r["config"]["train"]["lr"]) for r in recs}
    assert len(recs) == 8 and combos == {(2, 0.002), (2, 0.01), (4, 0.002), (4, 0.01)}
    assert len({r["key"]["config_hash"] for r in recs}) == 4
    assert {r["overrides"]["lr"] for r in recs} == {"0.002", "0.01"}  # what the user set, recorded as given

    code, by_config, _ = cli(["report", "--results-dir", str(results), "--by-config", "--format", "csv"], capsys)
    assert code == 0
    for entry in ("coop (lr=0.002, n_ctx=2)", "coop (lr=0.002, n_ctx=4)", "coop (lr=0.01, n_ctx=2)"):
        assert entry in by_config
    # no run of the recipe's own settings: every config is its own entry, named by what the user set, never averaged
    code, plain, _ = cli(["report", "--results-dir", str(results), "--format", "csv"], capsys)
    assert code == 0 and "duplicate run" not in plain
    for entry in ("coop (ctx_init=, epochs=1, lr=0.002, n_ctx=2)", "coop (ctx_init=, epochs=1, lr=0.01, n_ctx=4)"):
        assert entry in plain
    code, eff, _ = cli(
        ["report", "--results-dir", str(results), "--by-config", "--efficiency", "--format", "md"], capsys
    )
    assert code == 0 and eff.count("| coop (lr=") >= 8  # main table columns and 4 efficiency rows


def test_a_setting_that_another_setting_overrides_is_refused_before_anything_runs(data_root, tmp_path, capsys):
    """The toy recipe initialises CoOp's context from "a photo of a": n_ctx is its word count, so a grid over n_ctx
    would train identical models under other names."""
    args = ["run", *ARGS, "--data-root", str(data_root), "--results-dir", str(tmp_path), "--grid", "n_ctx=4,16"]
    code, _, err = cli(args, capsys)
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert code == 2 and "n_ctx=16" in line and "ctx_init 'a photo of a'" in line and "--set ctx_init=" in line
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_the_recipe_is_the_entry_and_other_settings_are_listed_under_the_table(data_root, tmp_path, capsys):
    base = ["run", *ARGS[:-2], "--seeds", "1", "--data-root", str(data_root), "--results-dir", str(tmp_path)]
    assert cli(base, capsys)[0] == 0  # the recipe's own run
    assert cli([*base, "--grid", "lr=0.002,0.01"], capsys)[0] == 0  # lr=0.01 is the toy recipe's: the same run
    assert len(records(tmp_path)) == 2
    code, plain, _ = cli(["report", "--results-dir", str(tmp_path), "--format", "md"], capsys)
    table = plain.split("Not in the table")[0]
    assert code == 0 and "coop" in table and "lr=0.002" not in table  # the recipe's entry alone, nothing averaged in
    assert "Not in the table: runs with other settings than their recipe's (coop with lr=0.002 (1 run))" in plain
    assert "report --by-config shows each setting as its own entry" in plain


def test_a_grid_through_the_python_api_and_a_repeated_combination_is_one_run(data_root, tmp_path):
    kw = {"methods": "coop", "datasets": "dtd", "backbone": "tiny", "pretrained": "random", "recipe": "toy"}
    result = run_sweep(
        data_root=data_root,
        results_dir=tmp_path,
        seeds="1",
        sets={"epochs": 1, "ctx_init": ""},
        grid={"n_ctx": [2, "2", 4]},
        **kw,
    )
    assert not result.failed and len(result.trained) == 2
    table = result.table()
    assert table["config_hash"].nunique() == 2
