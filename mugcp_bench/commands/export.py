"""`mugcp-bench export RUN --format reference|mugcp OUT`: a trained run as its reference code's checkpoint (OUT the
--model-dir to give the reference's train.py) or as one self-contained .mugcp file (`mugcp_bench.interop.export`)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("export")
@click.argument("run")
@click.argument("out", type=click.Path(path_type=Path))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["reference", "mugcp"]),
    required=True,
    help="reference: the reference trainer's model.pth.tar-E under OUT/<learner>/; mugcp: one .mugcp file.",
)
@click.option("--results-dir", default="results", show_default=True, type=click.Path(path_type=Path))
@click.option(
    "--epoch", default=None, type=int, help="reference: the E of model.pth.tar-E (default: the run's epochs)."
)
@click.option(
    "--reference-precision",
    "regime",
    type=click.Choice(["fp16", "fp32"]),
    default="fp16",
    show_default=True,
    help="reference: the PREC regime the tensors are written in (fp16: every stock config; fp32 also for amp).",
)
@click.option(
    "--trainable-only",
    is_flag=True,
    help="reference: only what load_model needs (the trained tensors and class buffers), without the frozen CLIP.",
)
@click.option("--pretrained", default=None, help="Backbone weights file, when the run's came from a file.")
def export(
    run: str, out: Path, fmt: str, results_dir: Path, epoch: int | None, regime: str, trainable_only: bool,
    pretrained: str | None,
) -> None:  # fmt: skip
    """Write RUN (a run id, a run folder or a .mugcp file) to OUT.

    --format reference writes OUT/<learner>/model.pth.tar-E and OUT/<learner>/checkpoint, the files the reference
    code's load_model reads (for train.py --eval-only --model-dir OUT --load-epoch E), and prints the exact command
    and options to run it with. --format mugcp writes one file holding the method, its settings, the class names,
    the backbone's name and weights hash, and the trained state: what `predict` and `load_classifier` read."""
    from mugcp_bench.interop.export import export_mugcp, export_reference
    from mugcp_bench.interop.trained import load_trained

    model = load_trained(run, results_dir)
    if fmt == "mugcp":
        path = export_mugcp(model, out)
        click.echo(f"wrote {path}")
        return
    result = export_reference(model, out, epoch, regime, frozen=not trainable_only, pretrained=pretrained)
    click.echo(f"wrote {result.path} ({result.format.trainer}, {result.n_tensors} tensors, epoch {result.epoch})")
    for note in result.notes:
        click.echo(f"note: {note}", err=True)
    click.echo(f"evaluate it with the reference code ({result.format.repo}), from its repository root:")
    click.echo(result.command)
