"""Procedural renderer of the toy world: small images of coloured shapes with attributes, and captions naming them.

Everything is a pure function of its arguments: a `Scene` holds every attribute plus the seed of its pixel-level
noise, so the same scene always renders the same bytes (no global RNG state is read or written).
Images are drawn at `RENDER_SIZE` px and box-filtered down to `IMAGE_SIZE` px (anti-aliasing).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# Bump when anything changes the pixels or captions: it is part of the toy world's cache key.
RENDERER_VERSION = "3"
RENDER_SIZE = 64
IMAGE_SIZE = 32

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (240, 135, 25),
    "yellow": (235, 215, 35),
    "green": (45, 160, 55),
    "blue": (35, 75, 215),
    "purple": (130, 45, 175),
    "pink": (240, 130, 190),
    "brown": (125, 80, 40),
    "cyan": (40, 195, 215),
    "gray": (128, 128, 128),
    "black": (25, 25, 25),
    "white": (245, 245, 245),
}
SHAPES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "heart",
    "cross",
    "ring",
    "crescent",
)
PATTERNS: tuple[str, ...] = ("plain", "striped", "dotted", "checkered", "zigzag", "wavy", "grid", "speckled")
BACKGROUNDS: tuple[str, ...] = (
    "plain",
    "grass",
    "sky",
    "sand",
    "water",
    "brick wall",
    "snow",
    "night sky",
    "wood",
)
# Default sampling pools: names repeated to weigh them (plain surfaces and backgrounds are common).
PATTERN_POOL: tuple[str, ...] = ("plain", "plain", *PATTERNS)
BACKGROUND_POOL: tuple[str, ...] = ("plain", "plain", "plain", "plain", *BACKGROUNDS)
COUNT_WORDS: tuple[str, ...] = ("one", "two", "three", "four", "five", "six")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("center", "left", "right", "top", "bottom")
# photo: the default look; the other styles are the shifted domains (and a small share of pretraining data).
# Colour casts (RGB gains). The source dataset is shot under warm light, which the toy CLIP never sees in
# pretraining: a dataset-level shift that prompt learning can adapt to (zero-shot cannot).
LIGHTINGS: dict[str, tuple[float, float, float]] = {"neutral": (1.0, 1.0, 1.0), "warm": (1.3, 1.0, 0.6)}
STYLES: tuple[str, ...] = ("photo", "sketch", "noisy", "textured", "cartoon")
# Layouts: how many objects, how big, where.
LAYOUTS: tuple[str, ...] = ("object", "texture", "scene", "count")

_RADIUS = {  # circumradius range in RENDER_SIZE pixels, per layout and size word
    ("object", "small"): (17.0, 21.0),
    ("object", "large"): (22.0, 28.0),
    ("texture", "large"): (24.0, 29.0),
    ("scene", "small"): (10.0, 14.0),
    ("count", "small"): (8.0, 10.0),
}


@dataclass(frozen=True)
class Scene:
    """Every attribute of one image. All objects of a scene share shape, colour and pattern."""

    shape: str
    color: str
    pattern: str
    background: str
    size: str
    style: str
    layout: str
    centers: tuple[tuple[float, float], ...]  # object centres in RENDER_SIZE pixels
    radius: float  # circumradius in RENDER_SIZE pixels
    rotation: float  # degrees
    noise_seed: int  # seeds the pixel-level noise (textures, jitter) of `render`
    lighting: str = "neutral"  # a colour cast over the whole image (see LIGHTINGS)

    @property
    def count(self) -> int:
        return len(self.centers)

    @property
    def position(self) -> str:
        """Where the (first) object sits: center, left, right, top or bottom."""
        x, y = self.centers[0]
        dx, dy = (x - RENDER_SIZE / 2) / RENDER_SIZE, (y - RENDER_SIZE / 2) / RENDER_SIZE
        if max(abs(dx), abs(dy)) < 0.12:
            return "center"
        if abs(dx) >= abs(dy):
            return "left" if dx < 0 else "right"
        return "top" if dy < 0 else "bottom"

    def metadata(self) -> dict:
        """JSON-able attributes (what the `scene` describer reads)."""
        d = asdict(self)
        d["centers"] = [[round(x, 2), round(y, 2)] for x, y in self.centers]
        d["radius"] = round(self.radius, 2)
        d["rotation"] = round(self.rotation, 2)
        d["count"] = self.count
        d["position"] = self.position if self.count == 1 else None
        return d


# --------------------------------------------------------------------------------------------- scene sampling


def _choice(rng: np.random.Generator, items) -> str:
    return items[int(rng.integers(len(items)))]


def sample_scene(
    rng: np.random.Generator,
    *,
    layout: str = "object",
    shape: str | None = None,
    color: str | None = None,
    pattern: str | None = None,
    background: str | None = None,
    count: int | None = None,
    style: str = "photo",
    patterns: tuple[str, ...] = PATTERN_POOL,
    backgrounds: tuple[str, ...] = BACKGROUND_POOL,
    colors: tuple[str, ...] = tuple(COLORS),
    shapes: tuple[str, ...] = SHAPES,
    lighting: str = "neutral",
) -> Scene:
    """A random scene; fixed attributes are given, the others drawn from `rng` (and the given pools)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}")
    if lighting not in LIGHTINGS:
        raise ValueError(f"unknown lighting {lighting!r}")
    shape = shape or _choice(rng, shapes)
    color = color or _choice(rng, colors)
    pattern = pattern or _choice(rng, patterns)
    background = background or _choice(rng, backgrounds)
    if layout == "object":
        size = _choice(rng, SIZES)
        n = count or 1
    elif layout == "texture":
        size, n = "large", count or 1
    elif layout == "scene":
        size, n = "small", count or int(rng.integers(1, 3))
    else:
        size, n = "small", count or int(rng.integers(1, len(COUNT_WORDS) + 1))
    lo, hi = _RADIUS[(layout, size)]
    radius = float(rng.uniform(lo, hi))
    centers = _place(rng, layout, n, radius)
    rotation = float(rng.uniform(-15, 15))
    return Scene(
        shape=shape,
        color=color,
        pattern=pattern,
        background=background,
        size=size,
        style=style,
        layout=layout,
        centers=centers,
        radius=radius,
        rotation=rotation,
        noise_seed=int(rng.integers(2**31)),
        lighting=lighting,
    )


