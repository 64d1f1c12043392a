"""MMRL specifics (docs/methods/mmrl.md §17): the trainable parameters against the reference's count, the tokens'
place in both towers against a hand-written loop, fast = naive for the logits and for one training step of the whole
loss, the loss parts (weighted CE, CE_rep, the two regularisers) by hand and per epoch, the representation head used
only on the training dataset's training classes, recipes, provenance, published numbers, and a toy-world run."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from mugcp_bench.engine import trainer
from mugcp_bench.errors import UserError
from mugcp_bench.methods.base import TrainConfig, split_overrides
from mugcp_bench.methods.mmrl import LOGIT_SCALE, MMRL, PAPER_BLOCKS
from mugcp_bench.methods.prompts import clean_classname
from mugcp_bench.model.backbone import load_backbone
from tests.method_harness import (
    CLASSNAMES,
    DATASET,
    OTHER_CLASSNAMES,
    TEMPLATE,
    build_method,
    make_batch,
    shared_tiny_backbone,
    total_loss,
    vit_b16_backbone,
    write_items,
)
from tests.numerics import FP32, GRAD, assert_close_scaled, assert_differs


@pytest.fixture
def batch(tmp_path):
    return make_batch(tmp_path, n=4)


@pytest.fixture(scope="module")
def naive_bb():
    """The tiny CLIP on the reference's path: full-length text, open_clip's own block modules, whole rows."""
    bb = load_backbone("tiny")
    bb.eot_truncation = bb.fused_attention = bb.prefix_sharing = False
    return bb


def perturb(method, seed: int = 1, size: float = 0.05) -> None:
    """Noise on every trainable tensor (the per-block maps then differ from one another)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in method.trainable_parameters():
            p.add_(size * torch.randn(p.shape, generator=gen))


# --- parameters ------------------------------------------------------------------------------------------------------
def reference_count(text: int, vision: int, embed: int, rep_dim: int, n_tokens: int, blocks: int) -> int:
    """trainers/mmrl.py (the filter at lines 291-300): compound_rep_tokens (N, r), one r → Dv and one r → Dt Linear
    (weight + bias) per REP_LAYERS entry, and the image encoder's proj_rep (Dv, E)."""
    return n_tokens * rep_dim + blocks * (vision * rep_dim + vision + text * rep_dim + text) + vision * embed


@pytest.mark.parametrize(("dataset", "rep_dim", "count"), [("dtd", 512, 4_992_256), ("eurosat", 2048, 18_762_496)])
def test_trainable_parameters_on_vit_b16_equal_the_reference_count(dataset, rep_dim, count):
    bb = vit_b16_backbone()
    cfg = MMRL.make_config(split_overrides(MMRL, MMRL.recipe("paper", "base2novel", 16, dataset))[0])
    method = MMRL(bb, ["cat", "dog"], cfg, dataset=dataset)
    assert cfg.rep_dim == rep_dim and method.blocks == PAPER_BLOCKS == (5, 6, 7, 8, 9, 10, 11)
    assert method.n_trainable() == reference_count(512, 768, 512, rep_dim, 5, 7) == count
    shapes = {n: tuple(p.shape) for n, p in method.named_parameters() if p.requires_grad}
    assert shapes["compound_rep_tokens"] == (5, rep_dim) and shapes["proj_rep"] == (768, 512)
    assert shapes["compound_rep_tokens_r2vproj.6.weight"] == (768, rep_dim)
    assert shapes["compound_rep_tokens_r2tproj.0.bias"] == (512,)
    assert len(method.compound_rep_tokens_r2vproj) == len(method.compound_rep_tokens_r2tproj) == 7


