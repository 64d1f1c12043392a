"""MuGCP (reconstructed): multi-modal mutual-guidance conditional prompt learning.

The paper (arXiv 2507.08410) has no public code; only its abstract is known. Every architectural choice here is OUR
DESIGN, so results are labelled "MuGCP (reconstructed)". docs/methods/mugcp.md states, component by component, what
the paper says, what it leaves open, what we chose and why (this is the second reconstruction; the first one had four
design faults, listed in docs/methods/mugcp.md §7.6).

- SCP (semantic conditional prompts): a per-image description (a describer, cached by
  `mugcp_bench.describers.cache`) encoded once by the frozen text encoder (`Backbone.encode_text_states`): s (E,)
  the normalised EOT feature and S (L, Dt) the final-layer token states after ln_final. A meta-net (shared hidden
  layer, one output layer per prompted text layer) maps s to M_t text tokens P_scp,l(x) for every text layer l.
- AMG (attention mutual guidance) at vision layers l = 1 … J−1: queries Q_l = E_l + W_q s attend (pre-LN MHA + MLP,
  ratio 2, shared across layers, per-layer LayerScale) over [X_l ; S~] and produce the visual conditional prompts
  VCP_l, which replace the M_v appended vision prompt slots; S~ = W_s->v S is refined from X_l (the mutual
  direction). VCP_0 = E_0 + W_q s at the input. The same queries also read out the image tokens X_l alone: that
  read-out r_l (no query residual, no semantic tokens) is the visual evidence L_align acts on.
- VCP off (`vcp: false`): the vision prompts are the learned deep prompts E_l (VPT-deep / IVLP), no AMG anywhere.
- MPF (multi-prompt fusion) at EVERY prompted text layer l = 0 … text_depth−1: prompt_l = D_l + α_l ⊙ P_scp,l(x)
  + β_l ⊙ W_v->t pool(VCP_v(l)), with D_0 = P_ctx, D_l the learned deep text prompts, v(l) = min(l, J−1) the
  vision layer paired with text layer l, gates α_l, β_l (M_t,) starting at 0; or concat / scp_only / vcp_only /
  ctx_only (no instance tokens in the text).
- Losses (the trainer adds CE): 0.5 · L_align, InfoNCE at τ = 0.07 of z_l = W_v->t pool(r_l) against the bank of
  training-description features s (every description of the training split, plus the batch's own), averaged over
  the AMG layers; optional PromptSRC / KgCoOp regulariser (off by default).

Further choices of ours: (1) on backbones whose text width differs from the embedding width (the toy and test
CLIPs; not ViT-B/16) z_l goes through the frozen text projection; (2) identical descriptions are one bank entry;
(3) each meta-net output layer starts small (N(0, 0.02²), zero bias) rather than zero, since the gates start at 0 and
a zero output would leave both without a gradient; (4) `scp` off also drops L_align (its target s would be 0);
without AMG attention (`amg` or `vcp` off) the evidence r_l is the plain mean of the image tokens X_l;
(5) a depth larger than the backbone's number of layers is refused; (6) `scp_only` / `vcp_only` are gated_sum
without the other instance term; (7) with `describer: auto` (default) toy-world images get the `scene` describer
and every other image the `interrogator` (offline, any backbone); the `paper` recipe uses the `mllm` describer
(Qwen2-VL-7B-Instruct, a guess: the paper's MLLM is unknown).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mugcp_bench.describers.cache import DescriptionCache
from mugcp_bench.describers.image_keys import item_key
from mugcp_bench.describers.leakage import leakage_fraction, mask_classnames
from mugcp_bench.errors import UserError
from mugcp_bench.methods.base import TOY_TRAIN, Method, MethodOutput, cosine_logits
from mugcp_bench.methods.prompts import ClassPrompts, clean_classname, init_context
from mugcp_bench.registry import DESCRIBERS, METHODS, suggest

log = logging.getLogger(__name__)

MPF_MODES = ("gated_sum", "concat", "scp_only", "vcp_only", "ctx_only")
REGULARISERS = ("none", "promptsrc", "kgcoop")


@dataclass
class MuGCPConfig:
    """Every MuGCP (reconstructed) hyperparameter (our design; docs/methods/mugcp.md)."""

    # text side: context and multi-prompt fusion (MPF)
    n_ctx: int = 4  # M_t
    ctx_init: str = "a photo of a"
    mpf: str = "gated_sum"  # gated_sum | concat | scp_only | vcp_only | ctx_only
    text_depth: int = 9  # prompted text layers 0 … text_depth−1 (deep prompts + instance terms at each)
    # vision side: attention mutual guidance (AMG) -> visual conditional prompts (VCP)
    n_vctx: int = 4  # M_v
    depth: int = 9  # J: VCP_0 at the input, AMG at vision layers 1 … J−1
    scp: bool = True  # semantic conditional prompts from descriptions; off: s := 0, S := ∅
    vcp: bool = True  # visual conditional prompts; off: vision prompts are the learned deep prompts E_l, no AMG
    amg: bool = True  # off: VCP_l = E_l + W_q s without attention
    mutual: bool = True  # visual -> semantic refinement of S~
    amg_heads: int = 8
    amg_mlp_ratio: float = 2.0
    amg_share: bool = True  # one attention / MLP block for all AMG layers
    layer_scale: float = 0.1  # initial per-layer LayerScale γ_l of the AMG branches; 0 = no LayerScale
    meta_ratio: int = 16  # meta-net hidden width = E / meta_ratio (CoCoOp's ratio)
    # losses
    align: bool = True  # intermediate alignment L_align
    align_weight: float = 0.5
    align_temperature: float = 0.07
    align_bank: bool = True  # negatives: every training description (false: the batch's descriptions only)
    reg: str = "none"  # none | promptsrc | kgcoop
    scl_text_weight: float = 25.0  # PromptSRC's L_SCL weights
    scl_image_weight: float = 10.0
    scl_logit_weight: float = 1.0
    kgcoop_weight: float = 8.0
    # descriptions (SCP text)
    describer: str = "auto"  # auto (scene for toy images, else interrogator) | scene | interrogator | mllm | file
    describer_model: str = "Qwen/Qwen2-VL-7B-Instruct"  # mllm: hub id or local folder
    describer_file: str = ""  # file: JSONL of {"image", "text"}
    prompt_id: str = ""  # "" = the describer's default (mllm: describe_v1)
    mask_classnames: bool = False  # replace class names in descriptions by "object" before encoding
    describe_missing: bool = True  # False (run --no-describe): fail if a description is not cached
    scene_drop: float = 0.2
    scene_swap: float = 0.1
    interrogator_k: int = 5
    # compute
    text_chunk: int = 2048  # text sequences per text-encoder pass (B × C sequences per batch)


def _apply_linear(proj: Any, x: torch.Tensor) -> torch.Tensor:
    if proj is None:
        return x
    return proj(x) if isinstance(proj, nn.Linear) else x @ proj.to(x.dtype)


class AMGBlock(nn.Module):
    """One AMG block: pre-LN attention of the queries over [X ; S~] + MLP, and (mutual) S~ attending to X."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, mutual: bool) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_q = nn.LayerNorm(width)
        self.ln_kv = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_mlp = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(fc=nn.Linear(width, hidden), gelu=nn.GELU(), proj=nn.Linear(hidden, width))
        )
        if mutual:
            self.ln_s = nn.LayerNorm(width)
            self.ln_x = nn.LayerNorm(width)
            self.attn_s = nn.MultiheadAttention(width, heads, batch_first=True)


