"""KgCoOp specifics: the hard-coded context, honest settings, the knowledge features (zero-shot CLIP's), W = 0 is CoOp,
the loss and its gradient on the fast and the naive path, per-epoch loss records, recipes and parameter counts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mugcp_bench.datasets  # noqa: F401 - registers the dataset specs
from mugcp_bench.engine import trainer
from mugcp_bench.errors import UserError
from mugcp_bench.methods.base import TrainConfig, split_overrides
from mugcp_bench.methods.coop import CoOp, CoOpConfig
from mugcp_bench.methods.kgcoop import HARD_CODED_INIT, KG_TEMPLATES, KgCoOp
from mugcp_bench.methods.zsclip import ZeroShotCLIP, ZSCLIPConfig
from mugcp_bench.model.backbone import load_backbone
from mugcp_bench.registry import DATASETS
from tests.method_harness import (
    CLASSNAMES,
    TEMPLATE,
    build_method,
    load_images,
    make_batch,
    shared_tiny_backbone,
    vit_b16_backbone,
    write_items,
)
from tests.numerics import FP16, GRAD, assert_close_scaled


@pytest.fixture
def batch(tmp_path):
    return make_batch(tmp_path, n=4)


def kgcoop(**overrides) -> KgCoOp:
    return build_method("kgcoop", **overrides)


def perturb(method, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in method.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


def loss_and_grads(method, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(logits, losses, gradients) of one training step: cross-entropy + every extra loss, as the trainer adds them."""
    method.train()
    method.zero_grad()
    out = method(batch.images)
    loss = F.cross_entropy(out.logits, batch.labels) + sum(out.losses.values())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in method.named_parameters() if p.requires_grad}
    method.eval()
    return out.logits.detach(), {k: v.detach() for k, v in out.losses.items()}, grads


# --- parameters, context and settings ------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe", ["paper", "dept"])
def test_trainable_parameters_on_vit_b16_are_the_reference_ctx(recipe):
    """2,048 = ctx (4 x 512), the only tensor the reference leaves trainable (kgcoop.py:268-273)."""
    cfg, _ = split_overrides(KgCoOp, KgCoOp.recipe(recipe, "base2novel", 16, "dtd"))
    method = KgCoOp(vit_b16_backbone(), ["cat", "dog"], KgCoOp.make_config(cfg), dataset="dtd")
    assert method.n_trainable() == 2_048
    assert list(method.trainable_state()) == ["ctx"]


def test_context_is_the_hard_coded_words_and_the_class_name_goes_last():
    method = kgcoop()
    bb = shared_tiny_backbone()
    words = bb.embed_tokens(bb.tokenize([HARD_CODED_INIT]))[0]
    assert method.n_ctx == 4 and torch.equal(method.ctx.detach(), words[1:5])
    texts = [f"{HARD_CODED_INIT} {c.replace('_', ' ')}." for c in CLASSNAMES]
    tokens = bb.tokenize(texts)[:, : method.prompts.tokens.shape[1]]
    with torch.no_grad():
        assert torch.equal(method.prompts.build(method.ctx), bb.embed_tokens(tokens))


def test_random_context_without_ctx_init():
    method = kgcoop(ctx_init=False, n_ctx=6)
    assert method.prefix == "X X X X X X" and method.ctx.shape == (6, shared_tiny_backbone().text_width)
    assert method.ctx.detach().std().item() == pytest.approx(0.02, rel=0.3)


@pytest.mark.parametrize("n_ctx", [2, 16])
def test_a_context_length_the_hard_coded_init_ignores_is_refused_in_one_line(n_ctx):
    with pytest.raises(UserError) as exc:
        kgcoop(n_ctx=n_ctx)
    message = str(exc.value)
    assert "\n" not in message
    assert f"n_ctx={n_ctx} has no effect with ctx_init=true" in message and "ctx_init=false" in message


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("w", "-1", "w must be >= 0"),
        ("class_token_position", "middle", "unknown setting 'class_token_position'"),  # the reference never reads it
        ("ctx_init", "a photo", "expected bool"),  # a flag, as the reference reads CTX_INIT
    ],
)
def test_bad_settings_are_one_line_errors(key, value, message):
    with pytest.raises(UserError, match=message):
        m_keys, _ = split_overrides(KgCoOp, {key: value})
        KgCoOp(shared_tiny_backbone(), CLASSNAMES, KgCoOp.make_config(m_keys))


