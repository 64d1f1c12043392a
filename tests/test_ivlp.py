"""IVLP, deep language-only prompting and VPT-deep: parameter counts against the reference code's, IVLP = MaPLe without
coupling, prompt placement against hand-written layer loops (unequal lengths and depths), the fixed VPT text, honest
settings, fast = naive (logits and one-step gradients), per-epoch loss records, recipes and provenance."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mugcp_bench.engine import trainer
from mugcp_bench.errors import UserError
from mugcp_bench.methods.base import TrainConfig, split_overrides
from mugcp_bench.methods.ivlp import IVLP, VPT_TEXT_TEMPLATE, LanguageDeep, VPTDeep
from mugcp_bench.model.backbone import REFERENCE_FP16, load_backbone
from mugcp_bench.registry import METHODS
from tests.method_harness import (
    CLASSNAMES,
    build_method,
    load_images,
    make_batch,
    shared_tiny_backbone,
    vit_b16_backbone,
    write_items,
)
from tests.numerics import GRAD, assert_close_scaled, assert_differs

FAMILY = ("ivlp", "language_deep", "vpt_deep")


@pytest.fixture
def batch(tmp_path):
    return make_batch(tmp_path, n=3)


def perturbed(name: str, seed: int = 1, **overrides):
    """A method whose every parameter is moved off its initial value (so layers are distinguishable)."""
    method = build_method(name, **overrides)
    perturb(method, seed)
    return method


def perturb(method, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in method.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


def step(method, images, labels) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits and the gradient of every trainable tensor after one training forward + backward."""
    method.train()
    method.zero_grad()
    out = method(images)
    (F.cross_entropy(out.logits, labels) + sum(out.losses.values())).backward()
    method.eval()
    return out.logits.detach(), {n: p.grad.clone() for n, p in method.named_parameters() if p.requires_grad}


# --- parameter counts ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "recipe", "reference_formula", "expected"),
    [
        # ctx 2x512 + 11 text VPT_shallow 2x512 + VPT 2x768 + 11 vision VPT_shallow 2x768 (independentVL.py:204-210)
        ("ivlp", "paper", 12 * 2 * 512 + 12 * 2 * 768, 30_720),
        ("ivlp", "promptsrc", 9 * 4 * 512 + 9 * 4 * 768, 46_080),  # input + blocks 1 … 8 in both towers
        ("language_deep", "paper", 12 * 4 * 512, 24_576),  # ctx + 11 text VPT_shallow, no vision prompt
        ("vpt_deep", "paper", 12 * 8 * 768, 73_728),  # VPT + 11 vision VPT_shallow (vpt.py:137-145)
    ],
)
def test_trainable_parameters_on_vit_b16_equal_the_reference_code(name, recipe, reference_formula, expected):
    cls = METHODS.get(name)
    cfg, _ = split_overrides(cls, cls.recipe(recipe, "base2novel", 16, "caltech101"))
    method = cls(vit_b16_backbone(), ["cat", "dog"], cls.make_config(cfg))
    assert method.n_trainable() == reference_formula == expected


# --- IVLP is MaPLe without coupling --------------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [1, 3, 4])
def test_ivlp_equals_maple_without_coupling(depth, tmp_path):
    """Equal lengths and depths: the same tensors from the same seed, the same logits and one-step gradients."""
    shared = {"n_ctx_text": 2, "n_ctx_vision": 2, "depth_text": depth, "depth_vision": depth}
    ivlp = build_method("ivlp", **shared)
    maple = build_method("maple", coupling=False, prompt_depth=depth)
    ivlp_state, maple_state = ivlp.trainable_state(), maple.trainable_state()
    assert ivlp_state.keys() == maple_state.keys()
    assert all(torch.equal(ivlp_state[k], maple_state[k]) for k in ivlp_state)
    perturb(ivlp)
    maple.load_trainable_state(ivlp.trainable_state())
    items = write_items(tmp_path, CLASSNAMES, n=4)
    images = load_images(items, shared_tiny_backbone())
    labels = torch.tensor([d.label for d in items])
    ivlp_logits, ivlp_grads = step(ivlp, images, labels)
    maple_logits, maple_grads = step(maple, images, labels)
    assert torch.equal(ivlp_logits, maple_logits)
    assert ivlp_grads.keys() == maple_grads.keys()
    for k in ivlp_grads:
        assert torch.equal(ivlp_grads[k], maple_grads[k]), k
    ivlp.begin_eval()
    maple.begin_eval()
    assert torch.equal(ivlp.predict(images), maple.predict(images))


