"""DePT as a plug-in (methods/dept.py, methods/plugin.py; docs/methods/dept.md §15): the compositions build and train,
the head is used only in the training label space (novel classes: exactly the inner method; base classes: the fused
logits), the loss mix and the 6.5× learning rate of the new layers, the parameter counts, the CLI (`--plugin`,
`--set dept.x`, one-line refusals), recipes and provenance, published numbers, and toy end-to-end runs whose records
and report name the composition."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

import mugcp_bench.datasets  # noqa: F401 - registers the dataset specs
from mugcp_bench.engine import trainer
from mugcp_bench.errors import UserError
from mugcp_bench.methods.base import TrainConfig
from mugcp_bench.methods.dept import DePT, FiLM, head_rows
from mugcp_bench.model.backbone import REFERENCE_FP16, load_backbone
from mugcp_bench.registry import METHODS, PLUGINS
from mugcp_bench.runs.options import with_plugins
from mugcp_bench.runs.plan import method_overrides, resolve_methods
from tests.cli_harness import cli, records
from tests.method_harness import (
    CLASSNAMES,
    DATASET,
    OTHER_CLASSNAMES,
    TEMPLATE,
    build_method,
    make_batch,
    shared_tiny_backbone,
    vit_b16_backbone,
    write_items,
)
from tests.miniature import build_miniature
from tests.numerics import FP16, GRAD, assert_close_scaled

INNERS = ("coop", "cocoop", "kgcoop", "maple")
W = 0.7  # LINEAR_PROBE.WEIGHT (Koorye/DePT@d4ff416:train.py)
LR_EXP = 6.5  # OPTIM.LR_EXP (train.py)


@pytest.fixture
def batch(tmp_path):
    return make_batch(tmp_path, n=4)


def perturb(method, seed: int = 1, size: float = 0.05) -> None:
    """Move every trainable parameter off its initialisation (FiLM off ones/zeros, so that it matters)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in method.trainable_parameters():
            p.add_(size * torch.randn(p.shape, generator=gen))


def twins(inner: str, **overrides):
    """(inner+dept, the inner method) with the same weights for every parameter the inner has."""
    composed = build_method(f"{inner}+dept", **overrides)
    perturb(composed)
    plain = build_method(inner, **overrides)
    names = {n for n, p in plain.named_parameters() if p.requires_grad}
    plain.load_trainable_state({k: v for k, v in composed.trainable_state().items() if k in names})
    return composed, plain


def image_features(method, images: torch.Tensor) -> torch.Tensor:
    """The unnormalised image features (B, E) the inner method scores: its prompted ones (MaPLe) or the frozen ones."""
    with torch.no_grad():
        if hasattr(type(method), "image_features") and not type(method).frozen_image_path:
            return method.image_features(images)
        return method.backbone.encode_image(images)


def head_logits(composed, feats: torch.Tensor, film) -> torch.Tensor:
    """The reference's head by hand: Linear(FiLM(x)) on unnormalised features, no logit scale."""
    x = feats * film.scale + film.bias
    return x @ composed.linear_probe_proj.weight.T + composed.linear_probe_proj.bias


# --- the compositions ----------------------------------------------------------------------------------------------
def test_registry_composes_dept_with_the_methods_it_wraps_only():
    assert {f"{m}+dept" for m in INNERS} <= set(METHODS.names())
    assert PLUGINS.get("dept") is DePT and DePT.wraps == INNERS
    cls = METHODS.get("CoOp + DePT")  # names are normalised: case and blanks
    assert cls.name == "coop+dept" and cls.inner_method is METHODS.get("coop") and cls.plugin_names == ("dept",)
    assert cls.report_order == METHODS.get("coop").report_order + 1 and not cls.in_default_set
    with pytest.raises(UserError, match="the plug-in dept wraps coop, cocoop, kgcoop, maple; 'mugcp' is not one"):
        METHODS.canonical("mugcp+dept")
    with pytest.raises(UserError, match="unknown plug-in 'dpt'. Did you mean 'dept'"):
        METHODS.canonical("coop+dpt")
    # a wildcard reaches the compositions only when it has a '+'
    assert "coop+dept" not in resolve_methods(["co*"]) and "coop" in resolve_methods(["co*"])
    assert resolve_methods(["*+dept"]) == sorted(f"{m}+dept" for m in INNERS)


