"""Two backbone capabilities: a residual branch inside a block (it reads ln_1 of the block input and adds
to the block output: MMA's adapters) and token insertion that changes the sequence length (MMRL's representation
tokens after SOS / CLS, the EOT read at its shifted position, the final vision token states), on the fused path, the
split prefix / suffix path and open_clip's own modules, against open_clip's blocks and hand-written loops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mugcp_bench.methods.prompts import ClassPrompts, clean_classname
from mugcp_bench.model import blocks
from mugcp_bench.model.backbone import Backbone, causal_mask, load_backbone
from tests.method_harness import CLASSNAMES
from tests.numerics import GRAD, assert_close_scaled, assert_differs

pytestmark = pytest.mark.numerics

CLASSES = [*CLASSNAMES, "a much longer class name than the rest"]


@pytest.fixture(scope="module", params=["tiny", "toy-clip"])
def bb(request) -> Backbone:
    return load_backbone(request.param)


@pytest.fixture(scope="module")
def naive() -> Backbone:
    """The tiny CLIP on the reference's path: full-length text, open_clip's block modules, whole rows."""
    b = load_backbone("tiny")
    b.eot_truncation = b.fused_attention = b.prefix_sharing = False
    return b


class Adapter(torch.nn.Module):
    """A per-position bottleneck branch (MMA-like): down, ReLU, up; None at blocks it does not hold."""

    def __init__(self, width: int, layers: tuple[int, ...], scale: float = 0.3) -> None:
        super().__init__()
        self.layers = layers
        self.down = torch.nn.ModuleList([torch.nn.Linear(width, 8) for _ in layers])
        self.up = torch.nn.ModuleList([torch.nn.Linear(8, width) for _ in layers])
        self.scale = scale
        self.seen: list[tuple[int, torch.Tensor]] = []

    def forward(self, i: int, h: torch.Tensor) -> torch.Tensor | None:
        if i not in self.layers:
            return None
        self.seen.append((i, h))
        k = self.layers.index(i)
        return self.scale * self.up[k](F.relu(self.down[k](h)))


def zero_branch(h: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(h)


# --- the block --------------------------------------------------------------------------------------------------------
def test_a_zero_branch_leaves_every_block_equal_to_open_clip(bb):
    """Fused and module paths with a branch that adds zeros: open_clip's block output (and the branch-free forward,
    bit for bit: adding exact zeros)."""
    torch.manual_seed(0)
    x = torch.randn(3, bb.n_vision_tokens, bb.vision_width)
    t = torch.randn(4, 9, bb.text_width)
    mask = bb.text.attn_mask[:9, :9]
    with torch.no_grad():
        for block in bb.model.visual.transformer.resblocks:
            want = block(x)
            got = blocks.block_forward(block, x, branch=zero_branch)
            assert_close_scaled(got, want)
            assert torch.equal(got, blocks.block_forward(block, x))
            assert torch.equal(blocks.module_forward(block, x, branch=zero_branch), want)
        for block in bb.text.transformer.resblocks:
            want = block(t, attn_mask=mask)
            got = blocks.block_forward(block, t, causal=True, branch=zero_branch)
            assert_close_scaled(got, want)
            assert torch.equal(got, blocks.block_forward(block, t, causal=True))
            assert torch.equal(blocks.module_forward(block, t, mask, branch=zero_branch), want)
            assert torch.equal(blocks.module_forward(block, t, mask, branch=lambda h: None), want)


def test_the_branch_reads_ln_1_of_the_input_and_adds_to_the_output_fused_equals_unfused(bb):
    torch.manual_seed(1)
    branch = Adapter(bb.text_width, (0,))
    block = bb.text.transformer.resblocks[0]
    t = torch.randn(4, 9, bb.text_width, requires_grad=True)
    mask = bb.text.attn_mask[:9, :9]
    fused = blocks.block_forward(block, t, causal=True, branch=lambda h: branch(0, h))
    (_, h_seen) = branch.seen[-1]
    assert torch.equal(h_seen, block.ln_1(t))  # the normalised block input, the tensor the attention reads
    unfused = blocks.module_forward(block, t, mask, branch=lambda h: branch(0, h))
    hand = block(t, attn_mask=mask) + branch(0, block.ln_1(t))  # the definition
    assert_close_scaled(fused, hand)
    assert_close_scaled(unfused, hand)
    assert_differs(fused, block(t, attn_mask=mask))  # the branch is not a no-op
    w = torch.randn_like(hand)
    grads = []
    for out in (fused, unfused, hand):
        grads.append(torch.autograd.grad((out * w).sum(), [t, *branch.parameters()], retain_graph=True))
    for got, want in zip(grads[0], grads[2]):
        assert_close_scaled(got, want, GRAD)
    for got, want in zip(grads[1], grads[2]):
        assert_close_scaled(got, want, GRAD)


def test_a_branch_of_another_shape_is_refused(tiny_backbone):
    block = tiny_backbone.model.visual.transformer.resblocks[0]
    x = torch.randn(2, 5, tiny_backbone.vision_width)
    with pytest.raises(ValueError, match="block branch must return the block's shape"):
        blocks.block_forward(block, x, branch=lambda h: h[:, :1])


@pytest.mark.parametrize("groups", [1, 3])
def test_split_block_with_a_branch_equals_full_rows_with_gradients(bb, groups):
    torch.manual_seed(2)
    branch = Adapter(bb.text_width, (0,))
    block = bb.text.transformer.resblocks[0]
    n, p, s, d = 6, 4, 5, bb.text_width
    index = torch.arange(n) * groups // n
    prefix = torch.randn(groups, p, d, requires_grad=True)
    suffix = torch.randn(n, s, d, requires_grad=True)
    full = torch.cat([prefix[index], suffix], dim=1)  # (N, P + S, D)
    want = block(full, attn_mask=bb.text.attn_mask[: p + s, : p + s]) + branch(0, block.ln_1(full))
    got_p, got_s = blocks.split_block_forward(
        block, prefix, suffix, index if groups > 1 else None, branch=lambda h: branch(0, h)
    )
    assert_close_scaled(got_s, want[:, p:])
    for g in range(groups):
        assert_close_scaled(got_p[g].expand(int((index == g).sum()), -1, -1), want[index == g, :p])
    w = torch.randn_like(want)
    params = [prefix, suffix, *branch.parameters()]
    g_want = torch.autograd.grad((want * w).sum(), params)
    w_prefix = torch.zeros(groups, p, d).index_add_(0, index, w[:, :p])
    g_got = torch.autograd.grad((got_p * w_prefix).sum() + (got_s * w[:, p:]).sum(), params)
    for got, exp in zip(g_got, g_want):
        assert_close_scaled(got, exp, GRAD)


# --- the loops --------------------------------------------------------------------------------------------------------
def text_grad(fn, params) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    f = fn()
    return f.detach(), torch.autograd.grad((f * torch.linspace(-1, 1, f.numel()).view_as(f)).sum(), params)


def test_encode_text_with_a_branch_fast_equals_naive_and_a_hand_written_loop(naive):
    fast = load_backbone("tiny")
    torch.manual_seed(3)
    layers = (1, 3)
    branch = Adapter(fast.text_width, layers)
    params = list(branch.parameters())
    runs = {}
    for name, b in (("fast", fast), ("naive", naive)):
        prompts = ClassPrompts(b, CLASSES, 0, "a photo of a")
        embeds = prompts.build(torch.zeros(0, b.text_width))
        runs[name] = text_grad(
            lambda b=b, e=embeds, p=prompts: b.encode_text(
                e, p.tokens, shared_prefix=p.shared_len, block_branch=branch
            ),
            params,
        )
        if name == "fast":
            branch.seen.clear()
            b.encode_text(embeds, prompts.tokens, shared_prefix=prompts.shared_len, block_branch=branch)
            # per position: the prefix (1, P, D) and every suffix (C, S, D) separately, at the branch's blocks only
            assert [(i, tuple(h.shape[:2])) for i, h in branch.seen] == [
                (i, shape) for i in layers for shape in ((1, prompts.shared_len), (len(CLASSES), h_len(prompts)))
            ]
    # a hand-written loop over open_clip's modules, whole rows, full context
    tokens = naive.tokenize([f"a photo of a {clean_classname(c)}." for c in CLASSES])

    def hand() -> torch.Tensor:
        t = naive.text
        x = t.token_embedding(tokens) + t.positional_embedding
        for i, block in enumerate(t.transformer.resblocks):
            x = block(x, attn_mask=t.attn_mask) + (branch(i, block.ln_1(x)) if i in layers else 0)
        return t.ln_final(x[torch.arange(len(CLASSES)), naive.eot_index(tokens)]) @ t.text_projection

    want = text_grad(hand, params)
    for name, (f, g) in runs.items():
        assert_close_scaled(f, want[0], msg=name)
        for got, exp in zip(g, want[1]):
            assert_close_scaled(got, exp, GRAD, msg=name)
    assert_differs(want[0], naive.encode_text(naive.embed_tokens(tokens), tokens).detach())


def h_len(prompts: ClassPrompts) -> int:
    return prompts.tokens.shape[1] - prompts.shared_len


def test_encode_image_with_a_branch_fused_equals_unfused_and_a_hand_written_loop(naive):
    fast = load_backbone("tiny")
    torch.manual_seed(4)
    branch = Adapter(fast.vision_width, (0, 2))
    images = torch.randn(3, 3, fast.image_size, fast.image_size)
    params = list(branch.parameters())
    got_fast = text_grad(lambda: fast.encode_image(images, block_branch=branch), params)
    got_naive = text_grad(lambda: naive.encode_image(images, block_branch=branch), params)
    v = naive.model.visual

    def hand() -> torch.Tensor:
        x = v.conv1(images).flatten(2).transpose(1, 2)
        x = torch.cat([v.class_embedding.view(1, 1, -1).expand(3, -1, -1), x], dim=1) + v.positional_embedding
        x = v.ln_pre(x)
        for i, block in enumerate(v.transformer.resblocks):
            x = block(x) + (branch(i, block.ln_1(x)) if i in (0, 2) else 0)
        return v.ln_post(x[:, 0]) @ v.proj

    want = text_grad(hand, params)
    for name, (f, g) in (("fused", got_fast), ("unfused", got_naive)):
        assert_close_scaled(f, want[0], msg=name)
        for got, exp in zip(g, want[1]):
            assert_close_scaled(got, exp, GRAD, msg=name)


def test_encode_joint_with_branches_equals_the_towers_apart(tiny_backbone):
    bb = tiny_backbone
    torch.manual_seed(5)
    vb, tb = Adapter(bb.vision_width, (1, 2)), Adapter(bb.text_width, (2, 3))
    images = torch.randn(2, 3, bb.image_size, bb.image_size)
    prompts = ClassPrompts(bb, CLASSES, 0, "a photo of a")
    embeds = prompts.build(torch.zeros(0, bb.text_width))
    with torch.no_grad():
        fi, ft = bb.encode_joint(
            images, embeds, prompts.tokens, lambda i, a, b: (a, b), shared_prefix=prompts.shared_len,
            vision_branch=vb, text_branch=tb,
        )  # fmt: skip
        assert_close_scaled(fi, bb.encode_image(images, block_branch=vb))
        assert_close_scaled(ft, bb.encode_text(embeds, prompts.tokens, block_branch=tb))
        assert_differs(fi, bb.encode_image(images))


# --- token insertion --------------------------------------------------------------------------------------------------
N_REP = 3


def rep_tokens(width: int, layers: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(N_REP, width, generator=gen) * 0.5 for _ in range(layers)]


def insert_after_first(x: torch.Tensor, tokens: torch.Tensor, replace: bool) -> torch.Tensor:
    """[x_0, tokens, rest]: inserted after position 0, or replacing positions 1 … n when they are there already."""
    rest = x[:, 1 + N_REP :] if replace else x[:, 1:]
    return torch.cat([x[:, :1], tokens.to(x.dtype).expand(x.shape[0], -1, -1), rest], dim=1)


def text_with_tokens(b: Backbone, start: int, reps: list[torch.Tensor]):
    """`encode_text` with tokens inserted after SOS before block `start` and replaced before every later block."""
    prompts = ClassPrompts(b, CLASSES, 0, "a photo of a")
    embeds = prompts.build(torch.zeros(0, b.text_width))

    def layer_fn(i: int, x: torch.Tensor) -> torch.Tensor:
        return insert_after_first(x, reps[i - start], replace=i > start) if i >= start else x

    return b.encode_text(embeds, prompts.tokens, layer_fn, shared_prefix=prompts.shared_len, eot_offset=N_REP)


@pytest.mark.parametrize("start", [0, 2, 3])
def test_text_tokens_inserted_after_sos_equal_a_hand_written_loop(start, naive):
    fast = load_backbone("tiny")
    reps = [r.requires_grad_() for r in rep_tokens(fast.text_width, fast.text_layers - start, seed=start)]
    got = {
        name: text_grad(lambda b=b: text_with_tokens(b, start, reps), reps)
        for name, b in (("fast", fast), ("naive", naive))
    }
    tokens = naive.tokenize([f"a photo of a {clean_classname(c)}." for c in CLASSES])
    t = naive.text

    def hand() -> torch.Tensor:  # as MMRL's clip/model_mmrl.py: a (T+n)² causal mask from the insertion on
        x = t.token_embedding(tokens) + t.positional_embedding  # (C, 32, D)
        mask = t.attn_mask
        for i, block in enumerate(t.transformer.resblocks):
            if i >= start:
                x = insert_after_first(x, reps[i - start], replace=i > start)
                mask = torch.full((x.shape[1],) * 2, float("-inf")).triu(1)
            x = block(x, attn_mask=mask)
        x = t.ln_final(x)
        return x[torch.arange(len(CLASSES)), naive.eot_index(tokens) + N_REP] @ t.text_projection

    want = text_grad(hand, reps)
    for name, (f, g) in got.items():
        assert_close_scaled(f, want[0], msg=name)
        for got_g, exp in zip(g, want[1]):
            assert_close_scaled(got_g, exp, GRAD, msg=name)
    assert all(g.abs().max() > 0 for g in want[1])


def test_a_prefix_grown_by_the_callback_must_say_so_in_eot_offset(tiny_backbone):
    bb = tiny_backbone
    prompts = ClassPrompts(bb, CLASSES, 0, "a photo of a")
    embeds = prompts.build(torch.zeros(0, bb.text_width))
    reps = rep_tokens(bb.text_width, 1, 0)

    def grow(i: int, x: torch.Tensor) -> torch.Tensor:
        return insert_after_first(x, reps[0], replace=False) if i == 1 else x

    with torch.no_grad(), pytest.raises(ValueError, match="grew the shared prefix by 3 positions but eot_offset=0"):
        bb.encode_text(embeds, prompts.tokens, grow, shared_prefix=prompts.shared_len)
    with torch.no_grad(), pytest.raises(ValueError, match="keep its shape"):
        bb.encode_text(embeds, prompts.tokens, lambda i, x: x[:, 1:], shared_prefix=prompts.shared_len)


def test_the_causal_mask_is_open_clips_at_every_length(tiny_backbone):
    mask = tiny_backbone.text.attn_mask
    assert torch.equal(causal_mask(mask.shape[0], mask.dtype, mask.device), mask)
    assert torch.equal(tiny_backbone.text_mask(mask[:7, :7], 12), causal_mask(12, mask.dtype, mask.device))


@pytest.mark.parametrize("start", [1, 3])
def test_vision_tokens_after_cls_and_their_final_states_equal_a_hand_written_loop(start, naive):
    fast = load_backbone("tiny")
    reps = [r.requires_grad_() for r in rep_tokens(fast.vision_width, fast.vision_layers - start, seed=10 + start)]
    images = torch.randn(2, 3, fast.image_size, fast.image_size, generator=torch.Generator().manual_seed(3))

    def layer_fn(i: int, x: torch.Tensor) -> torch.Tensor:
        return insert_after_first(x, reps[i - start], replace=i > start) if i >= start else x

    def readout(b: Backbone, x: torch.Tensor) -> torch.Tensor:  # CLS feature and the rep tokens' mean after ln_post
        return torch.cat([b.vision_head(x), b.vision_final_norm(x[:, 1 : 1 + N_REP]).mean(1)], dim=-1)

    got = {
        name: text_grad(lambda b=b: readout(b, b.vision_tokens(images, layer_fn=layer_fn)), reps)
        for name, b in (("fused", fast), ("unfused", naive))
    }
    v = naive.model.visual

    def hand() -> torch.Tensor:
        x = v.conv1(images).flatten(2).transpose(1, 2)
        x = torch.cat([v.class_embedding.view(1, 1, -1).expand(2, -1, -1), x], dim=1) + v.positional_embedding
        x = v.ln_pre(x)
        for i, block in enumerate(v.transformer.resblocks):
            if i >= start:
                x = insert_after_first(x, reps[i - start], replace=i > start)
            x = block(x)
        assert x.shape[1] == naive.n_vision_tokens + N_REP
        return torch.cat([v.ln_post(x[:, 0]) @ v.proj, v.ln_post(x[:, 1 : 1 + N_REP]).mean(1)], dim=-1)

    want = text_grad(hand, reps)
    for name, (f, g) in got.items():
        assert_close_scaled(f, want[0], msg=name)
        for got_g, exp in zip(g, want[1]):
            assert_close_scaled(got_g, exp, GRAD, msg=name)
    assert torch.equal(
        fast.encode_image(images, layer_fn=layer_fn), fast.vision_head(fast.vision_tokens(images, layer_fn=layer_fn))
    )
