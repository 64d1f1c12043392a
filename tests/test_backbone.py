"""The backbone's layer loops equal open_clip's forwards; loading paths; frozen weights."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

import mugcp_bench.model.backbone as backbone_mod
from mugcp_bench.errors import UserError
from mugcp_bench.model.backbone import CLIP_MEAN, CLIP_STD, Backbone, load_backbone
from tests.numerics import FP32, assert_close_scaled, assert_differs

TEXTS = ["a photo of a dog.", "a much longer caption about a red striped circle on grass", "x"]


@pytest.fixture(scope="module")
def vit_b16():
    return load_backbone("ViT-B-16")


@pytest.mark.numerics
@pytest.mark.parametrize("which", ["tiny", "vit"])
def test_loops_equal_open_clip(which, tiny_backbone, vit_b16):
    bb: Backbone = tiny_backbone if which == "tiny" else vit_b16
    torch.manual_seed(0)
    images = torch.randn(2, 3, bb.image_size, bb.image_size)
    tokens = bb.tokenize(TEXTS)
    with torch.no_grad():
        ref_i = bb.model.encode_image(images)
        ref_t = bb.model.encode_text(tokens)
        for fused in (False, True):  # open_clip's block modules / fused attention (blocks.py)
            bb.fused_attention = fused
            try:
                ours_i = bb.encode_image(images)
                ours_t = bb.encode_text(bb.embed_tokens(tokens), tokens, truncate=False)
            finally:
                bb.fused_attention = True
            assert_close_scaled(ours_i, ref_i, FP32, msg=f"image, fused={fused}")
            assert_close_scaled(ours_t, ref_t, FP32, msg=f"text, fused={fused}")


@pytest.mark.numerics
def test_eot_truncation_is_exact(tiny_backbone, vit_b16):
    for bb in (tiny_backbone, vit_b16):
        tokens = bb.tokenize(TEXTS)
        emb = bb.embed_tokens(tokens)
        # prompt tokens replaced after SOS, as every prompt learner does
        emb = emb.clone()
        emb[:, 1:5] = torch.randn(1, 4, bb.text_width) * 0.02
        with torch.no_grad():
            full = bb.encode_text(emb, tokens, truncate=False)
            cut = bb.encode_text(emb, tokens)
        assert_close_scaled(cut, full)
        x, mask, _ = bb.text_embed(emb, tokens)
        assert x.shape[1] == int(bb.eot_index(tokens).max()) + 1 < bb.context_length


def test_layer_callbacks_see_every_block(tiny_backbone):
    bb = tiny_backbone
    seen_v, seen_t = [], []
    images = torch.randn(1, 3, 32, 32)
    tokens = bb.tokenize(["a cat."])

    def fv(i, x):
        seen_v.append((i, tuple(x.shape)))
        return x

    def ft(i, x):
        seen_t.append(i)
        return x

    with torch.no_grad():
        bb.encode_image(images, prompts=torch.zeros(1, 3, bb.vision_width), layer_fn=fv)
        bb.encode_text(bb.embed_tokens(tokens), tokens, layer_fn=ft)
    assert [i for i, _ in seen_v] == list(range(bb.vision_layers))
    assert seen_v[0][1] == (1, bb.n_vision_tokens + 3, bb.vision_width)  # prompts appended after the patches
    assert seen_t == list(range(bb.text_layers))


@pytest.mark.numerics
def test_encode_joint_equals_separate_towers(tiny_backbone):
    bb = tiny_backbone
    images = torch.randn(2, 3, 32, 32)
    tokens = bb.tokenize(TEXTS)
    emb = bb.embed_tokens(tokens)
    calls = []

    def joint(i, xv, xt):
        calls.append(i)
        return xv, xt

    with torch.no_grad():
        fi, ft = bb.encode_joint(images, emb, tokens, joint)
        assert_close_scaled(fi, bb.encode_image(images))
        assert_close_scaled(ft, bb.encode_text(emb, tokens))
    assert calls == list(range(bb.text_layers))


def test_encode_joint_refuses_unequal_depths():
    bb = load_backbone("tiny-mismatch")
    tokens = bb.tokenize(["a"])
    with pytest.raises(UserError, match="6 vision and 4 text layers"):
        bb.encode_joint(torch.randn(1, 3, 32, 32), bb.embed_tokens(tokens), tokens, lambda i, a, b: (a, b))
    # with a layer map the towers can be paired explicitly
    fi, _ = bb.encode_joint(
        torch.randn(1, 3, 32, 32), bb.embed_tokens(tokens), tokens, lambda i, a, b: (a, b), layer_map=[1, 3, 4, 5]
    )
    assert fi.shape == (1, bb.embed_dim)


def test_frozen_and_eval(tiny_backbone):
    bb = tiny_backbone
    bb.train()
    assert not bb.training and not bb.model.training
    assert not any(p.requires_grad for p in bb.parameters())


def _openai_state_dict(model) -> dict:
    """open_clip's CLIP state dict in OpenAI's release format: same keys + OpenAI's extra entries, fp16."""
    sd = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    sd["input_resolution"] = torch.tensor(model.visual.image_size[0])
    sd["context_length"] = torch.tensor(model.context_length)
    sd["vocab_size"] = torch.tensor(model.vocab_size)
    return sd