@pytest.mark.parametrize("inner", INNERS)
def test_each_composition_builds_and_a_training_step_moves_prompts_film_and_head(inner, batch):
    method = build_method(f"{inner}+dept")
    assert torch.equal(method.film_lp_img.scale, torch.ones(method.backbone.embed_dim))  # FiLM starts as identity
    assert torch.equal(method.film_lp_text.bias, torch.zeros(method.backbone.embed_dim))
    assert method.linear_probe_proj.weight.shape == (len(CLASSNAMES), method.backbone.embed_dim)
    method.train()
    out = method(batch.images, keys=batch.keys, labels=batch.labels)
    assert out.ce_weight == pytest.approx(1 - W) and "head" in out.losses
    loss = out.ce_weight * F.cross_entropy(out.logits, batch.labels) + sum(out.losses.values())
    loss.backward()
    groups = {g.name: g for g in method.param_groups()}
    assert set(groups) == {inner, "dept"} and groups["dept"].lr_scale == LR_EXP and groups[inner].lr_scale == 1.0
    new = {id(p) for p in groups["dept"].params}
    assert new == {
        id(p) for m in (method.film_lp_img, method.film_lp_text, method.linear_probe_proj) for p in m.parameters()
    }
    for g in groups.values():  # every group gets a gradient: the prompts through both losses, FiLM and head
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in g.params), g.name
    assert method.film_lp_text.scale.grad.abs().sum() > 0  # the text rows train the head too


# --- where the head applies ----------------------------------------------------------------------------------------
@pytest.mark.numerics
@pytest.mark.parametrize("inner", INNERS)
def test_novel_class_logits_are_the_inner_methods_under_the_same_weights(inner, batch):
    """New classes: the similarity logits of the inner method, bit for bit (the same code on the same weights), on
    the naive and the fast path, whatever the head and FiLM hold."""
    composed, plain = twins(inner)
    for m in (composed, plain):
        m.set_classnames(OTHER_CLASSNAMES, TEMPLATE, dataset=DATASET)
    assert not composed.base_mode
    with torch.no_grad():
        composed.linear_probe_proj.weight.mul_(100)  # the head is not used: changing it changes nothing
        naive = composed(batch.images).logits
        assert naive.shape == (4, len(OTHER_CLASSNAMES))
        assert torch.equal(naive, plain(batch.images).logits)
        for m in (composed, plain):
            m.begin_eval()
        assert torch.equal(composed.predict(batch.images), plain.predict(batch.images))
        for m in (composed, plain):
            m.end_eval()
    # and back on the training classes the head is used again
    composed.set_classnames(CLASSNAMES, TEMPLATE, dataset=DATASET)
    assert composed.base_mode


@pytest.mark.numerics
@pytest.mark.parametrize("inner", INNERS)
def test_base_class_logits_are_the_fused_ones(inner, batch):
    """Training classes: (1 − w)·similarity + w·head(FiLM_img(image features)) (elp_coop.py `_forward_base`), on the
    naive and the fast path; without test-time fusion the head alone."""
    composed, plain = twins(inner)
    with torch.no_grad():
        sim = plain(batch.images).logits  # (B, C)
        head = head_logits(composed, image_features(plain, batch.images), composed.film_lp_img)  # (B, C)
        expected = (1 - W) * sim + W * head
        assert_close_scaled(composed(batch.images).logits, expected)
        composed.begin_eval()
        assert_close_scaled(composed.predict(batch.images), expected)
        composed.end_eval()
        composed.cfg.test_time_fusion = False
        assert_close_scaled(composed(batch.images).logits, head)