# --- the knowledge features ----------------------------------------------------------------------------------------
@pytest.mark.numerics
@pytest.mark.parametrize("dataset", ["dtd", "oxford_pets", "eurosat", "x"])
def test_knowledge_features_are_zero_shot_clips_for_the_same_template(dataset):
    bb = shared_tiny_backbone()
    method = KgCoOp(bb, CLASSNAMES, KgCoOp.make_config({"ctx_init": True, "n_ctx": 4}), TEMPLATE, dataset)
    template = KG_TEMPLATES.get(dataset, TEMPLATE)  # a dataset the reference does not know: its own template
    assert method.kg_template() == template
    zero_shot = ZeroShotCLIP(bb, CLASSNAMES, ZSCLIPConfig(), template=template, dataset=dataset)
    assert_close_scaled(method.kg_features(), zero_shot.class_features)
    assert not method.kg_features().requires_grad


def test_templates_are_the_datasets_own_except_dtd():
    """KgCoOp's CUSTOM_TEMPLATES equal our zero-shot templates on every dataset but DTD (kgcoop.py:37-54)."""
    ours = {name: DATASETS.get(name).template for name in KG_TEMPLATES}
    differ = {name for name in KG_TEMPLATES if KG_TEMPLATES[name] != ours[name]}
    assert differ == {"dtd"}
    assert KG_TEMPLATES["dtd"] == "a photo of a {}, a type of texture." and ours["dtd"] == "{} texture."


@pytest.mark.numerics
def test_knowledge_features_follow_the_class_set_and_stay_out_of_checkpoints(batch):
    bb = shared_tiny_backbone()
    method = kgcoop()
    method.set_classnames(["orange cross", "pink circle"], TEMPLATE, "dtd")
    expected = ZeroShotCLIP(bb, ["orange cross", "pink circle"], ZSCLIPConfig(), KG_TEMPLATES["dtd"], "dtd")
    assert_close_scaled(method.kg_features(), expected.class_features)
    method.train()
    assert set(method(batch.images).losses) == {"kg"}
    assert set(method.state_dict()) == {"ctx"}  # the frozen features are no part of the saved state


# --- the loss --------------------------------------------------------------------------------------------------------
def test_w_zero_is_coop_exactly(batch):
    """Same context, same prompts, same text pass: identical logits and gradients, and no extra loss."""
    kg = kgcoop(w=0.0)
    coop = CoOp(shared_tiny_backbone(), CLASSNAMES, CoOpConfig(n_ctx=4, ctx_init=HARD_CODED_INIT), TEMPLATE, "x")
    assert torch.equal(kg.ctx, coop.ctx)
    perturb(kg)
    perturb(coop)
    kg_logits, kg_losses, kg_grads = loss_and_grads(kg, batch)
    coop_logits, _, coop_grads = loss_and_grads(coop, batch)
    assert kg_losses == {}
    assert torch.equal(kg_logits, coop_logits)
    assert torch.equal(kg_grads["ctx"], coop_grads["ctx"])


@pytest.mark.numerics
def test_loss_is_w_times_one_minus_mean_cosine_and_only_it_changes_the_gradient(batch):
    w = 8.0
    kg, plain = kgcoop(w=w), kgcoop(w=0.0)
    perturb(kg)
    perturb(plain)
    logits, losses, grads = loss_and_grads(kg, batch)
    plain_logits, _, plain_grads = loss_and_grads(plain, batch)
    assert torch.equal(logits, plain_logits)  # the loss never touches the logits
    # the reference's score by hand: normalised learned class features against the normalised frozen ones
    ctx = kg.ctx.detach().clone().requires_grad_(True)
    text = kg.backbone.encode_text(kg.prompts.build(ctx), kg.prompts.tokens)  # (C, E), whole rows
    cos = (F.normalize(text, dim=-1) * F.normalize(kg.kg_features(), dim=-1)).sum(-1)  # (C,)
    score = 1.0 - cos.mean()
    assert 0 < score.item() < 2
    assert_close_scaled(losses["kg"], w * score.detach())
    (w * score).backward()
    assert_close_scaled(grads["ctx"], plain_grads["ctx"] + ctx.grad, GRAD)


