"""Contract tests for every registered method (parametrized over the registry: a new method is covered at once)."""

from __future__ import annotations

import io

import pytest
import torch

from mugcp_bench.errors import UserError
from mugcp_bench.methods.base import TrainConfig, split_overrides
from mugcp_bench.protocols import TRAIN_PROTOCOLS
from mugcp_bench.registry import METHODS
from tests.method_harness import (
    CLASSNAMES,
    DATASET,
    OTHER_CLASSNAMES,
    build_method,
    make_batch,
    prepare,
    shared_tiny_backbone,
    total_loss,
)
from tests.numerics import assert_close_scaled

NAMES = METHODS.names()
ABLATIONS = [(n, a) for n in NAMES for a in METHODS.get(n).ablations]


@pytest.fixture
def batch(tmp_path):
    return make_batch(tmp_path, n=3)


def fresh(name, batch, seed=0, **overrides):
    return prepare(build_method(name, seed=seed, **overrides), batch)


def sgd_step(method, batch, lr=0.05):
    """One training step as the trainer takes it (no-op for methods without trainable parameters)."""
    method.train()
    if method.n_trainable() == 0:
        method.eval()
        return
    opt = torch.optim.SGD(method.trainable_parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    _, loss = total_loss(method, batch)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    method.eval()


def test_registry_has_the_reference_methods():
    assert {"zsclip", "coop", "cocoop", "maple"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_logits_and_gradients(name, batch):
    backbone = shared_tiny_backbone()
    method = fresh(name, batch).train()
    logits, loss = total_loss(method, batch)
    assert logits.shape == (3, len(CLASSNAMES))
    assert torch.isfinite(logits).all() and torch.isfinite(loss)
    trainable = [(n, p) for n, p in method.named_parameters() if p.requires_grad]
    if method.n_trainable() == 0:  # zero-shot CLIP: nothing to train, so no graph
        assert trainable == []
        assert not loss.requires_grad
    else:
        loss.backward()
        for n, p in trainable:
            assert p.dtype == torch.float32, f"{n} is {p.dtype}; trainable parameters are fp32"
            assert p.grad is not None, f"{n} gets no gradient"
            assert torch.isfinite(p.grad).all(), f"{n} has a non-finite gradient"
    backbone_ids = {id(p) for p in backbone.parameters()}
    assert not backbone_ids & {id(p) for p in method.parameters()}, "backbone parameters are registered in the method"
    for n, p in backbone.named_parameters():
        assert not p.requires_grad, f"backbone {n} requires grad"
        assert p.grad is None, f"backbone {n} received a gradient"


@pytest.mark.parametrize("name", NAMES)
def test_backbone_bit_identical_after_a_step(name, batch):
    backbone = shared_tiny_backbone()
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    method = fresh(name, batch)
    start = {k: v.clone() for k, v in method.trainable_state().items()}
    sgd_step(method, batch)
    after = backbone.model.state_dict()
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == [], f"backbone tensors changed: {changed[:5]}"
    assert not any(k.startswith(("backbone.", "model.")) for k in method.state_dict()), "backbone in the state dict"
    if method.n_trainable() > 0:
        now = method.trainable_state()
        assert any(not torch.equal(start[k], now[k]) for k in start), "the step changed no trainable parameter"


@pytest.mark.parametrize("name", NAMES)
def test_set_classnames_to_another_class_set(name, batch):
    method = fresh(name, batch)
    with torch.no_grad():
        method.set_classnames(OTHER_CLASSNAMES, "a photo of a {}.", DATASET)
        assert method(batch.images, keys=batch.keys).logits.shape == (3, len(OTHER_CLASSNAMES))
        method.set_classnames(CLASSNAMES)
        assert method(batch.images, keys=batch.keys).logits.shape == (3, len(CLASSNAMES))


@pytest.mark.parametrize("name", NAMES)
def test_trainable_state_round_trip(name, batch):
    method = fresh(name, batch, seed=0)
    sgd_step(method, batch)
    state = method.trainable_state()
    assert set(state) == {n for n, p in method.named_parameters() if p.requires_grad}
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    other = fresh(name, batch, seed=1)
    other.load_trainable_state(torch.load(buf, weights_only=True))
    with torch.no_grad():
        expected = method(batch.images, keys=batch.keys).logits
        got = other(batch.images, keys=batch.keys).logits
    assert torch.equal(expected, got)


@pytest.mark.numerics
@pytest.mark.parametrize("name", NAMES)
def test_fast_eval_equals_forward(name, batch):
    method = fresh(name, batch)
    sgd_step(method, batch)  # off the initialisation (zero-initialised branches become active)
    for classes in (CLASSNAMES, OTHER_CLASSNAMES):
        method.set_classnames(classes)
        with torch.no_grad():
            naive = method(batch.images, keys=batch.keys).logits
        method.begin_eval()
        fast = method.predict(batch.images, keys=batch.keys)
        assert fast.shape == (3, len(classes))
        assert_close_scaled(fast, naive)
        if method.frozen_image_path:  # cached image features replace the images
            feats = shared_tiny_backbone().encode_image(batch.images)
            assert_close_scaled(method.predict(None, batch.keys, image_features=feats), naive)
        method.end_eval()


@pytest.mark.parametrize("name", NAMES)
def test_recipes_are_valid(name):
    cls = METHODS.get(name)
    assert {"paper", "toy"} <= set(cls.recipes)
    assert set(cls.recipes["paper"]) <= set(cls.recipes["toy"]), "the toy world runs every protocol paper has"
    train_fields = TrainConfig.__dataclass_fields__
    for recipe, table in cls.recipes.items():
        for protocol in TRAIN_PROTOCOLS:
            for shots in (1, 2, 4, 8, 16):
                for dataset in (DATASET, "imagenet"):
                    if protocol not in table:
                        with pytest.raises(UserError, match=protocol):
                            cls.recipe(recipe, protocol, shots, dataset)
                        continue
                    cfg_keys, train_keys = split_overrides(cls, cls.recipe(recipe, protocol, shots, dataset))
                    cls.make_config(cfg_keys)
                    assert set(train_keys) <= set(train_fields)
                    assert isinstance(train_keys.get("epochs", 0), int) and train_keys.get("epochs", 0) >= 0


@pytest.mark.parametrize(("name", "ablation"), ABLATIONS)
def test_ablations_build_and_run(name, ablation, batch):
    cls = METHODS.get(name)
    overrides = cls.ablations[ablation]
    cfg_keys, _train_keys = split_overrides(cls, overrides)
    method = fresh(name, batch, **cfg_keys)
    with torch.no_grad():
        logits = method(batch.images, keys=batch.keys).logits
    assert logits.shape == (3, len(CLASSNAMES)) and torch.isfinite(logits).all()
