"""The trainer's general capabilities, each on its own with a tiny method (no backbone pass): the optimizer a recipe
chooses (SGD, Adam, AdamW with their settings reaching torch), parameter groups with their own LR through Dassl's
warm-up and cosine, the method's epoch-end hook and its place in the epoch, the end-of-training swap, and
accumulated method state that survives a resume bit-identically."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from mugcp_bench.engine import optim as optim_mod
from mugcp_bench.engine import trainer
from mugcp_bench.engine.callbacks import StepInfo, TrainCallback
from mugcp_bench.engine.interrupts import deferred_sigint, request_stop
from mugcp_bench.errors import RunInterrupted, UserError
from mugcp_bench.methods.base import Method, MethodOutput, ParamGroup, TrainConfig, apply_overrides
from mugcp_bench.runs.settings import check_ranges
from tests.method_harness import CLASSNAMES, shared_tiny_backbone, write_items
from tests.numerics import assert_close_scaled

CPU = torch.device("cpu")


class Tiny(Method):
    """A linear classifier on 4×4-pooled pixels: two trainable tensors, optionally in two named groups."""

    name = "tiny-capabilities"

    def __init__(self, groups: dict[str, float] | None = None, seed: int = 0) -> None:
        super().__init__(shared_tiny_backbone(), CLASSNAMES, None)
        gen = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(0.1 * torch.randn(len(CLASSNAMES), 3 * 16, generator=gen))  # (C, 48)
        self.bias = nn.Parameter(0.1 * torch.randn(len(CLASSNAMES), generator=gen))  # (C,)
        self.groups = groups

    def param_groups(self) -> list[ParamGroup] | None:
        if self.groups is None:
            return None
        return [
            ParamGroup("weight", [self.weight], self.groups["weight"]),
            ParamGroup("bias", [self.bias], self.groups["bias"]),
        ]

    def forward(self, images, keys=None, image_features=None) -> MethodOutput:
        x = F.adaptive_avg_pool2d(images, 4).flatten(1)  # (B, 48)
        logits = x @ self.weight.t() + self.bias  # (B, C)
        return MethodOutput(logits, {"l2": 1e-3 * self.weight.pow(2).sum()})


class Averaging(Tiny):
    """Accumulates a weighted sum of its parameters after every epoch (weights ∝ epoch + 1, float64) and swaps the
    average in at the end: the shape of PromptSRC's Gaussian prompt aggregation, without the Gaussian."""

    name = "tiny-averaging"

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.events: list[tuple] = []
        self.sums: dict[str, torch.Tensor] = {}
        self.snapshots: list[dict[str, torch.Tensor]] = []

    def on_train_start(self, epochs: int) -> None:
        self.events.append(("train_start", epochs))
        self.sums, self.epochs = {}, epochs

    def on_epoch_end(self, epoch: int, epochs: int) -> None:
        self.events.append(("epoch_end", epoch, epochs))
        total = sum(range(1, epochs + 1))
        snap = self.trainable_state()
        self.snapshots.append(snap)
        for k, v in snap.items():
            self.sums[k] = self.sums.get(k, torch.zeros_like(v, dtype=torch.float64)) + v.double() * (epoch + 1) / total

    def on_train_end(self) -> None:
        self.events.append(("train_end",))
        self.load_trainable_state({k: v.float() for k, v in self.sums.items()})

    def accumulated_state(self) -> dict:
        return {"sums": {k: v.clone() for k, v in self.sums.items()}}

    def load_accumulated_state(self, state: dict) -> None:
        self.events.append(("load_accumulated", sorted(state.get("sums", {}))))
        self.sums = {k: v.clone() for k, v in state["sums"].items()}


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    return write_items(tmp_path_factory.mktemp("capabilities"), CLASSNAMES, n=12, seed=4)


def fit(method, items, cfg, checkpoint=None, resume=False, callbacks=()):
    transform = shared_tiny_backbone().test_transform  # deterministic: runs are comparable bit for bit
    return trainer.fit(
        method, items, cfg, transform, CPU, "fp32", seed=1, checkpoint=checkpoint, resume=resume, callbacks=callbacks
    )


# --- the optimizer a recipe chooses ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_the_chosen_optimizer_gets_its_settings(name):
    extra = {"momentum": 0.8} if name == "sgd" else {"adam_eps": 1e-3, "adam_beta1": 0.8, "adam_beta2": 0.99}
    cfg = TrainConfig(lr=0.01, weight_decay=1e-3, optimizer=name, **extra)
    opt, _ = trainer.make_optimizer(Tiny(), cfg)
    assert type(opt) is {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name]
    (group,) = opt.param_groups
    assert group["initial_lr"] == 0.01 and group["lr"] == 1e-5 and group["weight_decay"] == 1e-3  # in its warm-up
    if name == "sgd":
        assert (group["momentum"], group["dampening"], group["nesterov"]) == (0.8, 0, False)
    else:
        assert group["eps"] == 1e-3 and group["betas"] == (0.8, 0.99)


