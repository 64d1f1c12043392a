"""Our fast path and the reference's naive path give the same logits, for every registered method.

Fast: EOT-truncated text (``eot_truncation`` on, the default), ``begin_eval`` / ``predict`` and, for methods with a
frozen image tower, image features from the on-disk cache. Naive (what the reference code does, and what
benchmarks/bench.py measures against): ``eot_truncation`` off before the method is built (full context-length text
passes), ``forward`` per batch, no feature cache. Both instances hold the same (perturbed) trainable weights.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mugcp_bench.engine.trainer import evaluate
from mugcp_bench.frozen.features import image_features
from mugcp_bench.methods.base import Method
from mugcp_bench.model.backbone import load_backbone
from mugcp_bench.registry import METHODS
from tests.method_harness import CLASSNAMES, build_method, load_images, write_items
from tests.numerics import FP32, GRAD, assert_close_scaled, assert_same_ranking

pytestmark = pytest.mark.numerics

# A long class name: the cut sits after its EOT, so the other prompts keep padding inside the cut sequence.
CLASSES = (*CLASSNAMES, "very long and oddly specific multi word class name")
# Every registered method with its toy config, plus the variants whose fast path takes another branch.
CASES = (
    [(name, {}) for name in METHODS.names()]
    + [
        ("cocoop", {"text_chunk": 7}),  # B × C rows over several chunks
        ("cocoop", {"meta_net": False}),  # shared prompts: text cached in begin_eval
        ("coop", {"class_token_position": "middle"}),
        ("mugcp", {"text_chunk": 7}),
        ("mugcp", {"scp": False, "vcp": False}),  # no instance term in the text: cached in begin_eval
        ("mugcp", {"mpf": "concat"}),
        ("dcp", {"fusing": "none", "text_update": True}),  # one shared text prefix per image (B × C rows)
    ]
    + [("mugcp", dict(changes)) for changes in METHODS.get("mugcp").ablations.values()]
)  # every MuGCP variant


@pytest.fixture(scope="module")
def backbones():
    """Two copies of the tiny CLIP (same seed, same weights): fast (EOT cut) and naive (full-length text)."""
    fast, naive = load_backbone("tiny"), load_backbone("tiny")
    naive.eot_truncation = False
    naive.fused_attention = False  # open_clip's own block modules
    naive.prefix_sharing = False
    assert fast.weights_hash == naive.weights_hash
    return fast, naive


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fast-vs-naive")
    return folder, write_items(folder, CLASSES, n=5, seed=3)


def perturbed_state(method: Method, seed: int = 0) -> dict[str, torch.Tensor]:
    """The trainable state plus noise, so zero-initialised gates and maps take part in the logits."""
    gen = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in method.trainable_state().items()}


@pytest.mark.parametrize(
    ("name", "overrides"), CASES, ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in o.items()) or 'toy'}" for n, o in CASES]
)
def test_fast_path_equals_naive_path(name, overrides, backbones, data, tmp_path):
    fast_bb, naive_bb = backbones
    folder, items = data
    fast = build_method(name, backbone=fast_bb, classnames=CLASSES, **overrides)
    naive = build_method(name, backbone=naive_bb, classnames=CLASSES, **overrides)
    state = perturbed_state(fast)
    fast.load_trainable_state(state)
    naive.load_trainable_state(state)
    fast.prepare_images(items, "test")
    naive.prepare_images(items, "test")
    prompts = getattr(naive, "prompts", None)
    if prompts is not None:  # the naive path really runs full-length text, the fast one a cut sequence
        assert prompts.tokens.shape[1] == naive_bb.context_length
        assert fast.prompts.tokens.shape[1] < naive_bb.context_length

    images = load_images(items, fast_bb)  # (N, 3, H, W)
    keys = [d.relpath for d in items]
    feats = None
    if fast.frozen_image_path:  # computed, then read back from the on-disk cache (the steady state)
        cache = tmp_path / "cache"
        image_features(fast_bb, items, fast_bb.test_transform, torch.device("cpu"), "fp32", cache)
        assert any((cache / "features").iterdir())
        feats = image_features(fast_bb, items, fast_bb.test_transform, torch.device("cpu"), "fp32", cache)

    fast.eval()
    naive.eval()
    fast.begin_eval()
    try:
        got = fast.predict(None if feats is not None else images, keys, feats)  # (N, C)
    finally:
        fast.end_eval()
    with torch.no_grad():
        want = naive(images, keys).logits  # (N, C)
    assert got.shape == want.shape == (len(items), len(CLASSES))
    assert torch.isfinite(want).all()
    assert_close_scaled(got, want, FP32, msg=f"{name} {overrides}: fast and naive logits")
    assert want.std() > 1e-3, "logits are constant: the comparison would not see a difference"


# Training: every trained method plus the variants whose text pass takes another branch of the shared-prefix code.
TRAINED = [(n, {}) for n in METHODS.names() if n != "zsclip"] + [
    ("cocoop", {"text_chunk": 7}),  # chunks that split an image's rows: one prefix group per image and chunk
    ("cocoop", {"meta_net": False}),
    ("coop", {"class_token_position": "middle"}),  # no shared prefix
    ("dcp", {"fusing": "none", "text_update": True}),
]


@pytest.mark.parametrize(
    ("name", "overrides"), TRAINED, ids=[f"{n}-{'-'.join(map(str, o.values())) or 'toy'}" for n, o in TRAINED]
)
def test_training_gradients_fast_equal_naive(name, overrides, backbones, data):
    """One training forward + backward: the fast path (cut text, shared prefix, fused attention) gives the naive
    path's loss and the same gradient on every trainable tensor."""
    fast_bb, naive_bb = backbones
    folder, items = data
    fast = build_method(name, backbone=fast_bb, classnames=CLASSES, **overrides)
    naive = build_method(name, backbone=naive_bb, classnames=CLASSES, **overrides)
    state = perturbed_state(fast, seed=2)
    fast.load_trainable_state(state)
    naive.load_trainable_state(state)
    fast.prepare_images(items, "train")
    naive.prepare_images(items, "train")
    images = load_images(items, fast_bb)[:4]
    keys = [d.relpath for d in items][:4]
    labels = torch.tensor([d.label for d in items][:4])
    grads = []
    for m in (fast, naive):
        m.train()
        torch.manual_seed(5)  # same dropout / sampling, if any
        loss = torch.nn.functional.cross_entropy(m(images, keys).logits, labels)
        m.zero_grad()
        loss.backward()
        grads.append({k: p.grad.clone() for k, p in m.named_parameters() if p.requires_grad and p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for k, g in grads[1].items():
        assert_close_scaled(grads[0][k], g, GRAD, msg=f"{name} {overrides}: gradient of {k}")


@pytest.mark.parametrize("name", ["coop", "maple"])
def test_trainer_evaluate_fast_equals_naive(name, backbones, data, tmp_path):
    """The trainer's evaluation loop: fast=True with cached features against fast=False with images."""
    fast_bb, naive_bb = backbones
    _, items = data
    fast = build_method(name, backbone=fast_bb, classnames=CLASSES)
    naive = build_method(name, backbone=naive_bb, classnames=CLASSES)
    state = perturbed_state(fast, seed=1)
    fast.load_trainable_state(state)
    naive.load_trainable_state(state)
    cpu = torch.device("cpu")
    feats = (
        image_features(fast_bb, items, fast_bb.test_transform, cpu, "fp32", Path(tmp_path))
        if fast.frozen_image_path
        else None
    )
    a = evaluate(fast, items, fast_bb.test_transform, cpu, "fp32", 2, image_features=feats, fast=True)
    b = evaluate(naive, items, naive_bb.test_transform, cpu, "fp32", 2, fast=False)
    with torch.no_grad():  # the naive logits: where two classes nearly tie, rounding may pick either path's winner
        logits = naive(load_images(items, naive_bb), [d.relpath for d in items]).logits  # (N, C)
    # the same prediction (and top-5 order) for every image, not only the same count
    ties = assert_same_ranking(a["predictions"], b["predictions"], logits, k=1, msg=name)
    assert_same_ranking(a["top5"], b["top5"], logits, k=a["top5"].shape[1], msg=name)
    assert a["n"] == b["n"] == len(items) and abs(a["correct"] - b["correct"]) <= ties.sum()
    if not ties.any():
        assert (a["accuracy"], a["accuracy_1dp"]) == (b["accuracy"], b["accuracy_1dp"])
