"""The four protocols as data (docs/protocol.md §2) and the dataset suites they run on (the benchmark, the toy world).

The one place protocol names live: `PROTOCOLS` (evaluation protocols, the report's tables), `TRAIN_PROTOCOLS`
(training regimes a recipe names) and `ROLES` (a dataset's parts in a suite). A protocol names the training regime
(`train_protocol`: base2novel, xd or few_shot) and the evaluations done with the trained model. Cross-dataset and
domain generalization share one ImageNet-trained source run ("xd"). A suite is read off the dataset specs: each
declares its group, roles and table order (`DatasetSpec`), so adding a dataset is one file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mugcp_bench.errors import UserError
from mugcp_bench.registry import DATASETS, suggest


@dataclass(frozen=True)
class Suite:
    """Which datasets play which role."""

    name: str
    base2novel: tuple[str, ...]
    source: str
    cross_dataset_targets: tuple[str, ...]
    domain_targets: tuple[str, ...]
    few_shot: tuple[str, ...]

    def all_datasets(self) -> tuple[str, ...]:
        names = [*self.base2novel, self.source, *self.cross_dataset_targets, *self.domain_targets, *self.few_shot]
        return tuple(dict.fromkeys(names))


# A dataset's parts in its suite: the protocols it is trained or evaluated under, and "source" (the dataset the
# cross-dataset and domain-generalization model trains on).
ROLES = ("base2novel", "source", "cross_dataset", "domain_generalization", "few_shot")


def spec_rank(spec) -> tuple[int, int, str]:
    """Sort key of dataset specs: declared table order first, then by name."""
    return (spec.order is None, spec.order or 0, spec.name)


def suite(group: str) -> Suite:
    """The suite of the registered datasets of `group` ("benchmark", "toy"), read off their specs' roles."""
    specs = sorted((s for _, s in DATASETS.items() if s.group == group), key=spec_rank)
    unknown = sorted({r for s in specs for r in s.roles} - set(ROLES))
    if unknown:
        raise ValueError(f"dataset roles {unknown} are not in {ROLES}")

    def playing(role: str) -> tuple[str, ...]:
        return tuple(s.name for s in specs if role in s.roles)

    sources = playing("source")
    if len(sources) != 1:
        raise ValueError(f"suite '{group}' needs exactly one dataset with the 'source' role, has {list(sources)}")
    return Suite(
        name=group,
        base2novel=playing("base2novel"),
        source=sources[0],
        cross_dataset_targets=playing("cross_dataset"),
        domain_targets=playing("domain_generalization"),
        few_shot=playing("few_shot"),
    )


def real_suite() -> Suite:
    """The CoOp-layout benchmark: 11 base-to-novel datasets, ImageNet as the source, 4 ImageNet variants."""
    return suite("benchmark")


def __getattr__(name: str):
    # REAL_SUITE is read off the registered specs on first use (importing them here would be an import cycle)
    if name == "REAL_SUITE":
        return real_suite()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def toy_suite() -> Suite:
    """The toy world's suite (defined by `mugcp_bench.toy.suite.TOY_SUITE`, declared on the toy specs)."""
    return suite("toy")


@dataclass(frozen=True)
class TableShape:
    """How a protocol's report table is laid out; every report module reads this instead of the protocol's name.

    `columns`: what an entry's columns are — "classes" (one per class subset in `classes`, plus HM when
    `harmonic_mean`), "shots" (one per shot count K: runs of every K are one entry) or "single" (one accuracy).
    `source_row`: the accuracy of the same runs on their source dataset is a row of its own, never averaged.
    `rule`: how the Average row is computed ({n}: the number of averaged datasets, {source}: the source's name).
    `plot_prefix`: the stem of the protocol's plot files."""

    columns: str
    rule: str
    classes: tuple[str, ...] = ()
    harmonic_mean: bool = False
    source_row: bool = False
    plot_prefix: str = ""

    def groups(self, present: Sequence[str] = ()) -> list[str]:
        """The column groups of an entry, in display order (`present`: the groups the data has)."""
        if self.columns == "classes":
            return [*self.classes, *(["hm"] if self.harmonic_mean else [])]
        if self.columns == "shots":
            return sorted(set(present), key=int)
        return ["acc"]

    def headline(self, present: Sequence[str] = ()) -> list[str]:
        """The groups an ablation compares: HM, the accuracy, or every K."""
        if self.harmonic_mean:
            return ["hm"]
        return self.groups(present)

    @property
    def metric(self) -> str:
        """The headline metric's name in titles and axis labels."""
        return "HM" if self.harmonic_mean else "accuracy"

    @property
    def shots_in_entry(self) -> bool:
        """Runs of another shot count are another entry (unless the shots are the columns)."""
        return self.columns != "shots"


@dataclass(frozen=True)
class Protocol:
    name: str
    train_protocol: str
    description: str
    title: str  # the report table's title; "{source}" is replaced by the source dataset's display name
    table: TableShape
    # planning: the suite's datasets it runs on by default (a `Suite` field); with `on_source`, one run on the suite's
    # source evaluated on those datasets as targets, else one run per dataset trained on its `train_classes` and
    # evaluated on its own `eval_classes`
    datasets_from: str
    on_source: bool = False
    train_classes: str = "all"
    eval_classes: tuple[str, ...] = ("all",)
    default_shots: tuple[int, ...] = (16,)


