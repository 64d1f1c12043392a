"""DCP / CMPA plugin (methods/dcp.py): reference behaviour, presets, quirks and the ViT-B/16 parameter count."""

from __future__ import annotations

import pytest
import torch

from mugcp_bench.errors import UserError
from mugcp_bench.methods.base import get_method
from mugcp_bench.methods.dcp import DCP, DCPInstance, DCPPaper, injection_blocks
from mugcp_bench.model.backbone import load_backbone
from mugcp_bench.registry import METHODS
from tests.numerics import assert_close_scaled, assert_differs

CLASSES = ["cat", "dog", "sports car", "tree", "hot air balloon"]
# The tiny towers have 4 heads each; the reference rule width // 64 would give 1, so exercise multi-head CMPA.
HEADS = {"vision_heads": 4, "text_heads": 4}


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("tiny")


@pytest.fixture(scope="module")
def images():
    return torch.randn(7, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def build(backbone, name="dcp", seed=0, perturb=True, **overrides):
    """A method with non-trivial weights (prompts and CMPA moved away from their initialisation)."""
    cls = get_method(name)
    torch.manual_seed(seed)
    method = cls(backbone, CLASSES, cls.make_config({"n_ctx": 4, "depth": 3, **HEADS, **overrides}))
    if perturb:
        with torch.no_grad():
            for p in method.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return method


def text_half_names(method) -> set[str]:
    prefixes = ("proj_v2t.", "attn_t.", "ln_t1.", "ln_t2.", "mlp_t.")
    return {n for n, _ in method.named_parameters() if n.removeprefix("cmpa.").startswith(prefixes)}


def test_registry_presets_and_recipes():
    assert METHODS.get("cmpa") is DCP
    assert METHODS.get("dcp-paper") is DCPPaper and METHODS.get("dcp-instance") is DCPInstance
    base, paper, inst = DCP.make_config(), DCPPaper.make_config(), DCPInstance.make_config()
    assert (base.text_update, base.fusing, base.depth_semantics, base.share) == (False, "mean", "official", True)
    assert (base.n_ctx, base.depth) == (16, 9)
    assert paper.text_update and paper.fusing == "mean"
    assert inst.fusing == "none" and not inst.text_update
    for protocol in ("few_shot", "xd", "base2novel"):
        r = DCP.recipe("paper", protocol, 16, "imagenet")
        assert (r["batch_size"], r["lr"], r["epochs"], r["eval_batch_size"]) == (4, 0.0035, 20, 16)
        toy = DCPInstance.recipe("toy", protocol, 16, "toy")
        assert toy["n_ctx"] == 4 and toy["depth"] <= 3
    assert DCP.ablations == {"cmpa": {"cmpa": False}}


def test_instance_conditional_flags(backbone):
    assert not build(backbone, "dcp", perturb=False).instance_conditional
    assert build(backbone, "dcp-paper", perturb=False).instance_conditional
    assert not build(backbone, "dcp-instance", perturb=False).instance_conditional
    assert not build(backbone, "dcp-paper", perturb=False, cmpa=False).instance_conditional  # nothing to exchange


@pytest.mark.numerics
@pytest.mark.parametrize("fusing", ["mean", "first", "max"])
def test_batch_of_one_equals_instance(backbone, images, fusing):
    dcp = build(backbone, "dcp", fusing=fusing)
    inst = build(backbone, "dcp-instance", seed=1)
    inst.load_trainable_state(dcp.trainable_state())
    with torch.no_grad():
        batched = inst(images).logits  # (7, C): per-image CMPA
        for i in range(len(images)):
            single = dcp(images[i : i + 1]).logits  # (1, C): the batch "mean" is the image itself
            assert_close_scaled(single[0], batched[i])


@pytest.mark.numerics
def test_dcp_depends_on_batch_mates_instance_does_not(backbone, images):
    """Quirk 2 of the official code (docs/methods/dcp.md §6.4): the fused vision prompts mix a test batch's images."""
    batch_a, batch_b = images[[0, 1, 2, 3]], images[[0, 4, 5, 6]]
    dcp, inst = build(backbone, "dcp"), build(backbone, "dcp-instance")
    for method in (dcp, inst):
        method.begin_eval()
    a, b = dcp.predict(batch_a)[0], dcp.predict(batch_b)[0]
    assert_differs(a, b)
    assert_close_scaled(inst.predict(batch_a)[0], inst.predict(batch_b)[0])


@pytest.mark.numerics
def test_text_update_off_text_half_dead(backbone, images):
    """Official code: CMPA's text output is discarded, so its text half gets no gradient and text ignores images."""
    dcp = build(backbone, "dcp")
    dead = text_half_names(dcp)
    assert dead and all(not p.requires_grad for n, p in dcp.named_parameters() if n in dead)
    dcp(images[:4]).logits.logsumexp(-1).sum().backward()
    grads = {n: p.grad for n, p in dcp.named_parameters()}
    assert all(grads[n] is None for n in dead)
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n not in dead)
    with torch.no_grad():
        _, text_a = dcp.encode(images[:3])
        _, text_b = dcp.encode(images[3:])
        assert_close_scaled(text_a, text_b)
        before = dcp(images[:3]).logits
        for n, p in dcp.named_parameters():  # the text half has no effect at all
            if n in dead:
                p.add_(1.0)
        assert torch.equal(dcp(images[:3]).logits, before)  # the same computation: bit for bit


