"""Method plug-ins: a plug-in wraps another method, and the composition is a method of its own ("coop+dept").

A plug-in is a `MethodPlugin` subclass registered in `PLUGINS` (`@PLUGINS.register("dept")`, one file in `methods/`).
`MethodPlugin.compose(inner)` builds the composed class ``type("CoOp+DePT", (DePT, CoOp), ...)``: the plug-in comes
first in the method resolution order and reaches the inner method through ``super()``, so the inner's parameters keep
their names, and its hooks, precision patterns, side data, ignored settings and evaluation caches work unchanged; the
plug-in adds its own parameters, losses and evaluation around them (docs/methods/dept.md §15.5). The registry
registers "<method>+<plug-in>" for every method of the plug-in's `wraps` (`mugcp_bench.registry.PluginRegistry`).

What a composition is made of:

- settings: a dataclass subclassing the inner's `Config` with the plug-in's fields added (names must not clash);
  `--set dept.x` reaches every composition with dept, `--set coop+dept.x` this one (`runs/plan.py`);
- recipes: the inner's recipes, except those the plug-in maps to another recipe of the inner (`inner_recipes`:
  DePT's `paper` recipe of coop+dept is coop's `dept` recipe, DePT's re-run of CoOp); provenance likewise;
- ablations: the inner's and the plug-in's; report order and colour: next to the inner's.

The plug-in reads the features the inner computes through `features_seen`: while the inner runs (its `forward` or
`predict`), every value its feature methods return (`image_features`, `text_features`, `shared_text_features`,
`instance_text_features`) is kept, so the plug-in uses exactly the features behind the inner's logits without a
second pass; an inner with a frozen image path gets its image features computed once, by the plug-in, and handed in.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch

from mugcp_bench.errors import UserError
from mugcp_bench.methods.base import Method, Provenance
from mugcp_bench.methods.coop import frozen_image_features
from mugcp_bench.registry import COMPOSE, not_wrapped, suggest

# Feature methods of the inner methods whose values a plug-in may read (`features_seen`): the key they are kept under.
FEATURE_METHODS = {
    "image_features": "image",  # SharedTextMethod: (B, E)
    "text_features": "text",  # SharedTextMethod: (C, E)
    "shared_text_features": "text",  # CoCoOp without a Meta-Net: (C, E)
    "instance_text_features": "text",  # CoCoOp: (B, C, E)
}


class MethodPlugin:
    """Base of method plug-ins. Subclasses set `name`, `wraps`, `Config` (a dataclass of the plug-in's own settings),
    optionally `ablations`, `inner_recipes`, `report_offset`, `colors`, `needs_labels`, `reference_fp32`, and write
    `__init__`, `forward`, `predict`, ... calling ``super()`` to reach the inner method."""

    name: ClassVar[str] = ""
    wraps: ClassVar[tuple[str, ...]] = ()  # the methods the plug-in composes with (by registry name)
    Config: ClassVar[type] = object
    ablations: ClassVar[dict[str, dict[str, Any]]] = {}
    # recipe of the composition -> the inner's recipe it takes its settings from, where that recipe exists
    inner_recipes: ClassVar[dict[str, str]] = {}
    report_offset: ClassVar[int] = 1  # the composition's report order: the inner's + this
    colors: ClassVar[dict[str, str]] = {}  # inner name -> the composition's plot colour (default: the inner's, lighter)
    needs_labels: ClassVar[bool] = False
    reference_fp32: ClassVar[tuple[str, ...]] = ()  # added to the inner's patterns
    # No reference checkpoint layout for a composition (the inner's would drop the plug-in's tensors): `import` and
    # `export --format reference` refuse it in one line.
    reference_checkpoint: ClassVar[Any] = None

    # set on a composition
    inner_method: ClassVar[type[Method]]
    plugin_names: ClassVar[tuple[str, ...]] = ()
    plugin_settings: ClassVar[dict[str, frozenset[str]]] = {}  # plug-in name -> its settings (for `--set dept.x`)
    _recipe_sources: ClassVar[dict[str, str]] = {}

    @classmethod
    def compose(cls, inner: type[Method]) -> type[Method]:
        """The class of `inner` wrapped by this plug-in, named "<inner>+<plug-in>" (UserError: not one it wraps)."""
        if inner.name not in cls.wraps:
            raise UserError(not_wrapped(cls.name, cls.wraps, inner.name))
        name = f"{inner.name}{COMPOSE}{cls.name}"
        title = f"{inner.__name__}{cls.__name__}"  # a Python identifier: CoOpDePT (pickled runs find it by it)
        own = {f.name for f in dataclasses.fields(cls.Config)}
        clash = own & {f.name for f in dataclasses.fields(inner.Config)}
        if clash:
            raise ValueError(f"{cls.name}: settings {sorted(clash)} are also settings of {inner.name}")
        clash = set(cls.ablations) & set(inner.ablations)
        if clash:
            raise ValueError(f"{cls.name}: ablations {sorted(clash)} are also ablations of {inner.name}")
        config = dataclasses.make_dataclass(
            f"{title}Config",
            [(f.name, f.type, _copy_field(f)) for f in dataclasses.fields(cls.Config)],
            bases=(inner.Config,),
        )
        sources = {r: r for r in inner.recipes} | {
            r: source for r, source in cls.inner_recipes.items() if source in inner.recipes
        }
        attrs: dict[str, Any] = {
            "__module__": cls.__module__,
            "__qualname__": title,
            "__doc__": f"{_about(cls.__doc__)} on {inner.name}: the plug-in {cls.name} wrapping the method "
            f"{inner.name}.",
            "name": name,
            "inner_method": inner,
            "plugin_names": (*getattr(inner, "plugin_names", ()), cls.name),
            "plugin_settings": {**getattr(inner, "plugin_settings", {}), cls.name: frozenset(own)},
            "Config": config,
            "_recipe_sources": sources,
            "recipes": {r: {p: dict(t) for p, t in inner.recipes[source].items()} for r, source in sources.items()},
            "provenance": {
                r: prov for r, source in sources.items() if (prov := cls.composed_provenance(inner, source)) is not None
            },
            "ablations": {**inner.ablations, **cls.ablations},
            "report_order": inner.report_order + cls.report_offset,
            "color": cls.colors.get(inner.name) or _lighter(inner.color),
            "in_default_set": False,
            "needs_labels": inner.needs_labels or cls.needs_labels,
            "reference_fp32": (*inner.reference_fp32, *cls.reference_fp32),
        }
        for method, key in FEATURE_METHODS.items():
            if hasattr(inner, method):
                attrs[method] = _kept(getattr(inner, method), key)
        composed = type(title, (cls, inner), attrs)
        config.__module__ = cls.__module__
        module = sys.modules[cls.__module__]
        setattr(module, title, composed)  # so that pickle (executors' worker processes) finds both by name
        setattr(module, config.__name__, config)
        return composed

    @classmethod
    def composed_provenance(cls, inner: type[Method], inner_recipe: str) -> Provenance | None:
        """Where the composition's recipe built on the inner's `inner_recipe` comes from (default: the inner's)."""
        return inner.provenance.get(inner_recipe)

    # --- recipes of a composition: the inner's, through `inner_recipes` ---------------------------------------------
    @classmethod
    def recipe(cls, recipe: str, train_protocol: str, shots: int, dataset: str) -> dict[str, Any]:
        if recipe not in cls.recipes:
            raise UserError(f"method '{cls.name}' has no recipe '{recipe}'.{suggest(recipe, cls.recipes)}")
        if train_protocol not in cls.recipes[recipe]:
            raise UserError(
                f"method '{cls.name}' has no '{recipe}' recipe for protocol '{train_protocol}' "
                f"(it has: {', '.join(cls.recipes[recipe])})"
            )
        return cls.inner_method.recipe(cls._recipe_sources[recipe], train_protocol, shots, dataset)

    # --- the features behind the inner's logits ---------------------------------------------------------------------
    @contextmanager
    def features_seen(self) -> Iterator[dict[str, torch.Tensor]]:
        """While in the block, the values the inner's feature methods return are kept in the yielded dict."""
        seen: dict[str, torch.Tensor] = {}
        previous = self.__dict__.get("_features_seen")
        object.__setattr__(self, "_features_seen", seen)
        try:
            yield seen
        finally:
            object.__setattr__(self, "_features_seen", previous)

    def inner_pass(
        self, call: Callable[..., Any], images: torch.Tensor | None, keys: Any, image_features: torch.Tensor | None
    ) -> tuple[Any, torch.Tensor, torch.Tensor | None]:
        """Run the inner's `call` (its forward or predict) and return (its result, the image features (B, E) it used,
        unnormalised, and its text features (C, E) or (B, C, E), or None where it computed none)."""
        if type(self).frozen_image_path:  # computed once here and handed in: the inner does not encode them again
            image_features = frozen_image_features(self.backbone, images, image_features)  # (B, E)
        with self.features_seen() as seen:
            result = call(images, keys, image_features)
        image_f = seen.get("image", image_features)
        if image_f is None:
            raise RuntimeError(f"{self.name}: the inner method computed no image features the plug-in can read")
        return result, image_f, seen.get("text")


def _kept(method: Callable[..., torch.Tensor], key: str) -> Callable[..., torch.Tensor]:
    """The inner's feature method, its value kept under `key` while `features_seen` is open."""

    def kept(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = method(self, *args, **kwargs)
        seen = self.__dict__.get("_features_seen")
        if seen is not None:
            seen[key] = out
        return out

    kept.__name__ = method.__name__
    kept.__doc__ = method.__doc__
    return kept


def _copy_field(f: dataclasses.Field) -> dataclasses.Field:
    """A fresh field with `f`'s default and metadata (a dataclass field cannot belong to two classes)."""
    if f.default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=f.default_factory, metadata=f.metadata)
    return dataclasses.field(default=f.default, metadata=f.metadata)


def _about(doc: str | None) -> str:
    return " ".join((doc or "").split()).split(": ")[0].split(". ")[0].rstrip(".")


def _lighter(color: str | None, share: float = 0.5) -> str | None:
    """`color` ("#rrggbb") mixed with white by `share`; None stays None (the report picks one from the name)."""
    if not color or len(color) != 7 or not color.startswith("#"):
        return None
    rgb = [int(color[i : i + 2], 16) for i in (1, 3, 5)]
    return "#" + "".join(f"{round(c + (255 - c) * share):02x}" for c in rgb)


__all__ = ["FEATURE_METHODS", "MethodPlugin"]
