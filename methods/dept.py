"""DePT: a linear head over the training classes on channel-adjusted features, as a plug-in of CoOp, CoCoOp, KgCoOp
and MaPLe (docs/methods/dept.md §15).

Matched against Koorye/DePT @ d4ff416:
- ``trainers/elp_maple.py:18-40`` (FiLM: scale ones, bias zeros, fp32, cast to the features' dtype) and
  ``trainers/elp_{coop,cocoop,kgcoop,maple}.py`` CustomCLIP: ``film_lp_img`` / ``film_lp_text`` on the inner
  method's unnormalised image and text features, ``linear_probe_proj`` = Linear(E, C_train) (in CLIP's dtype); in
  training the head sees the rows [text feature of each label; image feature] and the loss is
  (1 − w)·CE(similarity logits) + w·CE(head) (``_loss``, w = LINEAR_PROBE.WEIGHT 0.7); at evaluation "base mode"
  (the training classes, or an ImageNet variant of an ImageNet-trained model, ``forward``) returns
  (1 − w)·similarity + w·head(FiLM(image)), anything else the similarity logits alone (``_forward_new``);
  ``load_model`` keeps the head rows of ImageNet-A / -R's classes.
- ``elp_kgcoop.py:116-129``: KgCoOp's W·(1 − mean cos) is added to that loss, unweighted.
- ``train.py:71-92`` (LR_EXP 6.5, NEW_LAYERS linear_probe / film, LINEAR_PROBE.WEIGHT 0.7, TEST_TIME_FUSION True,
  FILM.LINEAR_PROBE True) and ``trainers/optim.py:36-83`` (the new layers at LR × 6.5, the rest at LR).
- ``configs.py`` (``<method>_dept``: the same yaml as DePT's re-run of the base method) and
  ``configs/trainers/ExtrasLinearProbe*/*.yaml``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mugcp_bench.errors import UserError
from mugcp_bench.methods.base import Method, MethodOutput, ParamGroup, Provenance

# the methods DePT wraps, imported so that they are registered before the plug-in composes with them
from mugcp_bench.methods.cocoop import CoCoOp  # noqa: F401
from mugcp_bench.methods.coop import CoOp  # noqa: F401
from mugcp_bench.methods.kgcoop import DEPT_COMMIT, DEPT_REPO, KgCoOp  # noqa: F401
from mugcp_bench.methods.maple import MaPLe  # noqa: F401
from mugcp_bench.methods.plugin import MethodPlugin
from mugcp_bench.registry import DATASETS, PLUGINS

log = logging.getLogger(__name__)

# Datasets the reference scores with the head of a model trained on all of ImageNet's classes: those whose config name
# contains "ImageNet" (elp_coop.py:38-55; -A and -R through the head rows of their 200 classes, elp_coop.py:267-287).
IMAGENET = "imagenet"
IMAGENET_VARIANTS = ("imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")

# The reference's config file of each composition (configs.py `<method>_dept`; the same settings as DePT's re-run of
# the base method, configs/trainers/<Base>/<same name>).
DEPT_CONFIGS = {
    "coop": "configs/trainers/ExtrasLinearProbeCoOp/vit_b16_ep10_bs4_lr35.yaml",
    "cocoop": "configs/trainers/ExtrasLinearProbeCoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml",
    "kgcoop": "configs/trainers/ExtrasLinearProbeKgCoOp/vit_b16_ep10_ctxv1_bs4_lr35.yaml",
    "maple": "configs/trainers/ExtrasLinearProbeMaPLe/vit_b16_c2_ep10_batch4_2ctx.yaml",
}
DEPT_NOTE = (
    "configs.py `{method}_dept` (trainer ExtrasLinearProbe{trainer}); xd: parallel_runner.py trains ImageNet (all "
    "classes, 16 shots) with the same config; PREC fp16 in the reference (--precision reference-fp16); no few-shot mode"
)
TRAINERS = {"coop": "CoOp", "cocoop": "CoCoOp", "kgcoop": "KgCoOp", "maple": "MaPLe"}


@dataclass
class DePTConfig:
    # LINEAR_PROBE.WEIGHT (train.py:87): the loss is (1 − w)·CE(similarity) + w·CE(head), base-mode logits
    # (1 − w)·similarity + w·head
    head_weight: float = field(default=0.7, metadata={"range": (0, 1, True, True)})
    # OPTIM.LR_EXP (train.py:71): FiLM and the head train at this multiple of the recipe's LR
    lr_mult: float = field(default=6.5, metadata={"range": (0, None, False, False)})
    film: bool = True  # FILM.LINEAR_PROBE (train.py:92): channel-adjusted transfer before the head
    test_time_fusion: bool = True  # LINEAR_PROBE.TEST_TIME_FUSION (train.py:88); False: base mode scores by the head


class FiLM(nn.Module):
    """x · scale + bias per channel, scale ones and bias zeros at the start, applied in the features' dtype
    (Koorye/DePT@d4ff416:trainers/elp_maple.py:18-40, use_sigmoid False)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale.unsqueeze(0).to(x.dtype) * x + self.bias.unsqueeze(0).to(x.dtype)  # (N, E)