# --- placement against hand-written loops ---------------------------------------------------------------------------
def test_context_of_two_keeps_of_a_fixed_and_four_take_every_word():
    bb = shared_tiny_backbone()
    words = bb.embed_tokens(bb.tokenize(["a photo of a"]))[0]
    two = build_method("ivlp")  # toy recipe: 2 + 2
    assert two.prefix == "a photo of a" and torch.equal(two.ctx.detach(), words[1:3])
    tokens = bb.tokenize([f"a photo of a {c.replace('_', ' ')}." for c in CLASSNAMES])[:, : two.prompts.tokens.shape[1]]
    with torch.no_grad():
        assert torch.equal(two.prompts.build(two.ctx), bb.embed_tokens(tokens))  # "of a {class}." fixed
    four = build_method("language_deep")  # 4 tokens: the whole "a photo of a" learned
    assert torch.equal(four.ctx.detach(), words[1:5])
    random = build_method("ivlp", ctx_init="", n_ctx_text=6)
    assert random.prefix == "X X X X X X"


@pytest.mark.numerics
def test_text_tower_matches_a_hand_written_loop():
    method = perturbed("ivlp", n_ctx_text=3, depth_text=3, n_ctx_vision=2, depth_vision=2, ctx_init="a photo of a")
    bb, n = shared_tiny_backbone(), 3
    with torch.no_grad():
        x, mask, eot = bb.text_embed(method.prompts.build(method.ctx), method.prompts.tokens)
        for i in range(bb.text_layers):
            if i in (1, 2):  # depth 3: blocks 1 and 2 get their own prompt in place of positions 1 … n
                x = x.clone()
                x[:, 1 : 1 + n] = method.compound_prompts_text[i - 1]
            x = bb.text_block(i, x, mask)
        assert_close_scaled(method.text_features(), bb.text_head(x, eot))


@pytest.mark.numerics
@pytest.mark.parametrize("round_fp16", [False, True])
def test_vision_tower_matches_a_hand_written_loop(round_fp16, batch):
    """VPT-deep: 3 tokens appended before ln_pre, the last 3 replaced before blocks 1 and 2 (depth 3); with
    `round_prompts_fp16` each prompt is expanded over the batch, then cast to fp16 and back, as the reference's
    ``VPT.expand(B, …).half()`` in its fp32 model (values and per-image gradients rounded). Features and gradients."""
    method = perturbed("vpt_deep", n_ctx_vision=3, depth_vision=3, round_prompts_fp16=round_fp16)
    bb, n, b = shared_tiny_backbone(), 3, batch.images.shape[0]
    params = [method.vision_ctx, *method.compound_prompts_vision]
    leaves = [p.detach().clone().requires_grad_(True) for p in params]

    def used(p: torch.Tensor) -> torch.Tensor:
        expanded = p.unsqueeze(0).expand(b, -1, -1)
        return expanded.half().float() if round_fp16 else expanded

    x = bb.vision_embed(batch.images, used(leaves[0]))
    assert x.shape[1] == bb.n_vision_tokens + n
    for i in range(bb.vision_layers):
        if i in (1, 2):
            x = torch.cat([x[:, :-n], used(leaves[i])], dim=1)
        x = bb.vision_block(i, x)
    expected = bb.vision_head(x)
    got = method.image_features(batch.images)
    assert_close_scaled(got.detach(), expected.detach())
    weights = torch.randn(expected.shape, generator=torch.Generator().manual_seed(0))
    (expected * weights).sum().backward()
    (got * weights).sum().backward()
    for p, leaf in zip(params, leaves):
        assert_close_scaled(p.grad, leaf.grad, GRAD)
    if round_fp16:  # the rounding is a real change of the values
        assert not torch.equal(method.vision_ctx, method.vision_ctx.half().float())
        with torch.no_grad():
            method.round_fp16 = False
            assert not torch.equal(method.image_features(batch.images), got.detach())


