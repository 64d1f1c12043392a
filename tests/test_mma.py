"""MMA specifics: the trainable parameters against the reference's count, the adapters' place and initialisation, the
branch against a hand-written block loop, the gradient-scale layers (adapter gradients × 1 / s, the residual stream
exact), the fixed prompts, honest settings, per-epoch loss records without warm-up, recipes, provenance and published
numbers, and a toy-world run (tests/test_fast_vs_naive.py checks fast = naive, logits and one training step: the
loss is the plain cross-entropy; docs/methods/mma.md §14)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import mugcp_bench.methods.mma as mma_mod
from mugcp_bench.engine import trainer
from mugcp_bench.errors import UserError
from mugcp_bench.methods.base import TrainConfig, split_overrides
from mugcp_bench.methods.mma import MMA, PAPER_BLOCKS
from mugcp_bench.methods.prompts import clean_classname
from mugcp_bench.methods.zsclip import ZeroShotCLIP
from mugcp_bench.model.backbone import load_backbone
from tests.method_harness import (
    CLASSNAMES,
    DATASET,
    build_method,
    make_batch,
    shared_tiny_backbone,
    vit_b16_backbone,
    write_items,
)
from tests.numerics import GRAD, assert_close_scaled, assert_differs


@pytest.fixture
def batch(tmp_path):
    return make_batch(tmp_path, n=3)


def perturb(method, seed: int = 1, size: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in method.trainable_parameters():
            p.add_(size * torch.randn(p.shape, generator=gen))


# --- parameters ------------------------------------------------------------------------------------------------------
def reference_count(text: int, vision: int, dim: int, blocks: int) -> int:
    """trainers/mmadapter.py _build_adapter: per slot text down (d·r + r) + up (r·d + d), the same for vision, and the
    shared Linear(r, r) (r·r + r); slots ADAPTER_START 5 … ADAPTER_END 12."""
    tower = lambda d: d * dim + dim + dim * d + d  # noqa: E731
    return blocks * (tower(text) + tower(vision) + dim * dim + dim)


def test_trainable_parameters_on_vit_b16_equal_the_reference_count():
    bb = vit_b16_backbone()
    method = MMA(
        bb, ["cat", "dog"], MMA.make_config(split_overrides(MMA, MMA.recipe("paper", "base2novel", 16, "dtd"))[0])
    )
    assert method.n_trainable() == reference_count(512, 768, 32, 8) == 674_560
    assert sorted(method.text_adapter, key=int) == [str(b) for b in PAPER_BLOCKS] == [str(b) for b in range(4, 12)]
    shapes = {n: tuple(p.shape) for n, p in method.named_parameters()}
    assert shapes["text_adapter.4.down.0.weight"] == (32, 512) and shapes["text_adapter.11.up.weight"] == (512, 32)
    assert shapes["visual_adapter.4.down.0.weight"] == (32, 768) and shapes["visual_adapter.4.up.bias"] == (768,)
    assert shapes["shared_adapter.4.0.weight"] == (32, 32)
    # kaiming-normal (fan_out, relu): std sqrt(2 / out_features); every bias 0
    for name, std in (
        ("text_adapter.4.down.0.weight", (2 / 32) ** 0.5),
        ("visual_adapter.4.up.weight", (2 / 768) ** 0.5),
    ):
        assert abs(float(dict(method.named_parameters())[name].detach().std()) / std - 1) < 0.05, name
    assert all(float(p.detach().abs().max()) == 0 for n, p in method.named_parameters() if n.endswith("bias"))
    no_shared = MMA(bb, ["cat"], MMA.make_config({"shared": False}))
    assert no_shared.n_trainable() == 674_560 - 8 * (32 * 32 + 32)
    assert not any(n.startswith("shared_adapter") for n, _ in no_shared.named_parameters())


def test_adapter_blocks_the_backbone_does_not_have_are_one_line_errors():
    with pytest.raises(UserError, match=r"adapter_blocks must be distinct block indices in 0 … 3 .*got 2,4"):
        build_method("mma", adapter_blocks=(2, 4))
    with pytest.raises(UserError, match="distinct"):
        build_method("mma", adapter_blocks=(1, 1))
    with pytest.raises(UserError, match="adapter_scale must be positive"):
        build_method("mma", adapter_scale=0.0)


# --- the forward -----------------------------------------------------------------------------------------------------
@pytest.mark.numerics
def test_the_branch_reads_ln_1_and_adds_after_the_mlp_in_both_towers_against_a_hand_written_loop(batch):
    """open_clip's blocks, whole rows, full length: at each adapted block the output is block(x) +
    s · up(shared(down(ln_1(x)))), the shared layer of that block the same module in both towers."""
    method = build_method("mma", adapter_scale=0.3)  # a large scale: a misplaced branch shows far above rounding
    perturb(method)
    naive = load_backbone("tiny")
    naive.eot_truncation = naive.fused_attention = naive.prefix_sharing = False
    s, blocks = 0.3, method.blocks

    def branch(tower, i, h):
        k = str(i)
        return s * tower[k].up(method.shared_adapter[k](tower[k].down(h)))

    with torch.no_grad():
        v = naive.model.visual
        x = v.conv1(batch.images).flatten(2).transpose(1, 2)
        x = v.ln_pre(torch.cat([v.class_embedding.view(1, 1, -1).expand(3, -1, -1), x], 1) + v.positional_embedding)
        for i, block in enumerate(v.transformer.resblocks):
            x = block(x) + (branch(method.visual_adapter, i, block.ln_1(x)) if i in blocks else 0)
        image_want = v.ln_post(x[:, 0]) @ v.proj
        t = naive.text
        tokens = naive.tokenize([f"a photo of a {clean_classname(c)}." for c in CLASSNAMES])
        x = t.token_embedding(tokens) + t.positional_embedding
        for i, block in enumerate(t.transformer.resblocks):
            x = block(x, attn_mask=t.attn_mask) + (branch(method.text_adapter, i, block.ln_1(x)) if i in blocks else 0)
        text_want = t.ln_final(x[torch.arange(len(CLASSNAMES)), naive.eot_index(tokens)]) @ t.text_projection
        assert_close_scaled(method.image_features(batch.images), image_want)
        assert_close_scaled(method.text_features(), text_want)
        zs = shared_tiny_backbone()
        assert_differs(image_want, zs.encode_image(batch.images))
        assert_differs(text_want, zs.encode_text(zs.embed_tokens(tokens), tokens))


@pytest.mark.numerics
def test_with_zero_up_projections_mma_is_zero_shot_clip_on_a_photo_of_a_class(batch):
    """The branch only adds: with every `up` zero the logits are zero-shot CLIP's with the fixed prompt, whatever the
    dataset's own template."""
    method = build_method("mma")
    method.set_classnames(CLASSNAMES, template="{} texture.", dataset="dtd")
    with torch.no_grad():
        for tower in (method.text_adapter, method.visual_adapter):
            for adapter in tower.values():
                adapter.up.weight.zero_()
                adapter.up.bias.zero_()
        zs = ZeroShotCLIP(shared_tiny_backbone(), CLASSNAMES, ZeroShotCLIP.make_config({}), template="a photo of a {}.")
        assert_close_scaled(method(batch.images).logits, zs(batch.images).logits)
    assert (
        method.prompts.tokens.tolist()
        == shared_tiny_backbone()
        .tokenize([f"a photo of a {clean_classname(c)}." for c in CLASSNAMES])[:, : method.prompts.tokens.shape[1]]
        .tolist()
    )