@pytest.mark.numerics
def test_adam_step_uses_the_eps_and_betas_of_the_recipe(items, tmp_path):
    """One training step of `fit` under Adam equals the hand-computed update p − lr·m̂/(√v̂ + eps), with the coupled
    L2 term wd·p in the gradient (torch's Adam, as Dassl builds it), for a large eps where it matters."""
    cfg = TrainConfig(
        epochs=1,
        lr=0.05,
        batch_size=12,
        warmup_epochs=0,
        weight_decay=1e-2,
        optimizer="adam",
        adam_eps=0.5,
        adam_beta1=0.5,
        adam_beta2=0.9,
    )
    twin = Tiny()
    transform = shared_tiny_backbone().test_transform
    images = torch.stack([transform(Image.open(d.impath).convert("RGB")) for d in items])
    labels = torch.tensor([d.label for d in items])
    out = twin(images)
    loss = F.cross_entropy(out.logits, labels) + out.losses["l2"]
    loss.backward()  # one batch holds every image: the order does not change the mean loss
    expected = {}
    for name, p in (("weight", twin.weight), ("bias", twin.bias)):
        g = p.grad + cfg.weight_decay * p.detach()
        m_hat = (1 - cfg.adam_beta1) * g / (1 - cfg.adam_beta1)
        v_hat = (1 - cfg.adam_beta2) * g * g / (1 - cfg.adam_beta2)
        expected[name] = p.detach() - cfg.lr * m_hat / (v_hat.sqrt() + cfg.adam_eps)
    method = Tiny()
    fit(method, items, cfg)
    for name in expected:
        assert_close_scaled(getattr(method, name).detach(), expected[name], msg=name)
    # a stock eps (1e-8) would have moved every entry by about lr: the setting really reached the update
    assert (method.weight.detach() - Tiny().weight.detach()).abs().mean() < 0.5 * cfg.lr


def test_optimizer_settings_are_checked_before_training():
    with pytest.raises(UserError, match=r"unknown optimizer\. Did you mean 'adam'"):
        apply_overrides(TrainConfig(), {"optimizer": "adm"}, "training")
    with pytest.raises(UserError, match="adam_eps applies to adam and adamw only.*optimizer=sgd"):
        apply_overrides(TrainConfig(), {"adam_eps": "1e-3"}, "training")
    with pytest.raises(UserError, match="momentum applies to sgd only.*optimizer=adam"):
        apply_overrides(TrainConfig(optimizer="adam"), {"momentum": "0.5"}, "training")
    # a recipe choosing Adam with eps, then a user going back to SGD, must also reset eps (never silently kept)
    recipe = apply_overrides(TrainConfig(), {"optimizer": "adam", "adam_eps": 1e-3}, "training")
    with pytest.raises(UserError, match="--set adam_eps=1e-08"):
        apply_overrides(recipe, {"optimizer": "sgd"}, "training")
    assert apply_overrides(recipe, {"optimizer": "sgd", "adam_eps": "1e-8"}, "training").optimizer == "sgd"
    for key, bad in (("adam_eps", 0.0), ("adam_beta1", 1.0), ("adam_beta2", -0.1)):
        cfg = dataclasses.replace(TrainConfig(optimizer="adam"), **{key: bad})
        with pytest.raises(UserError, match=f"--set {key}="):
            check_ranges(cfg, "training")


# --- parameter groups through Dassl's warm-up and cosine ---------------------------------------------------------
def dassl_trace(base_lrs: list[float], epochs: int, warmup: int, cons_lr: float) -> list[list[float]]:
    """Per-epoch LRs of every group as Dassl steps them (KaiyangZhou/Dassl.pytorch dassl/optim/lr_scheduler.py,
    ConstantWarmupScheduler around torch's own CosineAnnealingLR(T_max=epochs), stepped once per epoch), simulated
    here independently of the trainer's closed form: while the warm-up counter is below `warmup`, every group is set
    to `cons_lr`; then torch's (recursive) cosine scheduler takes over from each group's base LR."""
    params = [nn.Parameter(torch.zeros(1)) for _ in base_lrs]
    opt = torch.optim.SGD([{"params": [p], "lr": lr} for p, lr in zip(params, base_lrs)])
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    counter = 0

    def set_all(lrs):
        for g, lr in zip(opt.param_groups, lrs):
            g["lr"] = lr

    if warmup > 0:  # Dassl wraps the cosine only when WARMUP_EPOCH > 0
        set_all([cons_lr] * len(base_lrs))  # the warm-up scheduler's own first step
    out = []
    for _ in range(epochs):
        out.append([g["lr"] for g in opt.param_groups])
        opt.step()
        if counter >= warmup:
            cosine.step()
        else:
            counter += 1
            set_all(cosine.get_last_lr() if counter >= warmup else [cons_lr] * len(base_lrs))
    return out


