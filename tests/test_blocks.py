"""Fused-attention block forwards and shared-prefix text encoding equal open_clip's blocks (forward and gradients)."""

from __future__ import annotations

import pytest
import torch
from open_clip.transformer import CustomResidualAttentionBlock

from mugcp_bench.methods.prompts import ClassPrompts, init_context
from mugcp_bench.model import blocks
from mugcp_bench.model.backbone import Backbone, load_backbone
from tests.method_harness import CLASSNAMES, build_method
from tests.numerics import BF16, FP32, GRAD, assert_close_scaled, assert_differs

pytestmark = pytest.mark.numerics


@pytest.fixture(scope="module", params=["tiny", "toy-clip"])
def bb(request) -> Backbone:
    return load_backbone(request.param)


def causal_mask(bb: Backbone, t: int) -> torch.Tensor:
    return bb.text.attn_mask[:t, :t]


def test_every_block_equals_open_clip(bb):
    """Each vision block (no mask) and text block (causal) of the tower, against the block module itself."""
    torch.manual_seed(0)
    assert all(bb._vision_fusable) and all(bb._text_fusable)
    x = torch.randn(3, bb.n_vision_tokens + 2, bb.vision_width)
    for block in bb.model.visual.transformer.resblocks:
        with torch.no_grad():
            assert_close_scaled(blocks.block_forward(block, x), block(x))
    t = torch.randn(4, 9, bb.text_width)
    for block in bb.text.transformer.resblocks:
        with torch.no_grad():
            got, want = blocks.block_forward(block, t, causal=True), block(t, attn_mask=causal_mask(bb, 9))
        assert_close_scaled(got, want)
        # the causal mask matters: without it the result is different
        assert_differs(blocks.block_forward(block, t), want)


@pytest.mark.parametrize("groups", [1, 3])
def test_split_block_equals_full_rows_with_gradients(bb, groups):
    """Rows sharing their first P positions: prefix once per group + suffixes = every full row, grads included."""
    torch.manual_seed(1)
    block = bb.text.transformer.resblocks[0]
    n, p, s, d = 6, 4, 5, bb.text_width
    index = torch.arange(n) * groups // n  # (N,) non-decreasing groups
    prefix = torch.randn(groups, p, d, requires_grad=True)
    suffix = torch.randn(n, s, d, requires_grad=True)
    full = torch.cat([prefix[index], suffix], dim=1)  # (N, P + S, D)
    want = block(full, attn_mask=causal_mask(bb, p + s))
    got_p, got_s = blocks.split_block_forward(block, prefix, suffix, index if groups > 1 else None)
    assert_close_scaled(got_s, want[:, p:])
    for g in range(groups):
        assert_close_scaled(got_p[g].expand(int((index == g).sum()), -1, -1), want[index == g, :p])
    w = torch.randn_like(want)
    gp_want, gs_want = torch.autograd.grad((want * w).sum(), (prefix, suffix))
    # the prefix's output is shared by the rows of a group: its upstream gradient is their sum
    w_prefix = torch.zeros(groups, p, d).index_add_(0, index, w[:, :p])
    gp_got, gs_got = torch.autograd.grad((got_p * w_prefix).sum() + (got_s * w[:, p:]).sum(), (prefix, suffix))
    assert_close_scaled(gp_got, gp_want, GRAD)
    assert_close_scaled(gs_got, gs_want, GRAD)


def test_encode_text_shared_prefix_is_exact_and_callbacks_see_the_prefix(bb):
    """The backbone's text loop with a shared prefix and a deep-prompt callback, against the whole-row loop."""
    torch.manual_seed(2)
    prompts = ClassPrompts(bb, [*CLASSNAMES, "a much longer class name than the rest"], 2, "a photo of a")
    assert prompts.shared_len == 5  # SOS + "a photo of a"
    ctx = (torch.randn(2, bb.text_width) * 0.02).requires_grad_()
    deep = [torch.randn(2, bb.text_width) * 0.02 for _ in range(bb.text_layers)]
    seen = []

    def layer_fn(i: int, x: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(x.shape))
        if i == 0:  # the context enters at the input; deep prompts replace it from block 1 on (as MaPLe)
            return x
        return torch.cat([x[:, :1], deep[i].expand(x.shape[0], -1, -1), x[:, 3:]], dim=1)

    def encode(shared: int) -> tuple[torch.Tensor, torch.Tensor]:
        f = bb.encode_text(prompts.build(ctx), prompts.tokens, layer_fn, shared_prefix=shared)  # (C, E)
        return f, torch.autograd.grad((f * torch.linspace(-1, 1, f.numel()).view_as(f)).sum(), ctx)[0]

    want, grad_want = encode(0)
    assert seen[-1][0] == prompts.n_cls  # whole rows
    seen.clear()
    got, grad_got = encode(prompts.shared_len)
    assert seen == [(1, 5, bb.text_width)] * bb.text_layers  # only the shared prefix reaches the callback
    assert_close_scaled(got, want)
    assert_close_scaled(grad_got, grad_want, GRAD)
    assert grad_want.abs().max() > 0


