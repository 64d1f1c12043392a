"""Synthetic results stores with per-image predictions (run records schema 1, as the run job writes them).

Correctness is correlated the way real methods' is: every test image has a difficulty shared by all methods and
seeds; a method's skill and a seed's shift move its threshold. `planted` copies another method's predictions and
turns k of its wrong images right: a known paired difference. Used by the bootstrap tests, the --ci golden fixture
(tests/fixtures/make_stores.py) and benchmarks/bench_report.py.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from mugcp_bench.store import predictions
from tests.factories import evaluation, make_key, make_record, run_dir, write_record


@dataclass(frozen=True)
class Split:
    n: int
    n_classes: int


def _items(dataset: str, classes: str, split: Split) -> list[SimpleNamespace]:
    labels = np.arange(split.n) % split.n_classes
    return [SimpleNamespace(relpath=f"{dataset}/{classes}/{i:05d}.jpg", label=int(y)) for i, y in enumerate(labels)]


def _difficulty(dataset: str, classes: str, n: int) -> np.ndarray:
    seed = int(hashlib.sha256(f"{dataset}/{classes}".encode()).hexdigest()[:8], 16)
    return np.random.default_rng(seed).normal(size=n)


def correctness(dataset: str, classes: str, n: int, skill: float, seed: int, method: str) -> np.ndarray:
    """(n,) bool: image i is right when skill + seed shift + own noise beats its difficulty."""
    difficulty = _difficulty(dataset, classes, n)
    rng = np.random.default_rng(
        int(hashlib.sha256(f"{method}/{seed}/{dataset}/{classes}".encode()).hexdigest()[:8], 16)
    )
    shift = rng.normal(scale=0.08)
    return skill + shift + rng.normal(scale=0.5, size=n) > difficulty


def plant(correct: np.ndarray, k: int, seed: int) -> np.ndarray:
    """A copy of `correct` with k wrong images made right."""
    out = correct.copy()
    wrong = np.flatnonzero(~out)
    out[np.random.default_rng(seed).choice(wrong, size=min(k, wrong.size), replace=False)] = True
    return out


def predictions_from(correct: np.ndarray, labels: np.ndarray, n_classes: int, seed: int) -> np.ndarray:
    """Predicted labels: the true label where right, another class where wrong."""
    rng = np.random.default_rng(seed)
    other = (labels + 1 + rng.integers(0, max(n_classes - 1, 1), size=labels.size)) % n_classes
    return np.where(correct, labels, other)


def write_run(
    root: Path,
    method: str,
    dataset: str,
    seed: int,
    evaluations: dict[str, tuple[Split, np.ndarray | None, float | None]],
    variant: str = "",
    protocol: str = "base2novel",
    costs: bool = True,
) -> Path:
    """One complete run: evaluations maps class subset -> (split, correctness or None, accuracy if no correctness).

    With correctness the predictions file is written beside run.json (as the run job does); without, the record
    looks like one written before predictions were stored.
    """
    key = make_key(
        train_protocol=protocol, method=method, variant=variant, weights="synthetic", train_dataset=dataset, seed=seed,
        config_hash="synthetic",
    )  # fmt: skip
    folder = run_dir(root, key)
    folder.mkdir(parents=True, exist_ok=True)
    evs = []
    for classes, (split, correct, accuracy) in evaluations.items():
        refs = None
        if correct is not None:
            items = _items(dataset, classes, split)
            labels = np.array([d.label for d in items])
            pred = predictions_from(correct, labels, split.n_classes, seed)
            classnames = [f"{dataset} class {c}" for c in range(split.n_classes)]
            result = {"predictions": pred, "top5": None}
            refs = predictions.write(folder, protocol, dataset, classes, result, items, classnames)
            accuracy = 100.0 * float(correct.mean())
        evs.append(
            evaluation(
                protocol, dataset, classes, accuracy, split.n, exact=True, n_classes=split.n_classes, predictions=refs
            )
        )
    rec = make_record(key, evaluations=evs, config={"note": "synthetic"}, trainable_params=2048)
    if costs:  # what the run job records: timings, device and memory, per-epoch history (fixed numbers)
        speed = 40.0 + 10 * (len(method) % 3)
        rec.trainable_params = 2048 * (1 + len(method) % 4)
        rec.timings = {"train_s": 800.0 / speed, "train_images_per_s": speed, "eval_s": 2.0}
        rec.timings["eval_images_per_s"] = 5.0 * speed
        rec.resources = {
            "peak_memory_mb": 100.0 + 12.5 * len(method),
            "memory_measure": "rss_peak_above_start",
            "device": "cpu",
            "device_name": "Synthetic CPU",
        }
        rec.history = [
            {"epoch": e, "loss": 2.0 / e + 0.01 * seed, "loss_ce": 1.8 / e + 0.01 * seed, "lr": 0.002 * (6 - e) / 5}
            | {"images_per_s": speed + e, "seconds": 160.0 / speed}
            for e in range(1, 6)
        ]
        if method.startswith("mugcp"):
            for row in rec.history:
                row["loss_scp"] = row["loss"] - row["loss_ce"]
    return write_record(root, rec)


def write_b2n_store(
    root: Path,
    skills: dict[str, float],
    datasets: dict[str, tuple[Split, Split]],
    seeds: tuple[int, ...] = (1, 2, 3),
    planted: dict[str, tuple[str, int]] | None = None,
    without_predictions: tuple[str, ...] = (),
) -> Path:
    """Base-to-novel runs of every method x dataset x seed. `planted` maps a method to (method it copies, k images
    made right per split); methods in `without_predictions` get records without predictions files."""
    planted = planted or {}
    for dataset, (base, novel) in datasets.items():
        for seed in seeds:
            made: dict[tuple[str, str], np.ndarray] = {}
            for method in [*skills, *planted]:
                evs = {}
                for classes, split in (("base", base), ("novel", novel)):
                    if method in planted:
                        source, k = planted[method]
                        correct = plant(made[(source, classes)], k, seed)
                    else:
                        correct = correctness(dataset, classes, split.n, skills[method], seed, method)
                    made[(method, classes)] = correct
                    if method in without_predictions:
                        evs[classes] = (split, None, 100.0 * float(correct.mean()))
                    else:
                        evs[classes] = (split, correct, None)
                write_run(root, method, dataset, seed, evs)
    return root
