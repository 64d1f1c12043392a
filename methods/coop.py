"""CoOp: learnable context vectors in front of (or around) each class name (docs/methods/coop.md §2).

Matched against KaiyangZhou/CoOp @ ff61507: ``trainers/coop.py`` (PromptLearner, CustomCLIP), ``train.py``
(defaults N_CTX 16, CSC False, CTX_INIT "", CLASS_TOKEN_POSITION end) and ``configs/trainers/CoOp/*.yaml``.
The image tower is untouched, so image features may be cached; text features depend only on the context, so
evaluation encodes the C class prompts once (``begin_eval``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mugcp_bench.errors import UserError
from mugcp_bench.methods.base import TOY_TRAIN, Provenance, SharedTextMethod
from mugcp_bench.methods.prompts import ClassPrompts, init_context
from mugcp_bench.registry import METHODS

log = logging.getLogger(__name__)

POSITIONS = ("end", "middle", "front")


@dataclass
class CoOpConfig:
    n_ctx: int = 16  # context vectors (reference default); replaced by the word count when ctx_init is given
    ctx_init: str = ""  # initialisation words ("a photo of a"); "" = random N(0, init_std²) with prefix "X X … X"
    csc: bool = False  # class-specific context (random init only, as in the reference)
    class_token_position: str = "end"  # end | middle | front
    init_std: float = 0.02


def effective_n_ctx(n_ctx: int, ctx_init: str) -> int:
    """CoOp's rule: with init words, n_ctx := number of space-separated words (one BPE token per word assumed)."""
    if ctx_init:
        return len(ctx_init.replace("_", " ").split(" "))
    return n_ctx


def context_couplings(method: str, cfg: Any) -> dict[str, str]:
    """CoOp's rule as `Method.ignored_settings` states it: with init words, n_ctx is their count and the random init's
    std is unused."""
    if not cfg.ctx_init:
        return {}
    out = {"init_std": f"{method} initialises its context from ctx_init '{cfg.ctx_init}'; init_std applies to a "
                       "random context: also --set ctx_init="}  # fmt: skip
    n = effective_n_ctx(cfg.n_ctx, cfg.ctx_init)
    if cfg.n_ctx != n:
        out["n_ctx"] = (
            f"{method} takes n_ctx from ctx_init '{cfg.ctx_init}' ({n} words); for a random context of {cfg.n_ctx} "
            "tokens also --set ctx_init="
        )
    return out


def frozen_image_features(
    backbone: Any, images: torch.Tensor | None, image_features: torch.Tensor | None
) -> torch.Tensor:
    """Features (B, E) of the untouched image tower: the cached ones when given, else encoded without a graph."""
    if image_features is not None:
        return image_features
    if images is None:
        raise ValueError("either images or image_features is required")
    with torch.no_grad():
        return backbone.encode_image(images)  # (B, E)


# Few-shot epochs of the IJCV configs vit_b16 / vit_b16_ep100 / vit_b16_ep50 (scripts/coop/main.sh usage).
def few_shot_epochs(shots: int) -> int:
    if shots >= 8:
        return 200
    if shots >= 2:
        return 100
    return 50


_CTXV1 = {"n_ctx": 4, "ctx_init": "a photo of a", "csc": False, "class_token_position": "end"}
_IJCV = {"n_ctx": 16, "ctx_init": "", "csc": False, "class_token_position": "end"}
_PAPER_OPT = {"batch_size": 32, "lr": 0.002, "eval_batch_size": 100}