@pytest.mark.numerics
@pytest.mark.parametrize("inner", ["coop", "cocoop", "maple"])
def test_training_loss_is_the_reference_mix_on_label_text_and_image_rows(inner, batch):
    """(1 − w)·CE(similarity) + w·CE(head on [FiLM_text(text feature of each label); FiLM_img(image feature)], labels
    twice) (elp_coop.py `_forward_logits_linear_probe`, `_loss`; CoCoOp: image i's own text features,
    elp_cocoop.py)."""
    composed, plain = twins(inner)
    composed.train()
    plain.train()
    labels = batch.labels
    out = composed(batch.images, labels=labels)
    with torch.no_grad():
        img = image_features(plain, batch.images)  # (B, E)
        if inner == "cocoop":
            text = plain.instance_text_features(plain.instance_context(F.normalize(img, dim=-1)))  # (B, C, E)
            label_text = text[torch.arange(len(labels)), labels]  # (B, E)
        else:
            label_text = plain.text_features()[labels]  # (B, E)
        sim = plain(batch.images).logits
        rows = torch.cat(
            [
                head_logits(composed, label_text, composed.film_lp_text),
                head_logits(composed, img, composed.film_lp_img),
            ]
        )  # (2B, C)
        head_loss = W * F.cross_entropy(rows, torch.cat([labels, labels]))
    assert_close_scaled(out.logits.detach(), sim)
    assert_close_scaled(out.losses["head"].detach(), head_loss)
    total = out.ce_weight * F.cross_entropy(out.logits, labels) + out.losses["head"]
    expected = (1 - W) * F.cross_entropy(sim, labels) + head_loss
    assert_close_scaled(total.detach(), expected)


@pytest.mark.numerics
def test_kgcoop_keeps_its_knowledge_loss_unweighted_beside_the_mix(batch):
    """elp_kgcoop.py: 0.3·CE + 0.7·CE_head + W·(1 − mean cos), the KgCoOp term not scaled by the mix."""
    composed, plain = twins("kgcoop", ctx_init=False)  # a random context: the knowledge loss is above 0
    composed.train()
    plain.train()
    out = composed(batch.images, labels=batch.labels)
    ref = plain(batch.images)
    assert float(ref.losses["kg"].detach()) > 1e-4
    assert_close_scaled(out.losses["kg"].detach(), ref.losses["kg"].detach())
    assert set(out.losses) == {"kg", "head"} and out.ce_weight == pytest.approx(1 - W)


@pytest.mark.numerics
def test_fast_path_gradients_equal_the_naive_paths(tmp_path):
    """Cached image features (the trainer's fast path for a frozen image tower) against images: the same loss parts
    and gradients of every parameter, the head and FiLM included."""
    bb = shared_tiny_backbone()
    b = make_batch(tmp_path, n=5)
    grads = []
    for cached in (False, True):
        method = build_method("coop+dept")
        perturb(method)
        method.train()
        feats = bb.encode_image(b.images).detach() if cached else None
        out = method(None if cached else b.images, image_features=feats, labels=b.labels)
        (out.ce_weight * F.cross_entropy(out.logits, b.labels) + out.losses["head"]).backward()
        grads.append({n: p.grad.clone() for n, p in method.named_parameters() if p.requires_grad})
    assert set(grads[0]) == set(grads[1])
    for name in grads[0]:
        assert_close_scaled(grads[1][name], grads[0][name], GRAD, msg=name)


def test_head_rows_follow_the_label_space():
    """The training classes (in order or not: by name), ImageNet's variants for an ImageNet-trained head (-A/-R: the
    rows of their classes, the reference's `load_model` clipping), and nothing else."""
    train = ["tench", "goldfish", "great white shark", "tiger shark"]
    assert head_rows("imagenet", train, "imagenet", train) == (0, 1, 2, 3)
    assert head_rows("imagenet", train, "imagenet", ["tench", "goldfish"]) is None  # base-to-novel's other half
    assert head_rows("imagenet", train, "imagenet_v2", train) == (0, 1, 2, 3)
    assert head_rows("imagenet", train, "imagenet_a", ["goldfish", "tiger shark"]) == (1, 3)
    assert head_rows("imagenet", train, "imagenet_r", ["tiger shark", "tench"]) == (3, 0)
    assert head_rows("imagenet", train, "imagenet_a", ["goldfish", "axolotl"]) is None  # a class the head lacks
    assert head_rows("imagenet", train, "caltech101", train) is None  # cross-dataset targets: similarity only
    assert head_rows("dtd", train, "imagenet_sketch", train) is None  # not ImageNet's head


