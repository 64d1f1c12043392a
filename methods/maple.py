"""MaPLe: multi-modal prompts, vision prompts coupled to the text prompts by linear maps (docs/methods/maple.md §4).

Matched against muzairkhattak/multimodal-prompt-learning @ 69bce21:
- ``trainers/maple.py`` (MultiModalPromptLearner): ctx from the first n_ctx tokens of "a photo of a" (the prefix
  stays the whole phrase), ``proj`` Linear(512 → 768) for the input-level vision prompt, PROMPT_DEPTH − 1 deep text
  prompts N(0, 0.02²) and PROMPT_DEPTH − 1 Linear(512 → 768) layers deep-copied from one initialised layer
  (``_get_clones``); defaults N_CTX 2, CTX_INIT "a photo of a", PROMPT_DEPTH 9 (``train.py``).
- ``clip/model.py`` (ResidualAttentionBlock_MaPLe, VisionTransformer_MaPLe): the shallow vision prompt is appended
  after the positional embedding and before ln_pre; every block except the first replaces, *before* its attention,
  the last n_ctx vision tokens / text positions 1 … n_ctx with the next deep prompt while a counter lasts, so depth
  9 prompts the input and blocks 1 … 8 (multimodal-prompt-learning#72).
- ``configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx{,_cross_datasets}.yaml``.

Widths are read from the backbone (text_width → vision_width; 512 → 768 on ViT-B/16). ``coupling=false`` replaces
the linear maps by free vision prompts N(0, 0.02²) at the same places: independent V-L prompting (IVLP, the
reference's ``independentVL`` trainer with equal depths and lengths).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mugcp_bench.errors import UserError
from mugcp_bench.methods.base import TOY_TRAIN, Provenance, SharedTextMethod
from mugcp_bench.methods.prompts import ClassPrompts, init_context
from mugcp_bench.registry import METHODS

log = logging.getLogger(__name__)


@dataclass
class MaPLeConfig:
    n_ctx: int = 2  # learnable tokens per tower and layer
    ctx_init: str = "a photo of a"  # used only when n_ctx <= 4 (the reference's rule); else random, prefix "X …"
    prompt_depth: int = 9  # input + blocks 1 … depth−1; 1 = shallow MaPLe
    coupling: bool = True  # False: free vision prompts, no text → vision maps (IVLP-like)
    init_std: float = 0.02


_C2 = {"n_ctx": 2, "ctx_init": "a photo of a"}  # the "2ctx" of both released configs


@METHODS.register("maple")
class MaPLe(SharedTextMethod):
    """Multi-modal Prompt Learning (Khattak et al., CVPR 2023)."""

    name = "maple"
    report_order = 400
    color = "#2ca02c"
    in_default_set = True
    Config = MaPLeConfig
    # reference-fp16: ctx and proj in fp16 (trainers/maple.py: clip_model.dtype, proj.half()); the deep text prompts
    # and their projections stay fp32 (created without a dtype, never converted) and are cast to fp16 where they
    # enter a block (clip/model.py ResidualAttentionBlock_MaPLe). IVLP's free vision prompts live in the reference's
    # CLIP as plain fp32 parameters (clip/model.py VisionTransformer VPT): fp32 too.
    reference_fp32 = (
        "compound_prompts_text.*",
        "compound_prompt_projections.*",
        "vision_ctx",
        "compound_prompts_vision.*",
    )
    recipes = {
        "paper": {
            # vit_b16_c2_ep5_batch4_2ctx
            "base2novel": {
                **_C2,
                "prompt_depth": 9,
                "batch_size": 4,
                "lr": 0.0035,
                "epochs": 5,
                "eval_batch_size": 100,
            },
            # vit_b16_c2_ep5_batch4_2ctx_cross_datasets (ImageNet source for cross-dataset and DG)
            "xd": {**_C2, "prompt_depth": 3, "batch_size": 4, "lr": 0.0026, "epochs": 2, "eval_batch_size": 100},
            # No few-shot entry: the reference has no few-shot config for MaPLe (PromptSRC#21); the planner
            # reports "no 'paper' recipe for protocol 'few_shot'".
        },
        # Toy world (our design; depth <= 3 on the 4-layer toy CLIP); few_shot reuses the base-to-novel budget.
        "toy": {
            "base2novel": {**_C2, **TOY_TRAIN, "prompt_depth": 3, "batch_size": 4, "lr": 0.0035, "epochs": 5},
            "xd": {**_C2, **TOY_TRAIN, "prompt_depth": 3, "batch_size": 4, "lr": 0.0026, "epochs": 2},
            "few_shot": {**_C2, **TOY_TRAIN, "prompt_depth": 3, "batch_size": 4, "lr": 0.0035, "epochs": 5},
        },
        # DePT's re-run of MaPLe (Koorye/DePT@d4ff416 configs.py `maple`,
        # configs/trainers/MaPLe/vit_b16_c2_ep10_batch4_2ctx.yaml): depth 9, batch 4, LR 0.0035, **10** epochs; its xd
        # mode trains ImageNet with the same config (depth 9, not the cross-dataset config's 3); no few-shot mode.
        # The recipe of maple+dept too.
        "dept": {
            p: {**_C2, "prompt_depth": 9, "batch_size": 4, "lr": 0.0035, "epochs": 10, "eval_batch_size": 100}
            for p in ("base2novel", "xd")
        },
    }
    provenance = {
        "dept": Provenance(
            "Koorye/DePT",
            "d4ff41684bac42da30ebb6898496772dec3157f2",
            {p: "configs/trainers/MaPLe/vit_b16_c2_ep10_batch4_2ctx.yaml" for p in ("base2novel", "xd")},
            "DePT's re-run of MaPLe (configs.py `maple`); xd: parallel_runner.py trains ImageNet with the same config; "
            "PREC fp16 in the reference (--precision reference-fp16); no few-shot mode",
        ),
    }
    # no-coupling: IVLP-like independent vision prompts; no-deep: shallow MaPLe (prompts at the input only).
    ablations = {"coupling": {"coupling": False}, "deep": {"prompt_depth": 1}}
    # multimodal-prompt-learning@69bce21 trainers/maple.py saves the whole CustomCLIP as "MultiModalPromptLearner":
    # our tensors under "prompt_learner.", the class buffers, the frozen CLIP (image_encoder / text_encoder). The
    # coupling=false variant is the IVLP trainer's file (trainers/independentVL.py, "VLPromptLearner": deep prompts
    # as VPT_shallow of the blocks they enter), used when --method maple is named (docs/interop.md).
    reference_checkpoint = (
        dict(
            trainer="MaPLe",
            learner="MultiModalPromptLearner",
            keys={"*": "prompt_learner.*"},
            deleted_buffers="whole_model",
            frozen="clip",
            config={
                "n_ctx": ("shape", "prompt_learner.ctx", 0),
                "prompt_depth": ("count", "prompt_learner.compound_prompts_text.{i}", 1),
            },
            requires={"coupling": True},
            options={
                "n_ctx": "TRAINER.MAPLE.N_CTX",
                "ctx_init": "TRAINER.MAPLE.CTX_INIT",
                "prompt_depth": "TRAINER.MAPLE.PROMPT_DEPTH",
            },
            configs={
                "base2novel": "configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml",
                "xd": "configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx_cross_datasets.yaml",
            },
            fp16_always=("prompt_learner.proj.*",),
            repo="muzairkhattak/multimodal-prompt-learning@69bce21",
        ),
        dict(
            trainer="IVLP",
            learner="VLPromptLearner",
            keys={
                "ctx": "prompt_learner.ctx",
                "compound_prompts_text.{i}": "text_encoder.transformer.resblocks.{i+1}.VPT_shallow",
                "vision_ctx": "image_encoder.VPT",
                "compound_prompts_vision.{i}": "image_encoder.transformer.resblocks.{i+1}.VPT_shallow",
            },
            deleted_buffers="whole_model",
            frozen="clip",
            config={
                "n_ctx": ("shape", "prompt_learner.ctx", 0),
                "prompt_depth": ("count", "text_encoder.transformer.resblocks.{i}.VPT_shallow", 1),
            },
            requires={"coupling": False},
            options={
                "n_ctx": ("TRAINER.IVLP.N_CTX_TEXT", "TRAINER.IVLP.N_CTX_VISION"),
                "prompt_depth": ("TRAINER.IVLP.PROMPT_DEPTH_TEXT", "TRAINER.IVLP.PROMPT_DEPTH_VISION"),
                "ctx_init": "TRAINER.IVLP.CTX_INIT",
            },
            configs={p: "configs/trainers/IVLP/vit_b16_c2_ep5_batch4_2+2ctx.yaml" for p in ("base2novel", "xd")},
            repo="muzairkhattak/multimodal-prompt-learning@69bce21",
            secondary=True,
        ),
    )

    @classmethod
    def ignored_settings(cls, cfg: MaPLeConfig) -> dict[str, str]:
        # MultiModalPromptLearner uses the init words only for n_ctx <= 4, and then not the random init's std
        if cfg.ctx_init and cfg.n_ctx > 4:
            return {"ctx_init": f"maple uses init words only for n_ctx <= 4 (here {cfg.n_ctx}: a random context); "
                                "also --set n_ctx=4 or fewer"}  # fmt: skip
        if cfg.ctx_init:
            return {"init_std": f"maple initialises its context from ctx_init '{cfg.ctx_init}'; init_std applies to "
                                "a random context: also --set ctx_init="}  # fmt: skip
        return {}

    def __init__(
        self,
        backbone,
        classnames: Sequence[str],
        cfg: MaPLeConfig,
        template: str = "a photo of a {}.",
        dataset: str = "",
    ) -> None:
        super().__init__(backbone, classnames, cfg, template, dataset)
        max_depth = min(backbone.vision_layers, backbone.text_layers)
        if not 1 <= cfg.prompt_depth <= max_depth:
            raise UserError(
                f"maple: prompt_depth must be in 1 … {max_depth} for '{backbone.name}' ({max_depth} layers), got "
                f"{cfg.prompt_depth}; --set maple.prompt_depth={max_depth} or less"
            )
        if cfg.n_ctx < 1:
            raise UserError(f"maple: n_ctx must be at least 1, got {cfg.n_ctx}")
        self.n_ctx = cfg.n_ctx
        self.depth = cfg.prompt_depth
        dt, dv = backbone.text_width, backbone.vision_width
        ctx_init = cfg.ctx_init if cfg.n_ctx <= 4 else ""  # MultiModalPromptLearner: `if ctx_init and n_ctx <= 4`
        ctx, self.prefix = init_context(backbone, self.n_ctx, ctx_init, cfg.init_std)  # (n_ctx, Dt)
        self.ctx = nn.Parameter(ctx)
        deep_text = []
        for _ in range(self.depth - 1):
            p = torch.empty(self.n_ctx, dt)
            nn.init.normal_(p, std=cfg.init_std)
            deep_text.append(nn.Parameter(p))
        self.compound_prompts_text = nn.ParameterList(deep_text)  # depth−1 x (n_ctx, Dt)
        if cfg.coupling:
            self.proj = nn.Linear(dt, dv)  # shallow coupling: vision input prompt = proj(ctx)
            single = nn.Linear(dt, dv)  # one initialised layer, copied: the deep maps start identical
            self.compound_prompt_projections = nn.ModuleList([copy.deepcopy(single) for _ in range(self.depth - 1)])
        else:
            vision = torch.empty(self.n_ctx, dv)
            nn.init.normal_(vision, std=cfg.init_std)
            self.vision_ctx = nn.Parameter(vision)  # (n_ctx, Dv)
            deep_vision = []
            for _ in range(self.depth - 1):
                p = torch.empty(self.n_ctx, dv)
                nn.init.normal_(p, std=cfg.init_std)
                deep_vision.append(nn.Parameter(p))
            self.compound_prompts_vision = nn.ParameterList(deep_vision)  # depth−1 x (n_ctx, Dv)
        self.prompts = ClassPrompts(backbone, self.classnames, self.n_ctx, self.prefix)

    def set_classnames(self, classnames: Sequence[str], template: str | None = None, dataset: str | None = None):
        super().set_classnames(classnames, template, dataset)
        self.prompts = ClassPrompts(self.backbone, self.classnames, self.n_ctx, self.prefix).to(self.ctx.device)
        self.refresh_eval()

    # --- prompts --------------------------------------------------------------------------------------------------
    def vision_prompts(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Input-level vision prompt (n_ctx, Dv) and the deep ones, depth−1 x (n_ctx, Dv)."""
        if self.cfg.coupling:
            shallow = self.proj(self.ctx)  # (n_ctx, Dv)
            deep = [f(p) for f, p in zip(self.compound_prompt_projections, self.compound_prompts_text)]
            return shallow, deep
        return self.vision_ctx, list(self.compound_prompts_vision)

    def text_features(self) -> torch.Tensor:
        """Class text features (C, E), unnormalised; deep text prompts replace positions 1 … n_ctx."""
        deep = list(self.compound_prompts_text)
        n = self.n_ctx

        def layer_fn(i: int, x: torch.Tensor) -> torch.Tensor:  # before text block i; x: the shared prefix (1, P, Dt)
            if 1 <= i < self.depth:  # (or every row (C, T, Dt) when the backbone does not share it)
                p = deep[i - 1].to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)  # (·, n_ctx, Dt)
                x = torch.cat([x[:, :1], p, x[:, 1 + n :]], dim=1)
            return x

        # Positions 1 … n_ctx are inside the shared prefix at every layer: the deep prompts are shared by all classes.
        embeds = self.prompts.build(self.ctx).to(self.backbone.dtype)  # (C, T, Dt)
        return self.backbone.encode_text(
            embeds, self.prompts.tokens, layer_fn, shared_prefix=self.prompts.shared_len
        )  # (C, E)

    def image_features(self, images: torch.Tensor | None, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Prompted image features (B, E), unnormalised; deep vision prompts replace the last n_ctx tokens."""
        if images is None:
            raise ValueError("maple prompts the image tower: it needs images, not cached image features")
        shallow, deep = self.vision_prompts()
        n = self.n_ctx

        def layer_fn(i: int, x: torch.Tensor) -> torch.Tensor:  # before vision block i; x (B, 1+P+n_ctx, Dv)
            if 1 <= i < self.depth:
                p = deep[i - 1].to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)  # (B, n_ctx, Dv)
                x = torch.cat([x[:, :-n], p], dim=1)  # (B, 1+P+n_ctx, Dv)
            return x

        return self.backbone.encode_image(images, prompts=shallow.unsqueeze(0), layer_fn=layer_fn)  # (B, E)
