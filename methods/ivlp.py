"""Independent deep prompts: IVLP (`ivlp`), deep language-only prompting (`language_deep`) and VPT-deep (`vpt_deep`)
(docs/methods/ivlp.md §11).

One class, `DeepPrompts`, holds the three designs of the MaPLe repository's two trainers; each registered method is a
preset of it with its own Config (only the settings the design reads exist, so a setting the model would ignore
cannot be set) and its own recipes. Matched against muzairkhattak/multimodal-prompt-learning @ 69bce21:
- ``trainers/independentVL.py`` (trainer IVLP; VLPromptLearner lines 65-119): the text context is the first
  ``N_CTX_TEXT`` token embeddings of ``CTX_INIT`` when ``CTX_INIT and N_CTX_TEXT <= 4``, else N(0, 0.02²) with the
  prefix "X X … X"; the prompt text keeps the whole ``CTX_INIT`` (2 + 2: "a photo" learned, "of a" fixed). Text depth
  ≥ 1 is asserted (line 70); vision depth 0 leaves the image tower untouched (deep language-only prompting).
- ``trainers/vpt.py`` (trainer VPT): no text parameters; class features of "a photo of a {class}." for every dataset
  from the fp32 CLIP (FixedEmbeddings, lines 67-89); the whole model is fp32 (``load_clip_to_cpu`` returns
  ``model.float()``, line 41).
- ``clip/model.py``: VisionTransformer (lines 362-422) appends the input vision prompt ``VPT`` after the positional
  embedding, before ``ln_pre``; ResidualAttentionBlock_IVLP (lines 191-256) gives every block ``0 < i < depth`` its
  own ``VPT_shallow`` that replaces, before the block's attention, the last n vision tokens or the text positions
  1 … n. All prompts are fp32 parameters cast with ``.half()`` where they are used (lines 238, 249, 405). Depth d
  thus prompts the input and blocks 1 … d−1, MaPLe's counting.
- configs ``IVLP/vit_b16_c2_ep5_batch4_2+2ctx.yaml``, ``IVLP/vit_b16_c2_ep5_batch4_4ctx_language_only.yaml``,
  ``VPT/vit_b16_c2_ep5_batch4_4.yaml`` (8 vision tokens despite the name), and PromptSRC's IVLP recipe
  (muzairkhattak/PromptSRC @ bb95c77 ``configs/trainers/IVLP/vit_b16_c2_ep20_batch4_4+4ctx.yaml``; its
  ``trainers/independentVL.py`` and ``clip/model.py`` are the MaPLe repository's).

Parameters are created in the order and under the names of `maple` with ``coupling=false`` (ctx,
compound_prompts_text, vision_ctx, compound_prompts_vision), so IVLP with equal lengths and depths *is* that preset,
seed for seed (tests/test_ivlp.py).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from mugcp_bench.errors import UserError
from mugcp_bench.frozen.quantities import class_text_features
from mugcp_bench.methods.base import TOY_TRAIN, Provenance, SharedTextMethod
from mugcp_bench.methods.coop import frozen_image_features
from mugcp_bench.methods.prompts import ClassPrompts, init_context
from mugcp_bench.model.backbone import Backbone
from mugcp_bench.registry import METHODS

log = logging.getLogger(__name__)

INIT_STD = 0.02  # every prompt: nn.init.normal_(std=0.02) (independentVL.py:94, clip/model.py:220, 377)
MAX_WORD_INIT = 4  # CTX_INIT is used only for at most 4 text tokens (independentVL.py:82)
VPT_TEXT_TEMPLATE = "a photo of a {}."  # vpt.py:73-80, for every dataset

MPL_REPO = "muzairkhattak/multimodal-prompt-learning"
MPL_COMMIT = "69bce21ae8eda80ad6187534b2dce09cf6c59e17"
SRC_REPO = "muzairkhattak/PromptSRC"
SRC_COMMIT = "bb95c77b634d63488f2cad81ff4a72d53bdd06d5"


# --- configs: one per design, holding only what that design reads ---------------------------------------------------
@dataclass
class IVLPConfig:
    """IVLP's settings; defaults are its configs/trainers/IVLP/vit_b16_c2_ep5_batch4_2+2ctx.yaml (train.py's own
    defaults are depth 9 / 9)."""

    n_ctx_text: int = 2  # learned text tokens per prompted layer (positions 1 … n after SOS)
    n_ctx_vision: int = 2  # learned vision tokens per prompted layer (appended after the patch tokens)
    depth_text: int = 12  # input + text blocks 1 … depth−1 (≥ 1)
    depth_vision: int = 12  # input + vision blocks 1 … depth−1; 0 = no vision prompt (then n_ctx_vision = 0)
    ctx_init: str = "a photo of a"  # the prompt text; its first n_ctx_text tokens initialise the context (n ≤ 4)


@dataclass
class LanguageDeepConfig:
    """Deep language-only prompting: IVLP with vision depth 0
    (configs/trainers/IVLP/vit_b16_c2_ep5_batch4_4ctx_language_only.yaml)."""

    n_ctx_text: int = 4
    depth_text: int = 12
    ctx_init: str = "a photo of a"


@dataclass
class VPTDeepConfig:
    """VPT-deep (configs/trainers/VPT/vit_b16_c2_ep5_batch4_4.yaml: 8 tokens, depth 12; train.py's defaults are 2
    tokens, depth 1). The text side is fixed, so there is no text setting."""

    n_ctx_vision: int = 8
    depth_vision: int = 12
    # Round every vision prompt to fp16 where it enters the tower, as the reference's hard-coded .half() does in its
    # fp32 model (clip/model.py:238, 405); its gradient passes the same cast. false: plain fp32 prompts.
    round_prompts_fp16: bool = True


def _free_prompts(n_layers: int, n_ctx: int, width: int) -> nn.ParameterList:
    """`n_layers` prompts (n_ctx, width), each N(0, 0.02²), drawn in layer order."""
    out = []
    for _ in range(n_layers):
        p = torch.empty(n_ctx, width)
        nn.init.normal_(p, std=INIT_STD)
        out.append(nn.Parameter(p))
    return nn.ParameterList(out)


class DeepPrompts(SharedTextMethod):
    """Independent prompts in either tower or both: text tokens at positions 1 … n after SOS and vision tokens after
    the patch tokens at the input, replaced by fresh ones before blocks 1 … depth−1 of their tower. A tower with
    depth 0 is untouched (the image tower: frozen, cacheable features; the text tower: fixed class features of
    "a photo of a {class}.", VPT's). Class text never depends on the image: evaluation encodes it once per class
    set."""

    # the text side of VPT: fixed hand-crafted class features instead of learned prompts
    fixed_text: ClassVar[bool] = False

    def __init__(
        self,
        backbone: Backbone,
        classnames: Sequence[str],
        cfg: Any,
        template: str = "a photo of a {}.",
        dataset: str = "",
    ) -> None:
        super().__init__(backbone, classnames, cfg, template, dataset)
        self.n_text = int(getattr(cfg, "n_ctx_text", 0))
        self.depth_text = int(getattr(cfg, "depth_text", 0))
        self.n_vision = int(getattr(cfg, "n_ctx_vision", 0))
        self.depth_vision = int(getattr(cfg, "depth_vision", 0))
        self.ctx_init = str(getattr(cfg, "ctx_init", ""))
        self.round_fp16 = bool(getattr(cfg, "round_prompts_fp16", False))
        self._check(backbone)
        if self.depth_text:
            use_words = bool(self.ctx_init) and self.n_text <= MAX_WORD_INIT
            ctx, self.prefix = init_context(backbone, self.n_text, self.ctx_init if use_words else "", INIT_STD)
            self.ctx = nn.Parameter(ctx)  # (n_text, Dt)
            self.compound_prompts_text = _free_prompts(self.depth_text - 1, self.n_text, backbone.text_width)
            self.prompts = ClassPrompts(backbone, self.classnames, self.n_text, self.prefix)
        if self.depth_vision:
            vision = torch.empty(self.n_vision, backbone.vision_width)
            nn.init.normal_(vision, std=INIT_STD)
            self.vision_ctx = nn.Parameter(vision)  # (n_vision, Dv)
            self.compound_prompts_vision = _free_prompts(self.depth_vision - 1, self.n_vision, backbone.vision_width)
        if self.fixed_text:  # VPT's class features of the current class set: (C, E), frozen, never in a checkpoint
            self.register_buffer("vpt_text", self._encode_fixed_text(), persistent=False)

    def _check(self, backbone: Backbone) -> None:
        """Settings the design cannot use are refused, each in one line naming the fix."""
        name = self.name
        # (setting, value, least, most): text depth >= 1 for IVLP (independentVL.py:70), vision depth >= 1 for VPT
        # (vpt.py:38), at most the tower's depth
        ranges = [("depth_vision", self.depth_vision, 1 if self.fixed_text else 0, backbone.vision_layers)]
        if not self.fixed_text:
            ranges.append(("depth_text", self.depth_text, 1, backbone.text_layers))
        for key, value, least, most in ranges:
            if not least <= value <= most:
                raise UserError(f"{name}: {key} must be in {least} … {most} for '{backbone.name}', got {value}")
        if self.depth_vision == 0 and self.n_vision:
            raise UserError(
                f"{name}: n_ctx_vision={self.n_vision} has no effect with depth_vision=0 (no vision prompt); "
                "set n_ctx_vision=0, or a depth_vision of at least 1"
            )
        if self.depth_vision and self.n_vision < 1:
            raise UserError(f"{name}: n_ctx_vision must be at least 1 with depth_vision >= 1, got {self.n_vision}")
        if self.fixed_text:
            return
        if self.n_text < 1:
            raise UserError(f"{name}: n_ctx_text must be at least 1, got {self.n_text}")
        if self.ctx_init and self.n_text > MAX_WORD_INIT:
            raise UserError(
                f"{name}: ctx_init '{self.ctx_init}' is used only with n_ctx_text <= {MAX_WORD_INIT} (the "
                f"reference's rule), got n_ctx_text={self.n_text}; set ctx_init= (empty) for a random context"
            )
        if self.ctx_init:
            words = backbone.n_text_tokens(self.ctx_init.replace("_", " "))
            if words < self.n_text:
                raise UserError(
                    f"{name}: ctx_init '{self.ctx_init}' has {words} tokens, fewer than n_ctx_text={self.n_text}; "
                    "the context would overwrite class-name tokens: use longer init words or a smaller n_ctx_text"
                )

    def set_classnames(self, classnames: Sequence[str], template: str | None = None, dataset: str | None = None):
        super().set_classnames(classnames, template, dataset)
        if self.depth_text:
            self.prompts = ClassPrompts(self.backbone, self.classnames, self.n_text, self.prefix).to(self.ctx.device)
        if self.fixed_text:
            self.vpt_text = self._encode_fixed_text().to(self.vpt_text.device)
        self.refresh_eval()

    # --- text -----------------------------------------------------------------------------------------------------
    def _encode_fixed_text(self) -> torch.Tensor:
        """VPT's class features (C, E), unnormalised, of "a photo of a {class}." whatever the dataset, encoded by
        the fp32 text tower (an fp32 copy under reference-fp16: the reference's VPT model is fp32) outside any
        autocast, once per class set as the reference's FixedEmbeddings (`frozen.quantities.class_text_features`)."""
        with torch.autocast(self.backbone.device.type, enabled=False):
            feats = class_text_features(self.backbone, self.classnames, VPT_TEXT_TEMPLATE, normalize=False, fp32=True)
        return feats.to(self.backbone.dtype)  # (C, E)

    def text_features(self) -> torch.Tensor:
        """Class text features (C, E), unnormalised; deep text prompts replace positions 1 … n_ctx_text."""
        if self.fixed_text:
            return self.vpt_text  # (C, E)
        deep = list(self.compound_prompts_text)
        n = self.n_text

        def layer_fn(i: int, x: torch.Tensor) -> torch.Tensor:  # before text block i; x: the shared prefix (1, P, Dt)
            if 1 <= i < self.depth_text:  # (or every row (C, T, Dt) when the backbone does not share it)
                p = deep[i - 1].to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)  # (·, n, Dt)
                x = torch.cat([x[:, :1], p, x[:, 1 + n :]], dim=1)
            return x

        # Positions 1 … n are inside the prefix every class prompt shares (SOS + the n context slots + the prefix
        # words), so the deep prompts act on the shared positions only.
        shared = self.prompts.shared_len if self.prompts.shared_len >= 1 + n else 0
        embeds = self.prompts.build(self.ctx).to(self.backbone.dtype)  # (C, T, Dt)
        return self.backbone.encode_text(embeds, self.prompts.tokens, layer_fn, shared_prefix=shared)  # (C, E)

    # --- image ----------------------------------------------------------------------------------------------------
    def _vision_prompt(self, p: torch.Tensor, batch: int, dtype: torch.dtype) -> torch.Tensor:
        """Prompt (n, Dv) -> (B, n, Dv) in `dtype`. With `round_prompts_fp16` the expanded prompt is cast to fp16 and
        back, in the reference's order (``VPT.expand(B, …).half()``, clip/model.py:238, 405): the values are fp16,
        each image's gradient is rounded to fp16 and the batch's are summed in fp32."""
        expanded = p.unsqueeze(0).expand(batch, -1, -1)  # (B, n, Dv)
        return expanded.half().to(dtype) if self.round_fp16 else expanded.to(dtype)

    def image_features(self, images: torch.Tensor | None, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Image features (B, E), unnormalised: frozen without vision prompts, else prompted (the last n_ctx_vision
        tokens replaced before blocks 1 … depth_vision−1)."""
        if not self.depth_vision:
            return frozen_image_features(self.backbone, images, image_features)  # (B, E)
        if images is None:
            raise ValueError(f"{self.name} prompts the image tower: it needs images, not cached image features")
        deep = list(self.compound_prompts_vision)
        n = self.n_vision

        def layer_fn(i: int, x: torch.Tensor) -> torch.Tensor:  # before vision block i; x (B, 1+P+n, Dv)
            if 1 <= i < self.depth_vision:
                p = self._vision_prompt(deep[i - 1], x.shape[0], x.dtype)  # (B, n, Dv)
                x = torch.cat([x[:, :-n], p], dim=1)  # (B, 1+P+n, Dv)
            return x

        shallow = self._vision_prompt(self.vision_ctx, images.shape[0], self.backbone.dtype)  # (B, n, Dv)
        return self.backbone.encode_image(images, prompts=shallow, layer_fn=layer_fn)  # (B, E)


# --- the registered presets ------------------------------------------------------------------------------------------
_IVLP_MPL = {"n_ctx_text": 2, "n_ctx_vision": 2, "depth_text": 12, "depth_vision": 12, "ctx_init": "a photo of a"}
_IVLP_SRC = {"n_ctx_text": 4, "n_ctx_vision": 4, "depth_text": 9, "depth_vision": 9, "ctx_init": "a photo of a"}
_OPT_MPL = {"batch_size": 4, "lr": 0.0035, "epochs": 5, "eval_batch_size": 100}
_IVLP_TOY = {**TOY_TRAIN, "n_ctx_text": 2, "n_ctx_vision": 2, "depth_text": 3, "depth_vision": 3}
_TOY_OPT = {"batch_size": 4, "lr": 0.0035}
IVLP_CONFIG = "configs/trainers/IVLP/vit_b16_c2_ep5_batch4_2+2ctx.yaml"
LP_CONFIG = "configs/trainers/IVLP/vit_b16_c2_ep5_batch4_4ctx_language_only.yaml"
VPT_CONFIG = "configs/trainers/VPT/vit_b16_c2_ep5_batch4_4.yaml"
SRC_IVLP_CONFIG = "configs/trainers/IVLP/vit_b16_c2_ep20_batch4_4+4ctx.yaml"
_XD_NOTE = (
    "xd: scripts/{folder}/xd_train_{short}.sh trains ImageNet (16 shots, all classes) with the same config; its "
    "xd_test script loads epoch 2, which a 5-epoch run never writes, so we evaluate the last epoch (5). No few-shot "
    "config in the repository: no few_shot recipe"
)


@METHODS.register("ivlp")
class IVLP(DeepPrompts):
    """Independent vision-language prompting (the MaPLe paper's IVLP baseline): free deep prompts in both towers."""

    name = "ivlp"
    report_order = 350
    color = "#17becf"
    in_default_set = False
    Config = IVLPConfig
    # reference-fp16: ctx in fp16 (clip_model.dtype); VPT / VPT_shallow live in the reference's CLIP as fp32
    # parameters that convert_weights never touches (cast to fp16 at use).
    reference_fp32 = ("compound_prompts_text.*", "vision_ctx", "compound_prompts_vision.*")
    recipes = {
        "paper": {
            # MaPLe repository: IVLP/vit_b16_c2_ep5_batch4_2+2ctx
            "base2novel": {**_IVLP_MPL, **_OPT_MPL},
            "xd": {**_IVLP_MPL, **_OPT_MPL},
            # no few-shot config for IVLP in either repository: the planner says so in one line
        },
        # PromptSRC's IVLP (its README's IVLP row): IVLP/vit_b16_c2_ep20_batch4_4+4ctx, base-to-novel only
        "promptsrc": {"base2novel": {**_IVLP_SRC, "batch_size": 4, "lr": 0.0025, "epochs": 20, "eval_batch_size": 100}},
        # Toy world (our design; depth <= 3 on the 4-layer toy CLIP); few_shot reuses the base-to-novel budget.
        "toy": {
            "base2novel": {**_IVLP_TOY, **_TOY_OPT, "epochs": 5},
            "xd": {**_IVLP_TOY, **_TOY_OPT, "epochs": 2},
            "few_shot": {**_IVLP_TOY, **_TOY_OPT, "epochs": 5},
        },
    }
    provenance = {
        "paper": Provenance(
            MPL_REPO,
            MPL_COMMIT,
            {"base2novel": IVLP_CONFIG, "xd": IVLP_CONFIG},
            _XD_NOTE.format(folder="independent-vlp", short="ivlp"),
        ),
        "promptsrc": Provenance(
            SRC_REPO,
            SRC_COMMIT,
            {"base2novel": SRC_IVLP_CONFIG},
            "PromptSRC's IVLP baseline, base-to-novel only (scripts/independent-vlp/base2new_*_ivlp.sh, test at "
            "epoch 20; its reproduce_ivlp.sh loads epoch 5 of the same 20-epoch config)",
        ),
    }
    # no-deep: prompts at the input of both towers only; no-vision: the text prompts alone (language-only prompting
    # with IVLP's lengths).
    ablations = {
        "deep": {"depth_text": 1, "depth_vision": 1},
        "vision": {"depth_vision": 0, "n_ctx_vision": 0},
    }
    # trainers/independentVL.py saves the whole CustomCLIP as "VLPromptLearner": ctx under "prompt_learner.", the
    # input vision prompt as image_encoder.VPT, each deep prompt as VPT_shallow of the block it enters, the frozen CLIP
    # (docs/interop.md). Language-only files (no image_encoder.VPT) are language_deep's.
    reference_checkpoint = dict(
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
            "n_ctx_text": ("shape", "prompt_learner.ctx", 0),
            "n_ctx_vision": ("shape", "image_encoder.VPT", 0),
            "depth_text": ("count", "text_encoder.transformer.resblocks.{i}.VPT_shallow", 1),
            "depth_vision": ("count", "image_encoder.transformer.resblocks.{i}.VPT_shallow", 1),
        },
        options={
            "n_ctx_text": "TRAINER.IVLP.N_CTX_TEXT",
            "n_ctx_vision": "TRAINER.IVLP.N_CTX_VISION",
            "depth_text": "TRAINER.IVLP.PROMPT_DEPTH_TEXT",
            "depth_vision": "TRAINER.IVLP.PROMPT_DEPTH_VISION",
            "ctx_init": "TRAINER.IVLP.CTX_INIT",
        },
        repo="muzairkhattak/multimodal-prompt-learning@69bce21",
    )


@METHODS.register("language_deep")
class LanguageDeep(DeepPrompts):
    """Deep language-only prompting (the MaPLe paper's baseline): free deep text prompts, frozen image tower."""

    name = "language_deep"
    report_order = 360
    color = "#bcbd22"
    in_default_set = False
    Config = LanguageDeepConfig
    frozen_image_path = True
    reference_fp32 = ("compound_prompts_text.*",)  # ctx fp16, the blocks' VPT_shallow fp32 (as IVLP's)
    recipes = {
        "paper": {
            "base2novel": {"n_ctx_text": 4, "depth_text": 12, "ctx_init": "a photo of a", **_OPT_MPL, "lr": 0.0025},
            "xd": {"n_ctx_text": 4, "depth_text": 12, "ctx_init": "a photo of a", **_OPT_MPL, "lr": 0.0025},
        },
        "toy": {
            p: {**TOY_TRAIN, "n_ctx_text": 4, "depth_text": 3, "ctx_init": "a photo of a", **_TOY_OPT, "epochs": e}
            for p, e in (("base2novel", 5), ("xd", 2), ("few_shot", 5))
        },
    }
    provenance = {
        "paper": Provenance(
            MPL_REPO,
            MPL_COMMIT,
            {"base2novel": LP_CONFIG, "xd": LP_CONFIG},
            "trainer IVLP with vision depth 0; " + _XD_NOTE.format(folder="language-prompting", short="lp"),
        ),
    }
    ablations = {"deep": {"depth_text": 1}}  # no-deep: input prompts only (CoOp's "a photo of a" context)
    # The IVLP trainer's file with PROMPT_DEPTH_VISION 0: ctx, the text blocks' VPT_shallow, no vision prompt.
    reference_checkpoint = dict(
        trainer="IVLP",
        learner="VLPromptLearner",
        keys={
            "ctx": "prompt_learner.ctx",
            "compound_prompts_text.{i}": "text_encoder.transformer.resblocks.{i+1}.VPT_shallow",
        },
        deleted_buffers="whole_model",
        frozen="clip",
        config={
            "n_ctx_text": ("shape", "prompt_learner.ctx", 0),
            "depth_text": ("count", "text_encoder.transformer.resblocks.{i}.VPT_shallow", 1),
        },
        options={
            "n_ctx_text": "TRAINER.IVLP.N_CTX_TEXT",
            "depth_text": "TRAINER.IVLP.PROMPT_DEPTH_TEXT",
            "ctx_init": "TRAINER.IVLP.CTX_INIT",
        },
        fixed_options={"TRAINER.IVLP.N_CTX_VISION": 0, "TRAINER.IVLP.PROMPT_DEPTH_VISION": 0},
        repo="muzairkhattak/multimodal-prompt-learning@69bce21",
    )


@METHODS.register("vpt_deep")
class VPTDeep(DeepPrompts):
    """VPT-deep (the MaPLe paper's baseline): free deep vision prompts, fixed "a photo of a {class}." text."""

    name = "vpt_deep"
    report_order = 370
    color = "#8c6d31"
    in_default_set = False
    Config = VPTDeepConfig
    fixed_text = True
    # The reference runs VPT in fp32 (vpt.py returns model.float()) with fp32 prompts rounded to fp16 at use
    # (`round_prompts_fp16`): its faithful precision is fp32. Under reference-fp16 the prompts stay fp32 parameters.
    reference_fp32 = ("*",)
    recipes = {
        "paper": {
            "base2novel": {"n_ctx_vision": 8, "depth_vision": 12, **_OPT_MPL, "lr": 0.0025},
            "xd": {"n_ctx_vision": 8, "depth_vision": 12, **_OPT_MPL, "lr": 0.0025},
        },
        "toy": {
            p: {**TOY_TRAIN, "n_ctx_vision": 8, "depth_vision": 3, **_TOY_OPT, "lr": 0.0025, "epochs": e}
            for p, e in (("base2novel", 5), ("xd", 2), ("few_shot", 5))
        },
    }
    provenance = {
        "paper": Provenance(
            MPL_REPO,
            MPL_COMMIT,
            {"base2novel": VPT_CONFIG, "xd": VPT_CONFIG},
            "trainer VPT, 8 vision tokens (the config's name says 4), fp32 model; "
            + _XD_NOTE.format(folder="vpt", short="vpt"),
        ),
    }
    ablations = {"deep": {"depth_vision": 1}}  # no-deep: VPT-shallow (the input prompt only)
    # trainers/vpt.py saves the whole (fp32) CustomCLIP under the name "prompt_learner": image_encoder.VPT, the image
    # blocks' VPT_shallow and the frozen CLIP, all fp32; no text prompt, no class buffers (docs/interop.md).
    reference_checkpoint = dict(
        trainer="VPT",
        learner="prompt_learner",
        keys={
            "vision_ctx": "image_encoder.VPT",
            "compound_prompts_vision.{i}": "image_encoder.transformer.resblocks.{i+1}.VPT_shallow",
        },
        deleted_buffers="whole_model",
        frozen="clip",
        frozen_fp32=("*",),
        config={
            "n_ctx_vision": ("shape", "image_encoder.VPT", 0),
            "depth_vision": ("count", "image_encoder.transformer.resblocks.{i}.VPT_shallow", 1),
        },
        options={"n_ctx_vision": "TRAINER.VPT.N_CTX_VISION", "depth_vision": "TRAINER.VPT.PROMPT_DEPTH_VISION"},
        repo="muzairkhattak/multimodal-prompt-learning@69bce21",
    )