@pytest.mark.parametrize(("epochs", "warmup"), [(6, 1), (5, 2), (3, 0)])
def test_group_lrs_follow_dassl_through_warmup_and_cosine(epochs, warmup):
    cfg = TrainConfig(lr=0.002, epochs=epochs, warmup_epochs=warmup)
    ours = optim_mod.lr_traces(cfg, {"weight": 1.0, "bias": 0.1})
    theirs = dassl_trace([0.002, 0.0002], epochs, warmup, cfg.warmup_lr)
    for e in range(epochs):
        assert [ours["weight"][e], ours["bias"][e]] == pytest.approx(theirs[e], rel=1e-9, abs=1e-15)
    if warmup:  # every group at the constant warm-up LR, whatever its own base LR
        assert ours["weight"][0] == ours["bias"][0] == pytest.approx(1e-5)


def test_fit_trains_each_group_at_its_lr_and_records_it(items):
    cfg = TrainConfig(epochs=4, lr=0.02, batch_size=4)
    result = fit(Tiny(groups={"weight": 1.0, "bias": 0.25}), items, cfg)
    theirs = dassl_trace([0.02, 0.005], 4, 1, cfg.warmup_lr)
    for row, (w, b) in zip(result.history, theirs):
        assert row["lr_weight"] == pytest.approx(w, rel=1e-9) and row["lr_bias"] == pytest.approx(b, rel=1e-9)
        assert row["lr"] == row["lr_weight"]  # `lr`: the first group's, as before
        assert {"loss", "loss_ce", "loss_l2"} <= row.keys()
    one_group = fit(Tiny(), items, cfg)
    assert not any(k.startswith("lr_") for k in one_group.history[0])  # no named groups: history as before


def test_groups_must_hold_every_trainable_parameter_once():
    method = Tiny()
    method.param_groups = lambda: [ParamGroup("weight", [method.weight])]
    with pytest.raises(ValueError, match="1 trainable parameters in no group"):
        trainer.make_optimizer(method, TrainConfig())
    method.param_groups = lambda: [ParamGroup("a", [method.weight, method.bias]), ParamGroup("b", [method.bias])]
    with pytest.raises(ValueError, match="in groups 'a' and 'b'"):
        trainer.make_optimizer(method, TrainConfig())


# --- the epoch hook, the final swap, accumulated state --------------------------------------------------------------
class Recorder(TrainCallback):
    def __init__(self, events):
        self.events = events

    def on_epoch_end(self, info: StepInfo) -> None:
        self.events.append(("callback_epoch_end", info.epoch))


def test_epoch_hook_runs_after_the_last_step_and_lr_step_before_the_checkpoint(items, tmp_path, monkeypatch):
    method = Averaging()
    events = method.events
    real_make = trainer.make_optimizer

    def recording_make(m, cfg):
        opt, sched = real_make(m, cfg)
        opt.register_step_post_hook(lambda *_: events.append(("optimizer_step",)))
        return opt, sched

    real_lr_step = torch.optim.lr_scheduler.LambdaLR.step

    def recording_lr_step(self, *args):
        real_lr_step(self, *args)
        events.append(("lr_step", self.optimizer.param_groups[0]["lr"]))

    monkeypatch.setattr(torch.optim.lr_scheduler.LambdaLR, "step", recording_lr_step)
    real_save = trainer.atomic_torch_save

    def recording_save(state, path):
        events.append(("checkpoint", state["epoch"], state["step"], sorted(state["method_state"]["sums"])))
        real_save(state, path)

    monkeypatch.setattr(trainer, "make_optimizer", recording_make)
    monkeypatch.setattr(trainer, "atomic_torch_save", recording_save)
    cfg = TrainConfig(epochs=2, lr=0.02, batch_size=4)  # 3 steps per epoch
    fit(method, items, cfg, checkpoint=tmp_path / "ckpt.pt", callbacks=[Recorder(events)])
    epoch = [("optimizer_step",)] * 3
    assert events == [
        ("lr_step", pytest.approx(1e-5)),  # the scheduler's own first step, when it is built: the warm-up LR
        ("train_start", 2),
        *epoch,
        ("lr_step", pytest.approx(0.02)),  # epoch 1's LR: the cosine's start
        ("epoch_end", 0, 2),
        ("checkpoint", 0, None, ["bias", "weight"]),
        ("callback_epoch_end", 0),
        *epoch,
        ("lr_step", pytest.approx(0.5 * 0.02 * (1 + math.cos(math.pi * 1 / 2)))),
        ("epoch_end", 1, 2),
        ("train_end",),
        ("checkpoint", 1, None, ["bias", "weight"]),
        ("callback_epoch_end", 1),
    ]