def _place(rng: np.random.Generator, layout: str, n: int, radius: float) -> tuple[tuple[float, float], ...]:
    """Centres of n objects that never overlap (n > 1: distinct cells of a 3x3 grid, jittered inside the cell)."""
    if n == 1:
        if layout in ("texture", "object"):  # one large object near the centre (as in most photos)
            lo, hi = max(radius + 1.0, 26.0), min(RENDER_SIZE - radius - 1.0, 38.0)
            return ((float(rng.uniform(lo, max(lo, hi))), float(rng.uniform(lo, max(lo, hi)))),)
        margin = radius + 1.0
        return ((float(rng.uniform(margin, RENDER_SIZE - margin)), float(rng.uniform(margin, RENDER_SIZE - margin))),)
    cell = RENDER_SIZE / 3
    cells = rng.permutation(9)[:n]
    slack = max(cell / 2 - radius - 0.5, 0.0)
    return tuple(
        (
            float((c % 3 + 0.5) * cell + rng.uniform(-slack, slack)),
            float((c // 3 + 0.5) * cell + rng.uniform(-slack, slack)),
        )
        for c in sorted(int(c) for c in cells)
    )


def with_attributes(scene: Scene, rng: np.random.Generator, **attributes) -> Scene:
    """The same scene (same layout, pixels noise, positions where possible) with some attributes changed: minimal
    pairs for contrastive pretraining. A new count places the objects again."""
    count = attributes.pop("count", None)
    new = replace(scene, **attributes)
    if count is not None and count != scene.count:
        new = replace(new, centers=_place(rng, scene.layout, count, scene.radius))
    return new


# --------------------------------------------------------------------------------------------------- geometry


def _regular(n: int, inner: float | None = None, start: float = 0.0) -> np.ndarray:
    """Unit-circumradius polygon (n vertices, or 2n alternating with `inner` for stars); angle 0 points up."""
    if inner is None:
        a = start + 2 * np.pi * np.arange(n) / n
        r = np.ones(n)
    else:
        a = start + np.pi * np.arange(2 * n) / n
        r = np.where(np.arange(2 * n) % 2 == 0, 1.0, inner)
    return np.stack([r * np.sin(a), -r * np.cos(a)], axis=1)


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y + 2.5], axis=1)
    return pts / np.abs(pts).max()


