"""Options that several `cmx` commands share, defined once (MLflow's CLI does the same).

Each is a decorator factory where commands need their own help text; the flag, metavar and
environment variable stay the same everywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from cmx.core.uris import check_tracking_uri

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]

TRACKING_URI_HELP = (
    "MLflow store: http(s)://server, sqlite:///file.db or a database URI [default: sqlite under $CMX_HOME/mlflow]."
)


def tracking_uri_option(help: str = TRACKING_URI_HELP, *, from_env: bool = True) -> Decorator:
    """`--tracking-uri URI`; `from_env=False` where a file's own setting must win over the environment."""
    return click.option(
        "--tracking-uri",
        envvar="MLFLOW_TRACKING_URI" if from_env else None,
        metavar="URI",
        help=help,
        callback=_checked_tracking_uri,
    )


def _checked_tracking_uri(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Parse the URI once, before anything runs: an unsupported or malformed one is one line."""
    return value if value is None else check_tracking_uri(value, "--tracking-uri")


def address_option(help: str) -> Decorator:
    """`--address auto|HOST:PORT` (also `$RAY_ADDRESS`): the Ray cluster to join."""
    return click.option("--address", envvar="RAY_ADDRESS", metavar="auto|HOST:PORT", help=help)


def set_option(help: str, dest: str = "overrides") -> Decorator:
    """`--set KEY=VALUE`, repeatable."""
    return click.option("--set", dest, multiple=True, metavar="KEY=VALUE", help=help)


def json_option(help: str = "Print JSON instead of a table.") -> Decorator:
    """`--json`: machine-readable output (into `as_json`)."""
    return click.option("--json", "as_json", is_flag=True, help=help)
