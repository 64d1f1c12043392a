"""Method plugins (installed as ``mugcp_bench.methods``). Each built-in module registers itself in METHODS."""

import importlib

BUILTINS = ("zsclip", "coop", "cocoop", "maple", "dcp", "mugcp")

for _name in BUILTINS:
    try:
        importlib.import_module(f"{__name__}.{_name}")
    except ModuleNotFoundError as e:  # a built-in not written yet must not hide the others
        if e.name != f"{__name__}.{_name}":
            raise
