"""MMA: Multi-Modal Adapter, bottleneck adapters inside the higher blocks of both towers joined by a shared layer
(docs/methods/mma.md §14).

Matched against ZjjConan/Multi-Modal-Adapter @ 547ee34:
- ``trainers/mmadapter.py`` (AdapterLearner, CustomCLIP, MultiModalAdapter): one adapter per tower and per slot
  ADAPTER_START … ADAPTER_END (inclusive): ``down`` = Linear(d, 32) + ReLU, ``up`` = Linear(32, d), and one
  ``shared_adapter`` Linear(32, 32) + ReLU per slot used by both towers (``_build_adapter``, lines 113-137); every
  Linear weight kaiming-normal (fan_out, relu), every bias 0; fixed prompts TEXT_CTX_INIT + " " + name + "." (lines
  98-110); logits ``logit_scale.exp()`` × cosine (lines 184-207); plain cross-entropy; only the adapters train.
- ``clip/model.py`` (ModifiedResidualAttentionBlock, Transformer): blocks are numbered ``index + 1``, so slots 5 … 12
  of the config are 0-based blocks 4 … 11; the branch ``GSL(up(shared(down(ln_1(GSL(x, s))))) · s, 1 / s)`` reads the
  block's own ln_1 of its input and is added after the MLP residual (lines 188-215).
- ``clip/gsl.py``: the gradient scale layer, identity forward, gradient × scale backward. With s = 0.001 the adapter
  parameters get 1000× the gradient of the forward they compute, the residual stream its exact gradient.
- ``configs/trainers/MultiModalAdapter/vit_b16_ep5{,_imnet}.yaml`` (SGD 0.0015, 5 epochs, batch 16 / ImageNet 128,
  no warm-up, START 5, END 12, DIM 32, SCALE 0.001, PREC amp).

The adapters act on every token through `Backbone`'s block branch (`block_branch(i, h)`, h = ln_1 of the block input):
per position, so the shared text prefix and the EOT cut stay exact. The first gradient scale layer sits after ln_1
here (before it in the reference): ln_1's backward is linear in its incoming gradient, so the result is the same.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mugcp_bench.errors import UserError
from mugcp_bench.methods.base import TOY_TRAIN, Provenance, SharedTextMethod
from mugcp_bench.methods.prompts import ClassPrompts
from mugcp_bench.model.backbone import Backbone
from mugcp_bench.registry import METHODS

log = logging.getLogger(__name__)

REPO = "ZjjConan/Multi-Modal-Adapter"
COMMIT = "547ee345a4dc5d60d43d3aa54e8eee50a107f591"
CONFIG = "configs/trainers/MultiModalAdapter/vit_b16_ep5.yaml"
CONFIG_IMAGENET = "configs/trainers/MultiModalAdapter/vit_b16_ep5_imnet.yaml"
PAPER_BLOCKS = (4, 5, 6, 7, 8, 9, 10, 11)  # ADAPTER_START 5 … ADAPTER_END 12, 1-based (clip/model.py:224)
XD_BLOCKS = (8, 9, 10, 11)  # "k = 9" (1-based) of the paper's cross-dataset setting, as quoted in the issue below


def reference_config(shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """adapter_blocks and adapter_dim read off an ``adapter_learner`` file: the reference's adapter slot s (1-based,
    ``_build_adapter``'s ModuleList index) is our 0-based block s − 1; slot 0 (the token-embedding adapter of
    ADAPTER_START 0) is no block of ours and stays an unknown tensor. KeyError when a slot has no ``down`` layer
    (ADAPTER_DIM equal to the width builds Linear + ReLU only: no counterpart here)."""
    slots = sorted(
        {int(k.split(".")[1]) for k in shapes if k.startswith("text_adapter.") and k.split(".")[1].isdigit()}
    )
    slots = [s for s in slots if s > 0]
    if not slots:
        raise KeyError("text_adapter.<slot>.down.0.weight")
    return {
        "adapter_blocks": tuple(s - 1 for s in slots),
        "adapter_dim": int(shapes[f"text_adapter.{slots[0]}.down.0.weight"][0]),
    }


class GradScale(torch.autograd.Function):
    """Identity in the forward; the backward multiplies the gradient by `scale` (clip/gsl.py GradientScaleLayer)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


def grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    return GradScale.apply(x, scale)


@dataclass
class MMAConfig:
    # 0-based block indices holding an adapter in both towers (the reference's 1-based slots 5 … 12)
    adapter_blocks: tuple[int, ...] = PAPER_BLOCKS
    adapter_dim: int = field(default=32, metadata={"range": (1, None, True, False)})  # ADAPTER_DIM
    adapter_scale: float = field(default=0.001, metadata={"range": (0, None, False, False)})  # ADAPTER_SCALE
    shared: bool = True  # the shared adapter_dim → adapter_dim layer + ReLU of each block, used by both towers
    ctx_init: str = "a photo of a"  # TEXT_CTX_INIT: every class prompt is "<ctx_init> <class>." whatever the dataset


