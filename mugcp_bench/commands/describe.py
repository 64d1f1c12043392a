"""`mugcp-bench describe`: fill MuGCP's description cache for the images a protocol will use.

The images: for every dataset, the few-shot train and val subsets of every seed (the subsets `run` samples, via
`mugcp_bench.datasets.prepare`) plus the whole test split (test-only datasets: all their images). Cached images are
skipped, so an interrupted fill resumes where it stopped. With no --data-root / --backbone (and no $MUGCP_DATA) it
describes the toy world, like `run`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from mugcp_bench.errors import UserError

log = logging.getLogger(__name__)


def protocol_items(name: str, root: Path, shots: int | None, seeds: tuple[int, ...], cache_dir: Path) -> list[Any]:
    """The distinct images `run` will show a method for one dataset: few-shot train + val of every seed, and test."""
    from mugcp_bench.datasets.base import prepare

    seen: dict[str, Any] = {}
    for seed in seeds:
        data = prepare(name, root, shots, seed, "all", cache_dir)
        for d in (*data.train, *data.val, *data.test):
            seen.setdefault(d.relpath, d)
    return list(seen.values())


def recipe_describer(method: str, recipe: str, sets: dict[str, str]) -> dict[str, Any]:
    """The describer settings a run of `method` under `recipe` uses (its base-to-novel config with the same --set
    overrides, scoped or not): the one rule `run` and `describe` share."""
    from mugcp_bench.protocols import TrainTarget
    from mugcp_bench.registry import METHODS
    from mugcp_bench.runs.plan import resolve_configs

    cls = METHODS.get(method)
    if "describer" not in {f for f in cls.Config.__dataclass_fields__}:
        raise UserError(f"--method {method}: it uses no image descriptions (MuGCP does)")
    cfg, _ = resolve_configs(cls, recipe, TrainTarget("base2novel", "", "base", 16), {}, sets)
    return {k: getattr(cfg, k) for k in ("describer", "describer_model", "prompt_id", "describer_file", "scene_drop",
                                          "scene_swap", "interrogator_k")}  # fmt: skip


@click.command("describe")
@click.option("--datasets", default=None, help="all or name,name (default: every dataset of the toy suite).")
@click.option(
    "--method",
    default="mugcp",
    show_default=True,
    help="Describe as this method's runs will: its recipe's describer, model and prompt (with --set as for run).",
)
@click.option(
    "--recipe", default=None, help="The recipe whose describer to use (default: paper; toy in the toy world)."
)
@click.option("--set", "sets", multiple=True, help="Settings as for run, e.g. --set describer_model=./qwen2-vl.")
@click.option(
    "--describer",
    "describer_name",
    default=None,
    help="mllm, file, scene, interrogator or auto (scene for toy images, else interrogator) [default: the recipe's].",
)
@click.option(
    "--model", default=None, help="mllm: a transformers hub id or a local model folder [default: the recipe's]."
)
@click.option("--revision", default=None, help="mllm: hub revision (branch, tag or commit).")
@click.option("--prompt-id", default=None, help="Prompt id (mllm: describe_v1 | describe_noname_v1).")
@click.option("--file", "file_", default=None, help='file: a JSONL of {"image": path, "text": ...}.')
@click.option("--data-root", default=None, help="Dataset root (default: $MUGCP_DATA, else the toy world).")
@click.option("--shots", default=16, show_default=True, type=int, help="Shots per class of the train subsets.")
@click.option("--seeds", default="1,2,3", show_default=True, help="Seeds whose few-shot subsets are described.")
@click.option("--backbone", default=None, help="interrogator: the run's open_clip architecture (default ViT-B-16).")
@click.option("--pretrained", default=None, help="interrogator: the run's weights tag or file (default openai).")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--batch-size", default=None, type=int, help="Images per describer call (default: per describer).")
@click.option(
    "--scene-drop", default=None, type=float, help="scene: attribute drop probability [default: the recipe's]."
)
@click.option(
    "--scene-swap", default=None, type=float, help="scene: attribute swap probability [default: the recipe's]."
)
@click.option("--top-k", default=None, type=int, help="interrogator: phrases per description [recipe's].")
@click.option("--show", default=0, show_default=True, type=int, help="Print this many descriptions per dataset.")
@click.option("--quick-toy", is_flag=True, hidden=True, help="Use the quick toy world (tests).")
def describe(
    datasets: str | None,
    method: str,
    recipe: str | None,
    sets: tuple[str, ...],
    describer_name: str | None,
    model: str | None,
    revision: str | None,
    prompt_id: str | None,
    file_: str | None,
    data_root: str | None,
    shots: int,
    seeds: str,
    backbone: str | None,
    pretrained: str | None,
    device: str,
    batch_size: int | None,
    scene_drop: float | None,
    scene_swap: float | None,
    top_k: int | None,
    show: int,
    quick_toy: bool,
) -> None:
    """Describe every image a protocol uses and store the texts in the shared description cache (resumable)."""
    from mugcp_bench import describers
    from mugcp_bench.datasets.checks import require_datasets
    from mugcp_bench.describers import AUTO, DescriberOptions, build_describer
    from mugcp_bench.describers.cache import DescriptionCache
    from mugcp_bench.describers.leakage import leakage_fraction
    from mugcp_bench.paths import default_cache_dir
    from mugcp_bench.registry import DESCRIBERS
    from mugcp_bench.runs.options import parse_ints, parse_sets
    from mugcp_bench.runs.options import resolve_device as _device
    from mugcp_bench.runs.world import resolve_world

    if shots < 1:
        raise UserError(f"--shots {shots}: shots must be positive")
    seed_list = parse_ints(seeds, "seeds") or (1,)
    dev = _device(device)
    cache_dir = default_cache_dir()
    world = resolve_world(datasets or "all", data_root, backbone, pretrained, quick_toy, cache_dir)
    root, backbone_name, weights, names = world.data_root, world.backbone, world.pretrained, world.dataset_list()
    # the describer the runs of --method will use, unless told otherwise
    recipe_cfg = recipe_describer(method.strip().lower(), recipe or world.default_recipe, parse_sets(sets))
    describer_name = describer_name or recipe_cfg["describer"]
    name = AUTO if describer_name.strip().lower() == AUTO else DESCRIBERS.canonical(describer_name)
    model = model or (recipe_cfg["describer_model"] if name == "mllm" else None)
    file_ = file_ or recipe_cfg["describer_file"] or None
    prompt_id = prompt_id or recipe_cfg["prompt_id"] or None
    scene_drop = recipe_cfg["scene_drop"] if scene_drop is None else scene_drop
    scene_swap = recipe_cfg["scene_swap"] if scene_swap is None else scene_swap
    top_k = recipe_cfg["interrogator_k"] if top_k is None else top_k
    require_datasets(root, names)

    loaded: dict[str, Any] = {}

    def get_backbone():
        if "backbone" not in loaded:
            from mugcp_bench.runs.job import get_backbone as shared_backbone

            loaded["backbone"] = shared_backbone(backbone_name, weights, dev)
        return loaded["backbone"]

    def make(n: str):
        if n not in loaded:
            opts = DescriberOptions(
                model=model,
                revision=revision,
                prompt_id=prompt_id if name != AUTO else None,
                file=file_,
                data_root=str(root),
                backbone=get_backbone() if n == "interrogator" else None,
                device=dev,
                batch_size=batch_size,
                scene_drop=scene_drop,
                scene_swap=scene_swap,
                top_k=top_k,
            )
            loaded[n] = build_describer(n, opts)
        return loaded[n]

    items_by_dataset = {n: protocol_items(n, root, shots, seed_list, cache_dir) for n in names}
    cache = DescriptionCache()
    err = Console(stderr=True, highlight=False)
    rows: list[tuple] = []
    samples: list[tuple[str, str, str]] = []
    total = sum(len(items) for items in items_by_dataset.values())
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
    ) as progress:
        task = progress.add_task("describing", total=total)
        for n, items in items_by_dataset.items():
            progress.update(task, description=f"describing {n}")
            done = describers.describe(
                name,
                items,
                make,
                cache,
                progress=lambda k: progress.advance(task, k),
                batch_size=batch_size,
                datasets_hint=n,
            )
            leak = leakage_fraction(done.texts, items)
            rows.append((n, done.describer, len(items), done.n_generated, done.n_cached, leak))
            samples.extend((n, d.relpath, text) for d, text in list(zip(items, done.texts))[:show])
    table = Table(title=f"descriptions in {cache.root}", title_justify="left")
    for col, justify in [("dataset", "left"), ("describer", "left"), ("images", "right"), ("described", "right"),
                         ("cached", "right"), ("leakage", "right")]:  # fmt: skip
        table.add_column(col, justify=justify)
    for n, ids_, n_items, n_gen, n_hit, leak in rows:
        table.add_row(
            n, ids_, f"{n_items:,}", f"{n_gen:,}", f"{n_hit:,}", "-" if leak is None else f"{100 * leak:.1f}%"
        )
    Console(highlight=False, width=200).print(table)
    if samples:
        shown = Table(title="sample descriptions", title_justify="left", show_lines=False)
        for col in ("dataset", "image", "description"):
            shown.add_column(col, overflow="fold")
        for row in samples:
            shown.add_row(*row)
        Console(highlight=False).print(shown)
    if rows:
        err.print(
            f"{sum(r[3] for r in rows):,} images described now, {sum(r[4] for r in rows):,} already cached; "
            "leakage = share of descriptions naming the image's true class",
            markup=False,
        )
