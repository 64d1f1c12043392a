"""Which world a command runs in: the toy world (prepared on first use) or real data and weights.

One rule for `run`, `ablate` and `describe`: with no `--data-root`, `--backbone` or $MUGCP_DATA (or with only `toy_*`
datasets named and no `--data-root` / `--backbone`), the command uses the toy world and each method's `toy` recipe.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mugcp_bench.errors import UserError


@dataclass(frozen=True)
class World:
    """The resolved data root, backbone and suite of a command."""

    toy: bool
    data_root: Path
    backbone: str
    pretrained: str
    default_recipe: str  # "toy" | "paper"
    datasets: tuple[str, ...] | None  # the named datasets (registry names), None: the suite's own

    @property
    def group(self) -> str:
        return "toy" if self.toy else "benchmark"

    @property
    def suite(self):
        from mugcp_bench.protocols import REAL_SUITE, toy_suite

        return toy_suite() if self.toy else REAL_SUITE

    def dataset_list(self) -> list[str]:
        """The named datasets, else every dataset of the world's group."""
        from mugcp_bench.datasets.checks import dataset_names

        return list(self.datasets) if self.datasets else dataset_names("all", group=self.group)


def wants_toy(datasets: str | None, data_root: object, backbone: str | None) -> bool:
    """The toy rule above, without preparing anything."""
    if data_root is not None or backbone is not None:
        return False
    if datasets and all(d.strip().lower().startswith("toy_") for d in datasets.split(",") if d.strip()):
        return True
    return os.environ.get("MUGCP_DATA") is None


def resolve_world(
    datasets: str | Sequence[str] | None = None,
    data_root: str | os.PathLike[str] | None = None,
    backbone: str | None = None,
    pretrained: str | None = None,
    quick_toy: bool = False,
    cache_dir: Path | None = None,
) -> World:
    """Resolve (and for the toy world, prepare) the world; unknown dataset names raise `UserError` now."""
    from mugcp_bench.datasets.checks import dataset_names
    from mugcp_bench.paths import default_cache_dir, resolve_data_root

    if datasets is not None and not isinstance(datasets, str):
        datasets = ",".join(datasets)
    sel = ",".join(p.strip() for p in datasets.split(",") if p.strip()) if datasets else None
    if wants_toy(sel, data_root, backbone):
        from mugcp_bench.protocols import toy_suite
        from mugcp_bench.toy.world import ensure_toy_world

        names = tuple(dataset_names(sel, group="toy")) if sel else None
        if names:
            known = toy_suite().all_datasets()
            unknown = [d for d in names if d not in known]
            if unknown:
                raise UserError(f"{', '.join(unknown)} not in the toy world; pass --data-root for real datasets")
        world = ensure_toy_world(cache_dir or default_cache_dir(), quick=quick_toy)
        return World(True, Path(world.data_root), world.backbone_name, str(world.checkpoint), "toy", names)
    names = tuple(dataset_names(sel)) if sel and sel.lower() != "all" else None
    return World(False, resolve_data_root(data_root), backbone or "ViT-B-16", pretrained or "openai", "paper", names)


__all__ = ["World", "resolve_world", "wants_toy"]
