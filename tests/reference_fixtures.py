"""Checkpoint files in the exact structure the reference trainers write, without the reference code.

`write_reference_checkpoint` follows the project's checkpoint notes (their fixture recipe was checked field by field
against a file the real CoOp trainer wrote): real torch SGD/Adam and CosineAnnealingLR run for the config's epochs,
wrapped in a copy of Dassl's ConstantWarmupScheduler (KaiyangZhou/Dassl.pytorch dassl/optim/lr_scheduler.py) whose
`state_dict()` — not the class — is saved, so the file pickles a live CosineAnnealingLR holding the optimizer object
and every Parameter, as the real files do. The `*_entries` builders give each trainer's state-dict keys, shapes,
dtypes and views (docs/interop.md §1, §3), hard-coded here from the reference code, independently of
`mugcp_bench.interop`'s maps; widths come from the backbone so the tiny test CLIP can stand in for ViT-B/16.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

Entry = tuple[str, torch.Tensor, str]  # (state_dict key, tensor, "train" | "frozen" | "buffer")


class ConstantWarmupScheduler(torch.optim.lr_scheduler.LRScheduler):
    """Dassl's ConstantWarmupScheduler / _BaseWarmupScheduler minus `verbose` (torch 2.x has none)."""

    def __init__(self, optimizer, successor, warmup_epoch, cons_lr, last_epoch=-1):
        self.cons_lr = cons_lr  # attribute order = Dassl's -> the same state_dict key order
        self.successor = successor
        self.warmup_epoch = warmup_epoch
        super().__init__(optimizer, last_epoch)

    def step(self, epoch=None):
        if self.last_epoch >= self.warmup_epoch:
            self.successor.step(epoch)
            self._last_lr = self.successor.get_last_lr()
        else:
            super().step(epoch)

    def get_lr(self):
        if self.last_epoch >= self.warmup_epoch:
            return self.successor.get_last_lr()
        return [self.cons_lr for _ in self.base_lrs]


def write_reference_checkpoint(
    run_dir: Path,
    learner: str,
    entries: list[Entry],
    epochs: int,
    lr: float,
    *,
    val_result: Any = "none",
    optimizer: str = "sgd",
    seed: int = 0,
    location: str | None = None,
) -> Path:
    """Write `<run_dir>/<learner>/model.pth.tar-<epochs>` (or model-best.pth.tar for a float `val_result`) and the
    `checkpoint` file, as Dassl's save_model does after the last epoch. The same tensor object under several keys
    becomes one shared Parameter (CMPA with PS True); views stay views. val_result: "none" (Dassl >= 2022-08-08),
    "absent" (older Dassl, KgCoOp's fork) or a float. location: e.g. "cuda:0", the storage location GPU runs record."""
    g = torch.Generator().manual_seed(seed)
    params: dict[int, nn.Parameter] = collections.OrderedDict()
    sd: collections.OrderedDict[str, torch.Tensor] = collections.OrderedDict()
    for key, t, kind in entries:
        if kind == "buffer":
            sd[key] = t
            continue
        if id(t) not in params:
            params[id(t)] = nn.Parameter(t, requires_grad=(kind == "train"))
        sd[key] = params[id(t)]
    plist = list(params.values())  # module.parameters() order, deduplicated
    if optimizer == "sgd":
        opt = torch.optim.SGD(plist, lr=lr, momentum=0.9, weight_decay=5e-4, dampening=0, nesterov=False)
    elif optimizer == "adamw":  # MMRL: Dassl's build_optimizer "adamw" (configs/trainers/MMRL/*.yaml)
        opt = torch.optim.AdamW(plist, lr=lr, weight_decay=5e-4, betas=(0.9, 0.999))
    else:  # TCP: Adam with its README's eps patch
        opt = torch.optim.Adam(plist, lr=lr, weight_decay=5e-4, betas=(0.9, 0.999), eps=1e-3)
    sched = ConstantWarmupScheduler(opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, float(epochs)), 1, 1e-5)
    for _ in range(epochs):
        opt.zero_grad()
        for p in plist:
            if p.requires_grad:
                p.grad = (torch.randn(p.shape, generator=g) * 1e-3).to(p.dtype)
        opt.step()
        sched.step()  # Dassl: update_lr() once per epoch
    ckpt = {
        "state_dict": collections.OrderedDict((k, v.detach()) for k, v in sd.items()),
        "epoch": epochs,
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
    }
    if val_result != "absent":
        ckpt["val_result"] = None if val_result == "none" else float(val_result)
    name = "model-best.pth.tar" if isinstance(val_result, float) else f"model.pth.tar-{epochs}"
    folder = Path(run_dir) / learner
    os.makedirs(folder, exist_ok=True)
    if location is None:
        torch.save(ckpt, folder / name)
    else:  # as saved on a GPU: the storages' location tag
        saved = torch.serialization.location_tag
        torch.serialization.location_tag = lambda storage: location
        try:
            torch.save(ckpt, folder / name)
        finally:
            torch.serialization.location_tag = saved
    (folder / "checkpoint").write_text(name + "\n")
    return folder / name


