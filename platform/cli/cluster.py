"""`cmx cluster`: check a Ray cluster-launcher file before `ray up`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from cmx.cluster.check import Problem, check_cluster_file


@click.group()
def cluster() -> None:
    """Ray cluster files (cluster/config.yaml for AWS, cluster/local.yaml on-prem)."""


@cluster.command("check")
@click.argument("file", type=click.Path(path_type=Path, exists=True, dir_okay=False), metavar="FILE")
@click.option(
    "--space",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    metavar="FILE",
    help="Sweep file whose resources, storage and tracking to check (default: metadata.cmx.space).",
)
@click.option("--strict", is_flag=True, help="Unfilled <PLACEHOLDERS> are errors (use before `ray up`).")
def check_command(file: Path, space: Path | None, strict: bool) -> None:
    """Validate FILE with Ray's cluster schema plus cmx's rules; one line per problem, exit 2 if any."""

    report = check_cluster_file(file, space)
    problems = list(report.problems)
    if strict and report.placeholders:
        problems.append(Problem("placeholders", f"still to fill: {', '.join(report.placeholders)}",
                                "replace every <PLACEHOLDER> with your value"))  # fmt: skip
    if strict:
        problems.extend(report.security)
    for p in problems:
        click.secho(f"error: {p.line(str(file))}", err=True, fg="red")
    if problems:
        click.echo(f"{file}: {len(problems)} problem(s)", err=True)
        sys.exit(2)
    click.secho(f"ok: {file} passes Ray's cluster schema and cmx's rules", fg="green")
    for line in report.summary:
        click.echo(f"  {line}")
    for p in report.security:
        click.secho(f"  warning: {p.line(str(file))} (an error with --strict)", fg="yellow")
    for note in report.notes:
        click.echo(f"  note: {note}")
    if report.placeholders:
        click.echo(f"  note: placeholders still to fill: {', '.join(report.placeholders)}")
