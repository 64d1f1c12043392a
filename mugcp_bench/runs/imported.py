"""Runs whose model comes from elsewhere: a checkpoint of the reference code (`mugcp-bench import`), recorded as a
run of origin "imported" and evaluated like any run, so `report`, `--ci` and `--vs paper` treat it as one — as its own
entry, never averaged with trained runs of the same key.

The caller (the import command, `mugcp_bench.interop`) reads the file and maps its tensors to the method's trainable
state; this module plans the run (the same planner, the same key fields, origin "imported"), writes the state as the
run's model.pt with where it came from, and hands the evaluations to the executor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mugcp_bench.errors import UserError
from mugcp_bench.runs.options import SweepOptions
from mugcp_bench.runs.progress import Reporter
from mugcp_bench.runs.sweep import SweepResult, execute_plan, prepare_sweep


@dataclass
class ImportedModel:
    """One checkpoint, mapped to a method of ours.

    `state`: the method's trainable state as `Method.trainable_state()` names it; `settings`: method settings the
    checkpoint implies (e.g. {"n_ctx": "4", "prompt_depth": "9"}), applied on top of the recipe; `source`: where it
    came from, written into the record's `imported` block (path, sha256, trainer, epoch, learner, config, ...)."""

    method: str
    train_dataset: str
    train_protocol: str  # base2novel | xd | few_shot
    shots: int
    seed: int
    state: Mapping[str, Any]
    settings: Mapping[str, str] = field(default_factory=dict)
    source: Mapping[str, Any] = field(default_factory=dict)


def evaluate_imported(
    models: Sequence[ImportedModel], options: SweepOptions | None = None, reporter: Reporter | None = None, **kw: Any
) -> SweepResult:
    """Record every model as an imported run and evaluate it on its protocol's targets (base and novel classes; the
    cross-dataset and domain-generalization targets for a source-trained one). Options as `run_sweep` takes them
    (data root, backbone and weights, results dir, executor, ...); `force` re-evaluates runs already recorded."""
    from mugcp_bench.protocols import PROTOCOLS, TRAIN_PROTOCOLS
    from mugcp_bench.runs.plan import Action, decide_action, plan
    from mugcp_bench.tensor_files import atomic_torch_save

    if not models:
        raise UserError("nothing to import: no checkpoint was found")
    o = options if options is not None else SweepOptions(**kw)
    o = dataclasses.replace(o, methods=",".join(dict.fromkeys(m.method for m in models)), grid=())
    p = prepare_sweep(o)
    runs = {}
    for m in models:
        if m.train_protocol not in TRAIN_PROTOCOLS:
            raise UserError(f"import: unknown train protocol '{m.train_protocol}' ({', '.join(TRAIN_PROTOCOLS)})")
        protocols = [proto for proto in PROTOCOLS.values() if proto.train_protocol == m.train_protocol]
        on_source = any(proto.on_source for proto in protocols)
        datasets = None if on_source else (m.train_dataset,)
        source = p.world.suite.source
        if on_source and m.train_dataset != source:
            raise UserError(f"import: a cross-dataset checkpoint is trained on {source}, this one on {m.train_dataset}")
        settings = dataclasses.replace(p.settings, overrides={**p.settings.overrides, **m.settings})
        for run in plan(settings, p.backbone, [m.method], protocols, p.world.suite, datasets, (m.shots,), (m.seed,),
                        origin="imported"):  # fmt: skip
            record = run.record
            fresh = (record.rec.imported or {}).get("sha256") != m.source.get("sha256")
            if fresh or o.force or not record.model_path.is_file():
                record.dir.mkdir(parents=True, exist_ok=True)
                atomic_torch_save(dict(m.state), record.model_path)
                record.stage_import(dict(m.source))  # status new, no evaluations: everything is evaluated
            run.action = decide_action(run, settings)
            runs.setdefault(run.key.id, run)
    planned = list(runs.values())
    for run in planned:
        if run.action == Action.TRAIN:  # never: an imported run has nothing to train
            raise AssertionError(f"{run.label}: an imported run was planned for training")
    return execute_plan(p, planned, reporter or Reporter())


__all__ = ["ImportedModel", "evaluate_imported"]