@pytest.mark.numerics
def test_fast_path_equals_naive_path_with_the_kg_loss(tmp_path):
    """Shared-prefix, EOT-cut text and cached image features against full-length whole-row passes: the same logits,
    loss parts and gradients of cross-entropy + W·score (tests/test_fast_vs_naive.py checks cross-entropy only)."""
    fast_bb, naive_bb = load_backbone("tiny"), load_backbone("tiny")
    naive_bb.eot_truncation = naive_bb.fused_attention = naive_bb.prefix_sharing = False
    classes = (*CLASSNAMES, "very long and oddly specific multi word class name")
    items = write_items(tmp_path, classes, n=6, seed=2)
    fast = build_method("kgcoop", backbone=fast_bb, classnames=classes)
    naive = build_method("kgcoop", backbone=naive_bb, classnames=classes)
    perturb(fast)
    naive.load_trainable_state(fast.trainable_state())
    images, labels = load_images(items, fast_bb), torch.tensor([d.label for d in items])
    results = []
    for m in (fast, naive):
        m.train()
        out = m(images)
        loss = F.cross_entropy(out.logits, labels) + out.losses["kg"]
        loss.backward()
        results.append((out.logits.detach(), out.losses["kg"].detach(), m.ctx.grad.clone()))
    (fl, fk, fg), (nl, nk, ng) = results
    assert_close_scaled(fl, nl)
    assert_close_scaled(fk, nk)
    assert_close_scaled(fg, ng, GRAD)
    fast.eval()
    naive.eval()
    feats = fast_bb.encode_image(images)
    fast.begin_eval()
    assert_close_scaled(fast.predict(None, image_features=feats), naive(images).logits.detach())
    fast.end_eval()


def test_every_loss_part_is_recorded_per_epoch(tmp_path):
    bb = shared_tiny_backbone()
    items = write_items(tmp_path, CLASSNAMES, n=10)
    method = kgcoop()
    cfg = TrainConfig(epochs=2, batch_size=4, lr=0.01)
    result = trainer.fit(method, items, cfg, bb.test_transform, torch.device("cpu"), "fp32", seed=1)
    assert [h["epoch"] for h in result.history] == [1, 2]
    for h in result.history:
        assert {"loss", "loss_ce", "loss_kg"} <= set(h)
        assert h["loss_kg"] > 0
        assert h["loss"] == pytest.approx(h["loss_ce"] + h["loss_kg"], rel=1e-5)


# --- recipes -------------------------------------------------------------------------------------------------------
def test_paper_and_dept_recipes_with_their_provenance():
    paper = KgCoOp.recipe("paper", "base2novel", 16, "dtd")
    assert {k: paper[k] for k in ("ctx_init", "n_ctx", "w", "batch_size", "lr", "epochs")} == {
        "ctx_init": True,
        "n_ctx": 4,
        "w": 8.0,
        "batch_size": 128,
        "lr": 0.002,
        "epochs": 100,
    }
    dept = KgCoOp.recipe("dept", "base2novel", 16, "dtd")
    assert (dept["w"], dept["batch_size"], dept["lr"], dept["epochs"]) == (2.0, 4, 0.0035, 10)
    assert KgCoOp.recipe("paper", "few_shot", 4, "dtd") == paper  # scripts/xd_train.sh: 4 shots, same config
    assert KgCoOp.recipe("dept", "xd", 16, "imagenet") == dept
    with pytest.raises(UserError, match="no 'dept' recipe for protocol 'few_shot'"):
        KgCoOp.recipe("dept", "few_shot", 16, "dtd")
    for recipe, protocols in (("paper", {"base2novel", "xd", "few_shot"}), ("dept", {"base2novel", "xd"})):
        prov = KgCoOp.provenance[recipe]
        assert set(prov.configs) == protocols and len(prov.commit) == 40
        assert all(c.endswith(".yaml") for c in prov.configs.values())
    assert "ours" in KgCoOp.provenance["paper"].note  # the xd choice is declared


