"""`import`: reference checkpoints -> planned runs of ours (everything checked before anything is recorded).

What is read, in order of precedence: the command's flags, the run's ``log.txt`` (Dassl's logger writes the
arguments and the whole yacs config there: KaiyangZhou/Dassl.pytorch@c61a1b5 ``dassl/utils/logger.py``, train.py
``print_args`` / ``print(cfg)``), the folder names of the reference scripts' output trees, the file's tensors.

Trees (docs/interop.md §2.1):

    output/base2new/train_base/<dataset>/shots_<K>[_<W>]/<Trainer>/<cfg>/seed<S>/<learner>/model.pth.tar-<E>
    output/<dataset>/<Trainer>/<cfg>_<K>shots/[nctx<N>_csc<B>_ctp<P>/]seed<S>/<learner>/...   (xd, few-shot)
    output/<dataset>/<K>shots/seed<S>/<learner>/...                                            (CMPA)
    <dataset>/base/seed<S>/<learner>/...                                                       (released zips)

The method comes from the trainer (``--trainer`` in log.txt, the ``<Trainer>`` folder) or, without either, from
the keys: the first method whose `ReferenceFormat` takes every tensor of the file wins.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mugcp_bench.errors import UserError
from mugcp_bench.interop.formats import ReferenceFormat, formats_of
from mugcp_bench.interop.reference import (
    BEST_NAME,
    CHECKPOINT_NAME,
    MappingProblems,
    ReferenceFile,
    from_reference,
    read_reference_file,
    structurally_fits,
)
from mugcp_bench.protocols import training_regime

log = logging.getLogger(__name__)

# Reference backbone names (MODEL.BACKBONE.NAME) -> open_clip architectures with OpenAI's weights.
BACKBONE_NAMES = {
    "ViT-B/16": "ViT-B-16",
    "ViT-B/32": "ViT-B-32",
    "ViT-L/14": "ViT-L-14",
    "ViT-L/14@336px": "ViT-L-14-336",
}
# Trainers of the reference repositories, for messages about files no installed method maps.
KNOWN_TRAINERS = (
    "CoOp",
    "CoCoOp",
    "MaPLe",
    "IVLP",
    "VPT",
    "KgCoOp",
    "TCP",
    "PromptSRC",
    "CMPA",
    "ProGrad",
    "ZeroshotCLIP",
)


# --- finding checkpoints ---------------------------------------------------------------------------------------------
@dataclass
class Found:
    """The checkpoint files of the given paths, and what was passed over."""

    files: list[Path] = field(default_factory=list)
    not_checkpoints: int = 0  # files that are not Dassl checkpoints (logs, TensorBoard events, ...)
    other_epochs: int = 0  # checkpoints of a run other than the one imported (earlier epochs)


def _epoch_of(path: Path) -> int | None:
    m = CHECKPOINT_NAME.match(path.name)
    return int(m.group(1)) if m else None


def _pick(folder: Path, names: list[Path], epoch: int | None) -> Path | None:
    """The file of a learner folder to import: --epoch's, else the one `checkpoint` names, else the last epoch, else
    model-best.pth.tar."""
    if epoch is not None:
        return next((p for p in names if _epoch_of(p) == epoch), None)
    pointer = folder / "checkpoint"
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8", errors="replace").strip()
        chosen = next((p for p in names if p.name == name), None)
        if chosen is not None:
            return chosen
    numbered = sorted((p for p in names if _epoch_of(p) is not None), key=_epoch_of)
    if numbered:
        return numbered[-1]
    return next((p for p in names if p.name == BEST_NAME), None)


def find_checkpoints(paths: Sequence[str | os.PathLike[str]], epoch: int | None = None) -> Found:
    """Checkpoint files under `paths` (files are taken as given; folders are searched for ``model.pth.tar-<E>`` and
    ``model-best.pth.tar``, one per learner folder); UserError for a path that does not exist."""
    found = Found()
    for raw in paths:
        path = Path(raw)
        if path.is_file():
            found.files.append(path)
            continue
        if not path.is_dir():
            raise UserError(f"{path} does not exist; pass a model.pth.tar-N file or a reference output folder")
        by_folder: dict[Path, list[Path]] = {}
        for root, _dirs, files in os.walk(path):
            for name in files:
                file = Path(root) / name
                if CHECKPOINT_NAME.match(name) or name == BEST_NAME:
                    by_folder.setdefault(file.parent, []).append(file)
                elif name != "checkpoint":  # Dassl's pointer to the last file, part of the checkpoint layout
                    found.not_checkpoints += 1
        for folder in sorted(by_folder):
            names = sorted(by_folder[folder])
            chosen = _pick(folder, names, epoch)
            if chosen is None:
                found.other_epochs += len(names)
                continue
            found.files.append(chosen)
            found.other_epochs += len(names) - 1
    return found


# --- what the folders and log.txt say --------------------------------------------------------------------------------
def _norm(text: str) -> str:
    return re.sub(r"[^0-9a-z]", "", text.lower())


def dataset_name(text: str) -> str | None:
    """Our registry name of a reference dataset spelling (folder, config file stem or Dassl class name)."""
    import mugcp_bench.datasets  # noqa: F401 - registers the dataset specs
    from mugcp_bench.registry import DATASETS

    want = _norm(text)
    if not want:
        return None
    for name, spec in DATASETS.items():
        if want in {_norm(name), *(_norm(a) for a in spec.aliases)}:
            return name
    return None


@dataclass
class TreeInfo:
    """What a checkpoint's path says about its run."""

    run_dir: Path
    learner: str
    trainer: str | None = None
    cfg_name: str | None = None
    dataset: str | None = None
    shots: int | None = None
    seed: int | None = None
    base2novel: bool = False
    options: dict[str, str] = field(default_factory=dict)  # yacs key -> value, from folder names