_W = 0.34  # cross arm half-width
_UNIT_POLYGONS: dict[str, list[tuple[np.ndarray, bool]]] = {  # (vertices, filled=True / cut out=False)
    "circle": [(_regular(48), True)],
    "square": [(_regular(4, start=np.pi / 4), True)],
    "triangle": [(_regular(3) * 1.1 + [0, 0.2], True)],
    "star": [(_regular(5, inner=0.45), True)],
    "heart": [(_heart(), True)],
    "cross": [
        (
            np.array(
                [
                    [-_W, -1],
                    [_W, -1],
                    [_W, -_W],
                    [1, -_W],
                    [1, _W],
                    [_W, _W],
                    [_W, 1],
                    [-_W, 1],
                    [-_W, _W],
                    [-1, _W],
                    [-1, -_W],
                    [-_W, -_W],
                ]
            )
            * 0.85,
            True,
        )
    ],
    "crescent": [(_regular(48), True), (_regular(48) * 0.85 + [0.45, -0.1], False)],
    "ring": [(_regular(48), True), (_regular(48) * 0.55, False)],
}


def shape_mask(
    shape: str, center: tuple[float, float], radius: float, rotation: float, stretch: tuple[float, float] = (1.0, 1.0)
) -> Image.Image:
    """An 'L' mask (RENDER_SIZE px) of one shape."""
    mask = Image.new("L", (RENDER_SIZE, RENDER_SIZE), 0)
    draw = ImageDraw.Draw(mask)
    th = math.radians(rotation)
    rot = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    for verts, filled in _UNIT_POLYGONS[shape]:
        pts = (verts * np.asarray(stretch)) @ rot.T * radius + np.asarray(center)
        draw.polygon([tuple(p) for p in pts.tolist()], fill=255 if filled else 0)
    return mask


# --------------------------------------------------------------------------------------------------- textures

_YY, _XX = np.mgrid[0:RENDER_SIZE, 0:RENDER_SIZE].astype(np.float32)


