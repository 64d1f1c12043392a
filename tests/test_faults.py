"""Faults end cleanly through the real CLI: non-finite losses, Ctrl-C, SIGKILL inside an epoch.

Faults are injected by the plugin `tests.fault_plugins` (``MUGCP_PLUGINS``): a method whose loss turns non-finite,
and a training callback that kills, interrupts or fills the disk at a chosen step.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mugcp_bench.store.records import iter_run_files
from tests.cli_harness import cli, records
from tests.miniature import build_miniature
from tests.numerics import torch_threads
from tests.test_executors import worker_threads

BASE = ["--backbone", "tiny", "--pretrained", "random", "--recipe", "toy"]
ROOT = Path(__file__).parents[1]
PLUGIN = "tests.fault_plugins"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return build_miniature(tmp_path_factory.mktemp("data"), ["dtd", "eurosat"])


@pytest.fixture
def fault_plugin(monkeypatch):
    """The fault plugin for in-process CLI calls; its method is unregistered afterwards (other tests list methods)."""
    from mugcp_bench import plugins
    from mugcp_bench.registry import METHODS

    monkeypatch.setenv("MUGCP_PLUGINS", PLUGIN)
    monkeypatch.delenv("FAULT_AT", raising=False)
    yield
    if "faulty" in METHODS:
        METHODS.unregister("faulty")
    plugins._loaded.discard(PLUGIN)
    sys.modules.pop(PLUGIN, None)


def run_cli(args: list[str], fault: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m mugcp_bench.commands.cli ARGS` in a subprocess with the fault plugin loaded (FAULT_AT=`fault`),
    training with this process's intra-op thread count: its numbers equal bit for bit those of a run in this process
    (`cli`), which resumes what it left."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "MUGCP_PLUGINS": PLUGIN}
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())
    env.pop("FAULT_AT", None)
    if fault:
        env["FAULT_AT"] = fault
    return subprocess.run(
        [sys.executable, "-m", "mugcp_bench", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def model_state(results: Path, label: str = "") -> dict[str, torch.Tensor]:
    (path,) = [p for p in iter_run_files(results) if label in p.as_posix()]
    return torch.load(path.parent / "model.pt", weights_only=True)


def same_model(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- 1. non-finite losses ------------------------------------------------------------------------------------------
def test_diverging_lr_fails_the_run_with_its_reason_and_keep_going_continues(data_root, tmp_path):
    args = ["run", "--methods", "coop,zsclip", "--datasets", "dtd", "--seeds", "1", "--data-root", str(data_root)]
    args += [*BASE, "--set", "epochs=4", "--set", "lr=1e30", "--keep-going", "--results-dir", str(tmp_path)]
    res = run_cli(args)
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr
    assert error_lines(res.stderr) == [error_lines(res.stderr)[0]] and "1 of 2 runs failed" in res.stderr
    by_method = {r["key"]["method"]: r for r in records(tmp_path)}
    coop = by_method["coop"]
    assert coop["status"] == "failed" and coop["evaluations"] == []
    assert coop["failure"]["kind"] == "non_finite" and coop["failure"]["epoch"] >= 2  # warm-up epoch is finite
    assert f"at epoch {coop['failure']['epoch']}/4" in coop["reason"] and "lower the learning rate" in coop["reason"]
    assert by_method["zsclip"]["status"] == "complete"  # --keep-going ran the next one


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_every_non_finite_loss_part_stops_at_its_step(value, data_root, tmp_path, fault_plugin, capsys):
    args = ["run", "--methods", "faulty", "--datasets", "dtd", "--seeds", "1", "--data-root", str(data_root), *BASE]
    args += ["--set", "epochs=2", "--set", "batch_size=2", "--set", f"fault_value={value}", "--set", "fault_step=3"]
    code, _, err = cli([*args, "--results-dir", str(tmp_path)], capsys)
    assert code == 1 and "Traceback" not in err
    (rec,) = records(tmp_path)
    assert rec["status"] == "failed" and rec["evaluations"] == []
    # fault_step=3: the 4th step overall; 4 steps an epoch at batch 2 -> epoch 1, step 4 (1-based)
    assert rec["failure"] == {
        "kind": "non_finite",
        "epoch": 1,
        "step": 4,
        "part": "loss_fault",
        "value": str(float(value)),
    }
    assert f"loss_fault is {float(value)} at epoch" in rec["reason"]
    assert not (Path(iter_run_files(tmp_path)[0]).parent / "model.pt").exists()  # no final model from a broken run


def test_non_finite_gradient_stops_before_the_update(data_root, tmp_path, fault_plugin, capsys):
    args = ["run", "--methods", "faulty", "--datasets", "dtd", "--seeds", "1", "--data-root", str(data_root), *BASE]
    args += ["--set", "epochs=2", "--set", "batch_size=2", "--set", "fault_value=grad", "--set", "fault_step=0"]
    code, _, err = cli([*args, "--results-dir", str(tmp_path)], capsys)
    assert code == 1 and "Traceback" not in err
    (rec,) = records(tmp_path)
    assert rec["status"] == "failed"
    assert rec["failure"]["part"] == "gradient of ctx" and rec["failure"]["value"] == "nan"
    assert (rec["failure"]["epoch"], rec["failure"]["step"]) == (1, 1)


# --- SIGKILL: resume equals an uninterrupted run ------------------------------------------------------------------
KILL_ARGS = ["run", "--methods", "coop", "--datasets", "dtd", "--seeds", "1", *BASE]
KILL_ARGS += ["--set", "epochs=3", "--set", "batch_size=2"]


@pytest.fixture(scope="module")
def uninterrupted(data_root, tmp_path_factory) -> Path:
    """KILL_ARGS run straight through by the CLI in this process."""
    from mugcp_bench.commands.cli import main

    out = tmp_path_factory.mktemp("uninterrupted")
    with pytest.raises(SystemExit) as exc:
        main([*KILL_ARGS, "--data-root", str(data_root), "--results-dir", str(out)])
    assert exc.value.code == 0
    return out


@pytest.fixture(scope="module")
def killed(data_root, tmp_path_factory):
    """`killed(fault, results)`: KILL_ARGS SIGKILLed at `fault` (a subprocess, once per fault in the module), its
    results copied to `results`; returns the killed process."""
    import shutil

    made: dict[str, tuple[subprocess.CompletedProcess, Path]] = {}

    def kill(fault: str, results: Path) -> subprocess.CompletedProcess:
        if fault not in made:
            out = tmp_path_factory.mktemp("killed")
            made[fault] = (run_cli([*KILL_ARGS, "--data-root", str(data_root), "--results-dir", str(out)], fault), out)
        proc, out = made[fault]
        shutil.copytree(out, results, dirs_exist_ok=True)
        return proc

    return kill


@pytest.mark.parametrize("fault", ["1:end:kill", "1:1:kill"], ids=["after-epoch", "inside-epoch"])
def test_sigkill_then_resume_equals_uninterrupted(fault, data_root, uninterrupted, killed, tmp_path, capsys):
    args = [*KILL_ARGS, "--data-root", str(data_root), "--results-dir", str(tmp_path)]
    proc = killed(fault, tmp_path)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    (rec,) = records(tmp_path)  # never half-written: valid JSON, left running by a dead process
    assert rec["status"] == "running" and rec["evaluations"] == []
    state = torch.load(iter_run_files(tmp_path)[0].parent / "checkpoint.pt", weights_only=False)
    assert (state["epoch"], state["step"]) == ((1, None) if fault.endswith("end:kill") else (0, None))
    code, _, err = cli([*args, "--resume"], capsys)
    assert code == 0, err
    (a,), (b,) = records(tmp_path), records(uninterrupted)
    assert a["status"] == b["status"] == "complete"
    assert [e["accuracy"] for e in a["evaluations"]] == [e["accuracy"] for e in b["evaluations"]]
    assert a["last_loss"] == b["last_loss"]
    assert same_model(model_state(tmp_path), model_state(uninterrupted))


# --- 3. Ctrl-C -----------------------------------------------------------------------------------------------------
def test_ctrl_c_inside_an_epoch_checkpoints_exits_130_and_rerun_equals_uninterrupted(
    data_root, uninterrupted, tmp_path, capsys
):
    args = [*KILL_ARGS, "--data-root", str(data_root), "--results-dir", str(tmp_path)]
    res = run_cli(args, fault="1:1:sigint")
    assert res.returncode == 130, res.stderr
    assert "Traceback" not in res.stderr and "rerun the same command to resume" in res.stderr
    (rec,) = records(tmp_path)
    assert rec["status"] == "interrupted" and "epoch 2, step 2" in rec["reason"]
    state = torch.load(iter_run_files(tmp_path)[0].parent / "checkpoint.pt", weights_only=False)
    assert (state["epoch"], state["step"]) == (1, 2)  # mid-epoch: 2 steps of the second epoch done
    code, _, err = cli(args, capsys)  # a plain rerun resumes
    assert code == 0, err
    (a,), (b,) = records(tmp_path), records(uninterrupted)
    assert a["status"] == "complete"
    assert [e["accuracy"] for e in a["evaluations"]] == [e["accuracy"] for e in b["evaluations"]]
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    assert same_model(model_state(tmp_path), model_state(uninterrupted))


def test_ctrl_c_in_the_second_run_keeps_the_first(data_root, tmp_path):
    args = [*KILL_ARGS[:6], "1,2", *KILL_ARGS[7:], "--data-root", str(data_root), "--results-dir", str(tmp_path)]
    res = run_cli(args, fault="0:0:sigint:2")  # the second time a run reaches epoch 1 step 1
    assert res.returncode == 130, res.stderr
    by_seed = {r["key"]["seed"]: r for r in records(tmp_path)}
    assert by_seed[1]["status"] == "complete" and by_seed[1]["evaluations"]
    assert by_seed[2]["status"] == "interrupted"


def test_readme_callback_example_fails_its_run_with_the_message(data_root, tmp_path, capsys):
    import re

    from mugcp_bench.engine.callbacks import global_callbacks, remove_callback

    block = next(
        b
        for b in re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
        if "add_callback" in b
    )
    before = global_callbacks()
    exec(compile(block.replace("1e-3", "1e9"), "README.md", "exec"), {})  # always "plateaued"
    try:
        args = ["run", "--methods", "coop", "--datasets", "dtd", "--seeds", "1", "--data-root", str(data_root)]
        code, _, err = cli([*args, *BASE, "--set", "epochs=2", "--results-dir", str(tmp_path)], capsys)
    finally:
        for cb in global_callbacks():
            if cb not in before:
                remove_callback(cb)
    assert code == 1 and "Traceback" not in err
    (rec,) = records(tmp_path)
    assert rec["status"] == "failed" and "nothing left to learn" in rec["reason"] and "after epoch 1" in rec["reason"]


def test_a_plugin_that_cannot_be_imported_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MUGCP_PLUGINS", "tests.no_such_plugin")
    code, _, err = cli(["list", "methods"], capsys)
    assert code == 2
    (line,) = error_lines(err)
    assert "MUGCP_PLUGINS: cannot import plugin 'tests.no_such_plugin'" in line


# --- 4. damaged and foreign run records ----------------------------------------------------------------------------
ZS_ARGS = ["run", "--methods", "zsclip", "--datasets", "dtd", "--seeds", "1", *BASE]


def test_truncated_record_is_kept_aside_and_retrained_with_one_warning(data_root, tmp_path, capsys):
    args = [*ZS_ARGS, "--data-root", str(data_root), "--results-dir", str(tmp_path)]
    code, _, err = cli(args, capsys)
    assert code == 0, err
    (path,) = iter_run_files(tmp_path)
    before = json.loads(path.read_text())
    damaged = path.read_text()[:100]  # a record cut short (a crash of the disk, not of ours: we write atomically)
    path.write_text(damaged)
    res = run_cli(args)
    assert res.returncode == 0, res.stderr
    err = " ".join(res.stderr.split())  # the log handler wraps long lines at the terminal width
    assert err.count("damaged run record") == 1 and "not valid JSON" in err and "run.json.corrupt" in err
    assert str(path.parent).replace("/", "") in err.replace("/", "").replace(" ", "")
    assert (path.parent / "run.json.corrupt").read_text() == damaged  # nothing lost
    after = json.loads(path.read_text())
    assert after["status"] == "complete"
    assert [e["accuracy"] for e in after["evaluations"]] == [e["accuracy"] for e in before["evaluations"]]


@pytest.mark.parametrize(
    "text,what",
    [
        (b"", "empty file"),
        (b'{"schema": 1, "key"', "not valid JSON"),
        (b"[1, 2]", "a JSON list"),
        (b'{"status": "complete"}', "no 'schema' field"),
        (b"\xff\xfe{", "UnicodeDecodeError"),
    ],
    ids=["empty", "truncated", "list", "no-schema", "binary"],
)
def test_every_kind_of_damaged_record_is_named_in_run_and_report(text, what, data_root, tmp_path, capsys):
    args = [*ZS_ARGS, "--data-root", str(data_root), "--results-dir", str(tmp_path)]
    assert cli(args, capsys)[0] == 0
    (path,) = iter_run_files(tmp_path)
    good = path.read_bytes()
    other = path.parent.parent / "seed9-deadbeef" / "run.json"
    other.parent.mkdir()
    other.write_bytes(text)
    code, _, err = cli(["report", "--results-dir", str(tmp_path)], capsys)
    assert code == 0, err
    flat = " ".join(err.split())
    assert flat.count("skipping unreadable run record") == 1 and what in flat and "seed9-deadbeef" in flat
    path.write_bytes(text)
    code, _, err = cli(args, capsys)
    assert code == 0, err
    assert what in err and json.loads(path.read_text())["status"] == "complete"
    assert (path.parent / "run.json.corrupt").read_bytes() == text and good != text


def test_foreign_schema_record_is_refused_by_run_and_report_until_force(data_root, tmp_path, capsys):
    args = [*ZS_ARGS, "--data-root", str(data_root), "--results-dir", str(tmp_path)]
    assert cli(args, capsys)[0] == 0
    (path,) = iter_run_files(tmp_path)
    rec = json.loads(path.read_text())
    path.write_text(json.dumps({**rec, "schema": 99}))
    res = run_cli(args)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    (line,) = error_lines(res.stderr)
    assert "run record schema 99, this mugcp-bench reads schema 1" in line and "--force" in line
    assert str(path) in line
    code, _, err = cli(["report", "--results-dir", str(tmp_path)], capsys)
    assert code == 2
    (line,) = error_lines(err)
    assert str(path) in line and "schema 99" in line and "upgrade mugcp-bench" in line
    code, _, err = cli([*args, "--force"], capsys)
    assert code == 0, err
    assert json.loads(path.read_text())["schema"] == 1
    assert json.loads((path.parent / "run.json.schema99").read_text())["schema"] == 99  # kept aside


# --- 2. disk full --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fault", ["1:1:enospc", "1:1:enospc-record"], ids=["checkpoint", "record"])
def test_disk_full_is_one_line_recorded_failed_and_a_rerun_resumes(fault, data_root, uninterrupted, tmp_path, capsys):
    args = [*KILL_ARGS, "--data-root", str(data_root), "--results-dir", str(tmp_path)]
    res = run_cli(args, fault=fault)  # ENOSPC from the next write of checkpoint.pt / run.json after epoch 2 step 2
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    (line,) = error_lines(res.stderr)
    (path,) = iter_run_files(tmp_path)
    name = "checkpoint.pt" if fault.endswith("enospc") else "run.json"
    assert f"no space left in {path.parent} writing {name} (" in line and " free, about " in line
    assert "needed): free some space" in line and "rerun the same command to resume" in line
    rec = json.loads(path.read_text())  # never half-written
    assert rec["status"] == "failed" and rec["reason"].startswith("DiskFull: no space left")
    assert not [p for p in path.parent.rglob("*.tmp")]  # no temp file left behind
    state = torch.load(path.parent / "checkpoint.pt", weights_only=False)
    assert (state["epoch"], state["step"]) == (
        (0, None) if name == "checkpoint.pt" else (2, None)
    )  # record: the final one
    code, _, err = cli(args, capsys)  # space again: the rerun resumes from the last good checkpoint
    assert code == 0, err
    (a,), (b,) = records(tmp_path), records(uninterrupted)
    assert a["status"] == "complete"
    assert [e["accuracy"] for e in a["evaluations"]] == [e["accuracy"] for e in b["evaluations"]]
    assert same_model(model_state(tmp_path), model_state(uninterrupted))


def test_disk_full_message_names_the_folder_and_the_space(tmp_path, monkeypatch):
    import errno

    from mugcp_bench import atomic
    from mugcp_bench.errors import DiskFull
    from mugcp_bench.tensor_files import atomic_torch_save

    def full(*a, **kw):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    monkeypatch.setattr(atomic.os, "replace", full)
    (tmp_path / "model.pt").write_bytes(b"x" * 3000)
    with pytest.raises(
        DiskFull, match=rf"no space left in {tmp_path} writing model.pt \(.* free, about 8.0 KB needed\)"
    ):
        atomic_torch_save({"w": torch.zeros(2048)}, tmp_path / "model.pt")
    assert (tmp_path / "model.pt").read_bytes() == b"x" * 3000  # the old file is intact
    assert list(tmp_path.iterdir()) == [tmp_path / "model.pt"]


# --- 6. every option and setting in range, unreadable paths -------------------------------------------------------
OUT_OF_RANGE = [
    ("n_ctx=0", "n_ctx of method 'coop' must be >= 1, got 0"),
    ("lr=0", "lr of training must be > 0, got 0.0"),
    ("lr=-1e-3", "lr of training must be > 0, got -0.001"),
    ("lr=nan", "lr of training must be a finite number"),
    ("lr=inf", "lr of training must be a finite number"),
    ("epochs=-1", "epochs of training must be >= 0, got -1"),
    ("batch_size=0", "batch_size of training must be >= 1, got 0"),
    ("accum_steps=0", "accum_steps of training must be >= 1"),
    ("eval_batch_size=-4", "eval_batch_size of training must be >= 1"),
    ("momentum=1", "momentum of training must be in [0, 1), got 1.0"),
    ("weight_decay=-1", "weight_decay of training must be >= 0"),
    ("warmup_lr=0", "warmup_lr of training must be > 0"),
    ("crop_min_scale=1.5", "crop_min_scale of training must be in (0, 1], got 1.5"),
    ("init_std=-0.1", "init_std of method 'coop' must be >= 0"),
]


@pytest.mark.parametrize("setting,message", OUT_OF_RANGE, ids=[s for s, _ in OUT_OF_RANGE])
def test_every_setting_out_of_range_is_one_line_before_any_run(setting, message, data_root, tmp_path, capsys):
    args = ["run", "--methods", "coop", "--datasets", "dtd", "--data-root", str(data_root), *BASE]
    code, _, err = cli([*args, "--set", setting, "--results-dir", str(tmp_path)], capsys)
    assert code == 2 and "Traceback" not in err
    (line,) = error_lines(err)
    assert message in line and f"--set {setting.split('=')[0]}=" in line
    assert not iter_run_files(tmp_path)


def test_every_method_default_and_recipe_is_in_range():
    from mugcp_bench.methods.base import TrainConfig, apply_overrides, split_overrides
    from mugcp_bench.registry import METHODS
    from mugcp_bench.runs.settings import check_ranges

    check_ranges(TrainConfig(), "training")
    for name in METHODS.names():
        cls = METHODS.get(name)
        check_ranges(cls.make_config(), name)
        for drop, values in cls.ablations.items():
            check_ranges(cls.make_config(values), f"{name} no-{drop}")
        for recipe, table in cls.recipes.items():
            for protocol in table:
                for shots in (1, 16):
                    m, t = split_overrides(cls, cls.recipe(recipe, protocol, shots, "dtd"))
                    check_ranges(cls.make_config(m), name)
                    check_ranges(apply_overrides(TrainConfig(), t, "training"), name)


BAD_OPTIONS = [
    (["--seeds", ""], "--seeds '': give at least one seed"),
    (["--seeds", ","], "expected comma-separated integers"),
    (["--seeds", "-1"], "seeds must be >= 0"),
    (["--shots", ""], "--shots '': give shots per class"),
    (["--shots", "-2"], "shots must be positive"),
    (["--shots", "4,0"], "shots must be positive"),
]


@pytest.mark.parametrize("option,message", BAD_OPTIONS, ids=[" ".join(o) or "empty" for o, _ in BAD_OPTIONS])
def test_empty_or_negative_seeds_and_shots_are_refused(option, message, data_root, tmp_path, capsys):
    args = ["run", "--methods", "coop", "--datasets", "dtd", "--data-root", str(data_root), *BASE, *option]
    code, _, err = cli([*args, "--results-dir", str(tmp_path)], capsys)
    assert code == 2
    (line,) = error_lines(err)
    assert message in line and not iter_run_files(tmp_path)


def test_data_root_that_is_a_file_says_so(tmp_path, capsys):
    blocker = tmp_path / "data.tar"
    blocker.write_bytes(b"x")
    for command in (["run", "--methods", "coop", "--datasets", "dtd", *BASE], ["check-data"]):
        code, _, err = cli(
            [*command, "--data-root", str(blocker), "--results-dir", str(tmp_path / "r")]
            if command[0] == "run"
            else [*command, "--data-root", str(blocker)],
            capsys,
        )
        assert code == 2
        (line,) = error_lines(err)
        assert str(blocker) in line and "is a file" in line  # run: ours; check-data: click's Path check


def test_unreadable_paths_are_one_line_naming_them(data_root, tmp_path, monkeypatch, capsys):
    """Tests run as root here (chmod cannot lock root out): the OSError a permission problem raises is injected."""
    import errno

    from mugcp_bench.registry import DATASETS

    spec = DATASETS.get("dtd")
    victim = data_root / "dtd" / "images"

    def unreadable(root):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(victim))

    orig = type(spec).check
    monkeypatch.setattr(
        type(spec), "check", lambda self, root, **kw: unreadable(root) if self is spec else orig(self, root, **kw)
    )
    args = ["run", "--methods", "coop", "--datasets", "dtd", "--data-root", str(data_root), *BASE]
    code, _, err = cli([*args, "--results-dir", str(tmp_path)], capsys)
    assert code == 2 and "Traceback" not in err
    (line,) = error_lines(err)
    assert f"dtd: cannot read {victim} (Permission denied); fix its permissions" in line
    monkeypatch.undo()
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != data_root)
    code, _, err = cli([*args, "--results-dir", str(tmp_path)], capsys)
    assert code == 2
    (line,) = error_lines(err)
    assert f"data root {data_root} is not readable (permission denied)" in line


def test_an_os_error_reaching_the_cli_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    import errno

    from mugcp_bench.report import tidy

    def denied(results_dir):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path / "runs"))

    monkeypatch.setattr(tidy, "load_results", denied)
    monkeypatch.setattr("mugcp_bench.commands.report.load_results", denied)
    code, _, err = cli(["report", "--results-dir", str(tmp_path)], capsys)
    assert code == 2 and "Traceback" not in err
    (line,) = error_lines(err)
    assert f"cannot access {tmp_path / 'runs'}: Permission denied" in line


def test_shots_above_the_smallest_classes_warn_once_naming_how_many(data_root, tmp_path, capsys):
    from mugcp_bench.datasets import base

    base._WARNED_SHORT.clear()
    args = ["run", "--methods", "zsclip", "--datasets", "dtd", "--seeds", "1,2", "--shots", "5", *BASE]
    code, _, err = cli([*args, "--data-root", str(data_root), "--results-dir", str(tmp_path)], capsys)
    assert code == 0, err
    flat = " ".join(err.split())
    # miniature DTD trains 6, 3, 5, 1 images in its 4 classes: 2 have fewer than 5
    assert flat.count("classes have fewer than") == 1
    assert "dtd: 2 of 4 classes have fewer than 5 training images (the smallest has 1)" in flat


# --- 5. a SIGKILLed run whose launcher has not reaped it yet ------------------------------------------------------
def test_a_killed_but_unreaped_process_is_dead_so_its_run_is_resumed():
    """Before: signal 0 reached the zombie, its `running` record was left to it and `--resume` skipped the run
    (the record stayed `running` without accuracies)."""
    import time

    from mugcp_bench.store.claims import pid_alive

    child = subprocess.Popen([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
    stat = Path(f"/proc/{child.pid}/stat")
    for _ in range(200):  # until it is a zombie (killed, not reaped: we do not wait yet)
        if stat.read_text().rsplit(")", 1)[-1].split()[0] == "Z":
            break
        time.sleep(0.05)
    try:
        assert not pid_alive(child.pid)
        assert pid_alive(os.getpid())
    finally:
        child.wait()


# --- weights and checkpoints of another architecture ----------------------------------------------------------------
@pytest.mark.parametrize(
    "file_arch,backbone,what",
    [
        ("toy-clip", "tiny", "tensors of another shape (first: "),  # every width differs
        ("tiny-mismatch", "tiny", "extra (visual.transformer.resblocks.4."),  # two more vision blocks
        ("tiny", "tiny-mismatch", "missing (visual.transformer.resblocks.4."),  # two fewer
    ],
    ids=["reshaped", "extra-layers", "missing-layers"],
)
def test_backbone_weights_of_another_architecture_are_one_line_before_any_run(
    file_arch, backbone, what, data_root, tmp_path, capsys
):
    from mugcp_bench.model.backbone import load_backbone

    weights = tmp_path / f"{file_arch}.pt"
    torch.save(load_backbone(file_arch).model.state_dict(), weights)
    args = ["run", "--methods", "coop", "--datasets", "dtd", "--data-root", str(data_root), "--recipe", "toy"]
    code, _, err = cli(
        [*args, "--backbone", backbone, "--pretrained", str(weights), "--results-dir", str(tmp_path)], capsys
    )
    assert code == 2 and "Traceback" not in err and "size mismatch" not in err
    (line,) = error_lines(err)
    assert f"checkpoint '{weights}' does not fit backbone '{backbone}': " in line and what in line
    assert "pass the --backbone these weights were trained as" in line
    assert not iter_run_files(tmp_path)


def widened(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same parameter names, each one column wider: what another version of a method (or backbone) writes."""
    return {k: torch.zeros(*v.shape[:-1], v.shape[-1] + 1) for k, v in state.items()}