def test_text_update_on_text_half_trains(backbone, images):
    paper = build(backbone, "dcp-paper")
    live = text_half_names(paper)
    paper(images[:4]).logits.logsumexp(-1).sum().backward()
    assert live and all(p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0 for n, p in
                        paper.named_parameters() if n in live)  # fmt: skip
    with torch.no_grad():
        _, text_a = paper.encode(images[:3])
        _, text_b = paper.encode(images[3:6])
    assert_differs(text_a, text_b)  # text depends on the batch's fused vision prompts


@pytest.mark.numerics
def test_per_image_text_with_fusing_none(backbone, images):
    """fusing none + text update: every image gets its own text prompts, independent of its batch mates."""
    method = build(backbone, "dcp-instance", text_update=True)
    assert method.instance_conditional and method.per_image_text
    with torch.no_grad():
        _, text = method.encode(images[:3])
        assert text.shape == (3, len(CLASSES), backbone.embed_dim)
        batched = method(images[:3]).logits
        for i in range(3):
            assert_close_scaled(method(images[i : i + 1]).logits[0], batched[i])


def record_injections(method, monkeypatch, images, predict=False) -> list[int]:
    """Vision blocks preceded by a CMPA vision update, counted with hooks on the backbone and CMPA."""
    events: list = []
    bb = method.backbone
    original_block = type(bb).vision_block

    def vision_block(i, x, branch=None):
        events.append(("block", i))
        return original_block(bb, i, x, branch)

    monkeypatch.setattr(bb, "vision_block", vision_block)
    modules = [method.cmpa] if method.cfg.share else list(method.cmpa.values())
    for module in modules:
        original = module.update_vision

        def counted(v, t, _original=original):
            events.append(("cmpa",))
            return _original(v, t)

        monkeypatch.setattr(module, "update_vision", counted)
    with torch.no_grad():
        if predict:
            method.begin_eval()
            method.predict(images)
        else:
            method(images)
    monkeypatch.undo()
    injected = [e[1] for k, e in enumerate(events) if e[0] == "block" and k > 0 and events[k - 1] == ("cmpa",)]
    assert sum(e == ("cmpa",) for e in events) == len(injected)  # every update lands right before a block
    return injected


