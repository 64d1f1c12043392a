"""What a method's checkpoint looks like in its reference code: `ReferenceFormat`, declared by each method in its own
file as plain data (``reference_checkpoint = {"trainer": ..., "keys": ...}``: the methods wing imports nothing from
``interop``, which sits above it; docs/interop.md §6).

Every reference trainer here saves with Dassl (KaiyangZhou/Dassl.pytorch@c61a1b5 ``dassl/engine/trainer.py``
save_model): ``<run dir>/<learner>/model.pth.tar-<E>`` holding ``{"state_dict", "epoch", "optimizer", "scheduler"
[, "val_result"]}``, where ``state_dict`` is the registered module's (the prompt learner, or the whole ``CustomCLIP``
with the frozen CLIP in it). Its ``load_model`` deletes the class buffers and loads ``strict=False``. A format says,
declaratively, everything `mugcp_bench.interop` needs to read and write such files for one method:

* the trainer and learner-folder names (``--trainer``, the scripts' ``<Trainer>`` folder, the registered name);
* ``keys``: our state-dict name pattern -> the reference's (`mugcp_bench.interop.keys`), for every tensor we train;
* ``deleted_buffers``: the class buffers its ``load_model`` deletes (written on export, dropped on import);
* ``frozen``: reference pattern -> OpenAI CLIP key pattern of the frozen tensors whole-model files carry (checked
  against our backbone on import: a file trained on another backbone is refused; written from it on export);
* ``ignored``: reference keys that are neither ours nor CLIP's and play no part at evaluation;
* ``config``: our config values read off the file (`Shape`, `Ndim`, `Count`, or constants);
* ``requires``: our config values this format represents (export refuses others; import sets them);
* ``options``: our config field -> the reference's yacs key(s), read from the run's ``log.txt`` on import and
  printed with the command line on export;
* ``configs``: the reference config file per train protocol; ``epochs``: --load-epoch defaults are the run's epochs.

This module imports nothing but torch-free helpers; `formats_of` reads a method class's declaration.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mugcp_bench.interop.keys import KeyPattern, KeyRule, rules_of

# The class buffers every load_model deletes (KaiyangZhou/CoOp trainers/coop.py, cocoop.py load_model; KgCoOp and TCP
# also list "token_midfix", which no file holds): top-level for trainers registering the prompt learner, under
# "prompt_learner." for those registering the whole CustomCLIP (multimodal-prompt-learning trainers/maple.py,
# independentVL.py; GingL/CMPA trainers/cmpa.py).
PROMPT_LEARNER_BUFFERS = ("token_prefix", "token_suffix")
WHOLE_MODEL_BUFFERS = ("prompt_learner.token_prefix", "prompt_learner.token_suffix")

# Frozen OpenAI CLIP in a whole-model CustomCLIP (image_encoder = clip.visual, text_encoder = TextEncoder(clip)):
# multimodal-prompt-learning trainers/maple.py, independentVL.py, vpt.py; PromptSRC trainers/promptsrc.py.
CLIP_TOWERS: tuple[tuple[str, str], ...] = (
    ("logit_scale", "logit_scale"),
    ("image_encoder.*", "visual.*"),
    ("text_encoder.*", "*"),
)
# GingL/CMPA clip/model.py build_model renames the towers into one joint Encoder (docs/interop.md §3).
CMPA_TOWERS: tuple[tuple[str, str], ...] = (
    ("logit_scale", "logit_scale"),
    ("encoder.resblocks.{i}.visual_attn.*", "visual.transformer.resblocks.{i}.*"),
    ("encoder.resblocks.{i}.text_attn.*", "transformer.resblocks.{i}.*"),
    ("encoder.conv1_visual.weight", "visual.conv1.weight"),
    ("encoder.ln_pre_visual.*", "visual.ln_pre.*"),
    ("encoder.ln_post_visual.*", "visual.ln_post.*"),
    ("encoder.class_embedding_visual", "visual.class_embedding"),
    ("encoder.positional_embedding_visual", "visual.positional_embedding"),
    ("encoder.proj_visual", "visual.proj"),
    ("encoder.positional_embedding", "positional_embedding"),
    ("encoder.ln_final.*", "ln_final.*"),
    ("encoder.text_projection", "text_projection"),
)

# OpenAI's convert_weights (clip/model.py in every reference repo) makes these fp16; the rest of the frozen CLIP
# (LayerNorms, embeddings, logit_scale) stays fp32 (notes/checkpoints README §8.1).
FP16_SUFFIXES = (
    "attn.in_proj_weight",
    "attn.in_proj_bias",
    "attn.out_proj.weight",
    "attn.out_proj.bias",
    "mlp.c_fc.weight",
    "mlp.c_fc.bias",
    "mlp.c_proj.weight",
    "mlp.c_proj.bias",
)
FP16_NAMES = ("visual.conv1.weight", "text_projection", "visual.proj")


def clip_fp16(openai_key: str) -> bool:
    """Whether the reference's fp16 regime holds frozen CLIP tensor `openai_key` in fp16."""
    return openai_key.endswith(FP16_SUFFIXES) or openai_key in FP16_NAMES