def pattern_map(pattern: str, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    """(H, W) float in [0, 1]: where the secondary colour of a pattern shows (0 everywhere for plain). `scale`
    stretches the period (texture close-ups show coarser patterns)."""
    if pattern == "plain":
        return np.zeros((RENDER_SIZE, RENDER_SIZE), np.float32)
    period = float(rng.uniform(7.0, 10.0)) * scale
    phase = float(rng.uniform(0, period))
    if pattern == "striped":
        th = float(rng.uniform(0, np.pi))
        u = _XX * np.cos(th) + _YY * np.sin(th) + phase
        return ((u % period) < period / 2).astype(np.float32)
    if pattern == "dotted":
        x, y = (_XX + phase) % period - period / 2, (_YY + phase) % period - period / 2
        return (x * x + y * y < (0.28 * period) ** 2).astype(np.float32)
    if pattern == "checkered":
        p = period * 0.8
        return ((np.floor((_XX + phase) / p) + np.floor((_YY + phase) / p)) % 2).astype(np.float32)
    if pattern in ("zigzag", "wavy"):
        vertical = bool(rng.integers(2))
        u, v = (_YY, _XX) if vertical else (_XX, _YY)
        amp, wl = period * 0.45, period * 1.2
        t = (u / wl) % 1.0
        offset = amp * (4 * np.abs(t - 0.5) - 1) if pattern == "zigzag" else amp * np.sin(2 * np.pi * u / wl)
        return (((v + offset + phase) % period) < period / 2).astype(np.float32)
    if pattern == "grid":
        w = 2.0
        return (((_XX + phase) % period < w) | ((_YY + phase) % period < w)).astype(np.float32)
    if pattern == "speckled":
        coarse = rng.random((RENDER_SIZE // 2, RENDER_SIZE // 2)) < 0.3
        return np.repeat(np.repeat(coarse, 2, axis=0), 2, axis=1).astype(np.float32)
    raise ValueError(f"unknown pattern {pattern!r}")


def _rgb(c) -> np.ndarray:
    return np.asarray(c, np.float32).reshape(1, 1, 3)


def background_image(background: str, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) float RGB in [0, 255] of a named background."""
    s = RENDER_SIZE
    if background == "plain":
        tone = float(rng.uniform(150, 235))
        tint = rng.normal(0, 8, 3)
        return np.broadcast_to(_rgb(tone + tint), (s, s, 3)).copy()
    if background == "grass":
        blades = np.repeat(rng.random((s // 4, s)), 4, axis=0)[:, :, None]
        return _rgb((60, 135, 45)) * (0.65 + 0.6 * blades) + rng.normal(0, 6, (s, s, 1))
    if background == "sky":
        g = (_YY / s)[:, :, None]
        img = _rgb((80, 140, 225)) * (1 - g) + _rgb((165, 205, 245)) * g
        for _ in range(int(rng.integers(1, 4))):
            cx, cy, rx, ry = rng.uniform(0, s), rng.uniform(0, s * 0.7), rng.uniform(6, 14), rng.uniform(3, 6)
            cloud = np.clip(1.5 - ((_XX - cx) / rx) ** 2 - ((_YY - cy) / ry) ** 2, 0, 1)[:, :, None]
            img = img * (1 - cloud) + 250 * cloud
        return img
    if background == "sand":
        return _rgb((215, 190, 135)) + rng.normal(0, 12, (s, s, 1)) + rng.normal(0, 4, (s, s, 3))
    if background == "water":
        k, ph = rng.uniform(0.25, 0.45), rng.uniform(0, 2 * np.pi)
        waves = np.sin(_YY * k + 1.5 * np.sin(_XX * 0.15 + ph))[:, :, None]
        return _rgb((30, 95, 165)) + _rgb((30, 40, 45)) * waves
    if background == "brick wall":
        img = np.empty((s, s, 3), np.float32)
        img[:] = (195, 185, 170)  # mortar
        bh, bw = 8, 16
        off = rng.uniform(0, bw)
        for row in range(s // bh):
            shift = off + (bw / 2 if row % 2 else 0)
            for col in range(-1, s // bw + 1):
                x0 = int(round(col * bw + shift)) % (s + bw) - bw
                shade = rng.uniform(0.8, 1.15)
                img[row * bh + 1 : row * bh + bh - 1, max(x0 + 1, 0) : max(x0 + bw - 1, 0)] = (
                    np.array((160, 65, 45)) * shade
                )
        return img
    if background == "snow":
        g = (_YY / s)[:, :, None]
        return _rgb((225, 232, 242)) * (1 - 0.1 * g) + rng.normal(0, 5, (s, s, 1)) - 25 * (rng.random((s, s, 1)) < 0.03)
    if background == "night sky":
        img = _rgb((15, 20, 55)) + rng.normal(0, 3, (s, s, 3))
        stars = rng.random((s, s, 1)) < 0.025
        return np.where(stars, 235.0, img)
    if background == "wood":
        ph, k = rng.uniform(0, 2 * np.pi), rng.uniform(0.5, 0.8)
        grain = np.sin(_YY * k + 2.0 * np.sin(_XX * 0.08 + ph) + rng.normal(0, 0.15, (s, 1)))[:, :, None]
        return _rgb((150, 100, 55)) + _rgb((30, 22, 12)) * grain
    raise ValueError(f"unknown background {background!r}")


def _two_tone(rng: np.random.Generator) -> np.ndarray:
    """A loud patterned background made of two random colours (the 'textured' domain)."""
    a, b = (np.asarray(COLORS[_choice(rng, tuple(COLORS))], np.float32) for _ in range(2))
    m = pattern_map(_choice(rng, ("striped", "checkered", "zigzag", "dotted", "wavy")), rng)[:, :, None]
    return a * (1 - m) + b * m


# ----------------------------------------------------------------------------------------------------- render


def _erode(mask: Image.Image, width: int) -> Image.Image:
    return mask.filter(ImageFilter.MinFilter(width))


def _other_background(background: str, rng: np.random.Generator) -> str:
    others = [b for b in BACKGROUNDS if b not in (background, "plain")]
    return others[int(rng.integers(len(others)))]


def _mix_regions(main: np.ndarray, other: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Scenes hold several regions, as in SUN397: `main` (the label) keeps 50-75% of the view, split from `other` by a
    tilted horizon (other on top or at the bottom)."""
    s = RENDER_SIZE
    share = float(rng.uniform(0.25, 0.5))
    tilt = float(rng.uniform(-0.3, 0.3))
    horizon = share * s + tilt * (_XX - s / 2)  # rows above the line belong to `other`
    top = (_YY < horizon) if bool(rng.integers(2)) else (_YY >= s - horizon)
    return np.where(top[:, :, None], other, main)


def render(scene: Scene) -> np.ndarray:
    """(IMAGE_SIZE, IMAGE_SIZE, 3) uint8 RGB image of a scene; a pure function of `scene`."""
    rng = np.random.default_rng(scene.noise_seed)
    s = RENDER_SIZE
    style = scene.style
    base = np.asarray(COLORS[scene.color], np.float32)

    stretch = (1.0, 1.0)
    if style == "cartoon":
        sx = float(rng.uniform(0.7, 1.3))
        stretch = (sx, 1.0 / sx)
    mask_img = Image.new("L", (s, s), 0)
    for c in scene.centers:
        mask_img = Image.fromarray(
            np.maximum(
                np.asarray(mask_img), np.asarray(shape_mask(scene.shape, c, scene.radius, scene.rotation, stretch))
            )
        )
    mask = (np.asarray(mask_img, np.float32) / 255.0)[:, :, None]

    if style == "sketch":
        # Pencil outline (and light hatching) in the object's colour on paper.
        img = _rgb((238, 235, 225)) + rng.normal(0, 4, (s, s, 1))
        outline = mask - (np.asarray(_erode(mask_img, 7), np.float32) / 255.0)[:, :, None]
        ink = base * float(rng.uniform(0.75, 1.0))
        hatch_th = float(rng.uniform(0, np.pi))
        hatch = (((_XX * np.cos(hatch_th) + _YY * np.sin(hatch_th)) % 6.0) < 1.5)[:, :, None] * mask * 0.35
        a = np.clip(outline + hatch, 0, 1)
        img = img * (1 - a) + ink * a
    elif style == "cartoon":
        # Flat colour, thick black outline, drop shadow, pastel backdrop.
        img = np.broadcast_to(_rgb(rng.uniform(190, 250, 3)), (s, s, 3)).copy()
        shadow = np.roll(mask, (3, 3), axis=(0, 1)) * 0.35
        img = img * (1 - shadow)
        inner = (np.asarray(_erode(mask_img, 5), np.float32) / 255.0)[:, :, None]
        img = img * (1 - mask) + _rgb((15, 15, 15)) * (mask - inner) + base * inner
    else:
        if style == "textured":
            img = _two_tone(rng)
        else:  # lighting and white balance vary from photo to photo
            gain = rng.uniform(0.82, 1.18, 3) * float(rng.uniform(0.75, 1.15))
            img = background_image(scene.background, rng)
            if scene.layout == "scene":  # a second region (another background) fills 25-50% of the view
                img = _mix_regions(img, background_image(_other_background(scene.background, rng), rng), rng)
            img = img * gain.astype(np.float32)
        color = base + rng.normal(0, 20, 3)
        color = color * float(rng.uniform(0.75, 1.15))
        # Gentle lighting gradient across the object.
        lt = float(rng.uniform(0, 2 * np.pi))
        light = 1.0 + 0.1 * (np.cos(lt) * (_XX - s / 2) + np.sin(lt) * (_YY - s / 2))[:, :, None] / (s / 2)
        obj = color * light
        if scene.pattern != "plain":
            pm = pattern_map(scene.pattern, rng, 1.5 if scene.layout == "texture" else 1.0)[:, :, None]
            second = 20.0 if bool(rng.integers(2)) else 240.0
            strength = 0.85 if style == "textured" else (0.75 if scene.layout == "texture" else 0.5)
            obj = obj * (1 - strength * pm) + second * strength * pm
            if scene.layout == "texture":  # a close-up: the pattern fills the frame (the DTD role)
                img = img * (1 - strength * pm) + second * strength * pm
        img = img * (1 - mask) + obj * mask

    if scene.lighting != "neutral":
        img = img * _rgb(LIGHTINGS[scene.lighting])
    small = img.reshape(IMAGE_SIZE, s // IMAGE_SIZE, IMAGE_SIZE, s // IMAGE_SIZE, 3).mean(axis=(1, 3))
    if style == "noisy":
        small = small + rng.normal(0, 55, small.shape) + rng.normal(0, 25, (IMAGE_SIZE, IMAGE_SIZE, 1))
        salt = rng.random((IMAGE_SIZE, IMAGE_SIZE, 1))
        small = np.where(salt < 0.04, 0.0, np.where(salt > 0.96, 255.0, small))
    else:
        small = small + rng.normal(0, 3, small.shape)
    return np.clip(np.rint(small), 0, 255).astype(np.uint8)


def render_pil(scene: Scene) -> Image.Image:
    return Image.fromarray(render(scene), "RGB")


def render_batch(scenes: Sequence[Scene]) -> np.ndarray:
    """(len(scenes), IMAGE_SIZE, IMAGE_SIZE, 3) uint8: `render` of each scene (what worker processes are sent)."""
    out = np.empty((len(scenes), IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    for i, scene in enumerate(scenes):
        out[i] = render(scene)
    return out


# ---------------------------------------------------------------------------------------------------- captions


def plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "x", "sh", "ch")) else "s")


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


_STYLE_PREFIXES = {
    "photo": ("a photo of", "an image of", "a picture of", "a rendering of", "", "there is", "a close-up photo of"),
    "sketch": ("a sketch of", "a drawing of", "a pencil sketch of"),
    "noisy": ("a noisy photo of", "a grainy photo of", "a blurry photo of"),
    "textured": ("a photo of", "an image of", "a picture of"),
    "cartoon": ("a cartoon of", "a cartoon drawing of", "a clipart of"),
}
_POSITION_PHRASES = {
    "center": "in the center",
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}
_BACKGROUND_FORMS = ("on a {} background", "in front of a {} background", "with a {} background", "on {}")


def caption(scene: Scene, rng: np.random.Generator, must: frozenset[str] | set[str] = frozenset()) -> str:
    """A random English caption naming a random subset of the scene's attributes, always including those in `must`
    (of shape, color, pattern, background, count, size)."""
    n = scene.count
    shaped = "shape" in must or rng.random() < 0.85
    noun = scene.shape if shaped else _choice(rng, ("object", "shape", "thing"))
    adjectives = []
    if "size" in must or rng.random() < 0.3:
        adjectives.append(scene.size)
    pattern_suffix = ""
    p_pattern = 0.12 if scene.pattern == "plain" else (0.85 if scene.layout == "texture" else 0.55)
    if scene.style in ("sketch", "cartoon"):
        p_pattern = 0.0  # those styles draw no pattern
    if "pattern" in must and scene.style not in ("sketch", "cartoon"):
        p_pattern = 1.0
    if rng.random() < p_pattern:
        if rng.random() < 0.6:
            adjectives.append(scene.pattern)
        else:
            pattern_suffix = f" with a {scene.pattern} {_choice(rng, ('pattern', 'texture'))}"
    if "color" in must or rng.random() < (0.8 if shaped else 0.97):
        adjectives.append(scene.color)
    phrase = " ".join([*adjectives, noun if n == 1 else plural(noun)])
    if n == 1:
        det = "one" if "count" in must or rng.random() < 0.15 else article(phrase)
    else:
        det = COUNT_WORDS[n - 1]
    prefix = _choice(rng, _STYLE_PREFIXES[scene.style])
    if prefix == "there is" and n > 1:
        prefix = "there are"
    parts = [prefix, det, phrase + pattern_suffix]
    p_bg = 0.9 if scene.layout == "scene" else 0.5
    if scene.style in ("photo", "noisy") and ("background" in must or rng.random() < p_bg):
        parts.append(_choice(rng, _BACKGROUND_FORMS).format(scene.background))
    if n == 1 and rng.random() < 0.2:
        parts.append(_POSITION_PHRASES[scene.position])
    return " ".join(p for p in parts if p) + "."


_DESCRIBE_PREFIXES = {
    "photo": "a photo of",
    "sketch": "a sketch of",
    "noisy": "a noisy photo of",
    "textured": "a photo of",
    "cartoon": "a cartoon of",
}


def sentence(
    style: str,
    noun: str,
    adjectives: Sequence[str],
    many: bool,
    count: int | None = None,
    background: str | None = None,
    position: str | None = None,
    position_sep: str = ", ",
) -> str:
    """The fixed-order sentence that names a scene: "<style prefix> <det> <adjectives> <noun> [on a <background>
    background][<sep><position phrase>]." With `many`, the noun is plural and the determiner is the count word
    ("several" when `count` is None); background and position are named only where the style and count show them."""
    phrase = " ".join([*adjectives, plural(noun) if many else noun])
    det = (COUNT_WORDS[count - 1] if count else "several") if many else article(phrase)
    text = f"{_DESCRIBE_PREFIXES.get(style, 'a photo of')} {det} {phrase}"
    if style == "textured":
        text += " on a colorful patterned background"
    elif style in ("photo", "noisy") and background:
        text += f" on a {background} background"
    if position and not many:
        text += position_sep + _POSITION_PHRASES[position]
    return text + "."


def describe(scene: Scene) -> str:
    """A deterministic caption naming every attribute of the scene (for metadata and describers)."""
    n = scene.count
    adjectives = [scene.size] + ([scene.pattern] if scene.style not in ("sketch", "cartoon") else []) + [scene.color]
    return sentence(scene.style, scene.shape, adjectives, n > 1, n, scene.background, scene.position)


__all__ = [
    "BACKGROUNDS",
    "COLORS",
    "COUNT_WORDS",
    "IMAGE_SIZE",
    "LAYOUTS",
    "LIGHTINGS",
    "PATTERNS",
    "RENDERER_VERSION",
    "RENDER_SIZE",
    "SHAPES",
    "STYLES",
    "Scene",
    "caption",
    "describe",
    "render",
    "render_batch",
    "render_pil",
    "sample_scene",
    "sentence",
    "shape_mask",
    "with_attributes",
]
