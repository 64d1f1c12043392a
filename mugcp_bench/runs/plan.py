"""Planning: expand methods × protocols × datasets × shots × seeds (× ablation variants) into keyed runs, each with
its resolved configs and the one decision of what it needs (`decide_action`).

Every run is self-contained: it reads its key and config, writes only its own run directory and the shared
content-keyed caches, and never depends on another run having happened in the same process — so any executor can
take the plan.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from mugcp_bench.errors import UserError
from mugcp_bench.methods.base import Method, TrainConfig, apply_overrides, split_overrides
from mugcp_bench.model.backbone import Backbone
from mugcp_bench.protocols import EvalTarget, Protocol, Suite, TrainTarget, plan_protocol
from mugcp_bench.registry import COMPOSE, METHODS, PLUGINS, suggest
from mugcp_bench.runs.options import RunSettings
from mugcp_bench.runs.settings import check_ranges
from mugcp_bench.store.claims import claim_is_live
from mugcp_bench.store.records import RunKey, RunRecord, RunStatus, config_hash

log = logging.getLogger(__name__)


# overrides that change how a run is done, not what it computes: left out of its label
QUIET_OVERRIDES = frozenset({"describe_missing"})


class Action(str, Enum):
    """What a planned run needs."""

    TRAIN = "train"  # from scratch (new, forced, or nothing to resume from)
    RESUME = "resume"  # from the run's last checkpoint
    EVALUATE = "evaluate"  # complete, but evaluations are missing: evaluate the stored model
    SKIP = "skip"  # complete with every evaluation
    CLAIMED = "claimed"  # another process holds a live claim on it: left to that process

    def __str__(self) -> str:
        return self.value


WORK = (Action.TRAIN, Action.RESUME, Action.EVALUATE)  # the actions an executor is handed


@dataclass
class PlannedRun:
    key: RunKey
    method: str
    variant: str
    method_config: Any
    train_config: TrainConfig
    train: TrainTarget
    evals: tuple[EvalTarget, ...]
    record: RunRecord
    action: Action = Action.TRAIN
    # the user's settings (--set / --grid) that apply to this run, as given: what tells it apart from the recipe's run
    overrides: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def label(self) -> str:
        k = self.key
        label = f"{k.method_label} {k.train_dataset} {k.classes} {k.shots}-shot seed {k.seed}"
        shown = {s: v for s, v in self.overrides.items() if s not in QUIET_OVERRIDES}
        return label + (f" ({', '.join(f'{s}={v}' for s, v in shown.items())})" if shown else "")

    def config(self) -> dict[str, Any]:
        """The resolved settings the run trains with: {"method": {...}, "train": {...}}."""
        return {"method": dataclasses.asdict(self.method_config), "train": dataclasses.asdict(self.train_config)}

    def missing_evaluations(self) -> list[EvalTarget]:
        return [e for e in self.evals if not self.record.has_evaluation(e.protocol, e.dataset, e.classes)]


def hashed(cfg: Any) -> dict[str, Any]:
    """A config as its run's config hash sees it: every field, except settings added after runs were recorded
    (field metadata `added`) while at their default, so that a new setting never changes the ids of earlier runs."""
    out = asdict(cfg)
    for f in dataclasses.fields(cfg):
        if f.metadata.get("added") and out[f.name] == f.default:
            del out[f.name]
    return out


def decide_action(run: PlannedRun, settings: RunSettings, claimed_elsewhere: bool = False) -> Action:
    """The one rule for what a run needs, read off its record and its claim. The planner asks it with the claim as the
    store has it; the job asks it again once it holds the claim (then nobody else does)."""
    if claimed_elsewhere:
        return Action.CLAIMED
    status = run.record.status
    if run.key.origin == "imported":  # nothing to train: its model is the imported checkpoint
        return Action.EVALUATE if run.missing_evaluations() else Action.SKIP
    if settings.force or status == RunStatus.NEW:
        return Action.TRAIN
    if status == RunStatus.COMPLETE:
        if not run.missing_evaluations():
            return Action.SKIP
        return Action.EVALUATE if run.record.model_path.is_file() else Action.TRAIN
    # running with nobody on it (its process died), failed, or interrupted: resume from the last checkpoint
    if settings.resume and run.record.checkpoint_path.is_file():
        return Action.RESUME
    return Action.TRAIN


def resolve_methods(names: Sequence[str]) -> list[str]:
    """Registry names of `names` (wildcards and "all" expanded), each once, in the order given. A wildcard matches
    compositions with plug-ins only when it has a '+' itself: 'co*' is coop and cocoop, '*+dept' every composition with
    dept; "all" is every method."""
    out = []
    for n in names:
        if n.strip().lower() == "all":  # every method, no plug-in compositions (the default set: no --methods)
            n = "*"
        if "*" in n or "?" in n:
            matched = [m for m in METHODS.names(n.strip().lower()) if COMPOSE not in m or COMPOSE in n]
            if not matched:
                raise UserError(f"no method matches '{n}'; run 'mugcp-bench list methods'")
            out.extend(matched)
        else:
            out.append(METHODS.canonical(n))
    return list(dict.fromkeys(out))


def variant_overrides(method_cls: type[Method], drop: str) -> dict[str, Any]:
    """Config overrides of ablation `drop` (variant `no-<drop>`)."""
    if drop not in method_cls.ablations:
        names = list(method_cls.ablations)
        raise UserError(
            f"method '{method_cls.name}' has no ablation '{drop}'.{suggest(drop, names)} "
            f"Ablations: {', '.join(names) or 'none'}"
        )
    return dict(method_cls.ablations[drop])


def setting_scope(scope: str) -> tuple[str, str]:
    """What the scope of a --set key names: ("method", its registry name; a composition too: "coop+dept") or
    ("plugin", the plug-in's name: `dept.head_weight` reaches every composition with dept)."""
    key = scope.strip().lower()
    if COMPOSE not in key and key not in METHODS.known_names() and key in PLUGINS.known_names():
        return "plugin", PLUGINS.canonical(key)
    return "method", METHODS.canonical(scope)


def method_overrides(method_cls: type[Method], user: Mapping[str, str]) -> dict[str, str]:
    """The --set / --grid settings of a sweep that apply to one method: the unscoped ones (for a method that trains
    nothing, not the training settings: they would be recorded for a run they do not change), those scoped to a
    plug-in it is composed with (`dept.head_weight=0.5`, that plug-in's own settings) and those scoped to it
    (`maple.prompt_depth=3`, `coop+dept.n_ctx=4`); where one setting is given at several of these, the narrowest
    scope wins."""
    training = {f.name for f in dataclasses.fields(TrainConfig)} - {"eval_batch_size"}
    plugin_settings = getattr(method_cls, "plugin_settings", {})
    found: dict[str, tuple[int, str]] = {}
    for key, value in user.items():
        scope, _, name = key.rpartition(".")
        if scope:
            kind, target = setting_scope(scope)
            if kind == "method" and target != method_cls.name:
                continue
            if kind == "plugin" and name not in plugin_settings.get(target, ()):
                continue
            rank = 2 if kind == "method" else 1
        elif not method_cls.trains and name in training:
            continue
        else:
            rank = 0
        if name not in found or rank >= found[name][0]:
            found[name] = (rank, value)
    return {name: value for name, (_, value) in found.items()}


def check_overrides(methods: Sequence[str], user: Mapping[str, str]) -> None:
    """Every --set / --grid key names a setting of the methods it applies to (UserError naming which methods have
    it, and the scoped form), before anything is planned."""
    classes = {m: METHODS.get(m) for m in methods}
    settings = {m: {f.name for f in dataclasses.fields(c.Config)} | {f.name for f in dataclasses.fields(TrainConfig)}
                for m, c in classes.items()}  # fmt: skip
    training = {f.name for f in dataclasses.fields(TrainConfig)} - {"eval_batch_size"}
    for key, value in user.items():
        scope, _, name = key.rpartition(".")
        if scope and setting_scope(scope)[0] == "plugin":
            check_plugin_setting(setting_scope(scope)[1], name, key, value, classes)
            continue
        if scope:
            method = METHODS.canonical(scope)
            if method not in classes:
                raise UserError(
                    f"--set {key}={value}: {method} is not among the methods of this sweep ({', '.join(classes)})"
                )
            if not classes[method].trains and name in training:
                raise UserError(f"--set {key}={value}: {method} trains nothing, so {name} would change nothing")
            if name not in settings[method]:
                raise UserError(
                    f"unknown setting '{name}' for method '{method}'.{suggest(name, settings[method])} "
                    f"Settings: {', '.join(sorted(settings[method]))}"
                )
            continue
        lacking = [m for m, names in settings.items() if name not in names]
        if not lacking:
            continue
        having = [m for m, names in settings.items() if name in names]
        if having:
            scoped = " ".join(f"--set {m}.{name}={value}" for m in having)
            owners = {p for m in having for p, own in getattr(classes[m], "plugin_settings", {}).items() if name in own}
            if len(owners) == 1:  # a plug-in's setting: its scope reaches every composition with it
                scoped = f"--set {owners.pop()}.{name}={value}"
            raise UserError(
                f"--set {name}={value}: {name} is a setting of {', '.join(having)}, not of {', '.join(lacking)}; "
                f"scope it: {scoped}"
            )
        known = sorted(set().union(*settings.values()))
        if len(classes) == 1:
            raise UserError(
                f"unknown setting '{name}' for method '{lacking[0]}'.{suggest(name, known)} "
                f"Settings: {', '.join(known)}"
            )
        raise UserError(f"unknown setting '{name}' for methods {', '.join(classes)}.{suggest(name, known)}")


def check_plugin_setting(plugin: str, name: str, key: str, value: str, classes: Mapping[str, type[Method]]) -> None:
    """A --set scoped to a plug-in (`dept.head_weight=0.5`) names one of its own settings, and the sweep composes it
    with a method; UserError otherwise (the inner method's settings are scoped to the composition)."""
    users = [m for m, c in classes.items() if plugin in getattr(c, "plugin_names", ())]
    if not users:
        wraps = getattr(PLUGINS.get(plugin), "wraps", ()) or ("coop",)
        raise UserError(
            f"--set {key}={value}: no method of this sweep ({', '.join(classes)}) is composed with the plug-in "
            f"{plugin}; compose one, e.g. --methods {wraps[0]}{COMPOSE}{plugin}"
        )
    own = sorted(classes[users[0]].plugin_settings[plugin])
    if name not in own:
        raise UserError(
            f"unknown setting '{name}' for the plug-in {plugin}.{suggest(name, own)} Its settings: {', '.join(own)}; "
            f"the other settings of a composition are scoped to it: --set {users[0]}.{name}={value}"
        )


def resolve_configs(
    method_cls: type[Method], recipe: str, train: TrainTarget, variant_cfg: dict[str, Any], user: Mapping[str, str]
) -> tuple[Any, TrainConfig]:
    """Method config and TrainConfig: defaults <- recipe <- ablation variant <- --set overrides (those that apply to
    the method). A user's setting that the resulting config ignores is refused (`Method.ignored_settings`)."""
    rm, rt = split_overrides(method_cls, method_cls.recipe(recipe, train.train_protocol, train.shots, train.dataset))
    um, ut = split_overrides(method_cls, method_overrides(method_cls, user))
    cfg = method_cls.make_config({**rm, **variant_cfg})
    cfg = apply_overrides(cfg, um, method_cls.name)
    tcfg = apply_overrides(apply_overrides(TrainConfig(), rt, "training"), ut, "training")
    check_ranges(tcfg, "training")  # every setting within its range, at planning time (runs/settings.py)
    check_ranges(cfg, f"method '{method_cls.name}'")
    ignored = method_cls.ignored_settings(cfg)
    for key, value in um.items():
        if key in ignored:
            raise UserError(f"--set {key}={value}: {ignored[key]}")
    return cfg, tcfg


def plan(
    settings: RunSettings,
    backbone: Backbone,
    methods: Sequence[str],
    protocols: Sequence[Protocol],
    suite: Suite,
    datasets: tuple[str, ...] | None,
    shots: tuple[int, ...] | None,
    seeds: Sequence[int],
    variants: dict[str, list[str]] | None = None,
    origin: str = "trained",
) -> list[PlannedRun]:
    """Keyed runs with their configs and actions; cross-dataset and domain generalization share the source run.
    Every run's method is built once on the backbone with its full config here, so a setting the backbone cannot
    hold stops the sweep before the first run trains. `origin="imported"`: runs whose model is a reference checkpoint
    (`mugcp-bench import`), evaluated, never trained."""
    runs: dict[str, PlannedRun] = {}
    built: set[str] = set()
    for name in methods:
        method_cls = METHODS.get(name)
        for drop in [""] + list((variants or {}).get(name, [])):
            vcfg = variant_overrides(method_cls, drop) if drop else {}
            variant = f"no-{drop}" if drop else ""
            for protocol in protocols:
                for train, evals in plan_protocol(protocol, suite, datasets, shots):
                    for seed in seeds:
                        cfg, tcfg = resolve_configs(method_cls, settings.recipe, train, vcfg, settings.overrides)
                        key = RunKey(
                            train_protocol=train.train_protocol,
                            method=name,
                            variant=variant,
                            recipe=settings.recipe,
                            backbone=backbone.name,
                            pretrained=backbone.pretrained if not Path(backbone.pretrained).exists() else "file",
                            weights=backbone.weights_hash[:12],
                            train_dataset=train.dataset,
                            classes=train.classes,
                            shots=train.shots,
                            seed=seed,
                            precision=settings.precision,
                            config_hash=config_hash([hashed(cfg), hashed(tcfg), backbone.transform_version]),
                            activation=backbone.activation,
                            origin=origin,
                        )
                        if key.config_hash not in built:
                            check_buildable(method_cls, cfg, backbone, train.dataset)
                            built.add(key.config_hash)
                        if key.id in runs:  # cross-dataset + DG share the source run: merge evaluations
                            prev = runs[key.id]
                            prev.evals = tuple(dict.fromkeys([*prev.evals, *evals]))
                            continue
                        record = RunRecord(settings.results_dir, key)
                        applied = method_overrides(method_cls, settings.overrides)
                        runs[key.id] = PlannedRun(
                            key, name, variant, cfg, tcfg, train, evals, record, overrides=applied
                        )
    check_records(list(runs.values()), settings.force)
    for run in runs.values():
        run.action = decide_action(run, settings, claim_is_live(run.record.dir, settings.claim_timeout))
    return list(runs.values())


def check_buildable(method_cls: type[Method], cfg: Any, backbone: Backbone, dataset: str) -> None:
    """Build the method with its config on the backbone (two stand-in class names): what its constructor refuses
    (a depth the backbone cannot hold, heads that do not divide a width, ...) is a UserError now, not after other runs
    trained. The method is dropped at once."""
    import torch

    from mugcp_bench.datasets.base import get_spec

    spec = get_spec(dataset)
    with torch.no_grad():
        method_cls(backbone, ["stand-in class", "another class"], cfg, template=spec.template, dataset=spec.name)


def check_records(runs: Sequence[PlannedRun], force: bool) -> None:
    """The store's rule for run.json files that cannot be used: a damaged one is retrained (one warning line each;
    the file is kept aside as run.json.corrupt when the run starts); one of another schema is refused (UserError)
    unless --force retrains it."""
    foreign = [r.record.problem for r in runs if r.record.problem is not None and r.record.problem.kind == "schema"]
    if foreign and not force:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise UserError(
            f"{foreign[0].line()}{more}: upgrade mugcp-bench to use it, or pass --force to retrain (the old record is "
            "kept aside)"
        )
    for r in runs:
        if r.record.problem is not None and r.record.problem.kind == "damaged":
            log.warning("%s: it is kept as run.json.corrupt and the run trained again", r.record.problem.line())


def summarize(runs: Sequence[PlannedRun]) -> dict[str, int]:
    """Counts by action: {"runs": N, "train": .., "skip": .., ...}."""
    out = {"runs": len(runs)}
    for r in runs:
        out[r.action.value] = out.get(r.action.value, 0) + 1
    return out


__all__ = [
    "WORK",
    "Action",
    "PlannedRun",
    "check_records",
    "decide_action",
    "plan",
    "resolve_configs",
    "resolve_methods",
    "summarize",
    "variant_overrides",
]
