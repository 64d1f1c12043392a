"""The tidy table read from run.json files (schema 1): columns, one row per run x evaluation, bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mugcp_bench.errors import UserError
from mugcp_bench.report.tidy import TIDY_COLUMNS, dataset_display, dataset_key, dataset_rank, load_results

RESULTS = Path(__file__).parent / "fixtures" / "results"


def test_tidy_table_from_fixture_store() -> None:
    results = load_results(RESULTS)
    assert list(results.tidy.columns[: len(TIDY_COLUMNS)]) == TIDY_COLUMNS
    assert results.status_counts() == {"complete": 48, "failed": 1, "running": 1}
    n_evals = sum(len(json.loads(p.read_text())["evaluations"]) for p in RESULTS.glob("runs/**/run.json"))
    assert len(results.tidy) == n_evals
    variant = results.tidy[results.tidy["method_label"] == "mugcp-no-amg"]
    assert set(variant["method"]) == {"mugcp"} and set(variant["variant"]) == {"no-amg"}
    coop = results.tidy[results.tidy["method"] == "coop"]
    assert coop["leakage"].isna().all() and set(coop["variant"]) == {""}
    assert results.tidy["seed"].dtype.name == "Int64"


def test_damaged_records_are_skipped_with_a_warning_and_foreign_schema_is_refused(tmp_path: Path, caplog) -> None:
    runs = tmp_path / "runs" / "base2novel" / "dtd" / "coop" / "ViT-B-16" / "shots16"
    good = json.loads(next(RESULTS.glob("runs/base2novel/caltech101/coop/**/run.json")).read_text())
    for name, text in {"seed1-a": json.dumps(good), "seed2-b": "{not json", "seed4-d": "[]"}.items():
        (runs / name).mkdir(parents=True)
        (runs / name / "run.json").write_text(text)
    results = load_results(tmp_path)
    assert len(results.runs) == 1 and len(results.unreadable) == 2
    assert "seed2-b" in caplog.text and "not valid JSON" in caplog.text and "a JSON list" in caplog.text
    (runs / "seed3-c").mkdir()
    (runs / "seed3-c" / "run.json").write_text(json.dumps({"schema": 99}))
    with pytest.raises(UserError, match="seed3-c/run.json: run record schema 99, this mugcp-bench reads schema 1"):
        load_results(tmp_path)  # never silently left out of a report


def test_no_runs_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no results in"):
        load_results(tmp_path)


def test_dataset_names() -> None:
    assert dataset_key("OxfordPets") == dataset_key("oxford_pets") == "oxford_pets"
    assert dataset_display("imagenet-sketch") == "-Sketch" and dataset_display("fgvc_aircraft") == "FGVCAircraft"
    assert dataset_display("toy_shapes") == "Toy Shapes"  # unknown (toy) datasets: title case
    assert dataset_rank("imagenet") < dataset_rank("caltech101") < dataset_rank("toy_shapes", 0)


def test_quickgelu_and_gelu_runs_are_separate_entries(tmp_path: Path) -> None:
    """The same weights built with another activation are another setting: never averaged into one entry."""
    from mugcp_bench.report.aggregate import assign_entries
    from tests.synthetic_results import Split, write_run

    split = Split(n=20, n_classes=4)
    gelu = write_run(tmp_path, "coop", "dtd", 1, {"base": (split, None, 60.0), "novel": (split, None, 50.0)})
    quick = gelu.with_name(gelu.name[:-8] + "0000beef")
    quick.mkdir()
    record = json.loads((gelu / "run.json").read_text())
    record["key"]["activation"] = "quickgelu"
    record["id"] = "0000beef"
    (quick / "run.json").write_text(json.dumps(record))

    tidy = load_results(tmp_path).tidy
    assert sorted(tidy["activation"].unique()) == ["gelu", "quickgelu"]  # a record without the field is GELU
    entries = assign_entries(tidy, with_shots=False)
    assert sorted(entries["entry"].unique()) == ["coop (gelu)", "coop (quickgelu)"]
