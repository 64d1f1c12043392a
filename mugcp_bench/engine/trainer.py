"""One trainer for every method: Dassl's optimizers and warm-up/cosine schedule, autocast, per-epoch checkpoints,
resume.

Follows Dassl's `SimpleTrainer` semantics (docs/protocol.md §4): by default SGD momentum 0.9, weight decay 5e-4 on
every trainable parameter, a constant warm-up epoch at 1e-5, then a cosine shifted by one epoch, stepped once per
epoch; the last-epoch model is the final model (no model selection). A recipe may choose Adam or AdamW
(`engine.optim`) and a method may name parameter groups with their own LR (`Method.param_groups`), hook the end of
every epoch (`Method.on_epoch_end`) and swap in its final state at the end (`Method.on_train_end`); what it
accumulates (`Method.accumulated_state`) is saved in every checkpoint. A method may also ask for one backward pass
per objective and combine the gradients itself before each optimizer step (``gradient_objectives`` and
``combine_gradients``: ProGrad's projection; see `fit`).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, Sampler

from mugcp_bench.datasets.base import Datum, ImageListDataset
from mugcp_bench.engine.callbacks import StepInfo, TrainCallback, global_callbacks
from mugcp_bench.engine.interrupts import stop_requested
from mugcp_bench.engine.optim import group_lrs, make_optimizer
from mugcp_bench.engine.optim import lr_lambda as lr_lambda  # re-exported: the schedule lives in engine.optim
from mugcp_bench.engine.optim import lr_trace as lr_trace
from mugcp_bench.errors import NonFiniteLoss, RunInterrupted, UserError
from mugcp_bench.methods.base import Method, TrainConfig
from mugcp_bench.model.backbone import REFERENCE_FP16, Backbone, autocast
from mugcp_bench.model.state_fit import StateMismatch
from mugcp_bench.registry import suggest
from mugcp_bench.tensor_files import atomic_torch_save

log = logging.getLogger(__name__)

# auto / fp32 / bf16 / fp16: fp32 weights and trainable parameters, autocast (bf16, or fp16 with a gradient scaler)
# on CUDA. reference-fp16: the reference code's default regime (docs/protocol.md §4.5; KaiyangZhou/CoOp
# trainers/coop.py with PREC "fp16"): the backbone's weights in fp16 as CLIP's builder holds them, the trainable
# parameters in fp16 except those the reference keeps in fp32 (`Method.reference_fp32`), no autocast, plain SGD on the
# fp16 parameters (no fp32 master weights, no loss scaling). CUDA only.
PRECISIONS = ("auto", "fp32", "bf16", "fp16", REFERENCE_FP16)


def set_seed(seed: int) -> None:
    """Seed Python's `random`, NumPy and torch (CPU and CUDA), as Dassl's set_random_seed."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` -> fp32 on CPU; bf16 autocast on CUDA where supported, else fp16 with a gradient scaler.

    `reference-fp16` is CUDA only: a UserError on any other device (raised before anything is loaded)."""
    if precision not in PRECISIONS:
        raise UserError(
            f"unknown precision '{precision}'.{suggest(precision, PRECISIONS)} Use one of {', '.join(PRECISIONS)}."
        )
    if precision == REFERENCE_FP16 and device.type != "cuda":
        raise UserError(
            f"--precision {REFERENCE_FP16} runs on CUDA only (the reference code's fp16 regime); "
            f"use --device cuda, or --precision fp32 on the {device.type.upper()}"
        )
    if device.type != "cuda":
        return "fp32"
    if precision == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return precision


def backbone_precision(precision: str) -> str:
    """The weight precision a backbone needs for training precision `precision` (`load_backbone(precision=...)`)."""
    return REFERENCE_FP16 if precision == REFERENCE_FP16 else "fp32"


def check_backbone(backbone: Backbone, precision: str) -> None:
    """UserError unless `backbone`'s weights are held as training precision `precision` needs."""
    wanted = torch.float16 if precision == REFERENCE_FP16 else torch.float32
    if backbone.dtype != wanted:
        raise UserError(
            f"precision {precision} needs a backbone with {wanted} weights, this one holds {backbone.dtype}: "
            f"load it with load_backbone(..., precision='{backbone_precision(precision)}')"
        )


