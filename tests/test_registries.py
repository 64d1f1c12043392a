"""Contract tests that follow the dataset, describer and backbone registries (methods: tests/test_methods.py): a new
entry is covered at once, and one without what its tests need (a miniature tree, a describer fixture) fails here."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
from click.testing import CliRunner

from mugcp_bench.commands.listing import list_cmd
from mugcp_bench.datasets import check_datasets, get_spec, prepare
from mugcp_bench.describers import Describer, DescriberOptions, build_describer, describe_items
from mugcp_bench.describers.cache import DescriptionCache
from mugcp_bench.errors import UserError
from mugcp_bench.model.backbone import load_backbone
from mugcp_bench.protocols import ROLES
from mugcp_bench.registry import BACKBONES, DATASETS, DESCRIBERS, Registry
from mugcp_bench.report.tidy import dataset_display, dataset_key
from tests.miniature import ALL_NAMES
from tests.numerics import assert_close_scaled


def listed(kind: str) -> str:
    result = CliRunner().invoke(list_cmd, [kind], catch_exceptions=False)
    assert result.exit_code == 0
    return result.output


# --- the registry itself -------------------------------------------------------------------------------------------
def test_unregister_removes_the_name_and_its_aliases() -> None:
    reg: Registry[int] = Registry("thing")
    reg.add("one", 1, aliases=("uno", "eins"))
    reg.add("two", 2, aliases=("dos",))
    assert reg.unregister("one") == 1
    assert reg.names() == ["two"] and reg.aliases() == {"dos": "two"}
    with pytest.raises(UserError, match="unknown thing 'uno'"):
        reg.get("uno")
    with pytest.raises(KeyError):
        reg.unregister("one")


# --- datasets ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", DATASETS.names())
def test_every_dataset_spec_carries_its_names(name: str) -> None:
    spec = get_spec(name)
    assert spec.name == name == name.lower()
    for alias in (*spec.aliases, name.upper()):
        assert DATASETS.canonical(alias) == name and dataset_key(alias) == name  # the CLI and the report agree
    assert dataset_display(name) == spec.label
    assert spec.template.count("{}") == 1
    assert set(spec.roles) <= set(ROLES)
    assert spec.expected_tree().startswith(f"$DATA/{spec.folder}/")
    assert name in listed("datasets")


@pytest.mark.parametrize("name", DATASETS.names())
def test_every_dataset_names_its_missing_folder(name: str, tmp_path: Path) -> None:
    (result,) = check_datasets(tmp_path, [name])
    assert result.status == "missing folder" and get_spec(name).folder in result.message
    assert result.expected_tree == get_spec(name).expected_tree()


@pytest.mark.parametrize("name", [n for n in DATASETS.names() if get_spec(n).group == "benchmark"])
def test_every_benchmark_dataset_has_a_miniature_tree_that_loads(name: str, tmp_path_factory) -> None:
    from tests.miniature import build_miniature

    assert name in ALL_NAMES, f"add a miniature tree for '{name}' to tests/miniature.py"
    root = tmp_path_factory.getbasetemp() / "registry-miniature"
    if not root.exists():
        build_miniature(root)
    data = prepare(name, root, None, 1)
    assert data.test and len(data.classnames) >= 2


# --- describers ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy_items(tmp_path_factory) -> list:
    from mugcp_bench.toy.suite import DATASETS as TOY
    from mugcp_bench.toy.suite import SuiteSizes, write_dataset

    root = tmp_path_factory.mktemp("toy-describers") / "data"
    write_dataset(TOY["toy_shapes"], root, SuiteSizes(train=1, val=1, test=1), seed=0)
    return prepare("toy_shapes", root, None, 1).train[:3]


def _mllm(items, tmp: Path) -> DescriberOptions:
    from tests.test_describers import build_tiny_llava

    return DescriberOptions(model=str(build_tiny_llava(tmp / "llava")), device="cpu")


def _file(items, tmp: Path) -> DescriberOptions:
    path = tmp / "captions.jsonl"
    path.write_text(
        "".join(json.dumps({"image": d.impath, "text": f"picture {i}"}) + "\n" for i, d in enumerate(items))
    )
    return DescriberOptions(file=str(path))


def _interrogator(items, tmp: Path) -> DescriberOptions:
    from tests.method_harness import shared_tiny_backbone

    return DescriberOptions(backbone=shared_tiny_backbone())


# name -> the options that let it describe toy images offline (a new describer adds its own here)
DESCRIBER_OPTIONS = {
    "mllm": _mllm,
    "file": _file,
    "scene": lambda items, tmp: DescriberOptions(),
    "interrogator": _interrogator,
}


SLOW_DESCRIBERS = {"mllm"}  # builds and runs a tiny LLaVA (~10 s); tests/test_describers.py covers it in detail


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_DESCRIBERS else n for n in DESCRIBERS.names()]
)
def test_every_describer_is_deterministic_and_cached(name: str, toy_items: list, tmp_path: Path, monkeypatch) -> None:
    assert name in DESCRIBER_OPTIONS, f"add how to build the '{name}' describer offline to DESCRIBER_OPTIONS"
    cls = DESCRIBERS.get(name)
    assert issubclass(cls, Describer) and cls.name == name and name in listed("describers")
    assert cls.prompt_ids is None or cls.default_prompt_id in cls.prompt_ids
    describer = build_describer(name, DESCRIBER_OPTIONS[name](toy_items, tmp_path))
    texts = describer.describe(toy_items)
    assert len(texts) == len(toy_items) and all(isinstance(t, str) and t.strip() for t in texts)
    assert describer.describe(toy_items) == texts
    assert describer.id.startswith(name) and f"--describer {name}" in describer.cli_args()
    monkeypatch.setenv("MUGCP_CACHE", str(tmp_path / "cache"))
    cache = DescriptionCache()
    first = describe_items(toy_items, describer, cache)
    again = describe_items(toy_items, describer, cache, generate=False)
    assert first.n_generated == len(toy_items) and again.n_generated == 0 and again.texts == first.texts
    describer.release()


# --- backbones -----------------------------------------------------------------------------------------------------
@pytest.mark.numerics
@pytest.mark.parametrize("name", BACKBONES.names())
def test_every_packaged_backbone_builds_frozen_and_equals_open_clip(name: str) -> None:
    bb = load_backbone(name)
    assert not any(p.requires_grad for p in bb.parameters())
    assert name in open_clip.list_models() and name in listed("backbones")
    torch.manual_seed(0)
    images = torch.randn(2, 3, bb.image_size, bb.image_size)
    tokens = bb.tokenize(["a photo of a red circle.", "x"])
    with torch.no_grad():
        img = bb.encode_image(images)  # (2, E)
        txt = bb.encode_text(bb.embed_tokens(tokens), tokens)  # (2, E)
        assert img.shape == txt.shape == (2, bb.embed_dim)
        assert_close_scaled(img, bb.model.encode_image(images))
        assert_close_scaled(txt, bb.model.encode_text(tokens))