@pytest.mark.slow
def test_openai_format_file_loads_with_quickgelu(tmp_path):
    torch.manual_seed(1)
    src = open_clip.create_model("ViT-B-16-quickgelu").eval()
    path = tmp_path / "ViT-B-16.pt"
    torch.save(_openai_state_dict(src), path)
    bb = load_backbone("ViT-B-16", str(path))
    images = torch.randn(1, 3, 224, 224)
    tokens = bb.tokenize(["a photo of a dog."])
    ref = src.half().float()  # the same fp16-rounded weights
    with torch.no_grad():
        assert_close_scaled(bb.encode_image(images), ref.encode_image(images))
        assert_close_scaled(bb.encode_text(bb.embed_tokens(tokens), tokens), ref.encode_text(tokens))
        # the same weights under plain GELU give other features: QuickGELU detection matters
        gelu = open_clip.create_model("ViT-B-16")
        gelu.load_state_dict(ref.state_dict())
        assert_differs(gelu.eval().encode_image(images), ref.encode_image(images))


def test_open_clip_checkpoint_file_loads(tmp_path, tiny_backbone):
    path = tmp_path / "tiny.pt"
    torch.save(
        {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in tiny_backbone.model.state_dict().items()}}, path
    )
    bb = load_backbone("tiny", str(path))
    assert bb.weights_hash == tiny_backbone.weights_hash