_TRANSFER_RULE = "Average = mean over the {n} target datasets; the {source} source row is not averaged."
PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in (
        Protocol(
            "base2novel",
            "base2novel",
            "train on the base half (16 shots), test base and novel classes from the same checkpoint",
            "Base-to-novel generalization",
            TableShape(
                "classes",
                "HM = 2·B·N/(B+N) of the seed-mean Base (B) and Novel (N) accuracy; Average = mean B and mean N over "
                "the {n} datasets and the HM of those two means (not the mean of per-dataset HMs).",
                classes=("base", "novel"),
                harmonic_mean=True,
                plot_prefix="b2n",
            ),
            datasets_from="base2novel",
            train_classes="base",
            eval_classes=("base", "novel"),
        ),
        Protocol(
            "cross_dataset",
            "xd",
            "train on the source (all classes, 16 shots), test on the other datasets",
            "Cross-dataset transfer (source: {source})",
            TableShape("single", _TRANSFER_RULE, source_row=True, plot_prefix="cross_dataset"),
            datasets_from="cross_dataset_targets",
            on_source=True,
        ),
        Protocol(
            "domain_generalization",
            "xd",
            "the cross-dataset source model, tested on the source's shifted domains (V2 / Sketch / A / R)",
            "Domain generalization (source: {source})",
            TableShape("single", _TRANSFER_RULE, source_row=True, plot_prefix="domain_generalization"),
            datasets_from="domain_targets",
            on_source=True,
        ),
        Protocol(
            "few_shot",
            "few_shot",
            "all classes, K in 1, 2, 4, 8, 16 shots",
            "Few-shot classification (all classes)",
            TableShape(
                "shots",
                "Accuracy per K shots per class; Average = mean over the {n} datasets for each K.",
                plot_prefix="few_shot",
            ),  # fmt: skip
            datasets_from="few_shot",
            default_shots=(1, 2, 4, 8, 16),
        ),
    )
}


def short_title(name: str) -> str:
    """ "base-to-novel generalization" for a protocol name; "source" for the source evaluation of an xd run."""
    return PROTOCOLS[name].title.split(" (")[0].lower() if name in PROTOCOLS else name


def train_title(train_protocol: str) -> str:
    """The protocols a training regime serves: "cross-dataset transfer / domain generalization" for "xd"."""
    names = [short_title(p.name) for p in PROTOCOLS.values() if p.train_protocol == train_protocol]
    return " / ".join(names) or train_protocol


# Training regimes a recipe can name: the source run ("xd") serves cross-dataset and domain generalization.
TRAIN_PROTOCOLS = tuple(dict.fromkeys(p.train_protocol for p in PROTOCOLS.values()))


def training_regime(train_protocol: str) -> Protocol:
    """The first protocol trained under `train_protocol`: what that regime trains on (`train_classes`), evaluates
    (`eval_classes`) and its shot counts (`default_shots`), for code that knows a run's regime only (interop)."""
    for p in PROTOCOLS.values():
        if p.train_protocol == train_protocol:
            return p
    raise UserError(f"unknown training regime '{train_protocol}'; one of {', '.join(TRAIN_PROTOCOLS)}")


PROTOCOL_ALIASES = {"b2n": "base2novel", "xd": "cross_dataset", "dg": "domain_generalization", "fewshot": "few_shot"}


def get_protocol(name: str) -> Protocol:
    key = PROTOCOL_ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in PROTOCOLS:
        raise UserError(f"unknown protocol '{name}'.{suggest(key, [*PROTOCOLS, *PROTOCOL_ALIASES])}")
    return PROTOCOLS[key]


@dataclass(frozen=True)
class EvalTarget:
    """One evaluation of a trained model: a dataset's test split on a class subset, tagged with its protocol."""

    protocol: str  # base2novel | source | cross_dataset | domain_generalization | few_shot
    dataset: str
    classes: str  # base | novel | all


@dataclass(frozen=True)
class TrainTarget:
    """What one run trains on."""

    train_protocol: str
    dataset: str
    classes: str  # base | all
    shots: int


def plan_protocol(
    protocol: Protocol, suite: Suite, datasets: tuple[str, ...] | None, shots: tuple[int, ...] | None
) -> list[tuple[TrainTarget, tuple[EvalTarget, ...]]]:
    """Training targets and their evaluations. `datasets` (None = the suite's) are the datasets trained on, or, for a
    protocol trained on the source, the evaluation targets."""
    shots = shots or protocol.default_shots
    chosen = datasets or getattr(suite, protocol.datasets_from)
    out: list[tuple[TrainTarget, tuple[EvalTarget, ...]]] = []
    for k in shots:
        if protocol.on_source:
            targets = [d for d in chosen if d != suite.source]
            evals = (EvalTarget("source", suite.source, "all"), *(EvalTarget(protocol.name, d, "all") for d in targets))
            out.append((TrainTarget(protocol.train_protocol, suite.source, protocol.train_classes, k), evals))
            continue
        for d in chosen:
            evals = tuple(EvalTarget(protocol.name, d, c) for c in protocol.eval_classes)
            out.append((TrainTarget(protocol.train_protocol, d, protocol.train_classes, k), evals))
    return out