@pytest.mark.numerics
def test_reference_fp16_keeps_the_context_fp16_and_encodes_the_knowledge_in_fp16():
    from mugcp_bench.model.backbone import REFERENCE_FP16

    bb = load_backbone("tiny", precision=REFERENCE_FP16)
    method = trainer.prepare_method(build_method("kgcoop", backbone=bb), torch.device("cpu"), REFERENCE_FP16)
    assert method.ctx.dtype == torch.float16
    fp32 = build_method("kgcoop")  # the same weights in fp32
    assert_close_scaled(method.kg_features(), fp32.kg_features(), FP16)  # fp16 rounding only
    assert not torch.equal(method.kg_features(), fp32.kg_features())  # computed by the fp16 weights


# --- published numbers ---------------------------------------------------------------------------------------------
def test_report_vs_paper_finds_the_published_averages():
    from mugcp_bench.report.published import load_published, lookup

    published = load_published()
    got = [lookup(published, "kgcoop", "base2novel", "average", m) for m in ("avg_base", "avg_novel", "avg_hm")]
    assert [r["value"] for r in got] == [80.73, 73.60, 77.00]  # htyao89/KgCoOp readme.md
    assert all("htyao89/KgCoOp" in r["source"] for r in got)


# --- the toy world, end to end ---------------------------------------------------------------------------------------
TOY_PROTOCOLS = [  # (protocols, datasets, evaluations expected, whether the KG loss starts above 0)
    ("base2novel", "toy_shapes", {("base2novel", "base"), ("base2novel", "novel")}, True),
    # the source toy_objects' template is "a photo of a {}.", the prompt KgCoOp starts from: its KG loss starts at 0
    ("cross_dataset,domain_generalization", "toy_shapes,toy_objects_sketch", {("source", "all")}, False),
    ("few_shot", "toy_shapes", {("few_shot", "all")}, True),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("protocols", "datasets", "expected", "kg_above_0"), TOY_PROTOCOLS, ids=[p[0] for p in TOY_PROTOCOLS]
)
def test_toy_world_run_per_protocol_records_the_kg_loss(protocols, datasets, expected, kg_above_0, tmp_path):
    """`run_sweep` on the quick toy world with the `toy` recipe: the run completes, is evaluated where the protocol
    says, and its history holds loss_ce and loss_kg for every epoch, adding up to the loss."""
    import json

    from mugcp_bench import run_sweep

    run_sweep(
        methods="kgcoop",
        protocols=protocols,
        datasets=datasets,
        shots="1",
        seeds="1",
        sets={"epochs": 2, "batch_size": 16},  # a few steps per epoch: the path is what is tested
        quick_toy=True,
        results_dir=tmp_path,
    )
    (record,) = [json.loads(p.read_text()) for p in tmp_path.rglob("run.json")]
    assert record["status"] == "complete" and record["key"]["recipe"] == "toy"
    assert record["config"]["method"] == {"ctx_init": True, "n_ctx": 4, "w": 8.0}
    assert record["trainable_params"] == 4 * 128  # ctx on the toy CLIP (text width 128)
    tags = {(e["protocol"], e["classes"]) for e in record["evaluations"]}
    assert expected <= tags
    assert [h["epoch"] for h in record["history"]] == [1, 2]
    for h in record["history"]:
        assert h["loss_ce"] > 0 and h["loss_kg"] >= -1e-5  # 1 − cos: 0 up to float rounding at the least
        assert h["loss"] == pytest.approx(h["loss_ce"] + h["loss_kg"], rel=1e-5)
        if kg_above_0:
            assert h["loss_kg"] > 1e-3