class TowerAdapter(nn.Module):
    """``down`` = Linear(width, dim) + ReLU, ``up`` = Linear(dim, width): the reference's slot module, same names."""

    def __init__(self, width: int, dim: int) -> None:
        super().__init__()
        self.down = nn.Sequential(nn.Linear(width, dim), nn.ReLU())
        self.up = nn.Linear(dim, width)


def _kaiming(module: nn.Module) -> None:
    """Every Linear: kaiming-normal weight (fan_out, relu), zero bias (trainers/mmadapter.py:128-131)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)


_COMMON = {"adapter_dim": 32, "adapter_scale": 0.001, "shared": True, "ctx_init": "a photo of a"}
_OPT = {"optimizer": "sgd", "lr": 0.0015, "warmup_epochs": 0, "eval_batch_size": 100}
_TOY = {**TOY_TRAIN, **_COMMON, "adapter_blocks": (1, 2, 3), **_OPT}


@METHODS.register("mma")
class MMA(SharedTextMethod):
    """Multi-Modal Adapter (Yang et al., CVPR 2024): adapters in the higher blocks of both towers, a shared layer."""

    name = "mma"
    report_order = 650
    color = "#393b79"
    in_default_set = False
    Config = MMAConfig
    # reference-fp16 (PREC fp16): the adapters are .half()'d with CLIP (mmadapter.py:133-135); nothing stays fp32
    reference_fp32 = ()
    recipes = {
        "paper": {
            # vit_b16_ep5 (ImageNet: vit_b16_ep5_imnet, batch 128, in `recipe`)
            "base2novel": {**_COMMON, "adapter_blocks": PAPER_BLOCKS, **_OPT, "batch_size": 16, "epochs": 5},
            # no released config (issue ZjjConan/VLM-MultiModalAdapter#3 quotes the paper: k = 9, one epoch); ours:
            # blocks 8 … 11, 1 epoch, the ImageNet config's batch 128 and LR
            "xd": {**_COMMON, "adapter_blocks": XD_BLOCKS, **_OPT, "batch_size": 128, "epochs": 1},
            # no few-shot config or script in the repository: no few_shot paper recipe
        },
        # Toy world (our design): the last three of the toy CLIP's four blocks, the paper's optimisation
        "toy": {
            "base2novel": {**_TOY, "batch_size": 16, "epochs": 5},
            "xd": {**_TOY, "batch_size": 16, "epochs": 2},
            "few_shot": {**_TOY, "batch_size": 16, "epochs": 5},
        },
    }
    provenance = {
        "paper": Provenance(
            REPO,
            COMMIT,
            {"base2novel": CONFIG, "xd": CONFIG_IMAGENET},
            "base2novel: vit_b16_ep5 (ImageNet: vit_b16_ep5_imnet, batch 128). xd: no config is released (the "
            "repository's xd_train.sh takes one as an argument); ours: the paper's k = 9 and one epoch as quoted in "
            "ZjjConan/VLM-MultiModalAdapter#3 (0-based blocks 8 … 11) with the ImageNet config's batch 128 and "
            "LR 0.0015. No few-shot config: no few_shot recipe.",
        ),
    }
    # no-shared: each tower's down → up without the shared layer (our ablation of the shared projection)
    ablations = {"shared": {"shared": False}}
    # trainers/mmadapter.py registers the AdapterLearner as "adapter_learner" (MultiModalAdapter.build_model): the
    # buffers token_embedding (C, 77, D) and tokenized_prompts (C, 77) its load_model deletes, then
    # {text,visual,shared}_adapter.<slot>.* with 1-based slots ADAPTER_START … ADAPTER_END (docs/interop.md §3).
    reference_checkpoint = dict(
        trainer="MultiModalAdapter",
        learner="adapter_learner",
        keys={
            "text_adapter.{i}.*": "text_adapter.{i+1}.*",
            "visual_adapter.{i}.*": "visual_adapter.{i+1}.*",
            "shared_adapter.{i}.*": "shared_adapter.{i+1}.*",
        },
        deleted_buffers=("token_embedding", "tokenized_prompts"),
        config=reference_config,
        requires={"shared": True},
        options={
            "adapter_dim": "TRAINER.MMADAPTER.ADAPTER_DIM",
            "adapter_scale": "TRAINER.MMADAPTER.ADAPTER_SCALE",
            "ctx_init": "TRAINER.MMADAPTER.TEXT_CTX_INIT",
        },
        note="ADAPTER_START / ADAPTER_END are the run's first / last adapter_blocks + 1 (1-based); the reference "
        "adapts every block between them, so a run with gaps in adapter_blocks does not load there",
        repo="ZjjConan/Multi-Modal-Adapter@547ee34",
    )

    def __init__(
        self,
        backbone: Backbone,
        classnames: Sequence[str],
        cfg: MMAConfig,
        template: str = "a photo of a {}.",
        dataset: str = "",
    ) -> None:
        super().__init__(backbone, classnames, cfg, template, dataset)
        self.blocks = self._check_blocks(backbone, cfg.adapter_blocks)
        self.scale = float(cfg.adapter_scale)
        if not self.scale > 0:
            raise UserError(
                f"mma: adapter_scale must be positive (the gradients are scaled by 1 / it), got {self.scale}"
            )
        dim = int(cfg.adapter_dim)
        # Built in the reference's order (text, visual, shared; slots in order) and initialised by module order.
        self.text_adapter = nn.ModuleDict({str(i): TowerAdapter(backbone.text_width, dim) for i in self.blocks})
        _kaiming(self.text_adapter)
        self.visual_adapter = nn.ModuleDict({str(i): TowerAdapter(backbone.vision_width, dim) for i in self.blocks})
        _kaiming(self.visual_adapter)
        if cfg.shared:
            self.shared_adapter = nn.ModuleDict(
                {str(i): nn.Sequential(nn.Linear(dim, dim), nn.ReLU()) for i in self.blocks}
            )
            _kaiming(self.shared_adapter)
        self.prompts = ClassPrompts(backbone, self.classnames, 0, cfg.ctx_init)

    @staticmethod
    def _check_blocks(backbone: Backbone, blocks: Sequence[int]) -> tuple[int, ...]:
        depth = min(backbone.vision_layers, backbone.text_layers)
        out = tuple(int(b) for b in blocks)
        if not out or len(set(out)) != len(out) or not all(0 <= b < depth for b in out):
            raise UserError(
                f"mma: adapter_blocks must be distinct block indices in 0 … {depth - 1} for '{backbone.name}' "
                f"({depth} blocks per tower), got {','.join(map(str, out)) or 'none'}; e.g. --set "
                f"mma.adapter_blocks={','.join(map(str, range(max(0, depth - 3), depth)))}"
            )
        return tuple(sorted(out))

    def set_classnames(self, classnames: Sequence[str], template: str | None = None, dataset: str | None = None):
        super().set_classnames(classnames, template, dataset)
        device = next(self.parameters()).device
        self.prompts = ClassPrompts(self.backbone, self.classnames, 0, self.cfg.ctx_init).to(device)
        self.refresh_eval()

    # --- the branch -----------------------------------------------------------------------------------------------
    def _branch(self, tower: nn.ModuleDict, i: int, h: torch.Tensor) -> torch.Tensor | None:
        """The adapter of block `i` on h = ln_1(block input) (N, T, D), or None at blocks without one."""
        key = str(i)
        if key not in tower:
            return None
        adapter = tower[key]
        y = adapter.down(grad_scale(h, self.scale))  # (N, T, dim); the gradient into the stream × s
        if self.cfg.shared:
            y = self.shared_adapter[key](y)  # (N, T, dim)
        y = adapter.up(y) * self.scale  # (N, T, D)
        return grad_scale(y, 1.0 / self.scale)  # the adapters' gradients × 1 / s

    def text_branch(self, i: int, h: torch.Tensor) -> torch.Tensor | None:
        return self._branch(self.text_adapter, i, h)

    def vision_branch(self, i: int, h: torch.Tensor) -> torch.Tensor | None:
        return self._branch(self.visual_adapter, i, h)

    # --- towers ---------------------------------------------------------------------------------------------------
    def text_features(self) -> torch.Tensor:
        """Adapted class text features (C, E), unnormalised, of the fixed prompts; all positions adapted."""
        embeds = self.prompts.build(self.prompts.token_suffix.new_zeros(0, self.backbone.text_width))  # (C, T, Dt)
        return self.backbone.encode_text(
            embeds.to(self.backbone.dtype),
            self.prompts.tokens,
            shared_prefix=self.prompts.shared_len,
            block_branch=self.text_branch,
        )  # (C, E)

    def image_features(self, images: torch.Tensor | None, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Adapted image features (B, E), unnormalised (CLS and every patch token adapted)."""
        if images is None:
            raise ValueError("mma adapts the image tower: it needs images, not cached image features")
        return self.backbone.encode_image(images, block_branch=self.vision_branch)  # (B, E)

    # --- recipes --------------------------------------------------------------------------------------------------
    @classmethod
    def recipe(cls, recipe: str, train_protocol: str, shots: int, dataset: str) -> dict[str, Any]:
        """ImageNet trains with batch 128 (vit_b16_ep5_imnet, run_examples.sh)."""
        out = super().recipe(recipe, train_protocol, shots, dataset)
        if recipe == "paper" and train_protocol == "base2novel" and dataset == "imagenet":
            out["batch_size"] = 128
        return out


__all__ = ["MMA", "MMAConfig", "GradScale", "grad_scale"]
