"""Training / evaluation throughput and peak memory of every method: our path against the reference's naive path.

Our path: exact EOT truncation of text sequences (``backbone.eot_truncation = True``), the positions all class
prompts share encoded once (``prefix_sharing``) and blocks on fused attention (``fused_attention``), evaluation through
``begin_eval`` / ``predict`` (class text features once per class set when the prompts do not depend on the image)
and, for methods with a frozen image tower, cached image features (steady state: the cache is warm, the tensor is
passed in). The naive path is what the reference code does: ``eot_truncation = False`` before the method is built
(every text pass runs the full context length, 77 tokens on ViT-B/16), ``forward`` on every test batch (all class
prompts re-encoded per batch) and no feature cache. ``--before`` adds our path with the EOT cut only (no
shared-prefix text encoding, open_clip's block modules) as a third path.

Each (backbone, class count) runs in a fresh worker process; inside it every method is built twice (our path and
the naive path, the same trainable weights) and the two are measured interleaved on the same synthetic inputs
(random images of the backbone's size, random labels, class names "class 17 thing"), so a shared, noisy CPU slows
both alike. The DataLoader is kept out of the timing. The training step and the evaluation loop are the ones of
``mugcp_bench.engine.trainer.fit`` / ``evaluate`` (autocast, cross-entropy + the method's extra losses, SGD; a
method with ``gradient_objectives``, ProGrad, gets one backward per objective and its ``combine_gradients``).

Peak memory is the peak over a phase minus the memory at its start. On CUDA ``max_memory_allocated``; on CPU the
peak of live tensor storages (counted at the dispatcher, `live_tensor_tracker`: what the method holds, whatever the
C allocator does) and the process's resident set (VmHWM, reset through /proc/self/clear_refs, heap trimmed before the
phase; it also counts heap that glibc kept from earlier phases and reuses, so it depends on what ran before).

    python benchmarks/bench.py                      # full CPU run (~15 min on 2 cores), prints the tables
    python benchmarks/bench.py --quick              # ~1 min smoke run (tiny and toy CLIP, 10 and 100 classes)
    python benchmarks/bench.py --device cuda --backbones ViT-B-16   # the GPU table: bf16 autocast, 10/100/1000 classes
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import dataclasses
import gc
import json
import logging
import os
import platform
import re
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DEFAULT_METHODS = (
    "zsclip",
    "coop",
    "cocoop",
    "maple",
    "dcp",
    "mugcp",
    "kgcoop",
    "ivlp",
    "language_deep",
    "vpt_deep",
    "prograd",
)
DEFAULT_BACKBONES = ("tiny", "toy-clip", "ViT-B-16")
DEFAULT_CLASSES = (10, 100, 1000)
# ViT-B-16 at 1000 classes is left out of the default CPU plan: one naive CoOp step there encodes 1000 × 77 tokens
# forward and backward (minutes on 2 cores). Ask for it with --classes; the GPU plan includes it.
CPU_SKIP = {("ViT-B-16", 1000)}
RESULT_TAG = "BENCH-RESULT "
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
DESCRIPTIONS = (
    "a small object resting on a wooden table next to a window with soft daylight.",
    "a close-up photograph of something bright in the middle of a green lawn.",
    "an outdoor scene with a blurry background, trees and a grey sky above.",
    "a picture taken indoors showing a shiny item on a white shelf.",
    "a dark photo of an animal-like shape near some rocks by the water.",
    "a colourful thing held in a person's hand in front of a brick wall.",
    "a top-down view of several items on a patterned carpet.",
    "a grainy image of a street at night with lights and a parked car.",
)


# --- profiles: how much to measure per backbone ----------------------------------------------------------------------
@dataclasses.dataclass
class Profile:
    """Measurement sizes for one backbone on one device (every field can be overridden on the command line)."""

    recipe: str  # method recipe whose config and batch sizes are used ("toy" for the 4-layer CLIPs, "paper")
    train_batch_cap: int  # training batch = min(recipe batch, cap); 0 = the recipe's
    cond_train_batch_cap: int  # the same for instance-conditional methods (B × C text passes per step)
    eval_batch_cap: int  # evaluation batch = min(recipe eval batch, cap); 0 = the recipe's
    cond_eval_batch_cap: int  # the same for instance-conditional methods
    eval_batches: int  # test batches per evaluation pass
    cond_eval_batches: int  # the same for instance-conditional methods (every batch costs B × C text passes)
    warmup: int  # untimed training steps / evaluation passes per path
    max_steps: int  # timed training steps per path (at most)
    max_eval_repeats: int  # timed evaluation passes per path (at most)
    min_time: float  # repeat steps / passes until each path has been timed this long (or the maxima are hit)


def profile_for(backbone: str, device: str) -> Profile:
    if backbone in ("tiny", "toy-clip", "tiny-mismatch"):
        return Profile("toy", 0, 0, 0, 21, 2, 1, 2, 8, 3, 1.0)
    if device == "cuda":
        return Profile("paper", 0, 0, 0, 0, 3, 3, 2, 10, 3, 1.0)
    # A ViT-B-16 forward is ~0.25 s per image on one CPU core: two timed steps (the faster counts), a few test images.
    return Profile("paper", 4, 1, 4, 2, 2, 1, 0, 2, 1, 600.0)


# --- memory -----------------------------------------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    return int(m.group(1)) if m else 0


def live_tensor_tracker() -> Any:
    """A TorchDispatchMode that records the peak bytes of tensor storages allocated while it is active and still alive
    (views and in-place results share an input's storage and are not counted): the CPU counterpart of CUDA's
    ``max_memory_allocated``, independent of what the C allocator keeps for itself."""
    import weakref

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class LiveTensors(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.live = 0
            self.peak = 0
            self.seen: set[int] = set()

        def _freed(self, key: int, nbytes: int) -> None:
            self.live -= nbytes
            self.seen.discard(key)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            out = func(*args, **(kwargs or {}))
            inputs = {
                t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)
            }
            for t in tree_flatten(out)[0]:
                if not isinstance(t, torch.Tensor):
                    continue
                storage = t.untyped_storage()
                key, nbytes = storage.data_ptr(), storage.nbytes()
                if nbytes == 0 or key in inputs or key in self.seen:
                    continue
                self.seen.add(key)
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._freed, key, nbytes)
            return out

    return LiveTensors()


class MemoryMeter:
    """Peak memory of a phase above its starting level, in MiB: live tensors (CPU: `live_tensor_tracker`; CUDA:
    allocated) and, on CPU, the resident set as well."""

    def __init__(self, device: Any) -> None:
        import torch

        self.torch = torch
        self.cuda = device.type == "cuda"
        self.resettable = False
        self.libc = None
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            self.libc = libc if hasattr(libc, "malloc_trim") else None
        if not self.cuda:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self.resettable = True
            except OSError:  # not Linux: ru_maxrss only grows, phases after the first read 0 unless they peak higher
                pass
        self.base = 0
        self.strict = False
        self.tracker: Any = None

    def start(self, strict: bool = False) -> None:
        """Begin a phase. `strict` (CPU): every allocation of 64 KiB or more is mmapped and unmapped when freed, so the
        resident set follows the live tensors more closely (slower: only for untimed runs). Even so the RSS counts
        freed heap chunks that earlier phases left in glibc's bins when they are reused (fragmentation)."""
        self.strict = strict and self.libc is not None and not self.cuda
        if self.strict:
            self.libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024)
            self.libc.mallopt(M_TRIM_THRESHOLD, 0)
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
            self.base = self.torch.cuda.memory_allocated()
            return
        gc.collect()
        if self.libc is not None:
            self.libc.malloc_trim(0)  # hand freed heap pages back: the phase's allocations must show in the RSS
        if self.resettable:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := current RSS
            self.base = _status_kb("VmRSS") * 1024
        else:
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.tracker = live_tensor_tracker()
        self.tracker.__enter__()

    def stop(self) -> tuple[float, float | None]:
        """(peak live tensors MiB, peak RSS MiB or None on CUDA) above the start."""
        if self.cuda:
            self.torch.cuda.synchronize()
            return (self.torch.cuda.max_memory_allocated() - self.base) / 2**20, None
        self.tracker.__exit__(None, None, None)
        tensors = self.tracker.peak / 2**20
        self.tracker = None
        peak = _status_kb("VmHWM") * 1024 if self.resettable else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if not self.resettable:
            peak *= 1024
        if self.strict:  # back to glibc's steady state (its dynamic thresholds top out at these values)
            self.libc.mallopt(M_MMAP_THRESHOLD, 32 * 2**20)
            self.libc.mallopt(M_TRIM_THRESHOLD, 64 * 2**20)
        return tensors, max(0.0, (peak - self.base) / 2**20)


