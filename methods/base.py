"""The method plugin interface: every method is a `Method` registered by name in `METHODS`.

A method owns its trainable parameters and builds logits from a frozen `Backbone`; the one trainer owns devices,
precision, optimisation, checkpoints and evaluation (like a LightningModule / mmengine BaseModel).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mugcp_bench.errors import UserError
from mugcp_bench.model.backbone import Backbone
from mugcp_bench.model.state_fit import StateMismatch, state_mismatch
from mugcp_bench.registry import METHODS, suggest

log = logging.getLogger(__name__)


# Optimizers a recipe may name (Dassl's OPTIM.NAME values we support; KaiyangZhou/Dassl.pytorch
# dassl/optim/optimizer.py): SGD with momentum, Adam (coupled L2 weight decay) and AdamW (decoupled).
OPTIMIZERS = ("sgd", "adam", "adamw")
_ADAM_SETTINGS = {"adam_beta1": 0.9, "adam_beta2": 0.999, "adam_eps": 1e-8}  # torch's and Dassl's defaults
_SGD_SETTINGS = {"momentum": 0.9}


@dataclass
class TrainConfig:
    """Optimisation settings of a run (Dassl's defaults, docs/protocol.md §4)."""

    epochs: int = 5
    lr: float = 0.0035
    batch_size: int = 4
    accum_steps: int = 1  # gradient accumulation (MuGCP ImageNet: batch 1 x 4)
    eval_batch_size: int = 100
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    # RandomResizedCrop's smallest area share in training (Dassl: 0.08). The toy recipes crop less: 32-px toy images
    # have no detail to spare and the toy CLIP never saw crops in pretraining.
    crop_min_scale: float = 0.08
    # sgd | adam | adamw (Dassl OPTIM.NAME); the adam_* settings apply to adam and adamw, momentum to sgd only
    # (`added`: settings that came after runs were recorded; at their default they stay out of the config hash, so the
    # runs recorded before them keep their ids)
    optimizer: str = field(default="sgd", metadata={"added": True})
    adam_beta1: float = field(default=0.9, metadata={"range": (0, 1, True, False), "added": True})  # OPTIM.ADAM_BETA1
    adam_beta2: float = field(default=0.999, metadata={"range": (0, 1, True, False), "added": True})  # ADAM_BETA2
    # torch's default 1e-8 (stock Dassl passes none); TCP's README asks for 1e-3 (its paper recipe sets it)
    adam_eps: float = field(default=1e-8, metadata={"range": (0, None, False, False), "added": True})

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise UserError(
                f"--set optimizer={self.optimizer}: unknown optimizer.{suggest(self.optimizer, OPTIMIZERS)} "
                f"Use one of {', '.join(OPTIMIZERS)}."
            )
        # a setting the chosen optimizer ignores is refused, never silently recorded
        ignored = _ADAM_SETTINGS if self.optimizer == "sgd" else _SGD_SETTINGS
        for key, default in ignored.items():
            if getattr(self, key) != default:
                users = "adam and adamw" if key.startswith("adam_") else "sgd"
                raise UserError(
                    f"--set {key}={getattr(self, key)}: {key} applies to {users} only, and this run uses "
                    f"optimizer={self.optimizer}; also --set {key}={default:g}, or pick an optimizer that uses it"
                )


# Training settings shared by every method's `toy` recipe.
TOY_TRAIN: dict[str, Any] = {"crop_min_scale": 1.0}


@dataclass(frozen=True)
class Provenance:
    """Where a recipe comes from: the repository and commit its settings were read from, the config file per train
    protocol (base2novel, xd, few_shot) and a note on what was chosen where the authors give nothing. Every run record
    names its recipe's provenance, and `report` prints it when two recipes of one method are in a table."""

    repo: str  # "KaiyangZhou/CoOp"; "" for recipes of our own design (the toy recipes)
    commit: str = ""
    configs: dict[str, str] = field(default_factory=dict)  # train protocol -> config file in the repo
    note: str = ""

    def for_protocol(self, train_protocol: str) -> dict[str, str]:
        """The record's `provenance` entry for one train protocol."""
        return {
            "repo": self.repo,
            "commit": self.commit,
            "config": self.configs.get(train_protocol, ""),
            "note": self.note,
        }


@dataclass
class ParamGroup:
    """A named group of trainable parameters with its own learning rate: ``lr_scale`` × the recipe's `lr`
    (Method.param_groups). The warm-up epoch sets every group to `warmup_lr`; then each group follows the cosine
    from its own base LR (Dassl's ConstantWarmupScheduler over CosineAnnealingLR)."""

    name: str
    params: list[nn.Parameter]
    lr_scale: float = 1.0


@dataclass
class MethodOutput:
    """What a forward returns: logits (B, C) and extra losses (already weighted). The trainer adds the cross-entropy
    of `logits`, weighted by `ce_weight` (DePT: 0.3, MMRL: 0.7; recorded as `loss_ce`, weighted, so that the parts
    add up to the loss)."""

    logits: torch.Tensor
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    ce_weight: float = 1.0


class Method(nn.Module):
    """Base class of method plugins.

    Subclasses set ``Config`` (a dataclass of every hyperparameter), ``recipes`` and ``ablations`` and implement
    ``forward``. ``recipes[recipe][train_protocol]`` is a dict of config and `TrainConfig` overrides (keys of either);
    override :meth:`recipe` when settings depend on the shots or the dataset.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type] = object
    recipes: ClassVar[dict[str, dict[str, dict[str, Any]]]] = {}
    ablations: ClassVar[dict[str, dict[str, Any]]] = {}
    # Frozen image features (no prompt in the vision tower): the evaluator may cache them on disk.
    frozen_image_path: ClassVar[bool] = False
    # Reconstructed from a paper without code: reports say so.
    reconstructed: ClassVar[bool] = False
    # How the method looks in reports: its place in the tables' method order (lower first; zero-shot CLIP 0, the
    # proposed methods last), its plot colour (None: one picked from its name) and whether `run` without --methods
    # includes it. `run` writes them into every run record, so `report` orders and colours entries without importing
    # any method (the report never imports torch).
    report_order: ClassVar[int] = 500
    color: ClassVar[str | None] = None
    in_default_set: ClassVar[bool] = False  # read from each class's own body: subclasses do not inherit it
    # recipe name -> where its settings come from (`Provenance`); recipes without an entry are our own design
    provenance: ClassVar[dict[str, Provenance]] = {}
    # True: training forwards get the batch's labels as a keyword (`forward(images, keys, labels=...)`), for losses
    # beyond the trainer's cross-entropy that need them (a linear head's, DePT; MMRL's representation logits)
    needs_labels: ClassVar[bool] = False
    # False for methods with nothing to train (zero-shot CLIP): a sweep-wide training setting (`--set lr=...`) does
    # not apply to them and is not recorded in their runs; one scoped to them (`--set zsclip.lr=...`) is refused
    trains: ClassVar[bool] = True
    # Parameters the reference code keeps in fp32 under its fp16 regime (`--precision reference-fp16`), as fnmatch
    # patterns over `named_parameters()` names ("compound_prompts_text.*"; "*" keeps every parameter fp32). Every
    # other parameter is cast to fp16, except LayerNorm's (see `to_reference_fp16`).
    reference_fp32: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        backbone: Backbone,
        classnames: Sequence[str],
        cfg: Any,
        template: str = "a photo of a {}.",
        dataset: str = "",
    ) -> None:
        super().__init__()
        self.cfg = cfg
        # Not a registered submodule: the backbone's weights are never part of the method's state.
        object.__setattr__(self, "backbone", backbone)
        self.classnames = list(classnames)
        self.template = template  # the dataset's hand-written zero-shot template (docs/protocol.md §5.1)
        self.dataset = dataset  # registry name of the dataset the classes come from

    def set_classnames(
        self, classnames: Sequence[str], template: str | None = None, dataset: str | None = None
    ) -> None:
        """Rebuild every class-dependent buffer for other classes (novel half, other datasets).

        Subclasses call ``super().set_classnames(...)`` first, then rebuild their buffers."""
        self.classnames = list(classnames)
        if template is not None:
            self.template = template
        if dataset is not None:
            self.dataset = dataset

    # --- training / naive evaluation ------------------------------------------------------------------------------
    def forward(
        self, images: torch.Tensor, keys: Sequence[str] | None = None, image_features: torch.Tensor | None = None
    ) -> MethodOutput:
        """Logits (B, C) for a batch; `keys` identify the images (per-image side data), `image_features` replace
        `images` for methods with a frozen image path."""
        raise NotImplementedError

    # --- fast evaluation ------------------------------------------------------------------------------------------
    def begin_eval(self) -> None:
        """Precompute what does not depend on the test images (text features); default: nothing."""

    def end_eval(self) -> None:
        """Drop what `begin_eval` cached."""

    @torch.no_grad()
    def predict(
        self, images: torch.Tensor, keys: Sequence[str] | None = None, image_features: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Evaluation logits (B, C); must equal ``forward(...).logits`` (the naive path) to 1e-4."""
        return self.forward(images, keys, image_features).logits

    # --- side data ------------------------------------------------------------------------------------------------
    def prepare_images(self, items: Sequence[Any], split: str) -> dict[str, Any]:
        """Called with every datum a split will show the method, before training or evaluation (MuGCP describes).

        Returns facts for the run record (e.g. ``{"leakage": 0.12}``); the trainer stores them with the split."""
        return {}

    # --- state ----------------------------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Only the trainable parameters (checkpoints never hold the frozen backbone or class buffers)."""
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v.detach().clone() for k, v in self.state_dict().items() if k in names}

    def load_trainable_state(self, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Load what `trainable_state` saved; StateMismatch (one line naming `source` and what differs) if the state
        is not this method's on this backbone (another architecture, or a file written by another version)."""
        trainable = [n for n, p in self.named_parameters() if p.requires_grad]
        problem = state_mismatch(self.state_dict(), state, required=trainable)
        if problem:
            raise StateMismatch(f"{source} does not fit {self.name} on {self.backbone.name}: {problem}", problem)
        self.load_state_dict(state, strict=False)

    def n_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    # --- optimisation hooks (engine/trainer.py calls them; defaults: one group, nothing accumulated) ---------------
    def param_groups(self) -> list[ParamGroup] | None:
        """Named parameter groups with their own LR scale, together holding every trainable parameter exactly once;
        None (default): one group at the recipe's LR. The run history records each named group's LR per epoch
        (``lr_<name>``)."""
        return None

    def on_train_start(self, epochs: int) -> None:
        """Before the first epoch of a fit (fresh or resumed, before a checkpoint's state is loaded): reset what the
        method accumulates over training."""

    def on_epoch_end(self, epoch: int, epochs: int) -> None:
        """After epoch `epoch` (0-based) of `epochs`: after its last optimizer step and LR step, before its checkpoint
        is written (PromptSRC accumulates its Gaussian-weighted prompt average here)."""

    def on_train_end(self) -> None:
        """After the last epoch's `on_epoch_end`, before the last checkpoint is written: swap in the final state
        (PromptSRC loads the aggregated prompts). Not called again when a run resumes from its last checkpoint."""

    def accumulated_state(self) -> dict[str, Any]:
        """What the method accumulates over training (tensors, numbers), saved in every checkpoint, mid-epoch ones
        too, so that a resumed run ends with the same weights as an uninterrupted one."""
        return {}

    def load_accumulated_state(self, state: dict[str, Any]) -> None:
        """Restore `accumulated_state()` from a checkpoint. Raise `StateMismatch` *before changing anything* when the
        state does not fit (the checkpoint is then kept aside and the run trains from the start)."""

    # --- the reference precision regime ---------------------------------------------------------------------------
    def to_reference_fp16(self) -> Method:
        """Hold the parameters as the reference code's fp16 regime does; returns self.

        The reference builds its prompt learners in ``clip_model.dtype`` (fp16) and casts its extra modules with
        ``.half()`` or CLIP's ``convert_weights``, which never touches LayerNorm (KaiyangZhou/CoOp trainers/coop.py,
        trainers/cocoop.py; multimodal-prompt-learning trainers/maple.py; GingL/CMPA clip/model.py). So: every
        parameter becomes fp16 (in place: the same Parameter objects, updated later by plain SGD in fp16) except
        LayerNorm's and those matching `reference_fp32`; every plain ``nn.LayerNorm`` is replaced by a
        `Fp32LayerNorm` holding the same parameters, which computes in fp32 and returns the input's dtype.
        """
        for parent in self.modules():
            for child_name, child in parent.named_children():
                if type(child) is nn.LayerNorm:
                    setattr(parent, child_name, Fp32LayerNorm.wrap(child))
        for module_name, module in self.named_modules():
            if isinstance(module, nn.LayerNorm):
                continue
            for param_name, param in module.named_parameters(recurse=False):
                full = f"{module_name}.{param_name}" if module_name else param_name
                if not any(fnmatch.fnmatchcase(full, pattern) for pattern in self.reference_fp32):
                    param.data = param.data.half()
        return self

    # --- recipes and configs --------------------------------------------------------------------------------------
    @classmethod
    def ignored_settings(cls, cfg: Any) -> dict[str, str]:
        """The settings this config makes the model ignore (another setting overrides them), each with why and the
        way out, e.g. {"n_ctx": "coop takes n_ctx from ctx_init ...; for n_ctx random tokens also --set ctx_init="}.
        A sweep refuses a user's --set or --grid of any of them: never a run recorded with a value it did not use."""
        return {}

    @classmethod
    def recipe(cls, recipe: str, train_protocol: str, shots: int, dataset: str) -> dict[str, Any]:
        """Config + training overrides for a (recipe, protocol, shots, dataset)."""
        if recipe not in cls.recipes:
            raise UserError(f"method '{cls.name}' has no recipe '{recipe}'.{suggest(recipe, cls.recipes)}")
        table = cls.recipes[recipe]
        if train_protocol not in table:
            raise UserError(
                f"method '{cls.name}' has no '{recipe}' recipe for protocol '{train_protocol}' "
                f"(it has: {', '.join(table)})"
            )
        return dict(table[train_protocol])

    @classmethod
    def make_config(cls, overrides: dict[str, Any] | None = None) -> Any:
        """The method's Config with overrides applied (unknown keys were rejected earlier by `split_overrides`)."""
        return apply_overrides(cls.Config(), overrides or {}, cls.name)


class SharedTextMethod(Method):
    """A method whose class text features do not depend on the image (CoOp, MaPLe): evaluation encodes the C class
    prompts once per class set instead of once per test batch as the reference code does.

    Subclasses implement ``text_features()`` (C, E) and ``image_features(images, image_features)`` (B, E), and call
    ``refresh_eval()`` after rebuilding their class prompts in ``set_classnames``.
    """

    _eval_text: torch.Tensor | None = None

    def text_features(self) -> torch.Tensor:
        raise NotImplementedError

    def image_features(self, images: torch.Tensor | None, image_features: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, images, keys=None, image_features=None) -> MethodOutput:
        image_f = self.image_features(images, image_features)  # (B, E)
        return MethodOutput(cosine_logits(self.backbone.logit_scale, image_f, self.text_features()))  # (B, C)

    @torch.no_grad()
    def begin_eval(self) -> None:
        self._eval_text = self.text_features()  # (C, E)

    def end_eval(self) -> None:
        self._eval_text = None

    def refresh_eval(self) -> None:
        """Re-encode the cached class features after the class set changed during an evaluation."""
        if self._eval_text is not None:
            self.begin_eval()

    @torch.no_grad()
    def predict(self, images, keys=None, image_features=None) -> torch.Tensor:
        text_f = self._eval_text if self._eval_text is not None else self.text_features()  # (C, E)
        return cosine_logits(self.backbone.logit_scale, self.image_features(images, image_features), text_f)


# --- helpers shared by every method ------------------------------------------------------------------------------
class Fp32LayerNorm(nn.LayerNorm):
    """LayerNorm that computes in fp32 and returns its input's dtype (CLIP's fp16-safe LayerNorm, KaiyangZhou/CoOp
    clip/model.py); identical to ``nn.LayerNorm`` on fp32 inputs."""

    @classmethod
    def wrap(cls, ln: nn.LayerNorm) -> Fp32LayerNorm:
        """The same parameters (the same Parameter objects) in an `Fp32LayerNorm`."""
        out = cls(ln.normalized_shape, eps=ln.eps, elementwise_affine=ln.elementwise_affine, bias=ln.bias is not None)
        out.weight, out.bias = ln.weight, ln.bias
        return out.train(ln.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


def cosine_logits(scale: torch.Tensor, image_f: torch.Tensor, text_f: torch.Tensor) -> torch.Tensor:
    """scale · cos: image (B, E) with text (C, E) -> (B, C), or with per-image text (B, C, E) -> (B, C)."""
    image_f = F.normalize(image_f, dim=-1)
    text_f = F.normalize(text_f, dim=-1)
    if text_f.dim() == 3:
        return scale * torch.einsum("be,bce->bc", image_f, text_f)
    return scale * image_f @ text_f.t()


def config_fields(cfg_cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cfg_cls)}


def coerce(value: Any, target: Any, key: str) -> Any:
    """Convert a `--set` string to the type of the current value; UserError on mismatch."""
    if not isinstance(value, str):
        return value
    kind = type(target)
    try:
        if isinstance(target, bool):
            low = value.lower()
            if low not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                raise ValueError(value)
            return low in ("true", "1", "yes", "on")
        if isinstance(target, int):
            return int(value)
        if isinstance(target, float):
            return float(value)
        if isinstance(target, (list, tuple)):
            return kind(type(target[0])(v) if target else v for v in value.split(","))
        if target is None:
            return None if value.lower() in ("none", "null") else value
        return value
    except ValueError:
        raise UserError(f"--set {key}={value}: expected {kind.__name__}, got '{value}'") from None


def apply_overrides(cfg: Any, overrides: dict[str, Any], owner: str) -> Any:
    fields = config_fields(type(cfg))
    changes = {}
    for key, value in overrides.items():
        if key not in fields:
            raise UserError(f"unknown setting '{key}' for {owner}.{suggest(key, fields)}")
        changes[key] = coerce(value, getattr(cfg, key), key)
    return dataclasses.replace(cfg, **changes)


def split_overrides(method_cls: type[Method], overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split flat overrides into (method config, TrainConfig); unknown keys -> UserError with a did-you-mean."""
    mfields, tfields = config_fields(method_cls.Config), config_fields(TrainConfig)
    m, t = {}, {}
    for key, value in overrides.items():
        if key in mfields:
            m[key] = value
        elif key in tfields:
            t[key] = value
        else:
            raise UserError(
                f"unknown setting '{key}' for method '{method_cls.name}'.{suggest(key, [*mfields, *tfields])} "
                f"Settings: {', '.join(sorted([*mfields, *tfields]))}"
            )
    return m, t


def get_method(name: str) -> type[Method]:
    return METHODS.get(name)
