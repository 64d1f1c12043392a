"""Executors (local, gpus with CPU workers, ray on a loopback cluster) and run claims, end to end on the tiny
backbone: the same numbers under every executor, every run trained once, a killed worker's run resumed."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from filelock import FileLock

from mugcp_bench import run_sweep
from mugcp_bench.store.claims import CLAIM_FILE, LOCK_FILE, read_holder
from mugcp_bench.store.records import iter_run_files
from tests.miniature import build_miniature
from tests.numerics import torch_threads

TINY = {"backbone": "tiny", "pretrained": "random", "recipe": "toy"}
SWEEP = {"methods": "zsclip,coop,maple", "datasets": "dtd,eurosat", "seeds": "1,2", "sets": {"epochs": 1}, **TINY}
CLI_TINY = ["--backbone", "tiny", "--pretrained", "random", "--recipe", "toy"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return build_miniature(tmp_path_factory.mktemp("data"), ["dtd", "eurosat"])


def records(results: Path) -> dict[str, dict]:
    return {(r := json.loads(p.read_text()))["id"]: r for p in iter_run_files(results)}


def comparable(rec: dict) -> dict:
    """What must not depend on the executor: key, config, status, losses and every evaluation's numbers."""
    evals = sorted(
        (e["protocol"], e["dataset"], e["classes"], e["n"], e["accuracy"], e["accuracy_1dp"])
        for e in rec["evaluations"]
    )
    losses = [{k: v for k, v in h.items() if k.startswith("loss")} for h in rec.get("history", [])]
    return {
        "key": rec["key"],
        "config": rec["config"],
        "status": rec["status"],
        "trainable_params": rec["trainable_params"],
        "last_loss": rec.get("last_loss"),
        "losses": losses,
        "evaluations": evals,
    }


def worker_threads(executor: str) -> int:
    """The intra-op threads each worker of `two_workers(executor)` trains with: gpus gives each of its cpu:2 workers
    half the cores, Ray each task its one CPU (--ray-cpus-per-run's default). A sweep in this process equals a worker's
    bit for bit only under the same count: float sums split over threads add in another order (tests.numerics)."""
    if executor == "gpus":
        from mugcp_bench.runs.executors.gpus import parse_gpus

        return parse_gpus("cpu:2")[0].threads
    return 1


@pytest.fixture(scope="module")
def local_results(data_root, tmp_path_factory) -> Callable[[int], Path]:
    """`local_results(threads)`: the sweep under the local executor in this process with that many intra-op threads
    (run once per count), the reference for workers that train with as many."""
    made: dict[int, Path] = {}

    def sweep(threads: int) -> Path:
        if threads not in made:
            out = tmp_path_factory.mktemp(f"local-{threads}-threads")
            with torch_threads(threads):
                result = run_sweep(data_root=data_root, results_dir=out, **SWEEP)
            assert not result.failed and len(result.trained) == 12
            made[threads] = out
        return made[threads]

    return sweep


# Two coop runs of 3 epochs: long enough for a worker to be killed or interrupted after its first checkpoint.
RESUMABLE = {**TINY, "methods": "coop", "datasets": "dtd,eurosat", "seeds": "1", "sets": {"epochs": 3, "batch_size": 2}}


@pytest.fixture(scope="module")
def uninterrupted(data_root, tmp_path_factory) -> Callable[[int], Path]:
    """`uninterrupted(threads)`: the RESUMABLE sweep run straight through in this process with that many intra-op
    threads (once per count, shared by the kill and Ctrl-C tests of both executors)."""
    made: dict[int, Path] = {}

    def sweep(threads: int) -> Path:
        if threads not in made:
            out = tmp_path_factory.mktemp(f"uninterrupted-{threads}-threads")
            with torch_threads(threads):
                result = run_sweep(data_root=data_root, results_dir=out, **RESUMABLE)
            assert not result.failed and len(result.trained) == 2
            made[threads] = out
        return made[threads]

    return sweep


@pytest.fixture(scope="module", autouse=True)
def _one_ray_cluster() -> Iterator[None]:
    """The Ray tests share one loopback cluster (`two_workers("ray")` starts it): its start and its worker processes'
    imports are paid once; it is shut down after the module."""
    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