def shares_label_space(train_dataset: str, dataset: str) -> bool:
    """Whether `dataset` is scored in the label space of `train_dataset`: ImageNet's variants for ImageNet (the
    reference's rule), and any test-only dataset declaring the training dataset as its label space (the toy world's
    shifted domains; ours)."""
    if train_dataset == IMAGENET and dataset in IMAGENET_VARIANTS:
        return True
    try:
        spec = DATASETS.get(dataset)
    except UserError:  # a dataset the registry does not know (a test's, a user's classes): its own label space
        return False
    return getattr(spec, "label_space", None) == train_dataset


def head_rows(
    train_dataset: str, train_classes: Sequence[str], dataset: str, classes: Sequence[str]
) -> tuple[int, ...] | None:
    """The head rows scoring `classes` of `dataset` ("base mode"), or None where the head does not apply.

    Base mode: the training dataset with its training classes (base-to-novel base, the cross-dataset source, few-shot),
    or a dataset sharing its label space whose every class is a training class, mapped by name (ImageNet-V2 and
    -Sketch: all 1,000 rows; -A and -R: the rows of their 200 classes). Anything else (novel classes, other datasets)
    is scored by the similarity logits alone."""
    classes = list(classes)
    if dataset == train_dataset:
        return tuple(range(len(classes))) if classes == list(train_classes) else None
    if not shares_label_space(train_dataset, dataset):
        return None
    index = {c: i for i, c in enumerate(train_classes)}
    if not all(c in index for c in classes):
        return None
    return tuple(index[c] for c in classes)


