"""Key patterns of the reference maps: our state-dict names <-> a reference trainer's, written once per method.

A pattern is a dotted name with placeholders:

* ``*`` — the rest of the name (``proj.*`` matches ``proj.weight``); a pattern has at most one.
* ``{i}`` — a layer index; the other side may shift it (``{i+1}``, ``{i-1}``): our ``compound_prompts_text.{i}``
  is the reference's ``text_encoder.transformer.resblocks.{i+1}.VPT_shallow``.
* ``{all}`` — on the reference side only: the same tensor under every layer index 0 … L−1 (the backbone's number
  of layers), as GingL/CMPA lists its one shared prompt-attention module under each of its 12 blocks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

_INDEX = re.compile(r"\{i([+-]\d+)?\}")


@dataclass(frozen=True)
class KeyPattern:
    """One side of a key rule; `match` binds the placeholders, `fill` writes a name from a binding."""

    text: str

    @cached_property
    def regex(self) -> re.Pattern[str]:
        out, pos = [], 0
        for m in re.finditer(r"\{i([+-]\d+)?\}|\{all\}|\*", self.text):
            out.append(re.escape(self.text[pos : m.start()]))
            token = m.group(0)
            if token == "*":
                out.append(r"(?P<rest>.+)")
            elif token == "{all}":
                out.append(r"(?P<all>\d+)")
            else:
                out.append(r"(?P<i>\d+)")
            pos = m.end()
        out.append(re.escape(self.text[pos:]))
        return re.compile("".join(out) + r"\Z")

    @property
    def offset(self) -> int:
        m = _INDEX.search(self.text)
        return int(m.group(1)) if m and m.group(1) else 0

    @property
    def broadcast(self) -> bool:
        return "{all}" in self.text

    def match(self, key: str) -> dict[str, str] | None:
        """The placeholders' values in `key` (the index with this side's offset removed), or None."""
        m = self.regex.match(key)
        if m is None:
            return None
        out = {k: v for k, v in m.groupdict().items() if v is not None}
        if "i" in out:
            out["i"] = str(int(out["i"]) - self.offset)
        return out

    def fill(self, binding: dict[str, str], n_layers: int = 0) -> list[str]:
        """The name(s) this side gives a binding: one, or one per layer for ``{all}``."""
        text = self.text.replace("*", binding.get("rest", "*"))
        if "i" in binding:
            text = _INDEX.sub(lambda m: str(int(binding["i"]) + (int(m.group(1)) if m.group(1) else 0)), text)
        if "{all}" in text:
            return [text.replace("{all}", str(i)) for i in range(n_layers)]
        return [text]


@dataclass(frozen=True)
class KeyRule:
    """Our name pattern and the reference's for the same tensor."""

    ours: KeyPattern
    reference: KeyPattern

    @classmethod
    def of(cls, ours: str, reference: str) -> KeyRule:
        return cls(KeyPattern(ours), KeyPattern(reference))

    def to_reference(self, key: str, n_layers: int) -> list[str] | None:
        binding = self.ours.match(key)
        return None if binding is None else self.reference.fill(binding, n_layers)

    def to_ours(self, key: str) -> str | None:
        binding = self.reference.match(key)
        if binding is None:
            return None
        binding.pop("all", None)
        return self.ours.fill(binding)[0]


def rules_of(mapping: dict[str, str] | tuple[tuple[str, str], ...]) -> tuple[KeyRule, ...]:
    items = mapping.items() if isinstance(mapping, dict) else mapping
    return tuple(KeyRule.of(a, b) for a, b in items)


def first_to_reference(rules: tuple[KeyRule, ...], key: str, n_layers: int) -> list[str] | None:
    """The reference name(s) of our `key` under the first rule that matches it, or None."""
    for rule in rules:
        names = rule.to_reference(key, n_layers)
        if names is not None:
            return names
    return None


def first_to_ours(rules: tuple[KeyRule, ...], key: str) -> str | None:
    """Our name of reference `key` under the first rule whose reference side matches it, or None."""
    for rule in rules:
        name = rule.to_ours(key)
        if name is not None:
            return name
    return None


__all__ = ["KeyPattern", "KeyRule", "first_to_ours", "first_to_reference", "rules_of"]
