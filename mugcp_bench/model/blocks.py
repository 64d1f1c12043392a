"""Residual-attention block forwards on torch's fused attention, exact against open_clip's blocks.

open_clip's ``ResidualAttentionBlock`` runs ``nn.MultiheadAttention`` with an additive float mask for the causal
text tower. The forwards here compute the same function from the block's own weights with
``torch.nn.functional.scaled_dot_product_attention`` (``is_causal`` instead of a float mask for text, no mask for
vision), which lets torch pick its fused kernels on the CPU and on CUDA:

* ``block_forward(block, x, causal)`` — one block on a whole sequence batch (N, T, D);
* ``split_block_forward(block, prefix, suffix, prefix_index)`` — the shared-prefix form: when every row's first P
  positions are the same, under the causal text mask (docs/methods/README.md §0) their hidden states are the same
  at every layer. The prefix (G, P, D) is run once per group and each row's suffix (N, S, D) attends to [its
  group's prefix keys / values; its own suffix keys / values] with the causal offset P.

Both take an optional residual ``branch``: a callable on the block's normalised input ``h = ln_1(x)`` (N, T, D) whose
result (N, T, D), or None, is added to the block's output, after the MLP residual (MMA's adapters,
docs/methods/mma.md §14). ``h`` is the tensor the attention reads, computed once. In the split form the branch runs on
the prefix and the suffix separately, so it must act on every position independently (no mixing across positions);
then the split stays exact.

Blocks these forwards cannot run (cross-attention, LayerScale-free custom blocks, biased keys, ...) are reported by
``fusable``; the backbone then calls the block module itself (and never splits a prefix).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from open_clip.transformer import ResidualAttentionBlock
from torch import nn

# A residual branch of one block: ln_1 of the block input (N, T, D) -> what to add to the block output, or None.
Branch = Callable[[torch.Tensor], torch.Tensor | None]


def fusable(block: nn.Module) -> bool:
    """Whether `block` is a plain open_clip residual-attention block whose attention these forwards reproduce."""
    if type(block) is not ResidualAttentionBlock or hasattr(block, "ln_1_kv"):
        return False
    attn = block.attn
    return (
        isinstance(attn, nn.MultiheadAttention)
        and attn.batch_first
        and attn._qkv_same_embed_dim
        and attn.in_proj_weight is not None
        and attn.bias_k is None
        and attn.bias_v is None
        and not attn.add_zero_attn
        and attn.embed_dim % attn.num_heads == 0
    )


def _heads(x: torch.Tensor, attn: nn.MultiheadAttention) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed in-projection of x (N, T, D) -> q, k, v, each (N, H, T, D / H)."""
    n, t, d = x.shape
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)  # (N, T, 3D)
    qkv = qkv.view(n, t, 3, attn.num_heads, d // attn.num_heads).permute(2, 0, 3, 1, 4)  # (3, N, H, T, dh)
    return qkv[0], qkv[1], qkv[2]


def _merge(o: torch.Tensor, attn: nn.MultiheadAttention) -> torch.Tensor:
    """Attention output (N, H, T, dh) -> out-projected (N, T, D)."""
    n, h, t, dh = o.shape
    return attn.out_proj(o.transpose(1, 2).reshape(n, t, h * dh))  # (N, T, D)


def _mlp_residual(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def add_branch(out: torch.Tensor, h: torch.Tensor, branch: Branch | None) -> torch.Tensor:
    """`out` (N, T, D) plus ``branch(h)`` in out's dtype; `out` itself without a branch or when it returns None."""
    if branch is None:
        return out
    delta = branch(h)
    if delta is None:
        return out
    if delta.shape != out.shape:
        raise ValueError(f"a block branch must return the block's shape {tuple(out.shape)}, got {tuple(delta.shape)}")
    return out + delta.to(out.dtype)


def block_forward(
    block: nn.Module, x: torch.Tensor, causal: bool = False, branch: Branch | None = None
) -> torch.Tensor:
    """One residual-attention block on x (N, T, D): causal (text) or unmasked (vision) self-attention; `branch`
    reads ln_1(x) and adds to the output (module docstring)."""
    attn = block.attn
    h = block.ln_1(x)  # (N, T, D)
    q, k, v = _heads(h, attn)  # (N, H, T, dh)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (N, H, T, dh)
    x = x + block.ls_1(_merge(o, attn))  # (N, T, D)
    return add_branch(_mlp_residual(block, x), h, branch)


def module_forward(
    block: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None = None, branch: Branch | None = None
) -> torch.Tensor:
    """The block module's own forward (open_clip's, for blocks `block_forward` cannot run or when fused attention is
    off) with the same branch: ``block(x) + branch(ln_1(x))`` (ln_1 computed again: deterministic, the same values)."""
    out = block(x, attn_mask=attn_mask)  # (N, T, D)
    if branch is None:
        return out
    return add_branch(out, block.ln_1(x), branch)


def suffix_mask(prefix_len: int, suffix_len: int, device: torch.device) -> torch.Tensor:
    """(S, P + S) boolean mask: suffix position j (absolute P + j) sees the whole prefix and suffix 0 … j."""
    return torch.ones(suffix_len, prefix_len + suffix_len, dtype=torch.bool, device=device).tril(prefix_len)


def split_block_forward(
    block: nn.Module,
    prefix: torch.Tensor,
    suffix: torch.Tensor,
    prefix_index: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    branch: Branch | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One causal block on rows that share their first P positions.

    prefix (G, P, D): the shared positions of each group; suffix (N, S, D): every row's remaining positions;
    prefix_index (N,): the group of each row (None: one group). `mask`: ``suffix_mask(P, S)`` when the caller
    has it. `branch`: a per-position residual branch (module docstring), run on the prefix and the suffix
    separately. Returns the block's outputs (G, P, D) and (N, S, D), equal to running every full row
    [prefix[prefix_index[r]]; suffix[r]] through the block.
    """
    attn = block.attn
    n, s, _ = suffix.shape
    p = prefix.shape[1]
    hp, hs = block.ln_1(prefix), block.ln_1(suffix)  # (G, P, D), (N, S, D)
    qp, kp, vp = _heads(hp, attn)  # (G, H, P, dh)
    qs, ks, vs = _heads(hs, attn)  # (N, H, S, dh)
    op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True)  # (G, H, P, dh)
    if prefix_index is None:
        kp, vp = kp.expand(n, -1, -1, -1), vp.expand(n, -1, -1, -1)  # (N, H, P, dh)
    else:
        kp, vp = kp[prefix_index], vp[prefix_index]  # (N, H, P, dh)
    k = torch.cat([kp, ks], dim=2)  # (N, H, P + S, dh)
    v = torch.cat([vp, vs], dim=2)  # (N, H, P + S, dh)
    if mask is None:
        mask = suffix_mask(p, s, suffix.device)
    os_ = F.scaled_dot_product_attention(qs, k, v, attn_mask=mask)  # (N, H, S, dh)
    prefix = add_branch(_mlp_residual(block, prefix + block.ls_1(_merge(op, attn))), hp, branch)  # (G, P, D)
    suffix = add_branch(_mlp_residual(block, suffix + block.ls_1(_merge(os_, attn))), hs, branch)  # (N, S, D)
    return prefix, suffix