@pytest.mark.slow
def test_gpu_workers_on_the_cpu_give_the_local_numbers_bit_for_bit(data_root, local_results, tmp_path):
    result = run_sweep(data_root=data_root, results_dir=tmp_path, executor="gpus", gpus="cpu:2", **SWEEP)
    assert not result.failed and len(result.trained) == 12
    got, want = records(tmp_path), records(local_results(worker_threads("gpus")))
    assert got.keys() == want.keys()
    for rid, rec in want.items():
        assert comparable(got[rid]) == comparable(rec), rec["method_label"]
    pids = {a["pid"] for r in got.values() for a in r["attempts"]}
    assert len(pids) == 2 and os.getpid() not in pids  # two worker processes did the runs
    assert result.table().equals(run_sweep(data_root=data_root, results_dir=tmp_path, **SWEEP).table())


@pytest.mark.slow
def test_ray_tasks_on_a_loopback_cluster_give_the_local_numbers_bit_for_bit(data_root, local_results, tmp_path):
    with two_workers("ray") as extra:
        result = run_sweep(data_root=data_root, results_dir=tmp_path, **extra, **SWEEP)
    assert not result.failed and len(result.trained) == 12
    got, want = records(tmp_path), records(local_results(worker_threads("ray")))
    assert got.keys() == want.keys()
    for rid, rec in want.items():
        assert comparable(got[rid]) == comparable(rec), rec["method_label"]
    assert all(a["pid"] != os.getpid() for r in got.values() for a in r["attempts"])


def test_without_ray_the_ray_executor_exits_2_with_the_install_line(data_root, tmp_path, monkeypatch, capsys):
    from mugcp_bench.commands.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    argv = ["run", "--methods", "coop", "--datasets", "dtd", "--data-root", str(data_root), *CLI_TINY]
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--results-dir", str(tmp_path), "--executor", "ray"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "pip install 'mugcp-bench[ray]'" in err, err
    assert not iter_run_files(tmp_path)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--executor", "rya"], "unknown executor 'rya'. Did you mean 'ray'?"),
        (["--executor", "gpus", "--gpus", "0"], "--gpus 0: device 0 does not exist"),
        (["--executor", "gpus", "--gpus", "cpu:0"], "expected cpu:N with N >= 1"),
        (["--gpus", "cpu:2"], "--gpus is an option of --executor gpus"),
        (["--ray-address", "auto"], "--ray-address is an option of --executor ray (not local)"),
        (["--claim-timeout", "0"], "--claim-timeout 0.0: must be a positive number of seconds"),
    ],
)
def test_bad_executor_options_one_line_exit_2(extra, message, data_root, tmp_path, capsys):
    from mugcp_bench.commands.cli import main

    if "--gpus" in extra and extra[-1] == "0" and torch.cuda.is_available():
        extra = [*extra[:-1], str(torch.cuda.device_count())]
        message = message.replace("0", extra[-1])
    argv = ["run", "--methods", "coop", "--datasets", "dtd", "--data-root", str(data_root), *CLI_TINY, *extra]
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--results-dir", str(tmp_path)])
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert exc.value.code == 2 and len(lines) == 1 and message in lines[0], lines
    assert not iter_run_files(tmp_path)


