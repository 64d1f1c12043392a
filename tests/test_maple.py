"""MaPLe specifics: prompt placement against hand-written layer loops, coupling, depth counting, parameter counts."""

from __future__ import annotations

import pytest
import torch

from mugcp_bench.errors import UserError
from mugcp_bench.methods.base import split_overrides
from mugcp_bench.methods.maple import MaPLe
from tests.method_harness import CLASSNAMES, build_method, make_batch, shared_tiny_backbone, vit_b16_backbone
from tests.numerics import assert_close_scaled, assert_differs


@pytest.fixture
def batch(tmp_path):
    return make_batch(tmp_path, n=2)


def perturbed(depth: int = 3, **overrides) -> MaPLe:
    """A MaPLe whose every parameter is moved off its initial value (so layers are distinguishable)."""
    method = build_method("maple", prompt_depth=depth, **overrides)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in method.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return method


def test_parameter_counts_vit_b16():
    counts = {}
    for protocol in ("base2novel", "xd"):
        cfg, _ = split_overrides(MaPLe, MaPLe.recipe("paper", protocol, 16, "caltech101"))
        counts[protocol] = MaPLe(vit_b16_backbone(), ["cat", "dog"], MaPLe.make_config(cfg)).n_trainable()
    assert counts == {"base2novel": 3_555_072, "xd": 1_185_024}
    ivlp = MaPLe(vit_b16_backbone(), ["cat"], MaPLe.make_config({"coupling": False}))
    assert ivlp.n_trainable() == 9 * 2 * (512 + 768)


def test_paper_recipes_and_no_few_shot():
    b2n = MaPLe.recipe("paper", "base2novel", 16, "dtd")
    xd = MaPLe.recipe("paper", "xd", 16, "imagenet")
    assert (b2n["batch_size"], b2n["lr"], b2n["epochs"], b2n["prompt_depth"], b2n["n_ctx"]) == (4, 0.0035, 5, 9, 2)
    assert (xd["batch_size"], xd["lr"], xd["epochs"], xd["prompt_depth"], xd["n_ctx"]) == (4, 0.0026, 2, 3, 2)
    with pytest.raises(UserError, match="few_shot"):
        MaPLe.recipe("paper", "few_shot", 16, "dtd")


def test_context_from_the_first_two_words_and_fixed_suffix():
    method = build_method("maple", prompt_depth=1)
    bb = shared_tiny_backbone()
    words = bb.embed_tokens(bb.tokenize(["a photo of a"]))[0]
    assert torch.equal(method.ctx.detach(), words[1:3])  # "a photo" learnable
    texts = [f"a photo of a {c.replace('_', ' ')}." for c in CLASSNAMES]
    tokens = bb.tokenize(texts)[:, : method.prompts.tokens.shape[1]]
    with torch.no_grad():
        assert torch.equal(method.prompts.build(method.ctx), bb.embed_tokens(tokens))  # "of a {class}." fixed
    assert build_method("maple", n_ctx=5, prompt_depth=1).prefix == "X X X X X"  # > 4 ctx: random init


def test_deep_projections_start_identical():
    method = build_method("maple", prompt_depth=3)
    layers = list(method.compound_prompt_projections)
    assert len(layers) == 2 and len(method.compound_prompts_text) == 2
    for layer in layers[1:]:
        assert torch.equal(layer.weight, layers[0].weight) and torch.equal(layer.bias, layers[0].bias)
        assert layer.weight.data_ptr() != layers[0].weight.data_ptr()  # copies, not one shared layer


@pytest.mark.numerics
def test_text_tower_matches_a_hand_written_loop():
    method = perturbed(depth=3)
    bb, n = shared_tiny_backbone(), method.n_ctx
    with torch.no_grad():
        x, mask, eot = bb.text_embed(method.prompts.build(method.ctx), method.prompts.tokens)
        for i in range(bb.text_layers):
            if i in (1, 2):  # depth 3: blocks 1 and 2 get P_1, P_2 in place of positions 1 … n_ctx
                x = x.clone()
                x[:, 1 : 1 + n] = method.compound_prompts_text[i - 1]
            x = bb.text_block(i, x, mask)
        expected = bb.text_head(x, eot)
        # the method's pass shares the prompt prefix across classes (blocks.split_block_forward), a different
        # summation order than the whole-row loop above
        assert_close_scaled(method.text_features(), expected)


@pytest.mark.numerics
def test_vision_tower_matches_a_hand_written_loop(batch):
    method = perturbed(depth=3)
    bb, n = shared_tiny_backbone(), method.n_ctx
    with torch.no_grad():
        x = bb.vision_embed(batch.images, method.proj(method.ctx).unsqueeze(0))  # appended before ln_pre
        assert x.shape[1] == bb.n_vision_tokens + n
        for i in range(bb.vision_layers):
            if i in (1, 2):  # the last n_ctx tokens replaced by Linear_i(P_i) before block i
                x = x.clone()
                x[:, -n:] = method.compound_prompt_projections[i - 1](method.compound_prompts_text[i - 1])
            x = bb.vision_block(i, x)
        expected = bb.vision_head(x)
        assert_close_scaled(method.image_features(batch.images), expected)


@pytest.mark.parametrize("j", [1, 2, 3])
def test_every_deep_prompt_is_used(j, batch):
    method = perturbed(depth=4)  # the toy tower has 4 blocks: prompts before blocks 1, 2, 3
    with torch.no_grad():
        text0, image0 = method.text_features(), method.image_features(batch.images)
        # a random change: a uniform shift (+0.5 everywhere) is removed by the blocks' LayerNorms, so the text features
        # moved by rounding only (the former `not torch.allclose` passed on that rounding)
        prompt = method.compound_prompts_text[j - 1]
        prompt.add_(0.5 * torch.randn(prompt.shape, generator=torch.Generator().manual_seed(j)))
        assert_differs(method.text_features(), text0)
        assert_differs(method.image_features(batch.images), image0)  # through the coupling layer


def test_depth_one_is_shallow():
    method = build_method("maple", prompt_depth=1)
    bb = shared_tiny_backbone()
    assert set(method.trainable_state()) == {"ctx", "proj.weight", "proj.bias"}
    assert method.n_trainable() == 2 * bb.text_width + bb.text_width * bb.vision_width + bb.vision_width


@pytest.mark.parametrize("depth", [0, 5])
def test_depth_out_of_range_is_a_user_error(depth):
    with pytest.raises(UserError, match="prompt_depth"):
        build_method("maple", prompt_depth=depth)


def test_no_coupling_has_free_vision_prompts(batch):
    method = build_method("maple", prompt_depth=3, **MaPLe.ablations["coupling"])
    names = set(method.trainable_state())
    assert not any(k.startswith(("proj.", "compound_prompt_projections")) for k in names)
    assert {"vision_ctx", "compound_prompts_vision.0", "compound_prompts_vision.1"} <= names


@pytest.mark.numerics
def test_fast_eval_keeps_text_features_and_reruns_the_image_path(batch, monkeypatch):
    method = perturbed(depth=3)
    with torch.no_grad():
        naive = method(batch.images).logits
    method.begin_eval()

    def no_text(*args, **kwargs):
        raise AssertionError("predict re-encoded the class prompts")

    monkeypatch.setattr(shared_tiny_backbone(), "encode_text", no_text)
    assert_close_scaled(method.predict(batch.images), naive)
    with pytest.raises(ValueError, match="images"):
        method(None, image_features=torch.zeros(2, 48))
