"""The backbone's layer loops equal open_clip's forwards; loading paths; frozen weights."""

from __future__ import annotations

import subprocess
import sys
import time

import open_clip
import pytest
import torch

from mugcp_bench.backbone import Backbone, load_backbone
from mugcp_bench.errors import UserError

TEXTS = ["a photo of a dog.", "a much longer caption about a red striped circle on grass", "x"]


@pytest.fixture(scope="module")
def vit_b16():
    return load_backbone("ViT-B-16")


@pytest.mark.parametrize("which", ["tiny", "vit"])
def test_loops_equal_open_clip(which, tiny_backbone, vit_b16):
    bb: Backbone = tiny_backbone if which == "tiny" else vit_b16
    torch.manual_seed(0)
    images = torch.randn(2, 3, bb.image_size, bb.image_size)
    tokens = bb.tokenize(TEXTS)
    with torch.no_grad():
        ours_i = bb.encode_image(images)
        ref_i = bb.model.encode_image(images)
        ours_t = bb.encode_text(bb.embed_tokens(tokens), tokens, truncate=False)
        ref_t = bb.model.encode_text(tokens)
    assert (ours_i - ref_i).abs().max() <= 1e-6
    assert (ours_t - ref_t).abs().max() <= 1e-6


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
        assert (full - cut).abs().max() <= 1e-5
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
        assert torch.allclose(fi, bb.encode_image(images), atol=1e-6)
        assert torch.allclose(ft, bb.encode_text(emb, tokens), atol=1e-6)
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
        assert (bb.encode_image(images) - ref.encode_image(images)).abs().max() <= 1e-4
        assert (bb.encode_text(bb.embed_tokens(tokens), tokens) - ref.encode_text(tokens)).abs().max() <= 1e-4
        # the same weights under plain GELU give other features: QuickGELU detection matters
        gelu = open_clip.create_model("ViT-B-16")
        gelu.load_state_dict(ref.state_dict())
        assert (gelu.eval().encode_image(images) - ref.encode_image(images)).abs().max() > 1e-3


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
from mugcp_bench.backbone import load_backbone
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
    proc = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "--pretrained PATH" in lines[0]
    assert float(proc.stdout) < 1.0  # no 45-second hub lookup


def test_cli_openai_offline_one_line(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path / "hf")}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mugcp_bench.cli",
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
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: weights 'ViT-B-16' / 'openai' are not in the local")
    assert "Traceback" not in proc.stderr
    assert time.perf_counter() - t0 < 60
