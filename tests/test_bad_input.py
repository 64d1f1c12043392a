"""Every kind of bad input, through the real entry point: exit 2, exactly one `error:` line, no traceback, nothing
written (the rule for bad input: one line naming the problem and the fix, before any work)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mugcp_bench.store.records import iter_run_files
from tests.cli_harness import cli
from tests.miniature import build_miniature

DATA = "{data}"  # replaced by the miniature data root
RUN = ["run", "--methods", "coop", "--datasets", "dtd", "--data-root", DATA, "--backbone", "tiny"]
RUN += ["--pretrained", "random", "--recipe", "toy"]

# (argv, what the one line must say)
CASES = [
    (["nope"], "unknown command 'nope'"),
    (["run", "--nope"], "No such option '--nope'"),
    (["list", "nope"], "nope"),
    ([*RUN[:2], "coopp", *RUN[3:]], "Did you mean 'coop'"),
    ([*RUN[:4], "dtdd", *RUN[5:]], "Did you mean 'dtd'"),
    ([*RUN, "--protocol", "base2novl"], "Did you mean 'base2novel'"),
    ([*RUN[:8], "ViT-B-61", *RUN[9:]], "ViT-B-16"),
    ([*RUN, "--seeds", "one"], "expected comma-separated integers"),
    ([*RUN, "--seeds", ""], "give at least one seed"),
    ([*RUN, "--shots", "x"], "--shots"),
    ([*RUN, "--set", "lr=-1"], "lr"),
    ([*RUN, "--set", "n_ctx=0"], "n_ctx"),
    ([*RUN, "--set", "epochs=1.5"], "epochs"),
    ([*RUN, "--set", "n_ctxx=4"], "Did you mean 'n_ctx'"),
    ([*RUN, "--set", "lr"], "expected key=value"),
    ([*RUN, "--grid", "n_ctx"], "expected key=v1,v2"),
    ([*RUN, "--grid", "n_ctx=4,"], "give a setting and one or more values"),
    ([*RUN, "--grid", "n_ctx=4,0"], "n_ctx"),  # every combination is checked before the first run
    ([*RUN, "--grid", "n_ctxx=4,8"], "Did you mean 'n_ctx'"),
    ([*RUN, "--grid", "n_ctx=4,8", "--set", "n_ctx=2"], "also given with --set"),
    ([*RUN, "--grid", "lr=0.1", "--grid", "lr=0.2"], "is given twice"),
    ([*RUN, "--precision", "fp8"], "fp8"),
    ([*RUN, "--precision", "reference-fp16", "--device", "cpu"], "reference-fp16"),
    ([*RUN, "--device", "tpu"], "tpu"),
    ([*RUN, "--executor", "slurm"], "slurm"),
    ([*RUN, "--executor", "gpus", "--gpus", "a,b"], "--gpus"),
    ([*RUN, "--workers", "-1"], "--workers"),
    ([*RUN, "--claim-timeout", "0"], "--claim-timeout"),
    ([*RUN[:6], "/nonexistent/data", *RUN[7:]], "/nonexistent/data does not exist"),
    ([*RUN[:10], "/nonexistent/weights.pt", *RUN[11:]], "/nonexistent/weights.pt"),
    (["ablate", "--method", "mugcp", "--drop", "amgg", "--datasets", "toy_shapes"], "Did you mean 'amg'"),
    (["ablate", "--method", "coop", "--drop", "amg", "--datasets", "toy_shapes"], "amg"),
    (["report", "--format", "xlsx"], "'xlsx' is not one of"),
    (["report", "--protocol", "base2novl"], "unknown protocol 'base2novl'. Did you mean 'base2novel'"),
    (["check-data", "--data-root", DATA, "--datasets", "dtdd"], "Did you mean 'dtd'"),
    (["check-data", "--data-root", DATA, "--workers", "0"], "--workers"),
    (["check-data", "--data-root", "/nonexistent/data"], "/nonexistent/data does not exist"),
    (["describe", "--data-root", DATA, "--datasets", "dtd", "--describer", "mlm"], "Did you mean 'mllm'"),
    (["toy", "nope"], "nope"),
    # a setting another setting overrides, a setting of another method, a depth the backbone cannot hold
    ([*RUN, "--set", "n_ctx=16"], "coop takes n_ctx from ctx_init"),
    ([*RUN, "--grid", "n_ctx=4,16"], "also --set ctx_init="),
    ([*RUN[:2], "coop,maple", *RUN[3:], "--set", "prompt_depth=3"], "scope it: --set maple.prompt_depth=3"),
    ([*RUN, "--set", "maple.n_ctx=2"], "maple is not among the methods of this sweep"),
    ([*RUN[:2], "coop,maple", *RUN[3:-1], "paper"], "--set maple.prompt_depth=4 or less"),
    ([*RUN[:2], "zsclip", *RUN[3:], "--set", "zsclip.lr=0.1"], "zsclip trains nothing"),
    # the tiny backbone's way out, and the datasets present when others are missing
    ([*RUN[:9], "--recipe", "toy"], "--pretrained random"),
    ([*RUN[:4], "dtd,eurosat", *RUN[5:]], "to run the ones present: --datasets dtd"),
    (["run", "--methods", "coop", "--show-config", "--datasets", "toy_shapes"], "--show-config"),
]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return build_miniature(tmp_path_factory.mktemp("data"), ["dtd"])


@pytest.mark.parametrize("argv,needle", CASES, ids=[" ".join(a[:1] + a[-2:]) for a, _ in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(argv, needle, data_root, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # commands write under ./results by default
    argv = [str(data_root) if a == DATA else a for a in argv]
    code, out, err = cli([*argv, "--results-dir", str(tmp_path / "r")] if argv[0] == "run" else argv, capsys)
    assert code == 2, (out, err)
    assert "Traceback" not in err and "Usage:" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle in lines[0], lines[0]
    assert not iter_run_files(tmp_path / "r") and not (tmp_path / "results").exists()
