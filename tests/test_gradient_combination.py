"""The trainer's gradient-combination step (`gradient_objectives` + `combine_gradients`, engine/trainer.py `fit`), on
a tiny method with no backbone pass: one backward per objective, the combination of their gradients applied by the
optimizer (checked against a hand computation), accumulation combining the accumulated per-objective gradients once
per step, the gradient scaler seeing through it (same step, overflows skipped), the non-finite checks naming the
objective, the recorded loss parts, and a resume that ends bit-identically."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mugcp_bench.engine import trainer
from mugcp_bench.engine.interrupts import deferred_sigint
from mugcp_bench.errors import NonFiniteLoss, RunInterrupted
from mugcp_bench.methods.base import MethodOutput, TrainConfig
from tests.method_harness import CLASSNAMES, shared_tiny_backbone, write_items
from tests.numerics import FP32, GRAD, assert_close_scaled, assert_differs
from tests.test_trainer_capabilities import StopAt, Tiny

CPU = torch.device("cpu")
N_CLASSES = len(CLASSNAMES)


def reject(a: torch.Tensor, b: torch.Tensor, lam: float) -> torch.Tensor:
    """The test's combination: `a` with λ times its component along `b` removed where the two conflict."""
    if F.cosine_similarity(a.flatten(), b.flatten(), dim=0) >= 0:
        return a
    b_hat = b / b.norm()
    return a - lam * (a * b_hat).sum() * b_hat


class Poison(torch.autograd.Function):
    """The identity, whose backward is infinite while `armed`: a gradient overflow under a finite loss."""

    armed = False

    @staticmethod
    def forward(ctx, x):  # noqa: ANN001, ANN205
        return x.clone()

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        return grad * float("inf") if Poison.armed else grad


class TwoObjectives(Tiny):
    """The cross-entropy, and an "away" objective (the cross-entropy towards the next class) that conflicts with it;
    only the CE gradient is applied, with the conflicting share of "away" removed."""

    name = "tiny-two-objectives"
    needs_labels = True
    gradient_objectives = ("away", "ce")
    loss_objectives = ("ce",)

    def __init__(self, lam: float = 1.0, poison_at: int | None = None, **kw) -> None:
        super().__init__(**kw)
        self.lam, self.poison_at = lam, poison_at
        self.forwards: list[tuple[torch.Tensor, torch.Tensor]] = []  # (images, labels) of each training forward
        self.combined: list[dict[str, dict[str, torch.Tensor]]] = []  # what each combination was given

    def forward(self, images, keys=None, image_features=None, labels=None) -> MethodOutput:
        logits = F.adaptive_avg_pool2d(images, 4).flatten(1) @ self.weight.t() + self.bias  # (B, C)
        if labels is None:
            return MethodOutput(logits)
        self.forwards.append((images.clone(), labels.clone()))
        Poison.armed = len(self.forwards) - 1 == self.poison_at
        away = Poison.apply(F.cross_entropy(logits, (labels + 1) % N_CLASSES))
        return MethodOutput(logits, {"away": away})

    def combine_gradients(self, grads):
        self.combined.append({o: {n: g.clone() for n, g in gs.items()} for o, gs in grads.items()})
        return {n: reject(g, grads["away"][n], self.lam) for n, g in grads["ce"].items()}


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    return write_items(tmp_path_factory.mktemp("combination"), CLASSNAMES, n=12, seed=6)


def fit(method, items, cfg, **kw):
    transform = shared_tiny_backbone().test_transform  # deterministic: runs are comparable bit for bit
    return trainer.fit(method, items, cfg, transform, CPU, "fp32", seed=3, **kw)


def objective_grads(method, images, labels) -> dict[str, dict[str, torch.Tensor]]:
    """Each objective's gradients on one batch, by hand (autograd on a fresh forward)."""
    out = method(images, labels=labels)
    values = {"ce": F.cross_entropy(out.logits, labels), "away": out.losses["away"]}
    params = dict(method.named_parameters())
    grads = {}
    for name, value in values.items():
        gs = torch.autograd.grad(value, list(params.values()), retain_graph=True)
        grads[name] = dict(zip(params, gs))
    return grads


def all_images(items):
    transform = shared_tiny_backbone().test_transform
    images = torch.stack([transform(Image.open(d.impath).convert("RGB")) for d in items])
    return images, torch.tensor([d.label for d in items])


