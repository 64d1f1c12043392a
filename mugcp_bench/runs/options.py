"""What a sweep is asked (`SweepOptions`, the user's words) and what its runs share once resolved (`RunSettings`).

Two bags, no more: the CLI's options become a `SweepOptions` (the Python API takes the same fields), the sweep checks
and resolves them once — device, precision, backbone and weights, data root, caches — into one `RunSettings`, which
travels with every run to whatever process executes it (it is picklable and holds no open resources).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mugcp_bench.errors import UserError
from mugcp_bench.store.claims import DEFAULT_TIMEOUT_S

# Environment a worker takes from the sweep's process (caches, offline switches), whatever started the worker.
FORWARDED_ENV = ("MUGCP_CACHE", "MUGCP_PLUGINS", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "HF_HUB_CACHE")


# --- option values (shared by the CLI's parameter types and the Python API) -------------------------------------
def parse_ints(text: str | int | Sequence[int] | None, what: str) -> tuple[int, ...] | None:
    """'1,2,3' or '1-3' (or an int, or a sequence of ints) -> a tuple of ints; None or '' -> None."""
    if text is None or text == "":
        return None
    if isinstance(text, int):
        return (text,)
    if not isinstance(text, str):
        return tuple(int(x) for x in text)
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part[1:]:
                lo, hi = part.split("-", 1)
                out.extend(range(int(lo), int(hi) + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise UserError(f"--{what} '{text}': expected comma-separated integers, e.g. 1,2,3 or 1-3") from None
    return tuple(out)


def parse_names(value: str | Sequence[str] | None) -> list[str]:
    """'a, b,,c' or ['a', 'b'] -> ['a', 'b', 'c'] (blanks dropped, order kept)."""
    if value is None:
        return []
    parts = value.split(",") if isinstance(value, str) else list(value)
    return [p.strip() for p in parts if p.strip()]


def parse_sets(sets: Sequence[str] | Mapping[str, Any]) -> dict[str, str]:
    """('epochs=2', 'maple.prompt_depth=3') or {'epochs': 2} -> {'epochs': '2', ...} (values are type-checked later;
    a key may be scoped to one method as `method.key`)."""
    if isinstance(sets, Mapping):
        return {str(k).strip(): str(v).strip() for k, v in sets.items()}
    out = {}
    for s in sets:
        if "=" not in s:
            raise UserError(f"--set '{s}': expected key=value, e.g. --set epochs=2 or --set maple.prompt_depth=3")
        k, v = s.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def parse_grid(grid: Sequence[str] | Mapping[str, Any]) -> dict[str, list[str]]:
    """('n_ctx=4,8', 'lr=0.002,0.01') or {'n_ctx': [4, 8]} -> {'n_ctx': ['4', '8'], ...}: the settings a sweep
    crosses (every combination is a run of its own; values are type-checked like --set)."""
    if isinstance(grid, Mapping):
        items = [(str(k), v if isinstance(v, (list, tuple)) else str(v).split(",")) for k, v in grid.items()]
    else:
        items = []
        for g in grid:
            if "=" not in g:
                raise UserError(f"--grid '{g}': expected key=v1,v2,..., e.g. --grid n_ctx=4,8,16")
            k, v = g.split("=", 1)
            items.append((k, v.split(",")))
    out: dict[str, list[str]] = {}
    for k, values in items:
        key, vals = k.strip(), [str(x).strip() for x in values]
        if not key or not vals or any(not x for x in vals):
            raise UserError(f"--grid {k}={','.join(vals)}: give a setting and one or more values, e.g. n_ctx=4,8")
        if key in out:
            raise UserError(f"--grid {key} is given twice; put all its values in one: --grid {key}=v1,v2")
        out[key] = list(dict.fromkeys(vals))
    return out


def check_writable(results_dir: Path) -> None:
    try:
        results_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=results_dir, prefix=".write-test-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise UserError(
            f"results directory {results_dir} is not writable ({e.strerror}); pass --results-dir DIR"
        ) from None


def resolve_device(name: str) -> str:
    """'auto' -> cuda if available else cpu; 'cuda[:N]' only when CUDA is available."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available; use --device cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise UserError(f"--device '{name}': use cpu, cuda, cuda:N or auto")
    return name


def default_methods() -> str:
    """The methods `run` trains without --methods: those whose own class declares `in_default_set` (a preset that
    subclasses one, such as dcp-paper, does not inherit it), in report order."""
    from mugcp_bench.registry import METHODS

    chosen = [(cls.report_order, name) for name, cls in METHODS.items() if vars(cls).get("in_default_set", False)]
    return ",".join(name for _, name in sorted(chosen))