@pytest.mark.slow
def test_two_run_commands_at_once_train_every_run_exactly_once(data_root, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    argv = [sys.executable, "-m", "mugcp_bench", "run", "--methods", "coop", "--datasets", "dtd,eurosat"]
    argv += ["--seeds", "1,2", "--data-root", str(data_root), *CLI_TINY, "--set", "epochs=2", "--json"]
    argv += ["--results-dir", str(tmp_path)]
    procs = [subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in "ab"]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    recs = records(tmp_path)
    assert len(recs) == 4 and all(r["status"] == "complete" for r in recs.values())
    assert [len(r["attempts"]) for r in recs.values()] == [1, 1, 1, 1]  # one training start per run, in total
    assert all(r["attempts"][0]["action"] == "train" for r in recs.values())
    summaries = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert all(s["failed"] == 0 for s in summaries)
    assert not list(tmp_path.glob(f"runs/**/{CLAIM_FILE}"))  # every claim released


@contextlib.contextmanager
def two_workers(executor: str, own_cluster: bool = False) -> Iterator[dict]:
    """`run_sweep` options for two workers: two CPU workers under gpus, or Ray on a loopback cluster of 2 CPUs: the
    module's shared one (started by the first Ray test: `_one_ray_cluster`), or with `own_cluster` one started now
    and shut down after the block (its worker processes see the environment variables set now)."""
    if executor == "gpus":
        yield {"executor": "gpus", "gpus": "cpu:2"}
        return
    ray = pytest.importorskip("ray", reason="the ray extra is installed by `make test`")
    if own_cluster and ray.is_initialized():
        ray.shutdown()
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        yield {"executor": "ray"}
    finally:
        if own_cluster:
            ray.shutdown()


@contextlib.contextmanager
def watching(target: Callable[[Path, dict, threading.Event], None], results: Path) -> Iterator[dict]:
    """Run `target(results, found, stop)` in a thread for the block; yields `found` (what the watcher did)."""
    found: dict = {}
    stop = threading.Event()
    watcher = threading.Thread(target=target, args=(results, found, stop))
    watcher.start()
    try:
        yield found
    finally:
        stop.set()
        watcher.join()


def _kill_first_worker_after_its_first_epoch(results: Path, killed: dict, stop: threading.Event) -> None:
    """Watch the results for a checkpoint (epoch 1 done) and SIGKILL the worker named in that run's claim."""
    while not stop.is_set():
        for ckpt in results.glob("runs/**/checkpoint.pt"):
            holder = read_holder(ckpt.parent)
            if holder is not None:
                os.kill(holder.pid, signal.SIGKILL)
                killed.update(pid=holder.pid, run_dir=ckpt.parent)
                return
        time.sleep(0.01)


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["gpus", "ray"])
def test_a_worker_killed_mid_run_is_replaced_and_the_run_resumes_to_the_uninterrupted_numbers(
    executor, data_root, uninterrupted, tmp_path
):
    with two_workers(executor) as extra, watching(_kill_first_worker_after_its_first_epoch, tmp_path / "a") as killed:
        result = run_sweep(data_root=data_root, results_dir=tmp_path / "a", **extra, **RESUMABLE)
    assert killed, "no worker was killed (the runs finished before the first checkpoint was seen)"
    assert not result.failed and len(result.trained) == 2
    interrupted = json.loads((killed["run_dir"] / "run.json").read_text())
    assert [a["action"] for a in interrupted["attempts"]] == ["train", "resume"]
    assert interrupted["attempts"][0]["pid"] == killed["pid"] != interrupted["attempts"][1]["pid"]
    straight = uninterrupted(worker_threads(executor))  # in this process, as the workers compute
    got, want = records(tmp_path / "a"), records(straight)
    for rid, rec in want.items():
        assert comparable(got[rid]) == comparable(rec)
    rel = killed["run_dir"].relative_to(tmp_path / "a")
    sa = torch.load(killed["run_dir"] / "model.pt")
    sb = torch.load(straight / rel / "model.pt")
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_run_claimed_elsewhere_is_left_to_its_owner_then_taken_over_once_stale(data_root, tmp_path, capsys):
    from mugcp_bench.commands.cli import main

    kw = {**TINY, "methods": "coop", "datasets": "dtd", "seeds": "1,2", "sets": {"epochs": 1}}
    plan = run_sweep(data_root=data_root, results_dir=tmp_path, dry_run=True, **kw)
    busy = plan.runs[0].path.parent
    busy.mkdir(parents=True)
    body = {"host": "other-node", "pid": 1, "token": "x", "started": time.time(), "heartbeat": time.time()}
    (busy / CLAIM_FILE).write_text(json.dumps(body))
    argv = ["run", "--methods", "coop", "--datasets", "dtd", "--seeds", "1,2", "--data-root", str(data_root)]
    argv += [*CLI_TINY, "--set", "epochs=1", "--results-dir", str(tmp_path), "--claim-timeout", "1.5", "--json"]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out = capsys.readouterr()
    assert exc.value.code == 0, out.err
    summary = json.loads(out.out.strip().splitlines()[-1])
    assert summary["claimed"] == 1 and "claimed by another process" in out.err
    assert not (busy / "run.json").exists()  # someone is on it: not touched
    time.sleep(1.6)  # the other node's heartbeat is now older than --claim-timeout
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out = capsys.readouterr()
    assert exc.value.code == 0, out.err
    assert json.loads(out.out.strip().splitlines()[-1])["claimed"] == 0
    rec = json.loads((busy / "run.json").read_text())
    assert rec["status"] == "complete" and len(rec["attempts"]) == 1
    assert not (busy / CLAIM_FILE).exists()


