"""The `mugcp-bench` command line. Commands live in `mugcp_bench.commands.*` and are imported on first use."""

from __future__ import annotations

import importlib
import logging
import os
import sys

import click

from mugcp_bench import __version__
from mugcp_bench.errors import RunFailed, UserError

# command name -> "module:attribute"; imported lazily so `--help` and `list` stay fast.
COMMANDS = {
    "run": "mugcp_bench.commands.run:run",
    "ablate": "mugcp_bench.commands.run:ablate",
    "report": "mugcp_bench.commands.report:report",
    "check-data": "mugcp_bench.commands.check_data:check_data",
    "describe": "mugcp_bench.commands.describe:describe",
    "toy": "mugcp_bench.commands.toy:toy",
    "list": "mugcp_bench.commands.listing:list_cmd",
    "demo": "mugcp_bench.commands.demo:demo",
    "runs": "mugcp_bench.commands.runs_cmd:runs_cmd",
    "import": "mugcp_bench.commands.import_cmd:import_cmd",
    "export": "mugcp_bench.commands.export:export",
    "predict": "mugcp_bench.commands.predict:predict",
}
HELP = {
    "run": "Train and evaluate methods under a protocol; skips what is already done.",
    "ablate": "Run a method with components switched off (variant no-X) next to the full method.",
    "report": "Tables (terminal, Markdown, LaTeX, CSV) and plots from a results directory.",
    "check-data": "Check dataset folders and split files before training.",
    "describe": "Fill MuGCP's per-image description cache.",
    "toy": "The toy world: procedural datasets and a small CLIP pretrained on them.",
    "list": "List methods, datasets, backbones or protocols.",
    "demo": "Toy-world base-to-novel for every method, then the report (what `make demo` runs).",
    "runs": "List the runs of a results directory: ids, status, settings, accuracies, failure reasons.",
    "import": "Record and evaluate checkpoints written by the reference code (a file or an output tree).",
    "export": "A run as its reference code's checkpoint, or as one self-contained .mugcp file.",
    "predict": "Classify images into any class names with a trained run or a .mugcp file.",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name].split(":")
        command = getattr(importlib.import_module(module), attr)
        return with_verbosity(command)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(n, HELP[n]) for n in COMMANDS])

    def resolve_command(self, ctx, args):
        name = args[0] if args else ""
        if name and name not in COMMANDS and not name.startswith("-"):
            from mugcp_bench.registry import suggest

            raise UserError(f"unknown command '{name}'.{suggest(name, COMMANDS)} Run 'mugcp-bench --help'.")
        return super().resolve_command(ctx, args)


def _verbosity(ctx: click.Context, param: click.Parameter, value: int | bool) -> None:
    if value:
        setup_logging(-1 if param.name == "quiet" else value)


def with_verbosity(command: click.Command) -> click.Command:
    """-v / -q after the command too (`mugcp-bench run -v ...`), as before it."""
    if not any(p.name == "verbose" for p in command.params):
        command.params.append(
            click.Option(["-v", "--verbose"], count=True, expose_value=False, callback=_verbosity, is_eager=True,
                         help="More logging: -v progress details, -vv debug.")
        )  # fmt: skip
        command.params.append(
            click.Option(["-q", "--quiet"], is_flag=True, expose_value=False, callback=_verbosity, is_eager=True,
                         help="No progress display: warnings and the final summary only.")
        )  # fmt: skip
    return command


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time of each message (as rich's console does), not to the stream
    that was current when logging was set up (a test's captured stream, closed since)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(verbose: int) -> None:
    from rich.console import Console
    from rich.logging import RichHandler

    from mugcp_bench.commands import progress

    progress.QUIET = verbose < 0  # -q: no progress display, only warnings and the final summary
    levels = {-1: logging.WARNING, 0: logging.WARNING, 1: logging.INFO}  # -q, default, -v; -vv and more: debug
    level = levels.get(max(verbose, -1), logging.DEBUG)
    if sys.stderr.isatty():
        handler: logging.Handler = RichHandler(
            console=Console(stderr=True), show_path=False, show_time=False, markup=False
        )
    else:  # a log file or a pipe: one line per message, never wrapped at a guessed width (grep finds it whole)
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)-8s %(message)s"))
    # Warnings logged straight on the root logger come from libraries (open_clip warns "no pretrained weights" on
    # every random init); hide those, not the root level, which would silence every warning of ours too.
    handler.addFilter(lambda record: record.name != "root" or record.levelno >= logging.ERROR)
    handler.setLevel(level)
    logging.basicConfig(level=level, handlers=[handler], force=True)
    for noisy in ("PIL", "matplotlib", "urllib3", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mugcp-bench")
@click.option("-v", "--verbose", count=True, help="More logging: -v progress details, -vv debug.")
@click.option("-q", "--quiet", is_flag=True, help="No progress display: warnings and the final summary only.")
def cli(verbose: int, quiet: bool) -> None:
    """mugcp-bench: prompt learning on CLIP — CoOp, CoCoOp, MaPLe, DCP and MuGCP under one trainer,
    the standard protocols, a results store, tables and plots."""
    setup_logging(-1 if quiet else verbose)
    from mugcp_bench.plugins import load_plugins

    load_plugins()  # $MUGCP_PLUGINS: out-of-tree methods, datasets, describers, training callbacks


def main(argv: list[str] | None = None) -> None:
    """Console entry point: UserError -> one line and exit 2; failed runs -> exit 1."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        # without standalone mode click returns (not raises) the code of a command's `click.exceptions.Exit`
        code = cli.main(args=argv, prog_name="mugcp-bench", standalone_mode=False)
        if isinstance(code, int) and code != 0:
            sys.exit(code)
    except UserError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except RunFailed as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.UsageError as e:  # a bad option or value: one line, as every other error, and where help is
        where = e.ctx.command_path if e.ctx is not None else "mugcp-bench"
        message = " ".join(e.format_message().split())
        click.echo(f"error: {message} (see '{where} --help')", err=True)
        sys.exit(2)
    except click.ClickException as e:
        click.echo(f"error: {' '.join(e.format_message().split())}", err=True)
        sys.exit(e.exit_code)
    except OSError as e:  # a file or folder the user must fix (runs record their own failures): one line, exit 2
        where = f" {e.filename}" if e.filename else ""
        click.echo(f"error: cannot access{where}: {e.strerror or e}; check the path and its permissions", err=True)
        sys.exit(2)
    except (click.exceptions.Abort, KeyboardInterrupt):  # click turns a KeyboardInterrupt into Abort
        click.echo(
            "interrupted: finished runs are recorded, an interrupted one kept its checkpoint; "
            "rerun the same command to resume",
            err=True,
        )
        sys.exit(130)
    sys.exit(0)


if __name__ == "__main__":
    main()