# --- the frozen CLIP of whole-model files (notes/checkpoints README §8) -----------------------------------------------
_FP16_SUFFIXES = (
    "attn.in_proj_weight",
    "attn.in_proj_bias",
    "attn.out_proj.weight",
    "attn.out_proj.bias",
    "mlp.c_fc.weight",
    "mlp.c_fc.bias",
    "mlp.c_proj.weight",
    "mlp.c_proj.bias",
)


def reference_fp16_dtype(openai_key: str, cmpa: bool = False) -> torch.dtype:
    """OpenAI's convert_weights under the reference's fp16 regime (CMPA renames visual.proj: not converted)."""
    if openai_key.endswith(_FP16_SUFFIXES) or openai_key in ("visual.conv1.weight", "text_projection"):
        return torch.float16
    if openai_key == "visual.proj":
        return torch.float32 if cmpa else torch.float16
    return torch.float32


def clip_state(backbone) -> dict[str, torch.Tensor]:
    """The backbone's frozen weights under OpenAI's names (open_clip keeps them)."""
    return {k: v.detach().clone() for k, v in backbone.model.state_dict().items()}


def image_encoder_entries(clip_sd: Mapping[str, torch.Tensor], prefix: str = "image_encoder.") -> list[Entry]:
    return [
        (prefix + k[len("visual.") :], v.to(reference_fp16_dtype(k)).clone(), "frozen")
        for k, v in clip_sd.items()
        if k.startswith("visual.")
    ]


def text_encoder_entries(clip_sd: Mapping[str, torch.Tensor]) -> list[Entry]:
    return [
        ("text_encoder." + k, v.to(reference_fp16_dtype(k)).clone(), "frozen")
        for k, v in clip_sd.items()
        if k in ("positional_embedding", "text_projection") or k.startswith(("transformer.", "ln_final."))
    ]


def _rand(g: torch.Generator) -> Callable[..., torch.Tensor]:
    def r(*shape: int, dtype: torch.dtype = torch.float16) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(dtype)

    return r


# --- per-trainer entries ------------------------------------------------------------------------------------------
def coop_entries(
    backbone, n_cls: int = 3, n_ctx: int = 4, ctx_init: bool = True, csc: bool = False, seed: int = 0
) -> list[Entry]:
    """KaiyangZhou/CoOp trainers/coop.py PromptLearner (fp16): ctx, then the two buffers of one (C, L, D) storage."""
    r = _rand(torch.Generator().manual_seed(seed))
    width, length = backbone.text_width, backbone.context_length
    if ctx_init:  # a view: rows 1 … n_ctx of the init prompt's (1, L, D) embedding
        ctx = r(1, length, width)[0, 1 : 1 + n_ctx, :]
    elif csc:
        ctx = r(n_cls, n_ctx, width)
    else:
        ctx = r(n_ctx, width)
    emb = r(n_cls, length, width)
    return [
        ("ctx", ctx, "train"),
        ("token_prefix", emb[:, :1, :], "buffer"),
        ("token_suffix", emb[:, 1 + n_ctx :, :], "buffer"),
    ]