def test_the_swap_at_the_end_is_the_final_model_and_is_not_redone_on_resume(items, tmp_path):
    cfg = TrainConfig(epochs=3, lr=0.05, batch_size=4)
    method = Averaging()
    ckpt = tmp_path / "ckpt.pt"
    fit(method, items, cfg, checkpoint=ckpt)
    weights = [1 / 6, 2 / 6, 3 / 6]
    for name in ("weight", "bias"):
        want = sum(w * s[name].double() for w, s in zip(weights, method.snapshots)).float()
        assert torch.equal(getattr(method, name).detach(), want)  # the swapped-in average, not the last epoch
        assert not torch.equal(want, method.snapshots[-1][name])
    saved = torch.load(ckpt, weights_only=False)
    assert all(torch.equal(saved["model"][k], v) for k, v in method.trainable_state().items())
    final = method.trainable_state()
    again = Averaging(seed=9)  # resumed from the last checkpoint: nothing to train, no second swap
    result = fit(again, items, cfg, checkpoint=ckpt, resume=True)
    assert result.epochs_run == 0
    assert ("train_end",) not in again.events and ("load_accumulated", ["bias", "weight"]) in again.events
    assert all(torch.equal(final[k], v) for k, v in again.trainable_state().items())


class StopAt(TrainCallback):
    """Asks the run to stop (as a first Ctrl-C does) after step `step` of epoch `epoch`."""

    def __init__(self, epoch: int, step: int) -> None:
        self.epoch, self.step = epoch, step

    def on_step_end(self, info: StepInfo) -> None:
        if (info.epoch, info.step) == (self.epoch, self.step):
            request_stop()


@pytest.mark.parametrize(("epoch", "step"), [(1, 0), (2, 2), (0, 1)], ids=["mid-epoch", "epoch-end", "first-epoch"])
def test_accumulated_state_survives_an_interrupt_and_resume_bit_identically(items, tmp_path, epoch, step):
    cfg = TrainConfig(epochs=4, lr=0.05, batch_size=4)
    whole = Averaging()
    fit(whole, items, cfg, checkpoint=tmp_path / "whole.pt")
    ckpt = tmp_path / "parts.pt"
    first = Averaging()
    with deferred_sigint(), pytest.raises(RunInterrupted):
        fit(first, items, cfg, checkpoint=ckpt, callbacks=[StopAt(epoch, step)])
    saved = torch.load(ckpt, weights_only=False)
    assert len(saved["method_state"]["sums"]) == (2 if saved["epoch"] > 0 or saved["step"] is None else 0)
    second = Averaging(seed=5)  # another initialisation: everything must come from the checkpoint
    with deferred_sigint():
        result = fit(second, items, cfg, checkpoint=ckpt, resume=True)
    assert result.epochs_run == cfg.epochs - saved["epoch"] - (saved["step"] is None)
    for k, v in whole.trainable_state().items():
        assert torch.equal(second.trainable_state()[k], v), f"{k} differs after resume"
    assert [h["loss"] for h in result.history] == [h["loss"] for h in fit(Averaging(), items, cfg).history]


def test_a_checkpoint_whose_accumulated_state_does_not_fit_is_set_aside(items, tmp_path, caplog):
    from mugcp_bench.model.state_fit import StateMismatch

    class Strict(Averaging):
        def load_accumulated_state(self, state):
            if set(state.get("sums", {})) != {"weight", "bias"}:
                raise StateMismatch("no running sums", "no running sums")
            super().load_accumulated_state(state)

    cfg = TrainConfig(epochs=2, lr=0.05, batch_size=4)
    ckpt = tmp_path / "ckpt.pt"
    fit(Strict(), items, cfg, checkpoint=ckpt)
    state = torch.load(ckpt, weights_only=False)
    torch.save({**state, "epoch": 0, "method_state": {}}, ckpt)  # an accumulator lost (as the reference loses it)
    method = Strict()
    result = fit(method, items, cfg, checkpoint=ckpt, resume=True)
    assert result.epochs_run == 2 and (tmp_path / "ckpt.pt.unusable").is_file()
    assert method.events.count(("train_start", 2)) == 2  # reset again after the unusable checkpoint
    reference = Strict()
    fit(reference, items, cfg)
    assert all(torch.equal(reference.trainable_state()[k], v) for k, v in method.trainable_state().items())