# --- learning rates ------------------------------------------------------------------------------------------------
def test_group_learning_rates_are_in_the_per_epoch_history_with_dassls_warm_up(tmp_path):
    """trainers/optim.py: the new layers at LR × 6.5, the rest at LR; Dassl's constant warm-up runs every group at
    1e-5 in epoch 1; the parts of the loss add up to it every epoch."""
    bb = shared_tiny_backbone()
    items = write_items(tmp_path, CLASSNAMES, n=10)
    method = build_method("coop+dept")
    cfg = TrainConfig(epochs=3, batch_size=4, lr=0.01, warmup_epochs=1, warmup_lr=1e-5)
    head_before = method.linear_probe_proj.weight.detach().clone()
    result = trainer.fit(method, items, cfg, bb.test_transform, torch.device("cpu"), "fp32", seed=1)
    first, second, third = result.history
    assert first["lr_coop"] == pytest.approx(1e-5) and first["lr_dept"] == pytest.approx(1e-5)
    assert second["lr_coop"] == pytest.approx(0.01) and second["lr_dept"] == pytest.approx(0.01 * LR_EXP)
    cos = 0.5 * (1 + math.cos(math.pi / 3))
    assert third["lr_dept"] == pytest.approx(0.01 * LR_EXP * cos) and third["lr_coop"] == pytest.approx(0.01 * cos)
    for h in result.history:
        assert h["loss_ce"] > 0 and h["loss_head"] > 0
        assert h["loss"] == pytest.approx(h["loss_ce"] + h["loss_head"], rel=1e-5)
    assert not torch.equal(method.linear_probe_proj.weight.detach(), head_before)


def test_set_dept_reaches_every_composition_and_the_narrowest_scope_wins():
    user = {"dept.head_weight": "0.5", "coop+dept.head_weight": "0.6", "lr": "0.1", "maple.n_ctx": "3"}
    assert method_overrides(METHODS.get("coop+dept"), user) == {"head_weight": "0.6", "lr": "0.1"}
    assert method_overrides(METHODS.get("maple+dept"), user) == {"head_weight": "0.5", "lr": "0.1"}
    assert method_overrides(METHODS.get("coop"), user) == {"lr": "0.1"}  # not composed with dept
    assert method_overrides(METHODS.get("maple"), user) == {"lr": "0.1", "n_ctx": "3"}  # maple's scope: not maple+dept
    assert with_plugins("coop,maple", "dept") == "coop+dept,maple+dept"


def test_settings_the_head_makes_moot_are_refused_and_ablations_drop_film_or_fusion():
    cls = METHODS.get("coop+dept")
    ignored = cls.ignored_settings(cls.make_config({"head_weight": 0.0}))
    assert {"lr_mult", "film"} <= set(ignored)
    assert cls.ablations["film"] == {"film": False} and cls.ablations["fusion"] == {"test_time_fusion": False}
    assert "init" in cls.ablations  # the inner's ablations stay
    no_film = build_method("coop+dept", film=False)
    assert no_film.film_lp_img is None and no_film.n_trainable() == build_method("coop+dept").n_trainable() - 4 * (
        no_film.backbone.embed_dim
    )


# --- parameter counts ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("inner", INNERS)
def test_trainable_parameters_are_the_inners_plus_film_and_head_by_formula(inner):
    """FiLM: 2 × (scale + bias) of the embed dim; head: Linear(E, C_train) (elp_coop.py); the inner's own count."""
    composed, plain = build_method(f"{inner}+dept"), build_method(inner)
    e, c = composed.backbone.embed_dim, len(CLASSNAMES)
    assert composed.n_trainable() == plain.n_trainable() + 2 * 2 * e + (e * c + c)


def test_trainable_parameters_on_vit_b16_equal_the_reference_count():
    """docs/methods/dept.md §15.6: CoOp+DePT on ImageNet's 500 base classes (ctx 16 × 512 + FiLM 2,048 + head
    512·500 + 500) and MaPLe+DePT on EuroSAT's 5 (3,555,072 + 2,048 + 2,565), the `paper` recipes."""
    bb = vit_b16_backbone()
    coop = METHODS.get("coop+dept")
    cfg = coop.make_config({k: v for k, v in coop.recipe("paper", "base2novel", 16, "imagenet").items() if k in (
        "n_ctx", "ctx_init")})  # fmt: skip
    method = coop(bb, [f"class {i}" for i in range(500)], cfg, template=TEMPLATE, dataset="imagenet")
    assert method.n_trainable() == 16 * 512 + 2048 + 512 * 500 + 500 == 266_740
    maple = METHODS.get("maple+dept")
    recipe = maple.recipe("paper", "base2novel", 16, "eurosat")
    cfg = maple.make_config({k: recipe[k] for k in ("n_ctx", "ctx_init", "prompt_depth")})
    method = maple(bb, [f"class {i}" for i in range(5)], cfg, template=TEMPLATE, dataset="eurosat")
    assert method.n_trainable() == 3_555_072 + 2048 + 2565