# --- config values read off a file ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    """A config value = size `dim` of reference tensor `key` (``default`` when the file has no such key)."""

    key: str
    dim: int
    default: Any = None

    def read(self, shapes: Mapping[str, tuple[int, ...]]) -> Any:
        if self.key not in shapes:
            if self.default is None:
                raise KeyError(self.key)
            return self.default
        return int(shapes[self.key][self.dim])


@dataclass(frozen=True)
class Ndim:
    """A config flag = whether reference tensor `key` has `ndim` dimensions (CoOp's class-specific context)."""

    key: str
    ndim: int

    def read(self, shapes: Mapping[str, tuple[int, ...]]) -> bool:
        return len(shapes[self.key]) == self.ndim


@dataclass(frozen=True)
class Count:
    """A config value = number of reference keys matching `pattern` (``{i}`` a layer index) plus `plus`; 0 when
    `requires` is given and the file has no such key (e.g. no vision prompt at all)."""

    pattern: str
    plus: int = 0
    requires: str | None = None

    def read(self, shapes: Mapping[str, tuple[int, ...]]) -> int:
        if self.requires is not None and self.requires not in shapes:
            return 0
        pattern = KeyPattern(self.pattern)
        found = {pattern.match(k).get("i", k) for k in shapes if pattern.match(k) is not None}
        return len(found) + self.plus


@dataclass(frozen=True)
class OneOf:
    """In ``requires``: our setting must be one of `values` (checked, never set)."""

    values: tuple[Any, ...]

    def __contains__(self, value: Any) -> bool:
        return value in self.values

    def __repr__(self) -> str:
        return " | ".join(repr(v) for v in self.values)


ConfigSpec = Mapping[str, Any] | Callable[[Mapping[str, tuple[int, ...]]], dict[str, Any]]


