"""Two trainer capabilities for methods whose loss is more than the cross-entropy of their logits (DePT's head,
MMRL's representation logits): the batch's labels reach `forward` when a method asks for them, and the trainer's
cross-entropy takes the weight the method gives it (recorded weighted, so the loss parts add up)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mugcp_bench.engine.trainer import fit
from mugcp_bench.methods.base import MethodOutput, TrainConfig
from tests.method_harness import CLASSNAMES, write_items
from tests.numerics import FP32, assert_close_scaled
from tests.test_trainer_capabilities import Tiny

CPU = torch.device("cpu")


class Labelled(Tiny):
    """Half the cross-entropy from the trainer, half its own on the labels it is given."""

    name = "tiny-labelled"
    needs_labels = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, images, keys=None, image_features=None, labels=None) -> MethodOutput:
        logits = F.adaptive_avg_pool2d(images, 4).flatten(1) @ self.weight.t() + self.bias  # (B, C)
        if labels is not None:
            self.seen.append(labels.clone())
        own = 0.5 * F.cross_entropy(logits, labels) if labels is not None else logits.sum() * 0
        return MethodOutput(logits, {"own": own}, ce_weight=0.5)


def test_labels_reach_forward_and_the_cross_entropy_is_weighted(tmp_path):
    items = write_items(tmp_path, CLASSNAMES, 4)
    method = Labelled()
    cfg = TrainConfig(epochs=1, batch_size=4, lr=0.01, warmup_epochs=0)
    res = fit(method, items, cfg, lambda im: torch.zeros(3, 32, 32) + 0.1, CPU, "fp32", 1)
    assert method.seen and all(t.dtype == torch.long and len(t) == 4 for t in method.seen)
    assert sorted(torch.cat(method.seen).tolist()) == sorted(d.label for d in items)[: 4 * len(method.seen)]
    (epoch,) = res.history
    # both halves are the same cross-entropy: the weighted trainer part equals the method's own part
    assert_close_scaled(torch.tensor(epoch["loss_ce"]), torch.tensor(epoch["loss_own"]), FP32)
    assert_close_scaled(torch.tensor(epoch["loss"]), torch.tensor(epoch["loss_ce"] + epoch["loss_own"]), FP32)
