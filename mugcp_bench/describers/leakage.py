"""Label leakage of per-image descriptions (docs/methods/mugcp.md §7.4, our design).

An MLLM that sees a test image can name its class in the description; MuGCP then reads the label from the text.
Every MuGCP report states how often descriptions name the image's true class; `mask_classnames` is the control.

Matching rule: case-insensitive, underscores count as spaces, whitespace collapsed, whole words only, and a plural
"s" / "es" on the class name (or a singular form of a class name ending in "s" / "es") still counts as a mention.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

MASK_WORD = "object"


def normalize_text(text: str) -> str:
    """Lowercase, underscores as spaces, whitespace collapsed."""
    return " ".join(text.replace("_", " ").lower().split())


def _variants(classname: str) -> list[str]:
    """Surface forms that count as naming `classname`: itself, its plural, and its singular if it ends in 's'."""
    name = normalize_text(classname)
    if not name:
        return []
    forms = [name, name + "s", name + "es"]
    if name.endswith("s") and not name.endswith("ss") and len(name) > 3:
        forms.append(name[:-1])
        if name.endswith("es") and len(name) > 4:
            forms.append(name[:-2])
    return forms


@functools.lru_cache(maxsize=4096)
def _pattern(classnames: tuple[str, ...]) -> re.Pattern[str] | None:
    """One regex matching any surface form of any class name, longest first, on word boundaries."""
    forms = sorted({f for c in classnames for f in _variants(c)}, key=len, reverse=True)
    if not forms:
        return None
    body = "|".join(r"\s+".join(re.escape(w) for w in f.split(" ")) for f in forms)
    return re.compile(rf"(?<![\w])(?:{body})(?![\w])", re.IGNORECASE)


def mentions_class(text: str, classname: str) -> bool:
    """True when `text` names `classname` (see the module docstring for the rule)."""
    pattern = _pattern((classname,))
    return bool(pattern and pattern.search(normalize_text(text)))


def _classname_of(item: Any) -> str:
    return item.classname if hasattr(item, "classname") else str(item)


def leakage_fraction(descriptions: Sequence[str] | Mapping[str, str], items: Sequence[Any]) -> float | None:
    """Fraction of `items` whose description names the item's TRUE class.

    `descriptions`: a list aligned with `items`, or a mapping relpath -> text (items need `.relpath`). Items need
    `.classname` (or are class-name strings). None when there are no items.
    """
    if not items:
        return None
    if isinstance(descriptions, Mapping):
        texts = [descriptions[item.relpath] for item in items]
    else:
        texts = list(descriptions)
        if len(texts) != len(items):
            raise ValueError(f"{len(texts)} descriptions for {len(items)} items")
    hits = sum(mentions_class(t, _classname_of(item)) for t, item in zip(texts, items))
    return hits / len(items)


def mask_classnames(text: str, classnames: Iterable[str]) -> str:
    """Replace every mention of any class name (any surface form) by "object"."""
    pattern = _pattern(tuple(sorted({normalize_text(c) for c in classnames if normalize_text(c)})))
    if pattern is None:
        return text
    # Underscores count as spaces for matching; other characters are kept as they are.
    return pattern.sub(MASK_WORD, text.replace("_", " "))


__all__ = ["MASK_WORD", "leakage_fraction", "mask_classnames", "mentions_class", "normalize_text"]
