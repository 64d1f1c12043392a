"""The frozen CLIP backbone: the only module that touches open_clip internals.

Explicit layer loops with a callback, written once for every method:

* ``encode_image(images, prompts, layer_fn)`` — vision prompts (B|1, M, Dv) are appended after the patch tokens
  (after the positional embedding, before ``ln_pre``, as MaPLe and DCP do); ``layer_fn(i, x)`` runs before block
  ``i`` and may replace tokens (deep prompts).
* ``encode_text(token_embeds, tokens, layer_fn, shared_prefix=P)`` — prompts replace token slots after SOS in
  ``token_embeds``; the causal text tower is run only up to the longest EOT position of the batch (exact: under a
  causal mask the EOT feature never sees later positions). With ``shared_prefix`` the first P positions, the same in
  every row (SOS + shared context + fixed prefix words), are run once (once per group of rows) and every row's
  suffix attends to them (exact for the same reason; ``blocks.split_block_forward``).
* ``encode_joint(images, token_embeds, tokens, layer_fn)`` — both towers stepped layer by layer, for methods
  whose prompts in one tower depend on the other tower's previous layer (DCP, MuGCP).

Every loop also takes ``block_branch(i, h)``: a residual branch of block ``i`` that reads the block's normalised input
``h = ln_1(x)`` and whose result (or None) is added to the block's output (MMA's adapters; `blocks.block_forward`), on
the fused path, the split prefix / suffix path (per position: prefix and suffix separately) and open_clip's modules.
A ``layer_fn`` may change the sequence length (MMRL inserts tokens after SOS / CLS): the text loops then rebuild the
causal mask for the new length, a shared prefix may grow (its callback sees and returns the prefix only), and
``eot_offset`` says how far the EOT moved (read at ``eot + eot_offset``). ``vision_tokens`` returns the final token
states, for readouts other than the CLS token's.

With no prompts and no callback the loops equal open_clip's ``encode_image`` / ``encode_text`` (to float rounding:
the blocks run on ``scaled_dot_product_attention``, `mugcp_bench.model.blocks`; ``fused_attention = False`` calls
open_clip's block modules instead).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
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
from mugcp_bench.model import blocks
from mugcp_bench.model.state_fit import StateMismatch, state_mismatch
from mugcp_bench.registry import BACKBONES, suggest

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "configs"
# CLIP's normalisation (docs/protocol.md §4.1).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Keys OpenAI's released state dicts carry besides the weights (see OpenAI's clip/model.py build_model).
OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")

VisionLayerFn = Callable[[int, torch.Tensor], torch.Tensor]
TextLayerFn = Callable[[int, torch.Tensor], torch.Tensor]
JointLayerFn = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# (block index, ln_1 of the block input (N, T, D)) -> what to add to the block's output (N, T, D), or None
BlockBranch = Callable[[int, torch.Tensor], torch.Tensor | None]


def _branch_at(block_branch: BlockBranch | None, i: int) -> blocks.Branch | None:
    """The branch of block `i` as `blocks` takes it (h -> delta), or None."""
    return None if block_branch is None else functools.partial(block_branch, i)


def causal_mask(length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(L, L) additive causal mask, 0 on and below the diagonal, -inf above: open_clip's build_causal_mask (and
    OpenAI CLIP's) at any length."""
    return torch.full((length, length), float("-inf"), device=device).triu(1).to(dtype)


def register_packaged_configs() -> list[str]:
    """Register every JSON model config shipped in the package with open_clip (idempotent)."""
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
    if any(n not in open_clip.list_models() for n in names):
        open_clip.add_model_config(CONFIG_DIR)
    for n in names:
        BACKBONES.add(n, CONFIG_DIR / f"{n}.json")
    return names


register_packaged_configs()


@dataclass(frozen=True)
class Preprocess:
    """How the weights expect images: normalisation, resampling and the test resize (open_clip's `preprocess_cfg`).

    OpenAI's CLIP (the reference's weights): CLIP's mean/std, bicubic, resize the shortest side then centre-crop.
    Other tags were trained with other statistics (e.g. ViT-L-14 `laion2b_s32b_b82k`: mean = std = 0.5; DFN's
    ViT-H-14: the image squashed to a square), and are fed exactly as open_clip's own preprocessing feeds them.
    """

    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    interpolation: str = "bicubic"  # or "bilinear"
    resize_mode: str = "shortest"  # resize the shortest side + centre crop; "squash": resize to a square

    @classmethod
    def from_cfg(cls, cfg: dict | None) -> Preprocess:
        """From an open_clip pretrained or hub `preprocess_cfg` (missing fields keep CLIP's)."""
        cfg = cfg or {}
        default = cls()
        interpolation = str(cfg.get("interpolation") or default.interpolation)
        resize_mode = str(cfg.get("resize_mode") or default.resize_mode)
        if interpolation not in ("bicubic", "bilinear") or resize_mode not in ("shortest", "squash"):
            raise UserError(
                f"unsupported image preprocessing (interpolation '{interpolation}', resize_mode '{resize_mode}'); "
                "supported: bicubic or bilinear, shortest or squash"
            )
        return cls(
            tuple(float(x) for x in (cfg.get("mean") or default.mean)),  # type: ignore[arg-type]
            tuple(float(x) for x in (cfg.get("std") or default.std)),  # type: ignore[arg-type]
            interpolation,
            resize_mode,
        )

    @property
    def version(self) -> str:
        """TRANSFORM_VERSION for CLIP's preprocessing (the reference's; run ids unchanged), else with what differs."""
        if self == Preprocess():
            return TRANSFORM_VERSION
        mean, std = ",".join(f"{x:g}" for x in self.mean), ",".join(f"{x:g}" for x in self.std)
        return f"{TRANSFORM_VERSION}+mean{mean}-std{std}-{self.interpolation}-{self.resize_mode}"


