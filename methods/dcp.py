"""DCP / CMPA: deeply coupled cross-modal prompts (Liu et al., Findings of ACL 2023; docs/methods/dcp.md §6).

Specified by its code, GingL/CMPA at commit 407a743 (files cited below as `clip/model.py`, `trainers/cmpa.py`,
`configs/trainers/CMPA/vit_b16_c2_ep20_batch4_16ctx.yaml`, `scripts/cmpa/*.sh`).

What the method is:

* Input level: M = n_ctx learnable text vectors at token positions 1 … M (after SOS, prompt text "X X … X {class}.")
  and M learnable vision vectors appended after [CLS, patches] after the positional embedding, before ln_pre
  (`trainers/cmpa.py`, MultiModalPromptLearner and Encoder.forward). Both N(0, 0.02²); the text ones come from the
  words of `ctx_init` only when n_ctx ≤ 4 (the reference rule; with the default 16 the init words are ignored).
* Both towers are stepped together (`Backbone.encode_joint`); before joint block i ≥ 1, while the reference's
  injection counter allows it (`clip/model.py`, ResidualAttentionBlock_CMPA.forward: counter from 0, inject while
  ``not counter > depth - 1``), the previous block's prompt-slot outputs — vision: the last M tokens, text: tokens
  1 … M — go through the CMPA module and the vision result replaces the last M tokens. ``depth_semantics``
  "official" therefore injects at blocks 1 … J (J = 9 → 10 prompted layers counting the input), "maple" at
  1 … J − 1 (MaPLe's counting). The update happens before the block runs.
* CMPA (`clip/model.py`, PromptAttention): fuse over the instance axis (vision: batch, text: classes) with mean /
  first / max, then a pre-LN cross-modal transformer block per modality, both reading the *previous* fused v̄, t̄:
  V′ = v̄ + MHA_v(Q = LN_v1(W_t→v t̄), K = V = LN_v1(v̄)); V″ = V′ + MLP_v(LN_v2(V′)) and symmetrically for text
  (one LayerNorm for query and key / value; MLP d → 4d → d with QuickGELU; W_t→v, W_v→t Linear with bias;
  heads = width // 64 as the reference, configurable). The result is broadcast back over the batch (and classes).

Fidelity decisions (all checked against the reference files above):

* **Text update discarded** (`text_update=False`, preset ``dcp``): the reference stores the CMPA text output in a
  local variable that the text block's return overwrites, so the text tower runs on its own propagated prompts.
  We do not compute the dead text half at all and keep its parameters *frozen* (requires_grad False): the reference
  hands them to the optimizer but they never receive a gradient, so SGD never changes them — identical behaviour.
  Consequence: ``dcp`` reports 7,502,336 trainable parameters on ViT-B/16 where the reference's optimizer lists
  11,048,448 (the module itself holds all 11,048,448, created exactly as the reference's). ``dcp-paper``
  (``text_update=True``) writes T″ into text positions 1 … M and trains all 11,048,448.
* **Batch dependence** (fusing mean / first / max): each image's deep vision prompts depend on the other images of
  its batch, in training and at test time (reference test batch 16). Kept on purpose in ``dcp``; ``dcp-instance``
  (fusing ``none``, our design) runs CMPA per image with the class-mean text prompts instead.
* ``share=False`` (PS false): the reference creates a CMPA in all 12 joint blocks; we create one only for the blocks
  that inject (blocks 1 … J). The others never run and never receive a gradient in the reference either, so the
  behaviour is identical; only the parameter count differs (≈99 M instead of ≈132 M for J = 9 on ViT-B/16).
* Precision: the reference casts CMPA (except its LayerNorms) and the prompts to fp16 and updates them with plain
  SGD; ``--precision reference-fp16`` does exactly that (`reference_fp32` below). Every other precision keeps every
  trainable tensor in fp32 and lets the trainer's autocast pick the activation precision (recorded in the run key).
* Evaluation: with the text update discarded (or no CMPA) the text path never sees the images, so ``begin_eval``
  encodes the class prompts once and also caches the fused text prompt t̄ each injection block needs; ``predict``
  then runs only the vision tower. The reference re-encodes every class prompt on every test batch.
* Text fusion remark (docs/methods/dcp.md §6.2): under the causal mask the prompt-slot outputs depend only on SOS and
  the shared prompts, so they are identical across classes and mean / first / max give the same t̄ (tested).
* Fusing ``none`` with ``text_update=True`` gives every image its own text prompts: the text tower then runs on
  B × C sequences (instance-conditional, like CoCoOp); supported, but costly.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mugcp_bench.errors import UserError
from mugcp_bench.methods.base import TOY_TRAIN, Method, MethodOutput, cosine_logits
from mugcp_bench.methods.prompts import ClassPrompts, init_context
from mugcp_bench.model.backbone import Backbone
from mugcp_bench.registry import METHODS

FUSING_MODES = ("mean", "first", "max", "none")
DEPTH_SEMANTICS = ("official", "maple")
PROMPT_STD = 0.02  # N(0, 0.02²) for both input prompts (trainers/cmpa.py)
HEAD_WIDTH = 64  # reference: heads = width // 64 for both CMPA attentions (clip/model.py, CMPA / build_model)


@dataclass
class DCPConfig:
    n_ctx: int = 16  # text = vision prompt length (TRAINER.CMPA.N_CTX; also the CMPA sequence length)
    ctx_init: str = "a photo of a"  # used only when n_ctx <= 4, as the reference
    depth: int = 9  # PROMPT_DEPTH J
    fusing: str = "mean"  # mean / first / max (reference) / none (our design: per image)
    share: bool = True  # PS: one CMPA for every injecting block, or one per block
    text_update: bool = False  # False = official code (text half discarded); True = paper's mutual exchange
    depth_semantics: str = "official"  # official: inject at blocks 1 … J; maple: 1 … J − 1
    cmpa: bool = True  # False (ablation no-cmpa): no coupling, the input prompts just propagate
    vision_heads: int = 0  # 0 = vision_width // 64 (12 on ViT-B/16)
    text_heads: int = 0  # 0 = text_width // 64 (8 on ViT-B/16)
    mlp_ratio: int = 4


@dataclass
class DCPPaperConfig(DCPConfig):
    text_update: bool = True


@dataclass
class DCPInstanceConfig(DCPConfig):
    fusing: str = "none"


def injection_blocks(n_layers: int, depth: int, semantics: str) -> list[int]:
    """Joint blocks whose prompt slots are replaced by CMPA output, following the reference's counter.

    Official (`clip/model.py`, ResidualAttentionBlock_CMPA): the counter starts at 0, block 0 never injects, block
    i ≥ 1 injects while ``counter <= depth - 1`` and then increments it: blocks 1 … depth. MaPLe counts the input
    layer as one of the J prompted layers: blocks 1 … depth − 1.
    """
    budget = depth if semantics == "official" else depth - 1
    blocks, counter = [], 0
    for i in range(1, n_layers):
        if counter <= budget - 1:
            blocks.append(i)
            counter += 1
    return blocks


class QuickGELU(nn.Module):
    """x · σ(1.702 x), the activation of OpenAI's CLIP and of the CMPA MLPs (`clip/model.py`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def _mlp(width: int, ratio: int) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            [
                ("c_fc", nn.Linear(width, width * ratio)),
                ("gelu", QuickGELU()),
                ("c_proj", nn.Linear(width * ratio, width)),
            ]
        )
    )