@pytest.mark.parametrize("damage", ["reshaped", "truncated"])
def test_a_resume_checkpoint_that_does_not_fit_is_kept_aside_and_the_run_retrained(
    damage, data_root, uninterrupted, killed, tmp_path, capsys
):
    args = [*KILL_ARGS, "--data-root", str(data_root), "--results-dir", str(tmp_path)]
    assert killed("1:1:kill", tmp_path).returncode == -signal.SIGKILL
    ckpt = iter_run_files(tmp_path)[0].parent / "checkpoint.pt"
    if damage == "reshaped":
        state = torch.load(ckpt, weights_only=False)
        torch.save({**state, "model": widened(state["model"])}, ckpt)
    else:
        ckpt.write_bytes(ckpt.read_bytes()[:200])
    before = ckpt.read_bytes()
    code, _, err = cli([*args, "--resume"], capsys)
    assert code == 0, err
    (warning,) = [line for line in err.splitlines() if "checkpoint.pt.unusable" in line]
    assert str(ckpt) in warning and "the run trains from the start" in warning
    assert (
        "does not fit coop on tiny (1 tensors of another shape" if damage == "reshaped" else "cannot be read"
    ) in warning
    assert (ckpt.parent / "checkpoint.pt.unusable").read_bytes() == before  # nothing lost
    (a,), (b,) = records(tmp_path), records(uninterrupted)
    assert a["status"] == "complete"
    assert [e["accuracy"] for e in a["evaluations"]] == [e["accuracy"] for e in b["evaluations"]]
    assert same_model(model_state(tmp_path), model_state(uninterrupted))


