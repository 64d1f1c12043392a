"""The frozen CLIP backbone: the only module that touches open_clip internals.

Explicit layer loops with a callback, written once for every method:

* ``encode_image(images, prompts, layer_fn)`` — vision prompts (B|1, M, Dv) are appended after the patch tokens
  (after the positional embedding, before ``ln_pre``, as MaPLe and DCP do); ``layer_fn(i, x)`` runs before block
  ``i`` and may replace tokens (deep prompts).
* ``encode_text(token_embeds, tokens, layer_fn)`` — prompts replace token slots after SOS in ``token_embeds``;
  the causal text tower is run only up to the longest EOT position of the batch (exact: under a causal mask the
  EOT feature never sees later positions).
* ``encode_joint(images, token_embeds, tokens, layer_fn)`` — both towers stepped layer by layer, for methods
  whose prompts in one tower depend on the other tower's previous layer (DCP, MuGCP).

With no prompts and no callback the loops equal open_clip's ``encode_image`` / ``encode_text`` exactly.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import transforms as T

from mugcp_bench.errors import UserError
from mugcp_bench.registry import BACKBONES, suggest

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "model_configs"
# CLIP's normalisation (protocol.md §4.1).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Keys OpenAI's released state dicts carry besides the weights (see OpenAI's clip/model.py build_model).
OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")

VisionLayerFn = Callable[[int, torch.Tensor], torch.Tensor]
TextLayerFn = Callable[[int, torch.Tensor], torch.Tensor]
JointLayerFn = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def register_packaged_configs() -> list[str]:
    """Register every JSON model config shipped in the package with open_clip (idempotent)."""
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
    if any(n not in open_clip.list_models() for n in names):
        open_clip.add_model_config(CONFIG_DIR)
    for n in names:
        BACKBONES.add(n, CONFIG_DIR / f"{n}.json")
    return names


register_packaged_configs()


def build_transforms(image_size: int, crop_min_scale: float = 0.08) -> tuple[Callable, Callable]:
    """Train and test transforms of the reference protocol (Dassl, protocol.md §4.1; `crop_min_scale` 0.08)."""
    normalize = T.Normalize(CLIP_MEAN, CLIP_STD)
    bicubic = T.InterpolationMode.BICUBIC
    train = T.Compose(
        [
            T.RandomResizedCrop(image_size, scale=(crop_min_scale, 1.0), interpolation=bicubic),
            T.RandomHorizontalFlip(p=0.5),
            T.ToTensor(),
            normalize,
        ]
    )
    test = T.Compose([T.Resize(image_size, interpolation=bicubic), T.CenterCrop(image_size), T.ToTensor(), normalize])
    return train, test


TRANSFORM_VERSION = "dassl-rrc0.08-bicubic-v1"


@dataclass
class TextTower:
    """Handles on the text tower, whichever of open_clip's two layouts the model uses."""

    token_embedding: nn.Embedding
    positional_embedding: torch.Tensor
    transformer: nn.Module
    ln_final: nn.Module
    text_projection: torch.Tensor | nn.Linear | None
    attn_mask: torch.Tensor | None
    pool_type: str
    eos_id: int | None


def _text_tower(model: nn.Module) -> TextTower:
    if hasattr(model, "text"):  # CustomTextCLIP: model.text is a TextTransformer
        t = model.text
        if getattr(t, "cls_emb", None) is not None:
            raise UserError("text towers with a class token (CoCa) are not supported; use a CLIP architecture")
        return TextTower(
            t.token_embedding,
            t.positional_embedding,
            t.transformer,
            t.ln_final,
            t.text_projection,
            t.attn_mask,
            t.pool_type,
            getattr(t, "eos_id", None),
        )
    return TextTower(
        model.token_embedding,
        model.positional_embedding,
        model.transformer,
        model.ln_final,
        model.text_projection,
        model.attn_mask,
        model.text_pool_type,
        getattr(model, "text_eos_id", None),
    )


