"""PromptSRC specifics: parameter counts, prompt placement, the teacher and the three losses against independent
computations, Gaussian prompt aggregation (final weights and resume), recipes, fast = naive with every loss part."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mugcp_bench.engine import trainer
from mugcp_bench.engine.callbacks import StepInfo, TrainCallback
from mugcp_bench.engine.interrupts import deferred_sigint, request_stop
from mugcp_bench.errors import RunInterrupted, UserError
from mugcp_bench.frozen.quantities import clear_memory
from mugcp_bench.methods.base import TrainConfig, split_overrides
from mugcp_bench.methods.promptsrc import TEACHER_TEMPLATES, PromptSRC, gpa_weights
from mugcp_bench.model.backbone import load_backbone
from tests.method_harness import (
    CLASSNAMES,
    build_method,
    load_images,
    make_batch,
    shared_tiny_backbone,
    vit_b16_backbone,
    write_items,
)
from tests.numerics import FP32, GRAD, assert_close_scaled, assert_differs

CPU = torch.device("cpu")


def perturbed(**overrides) -> PromptSRC:
    method = build_method("promptsrc", **overrides)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in method.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return method


@pytest.fixture
def batch(tmp_path):
    return make_batch(tmp_path, n=3)


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    return write_items(tmp_path_factory.mktemp("promptsrc"), CLASSNAMES, n=8, seed=2)


def test_parameter_counts_vit_b16():
    """46,080 (base-to-novel, few-shot: 9 × 4 × (512 + 768)) and 15,360 (cross-dataset, depth 3): the counts of the
    reference's own CLIP built with ViT-B/16's sizes (docs/methods/promptsrc.md §12.4)."""
    counts = {}
    for protocol in ("base2novel", "xd", "few_shot"):
        cfg, _ = split_overrides(PromptSRC, PromptSRC.recipe("paper", protocol, 16, "caltech101"))
        counts[protocol] = PromptSRC(vit_b16_backbone(), ["cat", "dog"], PromptSRC.make_config(cfg)).n_trainable()
    assert counts == {"base2novel": 46_080, "xd": 15_360, "few_shot": 46_080}


def test_paper_recipes():
    b2n = PromptSRC.recipe("paper", "base2novel", 16, "dtd")
    xd = PromptSRC.recipe("paper", "xd", 16, "imagenet")
    keys = ("epochs", "lr", "batch_size", "prompt_depth_text", "prompt_depth_vision", "gpa_mean", "gpa_std")
    assert tuple(b2n[k] for k in keys) == (20, 0.0025, 4, 9, 9, 15.0, 1.0)
    assert tuple(xd[k] for k in keys) == (20, 0.0025, 4, 3, 3, 6.0, 10.0)
    assert (b2n["text_loss_weight"], b2n["image_loss_weight"]) == (25.0, 10.0)
    for dataset, gpa in (("imagenet", (30.0, 30.0)), ("caltech101", (30.0, 30.0)), ("eurosat", (45.0, 5.0))):
        fs = PromptSRC.recipe("paper", "few_shot", 4, dataset)
        assert (fs["epochs"], fs["gpa_mean"], fs["gpa_std"]) == (50, *gpa)
    assert set(PromptSRC.provenance["paper"].configs) == {"base2novel", "xd", "few_shot"}


def test_gpa_weights_are_the_normalised_gaussian_at_one_based_epochs():
    w = gpa_weights(20, 15.0, 1.0)
    assert sum(w) == pytest.approx(1.0, abs=1e-12)
    assert w[14] == pytest.approx(0.3989, abs=1e-4) and w[13] == w[15] == pytest.approx(0.2420, abs=1e-4)
    assert max(range(20), key=w.__getitem__) == 14  # epoch 15 (1-based) = index 14
    xd = gpa_weights(20, 6.0, 10.0)
    assert xd[5] == pytest.approx(0.06278, abs=1e-5) and xd[0] == pytest.approx(0.0554, abs=1e-4)
    with pytest.raises(UserError, match="gpa_mean"):
        gpa_weights(3, 1e6, 0.1)


def test_depth_beyond_the_backbone_is_one_line_with_the_fix():
    with pytest.raises(UserError, match=r"prompt_depth_vision=5 but 'tiny' has 4 vision layers; --set "):
        build_method("promptsrc", prompt_depth_vision=5)
    with pytest.raises(UserError, match=r"prompt_depth_text=0"):
        build_method("promptsrc", prompt_depth_text=0)


def test_context_replaces_the_four_init_words():
    method = build_method("promptsrc")
    bb = shared_tiny_backbone()
    words = bb.embed_tokens(bb.tokenize(["a photo of a"]))[0]
    assert torch.equal(method.ctx.detach(), words[1:5])
    assert build_method("promptsrc", n_ctx_text=5).prefix == "X X X X X"  # > 4: random init


@pytest.mark.numerics
def test_towers_match_hand_written_layer_loops(batch):
    """Text: deep prompts replace positions 1 … n before blocks 1 … depth−1; vision: the input prompt appended after
    the positional embedding, the last n tokens replaced before blocks 1 … depth−1 (clip/model.py IVLP)."""
    method = perturbed(prompt_depth_text=3, prompt_depth_vision=2, n_ctx_vision=3)
    bb, n = shared_tiny_backbone(), method.n_text
    images = batch.images
    with torch.no_grad():
        x, mask, eot = bb.text_embed(method.prompts.build(method.ctx), method.prompts.tokens)
        for i in range(bb.text_layers):
            if i in (1, 2):
                x = x.clone()
                x[:, 1 : 1 + n] = method.deep_text[i - 1]
            x = bb.text_block(i, x, mask)
        assert_close_scaled(method.text_features(), bb.text_head(x, eot), msg="text")
        v = bb.vision_embed(images, method.vision_ctx[None])
        for i in range(bb.vision_layers):
            if i == 1:
                v = v.clone()
                v[:, -3:] = method.deep_vision[0]
            v = bb.vision_block(i, v)
        assert_close_scaled(method.image_features(images), bb.vision_head(v), msg="vision")


def test_teacher_is_the_normalised_mean_of_unnormalised_template_features():
    assert len(TEACHER_TEMPLATES) == len(set(TEACHER_TEMPLATES)) == 60 and TEACHER_TEMPLATES[0] == "a photo of a {}."
    assert all(t.count("{}") == 1 for t in TEACHER_TEMPLATES)
    clear_memory()
    method = build_method("promptsrc")
    bb = shared_tiny_backbone()
    names = [c.replace("_", " ") for c in CLASSNAMES]
    per_template = torch.stack(
        [bb.text_features([t.format(c) for c in names], normalize=False) for t in TEACHER_TEMPLATES]
    )
    want = F.normalize(per_template.mean(0), dim=-1)  # (C, E)
    assert_close_scaled(method.teacher_text(), want, msg="teacher")
    normalised_mean = F.normalize(F.normalize(per_template, dim=-1).mean(0), dim=-1)
    assert_differs(normalised_mean, want, msg="the other averaging")  # would be visibly different


def test_losses_equal_the_reference_formulas(batch):
    method = perturbed().train()
    torch.manual_seed(0)
    out = method(batch.images, batch.keys)
    bb = shared_tiny_backbone()
    with torch.no_grad():
        text_n = F.normalize(method.text_features(), dim=-1)  # (C, E)
        image_n = F.normalize(method.image_features(batch.images), dim=-1)  # (B, E)
        zs = F.normalize(bb.encode_image(batch.images), dim=-1)
        teacher = method.teacher_text()
        scale = bb.logit_scale
        p_student = (scale * image_n @ text_n.t()).log_softmax(-1)
        p_teacher = (scale * zs @ teacher.t()).log_softmax(-1)
        kl = (p_teacher.exp() * (p_teacher - p_student)).sum() / p_student.numel()  # KL(teacher ‖ student) / (B·C)
    assert set(out.losses) == {"text_scl", "image_scl", "kl"}
    assert_close_scaled(out.losses["text_scl"], 25.0 * (text_n - teacher).abs().mean(), msg="text_scl")
    assert_close_scaled(out.losses["image_scl"], 10.0 * (image_n - zs).abs().mean(), msg="image_scl")
    assert_close_scaled(out.losses["kl"], kl, msg="kl")
    assert out.losses["kl"] > 0 and out.losses["text_scl"] > 0
    assert method.eval()(batch.images).losses == {}  # evaluation: logits only


@pytest.mark.parametrize(("drop", "gone"), [("text_scl", "text_scl"), ("image_scl", "image_scl"), ("kl", "kl")])
def test_each_ablation_drops_its_loss(batch, drop, gone):
    overrides = PromptSRC.ablations[drop]
    out = build_method("promptsrc", **overrides).train()(batch.images, batch.keys)
    assert gone not in out.losses and len(out.losses) == 2


# --- Gaussian prompt aggregation -------------------------------------------------------------------------------------
class EpochSnapshots:
    """Wraps a method's `on_epoch_end`: the trainable state as each epoch ends, before the method accumulates it."""

    def __init__(self, method: PromptSRC) -> None:
        self.states: list[dict[str, torch.Tensor]] = []
        original = method.on_epoch_end

        def hook(epoch: int, epochs: int) -> None:
            self.states.append(method.trainable_state())
            original(epoch, epochs)

        method.on_epoch_end = hook


