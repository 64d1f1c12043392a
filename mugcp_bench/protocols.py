"""The four protocols as data (protocol.md §2) and the dataset suites they run on (the real benchmark, the toy world).

A protocol names the training regime (`train_protocol`: base2novel, xd or few_shot) and the evaluations done with
the trained model. Cross-dataset and domain generalization share one ImageNet-trained source run ("xd").
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mugcp_bench.errors import UserError
from mugcp_bench.registry import suggest


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


BENCHMARK_11 = (
    "imagenet",
    "caltech101",
    "oxford_pets",
    "stanford_cars",
    "oxford_flowers",
    "food101",
    "fgvc_aircraft",
    "sun397",
    "dtd",
    "eurosat",
    "ucf101",
)
REAL_SUITE = Suite(
    name="benchmark",
    base2novel=BENCHMARK_11,
    source="imagenet",
    cross_dataset_targets=BENCHMARK_11[1:],
    domain_targets=("imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r"),
    few_shot=BENCHMARK_11,
)


def toy_suite() -> Suite:
    from mugcp_bench.toy.suite import TOY_SUITE

    return Suite(
        name="toy",
        base2novel=tuple(TOY_SUITE["base2novel"]),
        source=TOY_SUITE["source"],
        cross_dataset_targets=tuple(TOY_SUITE["cross_dataset_targets"]),
        domain_targets=tuple(TOY_SUITE["domain_targets"]),
        few_shot=tuple(TOY_SUITE["base2novel"]),
    )


@dataclass(frozen=True)
class Protocol:
    name: str
    train_protocol: str
    description: str
    default_shots: tuple[int, ...] = (16,)
    eval_tags: tuple[str, ...] = field(default=())


PROTOCOLS: dict[str, Protocol] = {
    p.name: p
    for p in (
        Protocol(
            "base2novel",
            "base2novel",
            "train on the base half (16 shots), test base and novel classes from the same checkpoint",
        ),
        Protocol("cross_dataset", "xd", "train on the source (all classes, 16 shots), test on the other datasets"),
        Protocol(
            "domain_generalization",
            "xd",
            "the cross-dataset source model, tested on the source's shifted domains (V2 / Sketch / A / R)",
        ),
        Protocol("few_shot", "few_shot", "all classes, K in 1, 2, 4, 8, 16 shots", default_shots=(1, 2, 4, 8, 16)),
    )
}
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