class Backbone(nn.Module):
    """A frozen open_clip CLIP with explicit, callback-driven layer loops."""

    def __init__(self, model: nn.Module, name: str, pretrained: str | None, tokenizer: Callable) -> None:
        super().__init__()
        visual = model.visual
        if not hasattr(visual, "conv1") or getattr(visual, "attn_pool", None) is not None:
            raise UserError(f"backbone '{name}' is not a plain ViT CLIP; prompt learning needs ViT towers")
        self.model = model
        self.name = name
        self.pretrained = pretrained or "random"
        self.tokenizer = tokenizer
        # Exact EOT truncation of text sequences; False reproduces the reference code's full-length passes
        # (benchmarks compare both).
        self.eot_truncation = True
        self.text = _text_tower(model)
        model.requires_grad_(False)
        model.eval()
        self.vision_width: int = visual.transformer.width
        self.vision_layers: int = len(visual.transformer.resblocks)
        self.text_width: int = self.text.transformer.width
        self.text_layers: int = len(self.text.transformer.resblocks)
        self.context_length: int = self.text.positional_embedding.shape[0]
        self.embed_dim: int = visual.proj.shape[1] if visual.proj is not None else self.vision_width
        size = visual.image_size
        self.image_size: int = size[0] if isinstance(size, (tuple, list)) else int(size)
        self.n_vision_tokens: int = visual.positional_embedding.shape[0]
        self.test_transform = build_transforms(self.image_size)[1]
        for block in [*visual.transformer.resblocks, *self.text.transformer.resblocks]:
            if not getattr(block.attn, "batch_first", True):
                raise UserError(f"backbone '{name}' uses sequence-first blocks; open_clip>=3 batch-first is required")

    # --- frozen: never leave eval mode, never train -------------------------------------------------------------

    def train_transform(self, crop_min_scale: float = 0.08) -> Callable:
        """Dassl's train transform at this backbone's image size; `crop_min_scale` is RandomResizedCrop's smallest
        area share (0.08 in the reference protocol; a TrainConfig setting)."""
        return build_transforms(self.image_size, crop_min_scale)[0]

    def train(self, mode: bool = True) -> Backbone:  # noqa: D102 - the backbone is always in eval mode
        return super().train(False)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.visual.conv1.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.visual.conv1.weight.device

    @property
    def logit_scale(self) -> torch.Tensor:
        """exp(logit_scale), frozen (≈100 for pretrained CLIP)."""
        return self.model.logit_scale.detach().exp()

    @functools.cached_property
    def weights_hash(self) -> str:
        """SHA-1 over the backbone's tensors (keys caches and run records)."""
        h = hashlib.sha1()
        for k, v in sorted(self.model.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    # --- text helpers --------------------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, context_length) token ids on the backbone's device."""
        return self.tokenizer(list(texts)).to(self.device)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, L) ids -> (N, L, text_width) token embeddings (no positional embedding)."""
        return self.text.token_embedding(tokens)

    def eot_index(self, tokens: torch.Tensor) -> torch.Tensor:
        """Position of the pooled (end-of-text) token of each sequence, (N,)."""
        if self.text.pool_type == "argmax":
            return tokens.argmax(dim=-1)
        if self.text.pool_type == "eos":
            return (tokens == self.text.eos_id).int().argmax(dim=-1)
        raise UserError(f"text pooling '{self.text.pool_type}' is not supported")

    def n_text_tokens(self, text: str) -> int:
        """Number of BPE tokens of `text` without SOS/EOT."""
        tokens = self.tokenizer([text])[0]
        return int(self.eot_index(tokens[None])[0]) - 1

    # --- vision tower --------------------------------------------------------------------------------------------
    def vision_embed(self, images: torch.Tensor, prompts: torch.Tensor | None = None) -> torch.Tensor:
        """Patch + CLS + positional embedding, prompts appended, ln_pre: (B, 1 + P [+ M], Dv)."""
        v = self.model.visual
        x = v.conv1(images.to(self.dtype))  # (B, Dv, g, g)
        x = x.flatten(2).transpose(1, 2)  # (B, P, Dv)
        cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)  # (B, 1 + P, Dv)
        if prompts is not None:  # appended after the positional embedding; prompts get none
            x = torch.cat([x, prompts.to(x.dtype).expand(x.shape[0], -1, -1)], dim=1)  # (B, 1 + P + M, Dv)
        return v.ln_pre(x)

    def vision_block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return self.model.visual.transformer.resblocks[i](x)

    def vision_head(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled, projected image features (B, E) from the last block's tokens (B, N, Dv)."""
        v = self.model.visual
        if getattr(v, "final_ln_after_pool", False):
            pooled = v.ln_post(v._global_pool(x)[0])
        else:
            pooled = v._global_pool(v.ln_post(x))[0]
        return pooled @ v.proj if v.proj is not None else pooled

    def encode_image(
        self, images: torch.Tensor, prompts: torch.Tensor | None = None, layer_fn: VisionLayerFn | None = None
    ) -> torch.Tensor:
        """Image features (B, E), unnormalised."""
        x = self.vision_embed(images, prompts)
        for i in range(self.vision_layers):
            if layer_fn is not None:
                x = layer_fn(i, x)
            x = self.vision_block(i, x)
        return self.vision_head(x)

    # --- text tower ----------------------------------------------------------------------------------------------
    def text_embed(
        self, token_embeds: torch.Tensor, tokens: torch.Tensor, truncate: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Add positions; cut the sequence after the longest EOT (exact under the causal mask).

        Returns x (N, T, Dt), the (T, T) attention mask and the EOT positions (N,).
        """
        eot = self.eot_index(tokens)
        mask = self.text.attn_mask
        length = token_embeds.shape[1]
        if truncate and self.eot_truncation and mask is not None:  # no causal mask: later tokens visible, no cut
            length = int(eot.max()) + 1
            mask = mask[:length, :length]
        x = token_embeds[:, :length] + self.text.positional_embedding[:length].to(token_embeds.dtype)
        return x, (mask.to(x.dtype) if mask is not None else None), eot

    def text_block(self, i: int, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.text.transformer.resblocks[i](x, attn_mask=mask)

    def text_head(self, x: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
        """Final LayerNorm at the EOT position, projected: (N, E)."""
        x = self.text.ln_final(x[torch.arange(x.shape[0], device=x.device), eot])  # (N, Dt)
        proj = self.text.text_projection
        if proj is None:
            return x
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj

    def encode_text(
        self,
        token_embeds: torch.Tensor,
        tokens: torch.Tensor,
        layer_fn: TextLayerFn | None = None,
        truncate: bool = True,
    ) -> torch.Tensor:
        """Text features (N, E), unnormalised, from token embeddings (N, L, Dt) whose prompt slots are filled."""
        x, mask, eot = self.text_embed(token_embeds, tokens, truncate)
        for i in range(self.text_layers):
            if layer_fn is not None:
                x = layer_fn(i, x)
            x = self.text_block(i, x, mask)
        return self.text_head(x, eot)

    def encode_text_chunked(
        self, token_embeds: torch.Tensor, tokens: torch.Tensor, chunk: int, layer_fn: TextLayerFn | None = None
    ) -> torch.Tensor:
        """`encode_text` over row chunks of at most `chunk` sequences (bounds activation memory)."""
        if chunk <= 0 or token_embeds.shape[0] <= chunk:
            return self.encode_text(token_embeds, tokens, layer_fn)
        outs = [
            self.encode_text(token_embeds[s : s + chunk], tokens[s : s + chunk], layer_fn)
            for s in range(0, token_embeds.shape[0], chunk)
        ]
        return torch.cat(outs)

    # --- both towers ---------------------------------------------------------------------------------------------
    def encode_joint(
        self,
        images: torch.Tensor,
        token_embeds: torch.Tensor,
        tokens: torch.Tensor,
        layer_fn: JointLayerFn,
        vision_prompts: torch.Tensor | None = None,
        layer_map: Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Step both towers together; ``layer_fn(i, xv, xt)`` runs before joint block ``i``.

        Returns image features (B, E) and text features (N, E), unnormalised. Towers of different depth need a
        ``layer_map`` (vision block index for each text block); without one the depths must match.
        """
        if layer_map is None:
            if self.vision_layers != self.text_layers:
                raise UserError(
                    f"backbone '{self.name}' has {self.vision_layers} vision and {self.text_layers} text layers; "
                    "this method steps both towers together and needs equal depths (or a layer map)"
                )
            layer_map = list(range(self.text_layers))
        xv = self.vision_embed(images, vision_prompts)
        xt, mask, eot = self.text_embed(token_embeds, tokens)
        vi = 0
        for ti, target in enumerate(layer_map):
            while vi < target:  # vision blocks not paired with a text block
                xv = self.vision_block(vi, xv)
                vi += 1
            xv, xt = layer_fn(ti, xv, xt)
            xv = self.vision_block(vi, xv)
            vi += 1
            xt = self.text_block(ti, xt, mask)
        while vi < self.vision_layers:
            xv = self.vision_block(vi, xv)
            vi += 1
        return self.vision_head(xv), self.text_head(xt, eot)

    # --- convenience ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def text_features(self, texts: Sequence[str], normalize: bool = True) -> torch.Tensor:
        """Features of plain texts (N, E)."""
        tokens = self.tokenize(texts)
        f = self.encode_text(self.embed_tokens(tokens), tokens)
        return F.normalize(f, dim=-1) if normalize else f


# --- loading ---------------------------------------------------------------------------------------------------------
def _is_offline() -> bool:
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _check_name(name: str) -> None:
    models = open_clip.list_models()
    if name not in models:
        raise UserError(
            f"unknown backbone '{name}'.{suggest(name, models)} Run 'mugcp-bench list backbones' to see all."
        )


def _read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """Load a checkpoint file. Returns (state dict, is_openai_format)."""
    is_jit = False
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            is_jit = any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())
    try:
        if is_jit:  # OpenAI's released .pt files are TorchScript archives
            sd = torch.jit.load(str(path), map_location="cpu").state_dict()
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a user error
        raise UserError(f"cannot read checkpoint '{path}': {type(e).__name__}: {str(e).splitlines()[0]}") from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise UserError(f"checkpoint '{path}' does not hold a state dict")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    is_openai = is_jit or any(k in sd for k in OPENAI_EXTRA_KEYS)
    return sd, is_openai