@pytest.mark.numerics
def test_reference_fp16_keeps_film_fp32_and_casts_the_head_to_fp16(batch):
    """elp_maple.py FiLM is created without a dtype and never converted; the head is `.type(dtype)` (fp16)."""
    bb = load_backbone("tiny", precision=REFERENCE_FP16)
    method = trainer.prepare_method(build_method("coop+dept", backbone=bb), torch.device("cpu"), REFERENCE_FP16)
    assert method.film_lp_img.scale.dtype == torch.float32 and method.film_lp_text.bias.dtype == torch.float32
    assert method.linear_probe_proj.weight.dtype == torch.float16
    fp32 = build_method("coop+dept")  # the same weights in fp32
    with torch.no_grad():
        feats = bb.encode_image(batch.images.to(bb.dtype))  # (B, E) fp16
        assert method(None, image_features=feats).logits.shape == (4, len(CLASSNAMES))
        got = method._head(method._film(method.film_lp_img, feats))  # fp16 features through the fp16 head
        assert got.dtype == torch.float16
        want = head_logits(fp32, feats.float(), fp32.film_lp_img)  # the same head in fp32
    assert_close_scaled(got.float(), want, FP16)


def test_film_is_identity_at_init_and_casts_to_the_features_dtype():
    film = FiLM(8)
    x = torch.randn(3, 8, dtype=torch.float16)
    assert film(x).dtype == torch.float16 and torch.equal(film(x), x)


# --- recipes, provenance, published numbers ------------------------------------------------------------------------
def test_paper_recipes_are_depts_reruns_of_the_inner_methods_with_provenance():
    coop = METHODS.get("coop+dept").recipe("paper", "base2novel", 16, "dtd")
    assert {k: coop[k] for k in ("n_ctx", "ctx_init", "batch_size", "lr", "epochs")} == {
        "n_ctx": 16, "ctx_init": "", "batch_size": 4, "lr": 0.0035, "epochs": 10}  # fmt: skip
    cocoop = METHODS.get("cocoop+dept").recipe("paper", "base2novel", 16, "dtd")
    assert (cocoop["batch_size"], cocoop["lr"], cocoop["epochs"]) == (1, 0.002, 10)
    kg = METHODS.get("kgcoop+dept").recipe("paper", "xd", 16, "imagenet")
    assert (kg["w"], kg["batch_size"], kg["lr"], kg["epochs"]) == (2.0, 4, 0.0035, 10)
    maple = METHODS.get("maple+dept").recipe("paper", "xd", 16, "imagenet")
    assert (maple["prompt_depth"], maple["batch_size"], maple["lr"], maple["epochs"]) == (9, 4, 0.0035, 10)
    with pytest.raises(UserError, match="no 'paper' recipe for protocol 'few_shot'"):
        METHODS.get("coop+dept").recipe("paper", "few_shot", 16, "dtd")
    for inner, trainer_name in (("coop", "CoOp"), ("cocoop", "CoCoOp"), ("kgcoop", "KgCoOp"), ("maple", "MaPLe")):
        prov = METHODS.get(f"{inner}+dept").provenance["paper"]
        assert prov.repo == "Koorye/DePT" and prov.commit.startswith("d4ff416") and set(prov.configs) == {
            "base2novel", "xd"}  # fmt: skip
        assert all(c.startswith(f"configs/trainers/ExtrasLinearProbe{trainer_name}/") for c in prov.configs.values())


def test_report_vs_paper_finds_depts_published_averages():
    from mugcp_bench.report.published import load_published, lookup

    published = load_published()
    expected = {  # Koorye/DePT README, examples/base_to_new_performance.png (average over 11 datasets)
        "coop+dept": [83.66, 71.82, 77.29],
        "cocoop+dept": [83.80, 72.89, 77.97],
        "kgcoop+dept": [83.62, 75.04, 79.10],
        "maple+dept": [84.85, 74.82, 79.52],
    }
    for method, values in expected.items():
        got = [lookup(published, method, "base2novel", "average", m) for m in ("avg_base", "avg_novel", "avg_hm")]
        assert [r["value"] for r in got] == values, method
        assert all("Koorye/DePT" in r["source"] for r in got)
    xd = lookup(published, "maple+dept", "cross_dataset", "average", "avg")
    assert xd["value"] == 64.56
    assert lookup(published, "coop+dept", "domain_generalization", "imagenet_a", "acc")["value"] == 51.57