CLIP_PREPROCESS = Preprocess()


def build_transforms(
    image_size: int, crop_min_scale: float = 0.08, preprocess: Preprocess = CLIP_PREPROCESS
) -> tuple[Callable, Callable]:
    """Train and test transforms of the reference protocol (Dassl, docs/protocol.md §4.1; `crop_min_scale` 0.08),
    with the weights' normalisation, resampling and test resize (`Preprocess`)."""
    normalize = T.Normalize(preprocess.mean, preprocess.std)
    mode = T.InterpolationMode.BICUBIC if preprocess.interpolation == "bicubic" else T.InterpolationMode.BILINEAR
    train = T.Compose(
        [
            T.RandomResizedCrop(image_size, scale=(crop_min_scale, 1.0), interpolation=mode),
            T.RandomHorizontalFlip(p=0.5),
            T.ToTensor(),
            normalize,
        ]
    )
    if preprocess.resize_mode == "squash":
        resize = [T.Resize((image_size, image_size), interpolation=mode)]
    else:
        resize = [T.Resize(image_size, interpolation=mode), T.CenterCrop(image_size)]
    test = T.Compose([*resize, T.ToTensor(), normalize])
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

    def __init__(
        self,
        model: nn.Module,
        name: str,
        pretrained: str | None,
        tokenizer: Callable,
        preprocess: Preprocess = CLIP_PREPROCESS,
    ) -> None:
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
        # Block forwards on fused attention (model/blocks.py) where a block allows it; False: open_clip's modules.
        self.fused_attention = True
        # Shared-prefix text encoding where the caller declares a shared prefix; False: every row runs whole.
        self.prefix_sharing = True
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
        self.preprocess = preprocess
        self.test_transform = build_transforms(self.image_size, preprocess=preprocess)[1]
        for block in [*visual.transformer.resblocks, *self.text.transformer.resblocks]:
            if not getattr(block.attn, "batch_first", True):
                raise UserError(f"backbone '{name}' uses sequence-first blocks; open_clip>=3 batch-first is required")
        self._vision_fusable = [blocks.fusable(b) for b in visual.transformer.resblocks]
        # The fused text forward uses is_causal: only for towers whose mask is exactly the causal one.
        causal = self.text.attn_mask is None or torch.equal(
            torch.isinf(self.text.attn_mask), torch.ones_like(self.text.attn_mask, dtype=torch.bool).triu(1)
        )
        self._text_fusable = [causal and blocks.fusable(b) for b in self.text.transformer.resblocks]
        self._text_causal = causal and self.text.attn_mask is not None  # a mask that may be rebuilt at any length

    # --- frozen: never leave eval mode, never train -------------------------------------------------------------

    def train_transform(self, crop_min_scale: float = 0.08) -> Callable:
        """Dassl's train transform at this backbone's image size; `crop_min_scale` is RandomResizedCrop's smallest
        area share (0.08 in the reference protocol; a TrainConfig setting)."""
        return build_transforms(self.image_size, crop_min_scale, self.preprocess)[0]

    @property
    def transform_version(self) -> str:
        """What the run config and the feature cache record about the transforms (`Preprocess.version`)."""
        return self.preprocess.version

    def train(self, mode: bool = True) -> Backbone:  # noqa: D102 - the backbone is always in eval mode
        return super().train(False)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.visual.conv1.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.visual.conv1.weight.device

    @property
    def activation(self) -> str:
        """The MLP activation the towers were built with, read off the modules: "quickgelu" (OpenAI's CLIP) or
        "gelu" (recorded in every run key)."""
        blocks = [*self.model.visual.transformer.resblocks, *self.text.transformer.resblocks]
        acts = {getattr(getattr(b, "mlp", None), "gelu", None) for b in blocks}
        return "+".join(sorted({type(a).__name__.lower() if a is not None else "unknown" for a in acts}))

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
        """(N, L) ids -> (N, L, text_width) token embeddings (no positional embedding), in the weights' dtype."""
        return self.text.token_embedding(tokens).to(self.dtype)

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

    def vision_block(self, i: int, x: torch.Tensor, branch: blocks.Branch | None = None) -> torch.Tensor:
        """Vision block `i` on x (B, N, Dv); `branch` (ln_1(x) -> delta or None) adds to its output."""
        block = self.model.visual.transformer.resblocks[i]
        if self.fused_attention and self._vision_fusable[i]:
            return blocks.block_forward(block, x, branch=branch)
        return blocks.module_forward(block, x, branch=branch)

    def vision_head(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled, projected image features (B, E) from the last block's tokens (B, N, Dv)."""
        v = self.model.visual
        if getattr(v, "final_ln_after_pool", False):
            pooled = v.ln_post(v._global_pool(x)[0])
        else:
            pooled = v._global_pool(v.ln_post(x))[0]
        return pooled @ v.proj if v.proj is not None else pooled

    @property
    def vision_pool_type(self) -> str:
        """How `vision_head` pools the tokens: "tok" (the CLS token, every OpenAI-style ViT CLIP), "avg" (the mean of
        the others) or "none"."""
        return str(getattr(self.model.visual, "pool_type", "tok"))

    def vision_final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The final LayerNorm (ln_post) on token states (B, N, Dv), every token: for readouts of tokens other than
        the pooled one (MMRL's representation tokens)."""
        return self.model.visual.ln_post(x)

    def vision_tokens(
        self,
        images: torch.Tensor,
        prompts: torch.Tensor | None = None,
        layer_fn: VisionLayerFn | None = None,
        block_branch: BlockBranch | None = None,
    ) -> torch.Tensor:
        """The last block's token states (B, N, Dv), before ln_post; `encode_image` pools and projects them.
        `layer_fn(i, x)` runs before block i and may change the number of tokens (the vision tower has no mask)."""
        x = self.vision_embed(images, prompts)
        for i in range(self.vision_layers):
            if layer_fn is not None:
                x = layer_fn(i, x)
            x = self.vision_block(i, x, _branch_at(block_branch, i))
        return x

    def encode_image(
        self,
        images: torch.Tensor,
        prompts: torch.Tensor | None = None,
        layer_fn: VisionLayerFn | None = None,
        block_branch: BlockBranch | None = None,
    ) -> torch.Tensor:
        """Image features (B, E), unnormalised; `block_branch(i, ln_1(x))` adds to block i's output."""
        return self.vision_head(self.vision_tokens(images, prompts, layer_fn, block_branch))

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
        x = token_embeds[:, :length].to(self.dtype) + self.text.positional_embedding[:length].to(self.dtype)
        return x, (mask.to(x.dtype) if mask is not None else None), eot

    def text_block(
        self, i: int, x: torch.Tensor, mask: torch.Tensor | None, branch: blocks.Branch | None = None
    ) -> torch.Tensor:
        """Text block `i` on x (N, T, Dt); `mask` is the tower's (T, T) causal mask as `text_embed` returns it (or
        `text_mask` after a change of length); `branch` (ln_1(x) -> delta or None) adds to the block's output."""
        block = self.text.transformer.resblocks[i]
        if self.fused_attention and self._text_fusable[i]:
            return blocks.block_forward(block, x, causal=mask is not None, branch=branch)
        return blocks.module_forward(block, x, mask, branch)

    def text_mask(self, mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
        """The attention mask for a text sequence of `length` positions, given the current one: unchanged at the
        same length, else the causal mask rebuilt (a layer_fn inserted or removed positions). ValueError for a tower
        whose mask is not the causal one (no rule for other lengths)."""
        if mask is None or mask.shape[-1] == length:
            return mask
        if not self._text_causal:
            raise ValueError(
                f"backbone '{self.name}': its text mask is not the causal one, so a layer_fn may not change the "
                "sequence length"
            )
        return causal_mask(length, mask.dtype, mask.device)

    def shared_prefix_len(self, shared_prefix: int, eot: torch.Tensor, causal: bool) -> int:
        """How many leading positions a text pass may share: `shared_prefix`, at most up to the earliest EOT (the
        pooled token stays in every row's suffix); 0 when the tower or the settings do not allow it."""
        if shared_prefix <= 1 or not (causal and self.prefix_sharing and self.fused_attention):
            return 0
        if not all(self._text_fusable):
            return 0
        return min(shared_prefix, int(eot.min()))

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
        shared_prefix: int = 0,
        prefix_index: torch.Tensor | None = None,
        block_branch: BlockBranch | None = None,
        eot_offset: int = 0,
    ) -> torch.Tensor:
        """Text features (N, E), unnormalised, from token embeddings (N, L, Dt) whose prompt slots are filled.

        ``shared_prefix=P``: the caller states that positions 0 … P−1 of ``token_embeds`` are the same in every row
        (in every row of a group, with ``prefix_index`` (N,) giving each row's group 0 … G−1; a group's prefix is
        read off its first row); they are then encoded once per group. ``layer_fn`` then receives only the shared
        positions, (G, P, Dt), and returns them in that shape (deep prompts that replace prefix slots) or longer
        (tokens inserted into the prefix, which shift the EOT by as many positions).

        ``block_branch(i, h)``: a per-position residual branch of block i on h = ln_1(block input), added to the
        block's output (None: none at that block). ``eot_offset``: positions the ``layer_fn`` inserts before the EOT
        over the whole pass (the EOT is read at ``eot + eot_offset``); with a shared prefix it must equal the prefix's
        growth (ValueError otherwise: the claim and the callback disagree).
        """
        x, mask, eot = self.text_embed(token_embeds, tokens, truncate)
        p = self.shared_prefix_len(shared_prefix, eot, mask is not None)
        if p:
            prefix, suffix, index = self.split_prefix(x, p, prefix_index)
            smask = blocks.suffix_mask(p, suffix.shape[1], x.device)
            for i in range(self.text_layers):
                if layer_fn is not None:
                    prefix = self._prefix_fn(layer_fn, i, prefix)
                    if prefix.shape[1] != smask.shape[1] - suffix.shape[1]:  # the prefix grew: the suffix sees it all
                        smask = blocks.suffix_mask(prefix.shape[1], suffix.shape[1], x.device)
                prefix, suffix = blocks.split_block_forward(
                    self.text.transformer.resblocks[i], prefix, suffix, index, smask, _branch_at(block_branch, i)
                )
            self._check_growth(prefix.shape[1] - p, eot_offset)
            return self.text_head(suffix, eot - p)  # suffix positions never move: the EOT's stays eot − P
        for i in range(self.text_layers):
            if layer_fn is not None:
                x = layer_fn(i, x)
                mask = self.text_mask(mask, x.shape[1])
            x = self.text_block(i, x, mask, _branch_at(block_branch, i))
        return self.text_head(x, eot + eot_offset)

    @staticmethod
    def _check_growth(grown: int, eot_offset: int) -> None:
        if grown != eot_offset:
            raise ValueError(
                f"the layer_fn grew the shared prefix by {grown} positions but eot_offset={eot_offset}: the EOT moves "
                "by what is inserted before it"
            )

    @staticmethod
    def split_prefix(
        x: torch.Tensor, p: int, prefix_index: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """x (N, T, D) -> shared prefix (G, P, D) from each group's first row, suffix (N, T−P, D), row -> group.

        Raises ValueError when a row's prefix differs from its group's (a caller bug: sharing would be inexact)."""
        n = x.shape[0]
        if prefix_index is None:
            prefix = x[:1, :p]  # (1, P, D)
            expected = prefix.expand(n, -1, -1)
        else:
            groups = int(prefix_index.max()) + 1
            rows = torch.arange(n, device=x.device)
            first = torch.full((groups,), n, device=x.device, dtype=rows.dtype)
            first = first.scatter_reduce(0, prefix_index, rows, "amin")  # (G,) first row of every group
            if bool((first == n).any()):
                raise ValueError("prefix_index must name every group 0 … G−1")
            prefix = x[first, :p]  # (G, P, D)
            expected = prefix[prefix_index]
        with torch.no_grad():
            if not torch.equal(x[:, :p], expected):
                raise ValueError(f"shared_prefix={p}: the first {p} positions differ between rows of one group")
        return prefix, x[:, p:], prefix_index

    @staticmethod
    def _prefix_fn(layer_fn: Callable[..., torch.Tensor], i: int, prefix: torch.Tensor) -> torch.Tensor:
        out = layer_fn(i, prefix)
        Backbone._check_prefix(prefix.shape, out.shape)
        return out

    @staticmethod
    def _check_prefix(before: torch.Size, after: torch.Size) -> None:
        """A layer_fn on a shared prefix (G, P, D) keeps its groups and width and may only grow it."""
        if len(after) != 3 or after[0] != before[0] or after[2] != before[2] or after[1] < before[1]:
            raise ValueError(
                f"a layer_fn on a shared prefix must keep its shape {tuple(before)} or insert positions into it "
                f"(G and D unchanged), got {tuple(after)}"
            )

    def encode_text_chunked(
        self,
        token_embeds: torch.Tensor,
        tokens: torch.Tensor,
        chunk: int,
        layer_fn: TextLayerFn | None = None,
        shared_prefix: int = 0,
        block_branch: BlockBranch | None = None,
        eot_offset: int = 0,
    ) -> torch.Tensor:
        """`encode_text` over row chunks of at most `chunk` sequences (bounds activation memory)."""
        kw = {"shared_prefix": shared_prefix, "block_branch": block_branch, "eot_offset": eot_offset}
        if chunk <= 0 or token_embeds.shape[0] <= chunk:
            return self.encode_text(token_embeds, tokens, layer_fn, **kw)
        outs = [
            self.encode_text(token_embeds[s : s + chunk], tokens[s : s + chunk], layer_fn, **kw)
            for s in range(0, token_embeds.shape[0], chunk)
        ]
        return torch.cat(outs)

    @torch.no_grad()
    def encode_text_states(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Frozen text pass over token ids (N, L): features (N, E) unnormalised, the final-layer token states after
        the final LayerNorm (N, T, Dt; T = longest EOT + 1 under EOT truncation) and the EOT positions (N,).

        The per-token states are what MuGCP's semantic tokens S are built from (docs/methods/mugcp.md)."""
        x, mask, eot = self.text_embed(self.embed_tokens(tokens), tokens)  # (N, T, Dt)
        for i in range(self.text_layers):
            x = self.text_block(i, x, mask)
        return self.text_head(x, eot), self.text.ln_final(x), eot

    # --- both towers ---------------------------------------------------------------------------------------------
    def encode_joint(
        self,
        images: torch.Tensor,
        token_embeds: torch.Tensor,
        tokens: torch.Tensor,
        layer_fn: JointLayerFn,
        vision_prompts: torch.Tensor | None = None,
        layer_map: Sequence[int] | None = None,
        shared_prefix: int = 0,
        prefix_index: torch.Tensor | None = None,
        vision_branch: BlockBranch | None = None,
        text_branch: BlockBranch | None = None,
        eot_offset: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Step both towers together; ``layer_fn(i, xv, xt)`` runs before joint block ``i``.

        Returns image features (B, E) and text features (N, E), unnormalised. Towers of different depth need a
        ``layer_map`` (vision block index for each text block); without one the depths must match.
        ``shared_prefix`` / ``prefix_index`` as in `encode_text`: ``layer_fn`` then gets the shared text positions
        (G, P, Dt) as ``xt`` and returns them in that shape or longer. ``vision_branch(vi, h)`` and
        ``text_branch(ti, h)``: residual branches of each tower's blocks (by the tower's own block index);
        ``eot_offset`` as in `encode_text`.
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
        p = self.shared_prefix_len(shared_prefix, eot, mask is not None)
        if p:  # xt is the shared prefix (G, P, Dt) from here on, suffix the per-row rest
            xt, suffix, index = self.split_prefix(xt, p, prefix_index)
            smask = blocks.suffix_mask(p, suffix.shape[1], xt.device)
        vi = 0
        for ti, target in enumerate(layer_map):
            while vi < target:  # vision blocks not paired with a text block
                xv = self.vision_block(vi, xv, _branch_at(vision_branch, vi))
                vi += 1
            shape = xt.shape
            xv, xt = layer_fn(ti, xv, xt)
            if p:
                self._check_prefix(shape, xt.shape)
                if xt.shape[1] != shape[1]:  # the prefix grew: the suffix sees it all
                    smask = blocks.suffix_mask(xt.shape[1], suffix.shape[1], xt.device)
            else:
                mask = self.text_mask(mask, xt.shape[1])
            xv = self.vision_block(vi, xv, _branch_at(vision_branch, vi))
            vi += 1
            if p:
                xt, suffix = blocks.split_block_forward(
                    self.text.transformer.resblocks[ti], xt, suffix, index, smask, _branch_at(text_branch, ti)
                )
            else:
                xt = self.text_block(ti, xt, mask, _branch_at(text_branch, ti))
        while vi < self.vision_layers:
            xv = self.vision_block(vi, xv, _branch_at(vision_branch, vi))
            vi += 1
        if p:
            self._check_growth(xt.shape[1] - p, eot_offset)
            return self.vision_head(xv), self.text_head(suffix, eot - p)
        return self.vision_head(xv), self.text_head(xt, eot + eot_offset)

    # --- convenience ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def text_features(self, texts: Sequence[str], normalize: bool = True) -> torch.Tensor:
        """Features of plain texts (N, E)."""
        tokens = self.tokenize(texts)
        f = self.encode_text(self.embed_tokens(tokens), tokens)
        return F.normalize(f, dim=-1) if normalize else f


# --- loading ---------------------------------------------------------------------------------------------------------
# Weight precisions of a backbone. "fp32": every weight fp32 (on CUDA the trainer's autocast picks the activation
# precision). "reference-fp16": the reference code's regime (docs/protocol.md §4.5): CLIP's builder converts Conv,
# Linear and attention weights and the two projections to fp16 while LayerNorm keeps fp32 weights and computes in fp32
# (KaiyangZhou/CoOp clip/model.py: convert_weights, LayerNorm); embeddings and logit_scale stay fp32. open_clip builds
# exactly that for precision="fp16" (factory._set_model_device_and_precision: convert_weights_to_lp, LayerNormFp32).
REFERENCE_FP16 = "reference-fp16"
WEIGHT_PRECISIONS = ("fp32", REFERENCE_FP16)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast for bf16 / fp16 on CUDA; none for fp32 and reference-fp16 (whose weights carry their dtypes)."""
    if precision in ("fp32", REFERENCE_FP16) or device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


HF_HUB_PREFIX = "hf-hub:"  # open_clip's form for a model (config + weights) in a Hugging Face Hub repo
# Words in a checkpoint's file name or metadata that suggest OpenAI's (QuickGELU-trained) weights.
OPENAI_HINTS = ("openai",)


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


def architecture_quick_gelu(name: str) -> bool:
    """Whether open_clip's config of architecture `name` builds QuickGELU (the `-quickgelu` configs do)."""
    return bool((open_clip.get_model_config(name) or {}).get("quick_gelu", False))


def tag_quick_gelu(name: str, tag: str) -> bool:
    """Whether pretrained tag `tag` of `name` was trained with QuickGELU: what the tag's config says.

    open_clip 3.x builds the *architecture's* activation whatever the tag and only warns on a mismatch
    (factory.create_model, after the force overrides), so `ViT-B-16` + `openai` silently runs plain GELU. Every tag
    trained with QuickGELU (OpenAI, MetaCLIP, DFN, the early LAION-400M B/32, ...) states ``quick_gelu=True``. A tag
    that states nothing keeps its architecture's activation (roberta-ViT-B-32 / laion2b_s12b_b32k is the one case
    whose architecture config sets QuickGELU).
    """
    cfg = open_clip.get_pretrained_cfg(name, tag)
    if "quick_gelu" in cfg:
        return bool(cfg["quick_gelu"])
    return architecture_quick_gelu(name)


def hub_quick_gelu(repo: str, model_cfg: dict) -> bool:
    """Whether the model of Hugging Face repo `repo` was trained with QuickGELU: its `open_clip_config.json` says so,
    or open_clip serves a pretrained tag from that repo whose config says so."""
    if model_cfg.get("quick_gelu"):
        return True
    for arch, tag in open_clip.list_pretrained():
        cfg = open_clip.get_pretrained_cfg(arch, tag)
        if os.path.split(cfg.get("hf_hub", ""))[0] == repo and cfg.get("quick_gelu"):
            return True
    return False


def _build(name: str, quick_gelu: bool, precision: str) -> nn.Module:
    """Architecture `name`, randomly initialised, with the activation set explicitly and weights in `precision`.

    Never hands open_clip a tag: weights are loaded afterwards from a file, so open_clip has nothing to compare and
    no QuickGELU mismatch warning can arise."""
    if precision not in WEIGHT_PRECISIONS:
        raise UserError(f"unknown backbone precision '{precision}'; use one of {', '.join(WEIGHT_PRECISIONS)}")
    return open_clip.create_model(
        name, pretrained=None, quick_gelu=quick_gelu, precision="fp16" if precision == REFERENCE_FP16 else "fp32"
    )


def _read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], bool, str]:
    """Load a checkpoint file (TorchScript, torch.save'd dict, safetensors).

    Returns (state dict, is_openai_format, metadata text): the text joins the file's non-tensor entries (or its
    safetensors metadata) for hints about where the weights come from.
    """
    is_jit = False
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            is_jit = any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())
    meta = ""
    try:
        if is_jit:  # OpenAI's released .pt files are TorchScript archives
            sd = torch.jit.load(str(path), map_location="cpu").state_dict()
        elif path.suffix == ".safetensors":  # open_clip's format on the Hugging Face Hub
            from safetensors import safe_open
            from safetensors.torch import load_file

            with safe_open(str(path), framework="pt") as f:
                meta = " ".join(f"{k}={v}" for k, v in (f.metadata() or {}).items())
            sd = load_file(str(path), device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a user error
        raise UserError(f"cannot read checkpoint '{path}': {type(e).__name__}: {str(e).splitlines()[0]}") from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        meta = " ".join(f"{k}={v}" for k, v in sd.items() if isinstance(v, (str, int, float)))
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise UserError(f"checkpoint '{path}' does not hold a state dict")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    is_openai = is_jit or any(k in sd for k in OPENAI_EXTRA_KEYS)
    return sd, is_openai, meta


def _load_state(model: nn.Module, sd: dict[str, torch.Tensor], source: str, name: str) -> nn.Module:
    """Copy `sd` into `model` (cast to each parameter's dtype); a mismatch is a UserError naming the keys."""
    sd = {k: v for k, v in sd.items() if k not in OPENAI_EXTRA_KEYS}
    sd = {k: v for k, v in sd.items() if k != "attn_mask" and not k.endswith("position_ids")}
    if "logit_scale" in sd and sd["logit_scale"].ndim != model.logit_scale.ndim:  # as open_clip's load_checkpoint
        sd["logit_scale"] = sd["logit_scale"].reshape(model.logit_scale.shape)
    problem = state_mismatch(model.state_dict(), sd)
    if problem:
        fix = "pass the --backbone these weights were trained as"
        raise StateMismatch(f"checkpoint '{source}' does not fit backbone '{name}': {problem}; {fix}", problem)
    model.load_state_dict(sd)
    return model


def _load_file(name: str, path: Path, precision: str = "fp32") -> nn.Module:
    sd, is_openai, meta = _read_state_dict(path)
    # OpenAI's CLIP uses QuickGELU: a file in OpenAI's format is built with it whatever the architecture config says.
    # An open_clip-format file carries no activation marker: the architecture decides (`-quickgelu` for QuickGELU).
    quick = is_openai or architecture_quick_gelu(name)
    if is_openai and not architecture_quick_gelu(name):
        log.info("'%s' is in OpenAI's format: building '%s' with QuickGELU", path, name)
    hinted = [w for w in OPENAI_HINTS if w in f"{path} {meta}".lower()]
    if not quick and hinted:
        twin = f"{name}-quickgelu"
        fix = f"pass --backbone {twin}" if twin in open_clip.list_models() else "use an architecture with quick_gelu"
        log.warning(
            "'%s' mentions '%s' but has no OpenAI-format marker, so '%s' is built with GELU; if these weights were "
            "trained with QuickGELU (OpenAI, MetaCLIP, DFN), %s",
            path,
            hinted[0],
            name,
            fix,
        )
    return _load_state(_build(name, quick, precision), sd, str(path), name)


def _hub_file(repo: str, filename: str | None, cache_dir: str | None, what: str) -> str:
    """A file of Hugging Face repo `repo` (the cache only when offline); UserError when it cannot be had."""
    from open_clip.pretrained import download_pretrained_from_hf

    try:
        return download_pretrained_from_hf(repo, filename=filename, cache_dir=cache_dir)
    except Exception as e:  # noqa: BLE001 - offline misses and network errors alike
        if _is_offline():
            raise UserError(
                f"{what} are not in the local Hugging Face cache and HF_HUB_OFFLINE is set: pass --pretrained PATH "
                "to a checkpoint file, or go online once to download them"
            ) from None
        raise UserError(
            f"could not fetch {what} from the Hugging Face Hub ({type(e).__name__}); check the network or pass "
            "--pretrained PATH to a checkpoint file"
        ) from e


def _load_tag(name: str, tag: str, cache_dir: str | None, precision: str = "fp32") -> nn.Module:
    tags = open_clip.list_pretrained_tags_by_model(name)
    if not tags and name in BACKBONES:  # a packaged test configuration (tiny, toy-clip): no published weights
        raise UserError(
            f"'{name}' is a packaged configuration without published weights: pass --pretrained random (random init: "
            "smoke-tests the real-data path in seconds) or --pretrained PATH to a checkpoint file"
        )
    if tag not in tags:
        raise UserError(
            f"'{tag}' is neither a file nor a pretrained tag of '{name}'.{suggest(tag, tags)} "
            f"Tags: {', '.join(tags) or 'none'}; or pass --pretrained PATH to a checkpoint file."
        )
    cfg = open_clip.get_pretrained_cfg(name, tag)
    what = f"weights '{name}' / '{tag}'"
    if cfg.get("hf_hub"):  # every open_clip 3.x tag: 'org/repo/' (default file name) or 'org/repo/file'
        repo, filename = os.path.split(cfg["hf_hub"])
        path = _hub_file(repo, filename or None, cache_dir, what)
    else:  # a URL only (older open_clip tables); open_clip keeps it in ~/.cache/clip
        target = Path(cache_dir or os.path.expanduser("~/.cache/clip")) / os.path.basename(cfg.get("url", ""))
        if _is_offline() and not target.is_file():
            raise UserError(
                f"{what} are not in the local cache and HF_HUB_OFFLINE is set: pass --pretrained PATH to a "
                "checkpoint file, or go online once to download them"
            )
        try:
            path = open_clip.download_pretrained(cfg, cache_dir=cache_dir)
        except Exception as e:  # noqa: BLE001
            raise UserError(
                f"could not fetch {what} ({type(e).__name__}); pass --pretrained PATH or check network"
            ) from e
    sd, _, _ = _read_state_dict(Path(path))
    return _load_state(_build(name, tag_quick_gelu(name, tag), precision), sd, f"{name} / {tag} ({path})", name)


def _comparable_config(cfg: dict) -> dict:
    """A model config with open_clip's defaults filled in and the activation left out (compared separately)."""
    import dataclasses
    import inspect

    out = {k: v for k, v in cfg.items() if k != "quick_gelu"}
    for key, fields_of in (("vision_cfg", open_clip.CLIPVisionCfg), ("text_cfg", open_clip.CLIPTextCfg)):
        defaults = {f.name: f.default for f in dataclasses.fields(fields_of) if f.default is not dataclasses.MISSING}
        out[key] = {**defaults, **out.get(key, {})}
    params = inspect.signature(open_clip.CLIP.__init__).parameters.values()
    top = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty and p.name != "quick_gelu"}
    return json.loads(json.dumps({"custom_text": False, **top, **out}, default=str))


def _config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Keys whose values differ between two nested model configs."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out.extend(_config_diff(va, vb, f"{prefix}{k}."))
        elif va != vb:
            out.append(f"{prefix}{k} ({va} vs {vb})")
    return out


def _load_hub(name: str, repo: str, cache_dir: str | None, precision: str = "fp32") -> tuple[nn.Module, Preprocess]:
    """`hf-hub:ORG/NAME`: open_clip's config (`open_clip_config.json`) and weights from a Hub repo.

    The repo's architecture must be `name`'s (the run key and every report name the architecture); the activation
    comes from the repo's config or the open_clip tag served from that repo (`hub_quick_gelu`).
    """
    what = f"weights '{HF_HUB_PREFIX}{repo}'"
    config_path = _hub_file(repo, "open_clip_config.json", cache_dir, what)
    try:
        model_cfg = json.loads(Path(config_path).read_text())["model_cfg"]
        theirs = _comparable_config(model_cfg)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"'{config_path}' of '{repo}' is not an open_clip config with a 'model_cfg' ({e})") from None
    diff = _config_diff(_comparable_config(open_clip.get_model_config(name) or {}), theirs)
    if diff:
        same = [
            m
            for m in open_clip.list_models()
            if not _config_diff(_comparable_config(open_clip.get_model_config(m)), theirs)
        ]
        hint = f"pass --backbone {same[0]}" if same else "it matches no open_clip architecture"
        raise UserError(f"'{HF_HUB_PREFIX}{repo}' is not a '{name}' model (differs in {', '.join(diff[:3])}); {hint}")
    path = _hub_file(repo, None, cache_dir, what)
    sd, _, _ = _read_state_dict(Path(path))
    model = _build(name, hub_quick_gelu(repo, model_cfg), precision)
    preprocess = Preprocess.from_cfg(json.loads(Path(config_path).read_text()).get("preprocess_cfg"))
    return _load_state(model, sd, f"{HF_HUB_PREFIX}{repo} ({path})", name), preprocess


