"""Reference checkpoints <-> our methods' states, through each method's `ReferenceFormat`.

Reading: `read_reference_file` (the Dassl dict, via the restricted unpickler), `from_reference` (the file's tensors
under our names, strictly: every tensor of the file is ours, a class buffer, frozen CLIP equal to our backbone, or
declared ignorable; every tensor we train is there, in our shape — otherwise one line naming what is not).
Writing: `to_reference` (our state under the reference's names, in its precision regime, with its class buffers and,
for whole-model trainers, the frozen CLIP from our backbone) and `write_reference_file` (the file `load_model`
reads: KaiyangZhou/Dassl.pytorch@c61a1b5 ``dassl/utils/torchtools.py`` save_checkpoint layout, with optimizer and
scheduler None so that it loads under torch 1.x and under torch >= 2.6's weights-only default alike).
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mugcp_bench.atomic import atomic_write_text
from mugcp_bench.errors import UserError
from mugcp_bench.interop.formats import ReferenceFormat, clip_fp16
from mugcp_bench.interop.keys import first_to_ours, first_to_reference
from mugcp_bench.interop.safe_load import load_checkpoint_file
from mugcp_bench.tensor_files import atomic_torch_save

CHECKPOINT_NAME = re.compile(r"^model\.pth\.tar-(\d+)$")
BEST_NAME = "model-best.pth.tar"
# Frozen-CLIP check on import: fp16 rounding of the same weights passes; PromptSRC's Gaussian averaging moves fp16
# tensors by up to 1.4e-3 relative (its trainers/promptsrc.py averages the whole saved state, frozen tensors
# included); another backbone's weights fail.
FROZEN_RTOL = 2e-3
REGIMES = ("fp16", "fp32")  # the reference's PREC fp16 (every stock config) or fp32/amp


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class ReferenceFile:
    """A Dassl checkpoint as read: its state dict (reference names) and what else the outer dict says."""

    path: Path
    state_dict: OrderedDict[str, torch.Tensor]
    epoch: int | None
    val_result: float | None
    outer_keys: list[str]
    _sha256: str | None = field(default=None, repr=False)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.state_dict.items()}

    @property
    def sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = sha256_file(self.path)
        return self._sha256


def read_reference_file(path: str | Path) -> ReferenceFile:
    """Load a reference trainer's checkpoint (CPU tensors); UserError when it is not one."""
    path = Path(path)
    obj = load_checkpoint_file(path)
    if not isinstance(obj, dict) or not isinstance(obj.get("state_dict"), dict):
        what = f"a dict with keys {sorted(obj)[:5]}" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise UserError(
            f"{path} is not a reference trainer's checkpoint (Dassl writes a dict with 'state_dict' and 'epoch'; "
            f"this holds {what})"
        )
    sd = OrderedDict((str(k).removeprefix("module."), v) for k, v in obj["state_dict"].items())
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise UserError(f"{path}: state_dict entry '{bad[0]}' is not a tensor; not a reference trainer's checkpoint")
    epoch = obj.get("epoch")
    val = obj.get("val_result", obj.get("result"))
    return ReferenceFile(
        path=path,
        state_dict=sd,
        epoch=int(epoch) if isinstance(epoch, int) else None,
        val_result=float(val) if isinstance(val, (int, float)) else None,
        outer_keys=list(obj),
    )


# --- import: reference names -> ours -------------------------------------------------------------------------------
def _examples(names: Sequence[str], n: int = 3) -> str:
    shown = ", ".join(names[:n])
    return shown + (f", … ({len(names)} in all)" if len(names) > n else "")


@dataclass
class MappingProblems:
    """What keeps a file from fitting a method: unknown, missing, reshaped, inconsistent and foreign-frozen tensors."""

    unknown: list[str] = field(default_factory=list)  # in the file, neither ours, a buffer, CLIP nor ignorable
    missing: list[str] = field(default_factory=list)  # reference names of tensors we train that the file lacks
    reshaped: list[str] = field(default_factory=list)  # "name [file shape] vs [our shape]"
    inconsistent: list[str] = field(default_factory=list)  # copies of one shared tensor that differ
    frozen: list[str] = field(default_factory=list)  # frozen CLIP tensors that are not our backbone's

    def __bool__(self) -> bool:
        return bool(self.unknown or self.missing or self.reshaped or self.inconsistent or self.frozen)

    @property
    def size(self) -> int:
        return len(self.unknown) + len(self.missing) + len(self.reshaped) + len(self.inconsistent) + len(self.frozen)

    def line(self) -> str:
        parts = []
        if self.unknown:
            parts.append(f"{len(self.unknown)} unknown ({_examples(self.unknown)})")
        if self.missing:
            parts.append(f"{len(self.missing)} missing ({_examples(self.missing)})")
        if self.reshaped:
            parts.append(f"{len(self.reshaped)} of another shape ({_examples(self.reshaped, 2)})")
        if self.inconsistent:
            parts.append(f"{len(self.inconsistent)} shared copies that differ ({_examples(self.inconsistent, 2)})")
        if self.frozen:
            parts.append(
                f"frozen CLIP tensors not those of this backbone ({_examples(self.frozen, 2)}): trained on another "
                "backbone? pass --backbone and --pretrained as trained"
            )
        return "; ".join(parts)