@pytest.mark.numerics
@pytest.mark.parametrize("j", [1, 2])
def test_every_deep_prompt_is_used_in_its_own_tower_only(j, batch):
    """A random change of one deep prompt (a constant shift would vanish in the blocks' LayerNorms) changes its own
    tower's features beyond rounding and leaves the other tower's bit-identical: no coupling."""
    method = perturbed("ivlp", depth_text=3, depth_vision=3)
    gen = torch.Generator().manual_seed(j)
    with torch.no_grad():
        text0, image0 = method.text_features(), method.image_features(batch.images)
        text_prompt = method.compound_prompts_text[j - 1]
        text_prompt.add_(torch.randn(text_prompt.shape, generator=gen))
        text1 = method.text_features()
        assert_differs(text1, text0)
        assert torch.equal(method.image_features(batch.images), image0)
        vision_prompt = method.compound_prompts_vision[j - 1]
        vision_prompt.add_(torch.randn(vision_prompt.shape, generator=gen))
        assert_differs(method.image_features(batch.images), image0)
        assert torch.equal(method.text_features(), text1)


# --- the presets: frozen image tower, fixed text -------------------------------------------------------------------
def test_language_deep_leaves_the_image_tower_untouched(batch):
    method = perturbed("language_deep")
    assert LanguageDeep.frozen_image_path
    assert not any(k.startswith(("vision_ctx", "compound_prompts_vision")) for k in method.trainable_state())
    bb = shared_tiny_backbone()
    with torch.no_grad():
        assert torch.equal(method.image_features(batch.images), bb.encode_image(batch.images))
    method.train()
    assert not method.image_features(batch.images).requires_grad  # no graph through the frozen tower


@pytest.mark.numerics
def test_vpt_text_is_a_photo_of_a_class_for_every_dataset(batch):
    bb = shared_tiny_backbone()
    method = build_method("vpt_deep")
    method.set_classnames(CLASSNAMES, "a photo of a {}, a type of texture.", "dtd")  # the dataset template is unused
    expected = bb.text_features([VPT_TEXT_TEMPLATE.format(c.replace("_", " ")) for c in CLASSNAMES], normalize=False)
    assert_close_scaled(method.text_features(), expected)
    assert not any(k.startswith(("ctx", "compound_prompts_text")) for k in method.trainable_state())
    method.set_classnames(["orange cross", "pink circle"])
    assert method.text_features().shape == (2, bb.embed_dim)


@pytest.mark.numerics
def test_fast_evaluation_encodes_class_text_once(batch, monkeypatch):
    method = perturbed("ivlp")
    with torch.no_grad():
        naive = method(batch.images).logits
    method.begin_eval()

    def no_text(*args, **kwargs):
        raise AssertionError("predict re-encoded the class prompts")

    monkeypatch.setattr(shared_tiny_backbone(), "encode_text", no_text)
    assert_close_scaled(method.predict(batch.images), naive)
    with pytest.raises(ValueError, match="images"):
        method(None, image_features=torch.zeros(3, shared_tiny_backbone().embed_dim))


# --- settings a design would ignore are refused --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "overrides", "message"),
    [
        ("ivlp", {"depth_vision": "0"}, "n_ctx_vision=2 has no effect with depth_vision=0"),
        ("ivlp", {"n_ctx_vision": "0"}, "n_ctx_vision must be at least 1 with depth_vision >= 1"),
        ("ivlp", {"n_ctx_text": "8"}, "ctx_init 'a photo of a' is used only with n_ctx_text <= 4"),
        ("ivlp", {"ctx_init": "a_photo", "n_ctx_text": "4"}, "has 2 tokens, fewer than n_ctx_text=4"),
        ("ivlp", {"depth_text": "0"}, "depth_text must be in 1 … 4"),
        ("ivlp", {"depth_vision": "5"}, "depth_vision must be in 0 … 4"),
        ("vpt_deep", {"depth_vision": "0"}, "depth_vision must be in 1 … 4"),
        ("vpt_deep", {"ctx_init": "a photo of a"}, "unknown setting 'ctx_init' for method 'vpt_deep'"),
        ("language_deep", {"n_ctx_vision": "2"}, "unknown setting 'n_ctx_vision' for method 'language_deep'"),
    ],
)
def test_settings_the_design_ignores_are_one_line_errors(name, overrides, message):
    cls = METHODS.get(name)
    with pytest.raises(UserError) as exc:
        m_keys, _ = split_overrides(cls, overrides)
        build_method(name, **m_keys)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_ivlp_without_vision_prompts_is_language_only_prompting(batch):
    """The `vision` ablation (depth_vision=0, n_ctx_vision=0) is the reference's language-only design."""
    ablated = build_method("ivlp", **IVLP.ablations["vision"])
    assert not any(k.startswith(("vision_ctx", "compound_prompts_vision")) for k in ablated.trainable_state())
    lp = build_method("language_deep", n_ctx_text=2, depth_text=3)
    lp.load_trainable_state(ablated.trainable_state())
    with torch.no_grad():
        assert torch.equal(ablated(batch.images).logits, lp(batch.images).logits)


