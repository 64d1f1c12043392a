"""Float comparisons for the tests: tolerances scaled to what is compared, their defaults named once here.

Two computations of the same math agree only up to float rounding when their kernels add in another order: another
CPU (ATen's AVX-512, AVX2 and default kernels sum in other orders), another thread count, fused attention against
open_clip's modules, a shared text prefix against whole rows, a batch against one image at a time, cached features
against a fresh forward. That rounding grows with the size of the numbers summed, so an absolute bound is wrong both
ways: `<= 1e-4` failed on gradients of size ~40 under AVX2 (a relative 2.5e-6) and passes anything on
values of size 1e-6. Here a difference is bounded by

    max |actual - expected| <= rtol * scale + atol,    scale = max |expected|  (over the whole tensor)

as `torch.testing.assert_close` bounds it, with one difference: the relative part scales with the tensor's largest
magnitude, not entry by entry. An entry near zero that is the sum of large terms of opposite sign (a logit, a
gradient) carries the rounding of those terms, which the tensor's largest entries track; an entry-wise bound would
demand from it an accuracy float32 cannot give. `atol` is a small floor for tensors that are ~0 everywhere.

Exact equality (`torch.equal`, `==`) stays where a result is bit-reproducible by construction: the same process (or
the same thread count and kernel path), the same kernels, the same inputs; e.g. a state loaded into a twin, an
unchanged backbone, a copy, a multiplication by an exact zero, a rerun of the same code.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Tolerance:
    """A bound `rtol * scale + atol` on a difference; `scale` is the largest magnitude of the expected values."""

    rtol: float
    atol: float

    def bound(self, scale: float) -> float:
        return self.rtol * scale + self.atol


# One float32 computation against another of the same math in another summation order (kernels, threads, fused
# attention, shared prefixes, batching, cached features; a few transformer layers deep). Float32's epsilon is 1.2e-7;
# the largest difference the tests meet on the tiny, toy-clip and ViT-B/16 towers is 1.4e-6 of the scale under each
# of the AVX-512, AVX2 and default kernels (measured with MUGCP_NUMERICS_LOG), so 1e-5 leaves a margin of ~7 and still
# catches a real error (a wrong mask, a dropped term, a misplaced prompt: 1e-3 of the scale and far more).
FP32 = Tolerance(rtol=1e-5, atol=1e-6)
# Gradients through those forwards: the backward pass repeats the reordering and sums over batch and classes. The
# largest measured is 1.6e-5 of the scale (a fast-vs-naive training step); the issue-24 failure was 2.5e-6 on
# gradients of size ~40 (and 2.0e-6 here under AVX2).
GRAD = Tolerance(rtol=1e-4, atol=1e-6)
# Results from values stored in fp16 against float32 ones (fp16's epsilon: 9.8e-4; measured 2.7e-4 of the scale).
FP16 = Tolerance(rtol=2e-3, atol=1e-4)
# bf16 autocast against float32 (CUDA only; bf16's epsilon: 7.8e-3).
BF16 = Tolerance(rtol=3e-2, atol=1e-3)
# Float64 statistics (bootstrap replicates, means) computed in another order than the test's own formula.
FP64 = Tolerance(rtol=1e-9, atol=1e-12)
# A change is real (not rounding) when the largest difference exceeds this share of the tensor's scale: 100 times
# the FP32 bound, and far below what a real change (a prompt, a mask, a gate) does.
DIFFERENT = 1e-3


def _as_double(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64)
    return torch.as_tensor(np.asarray(x, dtype=np.float64))


def max_abs(x) -> float:
    """The largest magnitude in `x` (0 for an empty tensor)."""
    t = _as_double(x)
    return float(t.abs().max()) if t.numel() else 0.0


def scaled_difference(actual, expected, tol: Tolerance = FP32, scale: float | None = None) -> tuple[float, float]:
    """(max |actual - expected|, its bound under `tol`); shapes must be equal (no broadcasting) and values finite."""
    a, e = _as_double(actual), _as_double(expected)
    assert a.shape == e.shape, f"shapes differ: {tuple(a.shape)} vs {tuple(e.shape)}"
    assert torch.isfinite(a).all() and torch.isfinite(e).all(), "non-finite values in a comparison"
    scale = max_abs(e) if scale is None else scale
    diff = float((a - e).abs().max()) if a.numel() else 0.0
    _log(tol, diff, scale)
    return diff, tol.bound(scale)


def _log(tol: Tolerance, diff: float, scale: float) -> None:
    """MUGCP_NUMERICS_LOG=FILE: every comparison appends (test, rtol, difference / scale), to re-measure the margins
    (e.g. under each ATEN_CPU_CAPABILITY)."""
    path = os.environ.get("MUGCP_NUMERICS_LOG")
    if path:
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
        with open(path, "a") as f:
            f.write(f"{test}\t{tol.rtol:g}\t{diff / max(scale, 1e-300):.3e}\t{scale:.3e}\n")


def close_scaled(actual, expected, tol: Tolerance = FP32, scale: float | None = None) -> bool:
    diff, bound = scaled_difference(actual, expected, tol, scale)
    return diff <= bound


def assert_close_scaled(actual, expected, tol: Tolerance = FP32, *, scale: float | None = None, msg: str = "") -> None:
    """Fail unless max |actual - expected| <= tol.rtol * scale + tol.atol, scale = max |expected| unless given (give
    it where `expected` is a part of a larger computation whose magnitude sets the rounding)."""
    diff, bound = scaled_difference(actual, expected, tol, scale)
    if diff > bound:
        scale = max_abs(expected) if scale is None else scale
        raise AssertionError(
            f"{msg + ': ' if msg else ''}max |actual - expected| = {diff:.3e} > {bound:.3e} "
            f"(rtol {tol.rtol:g} x scale {scale:.3e} + atol {tol.atol:g}; {diff / max(scale, 1e-300):.2e} of the scale)"
        )


def assert_differs(actual, other, rel: float = DIFFERENT, *, msg: str = "") -> None:
    """Fail unless `actual` and `other` differ by more than `rel` of their scale (max of both magnitudes): a change
    that float rounding cannot explain."""
    a, b = _as_double(actual), _as_double(other)
    assert a.shape == b.shape, f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}"
    scale = max(max_abs(a), max_abs(b))
    diff = float((a - b).abs().max()) if a.numel() else 0.0
    if not diff > rel * scale:
        raise AssertionError(
            f"{msg + ': ' if msg else ''}max |difference| = {diff:.3e} <= {rel:g} x scale {scale:.3e}: no real change"
        )


def near_ties(logits, k: int, tol: Tolerance = FP32) -> np.ndarray:
    """(N,) bool: rows whose first `k` ranks (and which class is ranked k + 1 next) could change under float
    rounding within `tol` of the logits' scale: two of the top k + 1 logits closer than twice the bound."""
    t = _as_double(logits)
    bound = tol.bound(max_abs(t))
    top = t.topk(min(k + 1, t.shape[-1]), dim=-1).values  # (N, k + 1), descending
    gaps = top[:, :-1] - top[:, 1:]  # (N, k)
    return (gaps <= 2 * bound).any(dim=-1).numpy()


def assert_same_ranking(a, b, logits, k: int, tol: Tolerance = FP32, *, msg: str = "") -> np.ndarray:
    """Per-image top-k predictions `a` and `b` ((N,) or (N, k)) of two paths agree on every image whose top logits
    (`logits`, (N, C): one path's) are not a near tie; at least half the images must be clear of ties (else the check
    would be vacuous). Returns the (N,) mask of near ties (where a and b may differ)."""
    a2, b2 = np.asarray(a).reshape(len(logits), -1), np.asarray(b).reshape(len(logits), -1)
    ties = near_ties(logits, a2.shape[1], tol)
    assert (~ties).sum() * 2 >= len(ties), f"{msg + ': ' if msg else ''}{ties.sum()} of {len(ties)} rows tie"
    differ = (a2 != b2).any(axis=1)
    bad = np.flatnonzero(differ & ~ties)
    assert bad.size == 0, f"{msg + ': ' if msg else ''}predictions differ on rows {bad.tolist()} (no near tie there)"
    return ties


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with `n` intra-op threads (float sums split over threads add in another order: a reference
    computed in this process is bit-identical to a worker's only under the worker's thread count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