@pytest.mark.slow
def test_a_diverging_run_is_recorded_failed_with_its_reason_the_others_complete_exit_1(data_root, tmp_path, capsys):
    from mugcp_bench.commands.cli import main

    argv = ["run", "--methods", "zsclip,coop", "--datasets", "dtd,eurosat", "--seeds", "1", "--data-root"]
    argv += [str(data_root), *CLI_TINY, "--set", "epochs=3", "--set", "lr=1e30", "--results-dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--json", "--executor", "gpus", "--gpus", "cpu:2"])  # no --keep-going: workers always go on
    out = capsys.readouterr()
    assert exc.value.code == 1 and "failed runs" in out.err
    by_method: dict[str, list] = {}
    for r in records(tmp_path).values():
        by_method.setdefault(r["key"]["method"], []).append(r)
    assert [r["status"] for r in by_method["zsclip"]] == ["complete", "complete"]
    for r in by_method["coop"]:  # lr 1e30 diverges after the warm-up epoch: NaN / inf loss, stopped at that step
        assert r["status"] == "failed" and r["evaluations"] == [] and r["failure"]["kind"] == "non_finite"
        assert "lower the learning rate" in r["reason"]
    assert json.loads(out.out.strip().splitlines()[-1])["failed"] == 2


FEATURES = """
import sys, time
from pathlib import Path
import torch
from mugcp_bench.model.backbone import load_backbone
from mugcp_bench.datasets.base import prepare
from mugcp_bench.frozen.features import image_features

root, cache, log, start = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), float(sys.argv[4])
torch.manual_seed(0)
backbone = load_backbone("tiny")
encode = backbone.encode_image
def counting(images, *a, **k):
    with open(log, "a") as f:
        f.write(f"{images.shape[0]}\\n")
    time.sleep(0.2)  # a slow build, so that the second process arrives while the first computes
    return encode(images, *a, **k)
backbone.encode_image = counting
items = prepare("dtd", root, None, 1, "all", cache).test
while time.time() < start:
    time.sleep(0.001)
feats = image_features(backbone, items, backbone.test_transform, torch.device("cpu"), "fp32", cache, 4, "dtd")
torch.save(feats, sys.argv[5])
"""


def race_two(script: str, data_root: Path, tmp_path: Path, log_name: str, delay: float, out: str) -> Path:
    """Two processes run `script` (data root, cache, call log, start time, output) from the same instant, `delay`
    seconds from now, on one cache; both must exit 0. Returns the call log."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    log, start = tmp_path / log_name, time.time() + delay
    argv = [sys.executable, "-c", script, str(data_root), str(tmp_path / "cache"), str(log), str(start)]
    procs = [
        subprocess.Popen([*argv, str(tmp_path / out.format(i))], env=env, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    return log


@pytest.mark.slow
def test_two_processes_needing_the_same_image_features_build_them_once(data_root, tmp_path):
    from mugcp_bench.datasets.base import prepare

    log = race_two(FEATURES, data_root, tmp_path, "encode_calls.txt", 8.0, "feats{}.pt")
    n_test = len(prepare("dtd", data_root, None, 1, "all").test)
    assert sum(int(x) for x in log.read_text().split()) == n_test  # every image encoded once, by one process
    a, b = torch.load(tmp_path / "feats0.pt"), torch.load(tmp_path / "feats1.pt")
    assert a.shape[0] == n_test and torch.equal(a, b)
    assert len(list((tmp_path / "cache" / "features").glob("*.pt"))) == 1


def test_a_run_whose_claim_is_taken_over_stops_and_leaves_the_record_to_the_new_owner(data_root, tmp_path):
    from mugcp_bench.paths import default_cache_dir
    from mugcp_bench.protocols import REAL_SUITE, get_protocol
    from mugcp_bench.runs.job import RunTask, get_backbone, perform
    from mugcp_bench.runs.options import RunSettings
    from mugcp_bench.runs.plan import plan

    settings = RunSettings(
        tmp_path, data_root, default_cache_dir(), recipe="toy", overrides={"epochs": "3"}, claim_timeout=0.4
    )
    bb = get_backbone("tiny", None, "cpu")
    (run,) = plan(settings, bb, ["coop"], [get_protocol("base2novel")], REAL_SUITE, ("dtd",), None, [1])
    steps = []

    def on_step(info):
        steps.append(info)
        if len(steps) == 1:  # another process judged us stale and took the run: its claim replaces ours
            body = {"host": "other-node", "pid": 1, "token": "new", "started": time.time(), "heartbeat": time.time()}
            with FileLock(str(run.record.dir / LOCK_FILE)):  # as a taker does: under the claim lock
                (run.record.dir / CLAIM_FILE).write_text(json.dumps(body))
            time.sleep(1.0)  # the heartbeat (every 0.1 s) notices

    result = perform(RunTask(run), settings, progress=on_step)
    assert result.status == "running" and "claim taken over by other-node" in result.reason
    assert len(steps) == 1  # training stopped at the next step
    rec = json.loads((run.record.dir / "run.json").read_text())
    assert rec["status"] == "running" and rec["evaluations"] == []  # not marked failed or complete by us
    assert read_holder(run.record.dir).token == "new"  # the new owner's claim is left in place


DESCRIPTIONS = """
import sys, time
from pathlib import Path
from mugcp_bench.datasets.base import prepare
from mugcp_bench.describers.base import Describer
from mugcp_bench.describers.cached import describe_items
from mugcp_bench.describers.cache import DescriptionCache

