"""ProGrad: CoOp's context trained with the cross-entropy gradient projected away from where it conflicts with the
gradient of a KL towards zero-shot CLIP (docs/methods/prograd.md §16: the reference §16.1, what we do §16.2, recipes
and provenance §16.3).

Matched against BeierZhu/Prompt-align @ 1b76203 (the code lives in its ``ProGrad.public/`` folder and the modified
Dassl in ``Dassl.ProGrad.pytorch/``):
- ``trainers/prograd.py`` PromptLearner (lines 66-131): with ``CTX_INIT`` truthy the init text is the dataset's
  ``CUSTOM_TEMPLATES`` entry without " {}." (the value of CTX_INIT is never read), its *word* count w decides the
  slots: the first w BPE tokens of it fill the last w of the ``N_CTX`` slots, the slots in front are zero vectors,
  and the prompt text is "X … X <init text> <class name>." (lines 78-95); else N(0, 0.02²) with "X X … X".
- ``CUSTOM_TEMPLATES`` (lines 201-217): one template per dataset, also the zero-shot teacher's (class ``CLIP``, lines
  220-249: an fp32 copy of CLIP, its normalised text features, logits = exp(logit_scale) · cos).
- ``ProGradLoss`` (lines 280-293): the cross-entropy and ``(−softmax(teacher / T) · log_softmax(student / T) · T²)``
  summed over classes, mean over the batch: a soft cross-entropy, with the gradient of KL(teacher ‖ student).
- ``Dassl.ProGrad.pytorch/dassl/engine/trainer.py`` ``prograd_backward_and_update`` (lines 311-349): the KL's
  backward first (graph kept), its gradients saved, then the CE's; per parameter tensor, when
  cos(g_ce, g_kl) < 0, ``g = g_ce − λ (g_ce · ĝ_kl) ĝ_kl``; only this gradient reaches the optimizer.
- ViT-B/16 settings: MCG-NJU/ProVP @ 837b8fb ``ProVP/configs/trainers/ProGrad/vit_b16{,_ep100,_ep50}.yaml`` and
  ``ProVP/scripts/base2new_{train,test}_prograd.sh`` (the reference ships RN50 configs only).

The two backward passes and the projection run through the trainer's gradient-combination step
(`gradient_objectives`, `combine_gradients`; mugcp_bench/engine/trainer.py `fit`). The image tower is untouched
(cached image features serve evaluation), the class prompts do not depend on the image (encoded once per class set
at evaluation), and the teacher's image features are the student's (the same frozen tower on the same batch).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mugcp_bench.errors import UserError
from mugcp_bench.frozen.quantities import class_text_features
from mugcp_bench.methods.base import TOY_TRAIN, MethodOutput, Provenance, SharedTextMethod, cosine_logits
from mugcp_bench.methods.coop import few_shot_epochs, frozen_image_features
from mugcp_bench.methods.prompts import ClassPrompts, init_context
from mugcp_bench.model.backbone import Backbone
from mugcp_bench.registry import METHODS

log = logging.getLogger(__name__)

INIT_STD = 0.02  # trainers/prograd.py:104, the random init without CTX_INIT

# CUSTOM_TEMPLATES (trainers/prograd.py:201-217) under our dataset registry names: the teacher's template and the
# context's init text. They differ from our zero-shot templates (and from KgCoOp's) on Pets, Flowers, Aircraft, DTD
# and Food101.
PROGRAD_TEMPLATES: dict[str, str] = {
    "oxford_pets": "a type of pet, a photo of a {}.",
    "oxford_flowers": "a type of flower, a photo of a {}.",
    "fgvc_aircraft": "a type of aircraft, a photo of a {}.",
    "dtd": "a texture of {}.",
    "eurosat": "a centered satellite photo of {}.",
    "stanford_cars": "a photo of a {}.",
    "food101": "a type of food, a photo of {}.",
    "sun397": "a photo of a {}.",
    "caltech101": "a photo of a {}.",
    "ucf101": "a photo of a person doing {}.",
    "imagenet": "a photo of a {}.",
    "imagenet_sketch": "a photo of a {}.",
    "imagenet_v2": "a photo of a {}.",
    "imagenet_a": "a photo of a {}.",
    "imagenet_r": "a photo of a {}.",
}

# λ = 0.8 for the 8- and 16-shot few-shot runs on these datasets (ProGrad.public/README.md; its scripts say 1.0)
LAMBDA_08_DATASETS = frozenset({"oxford_flowers", "dtd", "eurosat"})


def init_text(template: str) -> str:
    """The context's init words: the template's text before "{}" (the reference strips " {}." from templates that all
    end so: the same words), underscores read as spaces."""
    return template.split("{}")[0].strip().replace("_", " ")


def template_context(backbone: Backbone, n_ctx: int, template: str) -> tuple[torch.Tensor, str]:
    """ProGrad's context init (trainers/prograd.py:78-95; docs/methods/prograd.md §16.1): (ctx (n_ctx, Dt), prompt
    prefix text).

    w = the init text's *word* count; the first w BPE tokens of the init text fill the last w slots, the first
    n_ctx − w slots are zero vectors; the prefix is "X " × (n_ctx − w) + the init text. Where a comma makes the BPE
    count exceed the word count ("a type of pet, a photo of a": 8 words, 9 tokens), the init text's last token is
    not in the context: it stays a frozen token after it, as in the reference."""
    text = init_text(template)
    words = len(text.split(" "))
    tokens = backbone.tokenize([text])
    with torch.no_grad():
        emb = backbone.embed_tokens(tokens)[0].float().cpu()  # (L, Dt)
    ctx = torch.zeros(n_ctx, backbone.text_width)  # (n_ctx, Dt)
    ctx[n_ctx - words :] = emb[1 : 1 + words]
    return ctx, " ".join(["X"] * (n_ctx - words) + [text])


def project_conflicting(g_ce: torch.Tensor, g_kl: torch.Tensor | None, lam: float) -> torch.Tensor:
    """ProGrad's update direction for one parameter tensor (Dassl.ProGrad.pytorch/dassl/engine/trainer.py:336-345;
    docs/methods/prograd.md §16.2):
    g_ce when it does not conflict with g_kl (cos ≥ 0, or either gradient zero: the reference's NaN cosine fails its
    `< 0` test alike), else g_ce − λ (g_ce · ĝ_kl) ĝ_kl; norms and dot products over the whole flattened tensor, in
    the gradients' dtype (fp16 under reference-fp16, as the reference)."""
    if g_kl is None:
        return g_ce
    a, b = g_ce.flatten(), g_kl.flatten()
    b_hat = b / torch.linalg.norm(b)
    a_hat = a / torch.linalg.norm(a)
    conflict = torch.dot(a_hat, b_hat) < 0
    projected = a - lam * torch.dot(a, b_hat) * b_hat
    return torch.where(conflict, projected, a).view_as(g_ce)