@pytest.mark.parametrize(
    "depth,semantics,expected",
    [(2, "official", [1, 2]), (2, "maple", [1]), (3, "official", [1, 2, 3]), (3, "maple", [1, 2]),
     (1, "official", [1]), (1, "maple", [])],
)  # fmt: skip
def test_depth_semantics(backbone, images, monkeypatch, depth, semantics, expected):
    """Official counter: injections at blocks 1 … J (J = 9 on ViT-B/16 → blocks 1 … 9); MaPLe counting: 1 … J − 1."""
    assert injection_blocks(backbone.vision_layers, depth, semantics) == expected
    if not expected:
        return
    for share in (True, False):
        method = build(backbone, "dcp", perturb=False, depth=depth, depth_semantics=semantics, share=share)
        assert record_injections(method, monkeypatch, images[:2]) == expected
        assert record_injections(method, monkeypatch, images[:2], predict=True) == expected
    assert injection_blocks(12, 9, "official") == list(range(1, 10))
    assert injection_blocks(12, 9, "maple") == list(range(1, 9))
    assert injection_blocks(12, 12, "official") == list(range(1, 12))


@pytest.mark.parametrize("semantics,most", [("official", 3), ("maple", 4)])
def test_a_depth_the_backbone_cannot_hold_is_refused_not_clipped(backbone, semantics, most):
    """The reference never runs out of blocks on ViT-B/16 (depth 9 of 12); on a smaller backbone the depth is refused
    with the largest one it holds, never clipped silently."""
    assert injection_blocks(backbone.vision_layers, most + 5, semantics) == injection_blocks(4, most, semantics)
    with pytest.raises(UserError, match=rf"depth must be at most {most} .* --set dcp.depth={most} or less"):
        build(backbone, "dcp", perturb=False, depth=most + 1, depth_semantics=semantics)
    build(backbone, "dcp", perturb=False, depth=most, depth_semantics=semantics)  # the largest one is fine


def test_share_false_creates_one_cmpa_per_injecting_block(backbone):
    method = build(backbone, "dcp-paper", perturb=False, share=False, depth=2)
    assert sorted(method.cmpa.keys()) == ["1", "2"]


def test_no_cmpa_ablation_parameter_set(backbone, images):
    full = build(backbone, "dcp", perturb=False)
    ablated = build(backbone, "dcp", perturb=False, **DCP.ablations["cmpa"])
    full_names = {n for n, _ in full.named_parameters()}
    ablated_names = {n for n, _ in ablated.named_parameters()}
    assert ablated_names == {"ctx_text", "ctx_visual"}
    assert full_names - ablated_names == {n for n in full_names if n.startswith("cmpa.")} != set()
    assert ablated.inject == [] and not hasattr(ablated, "cmpa")
    assert ablated(images[:2]).logits.shape == (2, len(CLASSES))


@pytest.mark.numerics
@pytest.mark.parametrize("name", ["dcp", "dcp-paper"])
def test_text_prompt_outputs_identical_across_classes(backbone, images, monkeypatch, name):
    """docs/methods/dcp.md §6.2: under the causal mask the text prompt slots do not see the class name."""
    method = build(backbone, name)
    seen: list[torch.Tensor] = []
    original = method.fuse_text

    def spy(t, groups=1):
        seen.append(t.detach().clone())
        return original(t, groups)

    monkeypatch.setattr(method, "fuse_text", spy)
    with torch.no_grad():
        method(images[:3])
    assert len(seen) == len(method.inject)
    for t in seen:  # (C, M, Dt)
        assert_close_scaled(t, t[:1].expand_as(t))
        fused = {mode: method._fuse(t, 0, mode) for mode in ("mean", "first", "max")}
        assert_close_scaled(fused["mean"], fused["first"])
        assert_close_scaled(fused["max"], fused["first"])