def with_plugins(methods: str | Sequence[str] | None, plugins: str | Sequence[str]) -> str:
    """`--methods` wrapped by `--plugin`s, in order: ("coop,co*", "dept") -> "coop+dept,co*+dept" (a wildcard then
    matches the compositions). Without --methods: the default methods the (first) plug-in wraps. Whether a plug-in
    wraps a method is checked when the names are resolved (one line naming the methods it wraps)."""
    from mugcp_bench.registry import COMPOSE, PLUGINS

    chain = [PLUGINS.canonical(p) for p in parse_names(plugins)]
    if not chain:
        return ",".join(parse_names(methods)) if methods is not None else default_methods()
    suffix = "".join(f"{COMPOSE}{p}" for p in chain)
    if methods is None:
        wraps = getattr(PLUGINS.get(chain[0]), "wraps", ())
        names = [m for m in parse_names(default_methods()) if m in wraps]
        if not names:
            raise UserError(f"--plugin {chain[0]}: it wraps {', '.join(wraps)}, none of the default methods; name them "
                            f"with --methods")  # fmt: skip
    else:
        names = parse_names(methods)
    return ",".join(f"{m}{suffix}" for m in names)


# --- the two bags --------------------------------------------------------------------------------------------------
@dataclass
class SweepOptions:
    """Everything a sweep takes; the CLI's options of `run`, with Python values accepted too (lists, dicts)."""

    methods: str | Sequence[str] | None = None  # None: the default set (`default_methods`)
    variants: dict[str, list[str]] | None = None  # ablation: method -> components to drop (variant no-X each)
    protocols: str | Sequence[str] = "base2novel"
    datasets: str | Sequence[str] | None = None
    shots: str | int | Sequence[int] | None = None
    seeds: str | int | Sequence[int] = "1,2,3"
    data_root: str | Path | None = None
    backbone: str | None = None
    pretrained: str | None = None
    recipe: str | None = None
    results_dir: str | Path = "results"
    sets: Sequence[str] | Mapping[str, Any] = ()
    grid: Sequence[str] | Mapping[str, Any] = ()  # settings to cross: every combination is its own run
    dry_run: bool = False
    force: bool = False
    resume: bool = True
    keep_going: bool = False
    device: str = "auto"
    precision: str = "auto"
    workers: int | None = None
    no_describe: bool = False
    tensorboard: bool = False  # TensorBoard event files per run (needs the tensorboard package)
    quick_toy: bool = False
    executor: str = "local"  # a registered executor (mugcp_bench.runs.executors): local | gpus | ray
    gpus: str | None = None  # gpus: "0,1,3" or "cpu:2" (default: every visible CUDA device)
    ray_address: str | None = None  # ray: "auto" or HOST:PORT (default: a local Ray instance)
    ray_gpus_per_run: float | None = None  # ray: GPUs per run task (default 1 on CUDA, 0 on the CPU)
    ray_cpus_per_run: float = 1.0
    claim_timeout: float = DEFAULT_TIMEOUT_S  # seconds without a heartbeat after which a claimed run is taken over


@dataclass(frozen=True)
class RunSettings:
    """What every run of a sweep shares, resolved once by the sweep (or built directly by a test or a script).

    `precision` is the resolved training precision (fp32, bf16, fp16 or reference-fp16), `device` a torch device
    string; `backbone`/`pretrained` name the weights every run loads (`job.get_backbone`)."""

    results_dir: Path
    data_root: Path
    cache_dir: Path
    backbone: str = "tiny"
    pretrained: str | None = None
    recipe: str = "paper"
    device: str = "cpu"
    precision: str = "fp32"
    overrides: Mapping[str, str] = field(default_factory=dict)
    force: bool = False
    resume: bool = True
    workers: int = 0
    tensorboard: bool = False  # write TensorBoard event files per run (<run dir>/tensorboard/)
    claim_timeout: float = DEFAULT_TIMEOUT_S
    env: Mapping[str, str] = field(default_factory=dict)  # FORWARDED_ENV as the sweep's process had it
    stop_file: str | None = None  # created by the sweep at its first Ctrl-C (interrupts.StopFile): stop every run

    @staticmethod
    def captured_env() -> dict[str, str]:
        return {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}


__all__ = [
    "FORWARDED_ENV",
    "RunSettings",
    "SweepOptions",
    "check_writable",
    "default_methods",
    "parse_grid",
    "parse_ints",
    "parse_names",
    "parse_sets",
    "resolve_device",
    "with_plugins",
]
