"""Optimizers and the learning-rate schedule of the one trainer (docs/protocol.md §4.4).

Matched against KaiyangZhou/Dassl.pytorch @ c61a1b5:

* ``dassl/optim/optimizer.py`` (build_optimizer): ``sgd`` = SGD(momentum, weight_decay, dampening 0, no nesterov),
  ``adam`` = Adam(weight_decay — coupled L2 —, betas (ADAM_BETA1, ADAM_BETA2)), ``adamw`` = AdamW(weight_decay —
  decoupled —, betas). Dassl passes no eps (torch's 1e-8); TCP's README asks users to edit it to 1e-3, so eps is a
  setting here (`TrainConfig.adam_eps`).
* ``dassl/optim/lr_scheduler.py`` (ConstantWarmupScheduler around CosineAnnealingLR(T_max=MAX_EPOCH)), stepped once
  per epoch: during the warm-up epochs *every* parameter group runs at the constant warm-up LR; afterwards each group
  follows the cosine from its own base LR, shifted by the warm-up: lr_g(e) = ½·LR_g·(1 + cos(π·(e − W)/epochs)).

Parameter groups come from `Method.param_groups()` (named, with an LR scale); without them every trainable parameter
is one group at the recipe's LR.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from mugcp_bench.methods.base import Method, ParamGroup, TrainConfig

DEFAULT_GROUP = "all"


def param_groups(method: Method) -> list[ParamGroup]:
    """The method's named groups, checked to hold every trainable parameter exactly once; one group by default."""
    trainable = method.trainable_parameters()
    groups = method.param_groups()
    if groups is None:
        return [ParamGroup(DEFAULT_GROUP, trainable)]
    names = [g.name for g in groups]
    if len(set(names)) != len(names) or not all(names):
        raise ValueError(f"{method.name}: parameter group names must be distinct and non-empty, got {names}")
    seen: dict[int, str] = {}
    for g in groups:
        if not g.lr_scale > 0:
            raise ValueError(f"{method.name}: group '{g.name}' has lr_scale {g.lr_scale}; it must be positive")
        for p in g.params:
            if id(p) in seen:
                raise ValueError(f"{method.name}: a parameter is in groups '{seen[id(p)]}' and '{g.name}'")
            seen[id(p)] = g.name
    missing = [p for p in trainable if id(p) not in seen]
    extra = len(seen) - (len(trainable) - len(missing))
    if missing or extra:
        raise ValueError(
            f"{method.name}: parameter groups must hold every trainable parameter exactly once "
            f"({len(missing)} trainable parameters in no group, {extra} frozen ones in a group)"
        )
    return [g for g in groups if g.params]


def lr_lambda(cfg: TrainConfig, scale: float = 1.0) -> Callable[[int], float]:
    """Multiplier of a group's base LR (``scale`` × `cfg.lr`) at epoch e: the constant `warmup_lr` (the same for
    every group) while e < W, else ½·(1 + cos(π·(e − W)/epochs)) — Dassl's ConstantWarmupScheduler around
    CosineAnnealingLR(T_max=epochs)."""
    base = cfg.lr * scale

    def factor(epoch: int) -> float:
        if epoch < cfg.warmup_epochs:
            return cfg.warmup_lr / base
        return 0.5 * (1.0 + math.cos(math.pi * (epoch - cfg.warmup_epochs) / cfg.epochs))

    return factor


def build_optimizer(groups: list[ParamGroup], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The recipe's optimizer over `groups` (each group's LR = scale × `cfg.lr`; the group name kept as "name")."""
    torch_groups: list[dict[str, Any]] = [
        {"params": g.params, "lr": cfg.lr * g.lr_scale, "name": g.name} for g in groups
    ]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            torch_groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, dampening=0
        )
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(torch_groups, lr=cfg.lr, betas=betas, eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(torch_groups, lr=cfg.lr, betas=betas, eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")  # TrainConfig refuses it first


def make_optimizer(method: Method, cfg: TrainConfig) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """Optimizer over the method's parameter groups and the per-epoch schedule (one LR multiplier per group)."""
    groups = param_groups(method)
    opt = build_optimizer(groups, cfg)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, [lr_lambda(cfg, g.lr_scale) for g in groups])


def group_lrs(opt: torch.optim.Optimizer) -> dict[str, float]:
    """The current LR of every group, by name."""
    return {g.get("name", str(i)): float(g["lr"]) for i, g in enumerate(opt.param_groups)}


def lr_traces(cfg: TrainConfig, scales: dict[str, float] | None = None) -> dict[str, list[float]]:
    """Per-epoch LRs of groups named with their LR scales (default: one group), read off a real optimizer and
    scheduler stepped as the trainer steps them."""
    scales = scales or {DEFAULT_GROUP: 1.0}
    groups = [ParamGroup(n, [torch.nn.Parameter(torch.zeros(1))], s) for n, s in scales.items()]
    opt = build_optimizer(groups, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [lr_lambda(cfg, g.lr_scale) for g in groups])
    out: dict[str, list[float]] = {n: [] for n in scales}
    for _ in range(cfg.epochs):
        for name, lr in group_lrs(opt).items():
            out[name].append(lr)
        opt.step()
        sched.step()
    return out


def lr_trace(cfg: TrainConfig) -> list[float]:
    """The per-epoch learning rates of a one-group run."""
    return lr_traces(cfg)[DEFAULT_GROUP]


__all__ = ["build_optimizer", "group_lrs", "lr_lambda", "lr_trace", "lr_traces", "make_optimizer", "param_groups"]