def test_encode_text_groups_and_settings(bb, monkeypatch):
    """Per-group prefixes (CoCoOp: one per image); prefix_sharing off runs whole rows; a wrong claim is refused."""
    torch.manual_seed(3)
    prompts = ClassPrompts(bb, CLASSNAMES, 4, "a photo of a")
    ctx = torch.randn(2, 4, bb.text_width) * 0.02  # two images' contexts
    rows = torch.cat([prompts.build(ctx[0]), prompts.build(ctx[1])])  # (2C, T, Dt)
    tokens = prompts.tokens.repeat(2, 1)
    index = torch.arange(2).repeat_interleave(prompts.n_cls)
    calls = []
    real = blocks.split_block_forward
    monkeypatch.setattr(blocks, "split_block_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        want = bb.encode_text(rows, tokens)
        got = bb.encode_text(rows, tokens, shared_prefix=prompts.shared_len, prefix_index=index)
        assert len(calls) == bb.text_layers
        assert_close_scaled(got, want)
        with pytest.raises(ValueError, match="differ between rows"):  # two images cannot share one prefix
            bb.encode_text(rows, tokens, shared_prefix=prompts.shared_len)
        bb.prefix_sharing = False
        try:
            bb.encode_text(rows, tokens, shared_prefix=prompts.shared_len)  # the claim is ignored, not checked
        finally:
            bb.prefix_sharing = True
    assert len(calls) == bb.text_layers


def test_shared_len_follows_the_class_token_position(tiny_backbone):
    ctx, prefix = init_context(tiny_backbone, 4, "")
    assert ClassPrompts(tiny_backbone, CLASSNAMES, 4, prefix).shared_len == 5
    assert ClassPrompts(tiny_backbone, CLASSNAMES, 4, prefix, position="middle").shared_len == 0
    # first class-name tokens common to all names are shared too; never past the earliest EOT
    assert ClassPrompts(tiny_backbone, ["class 1 a", "class 2 b"], 4, prefix).shared_len == 6
    one = ClassPrompts(tiny_backbone, ["dog"], 4, prefix)
    assert one.shared_len == int(tiny_backbone.eot_index(one.tokens)[0])


def test_coop_trains_through_the_shared_prefix(tiny_backbone, monkeypatch):
    """CoOp's text pass takes the split path and its context gradient equals the whole-row pass's."""
    coop = build_method("coop", backbone=tiny_backbone)
    calls = []
    real = blocks.split_block_forward
    monkeypatch.setattr(blocks, "split_block_forward", lambda *a, **k: calls.append(1) or real(*a, **k))

    def grad() -> torch.Tensor:
        coop.zero_grad()
        f = coop.text_features()
        (f * torch.linspace(-1, 1, f.numel()).view_as(f)).sum().backward()
        return coop.ctx.grad.clone()

    fast = grad()
    assert len(calls) == tiny_backbone.text_layers
    tiny_backbone.prefix_sharing = False
    try:
        whole = grad()
    finally:
        tiny_backbone.prefix_sharing = True
    assert len(calls) == tiny_backbone.text_layers
    assert whole.abs().max() > 1
    assert_close_scaled(fast, whole, GRAD)  # fp32 rounding of a sum over classes


def test_unsupported_blocks_fall_back_to_their_module(tiny_backbone):
    custom = CustomResidualAttentionBlock(tiny_backbone.text_width, 4)
    assert not blocks.fusable(custom)
    bb = load_backbone("tiny")
    resblocks = bb.text.transformer.resblocks
    resblocks[0] = CustomResidualAttentionBlock(bb.text_width, 4)
    resblocks[0].eval()
    bb._text_fusable[0] = blocks.fusable(resblocks[0])
    tokens = bb.tokenize(["a photo of a dog.", "a photo of a cat."])
    with torch.no_grad():
        x, mask, _ = bb.text_embed(bb.embed_tokens(tokens), tokens)
        assert torch.equal(bb.text_block(0, x, mask), resblocks[0](x, attn_mask=mask))
        assert bb.shared_prefix_len(5, bb.eot_index(tokens), True) == 0  # never split around a foreign block
        whole = bb.encode_text(bb.embed_tokens(tokens), tokens)
        assert torch.equal(bb.encode_text(bb.embed_tokens(tokens), tokens, shared_prefix=5), whole)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_blocks_equal_open_clip(dtype):
    bb = load_backbone("tiny", device="cuda")
    torch.manual_seed(0)
    x = torch.randn(3, bb.n_vision_tokens, bb.vision_width, device="cuda")
    t = torch.randn(4, 9, bb.text_width, device="cuda")
    tol = FP32 if dtype == torch.float32 else BF16
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        for block in bb.model.visual.transformer.resblocks:
            assert_close_scaled(blocks.block_forward(block, x).float(), block(x).float(), tol)
        for block in bb.text.transformer.resblocks:
            got = blocks.block_forward(block, t, causal=True).float()
            assert_close_scaled(got, block(t, attn_mask=causal_mask(bb, 9)).float(), tol)
        prefix, suffix = t[:1, :4], t[:, 4:]
        full = torch.cat([prefix.expand(4, -1, -1), suffix], dim=1)
        for block in bb.text.transformer.resblocks:
            _, got = blocks.split_block_forward(block, prefix, suffix)
            assert_close_scaled(got.float(), block(full, attn_mask=causal_mask(bb, 9))[:, 4:].float(), tol)