@pytest.mark.numerics
def test_gradient_scale_layers_multiply_adapter_gradients_by_1_over_s_and_keep_the_stream_exact(batch, monkeypatch):
    """clip/gsl.py: the same forward with and without the two gradient scale layers. Every adapter gradient is
    1 / s = 1000 times the plain autograd one; the gradient reaching the images (through every adapted block) is the
    same."""
    method = build_method("mma")
    perturb(method, size=0.5)
    results = []
    for scaled in (True, False):
        if not scaled:
            monkeypatch.setattr(mma_mod, "grad_scale", lambda x, s: x)
        images = batch.images.clone().requires_grad_()
        method.zero_grad()
        method.train()
        out = method(images)
        F.cross_entropy(out.logits, batch.labels).backward()
        results.append(
            (out.logits.detach(), images.grad.clone(), {n: p.grad.clone() for n, p in method.named_parameters()})
        )
    (logits, g_images, g), (plain_logits, plain_images, plain) = results
    assert torch.equal(logits, plain_logits)  # identity forward
    assert_close_scaled(g_images, plain_images, GRAD)
    assert_differs(g_images, torch.zeros_like(g_images))
    for name, grad in g.items():
        assert_close_scaled(grad, 1000 * plain[name], GRAD, msg=name)
    assert float(g["visual_adapter.3.up.weight"].abs().max()) > 0