def _frozen_matches(theirs: torch.Tensor, ours: torch.Tensor) -> bool:
    a = theirs.detach().to("cpu", torch.float32)
    b = ours.detach().to("cpu", theirs.dtype).float()
    scale = float(b.abs().max()) if b.numel() else 0.0
    return bool(torch.allclose(a, b, rtol=FROZEN_RTOL, atol=FROZEN_RTOL * scale + 1e-12))


def from_reference(
    fmt: ReferenceFormat,
    ref_sd: Mapping[str, torch.Tensor],
    method: nn.Module,
    backbone_sd: Mapping[str, torch.Tensor] | None = None,
    n_layers: int = 0,
) -> tuple[dict[str, torch.Tensor], MappingProblems]:
    """Our state (our names, the file's values, cloned) and what did not fit.

    Every parameter `method` trains must be in the file; its other parameters are taken when the file has them (DCP's
    text half). `backbone_sd` (OpenAI names): the frozen CLIP a whole-model file carries is compared with it."""
    problems = MappingProblems()
    expected = method.state_dict()
    trainable = {n for n, p in method.named_parameters() if p.requires_grad}
    rules, consumed, state = fmt.rules, set(), {}
    for key, ours in expected.items():
        names = first_to_reference(rules, key, n_layers)
        if names is None:
            if key in trainable:
                problems.missing.append(f"{key} (no reference name)")
            continue
        present = [n for n in names if n in ref_sd]
        if not present:
            if key in trainable:
                problems.missing.append(names[0])
            continue
        consumed.update(present)
        if len(present) < len(names) and key in trainable:
            problems.missing.extend(n for n in names if n not in ref_sd)
        value = ref_sd[present[0]]
        if tuple(value.shape) != tuple(ours.shape):
            problems.reshaped.append(f"{present[0]} {list(value.shape)} vs {list(ours.shape)}")
            continue
        for other in present[1:]:
            twin = ref_sd[other]
            if tuple(twin.shape) != tuple(value.shape) or not torch.equal(twin, value):
                problems.inconsistent.append(f"{present[0]} vs {other}")
                break
        state[key] = value.detach().clone().contiguous()
    frozen_rules = fmt.frozen_rules
    for key, value in ref_sd.items():
        if key in consumed or key in fmt.deleted_buffers:
            continue
        clip_key = first_to_ours(frozen_rules, key) if frozen_rules else None
        if clip_key is not None:
            if backbone_sd is None:
                continue
            mine = backbone_sd.get(clip_key)
            if mine is None or tuple(mine.shape) != tuple(value.shape) or not _frozen_matches(value, mine):
                problems.frozen.append(key)
            continue
        if fmt.is_ignored(key):
            continue
        problems.unknown.append(key)
    return state, problems


def structurally_fits(fmt: ReferenceFormat, ref_keys: Sequence[str]) -> bool:
    """Whether every key of a file has a place in `fmt` (a rule, a class buffer, frozen CLIP or ignorable) and at least
    one is a tensor the format's method trains: the cheap test before a method is built for the full one."""
    rules, frozen = fmt.rules, fmt.frozen_rules
    hits = 0
    for key in ref_keys:
        if any(r.to_ours(key) is not None for r in rules):
            hits += 1
        elif key in fmt.deleted_buffers or fmt.is_ignored(key):
            continue
        elif not (frozen and first_to_ours(frozen, key) is not None):
            return False
    return hits > 0


# --- export: ours -> reference names -------------------------------------------------------------------------------
def _layer_norm_params(method: nn.Module) -> set[str]:
    out = set()
    for name, module in method.named_modules():
        if isinstance(module, nn.LayerNorm):
            out.update(f"{name}.{p}" if name else p for p, _ in module.named_parameters(recurse=False))
    return out


def regime_dtype(method: nn.Module, fmt: ReferenceFormat, key: str, ref_key: str, regime: str) -> torch.dtype:
    """The dtype the reference holds our tensor `key` (reference name `ref_key`) in under PREC `regime`.

    fp16: the reference's fp16 regime as `Method.to_reference_fp16` reproduces it — fp16 except LayerNorms and the
    method's `reference_fp32` patterns; fp32 (PREC fp32 / amp): fp32 except the format's `fp16_always` (MaPLe's
    ``proj``, halved unconditionally in trainers/maple.py)."""
    if any(fnmatch.fnmatchcase(ref_key, p) for p in fmt.fp16_always):
        return torch.float16
    if regime == "fp32":
        return torch.float32
    if key in _layer_norm_params(method):
        return torch.float32
    patterns = getattr(type(method), "reference_fp32", ())
    return torch.float32 if any(fnmatch.fnmatchcase(key, p) for p in patterns) else torch.float16