@METHODS.register("coop")
class CoOp(SharedTextMethod):
    """Context Optimization (Zhou et al., IJCV 2022): n_ctx learnable text tokens shared by all classes."""

    name = "coop"
    report_order = 100
    color = "#1f77b4"
    in_default_set = True
    Config = CoOpConfig
    frozen_image_path = True
    reference_fp32 = ()  # reference-fp16: the context in fp16 (trainers/coop.py builds it in clip_model.dtype)
    recipes = {
        "paper": {
            # vit_b16_ctxv1 (10 datasets, 200 epochs); ImageNet uses vit_b16_ep50_ctxv1 (see `recipe`).
            "base2novel": {**_CTXV1, **_PAPER_OPT, "epochs": 200},
            # vit_b16_ep50_ctxv1 on ImageNet, the cross-dataset / DG source (CoCoOp's xd scripts).
            "xd": {**_CTXV1, **_PAPER_OPT, "epochs": 50},
            # IJCV few-shot: 16 random ctx, end, unified; epochs by shots (see `recipe`).
            "few_shot": {**_IJCV, **_PAPER_OPT, "epochs": 200},
        },
        # Toy world (our design): same prompt structure, a budget that runs in seconds on a CPU; 4 random ctx for
        # few-shot keep the toy text sequences short.
        "toy": {
            "base2novel": {**_CTXV1, **TOY_TRAIN, "batch_size": 32, "lr": 0.01, "epochs": 10},
            "xd": {**_CTXV1, **TOY_TRAIN, "batch_size": 32, "lr": 0.01, "epochs": 5},
            "few_shot": {**_IJCV, **TOY_TRAIN, "n_ctx": 4, "batch_size": 32, "lr": 0.01, "epochs": 10},
        },
        # DePT's re-run of CoOp (Koorye/DePT@d4ff416 configs.py `coop`: configs/trainers/CoOp/vit_b16_ep10_bs4_lr35.yaml
        # with train.py's TRAINER.COOP defaults): 16 random context tokens, batch 4, LR 0.0035, 10 epochs; its xd mode
        # trains ImageNet (all classes) with the same config; no few-shot mode. The recipe of coop+dept too.
        "dept": {
            p: {**_IJCV, "batch_size": 4, "lr": 0.0035, "epochs": 10, "eval_batch_size": 100}
            for p in ("base2novel", "xd")
        },
    }
    provenance = {
        "dept": Provenance(
            "Koorye/DePT",
            "d4ff41684bac42da30ebb6898496772dec3157f2",
            {p: "configs/trainers/CoOp/vit_b16_ep10_bs4_lr35.yaml" for p in ("base2novel", "xd")},
            "DePT's re-run of CoOp (configs.py `coop`; N_CTX 16 and an empty CTX_INIT from train.py); xd: "
            "parallel_runner.py trains ImageNet with the same config; PREC fp16 in the reference "
            "(--precision reference-fp16); no few-shot mode",
        ),
    }
    # `ablate --drop init` -> variant no-init: random N(0, 0.02²) context of the same length instead of the word
    # initialisation. A no-op for the few-shot recipe, whose context is random already.
    ablations = {"init": {"ctx_init": ""}}
    # KaiyangZhou/CoOp@ff61507 trainers/coop.py saves the PromptLearner as "prompt_learner": ctx (n_ctx, D), or
    # (C, n_ctx, D) with CSC, plus the class buffers its load_model deletes (docs/interop.md, coop).
    reference_checkpoint = dict(
        trainer="CoOp",
        learner="prompt_learner",
        keys={"ctx": "ctx"},
        config={"n_ctx": ("shape", "ctx", -2), "csc": ("ndim", "ctx", 3)},
        options={
            "n_ctx": "TRAINER.COOP.N_CTX",
            "csc": "TRAINER.COOP.CSC",
            "ctx_init": "TRAINER.COOP.CTX_INIT",
            "class_token_position": "TRAINER.COOP.CLASS_TOKEN_POSITION",
        },
        configs={
            "base2novel": "configs/trainers/CoOp/vit_b16_ctxv1.yaml",
            "xd": "configs/trainers/CoOp/vit_b16_ep50_ctxv1.yaml",
            "few_shot": "configs/trainers/CoOp/vit_b16.yaml",
        },
        repo="KaiyangZhou/CoOp@ff61507",
    )

    def __init__(
        self,
        backbone,
        classnames: Sequence[str],
        cfg: CoOpConfig,
        template: str = "a photo of a {}.",
        dataset: str = "",
    ) -> None:
        super().__init__(backbone, classnames, cfg, template, dataset)
        if cfg.class_token_position not in POSITIONS:
            raise UserError(
                f"coop: class_token_position must be one of {', '.join(POSITIONS)}, got '{cfg.class_token_position}'"
            )
        self.n_ctx = effective_n_ctx(cfg.n_ctx, cfg.ctx_init)
        if self.n_ctx < 1:
            raise UserError(f"coop: n_ctx must be at least 1, got {self.n_ctx}")
        ctx, self.prefix = init_context(backbone, self.n_ctx, cfg.ctx_init, cfg.init_std)  # (n_ctx, Dt)
        if cfg.csc and not cfg.ctx_init:  # with ctx_init the reference builds one shared context (refused when planned)
            ctx = torch.empty(len(self.classnames), self.n_ctx, backbone.text_width)  # (C, n_ctx, Dt)
            nn.init.normal_(ctx, std=cfg.init_std)
        self.ctx = nn.Parameter(ctx)
        self._trained_classes = list(self.classnames)
        self.prompts = self._build_prompts()

    @classmethod
    def ignored_settings(cls, cfg: CoOpConfig) -> dict[str, str]:
        return context_couplings("coop", cfg) | (
            {"csc": "a class-specific context needs a random init (the reference ignores csc with ctx_init); "
                    "also --set ctx_init="}
            if cfg.ctx_init and cfg.csc else {}
        )  # fmt: skip

    @property
    def class_specific(self) -> bool:
        return self.ctx.dim() == 3

    def _build_prompts(self) -> ClassPrompts:
        return ClassPrompts(self.backbone, self.classnames, self.n_ctx, self.prefix, self.cfg.class_token_position)

    def set_classnames(self, classnames: Sequence[str], template: str | None = None, dataset: str | None = None):
        if self.class_specific and list(classnames) != self._trained_classes:
            raise UserError(
                "coop with csc=true learns one context per training class and cannot be evaluated on other classes; "
                "use csc=false for base-to-novel and cross-dataset evaluation"
            )
        super().set_classnames(classnames, template, dataset)
        self.prompts = self._build_prompts().to(self.ctx.device)
        self.refresh_eval()

    def text_features(self) -> torch.Tensor:
        """Class text features (C, E), unnormalised, with the current context."""
        embeds = self.prompts.build(self.ctx).to(self.backbone.dtype)  # (C, T, Dt)
        shared = 0 if self.class_specific else self.prompts.shared_len  # SOS + ctx + prefix words, once
        return self.backbone.encode_text(embeds, self.prompts.tokens, shared_prefix=shared)  # (C, E)

    def image_features(self, images, image_features=None) -> torch.Tensor:
        return frozen_image_features(self.backbone, images, image_features)  # (B, E)

    # --- recipes ----------------------------------------------------------------------------------------------------
    @classmethod
    def recipe(cls, recipe: str, train_protocol: str, shots: int, dataset: str) -> dict[str, Any]:
        """Paper epochs depend on the data: ImageNet always 50 (vit_b16_ep50*), few-shot 200 / 100 / 50 by shots."""
        out = super().recipe(recipe, train_protocol, shots, dataset)
        if recipe == "paper":
            if dataset == "imagenet":
                out["epochs"] = 50
            elif train_protocol == "few_shot":
                out["epochs"] = few_shot_epochs(shots)
        return out