def fit(method, items, cfg, **kw):
    transform = shared_tiny_backbone().test_transform
    return trainer.fit(method, items, cfg, transform, CPU, "fp32", seed=3, **kw)


GPA_CFG = {"gpa_mean": 2.5, "gpa_std": 1.0}
TRAIN = TrainConfig(epochs=4, lr=0.05, batch_size=4)


def test_final_weights_are_the_gaussian_weighted_epoch_weights(items, tmp_path):
    method = build_method("promptsrc", **GPA_CFG)
    snaps = EpochSnapshots(method)
    result = fit(method, items, TRAIN, checkpoint=tmp_path / "ckpt.pt")
    assert len(snaps.states) == 4
    # the weights, computed here from the pdf at 1-based epochs (the constant factor cancels in the normalisation)
    pdf = [math.exp(-((e - 2.5) ** 2) / 2) for e in (1, 2, 3, 4)]
    weights = [p / sum(pdf) for p in pdf]
    final = method.trainable_state()
    for name, value in final.items():
        want = sum(w * s[name].double() for w, s in zip(weights, snaps.states)).float()
        assert_close_scaled(value, want, FP32, msg=name)
        assert_differs(value, snaps.states[-1][name], msg=f"{name}: the average against the last epoch's")
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert all(torch.equal(saved["model"][k], v) for k, v in final.items())  # the last checkpoint holds the GPA model
    assert saved["method_state"]["gpa_epochs"] == [0, 1, 2, 3]
    assert {"loss_ce", "loss_text_scl", "loss_image_scl", "loss_kl"} <= result.history[0].keys()

    plain = build_method("promptsrc", gpa=False)
    snaps = EpochSnapshots(plain)
    fit(plain, items, TRAIN)
    assert all(torch.equal(v, snaps.states[-1][k]) for k, v in plain.trainable_state().items())  # no-gpa: last epoch


