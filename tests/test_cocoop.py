"""CoCoOp specifics: Meta-Net shape and placement, reduction to CoOp, chunked per-image text encoding."""

from __future__ import annotations

import pytest
import torch

from mugcp_bench.methods.base import split_overrides
from mugcp_bench.methods.cocoop import CoCoOp
from tests.method_harness import CLASSNAMES, build_method, make_batch, shared_tiny_backbone, vit_b16_backbone
from tests.numerics import GRAD, assert_close_scaled, assert_differs


@pytest.fixture
def batch(tmp_path):
    return make_batch(tmp_path, n=3)


def features(batch):
    with torch.no_grad():
        return shared_tiny_backbone().encode_image(batch.images)  # (B, E)


def test_parameter_count_and_names_vit_b16():
    cfg, train = split_overrides(CoCoOp, CoCoOp.recipe("paper", "base2novel", 16, "caltech101"))
    assert (cfg["n_ctx"], cfg["ctx_init"], train["batch_size"], train["lr"], train["epochs"]) == (
        4,
        "a photo of a",
        1,
        0.002,
        10,
    )
    method = CoCoOp(vit_b16_backbone(), ["cat", "dog"], CoCoOp.make_config(cfg))
    assert method.n_trainable() == 35_360
    shapes = {k: tuple(v.shape) for k, v in method.trainable_state().items()}
    assert shapes == {
        "ctx": (4, 512),
        "meta_net.linear1.weight": (32, 512),
        "meta_net.linear1.bias": (32,),
        "meta_net.linear2.weight": (512, 32),
        "meta_net.linear2.bias": (512,),
    }


@pytest.mark.numerics
def test_zero_meta_net_output_is_coop(batch):
    cocoop = build_method("cocoop", ctx_init="a photo of a")
    coop = build_method("coop", ctx_init="a photo of a")
    with torch.no_grad():
        cocoop.meta_net.linear2.weight.zero_()
        cocoop.meta_net.linear2.bias.zero_()
        shifted = cocoop.ctx + 0.05 * torch.randn_like(cocoop.ctx)  # any shared context, the same in both
        cocoop.ctx.copy_(shifted)
        coop.ctx.copy_(shifted)
        assert_close_scaled(cocoop(batch.images).logits, coop(batch.images).logits)


@pytest.mark.numerics
def test_meta_net_sees_normalised_features(batch):
    method = build_method("cocoop")
    f = features(batch)
    with torch.no_grad():
        a = method(None, image_features=f).logits
        b = method(None, image_features=3.0 * f).logits
        bias = method.meta_net(f)  # the Meta-Net is not scale invariant: the test can fail
        assert_differs(bias, method.meta_net(3.0 * f))
    assert_close_scaled(a, b)


@pytest.mark.numerics
def test_each_image_has_its_own_prompts(batch):
    method = build_method("cocoop")
    with torch.no_grad():
        ctx = method.instance_context(torch.nn.functional.normalize(features(batch), dim=-1))
        assert ctx.shape == (3, method.n_ctx, shared_tiny_backbone().text_width)
        assert_differs(ctx[0], ctx[1])
        together = method.predict(batch.images)
        alone = torch.cat([method.predict(batch.images[i : i + 1]) for i in range(3)])
    assert_close_scaled(together, alone)


@pytest.mark.numerics
@pytest.mark.parametrize("chunk", [1, 4, 7, 0])
def test_chunked_text_encoding_is_exact(chunk, batch, monkeypatch):
    whole = build_method("cocoop", text_chunk=10_000).train()
    chunked = build_method("cocoop", text_chunk=chunk).train()
    logits_w = whole(batch.images).logits
    sizes = []
    bb = shared_tiny_backbone()
    encode = bb.encode_text

    def spy(token_embeds, tokens, *args, **kwargs):
        sizes.append(token_embeds.shape[0])
        return encode(token_embeds, tokens, *args, **kwargs)

    monkeypatch.setattr(bb, "encode_text", spy)
    logits_c = chunked(batch.images).logits
    assert_close_scaled(logits_c, logits_w)
    total = 3 * len(CLASSNAMES)
    assert sum(sizes) == total
    assert max(sizes) == (chunk if chunk > 0 else total)
    # gradients through the checkpointed chunks equal the single-pass gradients
    gw = torch.autograd.grad(logits_w.square().sum(), list(whole.trainable_parameters()))
    gc = torch.autograd.grad(logits_c.square().sum(), list(chunked.trainable_parameters()))
    for a, b in zip(gw, gc):
        assert_close_scaled(a, b, GRAD)


@pytest.mark.numerics
def test_no_metanet_ablation_is_coop_under_cocoop_budget(batch):
    method = build_method("cocoop", **CoCoOp.ablations["metanet"])
    assert method.meta_net is None and method.instance_conditional is False
    assert method.n_trainable() == method.n_ctx * shared_tiny_backbone().text_width
    coop = build_method("coop", ctx_init="a photo of a")
    with torch.no_grad():
        assert_close_scaled(method(batch.images).logits, coop(batch.images).logits)


def test_instance_conditional_flags():
    method = build_method("cocoop")
    assert method.instance_conditional is True and CoCoOp.frozen_image_path is True


@pytest.mark.numerics
@pytest.mark.parametrize("chunk", [1, 7, 0])
def test_evaluation_reduces_each_chunk_to_logits_without_the_full_text_features(chunk, batch, monkeypatch):
    """predict gives forward's logits, but never concatenates the (B, C, E) text features (BENCHMARKS.md gap 6)."""
    method = build_method("cocoop", text_chunk=chunk).eval()
    with torch.enable_grad():  # the training path: (B, C, E) text features, then cosine logits
        want = method(batch.images).logits.detach()
    built = []
    real = method.instance_text_features
    monkeypatch.setattr(method, "instance_text_features", lambda ctx: built.append(ctx) or real(ctx))
    method.begin_eval()
    with torch.no_grad():
        got = method.predict(batch.images)
    method.end_eval()
    assert not built and got.shape == (len(batch.images), len(CLASSNAMES))
    assert_close_scaled(got, want)
