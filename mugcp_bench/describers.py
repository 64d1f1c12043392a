"""Describers: images -> one-sentence descriptions, MuGCP's source of semantic conditional prompts (SCP).

methods.md §7.3 (A) (our design). Every describer is deterministic, registered by lowercase name in
`mugcp_bench.registry.DESCRIBERS`, and has an ``id`` (name + model revision + settings) and a versioned
``prompt_id``; together with the image's content hash they key the description cache
(`mugcp_bench.description_cache`).

- ``mllm``: any transformers image-text-to-text / vision-to-sequence model (hub id or local folder), batched greedy
  decoding, 60 new tokens, prompts ``describe_v1`` / ``describe_noname_v1``.
- ``file``: imports a JSONL of ``{"image": path, "text": ...}`` (paths absolute or relative to the data root).
- ``scene``: toy world only, a documented STAND-IN for an MLLM: a sentence built from the rendered scene's metadata
  (``metadata.jsonl``) with seeded noise (attributes dropped or replaced, seeded by the image hash). It may name the
  class, which is what the leakage figure measures.
- ``interrogator``: CLIP retrieval over a fixed phrase bank with the run's backbone (offline, any images).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from mugcp_bench.description_cache import image_path, image_sha1
from mugcp_bench.errors import UserError
from mugcp_bench.registry import DESCRIBERS, suggest

log = logging.getLogger(__name__)

# Versioned captioning prompts (methods.md §7.3 (A)). Change the text -> new id.
PROMPTS: dict[str, str] = {
    "describe_v1": (
        "Describe the main subject of this image in one detailed sentence: its parts, shape, colours, textures "
        "and surroundings."
    ),
    "describe_noname_v1": (
        "Describe the main subject of this image in one detailed sentence: its parts, shape, colours, textures "
        "and surroundings. Do not name the specific species, model or category."
    ),
}
MAX_NEW_TOKENS = 60


def _open_rgb(item: Any):
    from PIL import Image, UnidentifiedImageError

    path = image_path(item)
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as e:
        what = type(e).__name__
        raise UserError(f"image {path} is missing or unreadable ({what}); re-download or re-extract it") from None


@dataclass
class DescriberOptions:
    """Everything a describer may need; each describer reads the fields it uses."""

    model: str | None = None  # mllm: hub id or local folder
    revision: str | None = None  # mllm: hub revision (branch, tag or commit)
    prompt_id: str | None = None
    file: str | None = None  # file: the JSONL
    data_root: str | None = None  # file: root for relative paths
    backbone: Any = None  # interrogator: a mugcp_bench.backbone.Backbone
    device: str | None = None  # mllm: where the model runs (default: cuda if available)
    batch_size: int | None = None
    scene_drop: float = 0.2  # scene: probability an attribute is left out
    scene_swap: float = 0.1  # scene: probability an attribute is replaced by another value
    top_k: int = 5  # interrogator: phrases per description


class Describer:
    """Base class: ``describe(items) -> list[str]`` for `Datum`s or image paths, deterministic."""

    name: ClassVar[str] = ""
    default_prompt_id: ClassVar[str] = ""
    prompt_ids: ClassVar[tuple[str, ...] | None] = None  # None: any prompt id is accepted
    batch_size: int = 32

    def __init__(self, prompt_id: str | None = None, batch_size: int | None = None) -> None:
        pid = prompt_id or self.default_prompt_id
        if self.prompt_ids is not None and pid not in self.prompt_ids:
            raise UserError(
                f"describer '{self.name}' has no prompt id '{pid}'.{suggest(pid, self.prompt_ids)} "
                f"Prompt ids: {', '.join(self.prompt_ids)}"
            )
        self.prompt_id = pid
        if batch_size:
            self.batch_size = int(batch_size)

    @classmethod
    def from_options(cls, opts: DescriberOptions) -> Describer:
        raise NotImplementedError

    @property
    def id(self) -> str:
        """Describer id including the model revision and every setting that changes the text."""
        raise NotImplementedError

    def describe(self, items: Sequence[Any]) -> list[str]:
        raise NotImplementedError

    def count_tokens(self, text: str) -> int:
        """Length of a description (words; the mllm describer counts its tokenizer's tokens)."""
        return len(text.split())

    def cli_args(self) -> str:
        """The `mugcp-bench describe` options that rebuild this describer."""
        return f"--describer {self.name} --prompt-id {self.prompt_id}"

    def release(self) -> None:
        """Free what describing loaded (models, GPU memory); the next `describe` loads it again."""


def build_describer(name: str, opts: DescriberOptions | None = None, **kwargs: Any) -> Describer:
    """A describer by registered name; options as a `DescriberOptions` and/or keyword fields of it."""
    opts = dataclasses.replace(opts or DescriberOptions(), **kwargs)
    return DESCRIBERS.get(name).from_options(opts)


AUTO = "auto"


def describer_groups(
    name: str, items: Sequence[Any], make: Callable[[str], Describer]
) -> list[tuple[Describer, list[Any]]]:
    """(describer, items) pairs for a describer name; ``auto`` = ``scene`` for rendered toy images (their dataset
    folder has metadata.jsonl) and ``interrogator`` for every other image. Describers are built only when used."""
    if name != AUTO:
        return [(make(name), list(items))] if items else []
    toy, other = [], []
    for item in items:
        (toy if scene_metadata(item) is not None else other).append(item)
    return [(make(n), group) for n, group in (("scene", toy), ("interrogator", other)) if group]


# --- file ------------------------------------------------------------------------------------------------------------
@DESCRIBERS.register("file")
class FileDescriber(Describer):
    """Imports descriptions from a JSONL file of {"image": path, "text": ...} (path absolute or data-root relative)."""

    name = "file"
    default_prompt_id = "file"
    batch_size = 4096

    def __init__(self, file: str, prompt_id: str | None = None, data_root: str | None = None) -> None:
        super().__init__(prompt_id)
        self.file = Path(file)
        if not self.file.is_file():
            raise UserError(f"description file {self.file} does not exist; pass --file PATH to a JSONL file")
        raw = self.file.read_bytes()
        self._digest = hashlib.sha1(raw).hexdigest()[:12]
        self.data_root = os.path.abspath(data_root) if data_root else None
        self._by_abs: dict[str, str] = {}
        self._by_rel: dict[str, str] = {}
        for number, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                path, text = obj["image"], obj["text"]
                if not isinstance(path, str) or not isinstance(text, str):
                    raise TypeError
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(
                    f"description file {self.file} line {number} is not a JSON object with string fields "
                    '"image" and "text"; fix or remove the line'
                ) from None
            text = " ".join(text.split())
            if os.path.isabs(path):
                self._by_abs[os.path.normpath(path)] = text
            else:
                rel = Path(os.path.normpath(path)).as_posix()
                self._by_rel[rel] = text
                if self.data_root:
                    self._by_abs[os.path.normpath(os.path.join(self.data_root, path))] = text

    @classmethod
    def from_options(cls, opts: DescriberOptions) -> FileDescriber:
        if not opts.file:
            raise UserError("the 'file' describer needs a JSONL file: pass --file PATH (or --set describer_file=PATH)")
        return cls(opts.file, opts.prompt_id, opts.data_root)

    @property
    def id(self) -> str:
        return f"file-{self.file.stem}-{self._digest}"

    def _lookup(self, item: Any) -> str | None:
        path = os.path.normpath(image_path(item))
        if path in self._by_abs:
            return self._by_abs[path]
        rel = getattr(item, "relpath", None)  # relative to the item's own data root
        return self._by_rel.get(Path(os.path.normpath(rel)).as_posix()) if rel is not None else None

    def describe(self, items: Sequence[Any]) -> list[str]:
        texts = [self._lookup(item) for item in items]
        missing = [image_path(item) for item, t in zip(items, texts) if t is None]
        if missing:
            raise UserError(
                f"description file {self.file} has no line for {len(missing)} of {len(items)} images "
                f"(first: {missing[0]}); add them, or pass --data-root if its paths are relative"
            )
        return [t for t in texts if t is not None]

    def cli_args(self) -> str:
        return f"--describer file --file {self.file} --prompt-id {self.prompt_id}"


# --- scene (toy world) -----------------------------------------------------------------------------------------------
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
        """One sentence from a scene record; the noise is drawn from `seed` (the image hash)."""
        from mugcp_bench.toy.render import (
            BACKGROUNDS,
            COLORS,
            COUNT_WORDS,
            PATTERNS,
            POSITIONS,
            SHAPES,
            SIZES,
            article,
            plural,
        )

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
        many = (n if n is not None else count) > 1
        noun = shape or "object"
        phrase = " ".join([w for w in (size, pattern, color) if w] + [plural(noun) if many else noun])
        if not many:
            det = article(phrase)
        else:
            det = COUNT_WORDS[n - 1] if n is not None else "several"
        prefix = {"sketch": "a sketch of", "cartoon": "a cartoon of", "noisy": "a noisy photo of"}.get(
            style, "a photo of"
        )
        text = f"{prefix} {det} {phrase}"
        if style == "textured":
            text += " on a colorful patterned background"
        elif style in ("photo", "noisy") and background:
            text += f" on a {background} background"
        if position and not many:
            text += {"center": " in the center", "top": " at the top", "bottom": " at the bottom"}.get(
                position, f" on the {position}"
            )
        return text + "."

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


# --- interrogator ----------------------------------------------------------------------------------------------------
# The phrase bank (version 1): noun phrases read as "a photo of <phrase>." Colours, shapes, textures, scenes, common
# objects, styles and layouts. Editing it requires a new version (it is part of the describer id).
PHRASE_BANK_VERSION = "v1"
_COLOURS = "red, orange, yellow, green, blue, purple, pink, brown, cyan, gray, black, white, gold, silver, beige, dark"
_SHAPES = "circle, square, triangle, star, heart, cross, diamond, hexagon, pentagon, crescent, ring, arrow, rectangle, \
oval, spiral, line"
_TEXTURES = "plain, striped, dotted, checkered, zigzag, wavy, grid, speckled, marbled, woven, scaly, furry, bumpy, \
cracked, smooth, shiny, rough, knitted, lacy, honeycomb, paisley, polka-dot, braided, porous"
_SCENES = "grass field, blue sky, sandy beach, body of water, brick wall, snowy landscape, night sky, wooden surface, \
forest, mountain, city street, kitchen, bedroom, living room, office, classroom, garden, desert, river, lake, ocean, \
road, parking lot, airport, stadium, market, restaurant, bathroom, farm, field of flowers, cave, bridge, highway, \
harbor, playground, library, shop, church, waterfall, jungle"
_OBJECTS = "dog, cat, bird, fish, horse, cow, sheep, insect, butterfly, snake, frog, monkey, bear, deer, person, face, \
hand, child, crowd, car, truck, bus, bicycle, motorcycle, airplane, boat, train, tractor, helicopter, chair, table, \
sofa, bed, lamp, clock, bottle, cup, bowl, plate, knife, phone, computer, keyboard, camera, book, bag, shoe, hat, \
shirt, dress, umbrella, ball, toy, guitar, piano, tool, flower, tree, leaf, plant, mushroom, fruit, vegetable, pizza, \
cake, bread, sandwich, salad, soup, meat dish, dessert, building, house, tower, window, door, fence, sign, statue, \
instrument, machine, engine, wheel, rock, cloud"
_STYLES = "a photograph, a sketch, a cartoon, a painting, a noisy image, a blurry image, a close-up, a small object, \
a large object, several objects, a single object, an object in the center"


def _split(words: str) -> list[str]:
    return [w.strip() for w in words.split(",") if w.strip()]


def _a(phrase: str) -> str:
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


PHRASE_BANK: tuple[str, ...] = (
    *(_a(f"{c} object") for c in _split(_COLOURS)),
    *(_a(s) for s in _split(_SHAPES)),
    *(_a(f"{t} pattern") for t in _split(_TEXTURES)),
    *(_a(b) for b in _split(_SCENES)),
    *(_a(o) for o in _split(_OBJECTS)),
    *_split(_STYLES),
)


@DESCRIBERS.register("interrogator")
class InterrogatorDescriber(Describer):
    """CLIP retrieval over a fixed phrase bank with the run's backbone (offline, any images): top-k phrases."""

    name = "interrogator"
    default_prompt_id = "phrasebank_v1"
    prompt_ids = ("phrasebank_v1",)
    batch_size = 64
    TEMPLATE = "a photo of {}."

    def __init__(self, backbone: Any, prompt_id: str | None = None, top_k: int = 5, batch_size: int | None = None):
        super().__init__(prompt_id, batch_size)
        if backbone is None:
            raise UserError("the 'interrogator' describer needs a backbone: pass --backbone NAME --pretrained TAG|PATH")
        if not 1 <= top_k <= len(PHRASE_BANK):
            raise UserError(f"interrogator top_k must be in 1..{len(PHRASE_BANK)}, got {top_k}")
        self.backbone = backbone
        self.top_k = int(top_k)
        self._phrase_features: torch.Tensor | None = None

    @classmethod
    def from_options(cls, opts: DescriberOptions) -> InterrogatorDescriber:
        return cls(opts.backbone, opts.prompt_id, opts.top_k, opts.batch_size)

    @property
    def id(self) -> str:
        b = self.backbone
        return f"interrogator-{PHRASE_BANK_VERSION}-{b.name}-{b.weights_hash[:12]}-k{self.top_k}"

    @torch.no_grad()
    def phrase_features(self) -> torch.Tensor:
        """(P, E) normalised text features of the phrase bank."""
        if self._phrase_features is None:
            texts = [self.TEMPLATE.format(p) for p in PHRASE_BANK]
            self._phrase_features = torch.cat(
                [self.backbone.text_features(texts[s : s + 256]).float() for s in range(0, len(texts), 256)]
            )
        return self._phrase_features

    @torch.no_grad()
    def describe(self, items: Sequence[Any]) -> list[str]:
        if not items:
            return []
        b = self.backbone
        images = torch.stack([b.test_transform(_open_rgb(item)) for item in items]).to(b.device)  # (N, 3, H, W)
        feats = torch.nn.functional.normalize(b.encode_image(images).float(), dim=-1)  # (N, E)
        scores = feats @ self.phrase_features().t()  # (N, P)
        top = scores.topk(self.top_k, dim=-1).indices.tolist()
        out = []
        for row in top:
            phrases = [PHRASE_BANK[i] for i in row]
            body = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
            out.append(f"an image of {body}.")
        return out

    def cli_args(self) -> str:
        b = self.backbone
        extra = f" --top-k {self.top_k}" if self.top_k != 5 else ""
        return f"--describer interrogator --backbone {b.name} --pretrained {b.pretrained}{extra}"


# --- mllm ------------------------------------------------------------------------------------------------------------
def _is_offline() -> bool:
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def local_model_revision(folder: Path) -> str:
    """Content hash of a model folder: every small file in full, weight files by name, size, first and last MiB."""
    h = hashlib.sha1()
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or p.name.startswith("."):
            continue
        rel = p.relative_to(folder).as_posix()
        size = p.stat().st_size
        h.update(f"{rel}\t{size}\n".encode())
        with open(p, "rb") as f:
            if size <= 16 << 20:
                h.update(f.read())
            else:
                h.update(f.read(1 << 20))
                f.seek(size - (1 << 20))
                h.update(f.read())
    return h.hexdigest()[:12]


def check_tokenizer(tokenizer: Any, model: str) -> None:
    """UserError when a tokenizer loaded empty (transformers can do so offline without raising)."""
    fix = "its tokenizer files are missing or unreadable; re-download the model or pass a complete local folder"
    try:
        size = int(getattr(tokenizer, "vocab_size", 0) or 0)
        ids = tokenizer("a photo of a dog", add_special_tokens=False)["input_ids"]
    except Exception as e:  # noqa: BLE001 - any failure here means an unusable tokenizer
        raise UserError(f"the tokenizer of mllm model '{model}' does not work ({type(e).__name__}): {fix}") from None
    unk = getattr(tokenizer, "unk_token_id", None)
    if size <= 0 or not ids or all(i == unk for i in ids):
        raise UserError(
            f"the tokenizer of mllm model '{model}' loaded with an empty vocabulary ({size} entries; plain English "
            f"encodes to nothing or unknown tokens): {fix}"
        )


@DESCRIBERS.register("mllm")
class MLLMDescriber(Describer):
    """Any transformers image-text-to-text / vision-to-sequence model (hub id or local folder), greedy decoding."""

    name = "mllm"
    default_prompt_id = "describe_v1"
    prompt_ids = tuple(PROMPTS)
    batch_size = 8

    def __init__(
        self,
        model: str,
        prompt_id: str | None = None,
        device: str | None = None,
        batch_size: int | None = None,
        revision: str | None = None,
        max_new_tokens: int = MAX_NEW_TOKENS,
    ) -> None:
        super().__init__(prompt_id, batch_size)
        if not model:
            raise UserError(
                "the 'mllm' describer needs a model: pass --model HUB_ID|PATH (or --set describer_model=...)"
            )
        self.model_name = model
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.max_new_tokens = int(max_new_tokens)
        self._local = Path(os.path.expanduser(model))
        if self._local.is_dir():
            self.revision = local_model_revision(self._local)
            self._source = str(self._local)
        elif model.startswith((".", "~", "/")) or model.count("/") > 1 or (os.sep != "/" and os.sep in model):
            raise UserError(f"mllm model folder '{model}' does not exist; pass --model PATH to a folder or a hub id")
        else:
            self.revision = self._hub_revision(model, revision)
            self._source = model
        self._hub_ref = revision
        self._model: Any = None
        self._processor: Any = None
        self._tokenizer: Any = None
        self._mode = ""

    @classmethod
    def from_options(cls, opts: DescriberOptions) -> MLLMDescriber:
        return cls(opts.model or "", opts.prompt_id, opts.device, opts.batch_size, opts.revision)

    @staticmethod
    def _hub_revision(repo_id: str, revision: str | None) -> str:
        """The commit hash of a hub model (its config.json's snapshot folder); offline: from the local cache."""
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        if _is_offline():
            path = try_to_load_from_cache(repo_id, "config.json", revision=revision)
            if not isinstance(path, str):
                raise UserError(
                    f"mllm model '{repo_id}' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: "
                    "pass --model PATH to a local folder, or go online once to download it"
                )
        else:
            try:
                path = hf_hub_download(repo_id, "config.json", revision=revision)
            except Exception as e:  # noqa: BLE001
                raise UserError(
                    f"cannot fetch mllm model '{repo_id}' ({type(e).__name__}); check the hub id, the network, "
                    "or pass --model PATH to a local folder"
                ) from None
        return Path(path).parent.name[:12]

    @property
    def id(self) -> str:
        base = Path(self._source).name if self._local.is_dir() else self.model_name.replace("/", "--")
        return f"mllm-{base}@{self.revision}"

    # loading ----------------------------------------------------------------------------------------------------
    def _load(self) -> None:
        if self._model is not None:
            return
        import transformers

        kwargs: dict[str, Any] = {} if self._local.is_dir() else {"revision": self._hub_ref}
        try:
            processor = transformers.AutoProcessor.from_pretrained(self._source, **kwargs)
        except Exception as e:  # noqa: BLE001 - any failure is the user's model folder or id
            raise UserError(
                f"cannot load the processor of mllm model '{self.model_name}' ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}); pass a complete model folder or hub id"
            ) from None
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is None and callable(getattr(processor, "batch_decode", None)):
            tokenizer = processor  # the processor is the tokenizer itself
        if tokenizer is None or not hasattr(processor, "image_processor"):
            try:  # a folder with separate image processor and tokenizer files (e.g. VisionEncoderDecoder)
                tokenizer = tokenizer or transformers.AutoTokenizer.from_pretrained(self._source, **kwargs)
                image_processor = transformers.AutoImageProcessor.from_pretrained(self._source, **kwargs)
            except Exception as e:  # noqa: BLE001
                raise UserError(
                    f"mllm model '{self.model_name}' has no usable tokenizer / image processor ({type(e).__name__}); "
                    "pass a complete model folder or hub id"
                ) from None
            processor = _PairProcessor(image_processor, tokenizer)
        check_tokenizer(tokenizer, self.model_name)
        dtype = torch.float32
        if str(self.device).startswith("cuda"):
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        model = None
        errors = []
        for auto in ("AutoModelForImageTextToText", "AutoModelForVision2Seq"):
            cls = getattr(transformers, auto, None)
            if cls is None:
                continue
            try:
                model = cls.from_pretrained(self._source, dtype=dtype, **kwargs)
                break
            except (ValueError, KeyError) as e:  # not mapped to this auto class
                errors.append(f"{auto}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
            except Exception as e:  # noqa: BLE001
                raise UserError(
                    f"cannot load mllm model '{self.model_name}' ({type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''})"
                ) from None
        if model is None:
            raise UserError(
                f"'{self.model_name}' is not an image-text-to-text / vision-to-sequence model ({'; '.join(errors)})"
            )
        model.to(self.device).eval()
        if getattr(tokenizer, "padding_side", None) is not None and not model.config.is_encoder_decoder:
            tokenizer.padding_side = "left"  # batched generation of decoder-only models pads on the left
        if getattr(tokenizer, "pad_token_id", None) is None and getattr(tokenizer, "eos_token", None) is not None:
            tokenizer.pad_token = tokenizer.eos_token
        self._processor, self._tokenizer, self._model = processor, tokenizer, model
        if model.config.model_type == "vision-encoder-decoder":
            self._mode = "captioner"  # takes no text prompt
            log.warning(
                "mllm model '%s' is a pure captioner: it takes no prompt, so prompt '%s' is not applied",
                self.model_name,
                self.prompt_id,
            )
        elif getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None):
            self._mode = "chat"
        else:
            self._mode = "prompted"
        log.info("loaded mllm describer %s (%s mode) on %s", self.id, self._mode, self.device)

    def _prompt_text(self) -> str:
        prompt = PROMPTS[self.prompt_id]
        if self._mode == "chat":
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            templ = self._processor if hasattr(self._processor, "apply_chat_template") else self._tokenizer
            return templ.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        token = getattr(self._processor, "image_token", None)
        return f"{token}\n{prompt}" if token and token not in prompt else prompt

    @torch.no_grad()
    def describe(self, items: Sequence[Any]) -> list[str]:
        if not items:
            return []
        self._load()
        images = [_open_rgb(item) for item in items]
        if self._mode == "captioner":
            inputs = self._processor(images=images, return_tensors="pt")
            inputs = {"pixel_values": inputs["pixel_values"]}
        else:
            text = self._prompt_text()
            inputs = self._processor(images=images, text=[text] * len(images), return_tensors="pt", padding=True)
        inputs = {k: (v.to(self.device) if torch.is_tensor(v) else v) for k, v in dict(inputs).items()}
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(self._model.dtype)
        out = self._model.generate(
            **inputs,
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=self._tokenizer.pad_token_id,
        )
        if not self._model.config.is_encoder_decoder and "input_ids" in inputs:
            out = out[:, inputs["input_ids"].shape[1] :]  # decoder-only: drop the prompt
        texts = self._tokenizer.batch_decode(out, skip_special_tokens=True)
        return [" ".join(t.split()) for t in texts]

    def count_tokens(self, text: str) -> int:
        if self._tokenizer is None:
            return super().count_tokens(text)
        return len(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def cli_args(self) -> str:
        return f"--describer mllm --model {self.model_name} --prompt-id {self.prompt_id}"

    def release(self) -> None:
        if self._model is None:
            return
        self._model = self._processor = self._tokenizer = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class _PairProcessor:
    """An image processor and a tokenizer used together like a transformers processor."""

    def __init__(self, image_processor: Any, tokenizer: Any) -> None:
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.chat_template = getattr(tokenizer, "chat_template", None)

    def __call__(self, images=None, text=None, return_tensors="pt", padding=True):
        out = dict(self.image_processor(images=images, return_tensors=return_tensors))
        if text is not None:
            out.update(self.tokenizer(text, return_tensors=return_tensors, padding=padding))
        return out


__all__ = [
    "PHRASE_BANK",
    "PROMPTS",
    "Describer",
    "DescriberOptions",
    "FileDescriber",
    "InterrogatorDescriber",
    "MLLMDescriber",
    "SceneDescriber",
    "build_describer",
    "describer_groups",
    "check_tokenizer",
    "scene_metadata",
]
