"""Method plugins (installed as ``mugcp_bench.methods``). Importing this package imports every module in it, and each
method module registers itself in METHODS: a new method is one new file here (see CONTRIBUTING.md)."""

from mugcp_bench.registry import import_submodules

import_submodules(__name__, __path__)