def test_initialisation_as_the_reference():
    """N(0, 0.02²) tokens; the per-block maps deep copies of one layer (equal at the start); proj_rep random with std
    width^-0.5, not CLIP's proj."""
    bb = vit_b16_backbone()
    method = MMRL(bb, ["cat"], MMRL.make_config({}))
    with torch.no_grad():
        assert abs(float(method.compound_rep_tokens.std()) / 0.02 - 1) < 0.15  # 2,560 draws
        for maps in (method.compound_rep_tokens_r2vproj, method.compound_rep_tokens_r2tproj):
            assert all(torch.equal(m.weight, maps[0].weight) and torch.equal(m.bias, maps[0].bias) for m in maps)
        assert abs(float(method.proj_rep.std()) / 768**-0.5 - 1) < 0.02  # 393,216 draws
        assert_differs(method.proj_rep, bb.model.visual.proj)


def test_settings_the_backbone_cannot_hold_are_one_line_errors():
    with pytest.raises(UserError, match=r"rep_blocks must be increasing block indices in 0 … 3 .*got 2,4"):
        build_method("mmrl", rep_blocks=(2, 4))
    with pytest.raises(UserError, match="increasing"):
        build_method("mmrl", rep_blocks=(3, 2))


# --- the forward -----------------------------------------------------------------------------------------------------
def hand_features(method, bb, images):
    """clip/model_mmrl.py on open_clip's modules, whole rows, full length: the tokens inserted after CLS / SOS before
    the first entry block and replacing positions 1 … N before the others; the text mask the (T + N)² causal mask from
    the insertion on; the EOT read N positions later; the representation feature mean_j ln_post(x_j) @ proj_rep."""
    n, blocks = method.n, method.blocks
    reps_t = [f(method.compound_rep_tokens) for f in method.compound_rep_tokens_r2tproj]  # (N, Dt) each
    reps_v = [f(method.compound_rep_tokens) for f in method.compound_rep_tokens_r2vproj]  # (N, Dv) each

    def enter(x, i, reps):
        k = blocks.index(i)
        rest = x[:, 1 + n :] if k else x[:, 1:]
        return torch.cat([x[:, :1], reps[k].expand(x.shape[0], -1, -1), rest], dim=1)

    v = bb.model.visual
    x = v.conv1(images).flatten(2).transpose(1, 2)  # (B, P, Dv)
    x = torch.cat([v.class_embedding.view(1, 1, -1).expand(len(images), -1, -1), x], 1) + v.positional_embedding
    x = v.ln_pre(x)
    for i, block in enumerate(v.transformer.resblocks):
        x = block(enter(x, i, reps_v) if i in blocks else x)
    image_f = v.ln_post(x[:, 0]) @ v.proj  # (B, E)
    rep_f = v.ln_post(x[:, 1 : 1 + n]).mean(dim=1) @ method.proj_rep  # (B, E)
    t = bb.text
    tokens = bb.tokenize([TEMPLATE.format(clean_classname(c)) for c in method.classnames])  # (C, 77)
    x = t.token_embedding(tokens) + t.positional_embedding
    mask = t.attn_mask
    for i, block in enumerate(t.transformer.resblocks):
        if i in blocks:
            x = enter(x, i, reps_t)
            mask = torch.full((x.shape[1], x.shape[1]), float("-inf")).triu(1)
        x = block(x, attn_mask=mask)
    text_f = t.ln_final(x[torch.arange(len(tokens)), bb.eot_index(tokens) + n]) @ t.text_projection  # (C, E)
    return image_f, rep_f, text_f


@pytest.mark.numerics
def test_the_towers_and_logits_equal_a_hand_written_loop_of_the_reference(batch, naive_bb):
    method = build_method("mmrl", backbone=naive_bb)
    perturb(method)
    with torch.no_grad():
        image_f, rep_f, text_f = hand_features(method, naive_bb, batch.images)
        reps_t, reps_v = method.rep_tokens()
        got_image, got_rep = method.image_features(batch.images, reps_v)
        assert_close_scaled(got_image, image_f)
        assert_close_scaled(got_rep, rep_f)
        assert_close_scaled(method.text_features(reps_t), text_f)
        logits = LOGIT_SCALE * F.normalize(image_f, dim=-1) @ F.normalize(text_f, dim=-1).t()
        logits_rep = LOGIT_SCALE * F.normalize(rep_f, dim=-1) @ F.normalize(text_f, dim=-1).t()
        assert_close_scaled(method(batch.images).logits, 0.7 * logits + 0.3 * logits_rep)
        # the tokens change both towers' own features (the CLS logits are not zero-shot CLIP's)
        assert_differs(image_f, naive_bb.encode_image(batch.images))