def kgcoop_entries(backbone, n_cls: int = 3, seed: int = 0) -> list[Entry]:
    """htyao89/KgCoOp KgCoOp/trainers/kgcoop.py PromptLearner (fp16): CoOp's "a photo of a" ctx, then bias_vectors
    (1, 512) and meta_net.linear1 (512, 512): created, never used, frozen (512 hard-coded whatever the backbone)."""
    entries = coop_entries(backbone, n_cls, n_ctx=4, ctx_init=True, seed=seed)
    r = _rand(torch.Generator().manual_seed(seed + 1))
    return [
        entries[0],
        ("bias_vectors", r(1, 512), "frozen"),
        *entries[1:],
        ("meta_net.linear1.weight", r(512, 512), "frozen"),
        ("meta_net.linear1.bias", r(512), "frozen"),
    ]


def cocoop_entries(backbone, n_cls: int = 3, n_ctx: int = 4, seed: int = 0) -> list[Entry]:
    """KaiyangZhou/CoOp trainers/cocoop.py PromptLearner (fp16): ctx, buffers, meta_net linear1 (E/16, E), linear2."""
    r = _rand(torch.Generator().manual_seed(seed))
    width, length, vis = backbone.text_width, backbone.context_length, backbone.embed_dim
    emb = r(n_cls, length, width)
    hidden = vis // 16
    return [
        ("ctx", r(1, length, width)[0, 1 : 1 + n_ctx], "train"),
        ("token_prefix", emb[:, :1], "buffer"),
        ("token_suffix", emb[:, 1 + n_ctx :], "buffer"),
        ("meta_net.linear1.weight", r(hidden, vis), "train"),
        ("meta_net.linear1.bias", r(hidden), "train"),
        ("meta_net.linear2.weight", r(width, hidden), "train"),
        ("meta_net.linear2.bias", r(width), "train"),
    ]


def maple_entries(backbone, n_cls: int = 3, n_ctx: int = 2, depth: int = 3, seed: int = 0) -> list[Entry]:
    """multimodal-prompt-learning trainers/maple.py CustomCLIP (fp16 regime): logit_scale, the prompt learner
    (ctx, buffers, proj fp16; compound prompts and projections fp32), the frozen image and text encoders."""
    r = _rand(torch.Generator().manual_seed(seed))
    dt, dv, length = backbone.text_width, backbone.vision_width, backbone.context_length
    clip_sd = clip_state(backbone)
    emb = r(n_cls, length, dt)
    e = [
        ("logit_scale", clip_sd["logit_scale"].float().clone(), "frozen"),
        ("prompt_learner.ctx", r(1, length, dt)[0, 1 : 1 + n_ctx], "train"),
        ("prompt_learner.token_prefix", emb[:, :1], "buffer"),
        ("prompt_learner.token_suffix", emb[:, 1 + n_ctx :], "buffer"),
        ("prompt_learner.proj.weight", r(dv, dt), "train"),
        ("prompt_learner.proj.bias", r(dv), "train"),
    ]
    e += [
        (f"prompt_learner.compound_prompts_text.{j}", r(n_ctx, dt, dtype=torch.float32), "train")
        for j in range(depth - 1)
    ]
    for j in range(depth - 1):
        e += [
            (f"prompt_learner.compound_prompt_projections.{j}.weight", r(dv, dt, dtype=torch.float32), "train"),
            (f"prompt_learner.compound_prompt_projections.{j}.bias", r(dv, dtype=torch.float32), "train"),
        ]
    return e + image_encoder_entries(clip_sd) + text_encoder_entries(clip_sd)


