"""Out-of-tree extensions: ``MUGCP_PLUGINS=pkg.module,other`` imports those modules when the CLI starts.

A plugin module registers what it brings at import time: a method (``@METHODS.register("mine")``), a dataset, a
describer, or a training callback (`mugcp_bench.engine.callbacks.add_callback`).
"""

from __future__ import annotations

import importlib
import logging
import os

from mugcp_bench.errors import UserError

log = logging.getLogger(__name__)

ENV = "MUGCP_PLUGINS"
_loaded: set[str] = set()


def load_plugins(spec: str | None = None) -> list[str]:
    """Import every module named in `spec` (default: $MUGCP_PLUGINS, comma-separated); each once per process.

    A module that cannot be imported is a UserError naming it and the import error."""
    spec = os.environ.get(ENV, "") if spec is None else spec
    names = [n.strip() for n in spec.split(",") if n.strip()]
    for name in names:
        if name in _loaded:
            continue
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - any failure of a plugin's import is the user's to fix
            first = str(e).splitlines()[0] if str(e) else ""
            raise UserError(
                f"{ENV}: cannot import plugin '{name}' ({type(e).__name__}: {first}); "
                f"fix the module or remove it from {ENV}"
            ) from None
        _loaded.add(name)
        log.info("loaded plugin %s", name)
    return names


__all__ = ["ENV", "load_plugins"]