def test_a_stored_model_that_does_not_fit_is_kept_aside_and_the_run_retrained(
    data_root, uninterrupted, tmp_path, capsys
):
    import shutil

    shutil.copytree(uninterrupted, tmp_path / "r")
    results = tmp_path / "r"
    (path,) = iter_run_files(results)
    rec = json.loads(path.read_text())
    rec["evaluations"] = rec["evaluations"][:1]  # one evaluation missing: the run is evaluated from model.pt
    path.write_text(json.dumps(rec))
    model = path.parent / "model.pt"
    torch.save(widened(torch.load(model, weights_only=True)), model)
    code, _, err = cli([*KILL_ARGS, "--data-root", str(data_root), "--results-dir", str(results)], capsys)
    assert code == 0, err
    (warning,) = [line for line in err.splitlines() if "model.pt.unusable" in line]
    assert "does not fit coop on tiny (1 tensors of another shape (first: ctx is [" in warning
    (a,), (b,) = records(results), records(uninterrupted)
    assert a["status"] == "complete" and len(a["evaluations"]) == len(b["evaluations"])
    assert [e["accuracy"] for e in a["evaluations"]] == [e["accuracy"] for e in b["evaluations"]]
    assert same_model(model_state(results), model_state(uninterrupted))


# --- 3b. Ctrl-C in a terminal reaches the workers too ----------------------------------------------------------------
@pytest.mark.slow
def test_ctrl_c_to_the_process_group_under_gpu_workers_exits_130_and_a_rerun_equals_uninterrupted(
    data_root, tmp_path, capsys
):
    """A terminal's Ctrl-C sends SIGINT to the sweep and to every worker: each worker defers it (stops after its
    step, checkpoint kept), the sweep exits 130 with its one line, no traceback from any process."""
    import time

    args = ["run", "--methods", "coop", "--datasets", "dtd,eurosat", "--seeds", "1", *BASE]
    args += ["--set", "epochs=3", "--set", "batch_size=2", "--data-root", str(data_root)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "MUGCP_PLUGINS": PLUGIN}
    env.pop("FAULT_AT", None)
    argv = [sys.executable, "-m", "mugcp_bench", *args, "--executor", "gpus", "--gpus", "cpu:2"]
    proc = subprocess.Popen(
        [*argv, "--results-dir", str(tmp_path / "a")],
        env={**env, "FAULT_STEP_SLEEP": "0.1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a shell gives a foreground job
    )
    deadline = time.time() + 240
    while not any((tmp_path / "a").glob("runs/**/checkpoint.pt")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the sweep ended before its first checkpoint"
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "rerun the same command to resume" in err
    statuses = sorted(r["status"] for r in records(tmp_path / "a"))
    assert "interrupted" in statuses and not {"failed", "running"} & set(statuses), statuses
    rerun = subprocess.run([*argv, "--results-dir", str(tmp_path / "a")], env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    with torch_threads(worker_threads("gpus")):  # uninterrupted, in this process, as the workers compute
        code, _, err = cli([*args, "--results-dir", str(tmp_path / "b")], capsys)
    assert code == 0, err
    got = {r["id"]: r for r in records(tmp_path / "a")}
    want = {r["id"]: r for r in records(tmp_path / "b")}
    assert got.keys() == want.keys()
    for rid, rec in want.items():
        assert got[rid]["status"] == "complete"
        assert [e["accuracy"] for e in got[rid]["evaluations"]] == [e["accuracy"] for e in rec["evaluations"]]
        assert [h["loss"] for h in got[rid]["history"]] == [h["loss"] for h in rec["history"]]