# --- the command line ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return build_miniature(tmp_path_factory.mktemp("data"), ["dtd"])


def run_args(data_root, *extra: str) -> list[str]:
    base = ["run", "--datasets", "dtd", "--data-root", str(data_root), "--backbone", "tiny", "--pretrained", "random"]
    return [*base, "--recipe", "toy", "--seeds", "1", "--shots", "1", *extra]


def test_plugin_flag_plans_each_method_wrapped(data_root, tmp_path, capsys):
    args = run_args(data_root, "--methods", "coop,maple", "--plugin", "dept", "--dry-run", "--json")
    code, out, err = cli([*args, "--results-dir", str(tmp_path)], capsys)
    assert code == 0, err
    assert json.loads(out)["runs_planned"] == ["coop+dept dtd base 1-shot seed 1", "maple+dept dtd base 1-shot seed 1"]


BAD = [
    (["--methods", "zsclip", "--plugin", "dept"], "the plug-in dept wraps coop, cocoop, kgcoop, maple; 'zsclip'"),
    (["--methods", "mugcp+dept"], "the plug-in dept wraps coop, cocoop, kgcoop, maple; 'mugcp' is not one"),
    (["--methods", "coop", "--plugin", "dpt"], "unknown plug-in 'dpt'. Did you mean 'dept'"),
    (["--methods", "coop", "--set", "dept.head_weight=0.5"], "no method of this sweep (coop) is composed with"),
    (["--methods", "coop+dept", "--set", "dept.n_ctx=2"], "scoped to it: --set coop+dept.n_ctx=2"),
    (["--methods", "coop,coop+dept", "--set", "head_weight=0.5"], "scope it: --set dept.head_weight=0.5"),
    (["--methods", "coop+dept", "--set", "dept.head_weight=1.5"], "head_weight"),
    (
        ["--methods", "coop+dept", "--set", "head_weight=0", "--set", "lr_mult=2"],
        "lr_mult",
    ),  # a setting the model then ignores
]


@pytest.mark.parametrize("extra,needle", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_plugin_input_is_one_line_exit_2(extra, needle, data_root, tmp_path, capsys):
    code, out, err = cli([*run_args(data_root, *extra), "--results-dir", str(tmp_path / "r")], capsys)
    assert code == 2, (out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle in lines[0], lines[0]
    assert not (tmp_path / "r").exists() or not records(tmp_path / "r")


@pytest.mark.slow
def test_toy_runs_of_every_composition_record_the_composition_and_the_report_names_it(tmp_path, capsys):
    """`run_sweep` on the quick toy world (1 shot, 2 epochs): coop and the four compositions complete and are
    evaluated on base and novel classes; the run key, the history (lr per group, loss parts) and the report name
    each composition as its own entry."""
    from mugcp_bench import run_sweep

    run_sweep(
        methods=with_plugins("coop,cocoop,kgcoop,maple", "dept") + ",coop",
        protocols="base2novel",
        datasets="toy_shapes",
        shots="1",
        seeds="1",
        sets={"epochs": 2},
        quick_toy=True,
        results_dir=tmp_path,
    )
    recs = {r["key"]["method"]: r for r in records(tmp_path)}
    assert set(recs) == {"coop", *(f"{m}+dept" for m in INNERS)}
    for name, r in recs.items():
        assert r["status"] == "complete", (name, r.get("reason"))
        assert {e["classes"] for e in r["evaluations"]} == {"base", "novel"}
        if name == "coop":
            assert "lr_dept" not in r["history"][-1]
            continue
        inner = name.split("+")[0]
        for h in r["history"]:
            assert h["loss"] == pytest.approx(h["loss_ce"] + h["loss_head"] + h.get("loss_kg", 0.0), rel=1e-5)
        last = r["history"][-1]
        assert last["lr_dept"] == pytest.approx(LR_EXP * last[f"lr_{inner}"])
    code, out, err = cli(["report", "--results-dir", str(tmp_path), "--format", "csv"], capsys)
    assert code == 0, err
    rows = out.splitlines()
    named = {m for m in ("coop", *(f"{i}+dept" for i in INNERS)) if any(f",{m}," in f",{row}," for row in rows)}
    assert named == {"coop", *(f"{i}+dept" for i in INNERS)}, out[:2000]