class StopAt(TrainCallback):
    def __init__(self, epoch: int, step: int) -> None:
        self.epoch, self.step = epoch, step

    def on_step_end(self, info: StepInfo) -> None:
        if (info.epoch, info.step) == (self.epoch, self.step):
            request_stop()


@pytest.mark.parametrize(("epoch", "step"), [(2, 0), (1, 1)], ids=["mid-epoch", "epoch-end"])
def test_interrupted_and_resumed_run_ends_with_identical_weights(items, tmp_path, epoch, step):
    whole = build_method("promptsrc", **GPA_CFG)
    fit(whole, items, TRAIN)
    ckpt = tmp_path / "ckpt.pt"
    first = build_method("promptsrc", **GPA_CFG)
    with deferred_sigint(), pytest.raises(RunInterrupted):
        fit(first, items, TRAIN, checkpoint=ckpt, callbacks=[StopAt(epoch, step)])
    assert torch.load(ckpt, weights_only=False)["method_state"]["gpa_epochs"]  # a running sum to carry over
    resumed = build_method("promptsrc", seed=7, **GPA_CFG)
    with deferred_sigint():
        fit(resumed, items, TRAIN, checkpoint=ckpt, resume=True)
    for name, value in whole.trainable_state().items():
        assert torch.equal(resumed.trainable_state()[name], value), f"{name} differs after the resume"


def test_a_checkpoint_without_the_running_sum_is_not_resumed(items, tmp_path):
    """The reference loses its running sum on resume (and never swaps); here such a checkpoint is kept aside."""
    ckpt = tmp_path / "ckpt.pt"
    method = build_method("promptsrc", **GPA_CFG)
    with deferred_sigint(), pytest.raises(RunInterrupted):
        fit(method, items, TRAIN, checkpoint=ckpt, callbacks=[StopAt(1, 1)])
    state = torch.load(ckpt, weights_only=False)
    del state["method_state"]
    torch.save(state, ckpt)
    resumed = build_method("promptsrc", **GPA_CFG)
    result = fit(resumed, items, TRAIN, checkpoint=ckpt, resume=True)
    assert result.epochs_run == 4 and (tmp_path / "ckpt.pt.unusable").is_file()