# --- the worker: one backbone, one class count, every method ---------------------------------------------------------
# Backbone settings of each measured path: (eot_truncation, fused_attention, prefix_sharing). "before" is our path
# as it was before shared-prefix text encoding and fused attention: EOT cut only, open_clip's modules.
PATH_SETTINGS = {"ours": (True, True, True), "before": (True, False, False), "naive": (False, False, False)}
SETTINGS = ("eot_truncation", "fused_attention", "prefix_sharing")


@contextlib.contextmanager
def text_path(backbone: Any, path: str | bool) -> Iterator[None]:
    """Run with a path's backbone settings (True: "ours", False: "naive", the reference's full-length passes)."""
    path = {True: "ours", False: "naive"}.get(path, path)  # type: ignore[call-overload]
    old = [getattr(backbone, k) for k in SETTINGS]
    for k, v in zip(SETTINGS, PATH_SETTINGS[path]):
        setattr(backbone, k, v)
    try:
        yield
    finally:
        for k, v in zip(SETTINGS, old):
            setattr(backbone, k, v)


# What a Timer reads: wall-clock seconds, or the worker's CPU seconds ("cpu": with one torch thread the compute
# itself, which other jobs on an oversubscribed machine do not inflate; CPU runs only). Set by the worker.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCK = {"now": time.perf_counter}