@pytest.mark.numerics
def test_fast_path_equals_naive_path_logits_and_one_training_step(batch, naive_bb):
    """Fast (EOT cut, shared prefix with the tokens inside it, fused attention, begin_eval / predict) against naive
    (full-length rows, open_clip's blocks, forward): the same logits on the training classes (fused) and on other
    classes (CLS only), and one training step of the whole loss (α CE + CE_rep + both regularisers) gives the same
    loss and the same gradient on every trainable tensor."""
    fast, naive = build_method("mmrl"), build_method("mmrl", backbone=naive_bb)
    perturb(fast, seed=3)
    naive.load_trainable_state(fast.trainable_state())
    assert fast.prompts.tokens.shape[1] < naive.prompts.tokens.shape[1] == naive_bb.context_length
    for classes in (CLASSNAMES, OTHER_CLASSNAMES):
        for m in (fast, naive):
            m.set_classnames(classes, TEMPLATE, DATASET)
        fast.begin_eval()
        try:
            got = fast.predict(batch.images)  # (B, C)
        finally:
            fast.end_eval()
        with torch.no_grad():
            want = naive(batch.images).logits  # (B, C)
        assert_close_scaled(got, want, FP32, msg=f"logits on {classes}")
    for m in (fast, naive):
        m.set_classnames(CLASSNAMES, TEMPLATE, DATASET)
    losses, grads = [], []
    for m in (fast, naive):
        m.train()
        m.zero_grad()
        _, loss = total_loss(m, batch)
        loss.backward()
        losses.append(loss.detach())
        grads.append({k: p.grad.clone() for k, p in m.named_parameters() if p.requires_grad})
    assert_close_scaled(losses[0], losses[1], FP32)
    assert grads[0].keys() == grads[1].keys() == set(fast.trainable_state())
    for k, g in grads[1].items():
        assert_differs(g, torch.zeros_like(g), msg=k)
        assert_close_scaled(grads[0][k], g, GRAD, msg=f"gradient of {k}")


# --- the loss --------------------------------------------------------------------------------------------------------
def test_the_loss_parts_equal_the_reference_formula(batch):
    """MMRL_Loss: CE weight α on the CLS logits, (1 − α) · CE(logits_rep), λ · (1 − mean_b cos(image, frozen image))
    on the same batch, λ · (1 − mean_c cos(text, frozen text)) over the training classes."""
    method = build_method("mmrl", reg_weight=2.5)
    perturb(method, size=0.2)
    method.train()
    out = method(batch.images, labels=batch.labels)
    assert set(out.losses) == {"ce_rep", "reg_img", "reg_txt"} and out.ce_weight == pytest.approx(0.7)
    bb = shared_tiny_backbone()
    with torch.no_grad():
        reps_t, reps_v = method.rep_tokens()
        image_f, rep_f = method.image_features(batch.images, reps_v)
        text_f = method.text_features(reps_t)
        tokens = bb.tokenize([TEMPLATE.format(clean_classname(c)) for c in CLASSNAMES])
        frozen_text = bb.encode_text(bb.embed_tokens(tokens), tokens)  # (C, E)
        frozen_image = bb.encode_image(batch.images)  # (B, E)
    text_n = F.normalize(text_f, dim=-1)
    logits = LOGIT_SCALE * F.normalize(image_f, dim=-1) @ text_n.t()
    logits_rep = LOGIT_SCALE * F.normalize(rep_f, dim=-1) @ text_n.t()
    assert_close_scaled(out.logits, logits)  # the trainer's CE is on the CLS logits
    want = {
        "ce_rep": 0.3 * F.cross_entropy(logits_rep, batch.labels),
        "reg_img": 2.5 * (1 - F.cosine_similarity(image_f, frozen_image, dim=1).mean()),
        "reg_txt": 2.5 * (1 - F.cosine_similarity(text_f, frozen_text, dim=1).mean()),
    }
    for k, v in want.items():
        assert_close_scaled(out.losses[k].detach(), v, FP32, scale=max(1.0, float(v)), msg=k)
        assert float(v) > 1e-4, k  # every part takes part
    assert not build_method("mmrl", reg_weight=0.0).train()(batch.images, labels=batch.labels).losses.keys() & {
        "reg_img",
        "reg_txt",
    }


