"""The learning-rate trace equals Dassl's schedule (docs/protocol.md §4.4)."""

from __future__ import annotations

import math

import pytest

from mugcp_bench.engine.trainer import lr_trace
from mugcp_bench.methods.base import TrainConfig


def reference(lr: float, epochs: int) -> list[float]:
    """docs/protocol.md §4.4: lr(0) = 1e-5; lr(e) = ½·LR·(1 + cos(π·(e − 1)/MAX_EPOCH)) for e ≥ 1."""
    return [1e-5] + [0.5 * lr * (1 + math.cos(math.pi * (e - 1) / epochs)) for e in range(1, epochs)]


@pytest.mark.parametrize("lr,epochs", [(0.0035, 5), (0.0026, 2), (0.002, 10), (0.0035, 20), (0.002, 50)])
def test_trace_equals_reference_formula(lr, epochs):
    ours = lr_trace(TrainConfig(lr=lr, epochs=epochs))
    assert len(ours) == epochs
    assert max(abs(a - b) for a, b in zip(ours, reference(lr, epochs))) <= 1e-12


def test_published_test_vectors():
    """The per-epoch values printed in docs/protocol.md §4.4."""
    maple = lr_trace(TrainConfig(lr=0.0035, epochs=5))
    assert maple == pytest.approx([1e-5, 0.0035, 0.00316578, 0.00229078, 0.00120922], abs=1e-8)
    assert lr_trace(TrainConfig(lr=0.0026, epochs=2)) == pytest.approx([1e-5, 0.0026], abs=1e-12)
    cocoop = lr_trace(TrainConfig(lr=0.002, epochs=10))
    assert cocoop[:6] == pytest.approx([1e-5, 0.002, 0.00195106, 0.00180902, 0.00158779, 0.00130902], abs=1e-8)
    assert cocoop[-1] == pytest.approx(0.000190983, abs=1e-9)
    dcp = lr_trace(TrainConfig(lr=0.0035, epochs=20))
    assert dcp[:6] == pytest.approx([1e-5, 0.0035, 0.00347845, 0.00341435, 0.00330926, 0.00316578], abs=1e-8)
    assert dcp[-1] == pytest.approx(8.56511e-05, abs=1e-10)
    coop = lr_trace(TrainConfig(lr=0.002, epochs=50))
    assert coop[:4] == pytest.approx([1e-5, 0.002, 0.00199803, 0.00199211], abs=1e-8)
    assert coop[-1] == pytest.approx(7.8853e-06, abs=1e-10)