def parse_tree(path: Path, trainers: Iterable[str]) -> TreeInfo:
    """Read run facts off the reference scripts' folder names above a checkpoint file."""
    learner_dir = path.parent
    run_dir = learner_dir.parent
    info = TreeInfo(run_dir=run_dir, learner=learner_dir.name)
    trainers = set(trainers) | set(KNOWN_TRAINERS)
    parts = list(run_dir.parts)
    for i, part in enumerate(parts):
        if m := re.fullmatch(r"seed(\d+)", part):
            info.seed = int(m.group(1))
        elif m := re.fullmatch(r"shots_(\d+)(?:_.*)?", part):  # base2new: shots_16, KgCoOp/TCP: shots_16_8.0
            info.shots = int(m.group(1))
        elif m := re.fullmatch(r"(\d+)[-_]?shots?", part):  # CMPA: 16shots; released few-shot zips: 16shot
            info.shots = int(m.group(1))
        elif part in ("base2new", "train_base", "base"):
            info.base2novel = True
        elif part in trainers:
            info.trainer = part
            if i + 1 < len(parts) and not re.fullmatch(r"seed\d+", parts[i + 1]):
                cfg = parts[i + 1]
                if m := re.fullmatch(r"(.+?)_(\d+)shots", cfg):  # xd / few-shot: <cfg>_<K>shots
                    cfg, info.shots = m.group(1), int(m.group(2))
                info.cfg_name = cfg
        elif m := re.fullmatch(r"nctx(\d+)_csc(True|False)_ctp(\w+)", part):  # CoOp's scripts/coop/main.sh
            info.options.update(
                {
                    "TRAINER.COOP.N_CTX": m.group(1),
                    "TRAINER.COOP.CSC": m.group(2),
                    "TRAINER.COOP.CLASS_TOKEN_POSITION": m.group(3),
                }
            )
        elif (name := dataset_name(part)) is not None:
            info.dataset = name
    return info


