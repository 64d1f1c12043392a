"""MuGCP (reconstructed): multi-modal mutual-guidance conditional prompt learning.

The paper (arXiv 2507.08410) has no public code; only its abstract is known. Everything here follows the
reconstruction of methods.md §7.3 (B)–(G), and every architectural choice is OUR DESIGN, so results are labelled
"MuGCP (reconstructed)":

- SCP (semantic conditional prompts): a per-image description (a describer, cached by
  `mugcp_bench.description_cache`) encoded once by the frozen text encoder: s (E,) the normalised EOT feature and
  S (L, Dt) the final-layer token states after ln_final (padding-masked). MetaNet_s(s) -> M_t text tokens;
  S~ = W_s->v S are the semantic tokens AMG attends to.
- AMG (attention mutual guidance) at vision layers l = 1 … J−1: queries Q_l = E_l + W_q s attend (pre-LN MHA + MLP,
  ratio 2, shared across layers, per-layer LayerScale) over [X_l ; S~] and produce the visual conditional prompts
  VCP_l, which replace the M_v appended vision prompt slots; S~ is refined from X_l (the mutual direction).
  VCP_0 = E_0 + W_q s at the input.
- MPF (multi-prompt fusion): text prompt P_ctx + α ⊙ P_scp(x) + β ⊙ W_v->t pool(VCP_{J−1}) (gates start at 0), or
  concat / scp_only / vcp_only / ctx_only; optional IVLP-style deep text prompts.
- Losses (the trainer adds CE): 0.5 · L_align (in-batch InfoNCE at τ = 0.07 between W_v->t pool(VCP_l) and s,
  averaged over the AMG layers); optional PromptSRC / KgCoOp regulariser (off by default).

Choices of ours beyond §7.3, stated here: (1) on backbones whose text width differs from the embedding width (the toy
and test CLIPs; not ViT-B/16) L_align maps W_v->t pool(VCP_l) through the frozen text projection; (2) L_align treats
images with identical descriptions as positives of each other and is symmetric (image->text and text->image);
(3) the last layer of MetaNet_s starts small (N(0, 0.02²) weights, zero bias) rather than exactly zero, since α = 0
and a zero output would leave both without a gradient; (4) `scp` off also drops L_align (its target s would be 0:
the loss is then a constant); (5) depths larger than the backbone are clipped to its number of layers;
(6) `scp_only` / `vcp_only` are gated_sum without the other instance term; (7) with `describer: auto` (default)
toy-world images get the `scene` describer and every other image the `interrogator` (offline, any backbone), so the
method runs offline anywhere; the `paper` recipe uses the `mllm` describer (Qwen2-VL-7B-Instruct, a guess: the
paper's MLLM is unknown).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mugcp_bench.description_cache import DescriptionCache
from mugcp_bench.errors import UserError
from mugcp_bench.image_keys import item_key
from mugcp_bench.leakage import leakage_fraction, mask_classnames
from mugcp_bench.methods.base import TOY_TRAIN, Method, MethodOutput, cosine_logits
from mugcp_bench.methods.prompts import ClassPrompts, clean_classname, init_context
from mugcp_bench.registry import DESCRIBERS, METHODS, suggest

log = logging.getLogger(__name__)

MPF_MODES = ("gated_sum", "concat", "scp_only", "vcp_only", "ctx_only")
REGULARISERS = ("none", "promptsrc", "kgcoop")


@dataclass
class MuGCPConfig:
    """Every MuGCP (reconstructed) hyperparameter; defaults are methods.md §7.3 (F) (our design)."""

    # text side: context and multi-prompt fusion (MPF)
    n_ctx: int = 4  # M_t
    ctx_init: str = "a photo of a"
    mpf: str = "gated_sum"  # gated_sum | concat | scp_only | vcp_only | ctx_only
    text_depth: int = 9  # learnable deep text prompts in text layers 1 … text_depth−1 (1 = none), as IVLP
    # vision side: attention mutual guidance (AMG) -> visual conditional prompts (VCP)
    n_vctx: int = 4  # M_v
    depth: int = 9  # J: VCP_0 at the input, AMG at vision layers 1 … J−1
    scp: bool = True  # semantic conditional prompts from descriptions; off: s := 0, S := ∅
    amg: bool = True  # off: VCP_l = E_l + W_q s without attention
    mutual: bool = True  # visual -> semantic refinement of S~
    amg_heads: int = 8
    amg_mlp_ratio: float = 2.0
    amg_share: bool = True  # one attention / MLP block for all AMG layers
    layer_scale: float = 0.1  # initial per-layer LayerScale γ_l of the AMG branches; 0 = no LayerScale
    meta_ratio: int = 16  # MetaNet_s hidden width = E / meta_ratio (CoCoOp's ratio)
    # losses
    align: bool = True  # intermediate alignment L_align
    align_weight: float = 0.5
    align_temperature: float = 0.07
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
    """Attention mutual guidance: per-layer queries E_l (+ W_q s) -> VCP_l; optional refinement of S~."""

    def __init__(
        self,
        embed_dim: int,
        text_width: int,
        width: int,
        n_prompts: int,
        depth: int,
        heads: int,
        mlp_ratio: float,
        scp: bool,
        attention: bool,
        mutual: bool,
        share: bool,
        layer_scale: float,
    ) -> None:
        super().__init__()
        self.depth = depth
        self.attention = attention and depth > 1
        self.mutual = self.attention and mutual and scp
        self.queries = nn.Parameter(torch.empty(depth, n_prompts, width))  # E_0 … E_{J−1}
        nn.init.normal_(self.queries, std=0.02)  # MaPLe / VPT-deep prompt init
        self.w_q = nn.Linear(embed_dim, width) if scp else None  # s -> query offset
        self.w_sv = nn.Linear(text_width, width) if (scp and self.attention) else None  # W_s->v
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
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """VCP_l from the vision tokens X_l (B, 1+P, Dv) and S~ (B, L, Dv); returns (VCP_l, refined S~)."""
        q = self.query(layer, s, x.shape[0])  # (B, M_v, Dv)
        if not self.attention:
            return q, s_tilde
        block = self.blocks[0 if len(self.blocks) == 1 else layer - 1]
        kv = x if s_tilde is None else torch.cat([x, s_tilde], dim=1)  # (B, 1+P+L, Dv)
        mask = None
        if s_tilde is not None and pad is not None:
            mask = torch.cat([torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device), pad], dim=1)  # (B, 1+P+L)
        kv = block.ln_kv(kv)
        attended = block.attn(block.ln_q(q), kv, kv, key_padding_mask=mask, need_weights=False)[0]  # (B, M_v, Dv)
        vcp = q + self._scale(layer, 0) * attended
        vcp = vcp + self._scale(layer, 1) * block.mlp(block.ln_mlp(vcp))  # (B, M_v, Dv)
        if self.mutual and s_tilde is not None:
            hx = block.ln_x(x)
            refined = block.attn_s(block.ln_s(s_tilde), hx, hx, need_weights=False)[0]  # (B, L, Dv)
            s_tilde = s_tilde + self._scale(layer, 2) * refined
        return vcp, s_tilde


@dataclass
class _Pass:
    """What one forward computed (the logits plus internals for losses and tests)."""

    logits: torch.Tensor  # (B, C)
    image_features: torch.Tensor  # (B, E)
    text_features: torch.Tensor  # (B, C, E) or (C, E) for ctx_only
    text_prompts: torch.Tensor  # (B | 1, n_slots, Dt)
    vcps: list[torch.Tensor]  # VCP_0 … VCP_{J−1}, each (B, M_v, Dv)
    s_tildes: list[torch.Tensor]  # S~ entering each AMG layer (empty without semantic tokens)
    s: torch.Tensor | None  # (B, E)
    ids: torch.Tensor | None  # (B,) description ids (equal descriptions share one)


@METHODS.register("mugcp")
class MuGCP(Method):
    """MuGCP (reconstructed): SCP from per-image descriptions, AMG -> VCP, MPF, intermediate alignment."""

    name = "mugcp"
    Config = MuGCPConfig
    reconstructed = True
    # reference-fp16 (our design, no reference code): every MuGCP parameter stays fp32 and its modules compute in fp32
    # on the frozen fp16 CLIP's outputs; only the prompts it writes into the CLIP are cast to the CLIP's dtype.
    reference_fp32 = ("*",)
    recipes = {
        # methods.md §7.3 (F) / §8 (our design): MaPLe's schedule, PromptSRC's few-shot length.
        "paper": {
            "base2novel": {"epochs": 5, "lr": 0.0035, "batch_size": 4, "describer": "mllm", "depth": 9},
            "xd": {"epochs": 2, "lr": 0.0026, "batch_size": 1, "accum_steps": 4, "describer": "mllm", "depth": 9},
            "few_shot": {"epochs": 50, "lr": 0.0035, "batch_size": 4, "describer": "mllm", "depth": 9},
        },
        # Toy world (4-layer CLIP): depth 3, descriptions from the rendered scenes (interrogator elsewhere).
        "toy": {
            "base2novel": {**TOY_TRAIN, "epochs": 5, "lr": 0.0035, "batch_size": 4, "depth": 3, "text_depth": 3},
            "xd": {**TOY_TRAIN, "epochs": 2, "lr": 0.0026, "batch_size": 4, "depth": 3, "text_depth": 3},
            "few_shot": {**TOY_TRAIN, "epochs": 5, "lr": 0.0035, "batch_size": 4, "depth": 3, "text_depth": 3},
        },
    }
    # methods.md §7.3 (G): `ablate --drop X` -> variant no-X.
    ablations = {
        "scp": {"scp": False},
        "amg": {"amg": False},
        "mpf": {"mpf": "ctx_only"},
        "align": {"align": False},
        "mutual": {"mutual": False},
    }

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
        self.depth = min(cfg.depth, b.vision_layers)
        self.text_depth = max(1, min(cfg.text_depth, b.text_layers))
        if self.depth < cfg.depth:
            log.info("mugcp: depth %d clipped to the backbone's %d vision layers", cfg.depth, b.vision_layers)
        mode, m_t = cfg.mpf, cfg.n_ctx
        self.use_scp_text = cfg.scp and mode in ("gated_sum", "concat", "scp_only")
        self.use_vcp_text = mode in ("gated_sum", "concat", "vcp_only")
        self.use_align = cfg.align and cfg.scp
        self.n_slots = m_t * (1 + int(self.use_scp_text) + int(self.use_vcp_text)) if mode == "concat" else m_t

        # P_ctx from "a photo of a" (CoOp / MaPLe init); concat mode adds placeholder slots before the init words.
        ctx, prefix = init_context(b, m_t, cfg.ctx_init)
        self.ctx = nn.Parameter(ctx)  # (M_t, Dt)
        self._prefix = " ".join(["X"] * (self.n_slots - m_t) + [prefix])
        self.prompts = ClassPrompts(b, self.classnames, self.n_slots, self._prefix)
        if self.text_depth > 1:  # IVLP deep text prompts (not instance-conditional)
            self.text_deep = nn.Parameter(torch.empty(self.text_depth - 1, self.n_slots, dt))
            nn.init.normal_(self.text_deep, std=0.02)
        if self.use_scp_text:  # MetaNet_s: E -> E/16 -> M_t · Dt (CoCoOp meta-net shape, trainers/cocoop.py)
            hidden = max(1, e // cfg.meta_ratio)
            self.meta_net = nn.Sequential(
                OrderedDict(
                    linear1=nn.Linear(e, hidden), relu=nn.ReLU(inplace=True), linear2=nn.Linear(hidden, m_t * dt)
                )
            )
            nn.init.normal_(self.meta_net.linear2.weight, std=0.02)
            nn.init.zeros_(self.meta_net.linear2.bias)
        if mode in ("gated_sum", "scp_only") and self.use_scp_text:
            self.alpha = nn.Parameter(torch.zeros(m_t))
        if mode in ("gated_sum", "vcp_only"):
            self.beta = nn.Parameter(torch.zeros(m_t))
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
            cfg.scp,
            cfg.amg,
            cfg.mutual,
            cfg.amg_share,
            cfg.layer_scale,
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
        return self.cfg.mpf != "ctx_only"

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

    def _groups(self, items: Sequence[Any]) -> list[tuple[Any, list[Any]]]:
        """(describer, items) pairs: one describer, or for `auto` scene (toy images) + interrogator (the rest)."""
        from mugcp_bench.describers import describer_groups

        return describer_groups(self.cfg.describer, items, self._describer)

    def _used_text(self, raw: str) -> str:
        return mask_classnames(raw, self._known_names) if self.cfg.mask_classnames else raw

    def _remask(self) -> None:
        self._texts = {k: self._used_text(t) for k, t in self._raw.items()}
        self._encode_missing(set(self._texts.values()))

    @torch.no_grad()
    def _encode_missing(self, texts: set[str], chunk: int = 256) -> None:
        """s (E,) normalised EOT feature and S (L, Dt) final token states after ln_final, for new texts."""
        todo = sorted(t for t in texts if t not in self._features)
        b = self.backbone
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            tokens = b.tokenize(part)  # (N, ctx) — truncated by the tokenizer with EOT kept last
            x, mask, eot = b.text_embed(b.embed_tokens(tokens), tokens)  # (N, T, Dt)
            for i in range(b.text_layers):
                x = b.text_block(i, x, mask)
            states = b.text.ln_final(x).float()  # (N, T, Dt)
            s = F.normalize(b.text_head(x, eot).float(), dim=-1)  # (N, E)
            for j, text in enumerate(part):
                n = int(eot[j]) + 1
                self._features[text] = (s[j].cpu(), states[j, :n].to(torch.float16).cpu())

    def prepare_images(self, items: Sequence[Any], split: str) -> dict[str, Any]:
        """Describe every item (through the shared cache), encode the descriptions, report label leakage."""
        if not self.cfg.scp or not items:
            return {"leakage": None, "n_descriptions": 0, "describer": None}
        from mugcp_bench.describers import describe_items

        cache = DescriptionCache()
        raw: dict[str, str] = {}
        ids, prompts, n_cached, n_generated = [], [], 0, 0
        for describer, group in self._groups(items):
            outcome = describe_items(
                group, describer, cache, generate=self.cfg.describe_missing, datasets_hint=self.dataset or "..."
            )
            raw.update(outcome.texts)
            ids.append(describer.id)
            prompts.append(describer.prompt_id)
            n_cached += outcome.n_cached
            n_generated += outcome.n_generated
            describer.release()  # an MLLM must not hold GPU memory while the method trains
        self._raw.update(raw)
        names = set(self.classnames) | {d.classname for d in items if hasattr(d, "classname")}
        if self.cfg.mask_classnames and not names <= self._known_names:
            self._known_names |= names  # new class names: mask every stored description again
            self._remask()
        else:
            self._texts.update({k: self._used_text(t) for k, t in raw.items()})
            self._encode_missing({self._texts[k] for k in raw})
        keys = [item_key(d) for d in items]
        info: dict[str, Any] = {
            "leakage": leakage_fraction([self._texts[k] for k in keys], items)
            if hasattr(items[0], "classname")
            else None,
            "n_descriptions": len(items),
            "describer": "+".join(ids),
            "prompt_id": "+".join(prompts),
            "n_cached": n_cached,
            "n_generated": n_generated,
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
        """s (B, E), S (B, L, Dt), padding mask (B, L) (True = padding) and description ids (B,)."""
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
        index = {t: i for i, t in enumerate(dict.fromkeys(texts))}
        ids = torch.tensor([index[t] for t in texts], device=device)  # (B,)
        return s, big_s, pad, ids

    # --- forward ------------------------------------------------------------------------------------------------
    def _image_pass(self, images, s, big_s, pad) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Image features (B, E) with VCPs in the vision prompt slots; returns VCP_0 … VCP_{J−1} and the S~s."""
        b, amg, m_v = self.backbone, self.amg, self.cfg.n_vctx
        batch = images.shape[0]
        s32 = None if s is None else s.float()
        vcps = [amg.query(0, s32, batch)]  # VCP_0 = E_0 + W_q s: (B, M_v, Dv)
        s_tilde = amg.semantic_tokens(None if big_s is None else big_s.float())  # (B, L, Dv)
        s_tildes: list[torch.Tensor] = []

        def layer_fn(i: int, x: torch.Tensor) -> torch.Tensor:
            nonlocal s_tilde
            if not 1 <= i < self.depth:
                return x
            tokens = x[:, :-m_v]  # (B, 1+P, Dv): X_l
            if s_tilde is not None:
                s_tildes.append(s_tilde)
            vcp, s_tilde = amg.step(i, tokens.float(), s32, s_tilde, pad)  # (B, M_v, Dv)
            vcps.append(vcp)
            return torch.cat([tokens, vcp.to(x.dtype)], dim=1)  # (B, 1+P+M_v, Dv)

        feats = b.encode_image(images, prompts=vcps[0], layer_fn=layer_fn)  # (B, E)
        return feats, vcps, s_tildes

    def _text_prompts(self, s: torch.Tensor | None, vcp_last: torch.Tensor, batch: int) -> torch.Tensor:
        """MPF: the learnable text prompt tokens, (B, n_slots, Dt) (or (1, M_t, Dt) for ctx_only)."""
        mode, m_t = self.cfg.mpf, self.cfg.n_ctx
        ctx = self.ctx.unsqueeze(0)  # (1, M_t, Dt)
        if mode == "ctx_only":
            return ctx
        dt = ctx.shape[-1]
        p_scp = self.meta_net(s.float()).view(batch, m_t, dt) if self.use_scp_text else None  # (B, M_t, Dt)
        p_vcp = None
        if self.use_vcp_text:
            p_vcp = self.w_vt(vcp_last.float().mean(dim=1)).unsqueeze(1).expand(-1, m_t, -1)  # (B, M_t, Dt)
        if mode == "concat":
            parts = [ctx.expand(batch, -1, -1)] + [p for p in (p_scp, p_vcp) if p is not None]
            return torch.cat(parts, dim=1)  # (B, n_slots, Dt)
        out = ctx.expand(batch, -1, -1)  # (B, M_t, Dt)
        if p_scp is not None:
            out = out + self.alpha.view(1, m_t, 1) * p_scp
        if p_vcp is not None:
            out = out + self.beta.view(1, m_t, 1) * p_vcp
        return out

    def _text_layer_fn(self):
        if self.text_depth <= 1:
            return None
        n = self.n_slots

        def layer_fn(i: int, x: torch.Tensor) -> torch.Tensor:
            if not 1 <= i < self.text_depth:
                return x
            deep = self.text_deep[i - 1].to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)  # (N, n_slots, Dt)
            return torch.cat([x[:, :1], deep, x[:, 1 + n :]], dim=1)

        return layer_fn

    def _text_features(self, prompts: torch.Tensor) -> torch.Tensor:
        """(1, n, Dt) -> (C, E); (B, n, Dt) -> (B, C, E)."""
        b, cp = self.backbone, self.prompts
        if prompts.shape[0] == 1 and self.cfg.mpf == "ctx_only":
            embeds = cp.build(prompts[0])  # (C, T, Dt)
            return b.encode_text_chunked(embeds, cp.tokens, self.cfg.text_chunk, self._text_layer_fn())  # (C, E)
        batch, n_cls = prompts.shape[0], cp.n_cls
        rows = batch * n_cls  # row r = (image r // C, class r % C)
        chunk = self.cfg.text_chunk if self.cfg.text_chunk > 0 else rows
        layer_fn = self._text_layer_fn()
        prompts = prompts.to(cp.token_suffix.dtype)
        feats = []
        for start in range(0, rows, chunk):  # embeddings built per chunk: memory bounded by the chunk, not B x C
            idx = torch.arange(start, min(start + chunk, rows), device=prompts.device)
            img, cls = idx // n_cls, idx % n_cls
            embeds = torch.cat([cp.token_prefix[cls], prompts[img], cp.token_suffix[cls]], dim=1)  # (r, T, Dt)
            if torch.is_grad_enabled() and rows > chunk:  # training: recompute each chunk in the backward pass
                out = checkpoint(b.encode_text, embeds, cp.tokens[cls], layer_fn, use_reentrant=False)
            else:
                out = b.encode_text(embeds, cp.tokens[cls], layer_fn)
            feats.append(out)  # (r, E)
        return torch.cat(feats).view(batch, n_cls, -1)  # (B, C, E)

    def _run(self, images: torch.Tensor, keys: Sequence[str] | None, use_cache: bool = False) -> _Pass:
        s, big_s, pad, ids = self._scp_batch(keys, images.device)
        image_f, vcps, s_tildes = self._image_pass(images, s, big_s, pad)  # (B, E)
        prompts = self._text_prompts(s, vcps[-1], images.shape[0])  # (B | 1, n_slots, Dt)
        if use_cache and self._eval_text is not None:
            text_f = self._eval_text
        else:
            text_f = self._text_features(prompts)  # (B, C, E) or (C, E)
        logits = cosine_logits(self.backbone.logit_scale, image_f, text_f)  # (B, C)
        return _Pass(logits, image_f, text_f, prompts, vcps, s_tildes, s, ids)

    def _embed_space(self, x: torch.Tensor) -> torch.Tensor:
        """Text-width vectors in the joint space: identity where Dt = E (ViT-B/16), else the frozen projection."""
        if x.shape[-1] == self.backbone.embed_dim:
            return x
        return _apply_linear(self.backbone.text.text_projection, x)

    def align_loss(self, out: _Pass) -> torch.Tensor:
        """In-batch InfoNCE between W_v->t pool(VCP_l) and s, averaged over the AMG layers (symmetric)."""
        layers = list(range(1, len(out.vcps))) or [0]
        s = out.s.float()  # (B, E)
        same = (out.ids.unsqueeze(0) == out.ids.unsqueeze(1)).float()  # (B, B) equal descriptions are positives
        target = same / same.sum(dim=1, keepdim=True)
        total = 0.0
        for layer in layers:
            z = F.normalize(self._embed_space(self.w_vt(out.vcps[layer].float().mean(dim=1))), dim=-1)  # (B, E)
            sim = z @ s.t() / self.cfg.align_temperature  # (B, B)
            loss_i = -(target * sim.log_softmax(dim=1)).sum(dim=1).mean()
            loss_t = -(target * sim.t().log_softmax(dim=1)).sum(dim=1).mean()
            total = total + 0.5 * (loss_i + loss_t)
        return total / len(layers)

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
        """ctx_only: the text features do not depend on the image and are computed once."""
        self._eval_text = None
        if self.cfg.mpf == "ctx_only":
            with torch.no_grad():
                self._eval_text = self._text_features(self.ctx.unsqueeze(0))  # (C, E)

    def end_eval(self) -> None:
        self._eval_text = None

    @torch.no_grad()
    def predict(self, images, keys=None, image_features=None) -> torch.Tensor:
        return self._run(images, keys, use_cache=True).logits

    def forward_details(self, images: torch.Tensor, keys: Sequence[str] | None = None) -> _Pass:
        """Everything one forward computes (VCPs, S~s, text prompts and features) — for tests and analysis."""
        return self._run(images, keys)