class CrossModalPromptAttention(nn.Module):
    """The CMPA module (`clip/model.py`, PromptAttention): a pre-LN cross-modal block per modality.

    Batch-first here; the reference runs sequence-first attention over the M prompt tokens with batch 1 (fused)
    — the same computation. Attribute order follows the reference's constructor (PyTorch default initialisation).
    """

    def __init__(
        self, vision_width: int, vision_heads: int, text_width: int, text_heads: int, mlp_ratio: int = 4
    ) -> None:
        super().__init__()
        self.attn_v = nn.MultiheadAttention(vision_width, vision_heads, batch_first=True)
        self.ln_v1 = nn.LayerNorm(vision_width)  # normalises both the query and the key / value
        self.mlp_v = _mlp(vision_width, mlp_ratio)
        self.ln_v2 = nn.LayerNorm(vision_width)
        self.proj_v2t = nn.Linear(vision_width, text_width)  # W_v→t (text half)
        self.proj_t2v = nn.Linear(text_width, vision_width)  # W_t→v (vision half)
        self.attn_t = nn.MultiheadAttention(text_width, text_heads, batch_first=True)
        self.ln_t1 = nn.LayerNorm(text_width)
        self.mlp_t = _mlp(text_width, mlp_ratio)
        self.ln_t2 = nn.LayerNorm(text_width)

    def text_half(self) -> list[nn.Module]:
        """The modules that only produce the text update (dead code in the official code)."""
        return [self.proj_v2t, self.attn_t, self.ln_t1, self.mlp_t, self.ln_t2]

    def update_vision(self, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """V″ from fused v (G, M, Dv) and t (G|1, M, Dt): query from text, key / value from vision."""
        q = self.ln_v1(self.proj_t2v(t)).expand(v.shape[0], -1, -1)  # (G, M, Dv)
        kv = self.ln_v1(v)  # (G, M, Dv)
        v1 = v + self.attn_v(q, kv, kv, need_weights=False)[0]  # (G, M, Dv)
        return v1 + self.mlp_v(self.ln_v2(v1))  # (G, M, Dv)

    def update_text(self, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """T″ from fused v (G, M, Dv) and t (G, M, Dt): query from vision, key / value from text."""
        q = self.ln_t1(self.proj_v2t(v))  # (G, M, Dt)
        kv = self.ln_t1(t)  # (G, M, Dt)
        t1 = t + self.attn_t(q, kv, kv, need_weights=False)[0]  # (G, M, Dt)
        return t1 + self.mlp_t(self.ln_t2(t1))  # (G, M, Dt)


def _heads(width: int, heads: int, key: str) -> int:
    heads = heads or width // HEAD_WIDTH
    if heads <= 0 or width % heads:
        raise UserError(f"dcp: {width}-wide tower cannot use {heads} CMPA heads; set {key} to a divisor of {width}")
    return heads


# configs/trainers/CMPA/vit_b16_c2_ep20_batch4_16ctx.yaml + scripts/cmpa/main.sh (N_CTX 16, PROMPT_DEPTH 9):
# batch 4, LR 0.0035, 20 epochs, test batch 16 (matters: the batch mean). Few-shot and the ImageNet source run of
# the domain-shift test are the paper's protocols. scripts/cmpa/xd_test.sh loads epoch 5 of the ImageNet run
# although the config trains 20 epochs (a 5-epoch override is likely but unknown): we train the config's 20.
# base2novel: the code supports base / new subsets but the paper does not report it; same settings (our choice).
PAPER_RECIPE = {"n_ctx": 16, "depth": 9, "epochs": 20, "lr": 0.0035, "batch_size": 4, "eval_batch_size": 16}
# Toy world (4-layer CLIP): 4 ctx (initialised from "a photo of a", the reference's n_ctx <= 4 rule), depth 3
# (injections at every deep block 1 … 3), a few epochs.
TOY_RECIPE = {**TOY_TRAIN, "n_ctx": 4, "depth": 3, "epochs": 5, "lr": 0.0035, "batch_size": 4, "eval_batch_size": 16}


@METHODS.register("dcp", aliases=("cmpa",))
class DCP(Method):
    """DCP as the released code behaves: text update discarded, batch-fused vision prompts (docs/methods/dcp.md
    §6.7)."""

    name = "dcp"
    report_order = 900
    color = "#8c564b"
    in_default_set = True
    Config = DCPConfig
    # reference-fp16: prompts and CMPA in fp16 except its LayerNorms (trainers/cmpa.py builds the prompts in
    # clip_model.dtype; clip/model.py convert_weights converts CMPA's Linear and attention weights)
    reference_fp32 = ()
    recipes = {
        "paper": {p: dict(PAPER_RECIPE) for p in ("few_shot", "xd", "base2novel")},
        "toy": {p: dict(TOY_RECIPE) for p in ("few_shot", "xd", "base2novel")},
    }
    ablations = {"cmpa": {"cmpa": False}}
    # GingL/CMPA@407a743 trainers/cmpa.py saves the whole CustomCLIP as "MultiModalPromptLearner": prompts under
    # "prompt_learner.", the frozen CLIP renamed into one Encoder (clip/model.py build_model) and a PromptAttention per
    # joint block (attribute names below, "promt" sic). PS True (share): one module listed under every block; PS
    # False: one per block, ours exist for the injecting blocks only. Its text half and unused blocks play no part at
    # evaluation in `dcp` (docs/interop.md).
    reference_checkpoint = tuple(
        dict(
            trainer="CMPA",
            learner="MultiModalPromptLearner",
            keys={
                "ctx_text": "prompt_learner.prompts_text",
                "ctx_visual": "prompt_learner.prompts_visual",
                **{
                    (f"cmpa.{ours}.*" if share else f"cmpa.{{i}}.{ours}.*"): (
                        f"encoder.resblocks.{{{'all' if share else 'i'}}}.prompt_attn.{ref}.*"
                    )
                    for ours, ref in (
                        ("attn_v", "promt_attention_visual"),
                        ("ln_v1", "ln_pa_1_visual"),
                        ("mlp_v", "mlp_pa_visual"),
                        ("ln_v2", "ln_pa_2_visual"),
                        ("proj_v2t", "proj_v2t"),
                        ("proj_t2v", "proj_t2v"),
                        ("attn_t", "promt_attention_text"),
                        ("ln_t1", "ln_pa_1_text"),
                        ("mlp_t", "mlp_pa_text"),
                        ("ln_t2", "ln_pa_2_text"),
                    )
                },
            },
            deleted_buffers="whole_model",
            frozen="cmpa",
            ignored=("encoder.resblocks.*.prompt_attn.*",),
            config={"n_ctx": ("shape", "prompt_learner.prompts_text", 0)},
            requires={
                "share": share,
                "cmpa": True,
                "text_update": False,
                "depth_semantics": "official",
                "fusing": {"mean", "first", "max"},  # one of
                "vision_heads": 0,
                "text_heads": 0,
                "mlp_ratio": 4,
            },
            options={
                "n_ctx": "TRAINER.CMPA.N_CTX",
                "ctx_init": "TRAINER.CMPA.CTX_INIT",
                "depth": "TRAINER.CMPA.PROMPT_DEPTH",
                "fusing": "TRAINER.CMPA.FUSING",
                "share": "TRAINER.CMPA.PS",
            },
            configs={
                p: "configs/trainers/CMPA/vit_b16_c2_ep20_batch4_16ctx.yaml" for p in ("base2novel", "xd", "few_shot")
            },
            frozen_fp32=("encoder.proj_visual",),
            repo="GingL/CMPA@407a743",
            note="the released train.py does not define TRAINER.CMPA.FUSING and TRAINER.CMPA.PS: add both to its "
            "extend_cfg (any default: the command sets them) before running it",
        )
        for share in (True, False)
    )

    @classmethod
    def ignored_settings(cls, cfg: DCPConfig) -> dict[str, str]:
        out = {}
        if cfg.ctx_init and cfg.n_ctx > 4:  # trainers/cmpa.py: the init words only for N_CTX <= 4
            out["ctx_init"] = (
                f"dcp uses init words only for n_ctx <= 4 (here {cfg.n_ctx}: a random context); also --set n_ctx=4 "
                "or fewer"
            )
        if not cfg.cmpa:  # no prompt attention module: its settings shape nothing
            why = "it configures the CMPA module, which cmpa=false removes; drop it or --set cmpa=true"
            for name in (
                "share",
                "text_update",
                "fusing",
                "vision_heads",
                "text_heads",
                "mlp_ratio",
                "depth_semantics",
            ):
                out[name] = why
        return out

    def __init__(
        self,
        backbone: Backbone,
        classnames: Sequence[str],
        cfg: DCPConfig,
        template: str = "a photo of a {}.",
        dataset: str = "",
    ) -> None:
        super().__init__(backbone, classnames, cfg, template, dataset)
        if cfg.fusing not in FUSING_MODES:
            raise UserError(f"dcp: fusing must be one of {', '.join(FUSING_MODES)}, got '{cfg.fusing}'")
        if cfg.depth_semantics not in DEPTH_SEMANTICS:
            raise UserError(
                f"dcp: depth_semantics must be one of {', '.join(DEPTH_SEMANTICS)}, got '{cfg.depth_semantics}'"
            )
        if cfg.depth < 1:  # trainers/cmpa.py asserts PROMPT_DEPTH >= 1
            raise UserError(f"dcp: depth must be >= 1, got {cfg.depth}")
        if cfg.n_ctx < 1:
            raise UserError(f"dcp: n_ctx must be >= 1, got {cfg.n_ctx}")
        if backbone.vision_layers != backbone.text_layers:  # the reference merges both towers into joint blocks
            raise UserError(
                f"dcp steps both towers together and needs equal depths; backbone '{backbone.name}' has "
                f"{backbone.vision_layers} vision and {backbone.text_layers} text layers (e.g. ViT-L/14 cannot be used)"
            )
        most = backbone.vision_layers - (1 if cfg.depth_semantics == "official" else 0)  # block 0 never injects
        if cfg.cmpa and cfg.depth > most:  # the reference on ViT-B/16 never runs out of blocks: refuse, never clip
            raise UserError(
                f"dcp: depth must be at most {most} for '{backbone.name}' ({backbone.vision_layers} layers, "
                f"depth_semantics {cfg.depth_semantics}), got {cfg.depth}; --set dcp.depth={most} or less"
            )
        dv, dt = backbone.vision_width, backbone.text_width
        self.inject = (
            injection_blocks(backbone.vision_layers, cfg.depth, cfg.depth_semantics) if cfg.cmpa else []
        )  # joint blocks whose prompt slots CMPA rewrites
        # CMPA first, then text and vision context: the reference builds CLIP (with CMPA) before the prompt learner.
        if self.inject:
            hv, ht = _heads(dv, cfg.vision_heads, "vision_heads"), _heads(dt, cfg.text_heads, "text_heads")

            def make() -> CrossModalPromptAttention:
                block = CrossModalPromptAttention(dv, hv, dt, ht, cfg.mlp_ratio)
                if not cfg.text_update:  # the reference discards the text output: these never get a gradient
                    for module in block.text_half():
                        module.requires_grad_(False)
                return block

            if cfg.share:
                self.cmpa = make()
            else:
                self.cmpa = nn.ModuleDict({str(i): make() for i in self.inject})
        ctx_text, prefix = init_context(backbone, cfg.n_ctx, cfg.ctx_init if cfg.n_ctx <= 4 else "", PROMPT_STD)
        self.ctx_text = nn.Parameter(ctx_text)  # (M, Dt)
        ctx_visual = torch.empty(cfg.n_ctx, dv)
        nn.init.normal_(ctx_visual, std=PROMPT_STD)
        self.ctx_visual = nn.Parameter(ctx_visual)  # (M, Dv)
        self.prefix = prefix
        self.prompts = ClassPrompts(backbone, self.classnames, cfg.n_ctx, prefix)
        self._cache: tuple[torch.Tensor, dict[int, torch.Tensor]] | None = None

    # --- properties ---------------------------------------------------------------------------------------------
    @property
    def instance_conditional(self) -> bool:
        """Text depends on the images only when CMPA's text output is written into the text tower."""
        return bool(self.inject) and self.cfg.text_update

    @property
    def per_image_text(self) -> bool:
        """Every image gets its own text prompts (fusing none with the text update): B × C text sequences."""
        return self.instance_conditional and self.cfg.fusing == "none"

    def set_classnames(
        self, classnames: Sequence[str], template: str | None = None, dataset: str | None = None
    ) -> None:
        super().set_classnames(classnames, template, dataset)
        self.prompts = ClassPrompts(self.backbone, self.classnames, self.cfg.n_ctx, self.prefix)
        self._cache = None

    # --- CMPA pieces --------------------------------------------------------------------------------------------
    def cmpa_for(self, i: int) -> CrossModalPromptAttention:
        return self.cmpa if self.cfg.share else self.cmpa[str(i)]

    def _fuse(self, x: torch.Tensor, dim: int, mode: str) -> torch.Tensor:
        """Reduce the instance axis `dim` to size 1 (mean / first / max, `clip/model.py` PromptAttention.forward)."""
        if mode == "mean":
            return x.mean(dim, keepdim=True)
        if mode == "first":
            return x.narrow(dim, 0, 1)
        return x.max(dim, keepdim=True).values  # "max": element-wise maximum

    def fuse_vision(self, v: torch.Tensor) -> torch.Tensor:
        """(B, M, Dv) -> (1, M, Dv), or (B, M, Dv) unchanged with fusing none."""
        return v if self.cfg.fusing == "none" else self._fuse(v, 0, self.cfg.fusing)

    def fuse_text(self, t: torch.Tensor, groups: int = 1) -> torch.Tensor:
        """(G·C, M, Dt) -> (G, M, Dt): reduce the class axis (fusing none: the class mean)."""
        t = t.reshape(groups, -1, *t.shape[1:])  # (G, C, M, Dt)
        return self._fuse(t, 1, "mean" if self.cfg.fusing == "none" else self.cfg.fusing).squeeze(1)  # (G, M, Dt)

    def _param_dtype(self) -> torch.dtype:
        return self.ctx_visual.dtype

    def _inject_vision(self, i: int, xv: torch.Tensor, tbar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Replace the last M vision tokens by V″. Returns (new xv (B, N, Dv), fused v̄ (G, M, Dv))."""
        m, dtype = self.cfg.n_ctx, self._param_dtype()
        vbar = self.fuse_vision(xv[:, -m:]).to(dtype)  # (G, M, Dv)
        v_new = self.cmpa_for(i).update_vision(vbar, tbar.to(dtype))  # (G, M, Dv)
        v_new = v_new.to(xv.dtype).expand(xv.shape[0], -1, -1)  # (B, M, Dv)
        return torch.cat([xv[:, :-m], v_new], dim=1), vbar  # (B, 1 + P + M, Dv)

    # --- forward ------------------------------------------------------------------------------------------------
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image features (B, E) and text features (C, E), or (B, C, E) with per-image text; unnormalised."""
        m = self.cfg.n_ctx
        b = images.shape[0]
        embeds = self.prompts.build(self.ctx_text)  # (C, T, Dt)
        tokens = self.prompts.tokens  # (C, T)
        groups = b if self.per_image_text else 1
        prefix_index = None  # one shared text prefix (SOS + prompts) for every class, or one per image
        if groups > 1:
            embeds = embeds.unsqueeze(0).expand(b, -1, -1, -1).reshape(-1, *embeds.shape[1:])  # (B·C, T, Dt)
            prefix_index = torch.arange(b, device=tokens.device).repeat_interleave(tokens.shape[0])  # (B·C,)
            tokens = tokens.repeat(b, 1)  # (B·C, T)
        inject = set(self.inject)

        def layer_fn(i: int, xv: torch.Tensor, xt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            # Runs before joint block i on the previous block's outputs: xv (B, 1 + P + M, Dv), xt the shared text
            # prefix (G, P, Dt) holding prompt slots 1 … M (or every row (G·C, T, Dt) when the backbone does not
            # share it; the slots are the same in every class, docs/methods/dcp.md §6.2 remark).
            if i not in inject:
                return xv, xt
            tbar = self.fuse_text(xt[:, 1 : 1 + m], groups).to(self._param_dtype())  # (G, M, Dt)
            xv, vbar = self._inject_vision(i, xv, tbar)
            if self.cfg.text_update:  # both updates read the previous v̄ and t̄
                t_new = self.cmpa_for(i).update_text(vbar, tbar)  # (G, M, Dt)
                t_new = t_new.to(xt.dtype).unsqueeze(1).expand(-1, xt.shape[0] // groups, -1, -1)  # (G, C, M, Dt)
                xt = torch.cat([xt[:, :1], t_new.reshape(-1, m, xt.shape[-1]), xt[:, 1 + m :]], dim=1)
            return xv, xt

        vision_prompts = self.ctx_visual.unsqueeze(0)  # (1, M, Dv)
        image_f, text_f = self.backbone.encode_joint(
            images,
            embeds,
            tokens,
            layer_fn,
            vision_prompts=vision_prompts,
            shared_prefix=self.prompts.shared_len,
            prefix_index=prefix_index,
        )
        if groups > 1:
            text_f = text_f.reshape(b, -1, text_f.shape[-1])  # (B, C, E)
        return image_f, text_f

    def forward(
        self, images: torch.Tensor, keys: Sequence[str] | None = None, image_features: torch.Tensor | None = None
    ) -> MethodOutput:
        image_f, text_f = self.encode(images)  # (B, E), (C, E) | (B, C, E)
        return MethodOutput(cosine_logits(self.backbone.logit_scale, image_f, text_f))  # (B, C)

    # --- fast evaluation ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def begin_eval(self) -> None:
        """Text features and the per-block fused text prompts t̄, once (the text path never sees the images)."""
        self._cache = None
        if self.instance_conditional:
            return
        m, inject = self.cfg.n_ctx, set(self.inject)
        tbars: dict[int, torch.Tensor] = {}

        def text_fn(i: int, xt: torch.Tensor) -> torch.Tensor:
            if i in inject:
                tbars[i] = self.fuse_text(xt[:, 1 : 1 + m]).to(self._param_dtype())  # (1, M, Dt)
            return xt

        embeds, tokens = self.prompts.build(self.ctx_text), self.prompts.tokens
        text_f = self.backbone.encode_text(embeds, tokens, text_fn, shared_prefix=self.prompts.shared_len)  # (C, E)
        self._cache = (text_f, tbars)

    def end_eval(self) -> None:
        self._cache = None

    @torch.no_grad()
    def predict(
        self, images: torch.Tensor, keys: Sequence[str] | None = None, image_features: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self._cache is None:
            return self.forward(images, keys, image_features).logits
        text_f, tbars = self._cache

        def vision_fn(i: int, xv: torch.Tensor) -> torch.Tensor:
            return self._inject_vision(i, xv, tbars[i])[0] if i in tbars else xv

        image_f = self.backbone.encode_image(images, self.ctx_visual.unsqueeze(0), vision_fn)  # (B, E)
        return cosine_logits(self.backbone.logit_scale, image_f, text_f)  # (B, C)


@METHODS.register("dcp-paper")
class DCPPaper(DCP):
    """DCP with the paper's mutual exchange: CMPA's text output written into text positions 1 … M."""

    name = "dcp-paper"
    Config = DCPPaperConfig


@METHODS.register("dcp-instance")
class DCPInstance(DCP):
    """DCP without batch dependence: CMPA per image (fusing none), the text side fused by the class mean."""

    name = "dcp-instance"
    Config = DCPInstanceConfig
