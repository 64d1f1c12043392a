"""What a run records for the report: per-image predictions, per-epoch history (through a resume), evaluation
images/s, peak memory and device; TensorBoard event files with --tensorboard."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mugcp_bench.engine.callbacks import StepInfo, TrainCallback
from mugcp_bench.engine.trainer import evaluate, fit
from mugcp_bench.methods.base import TrainConfig
from mugcp_bench.store import predictions
from mugcp_bench.store.records import MEMORY_MEASURES as MEASURES
from mugcp_bench.store.records import iter_run_files
from tests.method_harness import CLASSNAMES, build_method, shared_tiny_backbone, write_items
from tests.miniature import build_miniature
from tests.test_run_cli import BASE, cli


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return build_miniature(tmp_path_factory.mktemp("data"))


def test_run_records_predictions_history_costs_and_tensorboard(data_root, tmp_path, capsys) -> None:
    args = ["run", "--methods", "maple", "--datasets", "dtd", "--seeds", "1", "--data-root", str(data_root), *BASE]
    code, _, err = cli([*args, "--set", "epochs=2", "--results-dir", str(tmp_path), "--tensorboard"], capsys)
    assert code == 0, err
    (path,) = iter_run_files(tmp_path)
    record = json.loads(path.read_text())
    # per-epoch history: the total loss, its parts, the learning rate and throughput
    history = record["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    for h in history:
        assert h["loss"] == pytest.approx(h["loss_ce"] + sum(v for k, v in h.items() if k.startswith("loss_") and
                                                               k != "loss_ce"), rel=1e-5)  # fmt: skip
        assert h["images_per_s"] > 0 and h["seconds"] > 0
    assert history[0]["lr"] == pytest.approx(1e-5)  # the constant warm-up epoch
    # predictions beside run.json, referenced with their hashes, reproducing the recorded accuracy
    for ev in record["evaluations"]:
        ref = ev["predictions"]
        file = path.parent / ref["file"]
        assert hashlib.sha256(file.read_bytes()).hexdigest() == ref["sha256"]
        p = predictions.read(file, ref["sha256"])
        assert len(p.pred) == ev["n"] and len(p.classnames) == ev["n_classes"]
        assert 100.0 * p.correct.mean() == pytest.approx(ev["accuracy"])
        assert p.top5 is not None and (p.top5[:, 0] == p.pred).mean() > 0.9  # top-1 of top-k, up to ties
    base, novel = (e["predictions"]["test_sha256"] for e in record["evaluations"])
    assert base != novel  # different test lists
    # costs: evaluation throughput, peak memory with how it was measured, the device
    assert record["timings"]["eval_images_per_s"] > 0 and record["timings"]["train_images_per_s"] > 0
    resources = record["resources"]
    assert resources["memory_measure"] in MEASURES and resources["peak_memory_mb"] >= 0
    assert resources["device"] == "cpu" and resources["device_name"]
    # TensorBoard: per-epoch scalars and the accuracies
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(path.parent / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss/total", "loss/ce", "train/lr", "train/images_per_s"} <= tags
    assert [e.step for e in events.Scalars("loss/total")] == [1, 2]
    assert "accuracy/base2novel/dtd/base" in tags


@pytest.mark.slow
def test_history_survives_a_resume(tmp_path) -> None:
    backbone = shared_tiny_backbone()
    items = write_items(tmp_path, CLASSNAMES, 10)
    cfg = TrainConfig(epochs=3, batch_size=4, lr=0.01)
    checkpoint = tmp_path / "checkpoint.pt"

    class StopInEpoch2(TrainCallback):
        def on_step_end(self, info: StepInfo) -> None:
            if info.epoch == 1:
                raise KeyboardInterrupt

    method = build_method("coop", backbone)
    with pytest.raises(KeyboardInterrupt):
        fit(
            method,
            items,
            cfg,
            backbone.test_transform,
            torch.device("cpu"),
            "fp32",
            1,
            checkpoint,
            callbacks=[StopInEpoch2()],
        )
    resumed = fit(build_method("coop", backbone), items, cfg, backbone.test_transform, torch.device("cpu"), "fp32", 1,
                  checkpoint, resume=True)  # fmt: skip
    straight = fit(build_method("coop", backbone), items, cfg, backbone.test_transform, torch.device("cpu"), "fp32", 1)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    for a, b in zip(resumed.history, straight.history):
        assert a["loss"] == pytest.approx(b["loss"]) and a["lr"] == b["lr"]


def test_evaluate_returns_the_predictions_it_scored(tmp_path) -> None:
    backbone = shared_tiny_backbone()
    items = write_items(tmp_path, CLASSNAMES, 12)
    method = build_method("coop", backbone)
    out = evaluate(method, items, backbone.test_transform, torch.device("cpu"), "fp32", batch_size=5)
    labels = np.array([d.label for d in items])
    assert out["predictions"].shape == (12,) and out["top5"].shape == (12, 5)
    assert out["correct"] == int((out["predictions"] == labels).sum())


def test_tensorboard_without_the_package_is_bad_input(data_root, tmp_path, capsys, monkeypatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard") or name.startswith("tensorboard"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    args = ["run", "--methods", "coop", "--datasets", "dtd", "--data-root", str(data_root), *BASE, "--tensorboard"]
    code, _, err = cli([*args, "--results-dir", str(tmp_path)], capsys)
    assert code == 2 and "pip install" in err and "tensorboard" in err
    assert not list(iter_run_files(tmp_path))  # nothing trained


def test_settings_added_later_leave_the_config_hash_of_earlier_runs_alone():
    """The optimizer settings came after runs were recorded: at their defaults they are not hashed (the runs keep
    their ids); set to anything else they are (another run)."""
    import dataclasses

    from mugcp_bench.runs.plan import hashed

    cfg = TrainConfig(epochs=2)
    added = {f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("added")}
    assert added == {"optimizer", "adam_beta1", "adam_beta2", "adam_eps"}
    assert not added & set(hashed(cfg)) and hashed(cfg)["epochs"] == 2
    assert hashed(dataclasses.replace(cfg, optimizer="adam"))["optimizer"] == "adam"