def parse_dassl_log(text: str) -> tuple[dict[str, str], dict[str, str]]:
    """(arguments, config) of a Dassl log.txt: ``** Arguments **`` lines ``key: value`` and the ``** Config **`` yacs
    dump flattened to dotted keys, values as printed (strings; the caller converts)."""
    args: dict[str, str] = {}
    cfg: dict[str, str] = {}
    section = None
    stack: list[tuple[int, str]] = []  # open nodes: (indent, key)
    childless: set[str] = set()  # "KEY:" lines seen so far without a child line (a leaf printed with an empty value)

    def close(indent: int) -> None:
        while stack and stack[-1][0] >= indent:
            dotted = ".".join(k for _, k in stack)
            if dotted in childless:
                cfg[dotted] = ""
                childless.discard(dotted)
            stack.pop()

    for line in text.splitlines():
        stripped = line.strip()
        if stripped in ("** Arguments **", "** Config **"):
            close(0)
            section = "args" if stripped == "** Arguments **" else "cfg"
            continue
        if section is None or not stripped or set(stripped) == {"*"}:
            continue
        m = re.match(r"^(\s*)([A-Za-z_][A-Za-z0-9_]*):(?:\s+(.*))?$", line.rstrip())
        if m is None:
            if section == "cfg" and not line.startswith((" ", "-")):
                close(0)
                section = None  # the dump ended (training output follows)
            continue
        indent, key, value = len(m.group(1)), m.group(2), (m.group(3) or "").strip()
        if section == "args":
            if indent == 0:
                args[key] = value
            continue
        close(indent)
        if stack:
            childless.discard(".".join(k for _, k in stack))
        if m.group(3) is None:  # "KEY:" alone: a node whose children follow (or a leaf holding "")
            stack.append((indent, key))
            childless.add(".".join(k for _, k in stack))
        else:
            cfg[".".join([k for _, k in stack] + [key])] = value
    close(0)
    return args, cfg