def _sidecar_preprocess(path: Path) -> Preprocess:
    """A checkpoint file's preprocessing: the `preprocess_cfg` of an `open_clip_config.json` beside it (how open_clip
    and the Hub store a model: a downloaded repo folder keeps it), else CLIP's."""
    sidecar = path.parent / "open_clip_config.json"
    if not sidecar.is_file():
        return CLIP_PREPROCESS
    try:
        cfg = json.loads(sidecar.read_text()).get("preprocess_cfg")
    except (OSError, ValueError, AttributeError) as e:
        raise UserError(f"'{sidecar}' beside --pretrained '{path}' is not an open_clip config ({e})") from None
    log.info("image preprocessing of '%s' from %s", path, sidecar)
    return Preprocess.from_cfg(cfg)


def load_backbone(
    name: str = "tiny",
    pretrained: str | None = None,
    device: str | torch.device = "cpu",
    cache_dir: str | None = None,
    seed: int = 0,
    precision: str = "fp32",
) -> Backbone:
    """Build a frozen backbone from an open_clip architecture name and `pretrained`.

    `pretrained`: None / "" / "random" (deterministic random init from `seed`), an open_clip tag ("openai",
    "laion2b_s34b_b88k", ...; built with the activation the tag was trained with), ``hf-hub:ORG/NAME`` (config and
    weights from a Hugging Face Hub repo; offline from the local cache), an open_clip checkpoint file, or an
    OpenAI-format state dict (.pt, JIT or plain; built with QuickGELU). `precision`: "fp32" or "reference-fp16"
    (the reference code's fp16 weights, see `REFERENCE_FP16`).
    """
    _check_name(name)
    preprocess = CLIP_PREPROCESS  # random weights and files: CLIP's (OpenAI's) preprocessing
    if not pretrained or pretrained == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _build(name, architecture_quick_gelu(name), precision)
        pretrained = "random"
    elif pretrained.startswith(HF_HUB_PREFIX):
        repo = pretrained.removeprefix(HF_HUB_PREFIX).strip("/")
        if repo.count("/") != 1:
            raise UserError(f"--pretrained '{pretrained}': expected {HF_HUB_PREFIX}ORG/NAME")
        model, preprocess = _load_hub(name, repo, cache_dir, precision)
        pretrained = f"{HF_HUB_PREFIX}{repo}"
    elif os.path.isfile(pretrained):
        model = _load_file(name, Path(pretrained), precision)
        preprocess = _sidecar_preprocess(Path(pretrained))
        pretrained = str(Path(pretrained).resolve())
    elif os.path.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")):
        raise UserError(f"checkpoint file '{pretrained}' does not exist; pass --pretrained PATH to an existing file")
    else:
        model = _load_tag(name, pretrained, cache_dir, precision)
        preprocess = Preprocess.from_cfg(open_clip.get_pretrained_cfg(name, pretrained))  # flat: mean, std, ...
    tokenizer = open_clip.get_tokenizer(name)
    vocab = getattr(tokenizer, "vocab_size", None)
    if vocab is not None and vocab < 1000:  # tokenizers can load empty offline without raising
        raise UserError(f"the tokenizer of '{name}' loaded with {vocab} entries; its vocabulary files are missing")
    return Backbone(model, name, pretrained, tokenizer, preprocess).to(device)


def list_backbones() -> list[str]:
    """Packaged configs first, then every open_clip architecture."""
    packaged = BACKBONES.names()
    return packaged + sorted(m for m in open_clip.list_models() if m not in packaged)
