"""The ``scene`` describer (toy world only): a documented STAND-IN for an MLLM that describes a rendered scene from
its metadata (``metadata.jsonl``), with seeded noise (attributes dropped or replaced, seeded by the image hash). It
may name the class, which is what the leakage figure measures."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mugcp_bench.describers.base import Describer, DescriberOptions
from mugcp_bench.describers.image_keys import image_path, image_sha1
from mugcp_bench.errors import UserError
from mugcp_bench.registry import DESCRIBERS

_METADATA_MEMO: dict[str, dict[str, dict] | None] = {}


def scene_metadata(item: Any) -> dict | None:
    """The toy-world scene record of an image (from its dataset folder's metadata.jsonl), or None."""
    from mugcp_bench.toy.suite import METADATA_FILE, load_scene_metadata

    path = Path(image_path(item))
    candidates: list[Path] = []
    rel = getattr(item, "relpath", None)
    if rel and len(Path(rel).parts) > 1 and path.as_posix().endswith(rel):
        root = Path(path.as_posix()[: -len(rel)])  # the data root; the dataset folder is relpath's first part
        candidates.append(root / Path(rel).parts[0])
    candidates += list(path.parents[:4])  # <dataset>/images/<class>/<file>
    for folder in candidates:
        key = str(folder)
        if key not in _METADATA_MEMO:
            _METADATA_MEMO[key] = load_scene_metadata(folder) if (folder / METADATA_FILE).is_file() else None
        table = _METADATA_MEMO[key]
        if table is not None:
            try:
                return table.get(path.relative_to(folder).as_posix())
            except ValueError:
                continue
    return None


@DESCRIBERS.register("scene")
class SceneDescriber(Describer):
    """Toy world only: describes the rendered scene from its metadata, with seeded noise (a stand-in for an MLLM)."""

    name = "scene"
    default_prompt_id = "scene_v1"
    prompt_ids = ("scene_v1",)
    batch_size = 4096
    VERSION = "v1"

    def __init__(self, prompt_id: str | None = None, drop: float = 0.2, swap: float = 0.1) -> None:
        super().__init__(prompt_id)
        if not (0 <= drop <= 1 and 0 <= swap <= 1 and drop + swap <= 1):
            raise UserError(f"scene describer noise: drop {drop} and swap {swap} must be in [0, 1] with a sum <= 1")
        self.drop, self.swap = float(drop), float(swap)

    @classmethod
    def from_options(cls, opts: DescriberOptions) -> SceneDescriber:
        return cls(opts.prompt_id, opts.scene_drop, opts.scene_swap)

    @property
    def id(self) -> str:
        return f"scene-{self.VERSION}-drop{self.drop:g}-swap{self.swap:g}"

    def _noisy(self, rng: random.Random, value: Any, choices: Sequence[Any]) -> Any:
        """None (dropped) with probability `drop`, another value with probability `swap`, else `value`."""
        u = rng.random()
        if u < self.drop:
            return None
        if u < self.drop + self.swap:
            others = [c for c in choices if c != value]
            return rng.choice(others) if others else value
        return value

    def sentence(self, meta: dict, seed: int) -> str:
        """One sentence from a scene record, built by the renderer's own sentence builder; the noise (attributes
        dropped or swapped) is drawn from `seed` (the image hash)."""
        from mugcp_bench.toy.render import BACKGROUNDS, COLORS, COUNT_WORDS, PATTERNS, POSITIONS, SHAPES, SIZES
        from mugcp_bench.toy.render import sentence as scene_sentence

        rng = random.Random(seed)
        style = meta.get("style", "photo")
        count = int(meta.get("count") or 1)
        size = self._noisy(rng, meta.get("size"), SIZES)
        pattern = self._noisy(rng, meta.get("pattern"), PATTERNS)
        color = self._noisy(rng, meta.get("color"), tuple(COLORS))
        shape = self._noisy(rng, meta.get("shape"), SHAPES)
        # The number of objects is only swapped where it varies (the count layout); elsewhere it can only be dropped.
        n = self._noisy(rng, count, range(1, len(COUNT_WORDS) + 1) if meta.get("layout") == "count" else (count,))
        background = self._noisy(rng, meta.get("background"), BACKGROUNDS)
        position = self._noisy(rng, meta.get("position"), POSITIONS) if meta.get("position") else None
        if style in ("sketch", "cartoon"):
            pattern = None  # those styles draw no surface pattern
        adjectives = [w for w in (size, pattern, color) if w]
        many = (n if n is not None else count) > 1
        return scene_sentence(style, shape or "object", adjectives, many, n, background, position, position_sep=" ")

    def describe(self, items: Sequence[Any]) -> list[str]:
        out = []
        for item in items:
            meta = scene_metadata(item)
            if meta is None:
                raise UserError(
                    f"image {image_path(item)} has no toy-world scene metadata (metadata.jsonl): the 'scene' describer "
                    "only describes rendered toy images; use --describer interrogator, mllm or file"
                )
            out.append(self.sentence(meta, int(image_sha1(item)[:16], 16)))
        return out

    def cli_args(self) -> str:
        extra = (
            f" --scene-drop {self.drop:g} --scene-swap {self.swap:g}" if (self.drop, self.swap) != (0.2, 0.1) else ""
        )
        return f"--describer scene --prompt-id {self.prompt_id}{extra}"