class AMG(nn.Module):
    """Attention mutual guidance: per-layer queries E_l (+ W_q s) -> VCP_l and the evidence read-out r_l; optional
    refinement of S~. With `conditional` and `attention` off it only holds the learned deep vision prompts E_l."""

    def __init__(
        self,
        embed_dim: int,
        text_width: int,
        width: int,
        n_prompts: int,
        depth: int,
        heads: int,
        mlp_ratio: float,
        conditional: bool,
        attention: bool,
        semantic: bool,
        mutual: bool,
        share: bool,
        layer_scale: float,
    ) -> None:
        super().__init__()
        self.depth = depth
        self.attention = attention and depth > 1
        self.mutual = self.attention and mutual and semantic
        self.queries = nn.Parameter(torch.empty(depth, n_prompts, width))  # E_0 … E_{J−1}
        nn.init.normal_(self.queries, std=0.02)  # MaPLe / VPT-deep prompt init
        self.w_q = nn.Linear(embed_dim, width) if conditional else None  # s -> query offset
        self.w_sv = nn.Linear(text_width, width) if (semantic and self.attention) else None  # W_s->v
        if self.attention:
            n_blocks = 1 if share else depth - 1
            self.blocks = nn.ModuleList(AMGBlock(width, heads, mlp_ratio, self.mutual) for _ in range(n_blocks))
            n_branch = 3 if self.mutual else 2
            self.gamma = (
                nn.Parameter(torch.full((depth - 1, n_branch, width), float(layer_scale))) if layer_scale else None
            )

    def query(self, layer: int, s: torch.Tensor | None, batch: int) -> torch.Tensor:
        """Q_l = E_l + W_q s: (B, M_v, Dv)."""
        q = self.queries[layer].unsqueeze(0).expand(batch, -1, -1)  # (B, M_v, Dv)
        if self.w_q is not None and s is not None:
            q = q + self.w_q(s).unsqueeze(1)  # (B, M_v, Dv)
        return q

    def semantic_tokens(self, big_s: torch.Tensor | None) -> torch.Tensor | None:
        """S~ = W_s->v S: (B, L, Dv)."""
        return self.w_sv(big_s) if (self.w_sv is not None and big_s is not None) else None

    def _scale(self, layer: int, branch: int) -> torch.Tensor | float:
        return self.gamma[layer - 1, branch] if getattr(self, "gamma", None) is not None else 1.0

    def step(
        self,
        layer: int,
        x: torch.Tensor,
        s: torch.Tensor | None,
        s_tilde: torch.Tensor | None,
        pad: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """From the vision tokens X_l (B, 1+P, Dv) and S~ (B, L, Dv): (VCP_l (B, M_v, Dv), the evidence read-out
        pooled over the queries (B, Dv), refined S~)."""
        q = self.query(layer, s, x.shape[0])  # (B, M_v, Dv)
        if not self.attention:
            return q, x.mean(dim=1), s_tilde  # no learned read-out: the plain mean of the image tokens
        block = self.blocks[0 if len(self.blocks) == 1 else layer - 1]
        hq = block.ln_q(q)
        hx = block.ln_kv(x)  # (B, 1+P, Dv)
        # r_l: the queries' read-out of the image tokens alone; its values carry only visual evidence, so aligning it
        # with s cannot be solved by the query residual W_q s (docs/methods/mugcp.md, L_align).
        readout = block.attn(hq, hx, hx, need_weights=False)[0]  # (B, M_v, Dv)
        if s_tilde is None:
            attended = readout
        else:
            kv = torch.cat([hx, block.ln_kv(s_tilde)], dim=1)  # (B, 1+P+L, Dv)
            mask = None
            if pad is not None:
                mask = torch.cat([torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device), pad], dim=1)
            attended = block.attn(hq, kv, kv, key_padding_mask=mask, need_weights=False)[0]  # (B, M_v, Dv)
        vcp = q + self._scale(layer, 0) * attended
        vcp = vcp + self._scale(layer, 1) * block.mlp(block.ln_mlp(vcp))  # (B, M_v, Dv)
        if self.mutual and s_tilde is not None:
            hxs = block.ln_x(x)
            refined = block.attn_s(block.ln_s(s_tilde), hxs, hxs, need_weights=False)[0]  # (B, L, Dv)
            s_tilde = s_tilde + self._scale(layer, 2) * refined
        return vcp, readout.mean(dim=1), s_tilde


