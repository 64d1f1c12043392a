"""CoOp-style class prompts shared by every prompt-learning method.

Prompt text per class: ``"<prefix> <class name>."`` with underscores replaced by spaces (CoOp's PromptLearner,
KaiyangZhou/CoOp trainers/coop.py). Learnable context vectors replace token positions 1 … n_ctx after SOS; the
prefix text may have more words than n_ctx (MaPLe learns "a photo" and keeps "of a" fixed).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mugcp_bench.model.backbone import Backbone


def clean_classname(name: str) -> str:
    return name.replace("_", " ")


def init_context(backbone: Backbone, n_ctx: int, ctx_init: str, std: float = 0.02) -> tuple[torch.Tensor, str]:
    """Initial context (n_ctx, Dt) and the prompt prefix text.

    With `ctx_init` the vectors are the token embeddings at positions 1 … n_ctx of the tokenised init words (the
    prefix stays the whole init text); otherwise N(0, std²) with the prefix "X X … X" (n_ctx words).
    """
    if ctx_init:
        ctx_init = ctx_init.replace("_", " ")
        tokens = backbone.tokenize([ctx_init])
        with torch.no_grad():
            emb = backbone.embed_tokens(tokens)[0]  # (L, Dt)
        return emb[1 : 1 + n_ctx].clone().float().cpu(), ctx_init
    ctx = torch.empty(n_ctx, backbone.text_width)
    nn.init.normal_(ctx, std=std)
    return ctx, " ".join(["X"] * n_ctx)


def common_prefix_len(backbone: Backbone, tokens: torch.Tensor) -> int:
    """Leading positions where every row of `tokens` (N, T) has the same id, at most up to the earliest EOT."""
    same = (tokens == tokens[:1]).all(dim=0).int()  # (T,)
    return min(int(same.cumprod(0).sum()), int(backbone.eot_index(tokens).min()))


class ClassPrompts(nn.Module):
    """Tokenised class prompts and their frozen embedding pieces around the learnable context.

    Buffers are not persistent: checkpoints never hold class-dependent tensors, so a method loads onto any class set.
    Sequences are cut after the longest EOT of the class set (exact for the causal text tower) unless `full_length`.
    ``shared_len``: with the class token at the end, the leading positions every class prompt has in common (SOS,
    the shared context, the fixed prefix words and any first class-name tokens all names share), never past the
    earliest EOT; ``Backbone.encode_text(shared_prefix=...)`` encodes them once. 0 for other positions.
    """

    def __init__(
        self,
        backbone: Backbone,
        classnames: Sequence[str],
        n_ctx: int,
        prefix: str,
        position: str = "end",
        full_length: bool = False,
    ) -> None:
        super().__init__()
        if position not in ("end", "middle", "front"):
            raise ValueError(f"class token position must be end, middle or front, got {position!r}")
        self.n_ctx = n_ctx
        self.position = position
        names = [clean_classname(c) for c in classnames]
        self.name_lens = [backbone.n_text_tokens(n) for n in names]
        tokens = backbone.tokenize([f"{prefix} {n}." for n in names])  # (C, L)
        if not full_length and backbone.eot_truncation:
            tokens = tokens[:, : int(backbone.eot_index(tokens).max()) + 1]  # (C, T)
        with torch.no_grad():
            emb = backbone.embed_tokens(tokens).float()  # (C, T, Dt)
        self.shared_len = common_prefix_len(backbone, tokens) if position == "end" else 0
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("token_prefix", emb[:, :1], persistent=False)  # (C, 1, Dt) SOS
        self.register_buffer("token_suffix", emb[:, 1 + n_ctx :], persistent=False)  # (C, T-1-n_ctx, Dt)

    @property
    def n_cls(self) -> int:
        return self.tokens.shape[0]

    def build(self, ctx: torch.Tensor) -> torch.Tensor:
        """Token embeddings with the context in place.

        ctx (n_ctx, D) shared, or (C, n_ctx, D) class-specific -> (C, T, D); ctx (B, n_ctx, D) with
        ``instance=True`` semantics is handled by :meth:`build_instance`.
        """
        prefix, suffix = self.token_prefix, self.token_suffix
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(self.n_cls, -1, -1)  # (C, n_ctx, D)
        ctx = ctx.to(suffix.dtype)
        if self.position == "end":
            return torch.cat([prefix, ctx, suffix], dim=1)  # (C, T, D)
        rows = []
        half = self.n_ctx // 2
        for i, n in enumerate(self.name_lens):
            p, c, s = prefix[i : i + 1], ctx[i : i + 1], suffix[i : i + 1]
            name, rest = s[:, :n], s[:, n:]
            if self.position == "middle":
                rows.append(torch.cat([p, c[:, :half], name, c[:, half:], rest], dim=1))
            else:  # front
                rows.append(torch.cat([p, name, c, rest], dim=1))
        return torch.cat(rows)  # (C, T, D)

    def build_instance(self, ctx: torch.Tensor) -> torch.Tensor:
        """Per-image context (B, n_ctx, D) -> (B, C, T, D) ('end' position)."""
        b, c = ctx.shape[0], self.n_cls
        prefix = self.token_prefix.unsqueeze(0).expand(b, -1, -1, -1)  # (B, C, 1, D)
        suffix = self.token_suffix.unsqueeze(0).expand(b, -1, -1, -1)  # (B, C, S, D)
        ctx = ctx.to(suffix.dtype).unsqueeze(1).expand(-1, c, -1, -1)  # (B, C, n_ctx, D)
        return torch.cat([prefix, ctx, suffix], dim=2)
