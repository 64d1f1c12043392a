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
    args = ["run", *ARGS, "--data-root", str(data_root), "--results-dir", str(results)]
    args += ["--grid", "n_ctx=2,4", "--grid", "lr=0.002,0.01"]
    code, out, _ = cli([*args, "--dry-run", "--json"], capsys)
    assert code == 0 and json.loads(out)["runs"] == 8  # 2 × 2 settings × 2 seeds
    code, _, err = cli(args, capsys)
    assert code == 0, err
    recs = records(results)
    combos = {(r["config"]["method"]["n_ctx"], r["config"]["train"]["lr"]) for r in recs}
    assert len(recs) == 8 and combos == {(2, 0.002), (2, 0.01), (4, 0.002), (4, 0.01)}
    assert len({r["key"]["config_hash"] for r in recs}) == 4

    code, by_config, _ = cli(["report", "--results-dir", str(results), "--by-config", "--format", "csv"], capsys)
    assert code == 0
    for entry in ("coop (lr=0.002, n_ctx=2)", "coop (lr=0.002, n_ctx=4)", "coop (lr=0.01, n_ctx=2)"):
        assert entry in by_config
    code, plain, _ = cli(["report", "--results-dir", str(results), "--format", "md"], capsys)
    assert code == 0 and "(lr=" not in plain and "duplicate run(s) of the same seed" in plain
    assert "--by-config shows each config as its own entry" in plain
    code, eff, _ = cli(
        ["report", "--results-dir", str(results), "--by-config", "--efficiency", "--format", "md"], capsys
    )
    assert code == 0 and eff.count("| coop (lr=") >= 8  # main table columns and 4 efficiency rows


def test_a_grid_through_the_python_api_and_a_repeated_combination_is_one_run(data_root, tmp_path):
    kw = {"methods": "coop", "datasets": "dtd", "backbone": "tiny", "pretrained": "random", "recipe": "toy"}
    result = run_sweep(
        data_root=data_root, results_dir=tmp_path, seeds="1", sets={"epochs": 1}, grid={"n_ctx": [2, "2", 4]}, **kw
    )
    assert not result.failed and len(result.trained) == 2
    table = result.table()
    assert table["config_hash"].nunique() == 2