class Timer:
    def __init__(self, device: Any) -> None:
        import torch

        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.now = CLOCK["now"]

    def __call__(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        self.sync()
        t0 = self.now()
        out = fn()
        self.sync()
        return self.now() - t0, out


def _median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def measure(
    paths: dict[str, Callable[[], Any]], prof: Profile, max_reps: int, timer: Timer, meter: MemoryMeter
) -> tuple[dict[str, list[float]], dict[str, tuple[float, float | None]], dict[str, list[Any]]]:
    """Interleaved repetitions of every path (one repetition of each in turn): times, peak MiB (tensors, RSS) and
    what the timed repetitions returned, each by path name.

    Memory is read on the first repetition of each path with the heap trimmed before it: with warm-up, an untimed one
    in strict mode (see `MemoryMeter.start`); without (ViT-B-16 on CPU), the timed one under glibc's default
    allocator, which may count freed but retained heap. Timed repetitions run on a warm heap."""

    def with_memory(fn: Callable[[], Any]) -> tuple[float, tuple[float, float | None], Any]:
        meter.start(strict=prof.warmup > 0)
        dt, out = timer(fn)
        return dt, meter.stop(), out

    first = {k: with_memory(fn) for k, fn in paths.items()}
    mems = {k: v[1] for k, v in first.items()}
    if prof.warmup:
        times: dict[str, list[float]] = {k: [] for k in paths}
        outs: dict[str, list[Any]] = {k: [] for k in paths}
    else:
        times = {k: [v[0]] for k, v in first.items()}
        outs = {k: [v[2]] for k, v in first.items()}
    if max(v[0] for v in first.values()) < prof.min_time:  # more warm-up only where a repetition is cheap
        for _ in range(prof.warmup - 1):
            for fn in paths.values():
                fn()
    done = lambda: min(sum(t) for t in times.values()) >= prof.min_time  # noqa: E731
    while len(next(iter(times.values()))) < max_reps and not (next(iter(times.values())) and done()):
        for k, fn in paths.items():
            dt, out = timer(fn)
            times[k].append(dt)
            outs[k].append(out)
    return times, mems, outs


def write_description_items(folder: Path, n: int) -> tuple[list[Any], Path]:
    """`n` small PNGs (MuGCP looks descriptions up by image) and a JSONL description file for the `file` describer."""
    import numpy as np
    from PIL import Image

    from mugcp_bench.datasets.base import Datum

    rng = np.random.default_rng(0)
    items, lines = [], []
    for i in range(n):
        rel = f"bench/images/img_{i}.png"
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)
        items.append(Datum(impath=str(path), label=i, classname=f"class {i} thing", relpath=rel))
        lines.append(json.dumps({"image": str(path), "text": DESCRIPTIONS[i % len(DESCRIPTIONS)]}))
    desc = folder / "descriptions.jsonl"
    desc.write_text("\n".join(lines) + "\n")
    return items, desc