@pytest.mark.numerics
def test_predict_runs_only_the_vision_tower(backbone, images, monkeypatch):
    method = build(backbone, "dcp")
    method.begin_eval()
    calls = []
    original = type(backbone).text_block
    monkeypatch.setattr(backbone, "text_block", lambda i, x, m: calls.append(i) or original(backbone, i, x, m))
    fast = method.predict(images)
    assert calls == []
    assert_close_scaled(fast, method(images).logits.detach())
    method.set_classnames(CLASSES[:2])  # drops the cache: back to the naive path, new class count
    assert method.predict(images).shape == (len(images), 2)


def test_refuses_bad_settings(backbone):
    with pytest.raises(UserError, match="equal depths"):
        DCP(load_backbone("tiny-mismatch"), CLASSES, DCP.make_config())
    for bad in ({"fusing": "median"}, {"depth_semantics": "paper"}, {"depth": 0}, {"vision_heads": 5}):
        with pytest.raises(UserError):
            DCP(backbone, CLASSES, DCP.make_config(bad))


def test_parameter_count_vit_b16():
    """docs/methods/dcp.md §6.2 from the layer shapes of ViT-B/16 (Dv = 768, Dt = 512, M = 16, MLP ratio 4)."""
    dv, dt, m = 768, 512, 16
    mha = lambda d: 4 * d * d + 4 * d  # noqa: E731 - in_proj 3d² + 3d, out_proj d² + d
    ln = lambda d: 2 * d  # noqa: E731
    mlp = lambda d: (d * 4 * d + 4 * d) + (4 * d * d + d)  # noqa: E731
    vision_half = mha(dv) + 2 * ln(dv) + mlp(dv) + (dt * dv + dv)  # + W_t→v (512 → 768, bias)
    text_half = mha(dt) + 2 * ln(dt) + mlp(dt) + (dv * dt + dt)  # + W_v→t (768 → 512, bias)
    assert vision_half == 2_362_368 + 3_072 + 4_722_432 + 393_984 == 7_481_856
    assert text_half == 1_050_624 + 2_048 + 2_099_712 + 393_728 == 3_546_112
    prompts = m * dt + m * dv
    assert (vision_half + text_half, prompts) == (11_027_968, 20_480)

    bb = load_backbone("ViT-B-16")
    dcp = DCP(bb, ["a", "b"], DCP.make_config())
    assert dcp.cmpa.attn_v.num_heads == 12 and dcp.cmpa.attn_t.num_heads == 8
    # The module holds all 11,048,448 (the reference optimizer's set); the discarded text half does not train.
    assert sum(p.numel() for p in dcp.parameters()) == 11_048_448
    assert dcp.n_trainable() == vision_half + prompts == 7_502_336
    assert DCPPaper(bb, ["a", "b"], DCPPaper.make_config()).n_trainable() == 11_048_448
    assert DCP(bb, ["a", "b"], DCP.make_config({"cmpa": False})).n_trainable() == 20_480
    per_block = DCPPaper(bb, ["a", "b"], DCPPaper.make_config({"share": False}))
    assert per_block.n_trainable() == 9 * 11_027_968 + 20_480  # one CMPA for each of blocks 1 … 9


def test_both_updates_read_the_previous_prompts(backbone, images, monkeypatch):
    """dcp-paper: the text update uses the same fused v̄ and t̄ as the vision update (not V″), as the reference."""
    method = build(backbone, "dcp-paper")
    inputs: dict[str, list] = {"vision": [], "text": []}
    for kind in inputs:
        original = getattr(method.cmpa, f"update_{kind}")

        def spy(v, t, _original=original, _kind=kind):
            inputs[_kind].append((v.detach().clone(), t.detach().clone()))
            return _original(v, t)

        monkeypatch.setattr(method.cmpa, f"update_{kind}", spy)
    with torch.no_grad():
        method(images[:3])
    assert len(inputs["vision"]) == len(inputs["text"]) == len(method.inject)
    for (v1, t1), (v2, t2) in zip(inputs["vision"], inputs["text"]):
        assert torch.equal(v1, v2) and torch.equal(t1, t2)
