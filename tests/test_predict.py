"""`mugcp-bench predict` / `load_classifier` and `export` of trained runs: the same labels and probabilities as the
evaluation path, through the CLI and the Python API, from a run or a .mugcp file; one line for every bad input."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mugcp_bench import load_classifier
from mugcp_bench.datasets.base import ImageListDataset, get_spec, prepare
from mugcp_bench.errors import UserError
from mugcp_bench.interop.trained import build_backbone, build_method, from_run
from mugcp_bench.store import predictions
from tests.cli_harness import cli, records
from tests.miniature import build_miniature
from tests.numerics import FP32, assert_close_scaled, assert_same_ranking

# coop: class text once; cocoop: per-image prompts; dcp: prompts fused over the batch; mugcp: per-image descriptions
METHODS = ("coop", "cocoop", "dcp", "mugcp")
DATASET = "dtd"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Miniature DTD and one trained base-to-novel run per method (tiny backbone, one epoch)."""
    root = tmp_path_factory.mktemp("predict")
    data = build_miniature(root / "data", [DATASET])
    results = root / "results"
    argv = ["run", "--methods", ",".join(METHODS), "--datasets", DATASET, "--seeds", "1", "--data-root", str(data)]
    argv += ["--backbone", "tiny", "--pretrained", "random", "--recipe", "toy", "--set", "epochs=1"]
    argv += ["--results-dir", str(results), "--device", "cpu"]
    from mugcp_bench.commands.cli import main  # module scope: no capsys; the output is not checked here

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    runs = {r["key"]["method"]: r for r in records(results)}
    assert set(runs) == set(METHODS) and all(r["status"] == "complete" for r in runs.values())
    return data, results, runs


def _test_split(data: Path, classes: str):
    split = prepare(DATASET, data, 16, 1, "base" if classes == "base" else "new", None)
    return split.test, split.classnames


def evaluation_logits(run_dir: Path, items, classnames) -> torch.Tensor:
    """Logits as `trainer.evaluate` computes them: the dataset's template, relpath keys, the run's batches."""
    model = from_run(run_dir)
    method = build_method(model, build_backbone(model))
    spec = get_spec(DATASET)
    method.set_classnames(classnames, template=spec.template, dataset=spec.name)
    method.prepare_images(items, "test")
    loader = DataLoader(ImageListDataset(items, method.backbone.test_transform), batch_size=model.eval_batch_size)
    keys = [d.relpath for d in items]
    out, start = [], 0
    with torch.no_grad():
        method.begin_eval()
        for images, _, _ in loader:
            out.append(method.predict(images, keys[start : start + len(images)]).float())
            start += len(images)
        method.end_eval()
    return torch.cat(out)


@pytest.mark.numerics
@pytest.mark.parametrize("method", METHODS)
def test_python_and_cli_predict_as_the_evaluation_did(world, method, capsys):
    data, results, runs = world
    record = runs[method]
    run_dir = next(results.glob(f"runs/**/*-{record['id']}"))
    for classes in ("base", "novel"):
        items, classnames = _test_split(data, classes)
        recorded = next(e for e in record["evaluations"] if e["classes"] == classes)
        stored = predictions.read(run_dir / recorded["predictions"]["file"])
        assert stored.classnames == classnames
        clf = load_classifier(record["id"], results)
        out = clf.predict([d.impath for d in items], classnames)
        expected = evaluation_logits(run_dir, items, classnames)
        assert_close_scaled(out.logits, expected, FP32)
        assert_close_scaled(out.probs, expected.softmax(-1), FP32, scale=1.0)
        assert_same_ranking(np.array(out.indices), stored.pred, expected, 1)  # the labels `run` recorded
        assert out.labels == [classnames[i] for i in out.indices]
        # the CLI, in JSON: the same labels and probabilities
        argv = ["predict", record["id"], "--results-dir", str(results), "--classes", ",".join(classnames)]
        code, stdout, err = cli([*argv, "--top", str(len(classnames)), "--format", "json", *[d.impath for d in items]],
                                capsys)  # fmt: skip
        assert code == 0, err
        payload = json.loads(stdout)
        assert [p["label"] for p in payload["predictions"]] == out.labels
        for row, probs in zip(payload["predictions"], out.probs):
            got = {t["label"]: t["probability"] for t in row["top"]}
            assert got == {c: float(p) for c, p in zip(classnames, probs)}