# --- fast path = naive path ----------------------------------------------------------------------------------------
CASES = [
    ("ivlp", {}),
    ("ivlp", {"n_ctx_text": 3, "depth_text": 2, "n_ctx_vision": 4, "depth_vision": 3}),  # unequal lengths and depths
    ("ivlp", {"ctx_init": "", "n_ctx_text": 6}),  # random context, prefix "X X X X X X"
    ("language_deep", {}),
    ("vpt_deep", {}),
    ("vpt_deep", {"round_prompts_fp16": False}),
]


@pytest.mark.numerics
@pytest.mark.parametrize(("name", "overrides"), CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_fast_path_equals_naive_path(name, overrides, tmp_path):
    """Our path (EOT cut, shared prefix, fused attention, text once per class set, cached image features where the
    tower is frozen) against the reference's (full-length whole rows, open_clip's blocks, forward per batch):
    logits and the gradients of one training step."""
    fast_bb, naive_bb = load_backbone("tiny"), load_backbone("tiny")
    naive_bb.eot_truncation = naive_bb.fused_attention = naive_bb.prefix_sharing = False
    classes = (*CLASSNAMES, "very long and oddly specific multi word class name")
    items = write_items(tmp_path, classes, n=6, seed=2)
    fast = build_method(name, backbone=fast_bb, classnames=classes, **overrides)
    naive = build_method(name, backbone=naive_bb, classnames=classes, **overrides)
    perturb(fast)
    naive.load_trainable_state(fast.trainable_state())
    images, labels = load_images(items, fast_bb), torch.tensor([d.label for d in items])
    fast_logits, fast_grads = step(fast, images, labels)
    naive_logits, naive_grads = step(naive, images, labels)
    assert_close_scaled(fast_logits, naive_logits)
    assert fast_grads.keys() == naive_grads.keys() and fast_grads
    for k, g in naive_grads.items():
        assert_close_scaled(fast_grads[k], g, GRAD)
    feats = fast_bb.encode_image(images) if fast.frozen_image_path else None
    fast.begin_eval()
    got = fast.predict(None if feats is not None else images, image_features=feats)
    fast.end_eval()
    with torch.no_grad():
        assert_close_scaled(got, naive(images).logits)


@pytest.mark.parametrize("name", FAMILY)
def test_the_loss_is_recorded_per_epoch(name, tmp_path):
    bb = shared_tiny_backbone()
    items = write_items(tmp_path, CLASSNAMES, n=10)
    cfg = TrainConfig(epochs=2, batch_size=4, lr=0.01)
    result = trainer.fit(build_method(name), items, cfg, bb.test_transform, torch.device("cpu"), "fp32", seed=1)
    assert [h["epoch"] for h in result.history] == [1, 2]
    for h in result.history:  # cross-entropy is the only loss of all three
        assert {k for k in h if k.startswith("loss")} == {"loss", "loss_ce"} and h["loss"] == h["loss_ce"] > 0


# --- recipes, provenance, precision --------------------------------------------------------------------------------
def test_recipes_and_provenance():
    mpl = IVLP.recipe("paper", "base2novel", 16, "dtd")
    assert {k: mpl[k] for k in ("n_ctx_text", "n_ctx_vision", "depth_text", "depth_vision", "lr", "epochs")} == {
        "n_ctx_text": 2,
        "n_ctx_vision": 2,
        "depth_text": 12,
        "depth_vision": 12,
        "lr": 0.0035,
        "epochs": 5,
    }
    src = IVLP.recipe("promptsrc", "base2novel", 16, "dtd")
    assert (src["n_ctx_text"], src["n_ctx_vision"], src["depth_text"], src["depth_vision"]) == (4, 4, 9, 9)
    assert (src["lr"], src["epochs"], src["batch_size"]) == (0.0025, 20, 4)
    lp = LanguageDeep.recipe("paper", "xd", 16, "imagenet")
    assert (lp["n_ctx_text"], lp["depth_text"], lp["lr"], lp["epochs"]) == (4, 12, 0.0025, 5)
    vpt = VPTDeep.recipe("paper", "base2novel", 16, "dtd")
    assert (vpt["n_ctx_vision"], vpt["depth_vision"], vpt["lr"], vpt["batch_size"]) == (8, 12, 0.0025, 4)
    with pytest.raises(UserError, match="no 'promptsrc' recipe for protocol 'xd'"):
        IVLP.recipe("promptsrc", "xd", 16, "imagenet")
    for cls in (IVLP, LanguageDeep, VPTDeep):
        with pytest.raises(UserError, match="few_shot"):
            cls.recipe("paper", "few_shot", 16, "dtd")
        for recipe, prov in cls.provenance.items():
            assert set(prov.configs) == set(cls.recipes[recipe]) and len(prov.commit) == 40
    assert IVLP.provenance["promptsrc"].repo == "muzairkhattak/PromptSRC"
    assert {IVLP.report_order, LanguageDeep.report_order, VPTDeep.report_order} == {350, 360, 370}


@pytest.mark.parametrize(
    ("name", "fp32"),
    [
        ("ivlp", {"compound_prompts_text", "vision_ctx", "compound_prompts_vision"}),
        ("language_deep", {"compound_prompts_text"}),
        ("vpt_deep", {"vision_ctx", "compound_prompts_vision"}),
    ],
)
def test_reference_fp16_parameter_dtypes(name, fp32):
    """The reference's prompts inside CLIP (VPT, VPT_shallow) are fp32 parameters; the text context is fp16."""
    bb = load_backbone("tiny", precision=REFERENCE_FP16)
    method = trainer.prepare_method(build_method(name, backbone=bb), torch.device("cpu"), REFERENCE_FP16)
    for n, p in method.named_parameters():
        want = torch.float32 if n.split(".")[0] in fp32 else torch.float16
        assert p.dtype == want, n


# --- published numbers ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "base", "novel", "hm"),
    [("ivlp", 82.15, 74.07, 77.90), ("language_deep", 81.72, 73.81, 77.56), ("vpt_deep", 80.24, 73.43, 76.68)],
)
def test_report_vs_paper_finds_the_published_averages_under_the_registry_names(name, base, novel, hm):
    """The MaPLe repository's README averages (5-epoch configs), found for runs of these registry names."""
    from mugcp_bench.report.published import load_published, lookup

    published = load_published()
    got = [lookup(published, name, "base2novel", "average", m) for m in ("avg_base", "avg_novel", "avg_hm")]
    assert [r["value"] for r in got] == [base, novel, hm]
    assert all("multimodal-prompt-learning" in r["source"] for r in got)


