"""A small name -> object registry with did-you-mean errors and wildcard listing (in the spirit of timm's)."""

from __future__ import annotations

import ast
import difflib
import fnmatch
import functools
import importlib
import importlib.util
import logging
import pkgutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
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


@dataclass(frozen=True)
class Declared:
    """A plugin as its source declares it (read without importing the module, so naming, listing and checking names
    never pays for torch): its name and aliases, its class docstring, and the literal keys of its `recipes` and
    `ablations` (None where they are not literals in the class body)."""

    name: str
    aliases: tuple[str, ...]
    module: str
    doc: str
    recipes: tuple[str, ...] | None
    ablations: tuple[str, ...] | None
    wraps: tuple[str, ...] | None = None  # a method plug-in's `wraps`: the methods it composes with


def _literal_strings(node: ast.ClassDef, attr: str) -> tuple[str, ...] | None:
    """The class body's `attr = ("a", "b")` as a tuple of strings (None where it is not such a literal)."""
    for stmt in node.body:
        if isinstance(stmt, (ast.Assign, ast.AnnAssign)):
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            if any(isinstance(x, ast.Name) and x.id == attr for x in targets):
                if isinstance(stmt.value, (ast.Tuple, ast.List)) and all(
                    isinstance(e, ast.Constant) and isinstance(e.value, str) for e in stmt.value.elts
                ):
                    return tuple(e.value for e in stmt.value.elts)
                return None
    return None


def _literal_keys(node: ast.ClassDef, attr: str) -> tuple[str, ...] | None:
    for stmt in node.body:
        if isinstance(stmt, (ast.Assign, ast.AnnAssign)):
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            if any(isinstance(x, ast.Name) and x.id == attr for x in targets) and isinstance(stmt.value, ast.Dict):
                keys = [k.value for k in stmt.value.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)]
                return tuple(keys) if len(keys) == len(stmt.value.keys) else None
    return None


def declared_in(path: Path, module: str, decorator: str) -> list[Declared]:
    """Every class of the file decorated `@<decorator>.register("name", aliases=(...))`, read with `ast`."""
    out = []
    tree = ast.parse(path.read_text(encoding="utf-8"))
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    for node in classes.values():
        for dec in node.decorator_list:
            if not (isinstance(dec, ast.Call) and isinstance(dec.func, ast.Attribute) and dec.func.attr == "register"):
                continue
            if not (isinstance(dec.func.value, ast.Name) and dec.func.value.id == decorator and dec.args):
                continue
            name = dec.args[0].value if isinstance(dec.args[0], ast.Constant) else None
            aliases: tuple[str, ...] = ()
            for kw in dec.keywords:
                if kw.arg == "aliases" and isinstance(kw.value, (ast.Tuple, ast.List)):
                    aliases = tuple(e.value for e in kw.value.elts if isinstance(e, ast.Constant))
            if not isinstance(name, str):
                continue
            base = next((classes[b.id] for b in node.bases if isinstance(b, ast.Name) and b.id in classes), None)
            recipes = _literal_keys(node, "recipes")
            ablations = _literal_keys(node, "ablations")
            if base is not None:  # a preset subclass inherits what it does not set
                recipes = recipes if recipes is not None else _literal_keys(base, "recipes")
                ablations = ablations if ablations is not None else _literal_keys(base, "ablations")
            doc = ast.get_docstring(node) or (ast.get_docstring(base) if base is not None else "") or ""
            out.append(Declared(name, aliases, module, doc, recipes, ablations, _literal_strings(node, "wraps")))
    return out