def class_buffers(
    method: nn.Module, classnames: Sequence[str], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The reference's token_prefix (C, 1, D) and token_suffix (C, L − 1 − n_ctx, D): views of one (C, L, D) tensor,
    the full-length (not cut after the EOT) token embeddings of "<prefix> <class name>." (KaiyangZhou/CoOp
    trainers/coop.py PromptLearner); None when the method has no class prompts or no class names are known."""
    from mugcp_bench.methods.prompts import ClassPrompts, clean_classname

    prompts = getattr(method, "prompts", None)
    prefix = getattr(method, "prefix", None)
    if not isinstance(prompts, ClassPrompts) or not isinstance(prefix, str) or not classnames:
        return None
    backbone = method.backbone
    tokens = backbone.tokenize([f"{prefix} {clean_classname(c)}." for c in classnames])  # (C, L)
    with torch.no_grad():
        emb = backbone.embed_tokens(tokens).detach().to("cpu", dtype)  # (C, L, D): one storage for both views
    return emb[:, :1, :], emb[:, 1 + prompts.n_ctx :, :]


def to_reference(
    fmt: ReferenceFormat,
    method: nn.Module,
    state: Mapping[str, torch.Tensor],
    classnames: Sequence[str] = (),
    regime: str = "fp16",
    frozen: bool = True,
) -> OrderedDict[str, torch.Tensor]:
    """`state` (our names) as the reference's state_dict: our tensors under its names (a tensor the reference lists
    under several keys is written once, shared), the class buffers of `classnames`, then — `frozen` and a
    whole-model format — the frozen CLIP of `method`'s backbone under its names, each in the regime's dtype."""
    if regime not in REGIMES:
        raise UserError(f"unknown reference precision '{regime}'; use one of {', '.join(REGIMES)}")
    backbone = method.backbone
    n_layers = backbone.vision_layers
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    rules = fmt.rules
    if fmt.whole_model and frozen:
        out["logit_scale"] = torch.empty(0)  # placeholder: the reference lists it first
    for key, value in state.items():
        names = first_to_reference(rules, key, n_layers)
        if names is None:
            raise UserError(f"{type(method).__name__} tensor '{key}' has no name in {fmt.trainer}'s checkpoints")
        dtype = regime_dtype(method, fmt, key, names[0], regime)
        tensor = value.detach().to("cpu", dtype).clone().contiguous()
        for name in names:
            out[name] = tensor
    clip_dtype = torch.float16 if regime == "fp16" else torch.float32  # the buffers are CLIP token embeddings
    buffers = class_buffers(method, classnames, clip_dtype) if fmt.deleted_buffers else None
    if buffers is not None:
        for name, tensor in zip(fmt.deleted_buffers, buffers):
            out[name] = tensor
    if fmt.whole_model and frozen:
        frozen_rules = fmt.frozen_rules
        for clip_key, value in backbone.model.state_dict().items():
            if clip_key.startswith("token_embedding.") or clip_key == "attn_mask":
                continue  # not part of the reference's CustomCLIP
            names = first_to_reference(frozen_rules, clip_key, n_layers)
            if names is None:
                continue
            keep32 = (
                regime == "fp32"
                or not clip_fp16(clip_key)
                or any(fnmatch.fnmatchcase(names[0], p) for p in fmt.frozen_fp32)
            )
            out[names[0]] = value.detach().to("cpu", torch.float32 if keep32 else torch.float16).clone()
        if out["logit_scale"].numel():
            out.move_to_end("logit_scale", last=False)
        else:  # a CustomCLIP without logit_scale (MMRL: its logits use a fixed 100)
            del out["logit_scale"]
    return out


def write_reference_file(
    model_dir: str | Path, fmt: ReferenceFormat, state_dict: Mapping[str, torch.Tensor], epoch: int
) -> Path:
    """``<model_dir>/<learner>/model.pth.tar-<epoch>`` and the ``checkpoint`` file beside it, as Dassl's
    save_checkpoint writes them; ``optimizer`` and ``scheduler`` None (plain data only: no pickled objects, so
    torch's weights-only loading accepts the file), ``val_result`` None (Dassl >= 2022-08-08's shape, ignored by every
    trainer's load_model)."""
    folder = Path(model_dir) / fmt.learner
    name = f"model.pth.tar-{int(epoch)}"
    ckpt = {
        "state_dict": OrderedDict(state_dict),
        "epoch": int(epoch),
        "optimizer": None,
        "scheduler": None,
        "val_result": None,
    }
    atomic_torch_save(ckpt, folder / name)
    atomic_write_text(folder / "checkpoint", f"{name}\n")
    return folder / name


__all__ = [
    "BEST_NAME",
    "CHECKPOINT_NAME",
    "MappingProblems",
    "ReferenceFile",
    "class_buffers",
    "from_reference",
    "read_reference_file",
    "regime_dtype",
    "sha256_file",
    "structurally_fits",
    "to_reference",
    "write_reference_file",
]