# --- fast path = naive path, every loss part ------------------------------------------------------------------------
@pytest.mark.numerics
def test_training_step_fast_equals_naive_with_every_loss(items):
    """Shared-prefix fused text, EOT-cut sequences against full-length text through open_clip's modules: the same
    loss parts and the same gradient of their sum on every prompt tensor."""
    fast_bb, naive_bb = load_backbone("tiny"), load_backbone("tiny")
    naive_bb.eot_truncation = naive_bb.fused_attention = naive_bb.prefix_sharing = False
    fast = perturbed(backbone=fast_bb)
    naive = build_method("promptsrc", backbone=naive_bb)
    naive.load_trainable_state(fast.trainable_state())
    assert naive.prompts.tokens.shape[1] == naive_bb.context_length > fast.prompts.tokens.shape[1]
    images = load_images(items, fast_bb)[:4]
    labels = torch.tensor([d.label for d in items][:4])
    outs, grads = [], []
    for m in (fast, naive):
        m.train()
        out = m(images)
        loss = F.cross_entropy(out.logits, labels) + sum(out.losses.values())
        m.zero_grad()
        loss.backward()
        outs.append(out)
        grads.append({k: p.grad.clone() for k, p in m.named_parameters() if p.requires_grad})
    assert_close_scaled(outs[0].logits, outs[1].logits, msg="logits")
    for part in ("text_scl", "image_scl", "kl"):
        assert_close_scaled(outs[0].losses[part].detach(), outs[1].losses[part].detach(), msg=part)
    for k, g in grads[1].items():
        assert g.abs().max() > 0, f"{k} gets no gradient"
        assert_close_scaled(grads[0][k], g, GRAD, msg=f"gradient of {k}")


# --- end to end ----------------------------------------------------------------------------------------------------
TOY_PROTOCOLS = (
    ("base2novel", "toy_shapes", {"base", "novel"}),
    ("cross_dataset,domain_generalization", "toy_shapes,toy_objects_sketch", {"all"}),
    ("few_shot", "toy_shapes", {"all"}),
)


@pytest.mark.slow
def test_toy_world_runs_every_protocol(tmp_path):
    """The toy recipes through `run_sweep` on the quick toy world (2 epochs): base-to-novel, the ImageNet-like source
    run with its cross-dataset and domain-generalization evaluations, few-shot; every loss part in every epoch."""
    from mugcp_bench import run_sweep

    for protocols, datasets, classes in TOY_PROTOCOLS:
        result = run_sweep(
            methods="promptsrc", protocols=protocols, datasets=datasets, seeds=[1], quick_toy=True,
            sets={"epochs": 2}, shots="2" if protocols == "few_shot" else None, results_dir=tmp_path / protocols,
        )  # fmt: skip
        (record,) = result.records()
        assert record["status"] == "complete" and record["key"]["recipe"] == "toy"
        assert {e["classes"] for e in record["evaluations"]} >= classes
        assert all(0 <= e["accuracy"] <= 100 for e in record["evaluations"])
        history = record["history"]
        assert len(history) == 2 and all(
            {"loss_ce", "loss_text_scl", "loss_image_scl", "loss_kl"} <= h.keys() for h in history
        )
        assert record["trainable_params"] > 0


@pytest.mark.slow
def test_ablate_drops_each_component(tmp_path, capsys):
    """`ablate --method promptsrc --drop X` for each of its four components, one sweep: each variant trains without
    its part (no loss_<part> in its history; no-gpa ends on the last epoch's prompts)."""
    from tests.cli_harness import cli, records
    from tests.miniature import build_miniature

    data_root = build_miniature(tmp_path / "data", ["eurosat"])
    args = ["ablate", "--method", "promptsrc", "--datasets", "eurosat", "--seeds", "1", "--data-root", str(data_root)]
    for drop in PromptSRC.ablations:
        args += ["--drop", drop]
    args += ["--backbone", "tiny", "--pretrained", "random", "--recipe", "toy", "--set", "epochs=2"]
    code, _, err = cli([*args, "--results-dir", str(tmp_path / "results")], capsys)
    assert code == 0, err
    by_label = {r["method_label"]: r for r in records(tmp_path / "results")}
    assert set(by_label) == {"promptsrc", *(f"promptsrc-no-{d}" for d in PromptSRC.ablations)}
    parts = {label: {k for k in r["history"][-1] if k.startswith("loss_")} for label, r in by_label.items()}
    assert parts["promptsrc"] == {"loss_ce", "loss_text_scl", "loss_image_scl", "loss_kl"}
    assert parts["promptsrc-no-gpa"] == parts["promptsrc"]
    for drop in ("text_scl", "image_scl", "kl"):
        assert parts[f"promptsrc-no-{drop}"] == parts["promptsrc"] - {f"loss_{drop}"}
