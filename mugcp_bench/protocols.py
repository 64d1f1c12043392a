"""The four protocols as data (docs/protocol.md §2) and the dataset suites they run on (the benchmark, the toy world).

The one place protocol names live: `PROTOCOLS` (evaluation protocols, the report's tables), `TRAIN_PROTOCOLS`
(training regimes a recipe names) and `ROLES` (a dataset's parts in a suite). A protocol names the training regime
(`train_protocol`: base2novel, xd or few_shot) and the evaluations done with the trained model. Cross-dataset and
domain generalization share one ImageNet-trained source run ("xd"). A suite is read off the dataset specs: each
declares its group, roles and table order (`DatasetSpec`), so adding a dataset is one file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
class Protocol:
    name: str
    train_protocol: str
    description: str
    title: str  # the report table's title; "{source}" is replaced by the source dataset's display name
    default_shots: tuple[int, ...] = (16,)
    eval_tags: tuple[str, ...] = field(default=())


PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in (
        Protocol(
            "base2novel",
            "base2novel",
            "train on the base half (16 shots), test base and novel classes from the same checkpoint",
            "Base-to-novel generalization",
        ),
        Protocol(
            "cross_dataset",
            "xd",
            "train on the source (all classes, 16 shots), test on the other datasets",
            "Cross-dataset transfer (source: {source})",
        ),
        Protocol(
            "domain_generalization",
            "xd",
            "the cross-dataset source model, tested on the source's shifted domains (V2 / Sketch / A / R)",
            "Domain generalization (source: {source})",
        ),
        Protocol(
            "few_shot",
            "few_shot",
            "all classes, K in 1, 2, 4, 8, 16 shots",
            "Few-shot classification (all classes)",
            default_shots=(1, 2, 4, 8, 16),
        ),
    )
}
PROTOCOL_NAMES = tuple(PROTOCOLS)


def short_title(name: str) -> str:
    """ "base-to-novel generalization" for a protocol name; "source" for the source evaluation of an xd run."""
    return PROTOCOLS[name].title.split(" (")[0].lower() if name in PROTOCOLS else name


def train_title(train_protocol: str) -> str:
    """The protocols a training regime serves: "cross-dataset transfer / domain generalization" for "xd"."""
    names = [short_title(p.name) for p in PROTOCOLS.values() if p.train_protocol == train_protocol]
    return " / ".join(names) or train_protocol


# Training regimes a recipe can name: the source run ("xd") serves cross-dataset and domain generalization.
TRAIN_PROTOCOLS = tuple(dict.fromkeys(p.train_protocol for p in PROTOCOLS.values()))
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
    """Training targets and their evaluations. `datasets` (None = the suite's) are training datasets for
    base2novel / few-shot and evaluation targets for cross-dataset / domain generalization."""
    shots = shots or protocol.default_shots
    out: list[tuple[TrainTarget, tuple[EvalTarget, ...]]] = []
    if protocol.name == "base2novel":
        for k in shots:
            for d in datasets or suite.base2novel:
                evals = (EvalTarget("base2novel", d, "base"), EvalTarget("base2novel", d, "novel"))
                out.append((TrainTarget("base2novel", d, "base", k), evals))
    elif protocol.name == "few_shot":
        for k in shots:
            for d in datasets or suite.few_shot:
                out.append((TrainTarget("few_shot", d, "all", k), (EvalTarget("few_shot", d, "all"),)))
    else:
        default = suite.cross_dataset_targets if protocol.name == "cross_dataset" else suite.domain_targets
        targets = [d for d in (datasets or default) if d != suite.source]
        evals = (EvalTarget("source", suite.source, "all"), *(EvalTarget(protocol.name, d, "all") for d in targets))
        for k in shots:
            out.append((TrainTarget("xd", suite.source, "all", k), evals))
    return out
