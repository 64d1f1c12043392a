"""`mugcp-bench toy prepare`: render the toy suite and pretrain the toy CLIP (cached), then show zero-shot accuracy."""

from __future__ import annotations

import click


@click.group("toy")
def toy() -> None:
    """The toy world: procedural datasets in CoOp layout and a small CLIP pretrained on them (offline, CPU)."""


@toy.command("prepare")
@click.option("--quick", is_flag=True, help="A tiny world of the same structure (seconds; for tests and CI).")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Pretraining steps (default 450; quick 12).")
@click.option("--force", is_flag=True, help="Render and pretrain again even if this world is cached.")
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Cache root (default: $MUGCP_CACHE, else ~/.cache/mugcp-bench).",
)
def prepare(quick: bool, steps: int | None, force: bool, cache_dir: str | None) -> None:
    """Render the toy suite, pretrain the toy CLIP on it and print its zero-shot accuracy per toy dataset."""
    from rich.console import Console
    from rich.table import Table

    from mugcp_bench.toy.suite import DATASETS
    from mugcp_bench.toy.world import ensure_toy_world

    world = ensure_toy_world(cache_dir=cache_dir, steps=steps, quick=quick, force=force)
    table = Table(title=f"{world.backbone_name} zero-shot accuracy (%), one hand-written template per dataset")
    table.add_column("dataset", no_wrap=True)
    table.add_column("role", no_wrap=True)
    for col in ("classes", "chance", "zero-shot"):
        table.add_column(col, justify="right")
    roles = {world.suite["source"]: "source"}
    roles.update({n: "target" for n in world.suite["cross_dataset_targets"]})
    roles.update({n: "domain shift" for n in world.suite["domain_targets"]})
    for name, acc in world.zero_shot.items():
        n_cls = len(DATASETS[name].classnames)
        table.add_row(name, roles.get(name, ""), str(n_cls), f"{100 / n_cls:.1f}", f"{acc:.1f}")
    out = Console()
    out.print(table)
    pre = world.info.get("pretrain", {})
    if pre:
        out.print(
            f"pretraining: {pre.get('seconds')} s on {pre.get('threads')} threads; final loss {pre.get('final_loss')}"
        )
    out.print(f"data root: {world.data_root}", soft_wrap=True, highlight=False)
    out.print(f"checkpoint: {world.checkpoint}", soft_wrap=True, highlight=False)
