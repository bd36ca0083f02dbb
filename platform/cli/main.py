"""The `cmx` command: a thin Click front end. Heavy imports live inside the commands."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from importlib.metadata import PackageNotFoundError, version

import click

from cmx.cli.signals import EXIT_CODE, install_sigterm, was_terminated
from cmx.core.errors import CmxError

# name -> "module:attribute"; imported only when the command runs (so `cmx --help` is instant).
COMMANDS: dict[str, str] = {
    "models": "cmx.cli.models:models",
    "data": "cmx.cli.data:data",
    "train": "cmx.cli.train:train",
    "eval": "cmx.cli.train:eval_command",
    "sweep": "cmx.cli.sweep:sweep",
    "runs": "cmx.cli.runs:runs",
    "ui": "cmx.cli.runs:ui",
    "server": "cmx.cli.runs:server",
    "cluster": "cmx.cli.cluster:cluster",
}


def cmx_version() -> str:
    """The installed distribution's version."""
    try:
        return version("cmx")
    except PackageNotFoundError:
        return "0+unknown"


class LazyGroup(click.Group):
    """A group whose sub-commands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(c for c in COMMANDS if _available(c))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None or not _available(cmd_name):
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)


def _available(name: str) -> bool:
    module = COMMANDS[name].split(":")[0]
    return importlib.util.find_spec(module) is not None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(cmx_version(), "-V", "--version", prog_name="cmx")
@click.option("--debug", is_flag=True, envvar="CMX_DEBUG", help="Show full tracebacks on errors.")
def cli(debug: bool) -> None:
    """cmx: ConvMixer experiments at scale (Ray Tune + Optuna sweeps, FFCV data, MLflow tracking)."""


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: one clear line and a non-zero exit for every cmx error."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args or os.environ.get("CMX_DEBUG", "") not in ("", "0", "false")
    install_sigterm()
    try:
        rv = cli.main(args=args, prog_name="cmx", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except (click.Abort, KeyboardInterrupt) as e:
        if was_terminated(e):
            click.echo("terminated", err=True)
            sys.exit(EXIT_CODE)
        click.echo("interrupted", err=True)
        sys.exit(130)
    except CmxError as e:
        if debug:
            raise
        _fail(e.one_line(), e.exit_code)
    except OSError as e:  # a path that is missing, not a folder, unwritable, ...: name it
        if debug:
            raise
        where = f"{e.filename}: " if e.filename else ""
        _fail(f"{where}{e.strerror or e}", 1)
    except Exception as e:  # noqa: BLE001 - the last net: never a traceback without --debug
        if debug:
            raise
        text = " ".join(str(e).split())[:300]
        _fail(f"unexpected {type(e).__name__}: {text} — re-run with --debug for the traceback, and report it", 1)
    sys.exit(rv if isinstance(rv, int) else 0)


def _fail(message: str, code: int) -> None:
    """One red line on stderr (cut to 1,000 characters: inputs may be huge), then exit."""
    message = message.replace("\n", " ")
    if len(message) > 1000:
        message = message[:999] + "…"
    click.secho(f"error: {message}", err=True, fg="red")
    sys.exit(code)


if __name__ == "__main__":
    main()