def read_log(run_dir: Path) -> tuple[dict[str, str], dict[str, str]]:
    path = run_dir / "log.txt"
    if not path.is_file():
        return {}, {}
    try:
        return parse_dassl_log(path.read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return {}, {}


# --- the plan of one import -----------------------------------------------------------------------------------------
@dataclass
class ImportOptions:
    """The flags of `import` (each overrides what the files say)."""

    method: str | None = None
    dataset: str | None = None
    protocol: str | None = None  # base2novel | xd | few_shot (or a protocol name: cross_dataset, ...)
    shots: int | None = None
    seed: int | None = None
    backbone: str | None = None
    pretrained: str | None = None
    recipe: str = "paper"
    sets: Mapping[str, str] = field(default_factory=dict)
    epoch: int | None = None
    device: str = "cpu"


@dataclass
class ImportPlan:
    """One reference checkpoint, checked and mapped: what `record` needs to make it a run of ours."""

    source: Path
    file: ReferenceFile
    format: ReferenceFormat
    method: str
    method_config: Any  # the method's Config dataclass
    train_config: Any  # TrainConfig (its epochs: the file's)
    train_protocol: str
    dataset: str
    classes: str  # base | all
    shots: int
    seed: int
    recipe: str
    backbone: Any  # mugcp_bench.model.backbone.Backbone
    state: dict[str, torch.Tensor]  # ours, ready for Method.load_trainable_state
    n_classes_trained: int | None
    origin: dict[str, str] = field(default_factory=dict)  # fact -> where it was read (flag, log.txt, tree, file, ...)
    reference_config: str = ""  # the reference config it was trained with (log.txt's config_file, or the tree's)
    settings: dict[str, str] = field(default_factory=dict)  # the settings that differ from the recipe (as --set)

    @property
    def epoch(self) -> int:
        return int(self.train_config.epochs)

    @property
    def label(self) -> str:
        return f"{self.method} {self.dataset} {self.classes} {self.shots}-shot seed {self.seed} ({self.source})"

    def imported(self) -> dict[str, Any]:
        """The record's ``imported`` block: where the run came from."""
        repo, _, commit = self.format.repo.partition("@")
        return {
            "path": str(self.source.resolve()),
            "sha256": self.file.sha256,
            "trainer": self.format.trainer,
            "learner": self.format.learner,
            "epoch": self.epoch,
            "config": self.reference_config,
            "repo": repo,
            "commit": commit,
            "val_result": self.file.val_result,
            "n_classes_trained": self.n_classes_trained,
            "read_from": dict(self.origin),
        }


def _train_protocol(name: str) -> str:
    from mugcp_bench.protocols import PROTOCOLS, TRAIN_PROTOCOLS, get_protocol

    if name in TRAIN_PROTOCOLS:
        return name
    key = get_protocol(name).name
    return PROTOCOLS[key].train_protocol


def _is_source(dataset: str) -> bool:
    from mugcp_bench.registry import DATASETS

    return "source" in getattr(DATASETS.get(dataset), "roles", ())


def _applicable(cls: type, fmt: ReferenceFormat) -> bool:
    """A format applies to the class that declares it, and to subclasses whose own defaults it can represent (not
    dcp-paper: its text update has no counterpart in CMPA)."""
    return "reference_checkpoint" in cls.__dict__ or fmt.unrepresentable(cls.Config()) is None


def candidates(method: str | None, trainer: str | None) -> list[tuple[str, ReferenceFormat]]:
    """(method name, format) pairs to try, best first."""
    import mugcp_bench.methods  # noqa: F401 - registers the methods
    from mugcp_bench.registry import METHODS

    if method is not None:
        name = METHODS.canonical(method)
        cls = METHODS.get(name)
        fmts = [f for f in formats_of(cls) if _applicable(cls, f)]
        if not fmts:
            raise UserError(f"{name} has no reference checkpoint format; methods that have one: {', '.join(mapped())}")
        return [(name, f) for f in sorted(fmts, key=lambda f: f.trainer != trainer)]
    out = []
    for name in METHODS.names():
        cls = METHODS.get(name)
        if "reference_checkpoint" not in cls.__dict__:
            continue
        out += [(name, f) for f in formats_of(cls) if not f.secondary]
    if trainer is not None:
        out = [(n, f) for n, f in out if f.trainer == trainer]
        if not out:
            raise UserError(
                f"no installed method reads {trainer} checkpoints (methods that do: {', '.join(mapped())}); "
                "pass --method if the file is one of theirs"
            )
    return sorted(out, key=lambda nf: (nf[0] != (nf[1].trainer or "").lower(),))


def mapped() -> list[str]:
    """'method (Trainer)' of every method with a reference format."""
    import mugcp_bench.methods  # noqa: F401
    from mugcp_bench.registry import METHODS

    out = []
    for name in METHODS.names():
        cls = METHODS.get(name)
        if "reference_checkpoint" in cls.__dict__:
            out.append(f"{name} ({'/'.join(f.trainer for f in formats_of(cls))})")
    return out


def _log_values(fmt: ReferenceFormat, cls: type, options: Mapping[str, str], where: str) -> dict[str, Any]:
    """Our settings from the reference's yacs values (`fmt.options`), converted to our fields' types."""
    from mugcp_bench.methods.base import coerce, config_fields

    fields = config_fields(cls.Config)
    defaults = cls.Config()
    out: dict[str, Any] = {}
    for ours, keys in fmt.options.items():
        keys = (keys,) if isinstance(keys, str) else tuple(keys)
        values = [options[k] for k in keys if k in options]
        if not values or ours not in fields:
            continue
        if len(set(values)) > 1:
            shown = ", ".join(f"{k} {options[k]}" for k in keys if k in options)
            raise UserError(f"{where}: {shown} differ; mugcp-bench's {cls.name} needs them equal ({ours})")
        raw = values[0]
        try:
            out[ours] = coerce(raw, getattr(defaults, ours), ours)
        except UserError:
            raise UserError(f"{where}: {keys[0]} '{raw}' is not a valid {ours} for {cls.name}") from None
    return out


def _assemble(
    name: str,
    fmt: ReferenceFormat,
    ref: ReferenceFile,
    options: Mapping[str, str],
    opts: ImportOptions,
    protocol: str,
    shots: int,
    dataset: str,
    where: str,
) -> tuple[Any, Any, dict[str, str], dict[str, str]]:
    """Method config, TrainConfig, where each setting was read, and the settings that differ from the recipe: recipe
    <- log.txt / folder options <- the file's shapes <- format <- --set."""
    from mugcp_bench.methods.base import TrainConfig, apply_overrides, split_overrides
    from mugcp_bench.registry import METHODS

    cls = METHODS.get(name)
    origin: dict[str, str] = {}
    try:
        recipe = cls.recipe(opts.recipe, protocol, shots, dataset)
    except UserError:
        recipe = {}
        origin["recipe"] = f"none ({cls.name} has no '{opts.recipe}' recipe for {protocol}): defaults"
    rm, rt = split_overrides(cls, recipe)
    for yacs, value in fmt.fixed_options.items():  # e.g. language-only IVLP: no vision prompt at all
        if yacs in options and options[yacs].strip().lower() != str(value).lower():
            raise _NotThisFormat(f"log.txt says {yacs} {options[yacs]}, {cls.name} has {value}")
    from_log = _log_values(fmt, cls, options, where)
    try:
        from_file = fmt.read_config(ref.shapes)
    except (KeyError, IndexError) as e:
        raise _NotThisFormat(f"1 missing ({str(e).strip(chr(39))}, which sizes its settings)") from None
    um, ut = split_overrides(cls, _sets_for(cls, opts.sets))
    clash = sorted(k for k in um if k in from_file and str(from_file[k]).lower() != str(um[k]).lower())
    if clash:
        k = clash[0]
        raise UserError(f"--set {k}={um[k]} contradicts the checkpoint, whose tensors say {k}={from_file[k]}")
    cfg = apply_overrides(cls.make_config({**rm, **from_log, **from_file}), um, cls.name)
    problem = fmt.unrepresentable(cfg)
    if problem:
        raise UserError(f"{where}: {problem}")
    for k in from_log:
        origin[k] = "log.txt / folder names"
    for k in from_file:
        origin[k] = "checkpoint"
    base_t = apply_overrides(TrainConfig(), rt, "training")
    tcfg = apply_overrides(base_t, {"epochs": ref.epoch or 1}, "training")
    tcfg = apply_overrides(tcfg, {k: v for k, v in ut.items() if k != "epochs"}, "training")
    # What the run path must set on top of the recipe: the settings that differ from it, less those the model ignores
    # under this config (a sweep refuses a setting the model would not use).
    base_m = cls.make_config(rm)
    ignored = set(getattr(cls, "ignored_settings", lambda c: {})(cfg))
    settings = {k: _setting(v) for k, v in asdict(cfg).items() if v != getattr(base_m, k) and k not in ignored}
    settings |= {k: _setting(v) for k, v in asdict(tcfg).items() if v != getattr(base_t, k)}
    return cfg, tcfg, origin, settings


def _sets_for(cls: type, sets: Mapping[str, str]) -> dict[str, str]:
    """The --set values that apply to method `cls`: its scoped ones (``dcp.depth=3``) and the unscoped ones it has."""
    from mugcp_bench.methods.base import TrainConfig, config_fields
    from mugcp_bench.registry import METHODS

    known = set(config_fields(cls.Config)) | set(config_fields(TrainConfig))
    out = {}
    for key, value in sets.items():
        scope, _, name = key.rpartition(".")
        if scope:
            if METHODS.canonical(scope) == cls.name:
                out[name] = value  # unknown names: split_overrides says so, with a did-you-mean
        elif key in known:
            out[key] = value
    return out


class _NotThisFormat(Exception):
    """A format whose config cannot even be read off the file (a tensor it sizes a setting from is absent)."""


def _placeholder_classes(fmt: ReferenceFormat, ref: ReferenceFile) -> list[str]:
    """Class names to build the method with: as many as the file's class buffers have rows (CoOp's class-specific
    context is sized by them); the names never matter for the mapping."""
    rows = next((ref.shapes[b][0] for b in fmt.deleted_buffers if b in ref.shapes), 1)
    return [f"class {i}" for i in range(max(int(rows), 1))]


def _backbone_for(opts: ImportOptions, cfg: Mapping[str, str], cache: dict) -> tuple[Any, dict[str, str]]:
    from mugcp_bench.model.backbone import load_backbone

    origin = {}
    name = opts.backbone
    if name is None and cfg.get("MODEL.BACKBONE.NAME"):
        ref_name = cfg["MODEL.BACKBONE.NAME"].strip().strip("'\"")
        name = BACKBONE_NAMES.get(ref_name)
        if name is None:
            raise UserError(
                f"the run's log.txt says MODEL.BACKBONE.NAME {ref_name}, which mugcp-bench cannot build (ViT towers "
                "only); pass --backbone"
            )
        origin["backbone"] = "log.txt"
    if name is None:
        name, origin["backbone"] = "ViT-B-16", "default (the reference configs' backbone)"
    pretrained = opts.pretrained or ("openai" if name in BACKBONE_NAMES.values() else "random")
    key = (name, pretrained)
    if key not in cache:  # on the CPU: mapping and checking need no GPU (evaluation loads its own on --device)
        cache[key] = load_backbone(name, pretrained, device="cpu")
    return cache[key], origin


def plan_one(path: Path, opts: ImportOptions, backbones: dict) -> ImportPlan:
    """Read, identify, configure and map one checkpoint; UserError (one line naming the file) when it does not fit."""
    import mugcp_bench.methods  # noqa: F401
    from mugcp_bench.registry import METHODS

    ref = read_reference_file(path)
    trainers = {f.trainer for n in METHODS.names() for f in formats_of(METHODS.get(n))}
    tree = parse_tree(path, trainers)
    args, cfg = read_log(tree.run_dir)
    options = {**tree.options, **cfg}
    origin: dict[str, str] = {}

    def pick(fact: str, *sources: tuple[str, Any]) -> Any:
        for where, value in sources:
            if value is not None:
                origin[fact] = where
                return value
        return None

    trainer = pick("trainer", ("log.txt", args.get("trainer") or None), ("folder names", tree.trainer))
    log_dataset = None
    if args.get("dataset_config_file"):
        log_dataset = dataset_name(Path(args["dataset_config_file"]).stem)
    log_dataset = log_dataset or (dataset_name(cfg["DATASET.NAME"]) if cfg.get("DATASET.NAME") else None)
    flag_dataset = None
    if opts.dataset is not None:
        flag_dataset = dataset_name(opts.dataset)
        if flag_dataset is None:
            from mugcp_bench.registry import DATASETS

            DATASETS.canonical(opts.dataset)  # UserError with a did-you-mean
            flag_dataset = opts.dataset
    dataset = pick("dataset", ("--dataset", flag_dataset), ("log.txt", log_dataset), ("folder names", tree.dataset))
    if dataset is None:
        raise UserError(
            f"{path}: which dataset was it trained on? Neither its folders nor a log.txt say; pass --dataset"
        )
    subsample = (cfg.get("DATASET.SUBSAMPLE_CLASSES") or "").strip().lower()
    if opts.protocol is not None:
        protocol = pick("protocol", ("--protocol", _train_protocol(opts.protocol)))
    elif tree.base2novel or subsample == "base":
        protocol = pick("protocol", ("folder names" if tree.base2novel else "log.txt", "base2novel"))
    else:
        source = _is_source(dataset)
        protocol = pick(
            "protocol", (f"{dataset} {'is' if source else 'is not'} the source", "xd" if source else "few_shot")
        )
    log_shots = int(cfg["DATASET.NUM_SHOTS"]) if re.fullmatch(r"\d+", cfg.get("DATASET.NUM_SHOTS", "")) else None
    regime_shots = training_regime(protocol).default_shots  # one shot count (base2novel, xd) or a choice (few-shot)
    default_shots = regime_shots[0] if len(regime_shots) == 1 else None
    shots = pick(
        "shots",
        ("--shots", opts.shots),
        ("log.txt", log_shots),
        ("folder names", tree.shots),
        ("default", default_shots),
    )
    if shots is None:
        raise UserError(f"{path}: how many shots was it trained with? Its folders do not say; pass --shots")
    log_seed = args.get("seed") or cfg.get("SEED")
    log_seed = int(log_seed) if log_seed and re.fullmatch(r"-?\d+", log_seed) else None
    seed = pick("seed", ("--seed", opts.seed), ("log.txt", log_seed if log_seed and log_seed >= 0 else None),
                ("folder names", tree.seed))  # fmt: skip
    if seed is None:
        raise UserError(f"{path}: which seed? Its folders (seed<S>) do not say; pass --seed")
    backbone, b_origin = _backbone_for(opts, cfg, backbones)
    origin.update(b_origin)
    clip_sd = {k: v for k, v in backbone.model.state_dict().items()}
    where = str(path)
    tried: list[tuple[str, ReferenceFormat, MappingProblems | str]] = []
    by_keys = opts.method is None and trainer is None  # identify by the keys: only formats that take every key
    for name, fmt in candidates(opts.method, trainer):
        if by_keys and not structurally_fits(fmt, list(ref.state_dict)):
            continue
        try:
            m_cfg, t_cfg, c_origin, settings = _assemble(name, fmt, ref, options, opts, protocol, shots, dataset, where)
        except _NotThisFormat as e:
            tried.append((name, fmt, str(e)))
            continue
        cls = METHODS.get(name)
        from mugcp_bench.registry import DATASETS

        template = DATASETS.get(dataset).template
        try:
            method = cls(backbone, _placeholder_classes(fmt, ref), m_cfg, template=template, dataset=dataset)
        except UserError as e:  # settings this backbone cannot hold: the next candidate, or this line
            if by_keys:
                tried.append((name, fmt, str(e)))
                continue
            raise UserError(f"{where}: {e}") from None
        state, problems = from_reference(fmt, ref.state_dict, method, clip_sd, backbone.vision_layers)
        if problems:
            tried.append((name, fmt, problems))
            continue
        try:
            method.load_trainable_state(state, source=where)
        except UserError as e:
            tried.append((name, fmt, str(e)))
            continue
        n_cls = next((ref.shapes[b][0] for b in fmt.deleted_buffers if b in ref.shapes), None)
        origin.update(c_origin)
        origin["method"] = "--method" if opts.method else (f"trainer {trainer}" if trainer else "the checkpoint's keys")
        return ImportPlan(
            source=path,
            file=ref,
            format=fmt,
            method=name,
            method_config=m_cfg,
            train_config=t_cfg,
            train_protocol=protocol,
            dataset=dataset,
            classes=training_regime(protocol).train_classes,
            shots=int(shots),
            seed=int(seed),
            recipe=opts.recipe,
            backbone=backbone,
            state=state,
            n_classes_trained=int(n_cls) if n_cls is not None else None,
            origin=origin,
            reference_config=args.get("config_file") or tree.cfg_name or "",
            settings=settings,
        )
    raise UserError(_no_fit(path, ref, tried, trainer))


def _no_fit(path: Path, ref: ReferenceFile, tried: list, trainer: str | None) -> str:
    mapped_problems = [(n, f, p) for n, f, p in tried if isinstance(p, MappingProblems)]
    if mapped_problems:
        name, fmt, problems = min(mapped_problems, key=lambda t: t[2].size)
        return f"{path} does not fit {name} ({fmt.trainer}): {problems.line()}"
    if tried and trainer is not None:
        name, fmt, why = tried[0]
        return (
            f"{path} is not a {fmt.trainer} checkpoint mugcp-bench can read ({why}); pass --method if it is another's"
        )
    keys = list(ref.state_dict)
    shown = ", ".join(keys[:4]) + (f", … ({len(keys)} tensors)" if len(keys) > 4 else "")
    return (
        f"{path} matches no reference format mugcp-bench maps (its tensors: {shown}); methods with one: "
        f"{', '.join(mapped())}; pass --method to see what does not fit"
    )


def _check_sets(sets: Mapping[str, str], plans: Sequence[ImportPlan]) -> None:
    """An unscoped --set that no imported method has is a typo: one line, with the settings they have."""
    from mugcp_bench.methods.base import TrainConfig, config_fields
    from mugcp_bench.registry import METHODS, suggest

    known = set(config_fields(TrainConfig))
    for plan in plans:
        known |= set(config_fields(METHODS.get(plan.method).Config))
    for key in sets:
        if "." not in key and key not in known:
            methods = ", ".join(sorted({p.method for p in plans}))
            raise UserError(f"unknown setting '{key}' for {methods}.{suggest(key, sorted(known))}")


def plan_imports(paths: Sequence[str | os.PathLike[str]], opts: ImportOptions) -> tuple[list[ImportPlan], Found]:
    """Every checkpoint under `paths`, planned; a UserError at the first that does not fit (nothing is recorded
    before all are checked)."""
    found = find_checkpoints(paths, opts.epoch)
    if not found.files:
        raise UserError(
            f"no checkpoint (model.pth.tar-N or model-best.pth.tar) under {', '.join(map(str, paths))}"
            + (f" ({found.not_checkpoints} other files)" if found.not_checkpoints else "")
        )
    backbones: dict = {}
    plans = [plan_one(p, opts, backbones) for p in found.files]
    _check_sets(opts.sets, plans)
    seen: dict[tuple, Path] = {}
    for plan in plans:
        key = (plan.method, plan.dataset, plan.train_protocol, plan.shots, plan.seed, repr(asdict(plan.method_config)))
        if key in seen:
            raise UserError(
                f"{plan.source} and {seen[key]} are the same run ({plan.method}, {plan.dataset}, seed {plan.seed}); "
                "import one of them (--epoch picks a file)"
            )
        seen[key] = plan.source
    return plans, found


__all__ = [
    "Found",
    "ImportOptions",
    "ImportPlan",
    "TreeInfo",
    "candidates",
    "dataset_name",
    "find_checkpoints",
    "parse_dassl_log",
    "parse_tree",
    "plan_imports",
    "plan_one",
]


# --- recording: the run path's imported runs ----------------------------------------------------------------
def _setting(value: Any) -> str:
    return "true" if value is True else "false" if value is False else str(value)


def imported_models(plans: Sequence[ImportPlan]) -> list[Any]:
    """The run path's `ImportedModel`s of `plans`: the state, the settings that differ from the recipe (the file's
    epochs among them, so the record says what the reference trained), and the `imported` block."""
    from mugcp_bench.runs.imported import ImportedModel

    out = []
    for plan in plans:
        out.append(
            ImportedModel(
                method=plan.method,
                train_dataset=plan.dataset,
                train_protocol=plan.train_protocol,
                shots=plan.shots,
                seed=plan.seed,
                state=plan.state,
                settings=dict(plan.settings),
                source=plan.imported(),
            )
        )
    return out


def record_imports(plans: Sequence[ImportPlan], reporter: Any = None, **sweep: Any) -> list[Any]:
    """Record every plan as an imported run and evaluate it (`mugcp_bench.runs.imported`): one call per backbone,
    with the sweep options `sweep` (results_dir, data_root, device, force, executor, ...). Returns the SweepResults."""
    from mugcp_bench.runs.imported import evaluate_imported

    groups: dict[tuple[str, str], list[ImportPlan]] = {}
    for plan in plans:
        groups.setdefault((plan.backbone.name, plan.backbone.pretrained), []).append(plan)
    results = []
    for (name, pretrained), group in groups.items():
        results.append(
            evaluate_imported(
                imported_models(group),
                reporter=reporter,
                backbone=name,
                pretrained=pretrained,
                recipe=group[0].recipe,
                seeds=",".join(str(s) for s in sorted({p.seed for p in group})),
                **sweep,
            )
        )
    return results
