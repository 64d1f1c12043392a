"""Method plugins (installed as ``mugcp_bench.methods``). Importing this package imports every module in it, and each
method module registers itself in METHODS: a new method is one new file here (see CONTRIBUTING.md)."""

import importlib
import pkgutil


def import_method_modules() -> list[str]:
    """Import every module of this package (each registers the methods it defines); the names imported."""
    names = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
    for name in names:
        importlib.import_module(f"{__name__}.{name}")
    return names


import_method_modules()