def test_each_loss_part_is_recorded_per_epoch_and_they_add_up(tmp_path):
    """`trainer.fit` with the toy recipe: loss_ce (weighted by α), loss_ce_rep, loss_reg_img and loss_reg_txt every
    epoch, summing to the loss; AdamW after one constant warm-up epoch at 1e-5."""
    bb = shared_tiny_backbone()
    items = write_items(tmp_path, CLASSNAMES, n=8)
    _, train = split_overrides(MMRL, MMRL.recipe("toy", "base2novel", 1, DATASET))
    cfg = TrainConfig(**{**train, "epochs": 2, "batch_size": 4})
    method = build_method("mmrl")
    start = {k: v.clone() for k, v in method.trainable_state().items()}
    result = trainer.fit(method, items, cfg, bb.test_transform, torch.device("cpu"), "fp32", seed=1)
    assert cfg.optimizer == "adamw"
    assert [h["epoch"] for h in result.history] == [1, 2]
    assert [h["lr"] for h in result.history] == pytest.approx([1e-5, cfg.lr])
    parts = ("loss_ce", "loss_ce_rep", "loss_reg_img", "loss_reg_txt")
    for h in result.history:
        assert all(h[p] > 0 for p in parts), h
        assert h["loss"] == pytest.approx(sum(h[p] for p in parts), rel=1e-5)
    assert all(not torch.equal(v, start[k]) for k, v in method.trainable_state().items())


# --- evaluation: the representation head on the training classes only ------------------------------------------------
@pytest.mark.numerics
def test_the_representation_head_is_used_only_on_the_training_datasets_training_classes(batch):
    """MMRL.test: fused logits for the training label space (B2N base, few-shot, the ImageNet source), the CLS logits
    for novel classes and other datasets. Changing proj_rep (on the representation path only) changes the base logits
    and leaves the novel ones bit for bit."""
    method = build_method("mmrl")
    perturb(method, seed=4)

    def predict():
        method.begin_eval()
        try:
            return method.predict(batch.images)
        finally:
            method.end_eval()

    def cls_and_rep():
        with torch.no_grad():
            reps_t, reps_v = method.rep_tokens()
            return method._logits(*method.image_features(batch.images, reps_v), method.text_features(reps_t))

    base = predict()
    logits, logits_rep = cls_and_rep()
    assert_close_scaled(base, 0.7 * logits + 0.3 * logits_rep)
    assert_differs(base, logits)
    method.set_classnames(OTHER_CLASSNAMES, TEMPLATE, DATASET)  # novel classes
    novel = predict()
    assert_close_scaled(novel, cls_and_rep()[0])
    method.set_classnames(CLASSNAMES, "itap of a {}.", "other_dataset")  # the same names, another dataset (XD / DG)
    assert not method.fused
    with torch.no_grad():
        method.proj_rep.mul_(-3.0)
    method.set_classnames(OTHER_CLASSNAMES, TEMPLATE, DATASET)
    assert torch.equal(predict(), novel)  # proj_rep plays no part in novel-class logits
    method.set_classnames(CLASSNAMES, TEMPLATE, DATASET)  # back to the training label space: fused again
    assert method.fused
    assert_differs(predict(), base)


