"""Contrastive pretraining of the toy CLIP on freshly rendered image-caption pairs (CPU, deterministic).

Each step renders a new batch (single-threaded, seeded by (seed, step)): scenes drawn from every toy dataset's
generator plus free scenes, captioned either by a random English caption naming a random subset of the scene's
attributes or, sometimes, by a dataset's own zero-shot prompt. Captions cover every attribute word and every class
name of the suite, so zero-shot works on every toy dataset; the short budget keeps it imperfect.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F

from mugcp_bench.console import Progress
from mugcp_bench.toy.render import (
    BACKGROUNDS,
    COLORS,
    COUNT_WORDS,
    LAYOUTS,
    PATTERNS,
    SHAPES,
    STYLES,
    Scene,
    caption,
    render_batch,
    sample_scene,
    with_attributes,
)
from mugcp_bench.toy.suite import DATASETS, ToyDataset
from mugcp_bench.toy.workers import RenderPool

log = logging.getLogger(__name__)

MODEL_NAME = "toy-clip"
CONFIG_PATH = Path(__file__).resolve().parent.parent / "model" / "configs" / f"{MODEL_NAME}.json"


def register_model_config() -> None:
    """Make `toy-clip` known to open_clip (idempotent)."""
    if MODEL_NAME not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_PATH)


@dataclass(frozen=True)
class PretrainSettings:
    """Everything that determines the pretrained weights (with the model config and the renderer version)."""

    steps: int = 450
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 0.1
    warmup_steps: int = 40
    seed: int = 0
    prompt_caption_prob: float = 0.2  # share of captions that are a dataset's own zero-shot prompt
    free_scene_prob: float = 0.2  # share of scenes drawn from the whole attribute space, not a dataset's generator
    domain_weight: float = 0.03  # sampling weight of each shifted-domain generator (the others weigh 1 each)
    # Sampling weights of dataset generators other than 1 (the source and the slow-to-learn textures weigh more).
    dataset_weights: tuple[tuple[str, float], ...] = (("toy_objects", 2.0), ("toy_textures", 2.0))
    grad_clip: float = 1.0
    # Weight of an auxiliary loss: linear heads on the image embedding predict each scene attribute (heads are
    # discarded); cosine-decayed to 0, so training ends purely contrastive. A tiny ViT trained contrastively from
    # scratch sits on a plateau for thousands of steps before it sees shape at all; the renderer's labels end it.
    aux_weight: float = 1.0
    group_size: int = 4  # minimal pairs per sampled scene (one attribute varied)
    clean_prob: float = 0.5  # share of photo groups shown on a plain background with plain surfaces
    shape_focus: float = 0.5  # share of groups that vary the shape (the slowest attribute to learn)
    # Captions are encoded in this many groups of similar length, each cut after its longest caption (the result is
    # the same up to float rounding; see encode_text_by_length): the text tower then skips most of the padding.
    text_chunks: int = 4

    def as_dict(self) -> dict:
        return asdict(self)


_POOLS: dict[str, tuple] = {
    "shape": SHAPES,
    "color": tuple(COLORS),
    "pattern": PATTERNS,
    "background": BACKGROUNDS,
    "count": tuple(range(1, len(COUNT_WORDS) + 1)),
}


def _visible_factors(layout: str, style: str) -> list[str]:
    """Attributes one can see in a scene of this layout and style (what a minimal pair may vary)."""
    factors = ["shape", "color"]
    if style not in ("sketch", "cartoon"):
        factors.append("pattern")
    if style in ("photo", "noisy"):
        factors.append("background")
    if layout == "count":
        factors.append("count")
    return factors


def _distinct(rng: np.random.Generator, pool: tuple, k: int) -> list:
    return [pool[int(i)] for i in rng.choice(len(pool), size=min(k, len(pool)), replace=False)]


def _sample_group(
    rng: np.random.Generator, settings: PretrainSettings, gens: list[ToyDataset], p: np.ndarray
) -> list[tuple[Scene, str]]:
    """`group_size` minimal pairs: one scene rendered with different values of one attribute, each captioned naming
    that attribute. These hard negatives make the model learn shape, count and texture, not only colour and
    background (which alone explain most of a random batch)."""
    g = settings.group_size
    shape_focus = rng.random() < settings.shape_focus
    if rng.random() < settings.free_scene_prob:
        ds = None
        layout = LAYOUTS[int(rng.integers(len(LAYOUTS)))]
        style = "photo" if rng.random() < 0.9 else STYLES[int(rng.integers(1, len(STYLES)))]
        base = sample_scene(rng, layout=layout, style=style)
        factors = _visible_factors(layout, style)
        factor = "shape" if shape_focus and layout == "object" else factors[int(rng.integers(len(factors)))]
        variants = [{factor: v} for v in _distinct(rng, _POOLS[factor], g)]
    else:
        ds = gens[int(rng.choice(len(gens), p=p))]
        # Pretraining images are all shot under neutral light: the source's warm cast stays a downstream shift.
        base = replace(ds.sample(int(rng.integers(len(ds.classnames))), rng), lighting="neutral")
        if shape_focus and base.layout == "object":  # vary the shape only (single large objects)
            shapes = ds.classnames if ds.attribute == "shape" else ds.shapes
            if ds.attribute == "color shape":
                shapes = tuple(sorted({c.split(" ")[1] for c in ds.classnames}))
            variants = [{"shape": v} for v in _distinct(rng, tuple(shapes), g)]
        else:  # vary the class
            variants = [ds.class_attributes(y) for y in _distinct(rng, tuple(range(len(ds.classnames))), g)]
    if base.style == "photo" and rng.random() < settings.clean_prob:  # uncluttered: shapes are learnt from these
        keep = {k for a in variants for k in a}
        base = with_attributes(base, rng, **{k: "plain" for k in ("background", "pattern") if k not in keep})
    out = []
    for attrs in variants:
        member = with_attributes(base, rng, **attrs)
        label = ds.label_of(member) if ds is not None else None
        if label is not None and rng.random() < settings.prompt_caption_prob:
            out.append((member, ds.prompt(label)))
        else:
            must = set(attrs) | (set(ds.class_attributes(label)) if label is not None else set())
            out.append((member, caption(member, rng, must=must)))
    return out


# Auxiliary attribute heads on the image embedding (discarded after pretraining).
AUX_ATTRIBUTES: dict[str, tuple] = {"shape": SHAPES, **{k: v for k, v in _POOLS.items() if k != "shape"}}
IGNORE = -100


def scene_targets(scene: Scene) -> list[int]:
    """Index of each auxiliary attribute's value in its pool (IGNORE where the style does not show it)."""
    visible = set(_visible_factors("count", scene.style))
    out = []
    for name, pool in AUX_ATTRIBUTES.items():
        value = scene.count if name == "count" else getattr(scene, name)
        out.append(pool.index(value) if name in visible else IGNORE)
    return out