def ivlp_entries(
    backbone, n_cls: int = 3, n_ctx: int = 2, depth: int = 3, vision: bool = True, seed: int = 0
) -> list[Entry]:
    """multimodal-prompt-learning trainers/independentVL.py CustomCLIP: ctx fp16, buffers, image_encoder.VPT and one
    VPT_shallow (fp32) per prompted block 1 … depth−1 of each tower, listed first within its block (`vision=False`:
    the language-only config, PROMPT_DEPTH_VISION 0: no vision prompt at all)."""
    r = _rand(torch.Generator().manual_seed(seed))
    dt, dv, length = backbone.text_width, backbone.vision_width, backbone.context_length
    clip_sd = clip_state(backbone)
    emb = r(n_cls, length, dt)
    e = [
        ("logit_scale", clip_sd["logit_scale"].float().clone(), "frozen"),
        ("prompt_learner.ctx", r(1, length, dt)[0, 1 : 1 + n_ctx], "train"),
        ("prompt_learner.token_prefix", emb[:, :1], "buffer"),
        ("prompt_learner.token_suffix", emb[:, 1 + n_ctx :], "buffer"),
    ]
    if vision:
        e.append(("image_encoder.VPT", r(n_ctx, dv, dtype=torch.float32), "train"))
    towers = (("image_encoder", dv), ("text_encoder", dt)) if vision else (("text_encoder", dt),)
    for entry in image_encoder_entries(clip_sd) + text_encoder_entries(clip_sd):
        e += _deep_prompt(entry[0], towers, depth, n_ctx, r)
        e.append(entry)
    return e


def _deep_prompt(key: str, towers, depth: int, n_ctx: int, r) -> list[Entry]:
    """The VPT_shallow (fp32) of block i (1 … depth−1) of a tower, listed first within its block."""
    for tower, width in towers:
        block = f"{tower}.transformer.resblocks."
        if key.startswith(block) and key.endswith(".ln_1.weight"):  # a block's first tensor (ln_1, then attn)
            i = int(key[len(block) :].split(".")[0])
            if 1 <= i < depth:
                return [(f"{block}{i}.VPT_shallow", r(n_ctx, width, dtype=torch.float32), "train")]
    return []


def vpt_entries(backbone, n_ctx: int = 8, depth: int = 3, seed: int = 0) -> list[Entry]:
    """multimodal-prompt-learning trainers/vpt.py: the whole CustomCLIP registered as "prompt_learner", all fp32
    (load_clip_to_cpu returns model.float()): image_encoder.VPT before the frozen image encoder, VPT_shallow in image
    blocks 1 … depth−1, the frozen text encoder; no prompt learner, no class buffers."""
    r = _rand(torch.Generator().manual_seed(seed))
    clip_sd = {k: v.float() for k, v in clip_state(backbone).items()}
    towers = (("image_encoder", backbone.vision_width),)
    e = [
        ("logit_scale", clip_sd["logit_scale"].clone(), "frozen"),
        ("image_encoder.VPT", r(n_ctx, backbone.vision_width, dtype=torch.float32), "train"),
    ]
    for key, value, kind in image_encoder_entries(clip_sd) + text_encoder_entries(clip_sd):
        e += _deep_prompt(key, towers, depth, n_ctx, r)
        e.append((key, value.float(), kind))
    return e


def promptsrc_entries(backbone, n_cls: int = 3, n_ctx: int = 4, depth: int = 3, seed: int = 0) -> list[Entry]:
    """muzairkhattak/PromptSRC trainers/promptsrc.py: IVLP 4+4 plus the zero-shot image encoder
    (prompt_learner.ZS_image_encoder.*, fp16 regime) after the buffers; the saved model is the Gaussian average of the
    epochs' states, which moves frozen fp16 tensors too: one fp16 step at some positions."""
    entries = ivlp_entries(backbone, n_cls, n_ctx, depth, seed=seed)
    g = torch.Generator().manual_seed(seed + 7)
    zs = image_encoder_entries(clip_state(backbone), prefix="prompt_learner.ZS_image_encoder.")
    out: list[Entry] = []
    for key, value, kind in entries[:4] + zs + entries[4:]:
        if kind == "frozen" and value.dtype == torch.float16:
            bump = ((torch.rand(value.shape, generator=g) < 0.3) & (value != 0)).to(torch.float16)  # Σ w·0 = 0
            value = torch.nextafter(value, value + bump * torch.sign(value + 1e-3).to(value.dtype))  # GPA rounding
        out.append((key, value, kind))
    return out