# --- training --------------------------------------------------------------------------------------------------------
def test_the_loss_is_recorded_per_epoch_without_warm_up_and_the_scaled_gradients_move_the_adapters(
    tmp_path, monkeypatch
):
    """The paper recipe through `trainer.fit`: loss_ce per epoch, LR 0.0015 from the first epoch (no warm-up), and
    adapters moved by the × 1000 gradients far more than plain gradients (+ weight decay) would move them."""
    bb = shared_tiny_backbone()
    items = write_items(tmp_path, CLASSNAMES, n=8)
    _, train = split_overrides(MMA, MMA.recipe("paper", "base2novel", 16, DATASET))
    cfg = TrainConfig(**{**train, "epochs": 2, "batch_size": 4})
    moved = []
    for scaled in (True, False):
        if not scaled:
            monkeypatch.setattr(mma_mod, "grad_scale", lambda x, s: x)
        method = build_method("mma")
        start = {k: v.clone() for k, v in method.trainable_state().items()}
        result = trainer.fit(method, items, cfg, bb.test_transform, torch.device("cpu"), "fp32", seed=1)
        assert [h["epoch"] for h in result.history] == [1, 2]
        assert [h["lr"] for h in result.history] == pytest.approx([0.0015, 0.0015 * 0.5 * (1 + math.cos(math.pi / 2))])
        for h in result.history:
            assert h["loss"] == pytest.approx(h["loss_ce"], rel=1e-6) and h["loss_ce"] > 0
        moved.append(max(float((v - start[k]).abs().max()) for k, v in method.trainable_state().items()))
    assert moved[0] > 50 * moved[1] > 0


# --- recipes, provenance, published numbers ---------------------------------------------------------------------------
def test_paper_recipes_and_provenance():
    b2n = MMA.recipe("paper", "base2novel", 16, "dtd")
    assert {k: b2n[k] for k in ("optimizer", "lr", "epochs", "batch_size", "warmup_epochs", "eval_batch_size")} == {
        "optimizer": "sgd",
        "lr": 0.0015,
        "epochs": 5,
        "batch_size": 16,
        "warmup_epochs": 0,
        "eval_batch_size": 100,
    }
    assert (b2n["adapter_blocks"], b2n["adapter_dim"], b2n["adapter_scale"]) == (PAPER_BLOCKS, 32, 0.001)
    assert "crop_min_scale" not in b2n  # Dassl's 0.08
    assert MMA.recipe("paper", "base2novel", 16, "imagenet")["batch_size"] == 128  # vit_b16_ep5_imnet
    xd = MMA.recipe("paper", "xd", 16, "imagenet")
    assert (xd["adapter_blocks"], xd["epochs"], xd["batch_size"]) == ((8, 9, 10, 11), 1, 128)
    with pytest.raises(UserError, match="no 'paper' recipe for protocol 'few_shot'"):
        MMA.recipe("paper", "few_shot", 16, "dtd")
    prov = MMA.provenance["paper"]
    assert prov.repo == "ZjjConan/Multi-Modal-Adapter" and len(prov.commit) == 40
    assert prov.configs["base2novel"] == "configs/trainers/MultiModalAdapter/vit_b16_ep5.yaml"
    assert "ours" in prov.note and "VLM-MultiModalAdapter#3" in prov.note
    assert all(max(r["adapter_blocks"]) <= 3 for r in MMA.recipes["toy"].values())
    assert (MMA.report_order, MMA.in_default_set) == (650, False)


def test_report_vs_paper_finds_the_published_averages():
    from mugcp_bench.report.published import load_published, lookup

    published = load_published()
    got = [lookup(published, "mma", "base2novel", "average", m) for m in ("avg_base", "avg_novel", "avg_hm")]
    assert [r["value"] for r in got] == [83.20, 76.80, 79.87]
    assert all("ZjjConan/Multi-Modal-Adapter" in r["source"] for r in got)


# --- the toy world, end to end ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_toy_world_base_to_novel_run(tmp_path):
    """`run_sweep` on the quick toy world with the `toy` recipe (1 shot, 1 epoch): the run completes, is evaluated on
    base and novel classes, records its loss for the epoch at the full LR and the reference formula's count."""
    import json

    from mugcp_bench import run_sweep

    run_sweep(
        methods="mma",
        protocols="base2novel",
        datasets="toy_shapes",
        shots="1",
        seeds="1",
        sets={"epochs": 1},
        quick_toy=True,
        results_dir=tmp_path,
    )
    (record,) = [json.loads(p.read_text()) for p in tmp_path.rglob("run.json")]
    assert record["status"] == "complete" and record["key"]["recipe"] == "toy"
    assert record["trainable_params"] == reference_count(128, 128, 32, 3)  # the toy CLIP: widths 128, blocks 1 … 3
    assert {("base2novel", "base"), ("base2novel", "novel")} <= {
        (e["protocol"], e["classes"]) for e in record["evaluations"]
    }
    (h,) = record["history"]
    assert h["loss_ce"] > 0 and h["loss"] == pytest.approx(h["loss_ce"], rel=1e-6)
    assert h["lr"] == pytest.approx(0.0015)  # no warm-up epoch
