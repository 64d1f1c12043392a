"""`mugcp-bench list methods|datasets|backbones|protocols`."""

from __future__ import annotations

import click
from rich.console import Console
from rich.table import Table

from mugcp_bench.errors import UserError
from mugcp_bench.registry import suggest

WHAT = ("methods", "datasets", "backbones", "protocols", "describers", "executors")


@click.command("list")
@click.argument("what")
@click.option("--all", "show_all", is_flag=True, help="backbones: every open_clip architecture too.")
def list_cmd(what: str, show_all: bool) -> None:
    """List METHODS, DATASETS, BACKBONES, PROTOCOLS or DESCRIBERS."""
    what = what.lower()
    if what not in WHAT:
        raise UserError(f"cannot list '{what}'.{suggest(what, WHAT)} Choose one of: {', '.join(WHAT)}")
    console = Console()
    table = Table(box=None, header_style="bold")
    if what == "methods":
        from mugcp_bench.registry import METHODS

        table.add_column("method")
        table.add_column("recipes")
        table.add_column("ablations (--drop)")
        table.add_column("about")
        # the built-ins as their files declare them (no torch); methods of plugins as registered
        rows = {d.name: (d.aliases, d.recipes, d.ablations, d.doc) for d in METHODS.declared().values()}
        for name, cls in METHODS.registered().items():
            also = tuple(a for a, n in METHODS.aliases().items() if n == name)
            rows.setdefault(name, (also, tuple(cls.recipes), tuple(cls.ablations), cls.__doc__ or ""))
        for name in sorted(rows):
            also, recipes, ablations, doc = rows[name]
            if recipes is None or ablations is None:  # not literals in its file: ask the class itself
                cls = METHODS.get(name)
                recipes, ablations = tuple(cls.recipes), tuple(cls.ablations)
            about = " ".join(doc.split()).split(": ")[0].split(". ")[0].rstrip(".")
            label = name + (f" (alias {', '.join(also)})" if also else "")
            table.add_row(label, ", ".join(recipes), ", ".join(ablations) or "-", about)
    elif what == "datasets":
        from mugcp_bench.registry import DATASETS

        table.add_column("dataset")
        table.add_column("folder")
        table.add_column("group")
        table.add_column("template")
        for name, spec in DATASETS.items():
            table.add_row(name, spec.folder, getattr(spec, "group", ""), spec.template)
    elif what == "backbones":
        import open_clip

        from mugcp_bench.model.backbone import list_backbones
        from mugcp_bench.registry import BACKBONES

        table.add_column("backbone")
        table.add_column("pretrained tags (open_clip)")
        packaged = set(BACKBONES.names())
        names = list_backbones() if show_all else [*BACKBONES.names(), "ViT-B-16", "ViT-B-32", "ViT-L-14"]
        for name in names:
            tags = "packaged config, random init or --pretrained PATH" if name in packaged else ""
            tags = tags or ", ".join(open_clip.list_pretrained_tags_by_model(name)[:6])
            table.add_row(name, tags)
    elif what == "protocols":
        from mugcp_bench.protocols import PROTOCOLS

        table.add_column("protocol")
        table.add_column("trains")
        table.add_column("shots")
        table.add_column("about")
        for p in PROTOCOLS.values():
            table.add_row(p.name, p.train_protocol, ",".join(map(str, p.default_shots)), p.description)
    elif what == "executors":
        from mugcp_bench.registry import EXECUTORS

        table.add_column("executor")
        table.add_column("options")
        table.add_column("about")
        for name, cls in EXECUTORS.items():
            options = ", ".join("--" + o.replace("_", "-") for o in cls.options) or "-"
            table.add_row(name, options, ((cls.__doc__ or "").strip().splitlines() or [""])[0])
    else:
        from mugcp_bench.registry import DESCRIBERS

        table.add_column("describer")
        table.add_column("about")
        for name, obj in DESCRIBERS.items():
            table.add_row(name, ((obj.__doc__ or "").strip().splitlines() or [""])[0])
    console.print(table)
