"""One trainer for every method: Dassl's optimizers and warm-up/cosine schedule, autocast, per-epoch checkpoints,
resume.

Follows Dassl's `SimpleTrainer` semantics (docs/protocol.md §4): by default SGD momentum 0.9, weight decay 5e-4 on
every trainable parameter, a constant warm-up epoch at 1e-5, then a cosine shifted by one epoch, stepped once per
epoch; the last-epoch model is the final model (no model selection). A recipe may choose Adam or AdamW
(`engine.optim`) and a method may name parameter groups with their own LR (`Method.param_groups`), hook the end of
every epoch (`Method.on_epoch_end`) and swap in its final state at the end (`Method.on_train_end`); what it
accumulates (`Method.accumulated_state`) is saved in every checkpoint.
"""

from __future__ import annotations

import contextlib
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
from mugcp_bench.model.backbone import REFERENCE_FP16, Backbone
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


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast for bf16 / fp16 on CUDA; none for fp32 and reference-fp16 (whose weights carry their dtypes)."""
    if precision in ("fp32", REFERENCE_FP16) or device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


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
        log.info("resumed from %s at epoch %d step %d", checkpoint, start_epoch, skip)
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
                loss = ce
                for extra in out.losses.values():
                    loss = loss + extra.float()
            parts = {"loss": loss, "loss_ce": ce, **{f"loss_{k}": v for k, v in out.losses.items()}}
            for part, value in parts.items():
                loss_sums[part] = loss_sums.get(part, 0.0) + value.detach().float()  # summed on the device
            scaled = loss / cfg.accum_steps
            (scaler.scale(scaled) if scaler else scaled).backward()
            last_loss = float(loss.detach())  # one sync per step (the progress line needs it anyway)
            if not math.isfinite(last_loss):
                raise NonFiniteLoss(epoch, cfg.epochs, step, steps, *_first_non_finite(parts))
            boundary = (step + 1) % cfg.accum_steps == 0 or step + 1 == steps
            if boundary:
                if scaler:  # the scaler skips steps with inf gradients itself
                    scaler.step(opt)
                    scaler.update()
                else:
                    bad = _non_finite_grad(method)
                    if bad is not None:
                        raise NonFiniteLoss(epoch, cfg.epochs, step, steps, f"gradient of {bad[0]}", bad[1])
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