def test_any_class_names_paths_pil_images_and_tensors_agree(world, tmp_path):
    data, results, runs = world
    items, _ = _test_split(data, "base")
    names = ["a stripy cloth", "sea or lake", "banded"]
    clf = load_classifier(runs["cocoop"]["id"], results)
    from_paths = clf.predict([d.impath for d in items], names)
    from_pil = clf.predict([Image.open(d.impath) for d in items], names)
    from_tensor = clf.predict(torch.stack([clf.transform(Image.open(d.impath).convert("RGB")) for d in items]), names)
    assert torch.equal(from_pil.probs, from_paths.probs) and torch.equal(from_tensor.probs, from_paths.probs)
    assert from_paths.probs.shape == (len(items), 3)
    assert_close_scaled(from_paths.probs.sum(-1), torch.ones(len(items)), FP32, scale=1.0)
    classes_file = tmp_path / "classes.txt"
    classes_file.write_text("# my classes\na stripy cloth\n\nsea or lake\nbanded\n")
    assert torch.equal(clf.predict([d.impath for d in items], f"@{classes_file}").probs, from_paths.probs)


def test_mugcp_describes_files_and_refuses_bare_tensors(world):
    data, results, runs = world
    items, classnames = _test_split(data, "base")
    clf = load_classifier(runs["mugcp"]["id"], results)
    from_pil = clf.predict([Image.open(d.impath) for d in items], classnames)  # described from temp files
    from_paths = clf.predict([d.impath for d in items], classnames)
    assert_close_scaled(from_pil.logits, from_paths.logits, FP32)
    with pytest.raises(UserError, match="describes every image from its file"):
        clf.predict(torch.zeros(1, 3, 32, 32), classnames)


def test_a_mugcp_file_predicts_as_its_run(world, tmp_path, capsys):
    data, results, runs = world
    items, classnames = _test_split(data, "novel")
    run_id = runs["dcp"]["id"]
    code, out, err = cli(["export", run_id, str(tmp_path), "--format", "mugcp", "--results-dir", str(results)], capsys)
    assert code == 0, err
    (file,) = tmp_path.glob("*.mugcp")
    assert torch.load(file)["method"] == "dcp"  # plain data: loads with torch's weights-only default
    from_run = load_classifier(run_id, results).predict([d.impath for d in items], classnames)
    from_file = load_classifier(file).predict([d.impath for d in items], classnames)
    assert torch.equal(from_file.probs, from_run.probs)
    code, out, err = cli(["predict", str(file), "--classes", ",".join(classnames), "--format", "csv", "--top", "2",
                          items[0].impath, items[1].impath], capsys)  # fmt: skip
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [(r["image"], r["rank"]) for r in rows] == [(items[0].impath, "1"), (items[0].impath, "2"),
                                                       (items[1].impath, "1"), (items[1].impath, "2")]  # fmt: skip
    two = load_classifier(file).predict([items[0].impath, items[1].impath], classnames)  # dcp: the batch matters
    assert rows[0]["label"] == two.labels[0] and float(rows[0]["probability"]) == float(two.probs[0].max())
    code, out, err = cli(["predict", str(file), "--classes", ",".join(classnames), items[0].impath], capsys)
    assert code == 0 and from_file.labels[0] in out  # the table