def test_bad_pretrained_values(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_backbone("tiny", str(tmp_path / "missing.pt"))
    with pytest.raises(UserError, match="unknown backbone 'ViT-B-61'. Did you mean"):
        load_backbone("ViT-B-61")
    with pytest.raises(UserError, match="neither a file nor a pretrained tag"):
        load_backbone("ViT-B-16", "opneai")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read checkpoint"):
        load_backbone("tiny", str(bad))


OFFLINE_SCRIPT = """
import sys, time
from mugcp_bench.model.backbone import load_backbone
from mugcp_bench.errors import UserError
t0 = time.perf_counter()
try:
    load_backbone("ViT-B-16", "openai")
except UserError as e:
    print(f"{time.perf_counter() - t0:.3f}")
    print(e, file=sys.stderr)
    sys.exit(2)
"""


def test_openai_tag_offline_fails_fast_in_one_line(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--pretrained PATH" in lines[0]
    assert float(proc.stdout) < 1.0  # no 45-second hub lookup


def test_cli_openai_offline_one_line(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mugcp_bench",
            "run",
            "--methods",
            "coop",
            "--backbone",
            "ViT-B-16",
            "--pretrained",
            "openai",
            "--data-root",
            str(tmp_path),
            "--results-dir",
            str(tmp_path / "r"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,  # generous: a loaded 2-core machine imports slowly; the no-hang check is the in-process test above
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: weights 'ViT-B-16' / 'openai' are not in the local")
    assert "Traceback" not in proc.stderr


# --- real weights as they were trained: activation per tag, Hugging Face cache, hf-hub --------------------------
QUICKGELU_WARNING = "QuickGELU mismatch"


def hf_cache_snapshot(cache: Path, repo: str) -> Path:
    """The snapshot folder of `repo` laid out as huggingface_hub's cache does (models--ORG--NAME/refs/main names the
    revision under snapshots/); files written there are found offline."""
    revision = hashlib.sha1(repo.encode()).hexdigest()
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(revision)
    snapshot = root / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    return snapshot


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache in a temporary folder, offline (huggingface_hub reads its constants at import)."""
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    return cache


def _tag_file(hf_cache: Path, name: str, tag: str) -> Path:
    """Where open_clip looks for the weights of (name, tag) in the cache: the hub id and file name of its pretrained
    config (an empty file name means open_clip's default, of which it tries the safetensors one first)."""
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME

    repo, filename = os.path.split(open_clip.get_pretrained_cfg(name, tag)["hf_hub"])
    return hf_cache_snapshot(hf_cache, repo) / (filename or HF_SAFE_WEIGHTS_NAME)


def _set_activation(model: torch.nn.Module, act: type[torch.nn.Module]) -> None:
    for tower in (model.visual.transformer, model.transformer):
        for block in tower.resblocks:
            block.mlp.gelu = act()


def test_openai_tag_loads_from_the_hf_cache_with_quickgelu_and_no_warning(hf_cache, vit_b16, caplog):
    from safetensors.torch import save_file

    path = _tag_file(hf_cache, "ViT-B-16", "openai")
    # random ViT-B-16 weights, stored in fp16 as OpenAI released them
    save_file({k: v.half().contiguous() for k, v in vit_b16.model.state_dict().items()}, str(path))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            bb = load_backbone("ViT-B-16", "openai")  # the README's real usage, run's default backbone and tag
        assert not [w for w in caught if QUICKGELU_WARNING in str(w.message)]
        assert not [r for r in caplog.records if "QuickGELU" in r.getMessage()]
        assert bb.activation == "quickgelu" and bb.pretrained == "openai"
        ref = open_clip.create_model("ViT-B-16-quickgelu", pretrained=str(path))  # open_clip's own loader
        ref.eval().requires_grad_(False)  # frozen as ours (attention takes another kernel path otherwise)
        torch.manual_seed(0)
        images = torch.randn(1, 3, 224, 224)
        tokens = bb.tokenize(TEXTS[:2])
        with torch.no_grad():  # open_clip's forwards on both models (our loops equal them: tests above)
            ours_i, ours_t = bb.model.encode_image(images), bb.model.encode_text(tokens)
            assert_close_scaled(ours_i, ref.encode_image(images))
            assert_close_scaled(ours_t, ref.encode_text(tokens))
            _set_activation(ref, torch.nn.GELU)  # the same weights under GELU: what open_clip 3.x builds for the tag
            assert_differs(ours_t, ref.encode_text(tokens))
    finally:
        path.unlink()


@pytest.mark.parametrize(("name", "tag"), open_clip.list_pretrained())
def test_every_pretrained_tag_is_built_with_its_trained_activation(name, tag, monkeypatch):
    """Config level, through the real `_load_tag` with the file reading and the model build stubbed out."""
    built = {}
    monkeypatch.setattr(backbone_mod, "_hub_file", lambda *a: "weights.bin")
    monkeypatch.setattr(backbone_mod, "_read_state_dict", lambda path: ({}, False, ""))
    monkeypatch.setattr(backbone_mod, "_build", lambda n, quick, precision: built.setdefault("quick", quick))
    monkeypatch.setattr(backbone_mod, "_load_state", lambda model, *a: model)
    backbone_mod._load_tag(name, tag, None)
    stated = open_clip.get_pretrained_cfg(name, tag).get("quick_gelu")
    if stated is None:  # the tag says nothing (roberta-ViT-B-32 only): its architecture config decides
        stated = bool(open_clip.get_model_config(name).get("quick_gelu", False))
    assert built["quick"] == stated


def test_quickgelu_tags_that_open_clip_builds_with_gelu_are_many():
    """The cases the tag check above protects: tags trained with QuickGELU under a GELU architecture config."""
    wrong = [
        (n, t)
        for n, t in open_clip.list_pretrained()
        if open_clip.get_pretrained_cfg(n, t).get("quick_gelu") and not open_clip.get_model_config(n).get("quick_gelu")
    ]
    assert ("ViT-B-16", "openai") in wrong and ("ViT-B-16", "metaclip_400m") in wrong and len(wrong) >= 20


def test_quickgelu_architecture_and_openai_named_file(tmp_path, tiny_backbone, caplog):
    path = tmp_path / "tiny-openai.pt"  # open_clip format: no OpenAI marker, only the name says so
    torch.save(tiny_backbone.model.state_dict(), path)
    with caplog.at_level(logging.WARNING, logger="mugcp_bench.model.backbone"):
        gelu = load_backbone("tiny", str(path))
    (line,) = [r.getMessage() for r in caplog.records if r.name == "mugcp_bench.model.backbone"]
    assert "mentions 'openai'" in line and "pass --backbone tiny-quickgelu" in line
    assert gelu.activation == "gelu"
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mugcp_bench.model.backbone"):
        quick = load_backbone("tiny-quickgelu", str(path))
    assert quick.activation == "quickgelu" and not [r for r in caplog.records if r.name == "mugcp_bench.model.backbone"]
    assert quick.weights_hash == gelu.weights_hash == tiny_backbone.weights_hash
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_differs(quick.encode_image(images), gelu.encode_image(images))


def test_openai_format_file_records_quickgelu(tmp_path):
    torch.manual_seed(2)
    src = open_clip.create_model("tiny-quickgelu").eval()
    path = tmp_path / "tiny.pt"
    torch.save(_openai_state_dict(src), path)
    assert load_backbone("tiny", str(path)).activation == "quickgelu"
    assert load_backbone("tiny").activation == "gelu"


def _tiny_hub_repo(
    hf_cache: Path, repo: str, model: torch.nn.Module, quick_gelu: bool | None, preprocess: dict | None = None
) -> None:
    from safetensors.torch import save_file

    snapshot = hf_cache_snapshot(hf_cache, repo)
    model_cfg = open_clip.get_model_config("tiny")
    if quick_gelu is not None:
        model_cfg["quick_gelu"] = quick_gelu
    preprocess = preprocess or {"mean": list(CLIP_MEAN), "std": list(CLIP_STD)}
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess}
    (snapshot / "open_clip_config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(snapshot / "open_clip_model.safetensors"))


def test_hf_hub_pretrained_from_the_local_cache(hf_cache, tiny_backbone):
    _tiny_hub_repo(hf_cache, "acme/tiny-clip-quickgelu", tiny_backbone.model, quick_gelu=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bb = load_backbone("tiny", "hf-hub:acme/tiny-clip-quickgelu")
    assert not [w for w in caught if QUICKGELU_WARNING in str(w.message)]
    assert bb.pretrained == "hf-hub:acme/tiny-clip-quickgelu" and bb.activation == "quickgelu"
    assert bb.weights_hash == tiny_backbone.weights_hash
    _tiny_hub_repo(hf_cache, "acme/tiny-clip", tiny_backbone.model, quick_gelu=None)
    assert load_backbone("tiny", "hf-hub:acme/tiny-clip").activation == "gelu"
    # the repo's architecture must be the one named: the run key and every report name it
    with pytest.raises(UserError, match="is not a 'tiny-mismatch' model .*vision_cfg.layers .*pass --backbone tiny"):
        load_backbone("tiny-mismatch", "hf-hub:acme/tiny-clip")
    with pytest.raises(UserError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE is set"):
        load_backbone("tiny", "hf-hub:acme/absent")
    with pytest.raises(UserError, match="expected hf-hub:ORG/NAME"):
        load_backbone("tiny", "hf-hub:absent")


def test_hub_repo_of_a_quickgelu_tag_is_quickgelu_even_if_its_config_is_silent():
    repo = os.path.split(open_clip.get_pretrained_cfg("ViT-B-16", "openai")["hf_hub"])[0]
    assert backbone_mod.hub_quick_gelu(repo, {}) is True
    assert backbone_mod.hub_quick_gelu("laion/CLIP-ViT-B-16-laion2B-s34B-b88K", {}) is False
    assert backbone_mod.hub_quick_gelu("acme/x", {"quick_gelu": True}) is True


# --- image preprocessing as each tag was trained ----------------------------------------------------------------------
def _distinct_tag_preprocessing() -> dict[tuple, tuple[str, str]]:
    """One (architecture, tag) per distinct (mean, std, interpolation, resize_mode) open_clip lists."""
    out: dict[tuple, tuple[str, str]] = {}
    for name, tag in open_clip.list_pretrained():
        cfg = open_clip.get_pretrained_cfg(name, tag)
        key = (tuple(cfg.get("mean", CLIP_MEAN)), tuple(cfg.get("std", CLIP_STD)))
        key += (cfg.get("interpolation", "bicubic"), cfg.get("resize_mode", "shortest"))
        out.setdefault(key, (name, tag))
    return out


@pytest.mark.parametrize("name,tag", sorted(_distinct_tag_preprocessing().values()))
def test_every_tags_test_images_are_what_open_clips_own_preprocessing_gives(name, tag):
    """Normalisation, resampling and resize as open_clip feeds that tag (e.g. ViT-L-14 laion2b_s32b_b82k: mean =
    std = 0.5; DFN: squashed to a square), on a non-square image."""
    from PIL import Image

    from mugcp_bench.model.backbone import Preprocess, build_transforms

    cfg = open_clip.get_pretrained_cfg(name, tag)
    pre = Preprocess.from_cfg(cfg)
    size = 64
    theirs = open_clip.image_transform(
        size,
        is_train=False,
        mean=pre.mean,
        std=pre.std,
        resize_mode=cfg.get("resize_mode"),
        interpolation=cfg.get("interpolation"),
    )
    ours = build_transforms(size, preprocess=pre)[1]
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (90, 150, 3), dtype=np.uint8))
    assert_close_scaled(ours(image), theirs(image))
    assert (pre.version == "dassl-rrc0.08-bicubic-v1") == (pre == Preprocess())  # CLIP's: run ids unchanged


def test_a_hub_repo_with_other_statistics_is_fed_with_them_and_records_it(hf_cache, tiny_backbone):
    half = {"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear", "resize_mode": "squash"}
    _tiny_hub_repo(hf_cache, "acme/tiny-clip-half", tiny_backbone.model, quick_gelu=None, preprocess=half)
    bb = load_backbone("tiny", "hf-hub:acme/tiny-clip-half")
    assert (bb.preprocess.mean, bb.preprocess.interpolation, bb.preprocess.resize_mode) == (
        (0.5,) * 3,
        "bilinear",
        "squash",
    )
    assert bb.transform_version == "dassl-rrc0.08-bicubic-v1+mean0.5,0.5,0.5-std0.5,0.5,0.5-bilinear-squash"
    from PIL import Image

    image = Image.new("RGB", (40, 32), (255, 255, 255))
    assert_close_scaled(bb.test_transform(image), torch.ones(3, 32, 32))  # (1 − 0.5) / 0.5
    assert tiny_backbone.transform_version == "dassl-rrc0.08-bicubic-v1"  # random weights: CLIP's


def test_a_checkpoint_file_takes_the_preprocessing_of_the_open_clip_config_beside_it(tmp_path, tiny_backbone):
    weights = tmp_path / "repo" / "open_clip_pytorch_model.bin"
    weights.parent.mkdir()
    torch.save(tiny_backbone.model.state_dict(), weights)
    assert load_backbone("tiny", str(weights)).transform_version == "dassl-rrc0.08-bicubic-v1"  # no sidecar: CLIP's
    half = {"mean": [0.5] * 3, "std": [0.5] * 3}
    (weights.parent / "open_clip_config.json").write_text(json.dumps({"model_cfg": {}, "preprocess_cfg": half}))
    bb = load_backbone("tiny", str(weights))
    assert bb.preprocess.mean == (0.5,) * 3 and "+mean0.5,0.5,0.5" in bb.transform_version
    (weights.parent / "open_clip_config.json").write_text("{broken")
    with pytest.raises(UserError, match="is not an open_clip config"):
        load_backbone("tiny", str(weights))
