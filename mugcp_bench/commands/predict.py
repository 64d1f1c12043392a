"""`mugcp-bench predict RUN-OR-FILE --classes ... IMAGES...`: classify images with a trained prompt
(`mugcp_bench.interop.classifier`)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import click


@click.command("predict")
@click.argument("run")
@click.argument("images", nargs=-1, type=click.Path(path_type=Path))
@click.option("--classes", required=True, help='Class names: "cat,dog,sea or lake", or @FILE with one per line.')
@click.option("--top", "top_k", default=1, show_default=True, type=click.IntRange(min=1), help="Classes per image.")
@click.option(
    "--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True, help="Output."
)
@click.option("--results-dir", default="results", show_default=True, type=click.Path(path_type=Path))
@click.option("--pretrained", default=None, help="Backbone weights file, when the run's came from a file.")
@click.option("--template", default=None, help="Zero-shot template for zsclip (default: the run's dataset's).")
@click.option("--descriptions", default=None, help='MuGCP: a JSONL of {"image": path, "text": ...} per image.')
@click.option("--batch-size", default=None, type=click.IntRange(min=1), help="Images per batch (default: the run's).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto.")
def predict(
    run: str, images: tuple[Path, ...], classes: str, top_k: int, fmt: str, results_dir: Path, pretrained: str | None,
    template: str | None, descriptions: str | None, batch_size: int | None, device: str,
) -> None:  # fmt: skip
    """Classify IMAGES into --classes with RUN: a run id (run.json's "id", looked up in --results-dir), a run folder,
    or a .mugcp file from `export --format mugcp`. Any class names work, trained or not."""
    from mugcp_bench.errors import UserError
    from mugcp_bench.interop.classifier import load_classifier, parse_classnames

    names = parse_classnames(classes)
    if not images:
        raise UserError("give at least one image: mugcp-bench predict RUN --classes ... IMAGE [IMAGE ...]")
    clf = load_classifier(
        run,
        results_dir,
        pretrained=pretrained,
        device=device,
        batch_size=batch_size,
        descriptions=descriptions,
    )
    try:
        out = clf.predict([str(p) for p in images], names, template=template)
    finally:
        clf.close()
    rows = out.top(top_k)
    if fmt == "json":
        payload = {
            "run": clf.model.run_id or clf.model.source,
            "method": clf.model.method,
            "classes": out.classnames,
            "predictions": [
                {"image": img, "label": ranked[0][0], "top": [{"label": c, "probability": p} for c, p in ranked]}
                for img, ranked in zip(out.images, rows)
            ],
        }
        click.echo(json.dumps(payload, indent=2))
    elif fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["image", "rank", "label", "probability"])
        for img, ranked in zip(out.images, rows):
            for rank, (c, p) in enumerate(ranked, start=1):
                writer.writerow([img, rank, c, repr(p)])
        click.echo(buf.getvalue(), nl=False)
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"{clf.name}: {len(out.images)} images, {len(out.classnames)} classes")
        table.add_column("image", overflow="fold")
        for r in range(min(top_k, len(out.classnames))):
            table.add_column(f"top {r + 1}" if top_k > 1 else "label")
        for img, ranked in zip(out.images, rows):
            table.add_row(img, *[f"{c} ({100 * p:.1f}%)" for c, p in ranked])
        Console(soft_wrap=True).print(table)