root, cache, log, start, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), float(sys.argv[4]), sys.argv[5]

class Slow(Describer):
    name, default_prompt_id = "slow", "slow_v1"
    id = "slow-v1"
    def describe(self, items):
        with open(log, "a") as f:
            f.write(f"{len(items)}\\n")
        time.sleep(0.2)  # an expensive describer: the second process arrives while the first one describes
        return [f"an image of {Path(d.impath).name}" for d in items]

items = prepare("dtd", root, None, 1, "all").test
while time.time() < start:
    time.sleep(0.001)
outcome = describe_items(items, Slow(), DescriptionCache(cache), batch_size=2)
Path(out).write_text(repr(sorted(outcome.texts.items())))
"""


def test_two_processes_missing_the_same_descriptions_describe_each_image_once(data_root, tmp_path):
    from mugcp_bench.datasets.base import prepare
    from mugcp_bench.describers.image_keys import image_sha1

    log = race_two(DESCRIPTIONS, data_root, tmp_path, "describe_calls.txt", 6.0, "texts{}.txt")
    distinct = {image_sha1(d) for d in prepare("dtd", data_root, None, 1, "all").test}
    assert sum(int(x) for x in log.read_text().split()) == len(distinct)  # each image described once in all
    assert (tmp_path / "texts0.txt").read_text() == (tmp_path / "texts1.txt").read_text()


def test_a_run_left_running_by_a_crashed_host_is_picked_up_unless_its_claim_is_live(data_root, tmp_path):
    kw = {**TINY, "methods": "coop", "datasets": "dtd", "seeds": "1", "sets": {"epochs": 1}, "results_dir": tmp_path}
    (planned,) = run_sweep(data_root=data_root, dry_run=True, **kw).runs
    planned.path.parent.mkdir(parents=True)
    planned.path.write_text(json.dumps({"schema": 1, "status": "running", "owner": {"host": "other-node", "pid": 1}}))
    body = {"host": "other-node", "pid": 1, "token": "x", "started": time.time(), "heartbeat": time.time()}
    (planned.path.parent / CLAIM_FILE).write_text(json.dumps(body))
    (live,) = run_sweep(data_root=data_root, dry_run=True, **kw).runs
    assert live.action == "claimed"  # its owner's heartbeat is fresh: someone is on it
    (planned.path.parent / CLAIM_FILE).unlink()  # the owner's host crashed long ago; no claim is left
    result = run_sweep(data_root=data_root, **kw)
    assert [r.action for r in result.runs] == ["train"] and not result.failed
    assert json.loads(planned.path.read_text())["status"] == "complete"


@pytest.mark.slow
def test_workers_load_the_plugins_the_cli_loaded(data_root, tmp_path, monkeypatch):
    """A callback-only plugin (tests.fault_plugins: FAULT_AT kills the process at the end of epoch 2) acts inside
    the worker: the worker dies once, its replacement resumes the run from the checkpoint and finishes it."""
    from mugcp_bench import plugins

    monkeypatch.setenv("MUGCP_PLUGINS", "tests.fault_plugins")
    monkeypatch.setenv("FAULT_AT", "1:end:kill")
    kw = {**TINY, "methods": "coop", "datasets": "dtd", "seeds": "1", "sets": {"epochs": 3, "batch_size": 2}}
    try:
        result = run_sweep(data_root=data_root, results_dir=tmp_path, executor="gpus", gpus="cpu:1", **kw)
    finally:
        plugins._loaded.discard("tests.fault_plugins")
        sys.modules.pop("tests.fault_plugins", None)
    assert not result.failed
    (rec,) = records(tmp_path).values()
    assert rec["status"] == "complete" and [a["action"] for a in rec["attempts"]] == ["train", "resume"]


def _ctrl_c_after_the_first_checkpoint(results: Path, sent: dict, stop: threading.Event) -> None:
    """Watch the results for a checkpoint (epoch 1 done) and send this process the SIGINT a Ctrl-C would."""
    while not stop.is_set():
        if any(results.glob("runs/**/checkpoint.pt")):
            os.kill(os.getpid(), signal.SIGINT)
            sent["at"] = time.time()
            return
        time.sleep(0.01)


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["gpus", "ray"])
def test_ctrl_c_stops_every_worker_after_its_step_and_a_rerun_equals_uninterrupted(
    executor, data_root, uninterrupted, tmp_path, monkeypatch
):
    """The SIGINT reaches only the sweep's process (as `kill -INT`): its workers learn of it through the stop file,
    checkpoint after their step, record `interrupted`; the sweep raises KeyboardInterrupt (the CLI: exit 130)."""
    from mugcp_bench import plugins

    kw = RESUMABLE
    monkeypatch.setenv("MUGCP_PLUGINS", "tests.fault_plugins")  # in the workers: 0.1 s more per step
    monkeypatch.setenv("FAULT_STEP_SLEEP", "0.1")
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parents[1]))
    try:  # a Ray cluster of its own: its workers start with the variables above
        with (
            two_workers(executor, own_cluster=True) as extra,
            watching(_ctrl_c_after_the_first_checkpoint, tmp_path / "a") as sent,
        ):
            with pytest.raises(KeyboardInterrupt):
                run_sweep(data_root=data_root, results_dir=tmp_path / "a", **extra, **kw)
    finally:
        monkeypatch.delenv("FAULT_STEP_SLEEP")  # the reruns below (in this process) at full speed
        plugins._loaded.discard("tests.fault_plugins")
        sys.modules.pop("tests.fault_plugins", None)
    assert sent, "no Ctrl-C was sent (the runs finished before the first checkpoint was seen)"
    got = records(tmp_path / "a")
    statuses = sorted(r["status"] for r in got.values())
    assert "interrupted" in statuses and "failed" not in statuses and "running" not in statuses, statuses
    for path in iter_run_files(tmp_path / "a"):
        rec = json.loads(path.read_text())
        if rec["status"] == "interrupted":
            assert (path.parent / "checkpoint.pt").is_file()  # after a step (or the epoch the step ended)
            assert rec["reason"].startswith("interrupted by Ctrl-C at epoch ")
            assert os.getpid() not in [a["pid"] for a in rec["attempts"]]  # a worker ran it
    assert not (tmp_path / "a" / ".stop").exists()  # the stop file is gone with the sweep
    with torch_threads(worker_threads(executor)):  # in this process, as the workers compute
        rerun = run_sweep(data_root=data_root, results_dir=tmp_path / "a", **kw)  # resumes from their checkpoints
    assert not rerun.failed and rerun.trained
    got, want = records(tmp_path / "a"), records(uninterrupted(worker_threads(executor)))
    assert got.keys() == want.keys()
    for rid, rec in want.items():
        assert comparable(got[rid]) == comparable(rec)


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["gpus", "ray"])
def test_workers_report_their_training_steps_to_the_sweeps_reporter(executor, data_root, tmp_path):
    from mugcp_bench.runs.progress import Reporter

    class Recording(Reporter):
        def __init__(self) -> None:
            self.steps: dict[str, list[tuple[int, int]]] = {}
            self.finished: list[str] = []

        def step(self, label, info):
            self.steps.setdefault(label, []).append((info["epoch"], info["step"]))

        def run_finished(self, result):
            self.finished.append(result.label)

    reporter = Recording()
    kw = {**TINY, "methods": "coop", "datasets": "dtd,eurosat", "seeds": "1", "sets": {"epochs": 2, "batch_size": 2}}
    with two_workers(executor) as extra:
        result = run_sweep(data_root=data_root, results_dir=tmp_path, reporter=reporter, **extra, **kw)
    assert not result.failed and len(result.trained) == 2
    assert sorted(reporter.steps) == sorted(reporter.finished)  # every run reported steps from its worker
    for label, seen in reporter.steps.items():
        assert seen == sorted(seen), label  # in training order
        assert {e for e, _ in seen} == {0, 1}  # the last step of every epoch is always reported