class Registry(Generic[T]):
    """Maps lowercase names to objects. Built-ins are imported lazily on first lookup so it is never empty."""

    def __init__(self, kind: str, builtin_modules: Iterable[str] = (), decorator: str = "") -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._aliases: dict[str, str] = {}
        self._builtin_modules = list(builtin_modules)
        self._loaded = False
        self._decorator = decorator  # the registry's name in `@NAME.register(...)`: enables `declared()`

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

    @functools.cache  # noqa: B019 - the registries live as long as the process
    def declared(self) -> dict[str, Declared]:
        """The built-in plugins as their source files declare them (no import), by name; plugins registered since
        (out-of-tree ones, tests) are not included: see `known_names`."""
        out: dict[str, Declared] = {}
        for package in self._builtin_modules if self._decorator else ():
            spec = importlib.util.find_spec(package)
            for folder in spec.submodule_search_locations or ():
                for path in sorted(Path(folder).glob("*.py")):
                    if not path.name.startswith("_"):
                        for d in declared_in(path, f"{package}.{path.stem}", self._decorator):
                            out[d.name] = d
        return out

    def registered(self) -> dict[str, T]:
        """What is registered in this process right now (without importing the built-ins)."""
        return dict(self._items)

    def known_names(self) -> dict[str, str]:
        """Every name and alias -> its registered name: the declared built-ins and whatever is registered now,
        without importing the built-ins (enough to check a name a user typed)."""
        names = {n: n for n in self._items} | dict(self._aliases)
        for d in self.declared().values():
            names.setdefault(d.name, d.name)
            for a in d.aliases:
                names.setdefault(a, d.name)
        return names

    def check_name(self, name: str) -> str:
        """The registered name for `name`, checked against `known_names` (no import); UserError with a did-you-mean."""
        names = self.known_names() if self._decorator else None
        if names is None:
            return self.canonical(name)
        key = name.strip().lower()
        if key in names:
            return names[key]
        raise UserError(
            f"unknown {self.kind} '{name}'.{suggest(key, names)} Run 'mugcp-bench list {self.kind}s' to see all."
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


# --- method plug-ins and their compositions ----------------------------------------------------------------------
COMPOSE = "+"  # joins a method and the plug-ins wrapping it: "coop+dept" is coop wrapped by the plug-in dept


def _normal(name: str) -> str:
    """A method name as the registries key it: lowercase, no blanks around '+' ("CoOp + DePT" -> "coop+dept")."""
    return COMPOSE.join(part.strip() for part in name.strip().lower().split(COMPOSE))


def _about(doc: str) -> str:
    """The first phrase of a docstring (what `list` prints)."""
    return " ".join(doc.split()).split(": ")[0].split(". ")[0].rstrip(".")


def not_wrapped(plugin: str, wraps: Iterable[str], inner: str) -> str:
    """The one line refusing a composition the plug-in does not make."""
    return (
        f"the plug-in {plugin} wraps {', '.join(wraps) or 'no method'}; '{inner}' is not one of them "
        f"(e.g. --methods {next(iter(wraps), 'coop')}{COMPOSE}{plugin})"
    )


class MethodRegistry(Registry[T]):
    """METHODS: the methods, and their compositions with plug-ins (`PLUGINS`). "coop+dept" names the class the plug-in
    dept builds around coop (`MethodPlugin.compose`): registered when the plug-in is (for every method of its `wraps`
    registered by then) or when its name is first asked for; `declared()` lists the built-in compositions without
    importing anything."""

    def __init__(self, kind: str, builtin_modules: Iterable[str] = (), decorator: str = "") -> None:
        super().__init__(kind, builtin_modules, decorator)
        self.plugins: PluginRegistry[Any] | None = None  # set once PLUGINS exists

    def canonical(self, name: str) -> str:
        key = _normal(name)
        if COMPOSE not in key or self.plugins is None:
            return super().canonical(name)
        self._load_builtins()
        if key in self._items:
            return key
        inner, *plugins = key.split(COMPOSE)
        if not inner or not all(plugins):
            raise UserError(f"method '{name}': name a method and its plug-ins joined by '{COMPOSE}', e.g. coop+dept")
        current = super().canonical(inner)
        for part in plugins:
            plugin = self.plugins.canonical(part)
            composed = f"{current}{COMPOSE}{plugin}"
            if composed not in self._items:  # the plug-in refuses a method it does not wrap (UserError)
                self.add(composed, self.plugins.get(plugin).compose(self._items[current]))
            current = composed
        return current

    def check_name(self, name: str) -> str:
        key = _normal(name)
        if COMPOSE not in key or self.plugins is None:
            return super().check_name(name)
        names = self.known_names()
        if key in names:
            return names[key]
        inner, *plugins = key.split(COMPOSE)
        if not inner or not all(plugins):
            raise UserError(f"method '{name}': name a method and its plug-ins joined by '{COMPOSE}', e.g. coop+dept")
        current = super().check_name(inner)
        known_plugins = self.plugins.known_names()
        for part in plugins:
            if part not in known_plugins:
                raise self.plugins.unknown(part)
            plugin = known_plugins[part]
            composed = f"{current}{COMPOSE}{plugin}"
            declared = self.plugins.declared().get(plugin)
            if composed not in names and declared is not None and declared.wraps is not None:
                raise UserError(not_wrapped(plugin, declared.wraps, current))
            current = composed  # an out-of-tree plug-in: checked when the composition is built
        return current

    @functools.cache  # noqa: B019 - the registries live as long as the process
    def declared(self) -> dict[str, Declared]:
        """The built-in methods and their compositions with the built-in plug-ins, as the files declare them."""
        out = dict(super().declared())
        for plugin in self.plugins.declared().values() if self.plugins is not None else ():
            for inner in plugin.wraps or ():
                d = out.get(inner)
                if d is None:
                    continue
                name = f"{inner}{COMPOSE}{plugin.name}"
                ablations = None if d.ablations is None or plugin.ablations is None else d.ablations + plugin.ablations
                doc = f"{_about(plugin.doc)} on {inner}: the plug-in {plugin.name} wrapping the method {inner}."
                out[name] = Declared(name, (), plugin.module, doc, d.recipes, ablations)
        return out


class PluginRegistry(Registry[T]):
    """PLUGINS: method plug-ins (`mugcp_bench.methods.plugin.MethodPlugin`), each composing with the methods of its
    `wraps` into METHODS entries "<method>+<plug-in>"."""

    def __init__(
        self, kind: str, methods: MethodRegistry[Any], builtin_modules: Iterable[str] = (), decorator: str = ""
    ):
        super().__init__(kind, builtin_modules, decorator)
        self.methods = methods
        methods.plugins = self

    def add(self, name: str, obj: T, *, aliases: Iterable[str] = ()) -> None:
        """Register the plug-in and its compositions with the methods of its `wraps` registered by now."""
        super().add(name, obj, aliases=aliases)
        for inner in getattr(obj, "wraps", ()):
            if inner in self.methods._items:
                self.methods.add(f"{inner}{COMPOSE}{name}", obj.compose(self.methods._items[inner]))

    def unregister(self, name: str) -> T:
        """Remove the plug-in and every composition with it."""
        obj = super().unregister(name)
        for composed in [n for n in self.methods._items if name in n.split(COMPOSE)[1:]]:
            self.methods.unregister(composed)
        return obj

    def unknown(self, name: str) -> UserError:
        names = sorted(self.known_names())
        return UserError(
            f"unknown plug-in '{name}'.{suggest(name, names)} Plug-ins: {', '.join(names) or 'none'} "
            f"(one wraps a method: --methods coop{COMPOSE}dept)"
        )

    def canonical(self, name: str) -> str:
        key = name.strip().lower()
        self._load_builtins()
        if key in self._items:
            return key
        if key in self._aliases:
            return self._aliases[key]
        raise self.unknown(name)

    def check_name(self, name: str) -> str:
        names = self.known_names()
        key = name.strip().lower()
        if key in names:
            return names[key]
        raise self.unknown(name)


# Built-ins are listed by each package's __init__ (methods/__init__.py, datasets/__init__.py, ...).
METHODS: MethodRegistry[Any] = MethodRegistry("method", ["mugcp_bench.methods"], decorator="METHODS")
# Method plug-ins live with the methods (methods/dept.py): `@PLUGINS.register("dept")`.
PLUGINS: PluginRegistry[Any] = PluginRegistry("plug-in", METHODS, ["mugcp_bench.methods"], decorator="PLUGINS")
# The toy world registers its own datasets (mugcp_bench/toy/datasets.py): the toy wing reads the datasets wing.
DATASETS: Registry[Any] = Registry("dataset", ["mugcp_bench.datasets", "mugcp_bench.toy.datasets"])
DESCRIBERS: Registry[Any] = Registry("describer", ["mugcp_bench.describers"])
BACKBONES: Registry[Any] = Registry("backbone", ["mugcp_bench.model.backbone"])
EXECUTORS: Registry[Any] = Registry("executor", ["mugcp_bench.runs.executors"])
