"""The packaged published numbers (mugcp_bench/report/published.csv): schema, completeness, provenance."""

from __future__ import annotations

import pandas as pd
import pytest

from mugcp_bench.report.published import (
    COLUMNS,
    load_published,
    lookup,
    published_csv_path,
    published_method,
    validate,
)


@pytest.fixture(scope="module")
def published() -> pd.DataFrame:
    return load_published()


def test_csv_is_package_data_with_the_documented_columns(published: pd.DataFrame) -> None:
    assert published_csv_path().is_file()
    assert list(pd.read_csv(published_csv_path()).columns) == COLUMNS
    assert not published["read_off_plot"].any()  # no published number is read off a plot


def test_every_number_of_published_results_is_transcribed(published: pd.DataFrame) -> None:
    counts = published.groupby("protocol").size().to_dict()
    dept = 4  # DePT's own numbers for coop+dept, cocoop+dept, kgcoop+dept, maple+dept (its README images)
    # §1.1: 5 methods x (11 datasets x 3 + Average x 3); §1.2: 8 averages x 3 (the Awesome list's dept row is
    # kgcoop+dept, among DePT's own); §1.3: 3 x 3; prograd and mmrl: averages x 3; DePT: 11 datasets + Average, x 3
    assert counts["base2novel"] == 5 * 36 + 7 * 3 + 3 * 3 + 2 * 3 + dept * 36
    assert counts["cross_dataset"] == 5 * 12 + dept * 12  # §2: ImageNet + 10 targets + Avg
    assert counts["domain_generalization"] == 5 * 6 + dept * 5  # §3: ImageNet + 4 targets + Avg (DePT: no Avg)
    others = {
        "proda",
        "kgcoop",
        "rpo",
        "coop+dept",
        "cocoop+dept",
        "kgcoop+dept",
        "maple+dept",
        "prograd",
        "mmrl",
        "tcp",
        "mma",
        "hpt",
        "coprompt",
        "vpt_deep",
        "language_deep",
        "ivlp",
    }
    assert set(published["method"]) == {"zsclip", "coop", "cocoop", "maple", "promptsrc"} | others


@pytest.mark.parametrize(
    "method,protocol,dataset,metric,value,confidence",
    [
        ("maple", "base2novel", "eurosat", "base", 94.07, "verified"),
        ("maple", "base2novel", "dtd", "hm", 68.16, "verified"),
        ("maple", "base2novel", "dtd", "base", 80.36, "transcribed"),
        ("promptsrc", "base2novel", "average", "avg_hm", 79.97, "verified"),
        ("rpo", "base2novel", "average", "avg_hm", 77.78, "verified"),  # as published, though B/N give 77.95
        ("ivlp", "base2novel", "average", "avg_novel", 74.07, "verified"),
        ("zsclip", "cross_dataset", "eurosat", "acc", 47.69, "low"),
        ("promptsrc", "cross_dataset", "average", "avg", 65.81, "transcribed"),
        ("coop", "domain_generalization", "imagenet_sketch", "acc", 47.99, "verified"),
        ("zsclip", "domain_generalization", "imagenet_a", "acc", 47.77, "verified"),
        ("maple", "domain_generalization", "average", "avg", 60.27, "transcribed"),
        ("prograd", "base2novel", "average", "avg_hm", 76.16, "verified"),
        ("mma", "base2novel", "average", "avg_hm", 79.87, "verified"),
        ("kgcoop+dept", "base2novel", "average", "avg_hm", 79.10, "transcribed"),
        ("coop+dept", "domain_generalization", "imagenet_a", "acc", 51.57, "transcribed"),
    ],
)
def test_spot_values_and_confidence(published, method, protocol, dataset, metric, value, confidence) -> None:
    row = lookup(published, method, protocol, dataset, metric)
    assert row is not None and row["value"] == value and row["confidence"] == confidence
    assert row["source"] and row["table"]


def test_lookup_accepts_registry_spellings_and_clip_aliases(published: pd.DataFrame) -> None:
    assert lookup(published, "coop", "base2novel", "OxfordPets", "base")["value"] == 93.67
    assert lookup(published, "coop", "domain_generalization", "imagenet-sketch", "acc")["value"] == 47.99
    assert published_method("zero-shot-clip") == "zsclip" and published_method("CLIP") == "zsclip"
    assert lookup(published, "mugcp", "base2novel", "dtd", "base") is None


def test_validate_rejects_unknown_vocabulary(published: pd.DataFrame) -> None:
    bad = published[[c for c in published.columns if c in COLUMNS]].copy()
    bad.loc[0, "confidence"] = "maybe"
    with pytest.raises(ValueError, match="confidence"):
        validate(bad)
    dup = pd.concat([published.head(1), published.head(1)])
    with pytest.raises(ValueError, match="duplicate"):
        validate(dup)
