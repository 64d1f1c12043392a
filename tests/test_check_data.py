"""`mugcp-bench check-data` and the load-time image errors: every bad input gives one clear line and exit 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mugcp_bench.commands.check_data import check_data
from mugcp_bench.datasets import ImageListDataset, check_datasets, get_spec, require_datasets
from mugcp_bench.errors import UserError
from tests.miniature import build_miniature


@pytest.fixture(scope="module")
def mini(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_miniature(tmp_path_factory.mktemp("data"))


@pytest.fixture
def damaged(mini: Path, tmp_path: Path) -> Path:
    """A private copy of the miniature tree that a test may break."""
    return Path(shutil.copytree(mini, tmp_path / "data"))


def run(*args: str):
    return CliRunner().invoke(check_data, list(args))


def test_all_ok(mini: Path) -> None:
    result = run("--data-root", str(mini))
    assert result.exit_code == 0, result.output
    for name in ("imagenet", "caltech101", "imagenet_r", "ucf101"):
        assert name in result.stdout
    assert result.stdout.count("OK") == 15
    assert result.stderr == ""


def test_json_output(mini: Path) -> None:
    result = run("--data-root", str(mini), "--datasets", "caltech101,imagenet_a", "--json")
    assert result.exit_code == 0
    rows = json.loads(result.stdout)
    assert [(r["name"], r["ok"], r["num_classes"]) for r in rows] == [("caltech101", True, 6), ("imagenet_a", True, 3)]


def test_data_root_from_environment(mini: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MUGCP_DATA", str(mini))
    assert run("--datasets", "dtd").exit_code == 0


def one_line_error(result, *needles: str) -> str:
    """The exit code is 2 and exactly one stderr line holds every needle; that line is returned."""
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.stderr.splitlines() if all(n in ln for n in needles)]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_missing_root(tmp_path: Path) -> None:
    result = run("--data-root", str(tmp_path / "nowhere"))
    line = one_line_error(result, "data root", "does not exist")
    assert "--data-root" in line and "MUGCP_DATA" in line
    assert result.stdout == ""


def test_unknown_dataset_name(mini: Path) -> None:
    result = run("--data-root", str(mini), "--datasets", "caltech101,oxford_pet")
    one_line_error(result, "unknown dataset 'oxford_pet'", "Did you mean 'oxford_pets'?")


def test_missing_folder(damaged: Path) -> None:
    shutil.rmtree(damaged / "food-101")
    result = run("--data-root", str(damaged), "--datasets", "food101,dtd")
    line = one_line_error(result, "folder 'food-101' not found")
    assert "DATASETS.md#food101" in line  # where the data comes from
    assert "missing folder" in result.stdout
    assert "$DATA/food-101/" in result.stderr and "split_zhou_Food101.json" in result.stderr  # the expected tree
    assert "data.vision.ee.ethz.ch" in result.stderr  # the source


def test_missing_split_file(damaged: Path) -> None:
    (damaged / "caltech-101" / "split_zhou_Caltech101.json").unlink()
    (damaged / "fgvc_aircraft" / "images_variant_val.txt").unlink()
    result = run("--data-root", str(damaged), "--datasets", "caltech101,fgvc_aircraft")
    one_line_error(result, "split_zhou_Caltech101.json not found")
    one_line_error(result, "images_variant_val.txt not found")
    assert result.stdout.count("missing split file") == 2


def test_malformed_json(damaged: Path) -> None:
    path = damaged / "oxford_pets" / "split_zhou_OxfordPets.json"
    path.write_text(path.read_text()[:-30])
    result = run("--data-root", str(damaged), "--datasets", "oxford_pets")
    one_line_error(result, str(path), "is not valid JSON", "line", "column")
    assert "malformed" in result.stdout


def test_malformed_schema(damaged: Path) -> None:
    path = damaged / "dtd" / "split_zhou_DescribableTextures.json"
    obj = json.loads(path.read_text())
    obj["val"][2] = ["banded/x.jpg", "0", "banded"]
    path.write_text(json.dumps(obj))
    result = run("--data-root", str(damaged), "--datasets", "dtd")
    one_line_error(result, "entry 2 of 'val'", "[impath, label, classname]")


def test_listed_image_missing(damaged: Path) -> None:
    images = sorted((damaged / "sun397" / "SUN397" / "a" / "abbey").iterdir())
    for p in images[:2]:
        p.unlink()
    result = run("--data-root", str(damaged), "--datasets", "sun397")
    line = one_line_error(result, "2 of 26 listed images are missing")
    assert str(images[0]) in line
    assert "2 images missing" in result.stdout


def test_require_datasets_lists_every_problem_one_line_each(damaged: Path) -> None:
    shutil.rmtree(damaged / "eurosat")
    (damaged / "ucf101" / "split_zhou_UCF101.json").write_text("{")
    require_datasets(damaged, "caltech101,imagenet")
    with pytest.raises(UserError) as err:
        require_datasets(damaged, ["eurosat", "ucf101", "dtd"])
    lines = str(err.value).splitlines()
    assert len(lines) == 2 and lines[0].startswith("dataset eurosat:") and lines[1].startswith("dataset ucf101:")
    assert [r.ok for r in check_datasets(damaged, "eurosat,dtd")] == [False, True]


def test_corrupt_and_missing_image_at_load_time(damaged: Path) -> None:
    data = get_spec("oxford_flowers").load(damaged)

    def to_tensor(im):
        return torch.from_numpy(np.asarray(im).copy())  # (H, W, 3)

    ds = ImageListDataset(data.test, to_tensor, dataset="oxford_flowers")
    image, label, index = ds[1]
    assert image.shape == (8, 8, 3) and label == data.test[1].label and index == 1

    Path(data.test[1].impath).write_bytes(b"not a jpeg at all")
    with pytest.raises(UserError) as err:
        ds[1]
    message = str(err.value)
    assert data.test[1].impath in message and "oxford_flowers" in message and "\n" not in message

    truncated = Path(data.test[2].impath)
    truncated.write_bytes(truncated.read_bytes()[:60])
    with pytest.raises(UserError, match="unreadable"):
        ds[2]

    Path(data.test[0].impath).unlink()
    with pytest.raises(UserError, match="is missing"):
        ds[0]
    # without a dataset name the message names the dataset folder
    with pytest.raises(UserError, match="dataset folder 'oxford_flowers'"):
        ImageListDataset(data.test, None)[0]


def test_image_error_from_a_loader_worker_stays_one_line(damaged: Path) -> None:
    data = get_spec("dtd").load(damaged)
    Path(data.test[3].impath).write_bytes(b"broken")
    loader = torch.utils.data.DataLoader(
        ImageListDataset(data.test, None, dataset="dtd"), batch_size=None, num_workers=1, collate_fn=lambda x: x
    )
    with pytest.raises(UserError) as err:
        list(loader)
    assert str(err.value).startswith(f"image {data.test[3].impath} of dataset dtd is unreadable")
    assert "\n" not in str(err.value)


def test_empty_image_fails_the_fast_check_and_run_before_training(damaged: Path, tmp_path: Path) -> None:
    data = get_spec("dtd").load(damaged)
    Path(data.train[2].impath).write_bytes(b"")
    Path(data.test[4].impath).write_bytes(b"")
    result = run("--data-root", str(damaged), "--datasets", "dtd,eurosat")
    line = one_line_error(result, "dataset dtd: 2 of", "listed images are empty files (0 bytes; first:")
    assert data.train[2].impath in line and "re-download or re-extract" in line
    assert "2 images empty" in result.stdout and result.stdout.count("OK") == 1  # eurosat
    with pytest.raises(UserError, match="empty files"):  # what `run` calls before any training
        require_datasets(damaged, "dtd")


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b"not an image at all",  # no image format
        lambda b: b[:60],  # header intact, pixels cut (a torn download)
        lambda b: b[:8] + bytes(len(b) - 8),  # the JPEG markers at the start kept, the rest zeroed
    ],
    ids=["not-an-image", "truncated", "zeroed"],
)
def test_decode_finds_every_image_that_does_not_decode(damage, damaged: Path) -> None:
    data = get_spec("oxford_flowers").load(damaged)
    victims = [data.test[1].impath, data.train[0].impath]
    for path in victims:
        Path(path).write_bytes(damage(Path(path).read_bytes()))
    fast = run("--data-root", str(damaged), "--datasets", "oxford_flowers")
    assert fast.exit_code == 0, fast.output  # the fast check opens no image
    result = run("--data-root", str(damaged), "--datasets", "oxford_flowers,dtd", "--decode", "--workers", "2")
    line = one_line_error(result, "dataset oxford_flowers: 2 of", "listed images cannot be decoded (first:")
    assert data.train[0].impath in line  # the first in list order (train before test)
    assert "2 images unreadable" in result.stdout and "Traceback" not in result.output
    assert result.stdout.count("OK") == 1  # dtd decodes


def test_decode_of_a_clean_tree_is_ok(mini: Path) -> None:
    result = run("--data-root", str(mini), "--datasets", "dtd,imagenet", "--decode")
    assert result.exit_code == 0, result.output
    assert result.stdout.count("OK") == 2


def test_the_installed_command_exits_2_on_an_unusable_dataset(damaged: Path) -> None:
    """Through the console entry point in a subprocess (it once returned 0 where the command said 2)."""
    import os
    import subprocess
    import sys

    Path(get_spec("dtd").load(damaged).test[0].impath).write_bytes(b"")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    argv = [sys.executable, "-m", "mugcp_bench", "check-data", "--data-root", str(damaged)]
    bad = subprocess.run([*argv, "--datasets", "dtd"], env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "listed images are empty files" in bad.stderr and "Traceback" not in bad.stderr
    good = subprocess.run([*argv, "--datasets", "eurosat"], env=env, capture_output=True, text=True, timeout=120)
    assert good.returncode == 0, good.stderr
