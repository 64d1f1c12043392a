"""MMRL: Multi-Modal Representation Learning, shared representation tokens inserted into the higher blocks of both
towers, a second image head on them and a regulariser towards the frozen CLIP (docs/methods/mmrl.md §17).

Matched against yunncheng/MMRL @ 27d8821:
- ``trainers/mmrl.py``: MultiModalRepresentationLearner (lines 141-192: N_REP_TOKENS tokens of REP_DIM, N(0, 0.02²),
  mapped to each tower by one Linear per REP_LAYERS entry, the copies deep-copied from one layer so they start equal);
  the hand-crafted prompts ``CUSTOM_TEMPLATES[dataset].format(name)`` (lines 21-37, equal to our datasets'
  templates); CustomCLIP.forward (lines 211-235: logits ``100 ·`` cosine, the representation logits from the image's
  representation feature, the fusion ``α · logits + (1 − α) · logits_rep``); MMRL_Loss (lines 238-255:
  ``α · CE + (1 − α) · CE_rep + λ · (1 − mean cos(image, frozen image)) + λ · (1 − mean cos(text, frozen text))``);
  the frozen image pass on the same augmented batch (lines 345-348); the trainable filter (lines 291-300); MMRL.test
  (lines 397-438: the fused logits for B2N base, FS and CD ImageNet, the CLS logits otherwise).
- ``clip/model_mmrl.py``: ResidualAttentionBlock (lines 202-250: blocks numbered ``i + 1``; before the first
  REP_LAYERS block the tokens are inserted after CLS / after SOS, before the later ones they replace positions
  1 … N; the text tower's causal mask is rebuilt at the grown length), VisionTransformer (lines 330-381: ``proj_rep``
  random N(0, width⁻¹), the representation feature ``mean_j ln_post(x_j) @ proj_rep`` over the N tokens), the text
  readout at ``eot + N`` (trainers/mmrl.py line 84).
- ``trainers/config.py`` (REG_WEIGHT per dataset for every task; EuroSAT REP_DIM 2048), ``train.py`` (its override
  order), ``configs/trainers/MMRL/vit_b16{,_imagenet,_cross_datasets,_few_shot}.yaml``, ``scripts/mmrl/*.sh``.

Token insertion runs through the backbone's layer callbacks: the text tokens sit inside the prefix every class prompt
shares (encoded once, `eot_offset` = N), the vision tokens after CLS; ``Backbone.vision_tokens`` gives the final
token states for the representation head.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mugcp_bench.errors import UserError
from mugcp_bench.frozen.quantities import class_text_features, frozen_batch_features
from mugcp_bench.methods.base import TOY_TRAIN, Method, MethodOutput, Provenance
from mugcp_bench.methods.prompts import clean_classname, common_prefix_len
from mugcp_bench.model.backbone import Backbone
from mugcp_bench.registry import METHODS

log = logging.getLogger(__name__)

REPO = "yunncheng/MMRL"
COMMIT = "27d8821f6ac135a1d0c8e4c5ed78af14df0cd82e"
CFG_B2N = "configs/trainers/MMRL/vit_b16.yaml"
CFG_IMAGENET = "configs/trainers/MMRL/vit_b16_imagenet.yaml"
CFG_XD = "configs/trainers/MMRL/vit_b16_cross_datasets.yaml"
CFG_FS = "configs/trainers/MMRL/vit_b16_few_shot.yaml"
LOGIT_SCALE = 100.0  # hard-coded "100." in CustomCLIP.forward, not CLIP's logit_scale
INIT_STD = 0.02  # compound_rep_tokens (trainers/mmrl.py:171-172)
PAPER_BLOCKS = (5, 6, 7, 8, 9, 10, 11)  # REP_LAYERS [6 … 12], 1-based (clip/model_mmrl.py:181)
# trainers/config.py: REG_WEIGHT (and EuroSAT's REP_DIM) per dataset, over every yaml value, in every task; under
# our dataset names
DATASET_SETTINGS: dict[str, dict[str, Any]] = {
    "stanford_cars": {"reg_weight": 7.0},
    "fgvc_aircraft": {"reg_weight": 6.0},
    "sun397": {"reg_weight": 6.0},
    "dtd": {"reg_weight": 6.0},
    "food101": {"reg_weight": 5.0},
    "oxford_flowers": {"reg_weight": 4.0},
    "ucf101": {"reg_weight": 3.0},
    "imagenet": {"reg_weight": 0.5},
    "caltech101": {"reg_weight": 0.5},
    "oxford_pets": {"reg_weight": 0.2},
    "eurosat": {"reg_weight": 0.01, "rep_dim": 2048},
}


@dataclass
class MMRLConfig:
    n_rep_tokens: int = field(default=5, metadata={"range": (1, None, True, False)})  # N_REP_TOKENS
    rep_dim: int = field(default=512, metadata={"range": (1, None, True, False)})  # REP_DIM of the shared space
    # 0-based blocks before which the tokens enter: inserted before the first, replaced before the others (the
    # reference's 1-based REP_LAYERS [6 … 12])
    rep_blocks: tuple[int, ...] = PAPER_BLOCKS
    alpha: float = field(default=0.7, metadata={"range": (0, 1, True, True)})  # ALPHA: CE weight and fusion
    reg_weight: float = field(default=1.0, metadata={"range": (0, None, True, False)})  # REG_WEIGHT λ


class TemplatePrompts(nn.Module):
    """The class prompts ``template.format(class name)``: token ids (C, T) cut after the longest EOT (unless the
    backbone runs full length), their embeddings (C, T, Dt), and the leading positions all prompts share."""

    def __init__(self, backbone: Backbone, classnames: Sequence[str], template: str) -> None:
        super().__init__()
        tokens = backbone.tokenize([template.format(clean_classname(c)) for c in classnames])  # (C, L)
        if backbone.eot_truncation:
            tokens = tokens[:, : int(backbone.eot_index(tokens).max()) + 1]  # (C, T)
        with torch.no_grad():
            embeds = backbone.embed_tokens(tokens).float()  # (C, T, Dt)
        self.shared_len = common_prefix_len(backbone, tokens)
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("embeds", embeds, persistent=False)


_PAPER = {"n_rep_tokens": 5, "rep_dim": 512, "rep_blocks": PAPER_BLOCKS, "alpha": 0.7}
_ADAMW = {"optimizer": "adamw", "lr": 0.001, "crop_min_scale": 0.5, "eval_batch_size": 250}
_TOY = {**_ADAMW, **TOY_TRAIN, "n_rep_tokens": 5, "rep_dim": 128, "rep_blocks": (2, 3), "alpha": 0.7}


@METHODS.register("mmrl")
class MMRL(Method):
    """Multi-Modal Representation Learning (Guo & Gu, CVPR 2025): shared tokens in both towers, a second head."""

    name = "mmrl"
    report_order = 700
    color = "#e7ba52"
    in_default_set = False
    needs_labels = True
    Config = MMRLConfig
    # reference-fp16 (PREC fp16): the learner is cast to CLIP's fp16 (trainers/mmrl.py:200); proj_rep is a CLIP
    # parameter convert_weights never touches (clip/model_mmrl.py:524-545): fp32, cast at use
    reference_fp32 = ("proj_rep",)
    recipes = {
        "paper": {
            # vit_b16 (ImageNet: vit_b16_imagenet, batch 32, 5 epochs; REG_WEIGHT / REP_DIM per dataset in `recipe`)
            "base2novel": {**_PAPER, **_ADAMW, "reg_weight": 1.0, "batch_size": 4, "epochs": 10, "warmup_epochs": 1},
            # vit_b16_cross_datasets, REG_WEIGHT 0.2 from scripts/mmrl/cross_datasets_train.sh over ImageNet's 0.5
            "xd": {**_PAPER, **_ADAMW, "reg_weight": 0.2, "batch_size": 32, "epochs": 1, "warmup_epochs": 0},
            # vit_b16_few_shot (ImageNet: vit_b16_imagenet); REG_WEIGHT / REP_DIM per dataset in `recipe`
            "few_shot": {**_PAPER, **_ADAMW, "reg_weight": 0.5, "batch_size": 32, "epochs": 50, "warmup_epochs": 1},
        },
        # Toy world (our design): tokens before the last two of the toy CLIP's four blocks, a 128-d space
        "toy": {
            "base2novel": {**_TOY, "reg_weight": 1.0, "batch_size": 4, "epochs": 5, "warmup_epochs": 1},
            "xd": {**_TOY, "reg_weight": 0.2, "batch_size": 8, "epochs": 2, "warmup_epochs": 0},
            "few_shot": {**_TOY, "reg_weight": 0.5, "batch_size": 8, "epochs": 5, "warmup_epochs": 1},
        },
    }
    provenance = {
        "paper": Provenance(
            REPO,
            COMMIT,
            {"base2novel": CFG_B2N, "xd": CFG_XD, "few_shot": CFG_FS},
            "ImageNet trains with vit_b16_imagenet (batch 32, 5 epochs) in base2novel and few_shot. REG_WEIGHT (and "
            "EuroSAT's REP_DIM 2048) per dataset from trainers/config.py, which overrides every yaml; xd keeps the "
            "0.2 that scripts/mmrl/cross_datasets_train.sh passes last. Datasets outside the table keep the yaml's "
            "REG_WEIGHT (1.0 base2novel, 0.5 few_shot).",
        ),
    }
    # no-reg: without the regularisers towards the frozen CLIP; no-rep: α = 1, the CLS logits only (the
    # representation head gets no gradient and no weight in the fusion)
    ablations = {"reg": {"reg_weight": 0.0}, "rep": {"alpha": 1.0}}
    # trainers/mmrl.py registers the whole CustomCLIP as "MultiModalRepresentationLearner" (MMRL.build_model): the
    # buffer prompt_embeddings (C, 77, D) its load_model drops, representation_learner.* (the tokens and their
    # per-block maps), the frozen image encoder with the trainable proj_rep in it, and TextEncoder_MMRL's frozen
    # text tower; CustomCLIP has no logit_scale (the logits use 100) (docs/interop.md §3).
    reference_checkpoint = dict(
        trainer="MMRL",
        learner="MultiModalRepresentationLearner",
        keys={
            "compound_rep_tokens": "representation_learner.compound_rep_tokens",
            "compound_rep_tokens_r2vproj.*": "representation_learner.compound_rep_tokens_r2vproj.*",
            "compound_rep_tokens_r2tproj.*": "representation_learner.compound_rep_tokens_r2tproj.*",
            "proj_rep": "image_encoder.proj_rep",
        },
        deleted_buffers=("prompt_embeddings",),
        frozen=(
            ("image_encoder.*", "visual.*"),
            ("text_encoder.positional_embedding", "positional_embedding"),
            ("text_encoder.text_projection", "text_projection"),
            ("text_encoder.transformer.*", "transformer.*"),
            ("text_encoder.ln_final.*", "ln_final.*"),
        ),
        config={
            "n_rep_tokens": ("shape", "representation_learner.compound_rep_tokens", 0),
            "rep_dim": ("shape", "representation_learner.compound_rep_tokens", 1),
        },
        options={
            "n_rep_tokens": "TRAINER.MMRL.N_REP_TOKENS",
            "rep_dim": "TRAINER.MMRL.REP_DIM",
            "alpha": "TRAINER.MMRL.ALPHA",
            "reg_weight": "TRAINER.MMRL.REG_WEIGHT",
        },
        note="REP_LAYERS is not in the file: pass the run's rep_blocks + 1 (1-based), e.g. rep_blocks 5 … 11 is "
        "REP_LAYERS [6, 7, 8, 9, 10, 11, 12]; its load_model reads the last model.pth* file os.listdir lists",
        repo="yunncheng/MMRL@27d8821",
    )

    def __init__(
        self,
        backbone: Backbone,
        classnames: Sequence[str],
        cfg: MMRLConfig,
        template: str = "a photo of a {}.",
        dataset: str = "",
    ) -> None:
        super().__init__(backbone, classnames, cfg, template, dataset)
        self.blocks = self._check(backbone, cfg)
        self.n = int(cfg.n_rep_tokens)
        self._at = {b: k for k, b in enumerate(self.blocks)}  # block -> index of its token maps
        tokens = torch.empty(self.n, cfg.rep_dim)
        nn.init.normal_(tokens, std=INIT_STD)
        self.compound_rep_tokens = nn.Parameter(tokens)  # (N, r), the shared representation space
        r2v, r2t = nn.Linear(cfg.rep_dim, backbone.vision_width), nn.Linear(cfg.rep_dim, backbone.text_width)
        # one initialised layer per tower, deep-copied: the per-block maps start equal (_get_clones)
        self.compound_rep_tokens_r2vproj = nn.ModuleList([copy.deepcopy(r2v) for _ in self.blocks])
        self.compound_rep_tokens_r2tproj = nn.ModuleList([copy.deepcopy(r2t) for _ in self.blocks])
        width = backbone.vision_width
        self.proj_rep = nn.Parameter(width**-0.5 * torch.randn(width, backbone.embed_dim))  # (Dv, E), random
        self._train_classes = (self.dataset, tuple(self.classnames))  # what the fused head was trained on
        self.fused = True
        self.prompts = TemplatePrompts(backbone, self.classnames, self.template)
        self._teacher: torch.Tensor | None = None
        self._eval: tuple[torch.Tensor, list[torch.Tensor]] | None = None

    @staticmethod
    def _check(backbone: Backbone, cfg: MMRLConfig) -> tuple[int, ...]:
        depth = min(backbone.vision_layers, backbone.text_layers)
        blocks = tuple(int(b) for b in cfg.rep_blocks)
        if not blocks or list(blocks) != sorted(set(blocks)) or not 0 <= blocks[0] <= blocks[-1] < depth:
            raise UserError(
                f"mmrl: rep_blocks must be increasing block indices in 0 … {depth - 1} for '{backbone.name}' "
                f"({depth} blocks per tower), got {','.join(map(str, blocks)) or 'none'}; e.g. --set "
                f"mmrl.rep_blocks={','.join(map(str, range(max(0, depth - 2), depth)))}"
            )
        if backbone.vision_pool_type != "tok":
            raise UserError(
                f"mmrl reads the image feature at the CLS token; '{backbone.name}' pools '{backbone.vision_pool_type}' "
                "(the representation tokens would enter it): use a CLS-token ViT CLIP such as ViT-B-16"
            )
        return blocks

    def set_classnames(self, classnames: Sequence[str], template: str | None = None, dataset: str | None = None):
        """New class prompts; the fused head is used again only for the training dataset's training classes."""
        super().set_classnames(classnames, template, dataset)
        self.fused = (self.dataset, tuple(self.classnames)) == self._train_classes
        self.prompts = TemplatePrompts(self.backbone, self.classnames, self.template).to(self.proj_rep.device)
        self._teacher = None
        if self._eval is not None:
            self.begin_eval()

    # --- the representation tokens and the towers -----------------------------------------------------------------
    def rep_tokens(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per entry block, the tokens in the text tower (N, Dt) and in the vision tower (N, Dv)."""
        r = self.compound_rep_tokens  # (N, r): the same base tokens for every block
        text = [f(r) for f in self.compound_rep_tokens_r2tproj]
        vision = [f(r) for f in self.compound_rep_tokens_r2vproj]
        return text, vision

    def _layer_fn(self, reps: list[torch.Tensor]):
        """Before block b of `rep_blocks`: the tokens inserted after position 0 (the first), or replacing positions
        1 … N (the others); x (R, T, D) is every row or the shared text prefix."""

        def layer_fn(i: int, x: torch.Tensor) -> torch.Tensor:
            k = self._at.get(i)
            if k is None:
                return x
            rest = x[:, 1 + self.n :] if k > 0 else x[:, 1:]
            tokens = reps[k].to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)  # (R, N, D)
            return torch.cat([x[:, :1], tokens, rest], dim=1)  # (R, 1 + N + rest, D)

        return layer_fn

    def text_features(self, reps: list[torch.Tensor]) -> torch.Tensor:
        """Class text features (C, E), unnormalised: the tokens after SOS, the EOT read N positions later."""
        p = self.prompts  # the tokens go right after SOS: inside any shared prefix
        return self.backbone.encode_text(
            p.embeds.to(self.backbone.dtype),
            p.tokens,
            self._layer_fn(reps),
            shared_prefix=p.shared_len,
            eot_offset=self.n,
        )  # (C, E)

    def image_features(
        self, images: torch.Tensor | None, reps: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The CLS feature (B, E) with CLIP's projection and the representation feature (B, E): ln_post on each of
        the N tokens, their mean, ``@ proj_rep``; both unnormalised."""
        if images is None:
            raise ValueError("mmrl inserts tokens into the image tower: it needs images, not cached image features")
        x = self.backbone.vision_tokens(images, layer_fn=self._layer_fn(reps))  # (B, 1 + N + P, Dv)
        cls = self.backbone.vision_head(x)  # (B, E)
        rep = self.backbone.vision_final_norm(x[:, 1 : 1 + self.n]).mean(dim=1)  # (B, Dv)
        return cls, rep @ self.proj_rep.to(rep.dtype)  # (B, E), (B, E)

    def teacher_text(self) -> torch.Tensor:
        """The frozen CLIP's normalised features of the class prompts (C, E), fp32 (the reference's zero-shot text
        encoder; cached by content)."""
        if self._teacher is None:
            with torch.autocast(self.backbone.device.type, enabled=False):
                self._teacher = class_text_features(self.backbone, self.classnames, self.template)  # (C, E)
        return self._teacher

    # --- logits and the loss --------------------------------------------------------------------------------------
    def _logits(
        self, image_f: torch.Tensor, rep_f: torch.Tensor, text_f: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        text_n = F.normalize(text_f, dim=-1)  # (C, E)
        logits = LOGIT_SCALE * F.normalize(image_f, dim=-1) @ text_n.t()  # (B, C)
        return logits, LOGIT_SCALE * F.normalize(rep_f, dim=-1) @ text_n.t()  # (B, C) each

    def eval_logits(self, logits: torch.Tensor, logits_rep: torch.Tensor) -> torch.Tensor:
        """The fusion α · logits + (1 − α) · logits_rep on the training dataset's training classes, else the CLS
        logits (MMRL.test: B2N base, FS and CD ImageNet fused; novel classes and other datasets not)."""
        if not self.fused:
            return logits
        a = self.cfg.alpha
        return a * logits + (1 - a) * logits_rep

    def forward(
        self,
        images: torch.Tensor,
        keys: Sequence[str] | None = None,
        image_features: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> MethodOutput:
        """Training (with labels, as the trainer passes them): the CLS logits with cross-entropy weight α, plus
        ``ce_rep`` = (1 − α) · CE(logits_rep) and the regularisers ``reg_img`` / ``reg_txt``. Evaluation, or a
        training forward without labels: the evaluation logits (`eval_logits`), plus the regularisers in training."""
        cfg = self.cfg
        reps_t, reps_v = self.rep_tokens()
        text_f = self.text_features(reps_t)  # (C, E)
        image_f, rep_f = self.image_features(images, reps_v)  # (B, E) each
        logits, logits_rep = self._logits(image_f, rep_f, text_f)  # (B, C) each
        if not self.training:
            return MethodOutput(self.eval_logits(logits, logits_rep))
        losses: dict[str, torch.Tensor] = {}
        if labels is None:
            out, ce_weight = self.eval_logits(logits, logits_rep), 1.0
        else:
            out, ce_weight = logits, float(cfg.alpha)
            if cfg.alpha != 1:
                losses["ce_rep"] = (1 - cfg.alpha) * F.cross_entropy(logits_rep, labels)
        if cfg.reg_weight:
            frozen = frozen_batch_features(self.backbone, images)  # (B, E): the same augmented batch, no graph
            image_cos = F.cosine_similarity(F.normalize(image_f, dim=-1), F.normalize(frozen, dim=-1), dim=1)  # (B,)
            losses["reg_img"] = cfg.reg_weight * (1 - image_cos.mean())
            teacher = self.teacher_text().to(text_f.dtype)  # (C, E), normalised
            text_cos = F.cosine_similarity(F.normalize(text_f, dim=-1), teacher, dim=1)  # (C,)
            losses["reg_txt"] = cfg.reg_weight * (1 - text_cos.mean())
        return MethodOutput(out, losses, ce_weight)

    # --- evaluation: class text and the tokens once per class set ------------------------------------------------
    @torch.no_grad()
    def begin_eval(self) -> None:
        reps_t, reps_v = self.rep_tokens()
        self._eval = (self.text_features(reps_t), reps_v)

    def end_eval(self) -> None:
        self._eval = None

    @torch.no_grad()
    def predict(self, images, keys=None, image_features=None) -> torch.Tensor:
        if self._eval is None:
            reps_t, reps_v = self.rep_tokens()
            text_f = self.text_features(reps_t)
        else:
            text_f, reps_v = self._eval
        image_f, rep_f = self.image_features(images, reps_v)
        return self.eval_logits(*self._logits(image_f, rep_f, text_f))

    # --- recipes --------------------------------------------------------------------------------------------------
    @classmethod
    def recipe(cls, recipe: str, train_protocol: str, shots: int, dataset: str) -> dict[str, Any]:
        """The per-dataset REG_WEIGHT / REP_DIM table (base2novel, few_shot) and ImageNet's own config."""
        out = super().recipe(recipe, train_protocol, shots, dataset)
        if recipe != "paper" or train_protocol == "xd":
            return out
        out |= DATASET_SETTINGS.get(dataset, {})
        if dataset == "imagenet":  # vit_b16_imagenet, in base2novel and few_shot alike
            out |= {"batch_size": 32, "epochs": 5, "warmup_epochs": 1}
        return out


__all__ = ["DATASET_SETTINGS", "LOGIT_SCALE", "MMRL", "MMRLConfig", "TemplatePrompts"]
