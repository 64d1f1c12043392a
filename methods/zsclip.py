"""Zero-shot CLIP: one hand-written template per dataset, or the template ensemble (docs/methods/zsclip.md §1)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mugcp_bench.methods.base import Method, MethodOutput, cosine_logits
from mugcp_bench.methods.prompts import clean_classname
from mugcp_bench.registry import METHODS

# The 7 selected ImageNet templates of CoOp's zero-shot ensemble (docs/protocol.md §5.2).
ENSEMBLE_TEMPLATES = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)


@dataclass
class ZSCLIPConfig:
    ensemble: bool = False  # mean of the 7 ImageNet templates + the dataset's own (ImageNet's not added twice)


@METHODS.register("zsclip")
class ZeroShotCLIP(Method):
    """Frozen CLIP with hand-written prompts: nothing trains (epochs 0)."""

    name = "zsclip"
    trains = False
    report_order = 0
    color = "#7f7f7f"
    in_default_set = True
    Config = ZSCLIPConfig
    frozen_image_path = True
    recipes = {
        "paper": {p: {"epochs": 0} for p in ("base2novel", "xd", "few_shot")},
        "toy": {p: {"epochs": 0} for p in ("base2novel", "xd", "few_shot")},
    }
    ablations = {}

    def __init__(self, backbone, classnames: Sequence[str], cfg: ZSCLIPConfig, template="a photo of a {}.", dataset=""):
        super().__init__(backbone, classnames, cfg, template, dataset)
        self.register_buffer("class_features", self._encode(), persistent=False)

    def templates(self) -> list[str]:
        if not self.cfg.ensemble:
            return [self.template]
        # CoOp's ZeroshotCLIP2 adds the dataset's own template, except for ImageNet (trainers/zsclip.py).
        return list(ENSEMBLE_TEMPLATES) + ([] if self.dataset == "imagenet" else [self.template])

    @torch.no_grad()
    def _encode(self) -> torch.Tensor:
        names = [clean_classname(c) for c in self.classnames]
        feats = [self.backbone.text_features([t.format(n) for n in names]) for t in self.templates()]  # T x (C, E)
        return F.normalize(torch.stack(feats).mean(0), dim=-1)  # (C, E)

    def set_classnames(self, classnames: Sequence[str], template: str | None = None, dataset: str | None = None):
        super().set_classnames(classnames, template, dataset)
        self.class_features = self._encode()

    def forward(self, images, keys=None, image_features=None) -> MethodOutput:
        if image_features is None:
            image_features = self.backbone.encode_image(images)  # (B, E)
        return MethodOutput(cosine_logits(self.backbone.logit_scale, image_features, self.class_features))