def build_paths(
    name: str, backbone: Any, classnames: list[str], recipe: str, extra: dict[str, Any], paths: Sequence[str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """({path: method}, recipe's TrainConfig overrides): one instance per path, each built under its path's
    settings (the naive one with eot_truncation off), all with our instance's trainable weights."""
    import torch

    from mugcp_bench.methods.base import split_overrides
    from mugcp_bench.registry import METHODS

    cls = METHODS.get(name)
    recipe = recipe if recipe in cls.recipes else "toy"
    protocol = "base2novel" if "base2novel" in cls.recipes[recipe] else next(iter(cls.recipes[recipe]))
    m_keys, t_keys = split_overrides(cls, cls.recipe(recipe, protocol, 16, "x"))
    if name == "mugcp":
        m_keys.update(extra)
    cfg = cls.make_config(m_keys)
    torch.manual_seed(0)
    methods = {}
    for path in paths:
        with text_path(backbone, path):
            methods[path] = cls(backbone, classnames, cfg, template="a photo of a {}.", dataset="x")
    for path in paths[1:]:
        methods[path].load_trainable_state(methods[paths[0]].trainable_state())
    return {k: m.to(backbone.device) for k, m in methods.items()}, t_keys


def text_length(method: Any) -> int | None:
    prompts = getattr(method, "prompts", None)
    tokens = getattr(prompts, "tokens", None)
    return int(tokens.shape[1]) if tokens is not None else None


def eval_pair(
    methods: dict[str, Any],
    backbone: Any,
    prof: Profile,
    device: Any,
    precision: str,
    eval_batch: int,
    keys_pool: list[str],
    gen: Any,
    test_images: int,
) -> dict[str, Any]:
    """Evaluation of every path on the same synthetic test images (the instances hold the same weights)."""
    import torch

    from mugcp_bench.model.backbone import autocast

    ours = methods["ours"]
    timer, meter = Timer(device), MemoryMeter(device)
    size, cond = backbone.image_size, getattr(ours, "instance_conditional", False)
    n_eval = eval_batch * (prof.cond_eval_batches if cond else prof.eval_batches)
    images = torch.randn(n_eval, 3, size, size, generator=gen).to(device)
    keys = [keys_pool[i % len(keys_pool)] for i in range(n_eval)]
    slices = [slice(s, s + eval_batch) for s in range(0, n_eval, eval_batch)]
    feats = None
    if ours.frozen_image_path:  # the warm feature cache: computed once, outside the timing
        with torch.no_grad(), autocast(device, precision):
            feats = torch.cat([backbone.encode_image(images[s]).float() for s in slices])  # (N, E)
    first: dict[str, torch.Tensor] = {}

    def eval_fast(path: str) -> Callable[[], float]:
        m = methods[path]

        def run() -> float:  # trainer.evaluate(fast=True, image_features=...); returns the begin_eval time
            m.eval()
            with text_path(backbone, path), torch.no_grad():
                t_begin = timer(m.begin_eval)[0]
                try:
                    for s in slices:
                        with autocast(device, precision):
                            if feats is not None:
                                logits = m.predict(None, keys[s], feats[s].to(device))
                            else:
                                logits = m.predict(images[s], keys[s], None)
                        logits.float().argmax(-1).cpu()
                        first.setdefault(path, logits.float().cpu())
                finally:
                    m.end_eval()
            return t_begin

        return run

    def eval_naive() -> float:  # trainer.evaluate(fast=False), no feature cache
        naive = methods["naive"]
        naive.eval()
        with text_path(backbone, "naive"), torch.no_grad():
            for s in slices:
                with autocast(device, precision):
                    logits = naive(images[s], keys[s], None).logits
                logits.float().argmax(-1).cpu()
                first.setdefault("naive", logits.float().cpu())
        return 0.0

    runs = {k: eval_naive if k == "naive" else eval_fast(k) for k in methods}
    times, mems, begins = measure(runs, prof, prof.max_eval_repeats, timer, meter)
    n_batches = len(slices)
    test_batches = -(-test_images // eval_batch)  # a whole test split: begin_eval once, then every batch
    out: dict[str, Any] = dict(eval_images=n_eval, eval_repeats=len(times["ours"]), test_images=test_images)
    for k in methods:
        t_begin = min(begins[k])
        batch_s = min(t - b for t, b in zip(times[k], begins[k])) / n_batches
        sfx = "" if k == "ours" else f"_{k}"
        out.update(
            {
                f"eval_pass_ips_{k}": n_eval / min(times[k]),
                f"batch_s_{k}": batch_s,
                f"eval_ips_{k}": test_batches * eval_batch / (t_begin + test_batches * batch_s),
                f"eval_mem_{k}": mems[k][0],
                f"eval_rss_{k}": mems[k][1],
            }
        )
        if k != "naive":
            out[f"begin_eval_s{sfx}"] = t_begin
            out[f"max_abs_logit_diff{sfx}"] = float((first[k] - first["naive"]).abs().max())
    return out


def bench_method(
    name: str,
    backbone: Any,
    classnames: list[str],
    prof: Profile,
    device: Any,
    precision: str,
    mugcp_setup: Any,
    test_images: int,
    phases: Sequence[str] = ("train", "eval"),
    paths: Sequence[str] = ("ours", "naive"),
) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from mugcp_bench.engine.trainer import (
        autocast,
        backward_objectives,
        gradient_objectives,
        make_optimizer,
        objective_values,
        set_combined_gradients,
    )
    from mugcp_bench.methods.base import TrainConfig

    items, extra = mugcp_setup() if name == "mugcp" else ([], {})
    methods, t_keys = build_paths(name, backbone, classnames, prof.recipe, extra, paths)
    ours, naive = methods["ours"], methods["naive"]
    if items:
        for path, m in methods.items():
            with text_path(backbone, path):
                m.prepare_images(items, "train")
    keys_pool = [d.relpath for d in items] or [f"img_{i}" for i in range(8)]
    for m in methods.values():  # frozen teacher features (PromptSRC), built once at the start in the reference too:
        if hasattr(m, "teacher_text"):  # outside the timing, and once (the content-keyed cache serves both paths)
            with text_path(backbone, "ours"):
                m.teacher_text()
    cond = getattr(ours, "instance_conditional", False)
    tcfg = TrainConfig(**{k: v for k, v in t_keys.items() if k in {f.name for f in dataclasses.fields(TrainConfig)}})

    def cap(value: int, limit: int) -> int:
        return min(value, limit) if limit > 0 else value

    train_batch = cap(tcfg.batch_size, prof.cond_train_batch_cap if cond else prof.train_batch_cap)
    eval_batch = cap(tcfg.eval_batch_size, prof.cond_eval_batch_cap if cond else prof.eval_batch_cap)
    size, n_cls = backbone.image_size, len(classnames)
    gen = torch.Generator().manual_seed(1)
    timer, meter = Timer(device), MemoryMeter(device)
    row: dict[str, Any] = {
        "memory": "cuda allocated" if device.type == "cuda" else "live tensors (+ rss)",
        "rss_mode": "strict, untimed repetition" if prof.warmup else "default allocator, timed repetition",
        "method": name,
        "instance_conditional": cond,
        "frozen_image_path": ours.frozen_image_path,
        "text_len_ours": text_length(ours),
        "text_len_naive": text_length(naive) or backbone.context_length,
        "n_trainable": ours.n_trainable(),
        "train_batch": train_batch,
        "eval_batch": eval_batch,
    }

    if "eval" in phases:
        row.update(eval_pair(methods, backbone, prof, device, precision, eval_batch, keys_pool, gen, test_images))
    # --- training ---------------------------------------------------------------------------------------------------
    if "train" not in phases or ours.n_trainable() == 0:
        row.update(train_steps=0)
        return row
    batch = torch.randn(train_batch, 3, size, size, generator=gen).to(device)
    labels = torch.randint(0, n_cls, (train_batch,), generator=gen).to(device)
    train_keys = [keys_pool[i % len(keys_pool)] for i in range(train_batch)]
    opts = {}
    for m in methods.values():
        opts[id(m)] = make_optimizer(m, tcfg)[0]
        m.train()

    def step(m: Any, path: str) -> None:  # one iteration of trainer.fit
        opt = opts[id(m)]
        with text_path(backbone, path):
            with autocast(device, precision):
                # labels where the method asks for them (MMRL, DePT), the cross-entropy weighted as trainer.fit does
                out = m(batch, train_keys, **({"labels": labels} if m.needs_labels else {}))
                loss = out.ce_weight * F.cross_entropy(out.logits.float(), labels)
                if not gradient_objectives(m):
                    for extra_loss in out.losses.values():
                        loss = loss + extra_loss.float()
            if gradient_objectives(m):  # ProGrad: one backward per objective, combined per parameter (both paths)
                grads: dict[str, dict[str, Any]] = {}
                backward_objectives(m, objective_values(m, loss, out.losses), None, 1, grads)
                set_combined_gradients(m, grads, None)
            else:
                loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    runs = {k: (lambda m=m, k=k: step(m, k)) for k, m in methods.items()}
    if ours.frozen_image_path:  # the frozen image pass alone, which every path runs in every step: the bound

        def image_pass() -> None:
            with text_path(backbone, "ours"), torch.no_grad(), autocast(device, precision):
                backbone.encode_image(batch)

        runs["image_pass"] = image_pass
    times, mems, _ = measure(runs, prof, prof.max_steps, timer, meter)
    row.update(train_steps=len(times["ours"]))
    for k in methods:
        row.update(
            {
                f"train_ips_{k}": train_batch / min(times[k]),
                f"train_mem_{k}": mems[k][0],
                f"train_rss_{k}": mems[k][1],
            }
        )
    if "image_pass" in times:  # no text-side change beats (naive step) / (image pass): that pass stays in every step
        row["train_image_s"] = min(times["image_pass"])
        row["train_image_bound"] = min(times["naive"]) / row["train_image_s"]
    return row


def worker(spec: dict[str, Any]) -> None:
    """Measure every method for one (backbone, class count); one JSON line per method on stdout."""
    import torch

    from mugcp_bench.engine.trainer import resolve_precision
    from mugcp_bench.model.backbone import load_backbone

    logging.basicConfig(level=logging.WARNING)
    CLOCK["now"] = CLOCKS[spec.get("clock", "wall")]
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    precision = resolve_precision(spec["precision"], device)
    prof = Profile(**spec["profile"])
    backbone = load_backbone(spec["backbone"], device=device)
    classnames = [f"class {i} thing" for i in range(spec["classes"])]
    tmp = Path(tempfile.mkdtemp(prefix="mugcp-bench-"))
    os.environ["MUGCP_CACHE"] = str(tmp / "cache")  # descriptions go to a throw-away cache
    made: dict[str, Any] = {}

    def mugcp_setup() -> tuple[list[Any], dict[str, Any]]:
        if not made:
            items, desc = write_description_items(tmp / "data", 8)
            made["v"] = (items, {"describer": "file", "describer_file": str(desc)})
        return made["v"]

    try:
        for name in spec["methods"]:
            run_one(name, spec, backbone, classnames, prof, device, precision, mugcp_setup)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_one(
    name: str,
    spec: dict[str, Any],
    backbone: Any,
    classnames: list[str],
    prof: Profile,
    device: Any,
    precision: str,
    mugcp_setup: Callable[[], Any],
) -> None:
    """Measure one method and print its JSON line."""
    import torch

    t0 = time.perf_counter()
    try:
        row = bench_method(
            name,
            backbone,
            classnames,
            prof,
            device,
            precision,
            mugcp_setup,
            spec["test_images"],
            spec["phases"],
            spec.get("paths", ("ours", "naive")),
        )
    except Exception as e:  # noqa: BLE001 - one failing method must not hide the others
        logging.exception("%s failed", name)
        row = {"method": name, "error": f"{type(e).__name__}: {e}"}
    row.update(backbone=spec["backbone"], classes=spec["classes"], precision=precision)
    row["wall_s"] = time.perf_counter() - t0
    row["process_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        row["gpu"] = torch.cuda.get_device_name(device)
    print(RESULT_TAG + json.dumps(row), flush=True)
    gc.collect()


# --- the driver ------------------------------------------------------------------------------------------------------
def machine_info(device: str, threads: int, clock: str = "wall") -> dict[str, str]:
    import open_clip
    import torch

    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "torch threads": str(threads or torch.get_num_threads()),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "python": platform.python_version(),
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
    if clock != "wall":
        info["clock"] = f"{clock} (process CPU seconds)"
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _fmt(x: Any, digits: int = 1) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.{digits}f}" if abs(x) < 1e4 else f"{x:.3g}"
    return str(x)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _speedup(a: float | None, b: float | None) -> str:
    r = _ratio(a, b)
    return f"**{_fmt(r)}×**" if r is not None else "—"


def train_table(rows: list[dict[str, Any]]) -> str:
    before = any("train_ips_before" in r for r in rows)
    head = (
        "| backbone | classes | method | text tokens ours / naive | batch | timed steps | img/s ours | img/s naive "
        "| speed-up | peak MiB ours | peak MiB naive |"
    )
    if before:
        head += " img/s before | speed-up before | ours / before |"
    bound = any("train_image_bound" in r for r in rows)
    if bound:
        head += " frozen image pass s | bound: naive step / image pass |"
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "error" in r or not r.get("train_steps"):
            continue
        cells = [
            r["backbone"],
            r["classes"],
            r["method"],
            f"{r['text_len_ours']} / {r['text_len_naive']}" if r.get("text_len_ours") else "—",
            r["train_batch"],
            r["train_steps"],
            _fmt(r["train_ips_ours"], 2),
            _fmt(r["train_ips_naive"], 2),
            _speedup(r["train_ips_ours"], r["train_ips_naive"]),
            _fmt(r["train_mem_ours"], 0),
            _fmt(r["train_mem_naive"], 0),
        ]
        if before:
            b = r.get("train_ips_before")
            cells += [_fmt(b, 2), _speedup(b, r["train_ips_naive"]), _speedup(r["train_ips_ours"], b)]
        if bound:
            ib = r.get("train_image_bound")
            cells += [_fmt(r.get("train_image_s"), 2), f"{_fmt(ib)}×" if ib else "—"]
        out.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(out)


def eval_table(rows: list[dict[str, Any]]) -> str:
    n = next((r["test_images"] for r in rows if "test_images" in r), 0)
    head = (
        "| backbone | classes | method | batch | begin_eval s | s/batch ours | s/batch naive | speed-up per batch "
        f"| img/s ours ({n} images) | img/s naive | speed-up ({n} images) | peak MiB ours | peak MiB naive "
        "| max abs Δlogit |"
    )
    before = any("eval_ips_before" in r for r in rows)
    if before:
        head += f" s/batch before | speed-up before ({n} images) | ours / before |"
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['backbone']} | {r['classes']} | {r['method']} | error: {r['error']} |")
            continue
        if "eval_ips_ours" not in r:
            continue
        cells = [
            r["backbone"],
            r["classes"],
            r["method"],
            r["eval_batch"],
            f"{r['begin_eval_s']:.3f}",
            f"{r['batch_s_ours']:.2g}",
            f"{r['batch_s_naive']:.2g}",
            _speedup(r["batch_s_naive"], r["batch_s_ours"]),
            _fmt(r["eval_ips_ours"], 1),
            _fmt(r["eval_ips_naive"], 1),
            _speedup(r["eval_ips_ours"], r["eval_ips_naive"]),
            _fmt(r["eval_mem_ours"], 0),
            _fmt(r["eval_mem_naive"], 0),
            f"{r['max_abs_logit_diff']:.1e}",
        ]
        if before:
            b = r.get("eval_ips_before")
            bs = r.get("batch_s_before")
            cells += [f"{bs:.2g}" if bs else "—", _speedup(b, r["eval_ips_naive"]), _speedup(r["eval_ips_ours"], b)]
        out.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(out)


def memory_table(rows: list[dict[str, Any]]) -> str:
    """Evaluation peak memory of our path at 1000 against 100 classes: live tensors and resident set."""
    by = {(r["backbone"], r["method"], r["classes"]): r for r in rows if "eval_mem_ours" in r}
    out = [
        "| backbone | method | eval batch | tensors MiB @100 | @1000 | ratio | RSS MiB @100 | @1000 | ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (bb, m, c), r in sorted(by.items()):
        if c != 1000 or (bb, m, 100) not in by:
            continue
        small = by[(bb, m, 100)]
        cells = [bb, m, r["eval_batch"]]
        for key in ("eval_mem_ours", "eval_rss_ours"):
            a, b = small.get(key), r.get(key)
            cells += [_fmt(a), _fmt(b), f"{_fmt(_ratio(b, a), 2)}×"]
        out.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(out) if len(out) > 2 else ""


TARGETS = (
    # (what, methods, kind, backbone, classes, threshold)
    # vpt_deep has no target: its class text is fixed and encoded once on both paths, as in the reference
    (
        "training ≥ 3× at 100 classes on ViT-B-16",
        ("coop", "cocoop", "maple", "kgcoop", "ivlp", "language_deep", "prograd"),
        "train",
        "ViT-B-16",
        100,
        3.0,
    ),
    (
        "evaluation ≥ 10× at 100 classes",
        ("zsclip", "coop", "maple", "kgcoop", "ivlp", "language_deep", "prograd"),
        "eval",
        None,
        100,
        10.0,
    ),
    ("evaluation memory @1000 ≤ 1.5× @100 classes", ("cocoop", "mugcp"), "mem", None, None, 1.5),
)


def target_lines(rows: list[dict[str, Any]]) -> list[str]:
    by = {(r["backbone"], r["method"], r["classes"]): r for r in rows if "error" not in r}
    get = dict.get
    lines = []
    for what, methods, kind, bb, classes, thr in TARGETS:
        for m in methods:
            for (b, mm, c), r in sorted(by.items()):
                if mm != m or (bb and b != bb):
                    continue
                if kind == "mem":
                    if c != 1000 or (b, m, 100) not in by:
                        continue
                    v = _ratio(get(r, "eval_mem_ours"), get(by[(b, m, 100)], "eval_mem_ours"))
                    ok = v is not None and v <= thr
                elif c != classes:
                    continue
                elif kind == "train":
                    v = _ratio(r.get("train_ips_ours"), r.get("train_ips_naive"))
                    ok = v is not None and v >= thr
                else:
                    v = _ratio(get(r, "eval_ips_ours"), get(r, "eval_ips_naive"))
                    ok = v is not None and v >= thr
                if v is not None:
                    lines.append(f"- {what}: {m} on {b}: {_fmt(v, 2)}× — {'met' if ok else 'MISSED'}")
    return lines


def plan(args: argparse.Namespace) -> list[tuple[str, int]]:
    backbones = args.backbones.split(",")
    if args.classes:
        return [(b, int(c)) for b in backbones for c in args.classes.split(",")]
    classes = (10, 100) if args.quick else DEFAULT_CLASSES
    return [(b, c) for b in backbones for c in classes if args.device == "cuda" or (b, c) not in CPU_SKIP]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma-separated registry names")
    p.add_argument("--backbones", default=None, help=f"comma-separated (default {','.join(DEFAULT_BACKBONES)})")
    p.add_argument("--classes", default=None, help="comma-separated class counts (default 10,100,1000)")
    p.add_argument("--steps", type=int, default=None, help="max timed training steps per path (profile default)")
    p.add_argument("--eval-batches", type=int, default=None, help="test batches per evaluation pass")
    p.add_argument("--train-batch", type=int, default=None, help="cap on the recipe's training batch (0: none)")
    p.add_argument("--eval-batch", type=int, default=None, help="cap on the recipe's test batch (0: none)")
    p.add_argument("--min-time", type=float, default=None, help="seconds each path is timed at least (profile)")
    p.add_argument(
        "--test-images",
        type=int,
        default=2500,
        help="size of the test split the evaluation throughput is given for: our path pays begin_eval once, then "
        "every batch (measured per batch on --eval-batches batches)",
    )
    p.add_argument("--phases", default="train,eval", help="what to measure: train, eval or both (default)")
    p.add_argument(
        "--before",
        action="store_true",
        help="also measure our path with the EOT cut only (whole-row text passes, open_clip's attention modules), "
        "interleaved with the other two",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall: elapsed seconds (default); cpu: the worker's CPU seconds, for a CPU run with one torch thread on "
        "a machine other jobs oversubscribe (times then exclude waiting for a core)",
    )
    p.add_argument("--precision", default="auto", help="auto (fp32 on CPU, bf16 autocast on CUDA), fp32, bf16")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default 1 on CPU: on cores shared with other jobs, two threads wait on each other "
        "and run 2-5x slower and far noisier; 0: torch's default)",
    )
    p.add_argument("--quick", action="store_true", help="~1 minute smoke run: tiny and toy CLIP, 10 and 100 classes")
    p.add_argument("--out", default=None, help="write the markdown report to this file")
    p.add_argument("--json", default=None, help="write the raw rows to this JSON file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    if args.threads is None:
        args.threads = 1 if args.device == "cpu" else 0
    if args.clock == "cpu" and (args.device != "cpu" or args.threads != 1):
        p.error("--clock cpu needs --device cpu and one torch thread (--threads 1, the CPU default)")
    if args.backbones is None:
        args.backbones = "tiny,toy-clip" if args.quick else ",".join(DEFAULT_BACKBONES)
    command = "python benchmarks/bench.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    rows: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    info = machine_info(args.device, args.threads, args.clock)
    for backbone, classes in plan(args):
        prof = profile_for(backbone, args.device)
        if args.quick:
            prof = dataclasses.replace(
                prof,
                warmup=1,
                max_steps=2,
                max_eval_repeats=1,
                min_time=0.0,
                eval_batches=1,
                cond_eval_batches=1,
                cond_eval_batch_cap=8,
            )
        for key, value in (
            ("max_steps", args.steps),
            ("eval_batches", args.eval_batches),
            ("cond_eval_batches", args.eval_batches),
            ("min_time", args.min_time),
        ):
            if value is not None:
                prof = dataclasses.replace(prof, **{key: value})
        if args.train_batch is not None:
            prof = dataclasses.replace(prof, train_batch_cap=args.train_batch, cond_train_batch_cap=args.train_batch)
        if args.eval_batch is not None:
            prof = dataclasses.replace(prof, eval_batch_cap=args.eval_batch, cond_eval_batch_cap=args.eval_batch)
        spec = {
            "backbone": backbone,
            "classes": classes,
            "methods": args.methods.split(","),
            "device": args.device,
            "precision": args.precision,
            "threads": args.threads,
            "test_images": args.test_images,
            "phases": args.phases.split(","),
            "paths": ["ours", "before", "naive"] if args.before else ["ours", "naive"],
            "clock": args.clock,
            "profile": dataclasses.asdict(prof),
        }
        print(f"# {backbone} @ {classes} classes ({time.perf_counter() - t_start:.0f} s)", flush=True)
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO,
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            if not line.startswith(RESULT_TAG):
                sys.stdout.write(line)
                continue
            r = json.loads(line[len(RESULT_TAG) :])
            rows.append(r)
            if "error" in r:
                print(f"  {r['method']:8s} ERROR {r['error']}", flush=True)
                continue
            g = r.get
            tr = _ratio(g("train_ips_ours"), g("train_ips_naive"))
            ev = _ratio(g("eval_ips_ours"), g("eval_ips_naive"))
            train_ips = f"{_fmt(g('train_ips_ours'), 2):>8s} vs {_fmt(g('train_ips_naive'), 2):>8s}"
            eval_ips = f"{_fmt(g('eval_ips_ours')):>8s} vs {_fmt(g('eval_ips_naive')):>8s}"
            diff = f"{r['max_abs_logit_diff']:.1e}" if "max_abs_logit_diff" in r else "—"
            if g("train_ips_before") or g("eval_ips_before"):
                train_ips += f" (before {_fmt(g('train_ips_before'), 2)})"
                eval_ips += f" (before {_fmt(g('eval_ips_before'))})"
            print(
                f"  {r['method']:8s} train {train_ips} img/s ({_fmt(tr)}×)  eval {eval_ips} img/s ({_fmt(ev)}×)"
                f"  eval peak {_fmt(g('eval_mem_ours'), 0)} vs {_fmt(g('eval_mem_naive'), 0)} MiB"
                f"  |Δlogit| {diff}  [{r['wall_s']:.0f} s]",
                flush=True,
            )
        if proc.wait() != 0:
            print(f"worker for {backbone} @ {classes} exited with {proc.returncode}", flush=True)
    wall = time.perf_counter() - t_start
    report = render(rows, info, command, wall, args)
    print()
    print(report)
    if args.out:
        Path(args.out).write_text(report + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "command": command, "rows": rows}, indent=1) + "\n")
    return 0


def render(rows: list[dict[str, Any]], info: dict[str, str], command: str, wall: float, args: Any) -> str:
    parts = [
        f"Command: `{command}` (total {wall / 60:.1f} min)",
        "",
        "Machine: " + "; ".join(f"{k} {v}" for k, v in info.items()),
    ]
    if any(r.get("train_steps") for r in rows):
        parts += [
            "",
            "Training (one step of `trainer.fit`: forward, cross-entropy + extra losses, backward, SGD):",
            "",
            train_table(rows),
        ]
    if any("eval_ips_ours" in r or "error" in r for r in rows):
        parts += [
            "",
            "Evaluation (`begin_eval` once, then `predict` per batch; naive: `forward` per batch, no feature cache):",
            "",
            eval_table(rows),
        ]
    mem = memory_table(rows)
    if mem:
        parts += ["", "Evaluation memory, our path, 1000 against 100 classes:", "", mem]
    lines = target_lines(rows)
    if lines:
        parts += ["", "Targets:", "", *lines]
    return "\n".join(parts)


if __name__ == "__main__":
    sys.exit(main())