@PLUGINS.register("dept")
class DePT(MethodPlugin):
    """Decoupled Prompt Tuning (Zhang et al., CVPR 2024): a linear head over the training classes on
    channel-adjusted features, fused with the similarity logits on those classes."""

    name = "dept"
    wraps = ("coop", "cocoop", "kgcoop", "maple")
    Config = DePTConfig
    # no-film: the head on the inner's features as they are (FILM.LINEAR_PROBE False); no-fusion: base mode scored by
    # the head alone (TEST_TIME_FUSION False)
    ablations = {"film": {"film": False}, "fusion": {"test_time_fusion": False}}
    # DePT's own recipe of a composition is its re-run recipe of the inner method
    inner_recipes = {"paper": "dept"}
    report_offset = 1  # right after the inner method
    colors = {"coop": "#aec7e8", "cocoop": "#ffbb78", "kgcoop": "#f7b6d2", "maple": "#98df8a"}
    needs_labels = True  # the head's loss needs the batch's labels
    # reference-fp16: FiLM stays fp32 (created without a dtype, never converted); the head is fp16 (`.type(dtype)`)
    reference_fp32 = ("film_lp_img.*", "film_lp_text.*")

    def __init__(
        self,
        backbone,
        classnames: Sequence[str],
        cfg: Any,
        template: str = "a photo of a {}.",
        dataset: str = "",
    ) -> None:
        super().__init__(backbone, classnames, cfg, template, dataset)
        dim = backbone.embed_dim
        # the training classes and dataset: the head's rows, and what decides where it applies (`head_rows`)
        self.train_classnames = tuple(self.classnames)
        self.train_dataset = self.dataset
        self.film_lp_img = FiLM(dim) if cfg.film else None
        self.film_lp_text = FiLM(dim) if cfg.film else None
        self.linear_probe_proj = nn.Linear(dim, len(self.train_classnames))  # (C_train, E) + (C_train,)
        self.rows: tuple[int, ...] | None = tuple(range(len(self.train_classnames)))

    @classmethod
    def composed_provenance(cls, inner: type[Method], inner_recipe: str) -> Provenance | None:
        if inner_recipe != "dept":
            return super().composed_provenance(inner, inner_recipe)
        config = DEPT_CONFIGS[inner.name]
        note = DEPT_NOTE.format(method=inner.name, trainer=TRAINERS[inner.name])
        return Provenance(DEPT_REPO, DEPT_COMMIT, {"base2novel": config, "xd": config}, note)

    @classmethod
    def ignored_settings(cls, cfg: Any) -> dict[str, str]:
        out = dict(super().ignored_settings(cfg))
        if cfg.head_weight == 0:
            why = "at head_weight=0 the head and FiLM get no gradient (only the similarity loss trains)"
            out["lr_mult"] = f"{why}; also --set head_weight above 0"
            out["film"] = f"{why}; also --set head_weight above 0"
        return out

    # --- where the head applies -----------------------------------------------------------------------------------
    def set_classnames(self, classnames: Sequence[str], template: str | None = None, dataset: str | None = None):
        super().set_classnames(classnames, template, dataset)
        if "linear_probe_proj" in self._modules:  # (an inner constructor may call this before the head exists)
            self.rows = head_rows(self.train_dataset, self.train_classnames, self.dataset, self.classnames)

    @property
    def base_mode(self) -> bool:
        """Whether the current classes are scored with the head too (`head_rows`)."""
        return self.rows is not None

    # --- the head -------------------------------------------------------------------------------------------------
    def _film(self, film: FiLM | None, x: torch.Tensor) -> torch.Tensor:
        return x if film is None else film(x)

    def _head(self, x: torch.Tensor, rows: tuple[int, ...] | None = None) -> torch.Tensor:
        """Head logits (N, C) of features (N, E), unnormalised and without a logit scale, as the reference; `rows`:
        the head rows of the current classes (None: all, in the training order)."""
        head = self.linear_probe_proj
        x = x.to(head.weight.dtype)
        if rows is None or rows == tuple(range(head.out_features)):
            return head(x)  # (N, C_train)
        idx = torch.tensor(rows, device=head.weight.device)
        return F.linear(x, head.weight[idx], head.bias[idx])  # (N, C)

    def _fuse(self, sim: torch.Tensor, image_f: torch.Tensor) -> torch.Tensor:
        """Base mode: (1 − w)·similarity + w·head(FiLM(image)) (or the head alone without test-time fusion)."""
        head = self._head(self._film(self.film_lp_img, image_f), self.rows)  # (B, C)
        if not self.cfg.test_time_fusion:
            return head
        w = self.cfg.head_weight
        return (1 - w) * sim + w * head  # (B, C)

    # --- training and the naive evaluation path -------------------------------------------------------------------
    def forward(self, images, keys=None, image_features=None, labels: torch.Tensor | None = None) -> MethodOutput:
        """Training: the inner method's output with ce_weight × (1 − w) and ``losses["head"]`` = w·CE(head rows,
        labels twice) (without `labels`: the inner's output alone). Evaluation: the inner's logits, fused with the
        head's in base mode."""
        if not self.base_mode and not self.training:  # new classes: exactly the inner method
            return super().forward(images, keys, image_features)
        out, image_f, text_f = self.inner_pass(super().forward, images, keys, image_features)
        if not self.training:
            return MethodOutput(self._fuse(out.logits, image_f), out.losses, out.ce_weight)
        w = self.cfg.head_weight
        if labels is None or w == 0:
            return out
        if self.rows != tuple(range(len(self.train_classnames))):
            raise RuntimeError(f"{self.name} trains on its training classes; set_classnames them before training")
        if text_f is None:
            raise RuntimeError(f"{self.name}: the inner method computed no text features (a forward without grad?)")
        if text_f.dim() == 3:  # per-image text features (CoCoOp): image i's feature of its label
            label_text = text_f[torch.arange(labels.shape[0], device=labels.device), labels]  # (B, E)
        else:
            label_text = text_f[labels]  # (B, E)
        feats = torch.cat([self._film(self.film_lp_text, label_text), self._film(self.film_lp_img, image_f)])  # (2B, E)
        logits_lp = self._head(feats)  # (2B, C_train)
        out.losses["head"] = w * F.cross_entropy(logits_lp, torch.cat([labels, labels]))
        out.ce_weight = out.ce_weight * (1 - w)
        return out

    # --- fast evaluation ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, images, keys=None, image_features=None) -> torch.Tensor:
        if not self.base_mode:  # new classes: exactly the inner method
            return super().predict(images, keys, image_features)
        sim, image_f, _ = self.inner_pass(super().predict, images, keys, image_features)
        return self._fuse(sim, image_f)  # (B, C)

    # --- optimisation ---------------------------------------------------------------------------------------------
    def new_layers(self) -> list[nn.Parameter]:
        """FiLM and the head: the reference's NEW_LAYERS (names containing "film" / "linear_probe")."""
        modules = (self.film_lp_img, self.film_lp_text, self.linear_probe_proj)
        return [p for m in modules if m is not None for p in m.parameters() if p.requires_grad]

    def param_groups(self) -> list[ParamGroup]:
        """The inner method's parameters at the recipe's LR (its own groups, if it has some) and DePT's new layers at
        LR × `lr_mult` (trainers/optim.py: LR·LR_EXP for them, LR·LR_EXP·(1/LR_EXP) for the rest)."""
        new = self.new_layers()
        ids = {id(p) for p in new}
        inner = super().param_groups()
        if inner is None:
            name = type(self).inner_method.name
            inner = [ParamGroup(name, [p for p in self.trainable_parameters() if id(p) not in ids])]
        return [*inner, ParamGroup(DePT.name, new, self.cfg.lr_mult)]
