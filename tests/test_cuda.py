"""The CUDA path: every precision mode end to end on a GPU (tiny backbone, miniature datasets).

These tests cannot run without a GPU (autocast, the gradient scaler, pinned memory and CUDA kernels are the thing
tested); on the CPU everything that can be checked there is in test_precision.py and test_backbone.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mugcp_bench.commands.cli import main
from mugcp_bench.engine.trainer import evaluate, prepare_method
from mugcp_bench.model.backbone import REFERENCE_FP16, load_backbone
from mugcp_bench.store.records import iter_run_files
from tests.method_harness import CLASSNAMES, build_method, write_items
from tests.miniature import build_miniature

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

METHODS = "zsclip,coop,cocoop,maple,dcp,mugcp"
BASE = ["--backbone", "tiny", "--pretrained", "random", "--recipe", "toy", "--device", "cuda", "--seeds", "1"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return build_miniature(tmp_path_factory.mktemp("data"), ["caltech101"])


def sweep(data_root: Path, results: Path, precision: str, capsys, *extra: str) -> list[dict]:
    args = ["run", "--methods", METHODS, "--datasets", "caltech101", "--data-root", str(data_root), *BASE]
    args += ["--precision", precision, "--results-dir", str(results), "--set", "epochs=2", *extra]
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err
    assert exc.value.code == 0, err
    return [json.loads(p.read_text()) for p in iter_run_files(results)]


@pytest.mark.parametrize(("precision", "recorded"), [("auto", None), ("bf16", "bf16"), ("fp16", "fp16")])
def test_autocast_sweeps_with_loader_workers_and_pinned_memory(precision, recorded, data_root, tmp_path, capsys):
    recs = sweep(data_root, tmp_path, precision, capsys, "--workers", "2")
    assert len(recs) == len(METHODS.split(","))
    for r in recs:
        assert r["status"] == "complete", r.get("reason")
        assert r["key"]["precision"] == (recorded or ("bf16" if torch.cuda.is_bf16_supported() else "fp16"))
        assert r["versions"]["cuda_device"]
        assert all(0 <= e["accuracy"] <= 100 for e in r["evaluations"])
        if r["method_label"] != "zsclip":
            assert r["last_loss"] == r["last_loss"]  # finite-ish: not NaN


def test_reference_fp16_sweep(data_root, tmp_path, capsys):
    recs = sweep(data_root, tmp_path, REFERENCE_FP16, capsys, "--workers", "2")
    assert len(recs) == len(METHODS.split(","))
    for r in recs:
        assert r["status"] == "complete", r.get("reason")
        assert r["key"]["precision"] == REFERENCE_FP16 and r["key"]["activation"] == "gelu"
    (coop,) = [p.parent / "model.pt" for p in iter_run_files(tmp_path) if "/coop/" in p.as_posix()]
    assert torch.load(coop, weights_only=True)["ctx"].dtype == torch.float16  # trained in fp16, stored as trained


def test_reference_fp16_on_cuda_holds_the_reference_dtypes_and_updates_unscaled(tmp_path):
    bb = load_backbone("tiny", device="cuda", precision=REFERENCE_FP16)
    assert bb.dtype == torch.float16 and bb.model.visual.ln_pre.weight.dtype == torch.float32
    method = prepare_method(build_method("maple", backbone=bb), torch.device("cuda"), REFERENCE_FP16)
    assert method.ctx.dtype == torch.float16 and method.compound_prompts_text[0].dtype == torch.float32
    images = torch.randn(2, 3, 32, 32, device="cuda")
    logits = method.train()(images).logits
    assert logits.dtype == torch.float16
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1], device="cuda")).backward()
    assert method.ctx.grad.dtype == torch.float16 and method.compound_prompts_text[0].grad.dtype == torch.float32


@pytest.mark.parametrize("name", ["coop", "maple", "dcp"])
@pytest.mark.parametrize("precision", ["bf16", "fp16", REFERENCE_FP16])
def test_cached_text_evaluation_equals_per_batch_under_autocast(name, precision, tmp_path):
    """begin_eval's class-text pass runs under the evaluation's autocast: the fast path predicts what the naive one
    (text re-encoded inside autocast on every batch) predicts."""
    weights = REFERENCE_FP16 if precision == REFERENCE_FP16 else "fp32"
    bb = load_backbone("tiny", device="cuda", precision=weights)
    method = prepare_method(build_method(name, backbone=bb), torch.device("cuda"), precision)
    items = write_items(tmp_path, CLASSNAMES, 10)
    fast = evaluate(method, items, bb.test_transform, torch.device("cuda"), precision, 5, fast=True)
    naive = evaluate(method, items, bb.test_transform, torch.device("cuda"), precision, 5, fast=False)
    assert fast["correct"] == naive["correct"]
