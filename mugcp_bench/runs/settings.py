"""Ranges of every numeric setting (`--set key=value`), checked when a sweep is planned, before any work.

A field's own dataclass metadata wins (``field(default=4, metadata={"range": (1, None)})``); otherwise the rule of its
name below applies (shared names: every method's `n_ctx` is at least 1, every `*_weight` at least 0, ...). Integer
and float fields without a rule must at least be finite.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from typing import Any

from mugcp_bench.errors import UserError

# (low, high, low_inclusive, high_inclusive); None: unbounded
Range = tuple[float | None, float | None, bool, bool]

AT_LEAST_0: Range = (0, None, True, False)
AT_LEAST_1: Range = (1, None, True, False)
POSITIVE: Range = (0, None, False, False)
UNIT: Range = (0, 1, True, True)

RULES: dict[str, Range] = {
    # training (TrainConfig)
    "epochs": AT_LEAST_0,  # 0: evaluate the initialisation
    "lr": POSITIVE,
    "batch_size": AT_LEAST_1,
    "accum_steps": AT_LEAST_1,
    "eval_batch_size": AT_LEAST_1,
    "momentum": (0, 1, True, False),
    "weight_decay": AT_LEAST_0,
    "warmup_epochs": AT_LEAST_0,
    "warmup_lr": POSITIVE,
    "crop_min_scale": (0, 1, False, True),
    # shared method settings
    "n_ctx": AT_LEAST_1,
    "n_vctx": AT_LEAST_1,
    "*depth": AT_LEAST_1,
    "init_std": AT_LEAST_0,
    "*_heads": AT_LEAST_0,  # 0: the backbone width / 64
    "*mlp_ratio": POSITIVE,
    "meta_ratio": AT_LEAST_1,
    "*_weight": AT_LEAST_0,
    "*_temperature": POSITIVE,
    "layer_scale": AT_LEAST_0,
    "scene_drop": UNIT,
    "scene_swap": UNIT,
    "*_k": AT_LEAST_1,
}


def describe(r: Range) -> str:
    lo, hi, lo_in, hi_in = r
    if hi is None:
        return f"{'>=' if lo_in else '>'} {lo:g}"
    return f"in {'[' if lo_in else '('}{lo:g}, {hi:g}{']' if hi_in else ')'}"


def rule_for(field: dataclasses.Field) -> Range | None:
    if "range" in field.metadata:
        return field.metadata["range"]
    for pattern, r in RULES.items():
        if fnmatch.fnmatchcase(field.name, pattern):
            return r
    return None


def within(value: float, r: Range) -> bool:
    lo, hi, lo_in, hi_in = r
    if lo is not None and not (value >= lo if lo_in else value > lo):
        return False
    return hi is None or (value <= hi if hi_in else value < hi)


def check_ranges(cfg: Any, owner: str) -> None:
    """UserError naming the first numeric field of dataclass `cfg` outside its range (or not finite)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value):
            raise UserError(f"--set {f.name}={value}: {f.name} of {owner} must be a finite number")
        r = rule_for(f)
        if r is not None and not within(value, r):
            raise UserError(f"--set {f.name}={value}: {f.name} of {owner} must be {describe(r)}, got {value}")


__all__ = ["RULES", "check_ranges", "describe", "rule_for"]