def test_export_reference_of_a_run_loads_and_names_the_command(world, tmp_path, capsys):
    data, results, runs = world
    run_id = runs["coop"]["id"]
    argv = ["export", run_id, str(tmp_path / "m"), "--format", "reference", "--results-dir", str(results)]
    code, out, err = cli(argv, capsys)
    assert code == 0, err
    file = tmp_path / "m" / "prompt_learner" / "model.pth.tar-1"
    ckpt = torch.load(file)  # weights-only: no pickled objects
    assert ckpt["optimizer"] is None and ckpt["scheduler"] is None and ckpt["epoch"] == 1
    state = torch.load(next(results.glob(f"runs/**/*-{run_id}")) / "model.pt")
    assert torch.equal(ckpt["state_dict"]["ctx"].float(), state["ctx"].half().float())
    assert ckpt["state_dict"]["token_prefix"].shape[0] == 2  # the two base classes of miniature DTD
    assert "--trainer CoOp" in out and "--load-epoch 1" in out and "TRAINER.COOP.N_CTX 4" in out
    assert "does not load into it" in err  # tiny is not a backbone the reference can build


def test_export_refuses_what_the_reference_cannot_hold(world, tmp_path, capsys):
    data, results, runs = world
    code, out, err = cli(["export", runs["mugcp"]["id"], str(tmp_path), "--format", "reference", "--results-dir",
                          str(results)], capsys)  # fmt: skip
    assert code == 2 and "mugcp has a reconstruction with no reference code" in err


@pytest.mark.parametrize(
    "args,needle",
    [
        (["0123abcd", "--classes", "a,b", "IMG"], "no run with id 0123abcd"),
        (["nope-run", "--classes", "a,b", "IMG"], "unknown run 'nope-run'"),
        (["RUN", "--classes", "a,b"], "give at least one image"),
        (["RUN", "--classes", "a,b", "BROKEN"], "is unreadable"),
        (["RUN", "--classes", "a,b", "MISSING"], "is missing"),
        (["RUN", "--classes", " , ", "IMG"], "give at least one class name"),
        (["RUN", "--classes", "@NOFILE", "IMG"], "cannot be read"),
        (["RUN", "--classes", "a,a", "IMG"], "is given twice"),
        (["RUN", "--classes", "a,b", "--descriptions", "d.jsonl", "IMG"], "uses no image descriptions"),
    ],
    ids=["unknown-id", "unknown-run", "no-images", "unreadable-image", "missing-image", "empty-classes",
         "missing-class-file", "duplicate-class", "descriptions-for-coop"],
)  # fmt: skip
def test_bad_input_is_one_line_and_exit_2(world, args, needle, tmp_path, capsys):
    data, results, runs = world
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    image = next((data / DATASET / "images").rglob("*.jpg"))
    subst = {"RUN": runs["coop"]["id"], "IMG": str(image), "BROKEN": str(broken), "MISSING": str(tmp_path / "x.jpg"),
             "@NOFILE": f"@{tmp_path / 'none.txt'}"}  # fmt: skip
    argv = ["predict", *[subst.get(a, a) for a in args], "--results-dir", str(results)]
    code, out, err = cli(argv, capsys)
    assert code == 2, (out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert needle in lines[0], lines[0]


def test_readme_example_classifies_with_a_run(world, capsys):
    """README's "Use a trained prompt" block, pointed at a trained run and two miniature images, runs and prints."""
    from tests.test_readme import python_blocks

    data, results, runs = world
    (block,) = [b for b in python_blocks() if "load_classifier(" in b]
    images = sorted((data / DATASET / "images").rglob("*.jpg"))[:2]
    for old, new in [
        ('"3f2a9c1e"', repr(runs["coop"]["id"])),
        ('"results"', repr(str(results))),
        ('["cat.jpg", "lake.png"]', repr([str(p) for p in images])),
    ]:
        assert old in block, old
        block = block.replace(old, new)
    exec(compile(block, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert any(name in printed for name in ("cat", "dog", "sea or lake")) and "tensor(" in printed