def _load_file(name: str, path: Path) -> nn.Module:
    sd, is_openai = _read_state_dict(path)
    # OpenAI's CLIP uses QuickGELU; open_clip switches it on only for the 'openai' tag. A file in OpenAI's format
    # must be built with QuickGELU or every feature is silently wrong.
    quick = is_openai and not name.endswith("-quickgelu")
    if quick:
        log.info("'%s' is in OpenAI's format: building '%s' with QuickGELU", path, name)
    model = open_clip.create_model(name, pretrained=None, force_quick_gelu=quick)
    for k in OPENAI_EXTRA_KEYS:
        sd.pop(k, None)
    sd = {k: v for k, v in sd.items() if k != "attn_mask" and not k.endswith("position_ids")}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise UserError(
            f"checkpoint '{path}' does not match backbone '{name}': {len(missing)} missing keys "
            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}); pass the matching --backbone"
        )
    return model.float()


def _load_tag(name: str, tag: str, cache_dir: str | None) -> nn.Module:
    tags = open_clip.list_pretrained_tags_by_model(name)
    if tag not in tags:
        raise UserError(
            f"'{tag}' is neither a file nor a pretrained tag of '{name}'.{suggest(tag, tags)} "
            f"Tags: {', '.join(tags) or 'none'}; or pass --pretrained PATH to a checkpoint file."
        )
    cfg = open_clip.get_pretrained_cfg(name, tag)
    if _is_offline():
        try:  # resolves from the local cache only; raises at once when offline and absent
            path = open_clip.download_pretrained(cfg, cache_dir=cache_dir) if cfg.get("hf_hub") else ""
        except Exception:  # noqa: BLE001
            path = ""
        if not path:
            raise UserError(
                f"weights '{name}' / '{tag}' are not in the local cache and HF_HUB_OFFLINE is set: "
                "pass --pretrained PATH to a checkpoint file, or go online once to download them"
            )
    try:
        model = open_clip.create_model(name, pretrained=tag, cache_dir=cache_dir)
    except Exception as e:  # noqa: BLE001
        raise UserError(
            f"could not fetch weights '{name}' / '{tag}' ({type(e).__name__}); pass --pretrained PATH or check network"
        ) from e
    return model.float()