# --- the toy world, end to end ---------------------------------------------------------------------------------------
TOY_PROTOCOLS = [
    ("base2novel", "toy_shapes", {("base2novel", "base"), ("base2novel", "novel")}),
    ("cross_dataset,domain_generalization", "toy_shapes,toy_objects_sketch", {("source", "all")}),
    ("few_shot", "toy_shapes", {("few_shot", "all")}),
]
# toy CLIP: text width 128, vision width 128; toy recipes: depth 3
TOY_PARAMS = {"ivlp": 3 * 2 * 128 + 3 * 2 * 128, "language_deep": 3 * 4 * 128, "vpt_deep": 3 * 8 * 128}


@pytest.mark.slow
@pytest.mark.parametrize(("protocols", "datasets", "expected"), TOY_PROTOCOLS, ids=[p[0] for p in TOY_PROTOCOLS])
def test_toy_world_run_per_protocol(protocols, datasets, expected, tmp_path):
    """`run_sweep` on the quick toy world with the `toy` recipes: every run completes, is evaluated where the
    protocol says and records its cross-entropy for every epoch."""
    import json

    from mugcp_bench import run_sweep

    run_sweep(
        methods=",".join(FAMILY),
        protocols=protocols,
        datasets=datasets,
        shots="1",
        seeds="1",
        sets={"epochs": 2, "batch_size": 16},  # a few steps per epoch: the path is what is tested
        quick_toy=True,
        results_dir=tmp_path,
    )
    records = {(r := json.loads(p.read_text()))["key"]["method"]: r for p in tmp_path.rglob("run.json")}
    assert set(records) == set(FAMILY)
    for name, record in records.items():
        assert record["status"] == "complete" and record["key"]["recipe"] == "toy", name
        assert record["trainable_params"] == TOY_PARAMS[name]
        assert expected <= {(e["protocol"], e["classes"]) for e in record["evaluations"]}
        assert [h["epoch"] for h in record["history"]] == [1, 2]
        assert all(h["loss_ce"] > 0 for h in record["history"])