def sgd_update(method, grads: dict[str, torch.Tensor], cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """One first SGD step (the momentum buffer starts as the gradient): p − lr·(g + wd·p)."""
    return {n: p.detach() - cfg.lr * (grads[n] + cfg.weight_decay * p.detach()) for n, p in method.named_parameters()}


# --- one step --------------------------------------------------------------------------------------------------------
@pytest.mark.numerics
def test_a_step_applies_the_combination_of_each_objectives_gradient(items):
    cfg = TrainConfig(epochs=1, lr=0.5, batch_size=12, warmup_epochs=0)
    twin = TwoObjectives()
    images, labels = all_images(items)  # one batch holds every image: its order does not change the mean losses
    grads = objective_grads(twin, images, labels)
    assert any(
        F.cosine_similarity(grads["ce"][n].flatten(), grads["away"][n].flatten(), dim=0) < 0 for n in grads["ce"]
    )
    expected = sgd_update(twin, {n: reject(grads["ce"][n], grads["away"][n], 1.0) for n in grads["ce"]}, cfg)

    method = TwoObjectives()
    fit(method, items, cfg)
    (given,) = method.combined  # one optimizer step, one combination
    for objective in ("ce", "away"):
        for n, g in grads[objective].items():
            assert_close_scaled(given[objective][n], g, GRAD, msg=f"{objective} gradient of {n}")
    for n, p in method.named_parameters():
        assert_close_scaled(p.detach(), expected[n], FP32, msg=n)
    # the combination, not the CE alone nor the sum of the objectives, reached the parameters
    plain_ce = sgd_update(twin, grads["ce"], cfg)
    summed = sgd_update(twin, {n: grads["ce"][n] + grads["away"][n] for n in grads["ce"]}, cfg)
    assert_differs(method.weight.detach(), plain_ce["weight"])
    assert_differs(method.weight.detach(), summed["weight"])


def test_every_loss_part_is_recorded_and_loss_is_the_descended_objective(items):
    result = fit(TwoObjectives(), items, TrainConfig(epochs=2, lr=0.1, batch_size=4))
    assert [h["epoch"] for h in result.history] == [1, 2]
    for h in result.history:
        assert {"loss", "loss_ce", "loss_away"} <= h.keys()
        assert h["loss"] == h["loss_ce"] and h["loss_away"] > 0  # loss_objectives = ("ce",)

    class Summed(TwoObjectives):
        loss_objectives = ()  # default: every objective

    for h in fit(Summed(), items, TrainConfig(epochs=1, lr=0.1, batch_size=4)).history:
        assert h["loss"] == pytest.approx(h["loss_ce"] + h["loss_away"], rel=1e-6)


def test_a_loss_part_no_objective_names_is_refused(items):
    class Forgetful(TwoObjectives):
        gradient_objectives = ("ce",)

    with pytest.raises(ValueError, match=r"gradient_objectives \['ce'\] must name every loss part once.*'away'"):
        fit(Forgetful(), items, TrainConfig(epochs=1, batch_size=4))


# --- accumulation --------------------------------------------------------------------------------------------------
@pytest.mark.numerics
def test_accumulation_combines_the_accumulated_gradients_once_per_step(items):
    """Three micro-batches of 4 accumulated give the step of one batch of 12: each objective's gradient is
    accumulated and the combination runs once, at the optimizer step, on the accumulated gradients; combining each
    micro-batch and averaging would be another step."""
    whole = TwoObjectives()
    fit(whole, items, TrainConfig(epochs=1, lr=0.5, batch_size=12, warmup_epochs=0))
    accumulated = TwoObjectives()
    cfg = TrainConfig(epochs=1, lr=0.5, batch_size=4, accum_steps=3, warmup_epochs=0)
    fit(accumulated, items, cfg)
    assert len(accumulated.forwards) == 3 and len(accumulated.combined) == 1
    for objective in ("ce", "away"):
        for n, g in whole.combined[0][objective].items():
            assert_close_scaled(accumulated.combined[0][objective][n], g, GRAD, msg=f"{objective} of {n}")
    for n, p in whole.named_parameters():
        assert_close_scaled(getattr(accumulated, n).detach(), p.detach(), FP32, msg=n)
    # the other order: one combination per micro-batch, averaged
    twin = TwoObjectives()
    per_micro = [objective_grads(twin, im, lab) for im, lab in accumulated.forwards]
    averaged = {
        n: sum(reject(g["ce"][n], g["away"][n], 1.0) for g in per_micro) / len(per_micro) for n in per_micro[0]["ce"]
    }
    assert_differs(accumulated.weight.detach(), sgd_update(twin, averaged, cfg)["weight"])


# --- the gradient scaler -------------------------------------------------------------------------------------------
@pytest.fixture
def cpu_scaler(monkeypatch):
    """`fit` with a GradScaler on the CPU (what fp16 autocast gets on CUDA), kept for inspection."""
    made = []

    def make(precision, device):
        made.append(torch.amp.GradScaler("cpu"))
        return made[-1]

    monkeypatch.setattr(trainer, "make_scaler", make)
    return made


def test_under_a_gradient_scaler_the_combination_sees_unscaled_gradients_and_the_steps_are_unchanged(
    items, cpu_scaler, monkeypatch
):
    """The scale (2¹⁶) multiplies every objective's backward; the combination gets the gradients divided by it and
    its result goes through the scaler's own unscale: with a power-of-two scale all of it is exact, so the run is
    bit-identical to one without a scaler."""
    cfg = TrainConfig(epochs=2, lr=0.2, batch_size=4, accum_steps=2)
    scaled = TwoObjectives()
    fit(scaled, items, cfg)
    (scaler,) = cpu_scaler
    assert scaler.get_scale() == 2.0**16  # no overflow, no growth (interval 2000)
    monkeypatch.setattr(trainer, "make_scaler", lambda precision, device: None)  # the same run without a scaler
    plain = TwoObjectives()
    fit(plain, items, cfg)
    assert len(scaled.combined) == len(plain.combined) == 4  # 3 micro-batches per epoch: steps after 2 and after 3
    for given, want in zip(scaled.combined, plain.combined):
        for objective in want:
            for n, g in want[objective].items():
                assert torch.equal(given[objective][n], g), f"{objective} gradient of {n}"
    for n, p in plain.named_parameters():
        assert torch.equal(getattr(scaled, n).detach(), p.detach()), n


def test_an_objective_gradient_overflow_skips_the_step_under_a_scaler(items, cpu_scaler, monkeypatch):
    steps = []
    real_make = trainer.make_optimizer

    def counting(method, cfg):
        opt, sched = real_make(method, cfg)
        opt.register_step_post_hook(lambda *_: steps.append(1))
        return opt, sched

    monkeypatch.setattr(trainer, "make_optimizer", counting)
    method = TwoObjectives(poison_at=1)  # the second micro-batch's "away" gradient is infinite, its loss finite
    result = fit(method, items, TrainConfig(epochs=1, lr=0.2, batch_size=4))
    (scaler,) = cpu_scaler
    assert len(steps) == 2 and len(method.combined) == 2  # 3 micro-batches, the poisoned one's step skipped
    assert scaler.get_scale() == 2.0**15  # lowered once, as for any overflow
    assert all(torch.isfinite(p).all() for p in method.parameters()) and result.history[0]["loss"] > 0


def test_without_a_scaler_a_non_finite_objective_gradient_stops_the_run_naming_it(items):
    with pytest.raises(NonFiniteLoss) as e:
        fit(TwoObjectives(poison_at=1), items, TrainConfig(epochs=1, lr=0.2, batch_size=4))
    assert e.value.part == "away gradient of weight" and e.value.step == 1


def test_a_non_finite_loss_part_outside_the_recorded_loss_stops_the_run_naming_it(items):
    class NanAway(TwoObjectives):
        def forward(self, images, keys=None, image_features=None, labels=None):
            out = super().forward(images, keys, image_features, labels)
            if labels is not None and len(self.forwards) == 2:
                out.losses["away"] = out.losses["away"] * float("nan")
            return out

    with pytest.raises(NonFiniteLoss) as e:
        fit(NanAway(), items, TrainConfig(epochs=1, lr=0.2, batch_size=4))
    assert e.value.part == "loss_away" and e.value.step == 1  # `loss` (the CE) was finite


# --- checkpoints and resume ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("epoch", "step"), [(1, 1), (0, 2)], ids=["mid-epoch", "epoch-end"])
def test_resume_ends_bit_identically_to_an_uninterrupted_run(items, tmp_path, epoch, step):
    cfg = TrainConfig(epochs=3, lr=0.2, batch_size=4, accum_steps=2)  # steps after micro-batches 2 and 3
    whole = TwoObjectives()
    whole_result = fit(whole, items, cfg, checkpoint=tmp_path / "whole.pt")
    ckpt = tmp_path / "parts.pt"
    with deferred_sigint(), pytest.raises(RunInterrupted):
        fit(TwoObjectives(), items, cfg, checkpoint=ckpt, callbacks=[StopAt(epoch, step)])
    saved = torch.load(ckpt, weights_only=False)
    assert set(saved) >= trainer.CHECKPOINT_KEYS and set(saved["model"]) == {"weight", "bias"}
    resumed = TwoObjectives(seed=7)  # another initialisation: everything comes from the checkpoint
    with deferred_sigint():
        result = fit(resumed, items, cfg, checkpoint=ckpt, resume=True)
    for n, p in whole.named_parameters():
        assert torch.equal(getattr(resumed, n).detach(), p.detach()), f"{n} differs after resume"
    assert [h["loss_away"] for h in result.history] == [h["loss_away"] for h in whole_result.history]