@dataclass
class ProGradConfig:
    # Defaults are the reference train.py's (N_CTX 16, CTX_INIT False, LOSS.LAMBDA 1.0, LOSS.T 1.0); the recipes set
    # what the published runs pass (every ProGrad config sets CTX_INIT True).
    n_ctx: int = 16  # context slots; with ctx_init the template's words fill the last ones, zeros the rest
    ctx_init: bool = False  # the reference reads CTX_INIT as a flag: true = the dataset's template (above)
    lambda_: float = 1.0  # LOSS.LAMBDA: how much of the conflicting component is removed (0: plain CE, CoOp)
    temperature: float = 1.0  # LOSS.T of the KL


_PAPER = {"n_ctx": 16, "ctx_init": True, "lambda_": 1.0, "batch_size": 32, "lr": 0.002, "eval_batch_size": 512}
_TOY = {"n_ctx": 8, "ctx_init": True, "lambda_": 1.0, **TOY_TRAIN, "batch_size": 32, "lr": 0.01}

PROVP_REPO = "MCG-NJU/ProVP"
PROVP_COMMIT = "837b8fb3f7a3a170ba148e92d11ac8ca3d1982a2"
PROVP_CONFIG = "ProVP/configs/trainers/ProGrad/{}.yaml"


@METHODS.register("prograd")
class ProGrad(SharedTextMethod):
    """Prompt-aligned Gradient (Zhu et al., ICCV 2023): CoOp whose CE gradient is projected off a zero-shot KL's."""

    name = "prograd"
    report_order = 320
    color = "#a55194"
    in_default_set = False
    Config = ProGradConfig
    frozen_image_path = True
    reference_fp32 = ()  # reference-fp16: the context in fp16 (PromptLearner builds it in clip_model.dtype)
    # The trainer's gradient-combination step: one backward per objective in this order (the reference's: the KL
    # with the graph kept, then the CE), then `combine_gradients`; the recorded `loss` is the CE, the objective the
    # projected step descends (the KL only bends its direction), with loss_kl beside it.
    gradient_objectives = ("kl", "ce")
    loss_objectives = ("ce",)
    recipes = {
        "paper": {
            # ProVP vit_b16_ep50 (its base2new scripts test epoch 50): 16 shots, LAMBDA 1.0; N_CTX 16 (ours: unrecorded)
            "base2novel": {**_PAPER, "epochs": 50},
            # no cross-dataset script: vit_b16_ep50 on ImageNet, the config the reference README names for ImageNet
            "xd": {**_PAPER, "epochs": 50},
            # the reference README's few-shot table on ProVP's ViT-B/16 configs: epochs and λ by shots (`recipe`)
            "few_shot": {**_PAPER, "epochs": 200},
        },
        # Toy world (our design): CoOp's toy budget; 8 slots keep the toy CLIP's 32-token sequences short.
        "toy": {
            "base2novel": {**_TOY, "epochs": 10},
            "xd": {**_TOY, "epochs": 5},
            "few_shot": {**_TOY, "epochs": 10},
        },
    }
    provenance = {
        "paper": Provenance(
            PROVP_REPO,
            PROVP_COMMIT,
            {
                "base2novel": PROVP_CONFIG.format("vit_b16_ep50"),
                "xd": PROVP_CONFIG.format("vit_b16_ep50"),
                "few_shot": PROVP_CONFIG.format("vit_b16"),
            },
            "ViT-B/16 settings from ProVP's copy of ProGrad: the reference BeierZhu/Prompt-align@1b76203 ships RN50 "
            "configs only (its own base-to-novel protocol: RN50, 4 shots). base2novel: ProVP's base2new scripts (16 "
            "shots, LAMBDA 1.0, tested at epoch 50: vit_b16_ep50); N_CTX is a script argument ProVP never records: "
            "16, the reference's default and the value of its every script (ours). xd: no script; vit_b16_ep50 on "
            "ImageNet, the config the reference README names for ImageNet (ours). few_shot: the reference README's "
            "shots-to-config table (1 shot 50, 2-4 shots 100, 8-16 shots 200 epochs) on ProVP's ViT-B/16 configs, "
            "LAMBDA 0.8 for 8 and 16 shots on Flowers, DTD and EuroSAT (README); ImageNet always 50 epochs (ours, "
            "as CoOp)",
        ),
    }
    # no-proj: λ = 0, CoOp with ProGrad's context (the KL is still computed and recorded, never applied);
    # no-init: a random N(0, 0.02²) context of the same length (the reference without CTX_INIT).
    ablations = {"proj": {"lambda_": 0.0}, "init": {"ctx_init": False}}
    # BeierZhu/Prompt-align@1b76203 ProGrad.public/trainers/prograd.py registers the PromptLearner as
    # "prompt_learner" (ProGrad.build_model): ctx (n_ctx, D) and the class buffers token_prefix / token_suffix its
    # load_model deletes; the zero-shot teacher (class CLIP) is not registered, not saved (docs/interop.md §3). A
    # class-specific (CSC, 3-d) ctx and a class token elsewhere than at the end have no counterpart here.
    reference_checkpoint = dict(
        trainer="ProGrad",
        learner="prompt_learner",
        keys={"ctx": "ctx"},
        deleted_buffers="prompt_learner",
        config={"n_ctx": ("shape", "ctx", 0)},
        options={
            "n_ctx": "TRAINER.COOP.N_CTX",
            "ctx_init": "TRAINER.COOP.CTX_INIT",
            "lambda_": "LOSS.LAMBDA",
            "temperature": "LOSS.T",
        },
        fixed_options={"TRAINER.COOP.CLASS_TOKEN_POSITION": "end"},
        repo="BeierZhu/Prompt-align@1b76203",
    )

    def __init__(
        self,
        backbone: Backbone,
        classnames: Sequence[str],
        cfg: ProGradConfig,
        template: str = "a photo of a {}.",
        dataset: str = "",
    ) -> None:
        super().__init__(backbone, classnames, cfg, template, dataset)
        if cfg.n_ctx < 1:
            raise UserError(f"prograd: n_ctx must be at least 1, got {cfg.n_ctx}")
        if cfg.lambda_ < 0:
            raise UserError(
                f"prograd: lambda_ must be >= 0 (the share of the conflicting component removed), got {cfg.lambda_}"
            )
        if not cfg.temperature > 0:
            raise UserError(
                f"prograd: temperature must be > 0 (the KL divides the logits by it), got {cfg.temperature}"
            )
        self.n_ctx = cfg.n_ctx
        if cfg.ctx_init:
            ctx, self.prefix = template_context(backbone, self.n_ctx, self._checked_template())
        else:
            ctx, self.prefix = init_context(backbone, self.n_ctx, "", INIT_STD)  # (n_ctx, Dt), "X X … X"
        self.ctx = nn.Parameter(ctx)  # (n_ctx, Dt), the only trainable tensor
        self.prompts = ClassPrompts(backbone, self.classnames, self.n_ctx, self.prefix)
        self._teacher: torch.Tensor | None = None  # (C, E) normalised; built on the first training forward

    @classmethod
    def ignored_settings(cls, cfg: ProGradConfig) -> dict[str, str]:
        if cfg.lambda_ == 0:
            return {
                "temperature": "prograd with lambda_=0 applies the plain cross-entropy gradient (nothing is "
                "projected), so the KL's temperature never changes training: also --set lambda_=<value>"
            }
        return {}

    # --- prompts and the teacher ----------------------------------------------------------------------------------
    def prograd_template(self) -> str:
        """The current dataset's template (PROGRAD_TEMPLATES); datasets the reference does not know (the toy world,
        user datasets) use their own zero-shot template (ours: the reference has no fallback)."""
        return PROGRAD_TEMPLATES.get(self.dataset, self.template)

    def _checked_template(self) -> str:
        """The current template, UserError when its init text does not fit the context slots (the reference asserts
        n_ctx ≥ the word count, trainers/prograd.py:84) or is empty."""
        template = self.prograd_template()
        text = init_text(template)
        words = len(text.split(" "))
        if not text:
            raise UserError(
                f"prograd: the template '{template}' of dataset '{self.dataset}' has no words before '{{}}' to "
                "initialise the context from; use --set prograd.ctx_init=false (a random context)"
            )
        if words > self.n_ctx:
            raise UserError(
                f"prograd: n_ctx={self.n_ctx} is shorter than the {words} words of '{text}' (dataset "
                f"'{self.dataset}') the context starts from; set n_ctx>={words}, or ctx_init=false"
            )
        return template

    def set_classnames(self, classnames: Sequence[str], template: str | None = None, dataset: str | None = None):
        super().set_classnames(classnames, template, dataset)
        if self.cfg.ctx_init:  # the reference rebuilds its prompt text from the evaluated dataset's template
            self.prefix = template_context(self.backbone, self.n_ctx, self._checked_template())[1]
        self.prompts = ClassPrompts(self.backbone, self.classnames, self.n_ctx, self.prefix).to(self.ctx.device)
        self._teacher = None
        self.refresh_eval()

    def teacher_text(self) -> torch.Tensor:
        """Zero-shot CLIP's normalised class features (C, E) for `prograd_template()`, encoded by fp32 weights as the
        reference's ``clip_model.float()`` (`frozen.quantities.class_text_features`, cached by content), outside any
        autocast."""
        if self._teacher is None:
            with torch.autocast(self.backbone.device.type, enabled=False):
                self._teacher = class_text_features(
                    self.backbone, self.classnames, self.prograd_template(), fp32=True
                )  # (C, E)
        return self._teacher

    # --- features and losses --------------------------------------------------------------------------------------
    def text_features(self) -> torch.Tensor:
        """Class text features (C, E), unnormalised, with the current context (CoOp's text path)."""
        embeds = self.prompts.build(self.ctx).to(self.backbone.dtype)  # (C, T, Dt)
        return self.backbone.encode_text(embeds, self.prompts.tokens, shared_prefix=self.prompts.shared_len)  # (C, E)

    def image_features(self, images, image_features=None) -> torch.Tensor:
        return frozen_image_features(self.backbone, images, image_features)  # (B, E)

    def forward(self, images, keys=None, image_features=None) -> MethodOutput:
        image_f = self.image_features(images, image_features)  # (B, E)
        out = MethodOutput(cosine_logits(self.backbone.logit_scale, image_f, self.text_features()))  # (B, C)
        if self.training:
            out.losses["kl"] = self.zero_shot_kl(out.logits, image_f)
        return out

    def teacher_logits(self, image_f: torch.Tensor) -> torch.Tensor:
        """Zero-shot CLIP's logits (B, C) in fp32: exp(logit_scale) · cos(image, teacher text), the image features
        being the student's (the same frozen tower on the same augmented batch)."""
        with torch.autocast(image_f.device.type, enabled=False):
            img = F.normalize(image_f.detach().float(), dim=-1)  # (B, E)
            return self.backbone.logit_scale.float() * img @ self.teacher_text().t()  # (B, C)

    def zero_shot_kl(self, logits: torch.Tensor, image_f: torch.Tensor) -> torch.Tensor:
        """ProGradLoss's "KL" (trainers/prograd.py:288-291): −Σ_c softmax(teacher / T) · log_softmax(student / T) · T²,
        mean over the batch; the student's log-probabilities in its logits' dtype (fp16 under reference-fp16), the
        product in fp32."""
        t = self.cfg.temperature
        teacher = F.softmax(self.teacher_logits(image_f) / t, dim=-1)  # (B, C), fp32
        return (-teacher * F.log_softmax(logits / t, dim=-1) * t * t).sum(1).mean()

    # --- the trainer's gradient-combination step ------------------------------------------------------------------
    def combine_gradients(self, grads: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Only the CE gradient is applied: per parameter tensor projected off the KL gradient where they conflict."""
        kl = grads.get("kl", {})
        return {name: project_conflicting(g, kl.get(name), self.cfg.lambda_) for name, g in grads["ce"].items()}

    # --- recipes ----------------------------------------------------------------------------------------------------
    @classmethod
    def recipe(cls, recipe: str, train_protocol: str, shots: int, dataset: str) -> dict[str, Any]:
        """Paper: ImageNet always 50 epochs; few-shot epochs by shots (1: 50, 2-4: 100, 8-16: 200) and λ 0.8 for 8 and
        16 shots on Flowers, DTD and EuroSAT (ProGrad.public/README.md; docs/methods/prograd.md §16.3)."""
        out = super().recipe(recipe, train_protocol, shots, dataset)
        if recipe == "paper":
            if train_protocol == "few_shot":
                out["epochs"] = few_shot_epochs(shots)
                if shots >= 8 and dataset in LAMBDA_08_DATASETS:
                    out["lambda_"] = 0.8
            if dataset == "imagenet":
                out["epochs"] = 50
        return out
