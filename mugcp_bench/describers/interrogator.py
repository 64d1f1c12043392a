"""The ``interrogator`` describer: CLIP retrieval over a fixed phrase bank with the run's backbone (offline, any
images): the top-k phrases joined into one sentence."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mugcp_bench.describers.base import Describer, DescriberOptions, open_rgb
from mugcp_bench.errors import UserError
from mugcp_bench.registry import DESCRIBERS

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
        images = torch.stack([b.test_transform(open_rgb(item)) for item in items]).to(b.device)  # (N, 3, H, W)
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
