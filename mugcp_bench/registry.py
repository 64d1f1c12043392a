"""A small name -> object registry with did-you-mean errors and wildcard listing (in the spirit of timm's)."""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import logging
import pkgutil
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

from mugcp_bench.errors import UserError

log = logging.getLogger(__name__)
T = TypeVar("T")


def suggest(name: str, choices: Iterable[str]) -> str:
    """' Did you mean X?' for the closest choice, or an empty string."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else ""


def import_submodules(package: str, path: Iterable[str]) -> list[str]:
    """Import every module of a package (each registers what it defines), so a plugin is one file; the names."""
    names = sorted(m.name for m in pkgutil.iter_modules(list(path)) if not m.name.startswith("_"))
    for name in names:
        importlib.import_module(f"{package}.{name}")
    return names


class Registry(Generic[T]):
    """Maps lowercase names to objects. Built-ins are imported lazily on first lookup so it is never empty."""

    def __init__(self, kind: str, builtin_modules: Iterable[str] = ()) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._aliases: dict[str, str] = {}
        self._builtin_modules = list(builtin_modules)
        self._loaded = False

    def _load_builtins(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for module in self._builtin_modules:
            importlib.import_module(module)

    def register(self, name: str, *, aliases: Iterable[str] = ()) -> Callable[[T], T]:
        """Decorator: register an object under a lowercase name (and optional aliases)."""
        if name != name.lower():
            raise ValueError(f"{self.kind} names are lowercase: {name!r}")

        def deco(obj: T) -> T:
            self.add(name, obj, aliases=aliases)
            return obj

        return deco

    def add(self, name: str, obj: T, *, aliases: Iterable[str] = ()) -> None:
        """Register `obj` under `name`; overwriting an existing name logs a warning."""
        if name in self._items and self._items[name] is not obj:
            log.warning("%s '%s' is registered again; the new definition replaces the old one", self.kind, name)
        self._items[name] = obj
        for alias in aliases:
            self._aliases[alias] = name

    def unregister(self, name: str) -> T:
        """Remove `name` and its aliases and return what was registered (for tests that register their own)."""
        self._load_builtins()
        if name not in self._items:
            raise KeyError(f"{self.kind} '{name}' is not registered")
        for alias in [a for a, target in self._aliases.items() if target == name]:
            del self._aliases[alias]
        return self._items.pop(name)

    def canonical(self, name: str) -> str:
        """The registered name for `name` or an alias of it; UserError with a did-you-mean otherwise."""
        self._load_builtins()
        key = name.strip().lower()
        if key in self._items:
            return key
        if key in self._aliases:
            return self._aliases[key]
        choices = list(self._items) + list(self._aliases)
        raise UserError(
            f"unknown {self.kind} '{name}'.{suggest(key, choices)} Run 'mugcp-bench list {self.kind}s' to see all."
        )

    def get(self, name: str) -> T:
        """The object registered as `name` (or an alias)."""
        return self._items[self.canonical(name)]

    def names(self, pattern: str = "*") -> list[str]:
        """Sorted registered names matching a shell-style wildcard pattern."""
        self._load_builtins()
        return sorted(n for n in self._items if fnmatch.fnmatchcase(n, pattern))

    def aliases(self) -> dict[str, str]:
        self._load_builtins()
        return dict(self._aliases)

    def __contains__(self, name: str) -> bool:
        self._load_builtins()
        return name in self._items or name in self._aliases

    def items(self) -> list[tuple[str, T]]:
        self._load_builtins()
        return sorted(self._items.items())


# Built-ins are listed by each package's __init__ (methods/__init__.py, datasets/__init__.py, ...).
METHODS: Registry[Any] = Registry("method", ["mugcp_bench.methods"])
DATASETS: Registry[Any] = Registry("dataset", ["mugcp_bench.datasets"])
DESCRIBERS: Registry[Any] = Registry("describer", ["mugcp_bench.describers"])
BACKBONES: Registry[Any] = Registry("backbone", ["mugcp_bench.model.backbone"])
EXECUTORS: Registry[Any] = Registry("executor", ["mugcp_bench.runs.executors"])