def prepare_method(method: Method, device: torch.device, precision: str) -> Method:
    """Move `method` to `device` and give its parameters the dtypes `precision` trains them in.

    fp32 for autocast precisions; for reference-fp16 the reference's fp16 parameters (`Method.to_reference_fp16`),
    which needs a backbone loaded with ``precision="reference-fp16"`` (and only then)."""
    check_backbone(method.backbone, precision)
    method.to(device)
    if precision == REFERENCE_FP16:
        method.to_reference_fp16()
    return method


def make_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """A gradient scaler for fp16 autocast on CUDA only; reference-fp16 updates its fp16 parameters unscaled."""
    return torch.amp.GradScaler("cuda") if precision == "fp16" and device.type == "cuda" else None


@dataclass
class FitResult:
    epochs_run: int
    train_s: float
    last_loss: float
    images_per_s: float
    # one dict per epoch (resumed runs include the epochs before the resume): epoch, loss, loss_ce and loss_<part>
    # for each extra loss, lr (the first parameter group's), lr_<group> for each group a method names,
    # images_per_s, seconds
    history: list[dict[str, float]] = field(default_factory=list)


def _rng_state(loader_gen: torch.Generator) -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "loader": loader_gen.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], loader_gen: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    loader_gen.set_state(state["loader"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _SkipBatches(Sampler[list[int]]):
    """Batches of `inner`, the first `skip` of an epoch dropped without loading their images (mid-epoch resume).

    Iterates `inner` to the end, so its random generator advances exactly as in an uninterrupted epoch."""

    def __init__(self, inner: BatchSampler) -> None:
        self.inner, self.skip = inner, 0

    def __iter__(self) -> Iterator[list[int]]:
        for i, batch in enumerate(self.inner):
            if i >= self.skip:
                yield batch

    def __len__(self) -> int:
        return len(self.inner)


def _first_non_finite_tensor(named: list[tuple[str, torch.Tensor]]) -> tuple[str, float] | None:
    """(name, first bad value) of the first tensor holding NaN or inf, else None (one sync when all are finite)."""
    named = [(n, t.detach()) for n, t in named]
    if not named or bool(torch.stack([torch.isfinite(t).all() for _, t in named]).all()):
        return None
    for name, t in named:
        t = t.float().flatten()
        bad = t[~torch.isfinite(t)]
        if bad.numel():
            return name, float(bad[0])
    return None


def _non_finite_grad(method: Method) -> tuple[str, float] | None:
    """The first trainable gradient holding NaN or inf: (parameter name, value), else None."""
    return _first_non_finite_tensor(
        [(n, p.grad) for n, p in method.named_parameters() if p.requires_grad and p.grad is not None]
    )


def _non_finite_parameter(method: Method) -> tuple[str, float] | None:
    """The first trainable parameter holding NaN or inf: (name, value), else None."""
    return _first_non_finite_tensor([(n, p) for n, p in method.named_parameters() if p.requires_grad])


def _first_non_finite(parts: dict[str, torch.Tensor]) -> tuple[str, float]:
    """The first loss part (loss_ce, loss_<extra>, then the total) that is NaN or infinite, and its value."""
    for part in sorted(parts, key=lambda k: (k == "loss", k != "loss_ce", k)):
        value = float(parts[part].detach().float())
        if not math.isfinite(value):
            return part, value
    return "loss", float(parts["loss"].detach().float())


# --- gradient combination: several backward passes per step, combined per parameter before the optimizer ----------
def gradient_objectives(method: Method) -> tuple[str, ...]:
    """The method's objectives in backward order (`gradient_objectives`); () for the usual single backward."""
    return tuple(getattr(method, "gradient_objectives", ()) or ())


def objective_values(method: Method, ce: torch.Tensor, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{objective: value} of one step: "ce" (the trainer's weighted cross-entropy) and every extra loss, each named
    exactly once by the method's `gradient_objectives` (ValueError otherwise: a loss part no backward pass sees)."""
    values = {"ce": ce, **losses}
    order = gradient_objectives(method)
    if sorted(values) != sorted(order):
        raise ValueError(
            f"{method.name}: gradient_objectives {list(order)} must name every loss part once; this step has "
            f"{sorted(values)} ('ce' is the trainer's cross-entropy)"
        )
    return values


def recorded_loss(method: Method, values: dict[str, torch.Tensor]) -> torch.Tensor:
    """The step's `loss` for a combining method: the sum of its `loss_objectives` (the objectives the combined step
    descends; default every objective), each in fp32 as the single-backward path adds its extra losses."""
    names = tuple(getattr(method, "loss_objectives", ()) or gradient_objectives(method))
    loss = values[names[0]] if names[0] == "ce" else values[names[0]].float()
    for name in names[1:]:
        loss = loss + values[name].float()
    return loss


def backward_objectives(
    method: Method,
    values: dict[str, torch.Tensor],
    scaler: torch.amp.GradScaler | None,
    accum_steps: int,
    into: dict[str, dict[str, torch.Tensor]],
) -> None:
    """One backward pass per objective, in the method's order (the graph kept until the last), each objective's
    gradient of every trainable parameter added to ``into[objective][parameter name]``: ``value / accum_steps``,
    scaled by the gradient scaler when there is one, exactly as the single-backward path scales its loss. Nothing
    is written to ``.grad``."""
    named = [(n, p) for n, p in method.named_parameters() if p.requires_grad]
    order = gradient_objectives(method)
    for i, name in enumerate(order):
        acc = into.setdefault(name, {})
        value = values[name] / accum_steps
        if scaler is not None:
            value = scaler.scale(value)
        if not value.requires_grad:  # an objective that does not reach the parameters this step
            continue
        grads = torch.autograd.grad(value, [p for _, p in named], retain_graph=i + 1 < len(order), allow_unused=True)
        for (pname, _), g in zip(named, grads):
            if g is not None:
                acc[pname] = g if pname not in acc else acc[pname] + g


def set_combined_gradients(
    method: Method, grads: dict[str, dict[str, torch.Tensor]], scaler: torch.amp.GradScaler | None
) -> tuple[str, float] | None:
    """Write ``method.combine_gradients(per-objective gradients)`` into ``.grad`` of the trainable parameters.

    The method always sees unscaled gradients: with a gradient scaler each is multiplied by 1/scale first, and the
    combination by the scale again before the scaler's own unscale in `scaler.step` (the scale is a power of two, so
    both are exact). If any objective's gradient is non-finite, the combination is not called: with a scaler every
    ``.grad`` becomes inf, so the scaler skips the step and lowers its scale as for any overflow; without one, the
    offending (objective gradient of parameter, value) is returned for the caller to stop the run with. A parameter
    the combination gives nothing is not updated this step."""
    named = [(n, p) for n, p in method.named_parameters() if p.requires_grad]
    scale = scaler.get_scale() if scaler is not None else 1.0
    if scale != 1.0:
        grads = {o: {n: g * (1.0 / scale) for n, g in gs.items()} for o, gs in grads.items()}
    bad = _first_non_finite_tensor([(f"{o} gradient of {n}", g) for o, gs in grads.items() for n, g in gs.items()])
    if bad is not None:
        if scaler is None:
            return bad
        for _, p in named:
            p.grad = torch.full_like(p, math.inf)
        return None
    combined = method.combine_gradients(grads)
    for n, p in named:
        g = combined.get(n)
        if g is not None and g.shape != p.shape:
            raise ValueError(f"{method.name}.combine_gradients: {n} has shape {tuple(g.shape)}, not {tuple(p.shape)}")
        p.grad = None if g is None else (g * scale if scale != 1.0 else g).to(p.dtype)
    return None


def _set_aside(path: Path, why: str) -> Path:
    """Keep an unusable file beside its place as `<name>.unusable` (replacing an older one) and say so in one line."""
    aside = path.with_name(f"{path.name}.unusable")
    path.replace(aside)
    log.warning("%s %s; kept aside as %s, the run trains from the start", path, why, aside.name)
    return aside


CHECKPOINT_KEYS = frozenset({"model", "optimizer", "scheduler", "rng", "epoch"})


def load_saved_state(path: Path, method: Method, checkpoint: bool) -> dict[str, Any] | None:
    """Load a run's resume checkpoint (`checkpoint=True`, returned whole) or stored model (the trainable state) from
    `path` into `method`. None if there is no file, or if it cannot be read or does not fit the method (another
    architecture, another version of it): the file is then kept aside as `<name>.unusable` with one warning line and
    the run trains from the start — the rule of damaged run records (docs/protocol.md §4.6)."""
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=not checkpoint)
        if checkpoint and not (isinstance(saved, dict) and CHECKPOINT_KEYS <= saved.keys()):
            raise ValueError("not a checkpoint of this trainer")
        if checkpoint:  # what the method accumulated (PromptSRC's prompt average); checked before anything loads
            method.load_accumulated_state(saved.get("method_state", {}))
        method.load_trainable_state(saved["model"] if checkpoint else saved, source=str(path))
    except StateMismatch as e:
        _set_aside(path, f"does not fit {method.name} on {method.backbone.name} ({e.problem})")
        return None
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: unusable, whatever torch raised
        _set_aside(path, f"cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
        return None
    return saved


def fit(
    method: Method,
    items: Sequence[Datum],
    cfg: TrainConfig,
    transform: Callable,
    device: torch.device,
    precision: str,
    seed: int,
    checkpoint: Path | None = None,
    resume: bool = False,
    workers: int = 0,
    dataset: str = "",
    callbacks: Sequence[TrainCallback] = (),
) -> FitResult:
    """Train `method` on `items` for `cfg.epochs`; save a checkpoint after every epoch; resume from one.

    After each epoch's last optimizer step and LR step the method's `on_epoch_end(epoch, epochs)` runs, after the
    last one also its `on_train_end()` (a final swap of its state), both before that epoch's checkpoint is written;
    every checkpoint holds the method's `accumulated_state()`. The history records each named parameter group's LR.

    Every step checks that the loss (each part) and, without a gradient scaler, the gradients are finite
    (`NonFiniteLoss` otherwise, before the optimizer step). A first Ctrl-C stops after the current optimizer step:
    a mid-epoch checkpoint (epoch, step, optimizer, scheduler, RNG and loader state) is written and `RunInterrupted`
    raised; resuming from it continues exactly where the run stopped (with `workers=0`: loader workers' augmentation
    RNG cannot be replayed without loading the skipped images). `callbacks` (and `callbacks.add_callback`'s) are
    called after every step and epoch: the one channel of training events (progress displays are callbacks).

    Gradient combination (ProGrad's projection, `methods/prograd.py`): a method with a non-empty ``gradient_objectives``
    (a tuple of objective names in backward order: "ce", the trainer's weighted cross-entropy, and every key of its
    ``MethodOutput.losses``, each exactly once) gets one backward pass per objective instead of one of the summed
    loss, the graph kept until the last (`backward_objectives`; `torch.autograd.grad`, nothing written to ``.grad``),
    and a ``combine_gradients(grads) -> {parameter name: gradient}`` hook, with ``grads[objective][parameter name]``,
    whose result becomes ``.grad`` before the optimizer step (`set_combined_gradients`). Exactly:

    - accumulation: each objective's gradients are accumulated over the `accum_steps` micro-batches
      (``value / accum_steps`` each, as the single-backward path divides its loss) and combined **once**, at the
      optimizer step: the combination of the accumulated per-objective gradients, i.e. of the gradients of the
      whole effective batch's mean objectives, which is what the reference computes for one batch of that size (a
      combination per micro-batch, averaged, would be another method for any combination that is not linear);
    - precision: the combination always sees unscaled gradients; under fp16 autocast each objective is scaled by
      the GradScaler in its backward, unscaled (× 1/scale) before the combination and the result rescaled for the
      scaler's own unscale in ``scaler.step`` (exact: the scale is a power of two). A non-finite gradient of any
      objective makes the scaler skip the step and lower its scale, as an overflow in the summed loss would.
      reference-fp16 (no scaler) combines the fp16 gradients as they are, in fp16;
    - checks: every loss part is checked finite each step (the recorded `loss` need not hold every part); without
      a scaler a non-finite objective gradient stops the run naming it ("kl gradient of ctx"), a non-finite
      combination naming the parameter ("combined gradient of ctx");
    - the recorded ``loss`` is the sum of the method's ``loss_objectives`` (default: every objective): ProGrad
      records its cross-entropy, the objective its projected step descends; every part stays in the history as
      ``loss_<part>``;
    - checkpoints: optimizer steps happen only at accumulation boundaries, where the per-objective accumulators are
      empty, so checkpoints hold what they always held and a resume is unchanged.
    """
    callbacks = [*callbacks, *global_callbacks()]
    loader_gen = torch.Generator().manual_seed(seed)
    data = ImageListDataset(items, transform, dataset)
    drop_last = len(data) >= cfg.batch_size  # Dassl: drop the last incomplete batch iff one full batch exists
    # what DataLoader(shuffle=True, generator=loader_gen) builds, with a way to skip the batches already trained
    batch_sampler = _SkipBatches(BatchSampler(RandomSampler(data, generator=loader_gen), cfg.batch_size, drop_last))
    loader = DataLoader(
        data,
        batch_sampler=batch_sampler,
        generator=loader_gen,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    keys = [d.relpath for d in items]
    opt, sched = make_optimizer(method, cfg)
    named_groups = method.param_groups() is not None  # record lr_<group> per epoch
    combining = bool(gradient_objectives(method))  # one backward per objective, combined at each optimizer step
    objective_grads: dict[str, dict[str, torch.Tensor]] = {}  # per objective, accumulated since the last step
    scaler = make_scaler(precision, device)
    start_epoch, history, skip, resumed_sums, last_loss = 0, [], 0, {}, float("nan")
    epoch_loader_state = loader_gen.get_state()
    method.on_train_start(cfg.epochs)
    state = None
    if resume and checkpoint is not None:
        state = load_saved_state(checkpoint, method, checkpoint=True)
        if state is None:  # training starts afresh; an unusable checkpoint may have left accumulated state behind
            method.on_train_start(cfg.epochs)
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"], loader_gen)
        history = list(state.get("history", []))
        last_loss = state.get("last_loss", history[-1]["loss"] if history else float("nan"))
        if state.get("step") is None:  # written at the end of epoch `epoch`
            start_epoch = state["epoch"] + 1
        else:  # written mid-epoch after `step` steps: replay the epoch's loader order, skip what was trained
            start_epoch, skip = state["epoch"], state["step"]
            loader_gen.set_state(state["epoch_loader"])
            resumed_sums = {k: torch.tensor(v, device=device) for k, v in state["loss_sums"].items()}
        # epochs counted from 1, as the interruption's reason and the progress display count them
        log.info("resumed from %s at epoch %d, step %d", checkpoint, start_epoch + 1, skip)
    t0, n_images = time.perf_counter(), 0

    def save(epoch: int, step: int | None, loss_sums: dict[str, Any]) -> None:
        if checkpoint is None:
            return
        state = {
            "epoch": epoch,
            "step": step,  # None: epoch `epoch` is complete; else steps done in it
            "model": method.trainable_state(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "rng": _rng_state(loader_gen),
            "history": history,
            "last_loss": last_loss,
            "method_state": method.accumulated_state(),
        }
        if step is not None:
            state |= {"epoch_loader": epoch_loader_state, "loss_sums": {k: float(v) for k, v in loss_sums.items()}}
        atomic_torch_save(state, checkpoint)

    method.train()
    for epoch in range(start_epoch, cfg.epochs):
        lrs = group_lrs(opt)
        lr = opt.param_groups[0]["lr"]
        opt.zero_grad(set_to_none=True)
        objective_grads = {}
        if skip == 0:
            epoch_loader_state = loader_gen.get_state()
        batch_sampler.skip = skip
        epoch_t0, epoch_images, loss_sums = time.perf_counter(), 0, resumed_sums
        resumed_sums = {}
        steps = len(loader)
        for step, (images, labels, index) in enumerate(loader, start=skip):
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            with autocast(device, precision):
                batch_keys = [keys[i] for i in index.tolist()]
                out = method(images, batch_keys, labels=labels) if method.needs_labels else method(images, batch_keys)
                # the reference takes the cross-entropy of its fp16 logits as they are
                logits = out.logits if precision == REFERENCE_FP16 else out.logits.float()
                ce = F.cross_entropy(logits, labels)
                if out.ce_weight != 1.0:
                    ce = out.ce_weight * ce
                if combining:
                    values = objective_values(method, ce, out.losses)
                    loss = recorded_loss(method, values)
                else:
                    loss = ce
                    for extra in out.losses.values():
                        loss = loss + extra.float()
            parts = {"loss": loss, "loss_ce": ce, **{f"loss_{k}": v for k, v in out.losses.items()}}
            for part, value in parts.items():
                loss_sums[part] = loss_sums.get(part, 0.0) + value.detach().float()  # summed on the device
            if combining:
                backward_objectives(method, values, scaler, cfg.accum_steps, objective_grads)
                # `loss` need not hold every part here: all are checked, in one sync (`loss` comes first)
                values_now = torch.stack([v.detach().float() for v in parts.values()]).tolist()
                last_loss = values_now[0] if all(map(math.isfinite, values_now)) else math.nan
            else:
                scaled = loss / cfg.accum_steps
                (scaler.scale(scaled) if scaler else scaled).backward()
                last_loss = float(loss.detach())  # one sync per step (the progress line needs it anyway)
            if not math.isfinite(last_loss):
                raise NonFiniteLoss(epoch, cfg.epochs, step, steps, *_first_non_finite(parts))
            boundary = (step + 1) % cfg.accum_steps == 0 or step + 1 == steps
            if boundary:
                if combining:  # the accumulated per-objective gradients, combined once per optimizer step
                    bad = set_combined_gradients(method, objective_grads, scaler)
                    objective_grads = {}
                    if bad is not None:
                        raise NonFiniteLoss(epoch, cfg.epochs, step, steps, *bad)
                if scaler:  # the scaler skips steps with inf gradients itself
                    scaler.step(opt)
                    scaler.update()
                else:
                    bad = _non_finite_grad(method)
                    if bad is not None:
                        what = "combined gradient" if combining else "gradient"
                        raise NonFiniteLoss(epoch, cfg.epochs, step, steps, f"{what} of {bad[0]}", bad[1])
                    opt.step()
                opt.zero_grad(set_to_none=True)
            n_images += images.shape[0]
            epoch_images += images.shape[0]
            rate = n_images / max(time.perf_counter() - t0, 1e-9)
            info = StepInfo(epoch, cfg.epochs, step, steps, last_loss, checkpoint, lr, rate)
            for cb in callbacks:
                cb.on_step_end(info)
            if stop_requested() and boundary and step + 1 < steps:
                save(epoch, step + 1, loss_sums)
                raise RunInterrupted(epoch, step + 1)
        skip = 0
        sched.step()
        method.on_epoch_end(epoch, cfg.epochs)
        if epoch + 1 == cfg.epochs:
            method.on_train_end()
        epoch_s = time.perf_counter() - epoch_t0
        group_lr = {f"lr_{name}": value for name, value in lrs.items()} if named_groups else {}
        history.append(
            {"epoch": epoch + 1, **{k: float(v) / max(steps, 1) for k, v in loss_sums.items()}, "lr": lr}
            | group_lr
            | {"images_per_s": epoch_images / epoch_s if epoch_s > 0 else 0.0, "seconds": epoch_s}
        )
        bad = _non_finite_parameter(method)  # an update that overflowed: caught before it is saved or evaluated
        if bad is not None:
            raise NonFiniteLoss(epoch, cfg.epochs, steps - 1, steps, f"parameter {bad[0]}", bad[1])
        save(epoch, None, loss_sums)
        log.info("epoch %d/%d  loss %.4f  lr %.3g", epoch + 1, cfg.epochs, last_loss, lr)
        rate = n_images / max(time.perf_counter() - t0, 1e-9)
        info = StepInfo(epoch, cfg.epochs, steps - 1, steps, last_loss, checkpoint, lr, rate)
        for cb in callbacks:
            cb.on_epoch_end(info)
        if stop_requested() and epoch + 1 < cfg.epochs:
            raise RunInterrupted(epoch + 1, 0)
    method.eval()
    elapsed = time.perf_counter() - t0
    rate = n_images / elapsed if elapsed > 0 else 0.0
    return FitResult(cfg.epochs - start_epoch, elapsed, last_loss, rate, history)


def batches(n: int, size: int) -> Iterator[slice]:
    for s in range(0, n, size):
        yield slice(s, min(s + size, n))


@torch.no_grad()
def evaluate(
    method: Method,
    items: Sequence[Datum],
    transform: Callable,
    device: torch.device,
    precision: str,
    batch_size: int,
    image_features: torch.Tensor | None = None,
    fast: bool = True,
    workers: int = 0,
    dataset: str = "",
) -> dict[str, Any]:
    """Top-1 accuracy (%) of `method` on `items`, sequential order, fixed batch size, under `precision`'s autocast,
    and the per-image predictions (`predictions` (N,) the argmax labels, `top5` (N, min(5, C)) the top-k labels,
    best first; numpy int64).

    `image_features` (N, E): precomputed frozen image features (methods with a frozen image path).
    `fast=False` runs the naive path (forward per batch, as the reference code does).
    """
    method.eval()
    keys = [d.relpath for d in items]
    labels = torch.tensor([d.label for d in items])
    correct, top1, top = 0, [], []
    if fast:  # the cached class-text pass runs under the same autocast as the per-batch forwards
        with autocast(device, precision):
            method.begin_eval()
    try:
        if image_features is not None:
            # cached fp32 features back in the backbone's dtype (reference-fp16: the fp16 values it computed)
            dtype = method.backbone.dtype
            chunks = ((None, image_features[s].to(device, dtype), s) for s in batches(len(items), batch_size))
        else:
            loader = DataLoader(
                ImageListDataset(items, transform, dataset), batch_size=batch_size, shuffle=False, num_workers=workers
            )
            offset = 0

            def _gen():
                nonlocal offset
                for images, _, _ in loader:
                    s = slice(offset, offset + images.shape[0])
                    offset += images.shape[0]
                    yield images.to(device), None, s

            chunks = _gen()
        for images, feats, s in chunks:
            with autocast(device, precision):
                if fast:
                    logits = method.predict(images, keys[s], feats)
                else:
                    logits = method(images, keys[s], feats).logits
            pred = logits.float().argmax(-1).cpu()  # (B,)
            correct += int((pred == labels[s]).sum())
            top1.append(pred)
            top.append(logits.float().topk(min(5, logits.shape[-1]), dim=-1).indices.cpu())  # (B, k), best first
    finally:
        if fast:
            method.end_eval()
    n = len(items)
    acc = 100.0 * correct / max(n, 1)
    out = {"n": n, "correct": correct, "accuracy": acc, "accuracy_1dp": round(acc, 1)}
    if not top1:
        return out | {"predictions": np.zeros(0, dtype=np.int64), "top5": np.zeros((0, 1), dtype=np.int64)}
    return out | {"predictions": torch.cat(top1).numpy(), "top5": torch.cat(top).numpy()}