def load_backbone(
    name: str = "tiny",
    pretrained: str | None = None,
    device: str | torch.device = "cpu",
    cache_dir: str | None = None,
    seed: int = 0,
) -> Backbone:
    """Build a frozen backbone from an open_clip architecture name and `pretrained`.

    `pretrained`: None / "" / "random" (deterministic random init from `seed`), an open_clip tag ("openai",
    "laion2b_s34b_b88k", ...), an open_clip checkpoint file, or an OpenAI-format state dict (.pt, JIT or plain).
    """
    _check_name(name)
    if not pretrained or pretrained == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = open_clip.create_model(name, pretrained=None)
        pretrained = "random"
    elif os.path.isfile(pretrained):
        model = _load_file(name, Path(pretrained))
        pretrained = str(Path(pretrained).resolve())
    elif os.path.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")):
        raise UserError(f"checkpoint file '{pretrained}' does not exist; pass --pretrained PATH to an existing file")
    else:
        model = _load_tag(name, pretrained, cache_dir)
    tokenizer = open_clip.get_tokenizer(name)
    vocab = getattr(tokenizer, "vocab_size", None)
    if vocab is not None and vocab < 1000:  # tokenizers can load empty offline without raising
        raise UserError(f"the tokenizer of '{name}' loaded with {vocab} entries; its vocabulary files are missing")
    return Backbone(model, name, pretrained, tokenizer).to(device)


def list_backbones() -> list[str]:
    """Packaged configs first, then every open_clip architecture."""
    packaged = BACKBONES.names()
    return packaged + sorted(m for m in open_clip.list_models() if m not in packaged)