def _generator_weights(settings: PretrainSettings) -> tuple[list[ToyDataset], np.ndarray]:
    gens = list(DATASETS.values())
    special = dict(settings.dataset_weights)
    w = np.array([special.get(d.name, settings.domain_weight if d.test_only else 1.0) for d in gens])
    return gens, w / w.sum()


def sample_pairs(settings: PretrainSettings, step: int) -> tuple[list[Scene], list[str], np.ndarray]:
    """The scenes, captions and attribute targets (B, n_attributes) of batch `step`, before rendering (cheap); a pure
    function of (settings, step)."""
    gens, p = _generator_weights(settings)
    rng = np.random.default_rng([settings.seed, step])
    pairs: list[tuple[Scene, str]] = []
    while len(pairs) < settings.batch_size:
        pairs += _sample_group(rng, settings, gens, p)
    pairs = pairs[: settings.batch_size]
    targets = np.array([scene_targets(s) for s, _ in pairs], dtype=np.int64)
    return [s for s, _ in pairs], [t for _, t in pairs], targets


def pair_batch(settings: PretrainSettings, step: int) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Batch `step`: (images (B, H, W, 3) uint8, captions, attribute targets (B, n_attributes)); a pure function of
    (settings, step)."""
    scenes, texts, targets = sample_pairs(settings, step)
    return render_batch(scenes), texts, targets


def pair_stream(settings: PretrainSettings, workers: int = 0) -> Iterator[tuple[np.ndarray, list[str], np.ndarray]]:
    """Batches 0, 1, 2, ... of `pair_batch`. With workers > 0 each batch is rendered by that many worker processes
    at once (split in contiguous chunks, so the batches are the same either way) while training waits: rendering is
    single-threaded and would leave the other cores idle, and rendering ahead *during* training competes with
    torch's threads instead (measured on 2 cores: no gain)."""
    with RenderPool(workers) as pool:
        step = 0
        while True:
            scenes, texts, targets = sample_pairs(settings, step)
            yield pool.render(scenes), texts, targets
            step += 1


def to_tensor(images: np.ndarray, mean, std) -> torch.Tensor:
    """uint8 (B, H, W, 3) images -> normalised (B, 3, H, W) float tensor, as open_clip's transform does."""
    x = torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).float().div_(255.0)  # (B, 3, 32, 32)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@contextlib.contextmanager
def _deterministic() -> Iterator[None]:
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def encode_text_by_length(model: torch.nn.Module, tokens: torch.Tensor, chunks: int) -> torch.Tensor:
    """`model.encode_text(tokens, normalize=True)` of an open_clip CLIP, computed on `chunks` groups of captions of
    similar length, each cut after its longest caption's end-of-text token.

    Toy captions take 12 of the 32 context positions on average, so most of the text tower's work is padding. The
    result is the same up to float rounding: attention is causal and the features are read at the end-of-text token
    (the largest token id), so nothing after it reaches them. (B, context) int tokens -> (B, embed_dim).
    """
    plain = getattr(model, "text_pool_type", None) == "argmax" and isinstance(model.text_projection, torch.nn.Parameter)
    if chunks <= 1 or not plain:  # one chunk, or a text tower this shortcut does not know
        return model.encode_text(tokens, normalize=True)
    eot = tokens.argmax(dim=-1)  # (B,) position of the end-of-text token
    order = torch.argsort(eot, stable=True)
    parts = []
    for idx in order.chunk(max(chunks, 1)):
        n = int(eot[idx].max()) + 1
        t = tokens[idx, :n]  # (b, n)
        x = model.token_embedding(t) + model.positional_embedding[:n]  # (b, n, width)
        x = model.transformer(x, attn_mask=model.attn_mask[:n, :n])
        x = model.ln_final(x)
        parts.append(x[torch.arange(len(idx)), eot[idx]] @ model.text_projection)  # (b, embed_dim)
    pooled = torch.cat(parts)
    out = torch.empty_like(pooled).index_copy_(0, order, pooled)  # back to the captions' order
    return F.normalize(out, dim=-1)