@dataclass
class _Pass:
    """What one forward computed (the logits plus internals for losses and tests)."""

    logits: torch.Tensor  # (B, C)
    image_features: torch.Tensor  # (B, E)
    text_features: torch.Tensor | None  # (B, C, E) or (C, E) when not instance-conditional; None from predict
    text_prompts: torch.Tensor  # (text_depth, B | 1, n_slots, Dt): layer 0 = input prompts, then deep prompts
    vcps: list[torch.Tensor]  # VCP_0 … VCP_{J−1}, each (B, M_v, Dv)
    evidence: list[torch.Tensor]  # pooled read-out r_l of each AMG layer l = 1 … J−1, each (B, Dv)
    s_tildes: list[torch.Tensor]  # S~ entering each AMG layer (empty without semantic tokens)
    s: torch.Tensor | None  # (B, E)
    texts: list[str] | None  # the description of each image


@METHODS.register("mugcp")
class MuGCP(Method):
    """MuGCP (reconstructed): SCP from per-image descriptions, AMG -> VCP, MPF at every text layer, alignment on the
    visual evidence against a bank of training descriptions."""

    name = "mugcp"
    report_order = 950
    color = "#d62728"
    in_default_set = True
    Config = MuGCPConfig
    reconstructed = True
    # reference-fp16 (our design, no reference code): every MuGCP parameter stays fp32 and its modules compute in fp32
    # on the frozen fp16 CLIP's outputs; only the prompts it writes into the CLIP are cast to the CLIP's dtype.
    reference_fp32 = ("*",)
    recipes = {
        # Our design (docs/methods/mugcp.md, recipes): MaPLe's schedule, PromptSRC's few-shot length; ImageNet at
        # batch 1 × accumulation 4 in every protocol (see `recipe`).
        "paper": {
            "base2novel": {"epochs": 5, "lr": 0.0035, "batch_size": 4, "describer": "mllm", "depth": 9},
            "xd": {"epochs": 2, "lr": 0.0026, "batch_size": 1, "accum_steps": 4, "describer": "mllm", "depth": 9},
            "few_shot": {"epochs": 50, "lr": 0.0035, "batch_size": 4, "describer": "mllm", "depth": 9},
        },
        # Toy world (4-layer CLIP): depth 3, descriptions from the rendered scenes. The source (the ImageNet role)
        # trains at batch 1 × accumulation 4 as in the paper recipe, so the toy run exercises that regime.
        "toy": {
            "base2novel": {**TOY_TRAIN, "epochs": 5, "lr": 0.0035, "batch_size": 4, "depth": 3, "text_depth": 3},
            "xd": {
                **TOY_TRAIN,
                "epochs": 2,
                "lr": 0.0026,
                "batch_size": 1,
                "accum_steps": 4,
                "depth": 3,
                "text_depth": 3,
            },
            "few_shot": {**TOY_TRAIN, "epochs": 5, "lr": 0.0035, "batch_size": 4, "depth": 3, "text_depth": 3},
        },
    }
    # `ablate --drop X` -> variant no-X (docs/methods/mugcp.md, ablation switches).
    ablations = {
        "scp": {"scp": False},
        "amg": {"amg": False},
        "vcp": {"vcp": False},
        "mpf": {"mpf": "ctx_only"},
        "align": {"align": False},
        "mutual": {"mutual": False},
    }

    @classmethod
    def recipe(cls, recipe: str, train_protocol: str, shots: int, dataset: str) -> dict[str, Any]:
        """ImageNet trains at batch 1 × accumulation 4 in every paper protocol (B × C text passes: 4 × 1000 prompted
        class sequences per step do not fit; the cross-dataset source recipe already says so)."""
        out = super().recipe(recipe, train_protocol, shots, dataset)
        if recipe == "paper" and dataset == "imagenet":
            out.update(batch_size=1, accum_steps=4)
        return out

    @classmethod
    def ignored_settings(cls, cfg: MuGCPConfig) -> dict[str, str]:
        """Switches that make other settings do nothing (our design, docs/methods/mugcp.md)."""
        out: dict[str, str] = {}

        def off(names: tuple[str, ...], why: str) -> None:
            for name in names:
                out.setdefault(name, why)

        describing = ("describer", "describer_model", "describer_file", "prompt_id", "mask_classnames",
                      "describe_missing", "scene_drop", "scene_swap", "interrogator_k")  # fmt: skip
        attention = ("amg_heads", "amg_mlp_ratio", "amg_share", "layer_scale", "mutual")
        aligning = ("align_weight", "align_temperature", "align_bank")
        if not cfg.scp:
            off(describing + ("mutual",) + aligning, "scp=false uses no descriptions; drop it or --set scp=true")
        if not cfg.vcp:
            off(("amg",) + attention, "vcp=false has no visual conditional prompts (no AMG); drop it or --set vcp=true")
        elif not cfg.amg:
            off(attention, "amg=false builds the prompts without attention; drop it or --set amg=true")
        if not cfg.align:
            off(aligning, "align=false has no alignment loss; drop it or --set align=true")
        if cfg.reg != "promptsrc":
            off(
                ("scl_text_weight", "scl_image_weight", "scl_logit_weight"),
                f"they weigh reg=promptsrc (here reg={cfg.reg})",
            )
        if cfg.reg != "kgcoop":
            off(("kgcoop_weight",), f"it weighs reg=kgcoop (here reg={cfg.reg})")
        if cfg.scp and cfg.describer != "mllm":
            off(("describer_model",), f"it names the mllm describer's model (here describer={cfg.describer})")
        if cfg.scp and cfg.describer != "file":
            off(("describer_file",), f"it names the file describer's file (here describer={cfg.describer})")
        if cfg.scp and cfg.describer not in ("scene", "auto"):
            off(("scene_drop", "scene_swap"), f"they tune the scene describer (here describer={cfg.describer})")
        if cfg.scp and cfg.describer not in ("interrogator", "auto"):
            off(("interrogator_k",), f"it tunes the interrogator describer (here describer={cfg.describer})")
        return out

    def __init__(
        self,
        backbone,
        classnames: Sequence[str],
        cfg: MuGCPConfig,
        template: str = "a photo of a {}.",
        dataset: str = "",
    ) -> None:
        super().__init__(backbone, classnames, cfg, template, dataset)
        self._check_config(cfg)
        b = backbone
        dv, dt, e = b.vision_width, b.text_width, b.embed_dim
        if dv % cfg.amg_heads:
            raise UserError(f"mugcp: amg_heads {cfg.amg_heads} must divide the vision width {dv}")
        for key, layers in (("depth", b.vision_layers), ("text_depth", b.text_layers)):
            if getattr(cfg, key) > layers:  # a depth the backbone cannot hold is refused, never clipped silently
                raise UserError(
                    f"mugcp: {key} must be at most {layers} for '{b.name}' ({layers} layers), got {getattr(cfg, key)}; "
                    f"--set mugcp.{key}={layers} or less"
                )
        self.depth = cfg.depth
        self.text_depth = max(1, cfg.text_depth)
        mode, m_t = cfg.mpf, cfg.n_ctx
        self.use_scp_text = cfg.scp and mode in ("gated_sum", "concat", "scp_only")
        self.use_vcp_text = cfg.vcp and mode in ("gated_sum", "concat", "vcp_only")
        self.use_align = cfg.align and cfg.scp and self.depth > 1
        self.n_slots = m_t * (1 + int(self.use_scp_text) + int(self.use_vcp_text)) if mode == "concat" else m_t

        # P_ctx from "a photo of a" (CoOp / MaPLe init); concat mode adds placeholder slots before the init words.
        ctx, prefix = init_context(b, m_t, cfg.ctx_init)
        self.ctx = nn.Parameter(ctx)  # (M_t, Dt) = D_0
        self._prefix = " ".join(["X"] * (self.n_slots - m_t) + [prefix])
        self.prompts = ClassPrompts(b, self.classnames, self.n_slots, self._prefix)
        if self.text_depth > 1:  # learned deep text prompts D_1 … D_{text_depth−1} (IVLP)
            self.text_deep = nn.Parameter(torch.empty(self.text_depth - 1, m_t, dt))
            nn.init.normal_(self.text_deep, std=0.02)
        if self.use_scp_text:  # meta-net: E -> E/16 (shared, CoCoOp's trainers/cocoop.py shape) -> M_t · Dt per layer
            hidden = max(1, e // cfg.meta_ratio)
            self.meta_net = nn.Sequential(OrderedDict(linear1=nn.Linear(e, hidden), relu=nn.ReLU(inplace=True)))
            self.meta_heads = nn.ModuleList(nn.Linear(hidden, m_t * dt) for _ in range(self.text_depth))
            for head in self.meta_heads:
                nn.init.normal_(head.weight, std=0.02)
                nn.init.zeros_(head.bias)
        if mode in ("gated_sum", "scp_only") and self.use_scp_text:
            self.alpha = nn.Parameter(torch.zeros(self.text_depth, m_t))  # α_l per prompted text layer
        if mode in ("gated_sum", "vcp_only") and self.use_vcp_text:
            self.beta = nn.Parameter(torch.zeros(self.text_depth, m_t))  # β_l
        if self.use_vcp_text or self.use_align:
            self.w_vt = nn.Linear(dv, dt)  # W_v->t
        self.amg = AMG(
            e,
            dt,
            dv,
            cfg.n_vctx,
            self.depth,
            cfg.amg_heads,
            cfg.amg_mlp_ratio,
            conditional=cfg.scp and cfg.vcp,
            attention=cfg.amg and cfg.vcp,
            semantic=cfg.scp,
            mutual=cfg.mutual,
            share=cfg.amg_share,
            layer_scale=cfg.layer_scale,
        )
        # Frozen targets of the optional regulariser (class-dependent, not persistent).
        self.register_buffer("zs_text", self._zero_shot_text(), persistent=False)
        # Per-image side data (never in the state dict): key -> text used, text -> (s, S).
        self._texts: dict[str, str] = {}
        self._raw: dict[str, str] = {}
        self._features: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._known_names: set[str] = set(self.classnames)
        self._describers: dict[str, Any] = {}
        self._eval_text: torch.Tensor | None = None
        # L_align's bank: the image keys of the training split; their descriptions' s, stacked on first use.
        self._bank_keys: dict[str, None] = {}
        self._bank: tuple[torch.Tensor | None, dict[str, int]] | None = None

    # --- configuration ------------------------------------------------------------------------------------------
    @staticmethod
    def _check_config(cfg: MuGCPConfig) -> None:
        for key, value, choices in (("mpf", cfg.mpf, MPF_MODES), ("reg", cfg.reg, REGULARISERS)):
            if value not in choices:
                raise UserError(f"mugcp: {key} '{value}' is not one of {', '.join(choices)}.{suggest(value, choices)}")
        if cfg.scp and cfg.describer != "auto":
            DESCRIBERS.canonical(cfg.describer)  # unknown names: UserError with a did-you-mean
        for key in ("n_ctx", "n_vctx", "depth", "text_depth", "amg_heads", "meta_ratio"):
            if getattr(cfg, key) < 1:
                raise UserError(f"mugcp: {key} must be at least 1, got {getattr(cfg, key)}")

    @property
    def instance_conditional(self) -> bool:
        """Whether the text prompts carry an instance term (otherwise class text features are computed once)."""
        return self.use_scp_text or self.use_vcp_text

    def set_classnames(self, classnames, template=None, dataset=None) -> None:
        super().set_classnames(classnames, template, dataset)
        self.prompts = ClassPrompts(self.backbone, self.classnames, self.n_slots, self._prefix)
        self.zs_text = self._zero_shot_text()
        self._eval_text = None
        if self.cfg.mask_classnames and not set(self.classnames) <= self._known_names:
            self._known_names |= set(self.classnames)
            self._remask()

    @torch.no_grad()
    def _zero_shot_text(self) -> torch.Tensor | None:
        if self.cfg.reg == "none":
            return None
        texts = [self.template.format(clean_classname(c)) for c in self.classnames]
        return self.backbone.text_features(texts).float()  # (C, E), normalised

    # --- descriptions -> SCP features ---------------------------------------------------------------------------
    def _describer(self, name: str):
        from mugcp_bench.describers import DescriberOptions, build_describer

        if name not in self._describers:
            c = self.cfg
            opts = DescriberOptions(
                model=c.describer_model or None,
                prompt_id=(c.prompt_id or None) if c.describer != "auto" else None,
                file=c.describer_file or None,
                backbone=self.backbone,
                device=str(self.backbone.device),
                scene_drop=c.scene_drop,
                scene_swap=c.scene_swap,
                top_k=c.interrogator_k,
            )
            self._describers[name] = build_describer(name, opts)
        return self._describers[name]

    def _used_text(self, raw: str) -> str:
        return mask_classnames(raw, self._known_names) if self.cfg.mask_classnames else raw

    def _remask(self) -> None:
        self._texts = {k: self._used_text(t) for k, t in self._raw.items()}
        self._encode_missing(set(self._texts.values()))
        self._bank = None  # the bank's texts changed

    @torch.no_grad()
    def _encode_missing(self, texts: set[str], chunk: int = 256) -> None:
        """s (E,) normalised EOT feature and S (L, Dt) final token states after ln_final, for new texts."""
        todo = sorted(t for t in texts if t not in self._features)
        b = self.backbone
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            tokens = b.tokenize(part)  # (N, ctx) — truncated by the tokenizer with EOT kept last
            feats, states, eot = b.encode_text_states(tokens)  # (N, E), (N, T, Dt), (N,)
            s = F.normalize(feats.float(), dim=-1)  # (N, E)
            for j, text in enumerate(part):
                n = int(eot[j]) + 1
                self._features[text] = (s[j].cpu(), states[j, :n].to(torch.float16).cpu())

    def prepare_images(self, items: Sequence[Any], split: str) -> dict[str, Any]:
        """Describe every item (through the shared cache), encode the descriptions, report label leakage."""
        if not self.cfg.scp or not items:
            return {"leakage": None, "n_descriptions": 0, "describer": None}
        from mugcp_bench import describers

        done = describers.describe(
            self.cfg.describer,
            items,
            self._describer,
            DescriptionCache(),
            generate=self.cfg.describe_missing,
            datasets_hint=self.dataset or "...",
            release=True,  # an MLLM must not hold GPU memory while the method trains
        )
        raw = done.texts
        self._raw.update(raw)
        names = set(self.classnames) | {d.classname for d in items if hasattr(d, "classname")}
        if self.cfg.mask_classnames and not names <= self._known_names:
            self._known_names |= names  # new class names: mask every stored description again
            self._remask()
        else:
            self._texts.update({k: self._used_text(t) for k, t in raw.items()})
            self._encode_missing({self._texts[k] for k in raw})
        keys = [item_key(d) for d in items]
        if split == "train":  # L_align contrasts against every training description (never a test one)
            self._bank_keys.update(dict.fromkeys(keys))
            self._bank = None
        info: dict[str, Any] = {
            "leakage": leakage_fraction([self._texts[k] for k in keys], items)
            if hasattr(items[0], "classname")
            else None,
            "n_descriptions": len(items),
            "describer": done.describer,
            "prompt_id": done.prompt_id,
            "n_cached": done.n_cached,
            "n_generated": done.n_generated,
        }
        if self.cfg.mask_classnames and hasattr(items[0], "classname"):
            info["leakage_unmasked"] = leakage_fraction([raw[k] for k in keys], items)
        log.info(
            "mugcp %s: %d descriptions (%s), leakage %s",
            split,
            len(items),
            info["describer"],
            "n/a" if info["leakage"] is None else f"{100 * info['leakage']:.1f}%",
        )
        return info

    def description(self, key: str) -> str:
        """The description text the model uses for an image key (after masking)."""
        return self._texts[key]

    def _scp_batch(self, keys: Sequence[str] | None, device: torch.device):
        """s (B, E), S (B, L, Dt), padding mask (B, L) (True = padding) and the description texts (B,)."""
        if not self.cfg.scp:
            return None, None, None, None
        if keys is None:
            raise RuntimeError("mugcp needs the image keys (relpaths) to look up their descriptions")
        missing = [k for k in keys if k not in self._texts]
        if missing:
            raise RuntimeError(
                f"mugcp: no description for {len(missing)} of {len(keys)} images (first: '{missing[0]}'); "
                "call prepare_images(items, split) for every split before forward"
            )
        texts = [self._texts[k] for k in keys]
        feats = [self._features[t] for t in texts]
        s = torch.stack([f[0] for f in feats]).to(device)  # (B, E)
        length = max(f[1].shape[0] for f in feats)
        big_s = torch.zeros(len(feats), length, feats[0][1].shape[1], device=device)  # (B, L, Dt)
        pad = torch.ones(len(feats), length, dtype=torch.bool, device=device)  # (B, L)
        for i, (_, states) in enumerate(feats):
            big_s[i, : states.shape[0]] = states.to(device=device, dtype=big_s.dtype)
            pad[i, : states.shape[0]] = False
        return s, big_s, pad, texts

    # --- forward ------------------------------------------------------------------------------------------------
    def _image_pass(self, images, s, big_s, pad):
        """Image features (B, E) with VCPs in the vision prompt slots; returns VCP_0 … VCP_{J−1}, the evidence
        read-outs of the AMG layers and the S~s entering them."""
        b, amg, m_v = self.backbone, self.amg, self.cfg.n_vctx
        batch = images.shape[0]
        s32 = None if s is None else s.float()
        vcps = [amg.query(0, s32, batch)]  # VCP_0 = E_0 + W_q s: (B, M_v, Dv)
        s_tilde = amg.semantic_tokens(None if big_s is None else big_s.float())  # (B, L, Dv)
        s_tildes: list[torch.Tensor] = []
        evidence: list[torch.Tensor] = []

        def layer_fn(i: int, x: torch.Tensor) -> torch.Tensor:
            nonlocal s_tilde
            if not 1 <= i < self.depth:
                return x
            tokens = x[:, :-m_v]  # (B, 1+P, Dv): X_l
            if s_tilde is not None:
                s_tildes.append(s_tilde)
            vcp, read, s_tilde = amg.step(i, tokens.float(), s32, s_tilde, pad)  # (B, M_v, Dv), (B, Dv)
            vcps.append(vcp)
            evidence.append(read)
            return torch.cat([tokens, vcp.to(x.dtype)], dim=1)  # (B, 1+P+M_v, Dv)

        feats = b.encode_image(images, prompts=vcps[0], layer_fn=layer_fn)  # (B, E)
        return feats, vcps, evidence, s_tildes

    def _text_prompts(self, s: torch.Tensor | None, vcps: list[torch.Tensor], batch: int) -> torch.Tensor:
        """MPF at every prompted text layer: (text_depth, B, n_slots, Dt), or (text_depth, 1, M_t, Dt) when the text
        has no instance term. Layer l: D_l + α_l ⊙ P_scp,l(x) + β_l ⊙ W_v->t pool(VCP_v(l)), v(l) = min(l, J−1)."""
        mode, m_t = self.cfg.mpf, self.cfg.n_ctx
        base = self.ctx.unsqueeze(0)  # (1, M_t, Dt)
        if self.text_depth > 1:
            base = torch.cat([base, self.text_deep], dim=0)  # (L_t, M_t, Dt): D_0 … D_{L_t−1}
        base = base.unsqueeze(1)  # (L_t, 1, M_t, Dt)
        if not self.instance_conditional:
            return base
        n_layers, dt = base.shape[0], base.shape[-1]
        parts_scp = parts_vcp = None
        if self.use_scp_text:
            hidden = self.meta_net(s.float())  # (B, E/16)
            parts_scp = torch.stack(
                [head(hidden).view(batch, m_t, dt) for head in self.meta_heads]
            )  # (L_t, B, M_t, Dt)
        if self.use_vcp_text:
            pooled = torch.stack([vcps[min(i, len(vcps) - 1)].float().mean(dim=1) for i in range(n_layers)])
            parts_vcp = self.w_vt(pooled).unsqueeze(2).expand(-1, -1, m_t, -1)  # (L_t, B, M_t, Dt)
        base = base.expand(-1, batch, -1, -1)  # (L_t, B, M_t, Dt)
        if mode == "concat":
            return torch.cat([base] + [p for p in (parts_scp, parts_vcp) if p is not None], dim=2)  # (L_t, B, n, Dt)
        out = base
        if parts_scp is not None:
            out = out + self.alpha.view(n_layers, 1, m_t, 1) * parts_scp
        if parts_vcp is not None:
            out = out + self.beta.view(n_layers, 1, m_t, 1) * parts_vcp
        return out  # (L_t, B, M_t, Dt)

    def _encode_rows(
        self, embeds: torch.Tensor, tokens: torch.Tensor, deep: torch.Tensor | None, img: torch.Tensor
    ) -> torch.Tensor:
        """Text features (r, E) of prompted rows; `deep` (L_t−1, r | 1, n_slots, Dt) fills the prompt slots before
        text blocks 1 … L_t−1. Rows of one image (`img` (r,), non-decreasing) share SOS and their prompt slots: the
        backbone encodes that prefix once per image (layer_fn then sees (G, P, Dt), one row per image)."""
        n = self.n_slots
        group = img - img[0]  # (r,) image of each row within this chunk, 0 … G−1
        firsts = torch.searchsorted(group, torch.arange(int(group[-1]) + 1, device=group.device))  # (G,)
        deep_g = deep[:, firsts] if deep is not None and deep.shape[1] > 1 else deep  # (L_t−1, G | 1, n_slots, Dt)

        def layer_fn(i: int, x: torch.Tensor) -> torch.Tensor:  # x: the shared prefixes (G, P, Dt) or rows (r, T, Dt)
            if deep is None or not 1 <= i < self.text_depth:
                return x
            src = deep_g if x.shape[0] == firsts.shape[0] else deep  # G == r: every row its own image, the same
            slots = src[i - 1].to(x.dtype).expand(x.shape[0], -1, -1)  # (G | r, n_slots, Dt)
            return torch.cat([x[:, :1], slots, x[:, 1 + n :]], dim=1)

        shared = self.prompts.shared_len
        return self.backbone.encode_text(embeds, tokens, layer_fn, shared_prefix=shared, prefix_index=group)

    def _text_chunks(self, prompts: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(image index (r,), text features (r, E)) per chunk of rows, row r = (image r // C, class r % C); the
        embeddings are built per chunk, so memory is bounded by the chunk, not by B × C."""
        cp = self.prompts
        batch, n_cls = prompts.shape[1], cp.n_cls
        rows = batch * n_cls
        chunk = self.cfg.text_chunk if self.cfg.text_chunk > 0 else rows
        prompts = prompts.to(cp.token_suffix.dtype)
        for start in range(0, rows, chunk):
            idx = torch.arange(start, min(start + chunk, rows), device=prompts.device)
            img, cls = idx // n_cls, idx % n_cls
            embeds = torch.cat([cp.token_prefix[cls], prompts[0, img], cp.token_suffix[cls]], dim=1)  # (r, T, Dt)
            deep = prompts[1:, img] if self.text_depth > 1 else None  # (L_t−1, r, n, Dt)
            if torch.is_grad_enabled() and rows > chunk:  # training: recompute each chunk in the backward pass
                yield img, checkpoint(self._encode_rows, embeds, cp.tokens[cls], deep, img, use_reentrant=False)
            else:
                yield img, self._encode_rows(embeds, cp.tokens[cls], deep, img)  # (r, E)

    def _text_features(self, prompts: torch.Tensor) -> torch.Tensor:
        """(L_t, 1, n, Dt) -> (C, E) shared class features; (L_t, B, n, Dt) -> (B, C, E)."""
        batch, n_cls = prompts.shape[1], self.prompts.n_cls
        out = torch.cat([feats for _, feats in self._text_chunks(prompts)]).view(batch, n_cls, -1)  # (B, C, E)
        return out[0] if not self.instance_conditional else out

    def _text_logits(self, prompts: torch.Tensor, image_f: torch.Tensor) -> torch.Tensor:
        """Evaluation logits (B, C) of per-image prompts (L_t, B, n, Dt) and image features (B, E), each text chunk
        reduced to its cosine logits at once: no (B, C, E) tensor (BENCHMARKS.md, gap 6); `cosine_logits` of
        `_text_features` up to summation order."""
        image_n = F.normalize(image_f, dim=-1)  # (B, E)
        cos = [(image_n[img] * F.normalize(feats, dim=-1)).sum(-1) for img, feats in self._text_chunks(prompts)]
        return self.backbone.logit_scale * torch.cat(cos).view(prompts.shape[1], self.prompts.n_cls)  # (B, C)

    def _run(
        self, images: torch.Tensor, keys: Sequence[str] | None, use_cache: bool = False, logits_only: bool = False
    ) -> _Pass:
        s, big_s, pad, texts = self._scp_batch(keys, images.device)
        image_f, vcps, evidence, s_tildes = self._image_pass(images, s, big_s, pad)  # (B, E)
        prompts = self._text_prompts(s, vcps, images.shape[0])  # (L_t, B | 1, n_slots, Dt)
        if logits_only and self.instance_conditional and not torch.is_grad_enabled():  # predict: no (B, C, E)
            logits = self._text_logits(prompts, image_f)  # (B, C)
            return _Pass(logits, image_f, None, prompts, vcps, evidence, s_tildes, s, texts)
        if use_cache and self._eval_text is not None:
            text_f = self._eval_text
        else:
            text_f = self._text_features(prompts)  # (B, C, E) or (C, E)
        logits = cosine_logits(self.backbone.logit_scale, image_f, text_f)  # (B, C)
        return _Pass(logits, image_f, text_f, prompts, vcps, evidence, s_tildes, s, texts)

    def _embed_space(self, x: torch.Tensor) -> torch.Tensor:
        """Text-width vectors in the joint space: identity where Dt = E (ViT-B/16), else the frozen projection."""
        if x.shape[-1] == self.backbone.embed_dim:
            return x
        return _apply_linear(self.backbone.text.text_projection, x)

    def _align_bank(self, texts: Sequence[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The contrast set (N, E) — every training description, plus the batch's own not among them — and the index
        of each image's own description in it (B,). `align_bank: false`: the batch's descriptions only."""
        if self.cfg.align_bank:
            if self._bank is None:  # built once per training split: texts, their stacked s, text -> row
                bank_texts = list(dict.fromkeys(self._texts[k] for k in self._bank_keys if k in self._texts))
                stack = torch.stack([self._features[t][0] for t in bank_texts]) if bank_texts else None
                self._bank = (stack, {t: i for i, t in enumerate(bank_texts)})
            stack, known = self._bank
            if stack is not None and stack.device != device:  # kept on the training device after first use
                stack = stack.to(device=device, dtype=torch.float32)
                self._bank = (stack, known)
        else:
            stack, known = None, {}
        extra = [t for t in dict.fromkeys(texts) if t not in known]  # the batch's own, not in the bank
        extra_row = {t: len(known) + i for i, t in enumerate(extra)}
        rows = [stack] if stack is not None else []
        if extra:
            rows.append(torch.stack([self._features[t][0] for t in extra]))
        bank = rows[0] if len(rows) == 1 else torch.cat(rows)  # no copy of the whole bank when nothing is added
        bank = bank.to(device=device, dtype=torch.float32)  # (N, E)
        target = torch.tensor([known[t] if t in known else extra_row[t] for t in texts], device=device)  # (B,)
        return bank, target

    def align_loss(self, out: _Pass) -> torch.Tensor:
        """InfoNCE of z_l = W_v->t r_l (the visual evidence of AMG layer l) against the description bank, averaged
        over the AMG layers."""
        bank, target = self._align_bank(out.texts, out.s.device)  # (N, E), (B,)
        total = 0.0
        for read in out.evidence:  # (B, Dv) per AMG layer
            z = F.normalize(self._embed_space(self.w_vt(read.float())), dim=-1)  # (B, E)
            sim = z @ bank.t() / self.cfg.align_temperature  # (B, N)
            total = total + F.cross_entropy(sim, target)
        return total / len(out.evidence)

    def _regulariser(self, images: torch.Tensor, out: _Pass) -> dict[str, torch.Tensor]:
        zs_text = self.zs_text.to(out.image_features.device)  # (C, E)
        text_f = F.normalize(out.text_features.float(), dim=-1)  # (B, C, E) | (C, E)
        if self.cfg.reg == "kgcoop":  # KgCoOp: λ · (1 − mean cos(text, hand-crafted text))
            cos = (text_f * zs_text).sum(-1)
            return {"kgcoop": self.cfg.kgcoop_weight * (1.0 - cos.mean())}
        # PromptSRC's L_SCL (trainers/promptsrc.py): L1 on normalised features, KL(zero-shot ‖ prompted) / numel
        with torch.no_grad():
            zs_image = F.normalize(self.backbone.encode_image(images).float(), dim=-1)  # (B, E)
            zs_logits = self.backbone.logit_scale * zs_image @ zs_text.t()  # (B, C)
        image_f = F.normalize(out.image_features.float(), dim=-1)
        logits = out.logits.float()
        kl = F.kl_div(F.log_softmax(logits, 1), F.log_softmax(zs_logits, 1), reduction="sum", log_target=True)
        return {
            "scl_text": self.cfg.scl_text_weight * F.l1_loss(text_f, zs_text.expand_as(text_f)),
            "scl_image": self.cfg.scl_image_weight * F.l1_loss(image_f, zs_image),
            "scl_logits": self.cfg.scl_logit_weight * kl / logits.numel(),
        }

    def forward(self, images, keys=None, image_features=None) -> MethodOutput:
        if images is None:
            raise RuntimeError("mugcp prompts the vision tower: it needs images, not cached image features")
        out = self._run(images, keys)
        losses: dict[str, torch.Tensor] = {}
        if self.use_align and out.s is not None:
            losses["align"] = self.cfg.align_weight * self.align_loss(out)
        if self.cfg.reg != "none":
            losses.update(self._regulariser(images, out))
        return MethodOutput(out.logits, losses)

    def begin_eval(self) -> None:
        """No instance term in the text (ctx_only, or no SCP and no VCP): class text features computed once."""
        self._eval_text = None
        if not self.instance_conditional:
            with torch.no_grad():
                self._eval_text = self._text_features(self._text_prompts(None, [], 1))  # (C, E)

    def end_eval(self) -> None:
        self._eval_text = None

    @torch.no_grad()
    def predict(self, images, keys=None, image_features=None) -> torch.Tensor:
        return self._run(images, keys, use_cache=True, logits_only=True).logits

    def forward_details(self, images: torch.Tensor, keys: Sequence[str] | None = None) -> _Pass:
        """Everything one forward computes (VCPs, evidence, S~s, text prompts and features) — for tests and analysis."""
        return self._run(images, keys)