# --- recipes, provenance, published numbers ---------------------------------------------------------------------------
def test_paper_recipes_and_provenance():
    b2n = MMRL.recipe("paper", "base2novel", 16, "dtd")
    want = {"optimizer": "adamw", "lr": 0.001, "epochs": 10, "batch_size": 4, "warmup_epochs": 1}
    assert {k: b2n[k] for k in want} == want
    assert (b2n["crop_min_scale"], b2n["eval_batch_size"], b2n["alpha"], b2n["reg_weight"]) == (0.5, 250, 0.7, 6.0)
    assert (b2n["n_rep_tokens"], b2n["rep_dim"], b2n["rep_blocks"]) == (5, 512, PAPER_BLOCKS)
    # trainers/config.py overrides every yaml REG_WEIGHT, in base2novel and few_shot alike
    for dataset, reg in (("stanford_cars", 7.0), ("oxford_pets", 0.2), ("imagenet", 0.5), ("eurosat", 0.01)):
        for protocol in ("base2novel", "few_shot"):
            assert MMRL.recipe("paper", protocol, 16, dataset)["reg_weight"] == reg
    assert MMRL.recipe("paper", "few_shot", 4, "eurosat")["rep_dim"] == 2048
    imnet = MMRL.recipe("paper", "base2novel", 16, "imagenet")
    assert (imnet["batch_size"], imnet["epochs"], imnet["warmup_epochs"]) == (32, 5, 1)  # vit_b16_imagenet
    fs = MMRL.recipe("paper", "few_shot", 1, "dtd")
    assert (fs["batch_size"], fs["epochs"], fs["reg_weight"]) == (32, 50, 6.0)
    xd = MMRL.recipe("paper", "xd", 16, "imagenet")  # cross_datasets_train.sh passes REG_WEIGHT 0.2 last
    assert (xd["reg_weight"], xd["rep_dim"], xd["epochs"], xd["warmup_epochs"], xd["batch_size"]) == (
        0.2,
        512,
        1,
        0,
        32,
    )
    prov = MMRL.provenance["paper"]
    assert prov.repo == "yunncheng/MMRL" and prov.commit.startswith("27d8821") and len(prov.commit) == 40
    assert prov.configs == {
        "base2novel": "configs/trainers/MMRL/vit_b16.yaml",
        "xd": "configs/trainers/MMRL/vit_b16_cross_datasets.yaml",
        "few_shot": "configs/trainers/MMRL/vit_b16_few_shot.yaml",
    }
    assert all(max(r["rep_blocks"]) <= 3 for r in MMRL.recipes["toy"].values())


def test_report_vs_paper_finds_the_published_averages():
    from mugcp_bench.report.published import load_published, lookup

    published = load_published()
    got = [lookup(published, "mmrl", "base2novel", "average", m) for m in ("avg_base", "avg_novel", "avg_hm")]
    assert [r["value"] for r in got] == [85.68, 77.16, 81.20]
    assert all("Awesome-Prompt-Adapter-Learning" in r["source"] for r in got)


# --- the toy world, end to end ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_toy_world_base_to_novel_run(tmp_path):
    """`run_sweep` on the quick toy world (1 shot, 1 epoch): the run completes, is evaluated on base and novel
    classes, and records every loss part of its epoch and the reference formula's parameter count."""
    from mugcp_bench import run_sweep

    run_sweep(
        methods="mmrl",
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
    assert record["trainable_params"] == reference_count(128, 128, 128, 128, 5, 2)  # the toy CLIP: widths 128
    assert {("base2novel", "base"), ("base2novel", "novel")} <= {
        (e["protocol"], e["classes"]) for e in record["evaluations"]
    }
    (h,) = record["history"]
    parts = ("loss_ce", "loss_ce_rep", "loss_reg_img", "loss_reg_txt")
    assert all(h[p] > 0 for p in parts) and h["loss"] == pytest.approx(sum(h[p] for p in parts), rel=1e-5)
