"""CoOp specifics: reduction to zero-shot CLIP, class-token positions, CSC, recipes, parameter counts, fast eval."""

from __future__ import annotations

import pytest
import torch

from mugcp_bench.errors import UserError
from mugcp_bench.methods.base import split_overrides
from mugcp_bench.methods.coop import CoOp
from tests.method_harness import (
    CLASSNAMES,
    OTHER_CLASSNAMES,
    build_method,
    make_batch,
    shared_tiny_backbone,
    vit_b16_backbone,
)
from tests.numerics import assert_close_scaled


@pytest.fixture
def batch(tmp_path):
    return make_batch(tmp_path, n=4)


def zero_shot_logits(images: torch.Tensor, texts: list[str]) -> torch.Tensor:
    bb = shared_tiny_backbone()
    with torch.no_grad():
        image_f = torch.nn.functional.normalize(bb.encode_image(images), dim=-1)
        return bb.logit_scale * image_f @ bb.text_features(texts).t()


@pytest.mark.numerics
def test_word_initialised_context_is_zero_shot_clip(batch):
    coop = build_method("coop", ctx_init="a photo of a")
    zs = build_method("zsclip")  # template "a photo of a {}."
    with torch.no_grad():
        got = coop(batch.images).logits
        expected = zs(batch.images).logits
    assert_close_scaled(got, expected)
    assert coop.n_ctx == 4
    bb = shared_tiny_backbone()
    words = bb.embed_tokens(bb.tokenize(["a photo of a"]))[0, 1:5]
    assert torch.equal(coop.ctx.detach(), words)


@pytest.mark.numerics
@pytest.mark.parametrize(
    ("position", "text"),
    [("end", "a photo of a {}."), ("front", "{} a photo of a."), ("middle", "a photo {} of a.")],
)
def test_class_token_position_places_the_name(position, text, batch):
    """With the context equal to the words' embeddings, every position reproduces a plain text prompt."""
    coop = build_method("coop", ctx_init="a photo of a", class_token_position=position)
    with torch.no_grad():
        got = coop(batch.images).logits
    expected = zero_shot_logits(batch.images, [text.format(c.replace("_", " ")) for c in CLASSNAMES])
    assert_close_scaled(got, expected)


def test_ctx_init_sets_n_ctx_and_random_init_keeps_it():
    assert build_method("coop", n_ctx=16, ctx_init="a photo of a").n_ctx == 4
    coop = build_method("coop", n_ctx=7, ctx_init="")
    assert coop.ctx.shape == (7, shared_tiny_backbone().text_width)
    assert coop.prefix == "X X X X X X X"
    assert 0.01 < coop.ctx.std().item() < 0.03  # N(0, 0.02²)


def test_class_specific_context(batch):
    coop = build_method("coop", n_ctx=3, ctx_init="", csc=True)
    assert coop.ctx.shape == (len(CLASSNAMES), 3, shared_tiny_backbone().text_width)
    with torch.no_grad():
        assert coop(batch.images).logits.shape == (4, len(CLASSNAMES))
    coop.set_classnames(CLASSNAMES)  # the training classes: fine
    with pytest.raises(UserError, match="csc"):
        coop.set_classnames(OTHER_CLASSNAMES)


def test_bad_position_is_a_user_error():
    with pytest.raises(UserError, match="class_token_position"):
        build_method("coop", class_token_position="start")


@pytest.mark.numerics
def test_fast_eval_encodes_the_prompts_once(batch, monkeypatch):
    coop = build_method("coop", ctx_init="")
    with torch.no_grad():
        naive = coop(batch.images).logits
    coop.begin_eval()

    def no_text(*args, **kwargs):
        raise AssertionError("predict re-encoded the class prompts")

    monkeypatch.setattr(shared_tiny_backbone(), "encode_text", no_text)
    assert_close_scaled(coop.predict(batch.images), naive)


def test_image_tower_gets_no_graph(batch):
    coop = build_method("coop").train()
    out = coop(batch.images)
    grads = torch.autograd.grad(out.logits.sum(), [coop.ctx])
    assert grads[0].abs().sum() > 0
    feats = shared_tiny_backbone().encode_image(batch.images)
    assert not feats.requires_grad


def test_paper_recipes():
    r = CoOp.recipe("paper", "base2novel", 16, "caltech101")
    assert (r["n_ctx"], r["ctx_init"], r["batch_size"], r["lr"], r["epochs"]) == (4, "a photo of a", 32, 0.002, 200)
    assert CoOp.recipe("paper", "base2novel", 16, "imagenet")["epochs"] == 50
    assert CoOp.recipe("paper", "xd", 16, "imagenet")["epochs"] == 50
    few = CoOp.recipe("paper", "few_shot", 16, "caltech101")
    assert (few["n_ctx"], few["ctx_init"], few["csc"], few["class_token_position"]) == (16, "", False, "end")
    assert {k: CoOp.recipe("paper", "few_shot", k, "dtd")["epochs"] for k in (1, 2, 4, 8, 16)} == {
        1: 50,
        2: 100,
        4: 100,
        8: 200,
        16: 200,
    }
    assert {CoOp.recipe("paper", "few_shot", k, "imagenet")["epochs"] for k in (1, 2, 4, 8, 16)} == {50}


@pytest.mark.parametrize(("protocol", "expected"), [("base2novel", 2048), ("xd", 2048), ("few_shot", 8192)])
def test_parameter_counts_vit_b16(protocol, expected):
    cfg, _ = split_overrides(CoOp, CoOp.recipe("paper", protocol, 16, "caltech101"))
    coop = CoOp(vit_b16_backbone(), ["cat", "dog", "fish"], CoOp.make_config(cfg))
    assert coop.n_trainable() == expected
    csc = CoOp(vit_b16_backbone(), ["cat", "dog", "fish"], CoOp.make_config({**cfg, "ctx_init": "", "csc": True}))
    assert csc.n_trainable() == 3 * csc.n_ctx * 512