def tcp_entries(backbone, n_cls: int = 3, seed: int = 0) -> list[Entry]:
    """htyao89/Textual-based_Class-aware_prompt_tuning trainers/tcp.py PromptLearner (fp16): random ctx (4, D),
    buffers, meta_net linear1 (E/4, E), linear2 (4·D, E/4) (vis_dim = E; 4 class tokens hard-coded)."""
    entries = coop_entries(backbone, n_cls, n_ctx=4, ctx_init=False, seed=seed)
    r = _rand(torch.Generator().manual_seed(seed + 3))
    e, d = backbone.embed_dim, backbone.text_width
    return entries + [
        ("meta_net.linear1.weight", r(e // 4, e), "train"),
        ("meta_net.linear1.bias", r(e // 4), "train"),
        ("meta_net.linear2.weight", r(4 * d, e // 4), "train"),
        ("meta_net.linear2.bias", r(4 * d), "train"),
    ]


def prograd_entries(backbone, n_cls: int = 3, n_ctx: int = 8, words: int = 3, seed: int = 0) -> list[Entry]:
    """BeierZhu/Prompt-align ProGrad.public/trainers/prograd.py PromptLearner (fp16; the trainer registers it as
    "prompt_learner"): ctx = zeros(n_ctx, D) with its last `words` rows set from the dataset template's embedding
    (DTD: "a texture of", 3 words; a fresh tensor, not a view), then token_prefix / token_suffix, views of one
    (C, L, D) embedding of "X … X <init text> <name>."."""
    r = _rand(torch.Generator().manual_seed(seed))
    width, length = backbone.text_width, backbone.context_length
    ctx = torch.zeros(n_ctx, width, dtype=torch.float16)
    ctx[n_ctx - words :] = r(1, length, width)[0, 1 : 1 + words]
    emb = r(n_cls, length, width)
    return [
        ("ctx", ctx, "train"),
        ("token_prefix", emb[:, :1, :], "buffer"),
        ("token_suffix", emb[:, 1 + n_ctx :, :], "buffer"),
    ]


def mma_entries(backbone, n_cls: int = 3, start: int = 2, end: int = 4, dim: int = 32, seed: int = 0) -> list[Entry]:
    """ZjjConan/Multi-Modal-Adapter trainers/mmadapter.py AdapterLearner (registered as "adapter_learner"), PREC fp16
    (``_build_adapter`` halves the adapters; the stock configs' amp keeps everything fp32): its buffers
    token_embedding (C, L, Dt) and tokenized_prompts (C, L) int64 first, then text_adapter, visual_adapter and
    shared_adapter, each a ModuleList over slots 0 … n_layers whose slots ADAPTER_START … ADAPTER_END (1-based) hold
    Sequential(down = Sequential(Linear(d, dim), ReLU), up = Linear(dim, d)); shared: Sequential(Linear(dim, dim),
    ReLU) (d == dim)."""
    g = torch.Generator().manual_seed(seed)
    r = _rand(g)
    dt, dv, length = backbone.text_width, backbone.vision_width, backbone.context_length
    tokens = torch.zeros(n_cls, length, dtype=torch.long)  # clip.tokenize: SOT, the prompt's BPE ids, EOT, zeros
    tokens[:, 0], tokens[:, 1:4] = 49406, torch.randint(300, 40000, (n_cls, 3), generator=g)
    tokens[:, 4] = 49407
    e: list[Entry] = [("token_embedding", r(n_cls, length, dt), "buffer"), ("tokenized_prompts", tokens, "buffer")]
    for tower, width in (("text_adapter", dt), ("visual_adapter", dv)):
        for s in range(start, end + 1):
            e += [
                (f"{tower}.{s}.down.0.weight", r(dim, width), "train"),
                (f"{tower}.{s}.down.0.bias", r(dim), "train"),
                (f"{tower}.{s}.up.weight", r(width, dim), "train"),
                (f"{tower}.{s}.up.bias", r(width), "train"),
            ]
    for s in range(start, end + 1):
        e += [(f"shared_adapter.{s}.0.weight", r(dim, dim), "train"), (f"shared_adapter.{s}.0.bias", r(dim), "train")]
    return e


def mmrl_entries(
    backbone,
    n_cls: int = 3,
    n_tokens: int = 5,
    rep_dim: int = 16,
    layers: int = 2,
    prec: str = "amp",
    seed: int = 0,
) -> list[Entry]:
    """yunncheng/MMRL trainers/mmrl.py CustomCLIP, registered whole as "MultiModalRepresentationLearner": the buffer
    prompt_embeddings (C, L, Dt); representation_learner.compound_rep_tokens (N, r) and one r2vproj / r2tproj Linear
    per REP_LAYERS entry; image_encoder = the MMRL VisionTransformer, whose own parameters are class_embedding,
    positional_embedding, proj, proj_rep, then conv1, ln_pre, blocks, ln_post; TextEncoder_MMRL's
    positional_embedding, text_projection, transformer, ln_final. No logit_scale (the logits use 100). prec "amp"
    (every stock config, build_model's clip_model.float()): all fp32. "fp16": the learner .type(fp16)'d, the frozen
    CLIP as convert_weights leaves it, proj_rep fp32 (convert_weights halves "proj" and "text_projection" only) —
    a regime its AdamW (eps 1e-8 underflows in fp16) cannot train."""
    dtype = torch.float16 if prec == "fp16" else torch.float32
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int, dtype: torch.dtype = dtype) -> torch.Tensor:
        return _rand(g)(*shape, dtype=dtype)

    dt, dv, length, e_dim = backbone.text_width, backbone.vision_width, backbone.context_length, backbone.embed_dim
    clip_sd = clip_state(backbone)
    e: list[Entry] = [
        ("prompt_embeddings", r(n_cls, length, dt), "buffer"),
        ("representation_learner.compound_rep_tokens", r(n_tokens, rep_dim), "train"),
    ]
    for proj, width in (("r2vproj", dv), ("r2tproj", dt)):
        for k in range(layers):
            e += [
                (f"representation_learner.compound_rep_tokens_{proj}.{k}.weight", r(width, rep_dim), "train"),
                (f"representation_learner.compound_rep_tokens_{proj}.{k}.bias", r(width), "train"),
            ]
    cast = (lambda t: t) if prec == "fp16" else (lambda t: t.float())
    for key, value, kind in image_encoder_entries(clip_sd):
        e.append((key, cast(value), kind))
        if key == "image_encoder.proj":
            e.append(("image_encoder.proj_rep", r(dv, e_dim, dtype=torch.float32), "train"))
    text = {k: (k, cast(v), kind) for k, v, kind in text_encoder_entries(clip_sd)}
    first = ("text_encoder.positional_embedding", "text_encoder.text_projection")
    return e + [text[k] for k in first] + [v for k, v in text.items() if k not in first]


# GingL/CMPA clip/model.py PromptAttention, registration order: (name, shape(dv, dt), fp16 under convert_weights?)
PA_NAMES = [
    ("promt_attention_visual.in_proj_weight", lambda v, t: (3 * v, v), True),
    ("promt_attention_visual.in_proj_bias", lambda v, t: (3 * v,), True),
    ("promt_attention_visual.out_proj.weight", lambda v, t: (v, v), True),
    ("promt_attention_visual.out_proj.bias", lambda v, t: (v,), True),
    ("ln_pa_1_visual.weight", lambda v, t: (v,), False),
    ("ln_pa_1_visual.bias", lambda v, t: (v,), False),
    ("mlp_pa_visual.c_fc.weight", lambda v, t: (4 * v, v), True),
    ("mlp_pa_visual.c_fc.bias", lambda v, t: (4 * v,), True),
    ("mlp_pa_visual.c_proj.weight", lambda v, t: (v, 4 * v), True),
    ("mlp_pa_visual.c_proj.bias", lambda v, t: (v,), True),
    ("ln_pa_2_visual.weight", lambda v, t: (v,), False),
    ("ln_pa_2_visual.bias", lambda v, t: (v,), False),
    ("proj_v2t.weight", lambda v, t: (t, v), True),
    ("proj_v2t.bias", lambda v, t: (t,), True),
    ("proj_t2v.weight", lambda v, t: (v, t), True),
    ("proj_t2v.bias", lambda v, t: (v,), True),
    ("promt_attention_text.in_proj_weight", lambda v, t: (3 * t, t), True),
    ("promt_attention_text.in_proj_bias", lambda v, t: (3 * t,), True),
    ("promt_attention_text.out_proj.weight", lambda v, t: (t, t), True),
    ("promt_attention_text.out_proj.bias", lambda v, t: (t,), True),
    ("ln_pa_1_text.weight", lambda v, t: (t,), False),
    ("ln_pa_1_text.bias", lambda v, t: (t,), False),
    ("mlp_pa_text.c_fc.weight", lambda v, t: (4 * t, t), True),
    ("mlp_pa_text.c_fc.bias", lambda v, t: (4 * t,), True),
    ("mlp_pa_text.c_proj.weight", lambda v, t: (t, 4 * t), True),
    ("mlp_pa_text.c_proj.bias", lambda v, t: (t,), True),
    ("ln_pa_2_text.weight", lambda v, t: (t,), False),
    ("ln_pa_2_text.bias", lambda v, t: (t,), False),
]
VISION_HALF = ("promt_attention_visual", "ln_pa_1_visual", "mlp_pa_visual", "ln_pa_2_visual", "proj_t2v")


def cmpa_entries(backbone, n_cls: int = 3, m: int = 4, depth: int = 3, ps: bool = True, seed: int = 0) -> list[Entry]:
    """GingL/CMPA trainers/cmpa.py CustomCLIP (fp16 regime): logit_scale, the two prompts, buffers, the renamed frozen
    Encoder with, per joint block, visual_attn, text_attn and a PromptAttention (PS True: one module under every
    block, one storage per tensor)."""
    r = _rand(torch.Generator().manual_seed(seed))
    dt, dv, length, layers = backbone.text_width, backbone.vision_width, backbone.context_length, backbone.vision_layers
    clip_sd = clip_state(backbone)

    def module() -> dict[str, torch.Tensor]:
        return {n: r(*shape(dv, dt), dtype=torch.float16 if h else torch.float32) for n, shape, h in PA_NAMES}

    def frozen(openai_key: str) -> torch.Tensor:
        return clip_sd[openai_key].to(reference_fp16_dtype(openai_key, cmpa=True)).clone()

    shared = module() if ps else None
    emb = r(n_cls, length, dt)
    e = [
        ("logit_scale", clip_sd["logit_scale"].float().clone(), "frozen"),
        ("prompt_learner.prompts_text", r(m, dt), "train"),
        ("prompt_learner.prompts_visual", r(m, dv), "train"),
        ("prompt_learner.token_prefix", emb[:, :1], "buffer"),
        ("prompt_learner.token_suffix", emb[:, 1 + m :], "buffer"),
        ("encoder.class_embedding_visual", frozen("visual.class_embedding"), "frozen"),
        ("encoder.positional_embedding_visual", frozen("visual.positional_embedding"), "frozen"),
        ("encoder.proj_visual", frozen("visual.proj"), "frozen"),
        ("encoder.positional_embedding", frozen("positional_embedding"), "frozen"),
        ("encoder.text_projection", frozen("text_projection"), "frozen"),
        ("encoder.conv1_visual.weight", frozen("visual.conv1.weight"), "frozen"),
        ("encoder.ln_pre_visual.weight", frozen("visual.ln_pre.weight"), "frozen"),
        ("encoder.ln_pre_visual.bias", frozen("visual.ln_pre.bias"), "frozen"),
        ("encoder.ln_post_visual.weight", frozen("visual.ln_post.weight"), "frozen"),
        ("encoder.ln_post_visual.bias", frozen("visual.ln_post.bias"), "frozen"),
    ]
    for i in range(layers):
        for tower, openai in (
            ("visual_attn", f"visual.transformer.resblocks.{i}."),
            ("text_attn", f"transformer.resblocks.{i}."),
        ):
            e += [
                (f"encoder.resblocks.{i}.{tower}.{k[len(openai) :]}", frozen(k), "frozen")
                for k in clip_sd
                if k.startswith(openai)
            ]
        mod = shared if ps else module()
        for n, _, _ in PA_NAMES:
            trains = n.startswith(VISION_HALF) and 1 <= i <= depth
            e.append((f"encoder.resblocks.{i}.prompt_attn.{n}", mod[n], "train" if (trains or ps) else "frozen"))
    e += [
        ("encoder.ln_final.weight", frozen("ln_final.weight"), "frozen"),
        ("encoder.ln_final.bias", frozen("ln_final.bias"), "frozen"),
    ]
    return e


# (learner folder, entries builder, epochs, lr) of each trainer's stock B2N config (docs/interop.md §1)
TRAINERS: dict[str, tuple[str, Callable[..., list[Entry]], int, float]] = {
    "CoOp": ("prompt_learner", coop_entries, 200, 0.002),
    "CoCoOp": ("prompt_learner", cocoop_entries, 10, 0.002),
    "KgCoOp": ("prompt_learner", kgcoop_entries, 100, 0.002),
    "MaPLe": ("MultiModalPromptLearner", maple_entries, 5, 0.0035),
    "IVLP": ("VLPromptLearner", ivlp_entries, 5, 0.0035),
    "CMPA": ("MultiModalPromptLearner", cmpa_entries, 20, 0.0035),
    "VPT": ("prompt_learner", vpt_entries, 5, 0.0025),
    "PromptSRC": ("VLPromptLearner", promptsrc_entries, 20, 0.0025),
    "TCP": ("prompt_learner", tcp_entries, 50, 0.002),
    "ProGrad": ("prompt_learner", prograd_entries, 50, 0.002),  # ProVP's vit_b16_ep50
    "MultiModalAdapter": ("adapter_learner", mma_entries, 5, 0.0015),
    "MMRL": ("MultiModalRepresentationLearner", mmrl_entries, 10, 0.001),
}
# TCP's README patches Dassl's Adam (eps 1e-3); MMRL's configs use AdamW; every other trainer: SGD
OPTIMIZERS = {"TCP": "adam", "MMRL": "adamw"}
# ProGrad ships its own older Dassl (Dassl.ProGrad.pytorch dassl/engine/trainer.py save_model): no "val_result"
VAL_RESULTS = {"ProGrad": "absent"}


def write_trainer_checkpoint(run_dir: Path, trainer: str, backbone, epochs: int | None = None, **kw: Any) -> Path:
    """A `trainer` checkpoint of the tiny-width stand-ins above in `run_dir` (few epochs keep it fast: the structure
    does not depend on them)."""
    learner, build, stock_epochs, lr = TRAINERS[trainer]
    seed = kw.pop("seed", 0)
    options = {"val_result": VAL_RESULTS.get(trainer, "none")}
    options |= {k: kw.pop(k) for k in ("val_result", "location") if k in kw}
    return write_reference_checkpoint(
        run_dir,
        learner,
        build(backbone, seed=seed, **kw),
        epochs or stock_epochs,
        lr,
        seed=seed,
        optimizer=OPTIMIZERS.get(trainer, "sgd"),
        **options,
    )