@dataclass(frozen=True)
class ReferenceFormat:
    """How one reference trainer stores what one of our methods trains (see the module docstring)."""

    trainer: str  # Dassl trainer name: `--trainer`, the <Trainer> folder of the scripts' output trees
    learner: str  # the registered model name: the folder holding model.pth.tar-<E>
    keys: Mapping[str, str]  # our state-dict name pattern -> the reference's
    deleted_buffers: tuple[str, ...] = PROMPT_LEARNER_BUFFERS
    frozen: tuple[tuple[str, str], ...] = ()  # reference pattern -> OpenAI CLIP key pattern
    ignored: tuple[str, ...] = ()  # fnmatch patterns of reference keys skipped on import
    config: ConfigSpec = field(default_factory=dict)  # our config field -> value read off the file
    requires: Mapping[str, Any] = field(default_factory=dict)  # our config values this format represents
    options: Mapping[str, str | tuple[str, ...]] = field(default_factory=dict)  # our field -> reference yacs key(s)
    fixed_options: Mapping[str, Any] = field(default_factory=dict)  # reference yacs key -> the value it must have
    configs: Mapping[str, str] = field(default_factory=dict)  # train protocol -> reference config file
    fp16_always: tuple[str, ...] = ()  # fnmatch patterns of reference keys in fp16 even under PREC fp32/amp
    frozen_fp32: tuple[str, ...] = ()  # fnmatch patterns of frozen keys the fp16 regime keeps fp32 (CMPA's proj_visual)
    repo: str = ""  # owner/name@commit of the reference code
    secondary: bool = False  # another method is the trainer's own: used only when --method names this one
    note: str = ""  # printed with every export (what the user must know before running the reference)

    @property
    def rules(self) -> tuple[KeyRule, ...]:
        return rules_of(dict(self.keys))

    @property
    def frozen_rules(self) -> tuple[KeyRule, ...]:
        """OpenAI CLIP key ("ours") <-> reference key, for the frozen towers of whole-model files."""
        return rules_of(tuple((openai, ref) for ref, openai in self.frozen))

    @property
    def whole_model(self) -> bool:
        """Whether the file holds the whole CustomCLIP (frozen CLIP included), not only the prompt learner."""
        return bool(self.frozen)

    def is_ignored(self, key: str) -> bool:
        return any(fnmatch.fnmatchcase(key, p) for p in self.ignored)

    def unrepresentable(self, cfg: Any) -> str | None:
        """Which of our settings this format cannot hold (one phrase), or None."""

        def fits(key: str, want: Any) -> bool:
            have = getattr(cfg, key, None)
            return have in want if isinstance(want, OneOf) else have == want

        bad = [f"{k}={getattr(cfg, k, None)!r}" for k, v in self.requires.items() if not fits(k, v)]
        if not bad:
            return None
        wanted = ", ".join(f"{k}={v!r}" for k, v in self.requires.items())
        return f"{', '.join(bad)} has no counterpart in {self.trainer} (it needs {wanted})"

    def read_config(self, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
        """Our config values implied by a file's tensor shapes (KeyError naming a missing key)."""
        if callable(self.config):
            out = dict(self.config(shapes))
        else:
            out = {k: (v.read(shapes) if hasattr(v, "read") else v) for k, v in self.config.items()}
        return {**out, **{k: v for k, v in self.requires.items() if not isinstance(v, OneOf)}}


# --- declarations as plain data (what method files write: they import nothing from this package) ---------------------
TOWERS = {"clip": CLIP_TOWERS, "cmpa": CMPA_TOWERS}
BUFFERS = {"prompt_learner": PROMPT_LEARNER_BUFFERS, "whole_model": WHOLE_MODEL_BUFFERS}
_SPECS = {"shape": Shape, "ndim": Ndim, "count": Count}
_FIELDS = {f for f in ReferenceFormat.__dataclass_fields__}


def _config_value(field_name: str, value: Any) -> Any:
    """("shape", key, dim[, default]) / ("ndim", key, n) / ("count", pattern, plus[, requires]) -> the reader; any
    other value is a constant."""
    if isinstance(value, tuple) and value and value[0] in _SPECS:
        try:
            return _SPECS[value[0]](*value[1:])
        except TypeError as e:
            raise ValueError(f"reference_checkpoint config '{field_name}': {value!r} ({e})") from None
    return value


def from_declaration(decl: Mapping[str, Any] | ReferenceFormat) -> ReferenceFormat:
    """A `ReferenceFormat` from a method's plain-data declaration (a dict of its fields). Strings name the shared
    maps: ``frozen="clip" | "cmpa"``, ``deleted_buffers="prompt_learner" | "whole_model"``; in ``config``, tuples
    ``("shape", key, dim)``, ``("ndim", key, n)``, ``("count", pattern, plus)`` read the file's shapes; in
    ``requires``, a set means "one of" (checked on export, never set)."""
    if isinstance(decl, ReferenceFormat):
        return decl
    unknown = sorted(set(decl) - _FIELDS)
    if unknown:
        raise ValueError(
            f"reference_checkpoint: unknown field(s) {', '.join(unknown)}; fields: {', '.join(sorted(_FIELDS))}"
        )
    out = dict(decl)
    if isinstance(out.get("frozen"), str):
        out["frozen"] = TOWERS[out["frozen"]]
    if isinstance(out.get("deleted_buffers"), str):
        out["deleted_buffers"] = BUFFERS[out["deleted_buffers"]]
    for name in ("deleted_buffers", "ignored", "fp16_always", "frozen_fp32"):
        if name in out:
            out[name] = tuple(out[name])
    if isinstance(out.get("config"), Mapping):
        out["config"] = {k: _config_value(k, v) for k, v in out["config"].items()}
    if "requires" in out:
        out["requires"] = {
            k: OneOf(tuple(sorted(v))) if isinstance(v, (set, frozenset)) else v for k, v in out["requires"].items()
        }
    return ReferenceFormat(**out)


def formats_of(method_cls: type) -> tuple[ReferenceFormat, ...]:
    """The reference formats a method class declares: ``reference_checkpoint``, one declaration or a tuple of them
    (plain dicts of `ReferenceFormat`'s fields, or `ReferenceFormat`s for code outside the methods wing)."""
    decl = getattr(method_cls, "reference_checkpoint", None)
    if decl is None:
        return ()
    decls = decl if isinstance(decl, (tuple, list)) else (decl,)
    return tuple(from_declaration(d) for d in decls)


__all__ = [
    "CLIP_TOWERS",
    "CMPA_TOWERS",
    "PROMPT_LEARNER_BUFFERS",
    "WHOLE_MODEL_BUFFERS",
    "Count",
    "Ndim",
    "OneOf",
    "ReferenceFormat",
    "Shape",
    "clip_fp16",
    "formats_of",
    "from_declaration",
]
