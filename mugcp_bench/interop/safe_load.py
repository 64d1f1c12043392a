"""Reading a reference trainer's checkpoint without unpickling arbitrary objects (/work/notes/checkpoints README §6).

A Dassl checkpoint (KaiyangZhou/Dassl.pytorch@c61a1b5 ``dassl/utils/torchtools.py`` save_checkpoint) is a
``torch.save``d dict whose ``scheduler`` entry pickles a live ``CosineAnnealingLR`` holding the optimizer object
(``SGD`` / ``Adam``) with every ``Parameter`` of the model and a ``collections.defaultdict`` state. torch >= 2.6's
default ``weights_only=True`` refuses the scheduler class, and allow-listing does not help: the weights-only
unpickler refuses ``SETITEMS`` into a ``defaultdict`` (torch/_weights_only_unpickler.py), so no real reference file
loads that way. We load with ``weights_only=False`` and our own ``pickle_module`` whose unpickler resolves an
allow-list of globals only: the tensor-rebuild functions and plain containers as themselves, the optimizer and
scheduler classes as inert stand-ins (`Opaque`: never instantiated, their state kept as data). Anything else is a
`UserError` naming the global. torch keeps its own zip / storage handling, so ``map_location="cpu"`` still moves
tensors saved on ``cuda:0`` (every real training run) to the CPU.
"""

from __future__ import annotations

import collections
import os
import pickle
import types
from pathlib import Path
from typing import Any

import torch

from mugcp_bench.errors import UserError


class Opaque:
    """A pickled optimizer or scheduler object we refuse to instantiate: its class name and pickled state as data."""

    qualname = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.state = args, None

    def __setstate__(self, state: Any) -> None:  # pickle's BUILD: keep the state, run no code of the real class
        self.state = state

    def __repr__(self) -> str:
        return f"<{self.qualname} (not instantiated)>"


# Dassl's optimizers and LR schedulers (dassl/optim/optimizer.py, lr_scheduler.py): stand-ins only.
_OPAQUE: dict[str, set[str]] = {
    "torch.optim.lr_scheduler": {"CosineAnnealingLR", "StepLR", "MultiStepLR", "LambdaLR"},
    "torch.optim.sgd": {"SGD"},
    "torch.optim.adam": {"Adam"},
    "torch.optim.adamw": {"AdamW"},
    "torch.optim.rmsprop": {"RMSprop"},
    "dassl.optim.radam": {"RAdam", "PlainRAdam", "AdamW"},
}
_REAL: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("collections", "defaultdict"): collections.defaultdict,  # the optimizer's state: REDUCE(defaultdict, (dict,))
    ("builtins", "dict"): dict,
    ("__builtin__", "dict"): dict,  # protocol 2 written by Python 3 names builtins "__builtin__"
    ("builtins", "set"): set,
    ("__builtin__", "set"): set,
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch", "Size"): torch.Size,
}
for _name in ("_rebuild_parameter_with_state", "_rebuild_tensor_v3"):
    if hasattr(torch._utils, _name):
        _REAL[("torch._utils", _name)] = getattr(torch._utils, _name)
for _dtype in ("float16", "float32", "float64", "bfloat16", "int64", "int32", "uint8", "bool"):
    _REAL[("torch", _dtype)] = getattr(torch, _dtype)
_STANDINS: dict[tuple[str, str], type] = {}


class RefusedGlobal(pickle.UnpicklingError):
    """The file names a Python global outside the allow-list."""

    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"refusing global {module}.{name}")
        self.global_name = f"{module}.{name}"


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that creates no object outside the allow-list above."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _REAL:
            return _REAL[(module, name)]
        if name in _OPAQUE.get(module, ()):
            key = (module, name)
            if key not in _STANDINS:
                _STANDINS[key] = type(name, (Opaque,), {"qualname": f"{module}.{name}"})
            return _STANDINS[key]
        if module == "torch" and name.endswith("Storage"):  # reached on torch < 2 only (2.x resolves storages itself)
            return getattr(torch, name)
        raise RefusedGlobal(module, name)


restricted_pickle = types.ModuleType("mugcp_restricted_pickle")
restricted_pickle.Unpickler = RestrictedUnpickler  # type: ignore[attr-defined]
restricted_pickle.load = lambda f, **kw: RestrictedUnpickler(f, **kw).load()  # type: ignore[attr-defined]
restricted_pickle.UnpicklingError = pickle.UnpicklingError  # type: ignore[attr-defined]
restricted_pickle.__name__ = "pickle"  # torch checks the module's name for its weights_only messages only


def load_checkpoint_file(path: str | os.PathLike[str]) -> Any:
    """The object a reference checkpoint (or our own export of one) holds, tensors on the CPU; UserError (one line)
    when it cannot be read or names a global outside the allow-list."""
    path = Path(path)
    if os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "").lower() in ("1", "true", "yes", "y", "on"):
        raise UserError(
            "TORCH_FORCE_WEIGHTS_ONLY_LOAD is set, which makes torch refuse every reference checkpoint (they pickle "
            "their scheduler); unset it for this command (mugcp-bench loads them with a restricted unpickler)"
        )
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; pass the path of a model.pth.tar-N file or its run folder")
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=restricted_pickle)
    except RefusedGlobal as e:
        raise UserError(
            f"{path} pickles {e.global_name}, which is not part of a reference trainer's checkpoint (only the "
            "optimizer and LR scheduler are); refusing to unpickle it"
        ) from None
    except Exception as e:  # noqa: BLE001 - truncated, not a torch file, ...: one line
        first = str(e).splitlines()[0] if str(e) else ""
        raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}: {first})") from None


__all__ = ["Opaque", "RestrictedUnpickler", "load_checkpoint_file", "restricted_pickle"]