def _cpu_seconds() -> float:
    """CPU time of this process, all threads (user + system)."""
    return time.process_time()


def pretrain(
    settings: PretrainSettings, progress: bool = True, workers: int = 0
) -> tuple[dict[str, torch.Tensor], dict]:
    """Train the toy CLIP from scratch; returns (open_clip state dict, stats). `workers` processes render each
    batch (0: this process renders; the weights do not depend on it).

    Same settings, torch version, CPU kernels and thread count -> bitwise identical weights. Global RNG state is
    restored.
    """
    register_model_config()
    t0, c0 = time.perf_counter(), _cpu_seconds()
    with torch.random.fork_rng(devices=[]), _deterministic():
        torch.manual_seed(settings.seed)
        model = open_clip.create_model(MODEL_NAME)
        model.train()
        embed_dim = model.text_projection.shape[1]
        heads = torch.nn.ModuleList(torch.nn.Linear(embed_dim, len(pool)) for pool in AUX_ATTRIBUTES.values())
        tokenizer = open_clip.get_tokenizer(MODEL_NAME)
        mean, std = model.visual.preprocess_cfg["mean"], model.visual.preprocess_cfg["std"]
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
        no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
        opt = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": settings.weight_decay},
                {"params": [*no_decay, *heads.parameters()], "weight_decay": 0.0},
            ],
            lr=settings.lr,
            betas=(0.9, 0.98),
            eps=1e-6,
        )
        warmup = max(1, min(settings.warmup_steps, settings.steps - 1))
        sched = torch.optim.lr_scheduler.SequentialLR(
            opt,
            [
                torch.optim.lr_scheduler.LinearLR(opt, start_factor=1e-2, total_iters=warmup),
                torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, settings.steps - warmup)),
            ],
            milestones=[warmup],
        )
        loss_fn = open_clip.ClipLoss()
        losses: list[float] = []
        data_seconds = 0.0
        stream = pair_stream(settings, workers=workers)
        bar = Progress("pretraining toy CLIP", total=settings.steps, unit="steps", enabled=progress)
        with contextlib.closing(stream), bar:
            for step in range(settings.steps):
                td = time.perf_counter()
                images, texts, targets = next(stream)
                x = to_tensor(images, mean, std)  # (B, 3, 32, 32)
                tokens = tokenizer(texts)  # (B, 32)
                y = torch.from_numpy(targets)  # (B, n_attributes)
                data_seconds += time.perf_counter() - td
                image_embed = model.encode_image(x)  # (B, 128)
                image_features = F.normalize(image_embed, dim=-1)
                text_features = encode_text_by_length(model, tokens, settings.text_chunks)  # (B, 128)
                loss = loss_fn(image_features, text_features, model.logit_scale.exp())
                aux_w = settings.aux_weight * 0.5 * (1 + math.cos(math.pi * step / settings.steps))
                if aux_w > 0:
                    aux = [F.cross_entropy(h(image_embed), y[:, i], ignore_index=IGNORE) for i, h in enumerate(heads)]
                    loss = loss + aux_w * torch.stack(aux).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_([*model.parameters(), *heads.parameters()], settings.grad_clip)
                opt.step()
                sched.step()
                with torch.no_grad():
                    model.logit_scale.clamp_(0, math.log(100))
                losses.append(loss.detach().item())
                bar.advance(1, status=f"loss {sum(losses[-20:]) / len(losses[-20:]):.3f}")
        model.eval()
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    stats = {
        "seconds": round(time.perf_counter() - t0, 2),
        "cpu_seconds": round(_cpu_seconds() - c0, 2),  # this process only (render workers not counted)
        "data_seconds": round(data_seconds, 2),
        "final_loss": round(sum(losses[-20:]) / max(1, len(losses[-20:])), 4),
        "threads": torch.get_num_threads(),
        "render_workers": workers,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
    }
    log.info(
        "pretrained toy CLIP: %d steps in %.1f s (final loss %.3f)",
        settings.steps,
        stats["seconds"],
        stats["final_loss"],
    )
    return state, stats


__all__ = [
    "CONFIG_PATH",
    "MODEL_NAME",
    "PretrainSettings",
    "pair_batch",
    "pair_stream",
    "pretrain",
    "sample_pairs",
    "encode_text_by_length",
    "register_model_config",
    "to_tensor",
]
