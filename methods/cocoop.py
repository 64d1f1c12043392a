"""CoCoOp: CoOp's context shifted per image by a small Meta-Net (docs/methods/cocoop.md §3).

Matched against KaiyangZhou/CoOp @ ff61507: ``trainers/cocoop.py`` (PromptLearner with ``meta_net`` =
linear1 → relu → linear2, CustomCLIP.forward normalising the image features before the Meta-Net), ``train.py``
(defaults N_CTX 16, CTX_INIT "") and ``configs/trainers/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml``.

Every image gets its own C prompts, so text features cannot be cached: B × C text sequences per batch. They are
encoded in chunks of at most ``text_chunk`` sequences (our design): at evaluation memory stays bounded whatever
B × C is; in training each chunk is gradient-checkpointed when there is more than one, so the activations kept for
the backward pass are those of one chunk plus the (B × C, E) features.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mugcp_bench.errors import UserError
from mugcp_bench.methods.base import TOY_TRAIN, Method, MethodOutput, Provenance, cosine_logits
from mugcp_bench.methods.coop import context_couplings, effective_n_ctx, frozen_image_features
from mugcp_bench.methods.prompts import ClassPrompts, init_context
from mugcp_bench.registry import METHODS

log = logging.getLogger(__name__)


@dataclass
class CoCoOpConfig:
    n_ctx: int = 16  # reference default; replaced by the word count when ctx_init is given
    ctx_init: str = ""  # "a photo of a" in every released config; "" = random N(0, init_std²)
    init_std: float = 0.02
    meta_net: bool = True  # False: no Meta-Net (plain CoOp context, for the `metanet` ablation)
    text_chunk: int = 1024  # max text sequences per encoder pass (B × C are split); <= 0: no chunking


# vit_b16_c4_ep10_batch1_ctxv1: 4 ctx from "a photo of a", batch 1, lr 0.002, 10 epochs, test batch 100.
_C4_EP10_BATCH1 = {"n_ctx": 4, "ctx_init": "a photo of a", "batch_size": 1, "lr": 0.002, "epochs": 10}


@METHODS.register("cocoop")
class CoCoOp(Method):
    """Conditional Context Optimization (Zhou et al., CVPR 2022)."""

    name = "cocoop"
    report_order = 200
    color = "#ff7f0e"
    in_default_set = True
    Config = CoCoOpConfig
    frozen_image_path = True
    # reference-fp16: context and Meta-Net in fp16 (trainers/cocoop.py: clip_model.dtype, meta_net.half() for fp16)
    reference_fp32 = ()
    recipes = {
        "paper": {
            "base2novel": dict(_C4_EP10_BATCH1),
            "xd": dict(_C4_EP10_BATCH1),  # the same config trained on ImageNet (scripts/cocoop/xd_train.sh)
            # No few-shot config exists in the reference; our choice: the base-to-novel config.
            "few_shot": dict(_C4_EP10_BATCH1),
        },
        # Toy world (our design): batch 4 instead of 1 so an epoch is a few dozen steps on a CPU.
        "toy": {
            p: {**TOY_TRAIN, "n_ctx": 4, "ctx_init": "a photo of a", "batch_size": 4, "lr": 0.01, "epochs": 5}
            for p in ("base2novel", "xd", "few_shot")
        },
        # DePT's re-run of CoCoOp (Koorye/DePT@d4ff416 configs.py `cocoop`,
        # configs/trainers/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml): the released config, LR 0.002 and batch 1; its
        # xd mode trains ImageNet with it; no few-shot mode. The recipe of cocoop+dept too.
        "dept": {p: {**_C4_EP10_BATCH1, "eval_batch_size": 100} for p in ("base2novel", "xd")},
    }
    provenance = {
        "dept": Provenance(
            "Koorye/DePT",
            "d4ff41684bac42da30ebb6898496772dec3157f2",
            {p: "configs/trainers/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml" for p in ("base2novel", "xd")},
            "DePT's re-run of CoCoOp (configs.py `cocoop`); xd: parallel_runner.py trains ImageNet with the same "
            "config; PREC fp16 in the reference (--precision reference-fp16); no few-shot mode",
        ),
    }
    # no-metanet: CoOp's shared context under CoCoOp's budget; no-init: random context of the same length.
    ablations = {"metanet": {"meta_net": False}, "init": {"ctx_init": ""}}
    # KaiyangZhou/CoOp@ff61507 trainers/cocoop.py saves the PromptLearner as "prompt_learner": ctx and the Meta-Net
    # under our names, plus the class buffers its load_model deletes; it always has a Meta-Net (docs/interop.md).
    reference_checkpoint = dict(
        trainer="CoCoOp",
        learner="prompt_learner",
        keys={"ctx": "ctx", "meta_net.*": "meta_net.*"},
        config={"n_ctx": ("shape", "ctx", 0)},
        requires={"meta_net": True},
        options={"n_ctx": "TRAINER.COCOOP.N_CTX", "ctx_init": "TRAINER.COCOOP.CTX_INIT"},
        configs={
            p: "configs/trainers/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml" for p in ("base2novel", "xd", "few_shot")
        },
        repo="KaiyangZhou/CoOp@ff61507",
    )

    @classmethod
    def ignored_settings(cls, cfg: CoCoOpConfig) -> dict[str, str]:
        return context_couplings("cocoop", cfg)

    def __init__(
        self,
        backbone,
        classnames: Sequence[str],
        cfg: CoCoOpConfig,
        template: str = "a photo of a {}.",
        dataset: str = "",
    ) -> None:
        super().__init__(backbone, classnames, cfg, template, dataset)
        self.n_ctx = effective_n_ctx(cfg.n_ctx, cfg.ctx_init)
        if self.n_ctx < 1:
            raise UserError(f"cocoop: n_ctx must be at least 1, got {self.n_ctx}")
        ctx, self.prefix = init_context(backbone, self.n_ctx, cfg.ctx_init, cfg.init_std)  # (n_ctx, Dt)
        self.ctx = nn.Parameter(ctx)
        if cfg.meta_net:
            vis_dim, ctx_dim = backbone.embed_dim, backbone.text_width
            self.meta_net = nn.Sequential(
                OrderedDict(
                    [
                        ("linear1", nn.Linear(vis_dim, vis_dim // 16)),
                        ("relu", nn.ReLU(inplace=True)),
                        ("linear2", nn.Linear(vis_dim // 16, ctx_dim)),
                    ]
                )
            )
        else:
            self.meta_net = None
        self.prompts = ClassPrompts(backbone, self.classnames, self.n_ctx, self.prefix)
        self._eval_text: torch.Tensor | None = None

    @property
    def instance_conditional(self) -> bool:
        return self.meta_net is not None

    def set_classnames(self, classnames: Sequence[str], template: str | None = None, dataset: str | None = None):
        super().set_classnames(classnames, template, dataset)
        self.prompts = ClassPrompts(self.backbone, self.classnames, self.n_ctx, self.prefix).to(self.ctx.device)
        if self._eval_text is not None:
            self.begin_eval()

    def instance_context(self, image_f: torch.Tensor) -> torch.Tensor:
        """Per-image context ctx + π(f) (B, n_ctx, Dt) from L2-normalised image features f (B, E)."""
        ctx = self.ctx.unsqueeze(0)  # (1, n_ctx, Dt)
        if self.meta_net is None:
            return ctx.expand(image_f.shape[0], -1, -1)  # (B, n_ctx, Dt)
        bias = self.meta_net(image_f.to(self.ctx.dtype))  # (B, Dt)
        return ctx + bias.unsqueeze(1)  # (B, n_ctx, Dt)

    def _encode_rows(self, ctx_rows: torch.Tensor, cls: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        """Text features (n, E) of the prompts of classes `cls` (n,) with per-row contexts (n, n_ctx, Dt); rows of
        one image (`img` (n,), non-decreasing) share their context, so their prompt prefix is encoded once."""
        p = self.prompts
        dtype = self.backbone.dtype
        embeds = torch.cat([p.token_prefix[cls], ctx_rows.to(dtype), p.token_suffix[cls].to(dtype)], dim=1)  # (n,T,Dt)
        group = img - img[0]  # (n,) image of each row within this chunk, 0 … G−1
        return self.backbone.encode_text(embeds, p.tokens[cls], shared_prefix=p.shared_len, prefix_index=group)

    def instance_text_features(self, ctx: torch.Tensor) -> torch.Tensor:
        """All C prompts for every image: contexts (B, n_ctx, Dt) -> text features (B, C, E), chunked."""
        b, c = ctx.shape[0], self.prompts.n_cls
        total = b * c
        chunk = self.cfg.text_chunk if self.cfg.text_chunk > 0 else total
        rows = torch.arange(total, device=ctx.device)
        checkpointed = torch.is_grad_enabled() and ctx.requires_grad and total > chunk
        outs = []
        for s in range(0, total, chunk):
            idx = rows[s : s + chunk]
            img, cls = idx // c, idx % c
            if checkpointed:  # keep one chunk's activations; recompute them in the backward pass
                outs.append(checkpoint(self._encode_rows, ctx[img], cls, img, use_reentrant=False))
            else:
                outs.append(self._encode_rows(ctx[img], cls, img))
        return torch.cat(outs).view(b, c, -1)  # (B, C, E)

    def instance_logits(self, image_f: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        """Evaluation logits (B, C) from image features (B, E) and per-image contexts (B, n_ctx, Dt) without ever
        holding the (B, C, E) text features: each chunk of prompts is reduced to its cosine logits at once, so memory
        is one chunk plus the (B, C) logits whatever B × C is (BENCHMARKS.md, gap 6). Same numbers as
        `cosine_logits` on `instance_text_features` up to summation order."""
        b, c = ctx.shape[0], self.prompts.n_cls
        total = b * c
        chunk = self.cfg.text_chunk if self.cfg.text_chunk > 0 else total
        rows = torch.arange(total, device=ctx.device)
        image_n = F.normalize(image_f, dim=-1)  # (B, E)
        cos = []
        for s in range(0, total, chunk):
            idx = rows[s : s + chunk]
            img, cls = idx // c, idx % c
            text_n = F.normalize(self._encode_rows(ctx[img], cls, img), dim=-1)  # (r, E)
            cos.append((image_n[img] * text_n).sum(-1))  # (r,)
        return self.backbone.logit_scale * torch.cat(cos).view(b, c)  # (B, C)

    def shared_text_features(self) -> torch.Tensor:
        """Without a Meta-Net the prompts are the same for every image: (C, E), encoded once."""
        embeds = self.prompts.build(self.ctx).to(self.backbone.dtype)  # (C, T, Dt)
        chunk, shared = self.cfg.text_chunk, self.prompts.shared_len
        return self.backbone.encode_text_chunked(embeds, self.prompts.tokens, chunk, shared_prefix=shared)  # (C, E)

    def forward(self, images, keys=None, image_features=None) -> MethodOutput:
        return MethodOutput(self._logits(images, image_features, cached_text=None))

    def _logits(self, images, image_features, cached_text: torch.Tensor | None) -> torch.Tensor:
        image_f = frozen_image_features(self.backbone, images, image_features)  # (B, E)
        image_f = F.normalize(image_f, dim=-1)  # normalised BEFORE the Meta-Net, as the reference
        if self.meta_net is None:
            text_f = cached_text if cached_text is not None else self.shared_text_features()  # (C, E)
        else:
            ctx = self.instance_context(image_f)  # (B, n_ctx, Dt)
            if not torch.is_grad_enabled():  # evaluation: chunks reduced to logits, no (B, C, E) tensor
                return self.instance_logits(image_f, ctx)  # (B, C)
            text_f = self.instance_text_features(ctx)  # (B, C, E)
        return cosine_logits(self.backbone.logit_scale, image_f, text_f)  # (B, C)

    # --- evaluation: per-image prompts cannot be cached; only the no-metanet variant caches its C features --------
    @torch.no_grad()
    def begin_eval(self) -> None:
        self._eval_text = self.shared_text_features() if self.meta_net is None else None

    def end_eval(self) -> None:
        self._eval_text = None

    @torch.no_grad()
    def predict(self, images, keys=None, image_features=None) -> torch.Tensor:
        return self._logits(images, image_features, cached_text=self._eval_text)  # (B, C), chunked per image
