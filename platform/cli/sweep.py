"""`cmx sweep`: run, resume, inspect and list hyper-parameter sweeps."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import click

from cmx.cli.options import address_option, set_option, tracking_uri_option
from cmx.cli.runs import show_sweep_links
from cmx.cluster.runtime import local_capacity
from cmx.confirm.plan import ConfirmSummary, confirm_settings, read_summary
from cmx.core import metrics as M
from cmx.core.config import check_test_apart
from cmx.core.constraints import violated
from cmx.core.errors import ConfigError
from cmx.core.paths import check_dir_target, safe_child, sweeps_dir
from cmx.core.search_space import preview
from cmx.core.sweep_spec import (
    MAX_GRID_TRIALS,
    ConfirmConfig,
    SweepSpec,
    check_constraints_evaluate,
    constraint_config,
    load_sweep_spec,
    trial_config,
)
from cmx.core.uris import is_uri
from cmx.core.yaml_files import read_text_file
from cmx.sweep.resources import ResourcePlan, concurrency, plan_resources
from cmx.sweep.results import SweepOutcome, SweepStatus, list_sweeps, sweep_status
from cmx.sweep.storage import SOURCE_FILE, SPEC_FILE, STUDY_FILE, experiment_path, experiment_root, read_text


@click.group(invoke_without_command=True)
@click.option(
    "--space",
    "space_path",
    type=click.Path(path_type=Path),
    metavar="FILE",
    help="Search-space YAML (see docs/search-space.md).",
)
@address_option("Join a running Ray cluster instead of starting a local one.")
@click.option("--name", help="Sweep name (default: the file's `name:` or its stem).")
@click.option("--resume", "resume_name", metavar="NAME", help="Continue an interrupted sweep by name.")
@click.option("--fresh", is_flag=True, help="Discard an existing sweep of the same name and start over.")
@click.option("--storage", metavar="PATH", help="Override storage.path (local, NFS or s3://).")
@click.option("--samples", type=int, metavar="N", help="Override search.num_samples.")
@set_option("Override any key of the file, e.g. --set base.loop.epochs=2.")
@click.option("--dry-run", is_flag=True, help="Validate, show the plan and sample configs; start nothing.")
@tracking_uri_option(
    "MLflow store (http://server, sqlite:///file.db) [default: the file's tracking.uri, else "
    "$MLFLOW_TRACKING_URI, else sqlite under $CMX_HOME/mlflow].",
    from_env=False,
)
@click.pass_context
def sweep(
    ctx: click.Context,
    space_path: Path | None,
    address: str | None,
    name: str | None,
    resume_name: str | None,
    fresh: bool,
    storage: str | None,
    samples: int | None,
    overrides: tuple[str, ...],
    dry_run: bool,
    tracking_uri: str | None,
) -> None:
    """Run a Ray Tune + Optuna sweep over the ConvMixer design space."""
    if ctx.invoked_subcommand is not None:
        return

    extra = list(overrides)
    if name:
        extra.append(f"name={name}")
    if storage:
        extra.append(f"storage.path={storage}")
    if samples is not None and samples < 1:
        raise ConfigError(
            f"{space_path or resume_name}: --samples {samples}: search.num_samples must be at least 1",
            "give --samples N with N >= 1",
        )
    if samples is not None:
        extra.append(f"search.num_samples={samples}")
    if tracking_uri:
        extra.append(f"tracking.uri={tracking_uri}")
    if resume_name:
        space_path = _saved_spec_path(resume_name, storage)
        source_text = read_text_file(
            space_path.parent / SOURCE_FILE if (space_path.parent / SOURCE_FILE).exists() else space_path
        )
    elif space_path is None:
        raise click.UsageError("give --space FILE (or --resume NAME); see `cmx sweep --help`")
    else:
        source_text = read_text_file(space_path)
    spec = load_sweep_spec(space_path, tuple(extra))
    _check_test_apart(spec, str(space_path))
    check_constraints_evaluate(spec, str(space_path), _variant_arguments)
    if not is_uri(experiment_root(spec)):
        check_dir_target(experiment_root(spec), "--storage" if storage else "storage.path")
    if dry_run:
        _print_plan(spec, address, _print_warm_start(spec, str(space_path)))
        return
    if not resume_name:
        _check_warm_start(spec, str(space_path), fresh)
    _run(spec, source_text, address, fresh)


def _check_test_apart(spec: SweepSpec, source: str) -> None:
    """Refuse a test split that is the val data (same path or same content) before anything starts."""
    check_test_apart(spec.base.data, f"{source}: base")


def _print_warm_start(spec: SweepSpec, source: str) -> list[Any]:
    """What `search.warm_start` takes, one line, then a note per skipped trial; returns the trials."""
    if not spec.search.warm_start:
        return []
    from cmx.sweep.study import warm_start

    warm = warm_start(spec, source)
    click.echo(warm.summary())
    for note in warm.notes:
        click.echo(note)
    return warm.trials


def _check_warm_start(spec: SweepSpec, source: str, fresh: bool) -> None:
    """The warm-start sweeps exist and have studies, before Ray starts; the summary on stderr.
    Nothing for a sweep that resumes: its study was seeded when it started."""
    path = experiment_path(spec)
    if not spec.search.warm_start or (not fresh and not is_uri(path) and (Path(path) / STUDY_FILE).is_file()):
        return
    from cmx.sweep.study import warm_start

    warm = warm_start(spec, source)
    click.echo(warm.summary(), err=True)
    for note in warm.notes:
        click.echo(note, err=True)


def _variant_arguments(name: str) -> dict[str, Any]:
    """A variant's constructor arguments, for constraints on model fields left at None (imports torch)."""
    from cmx.models.factory import variant_arguments

    return variant_arguments(name)


def _saved_spec_path(name: str, storage: str | None) -> Path:
    """The saved spec of sweep `name`; from s3:// (or any URI) storage it is copied to a temp folder."""

    safe_child(storage or sweeps_dir(), name, "sweep name")
    if storage and is_uri(storage):
        folder = f"{storage.rstrip('/')}/{name}"
        spec_text = read_text(folder, SPEC_FILE)
        if spec_text is None:
            raise ConfigError(f"no sweep named {name!r} under {storage} (no {SPEC_FILE})", "check --storage and NAME")
        local = Path(tempfile.mkdtemp(prefix=f"cmx-{name}-"))
        (local / SPEC_FILE).write_text(spec_text)
        (local / SOURCE_FILE).write_text(read_text(folder, SOURCE_FILE) or spec_text)
        return local / SPEC_FILE
    path = Path(storage or sweeps_dir()) / name / SPEC_FILE
    if not path.exists():
        raise ConfigError(f"no sweep named {name!r} under {path.parent.parent}", "see `cmx sweep list`")
    return path


def _print_plan(spec: SweepSpec, address: str | None, history: list[Any] | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"sweep {spec.name}: search space", title_justify="left")
    table.add_column("key")
    table.add_column("distribution")
    for key, dist in spec.space.items():
        table.add_row(key, dist.model_dump_json(exclude={"type"}).replace('"', "") + f"  ({dist.type})")
    console.print(table)
    per_trial = spec.resources.describe()
    if address is None:
        plan = plan_resources(spec, [local_capacity()])
        fits = f"{concurrency(spec, plan)} at once on this machine"
    else:
        fits = "decided by the cluster's free resources at run time"
    o = spec.objectives()
    s = spec.stopping_objective()
    stops_on = "" if spec.scheduler.metric is None else f", ranks trials on {s.mode} {s.metric}"
    console.print(
        f"[bold]search[/] {spec.search.algorithm} (seed {spec.search.seed}), {_trials(spec)}, "
        f"objective {', '.join(f'{x.mode} {x.metric}' for x in o)}\n"
        f"[bold]scheduler[/] {spec.scheduler.name}, max {spec.max_epochs} epochs, grace {spec.scheduler.grace_period}"
        f"{stops_on}\n"
        f"[bold]per trial[/] {per_trial}; trials: {fits}\n"
        f"[bold]storage[/] {experiment_path(spec)}"
    )

    samples = Table(title="first sampled configs (same seed → same configs)", title_justify="left")
    keys = list(spec.space)
    for k in keys:
        samples.add_column(k)
    samples.add_column("constraints")
    for params in preview(spec, 5, history):
        config = constraint_config(trial_config(spec, params), spec.constraints, _variant_arguments)
        rule = violated(spec.constraints, config)
        samples.add_row(*[str(params.get(k)) for k in keys], f"rejected: {rule}" if rule else "ok")
    console.print(samples)


def _trials(spec: SweepSpec) -> str:
    """`8 trials`, or for a grid `12 trials (a grid of 6 points × 2 samples; at most 100,000)`."""
    if spec.search.algorithm != "grid":
        return f"{spec.search.num_samples} trials"
    return (
        f"{spec.planned_trials():,} trials (a grid of {spec.grid_points():,} points × "
        f"{spec.search.num_samples} samples; at most {MAX_GRID_TRIALS:,})"
    )


def _run(spec: SweepSpec, source_text: str, address: str | None, fresh: bool) -> None:
    from rich.console import Console

    from cmx.sweep.tuner import run_sweep

    console = Console(stderr=True)
    o = spec.objectives()[0]
    callbacks: list[Any] = []

    def on_start(plan: ResourcePlan, resumed: bool) -> None:

        verb = "resuming" if resumed else "starting"
        console.print(
            f"[bold]{verb} sweep {spec.name}[/] ({_trials(spec)}, "
            f"{spec.search.algorithm}, {spec.scheduler.name}) → {concurrency(spec, plan)} at a time"
        )

    from cmx.sweep.progress import RichSweepProgress

    total = spec.planned_trials()
    callbacks.append(
        RichSweepProgress(total=total, metric=o.metric, mode=o.mode, max_epochs=spec.max_epochs, console=console)
    )
    outcome = run_sweep(
        spec, source_text=source_text, address=address, fresh=fresh, callbacks=callbacks, on_start=on_start
    )
    show_outcome(outcome, spec)
    if spec.tracking.enabled:
        show_sweep_links(spec.tracking.uri, spec.name)
    if outcome.interrupted:
        console.print(f"[yellow]interrupted[/]: finished trials are saved. Resume with: cmx sweep --resume {spec.name}")
        sys.exit(130)
    if outcome.all_failed:
        console.print("[red]every trial failed[/]; see the errors above and the trial logs under " + outcome.path)
        sys.exit(1)
    if spec.confirm is not None:
        _confirm(spec, spec.confirm, address, fresh=False)


def _confirm(spec: SweepSpec, settings: ConfirmConfig, address: str | None, *, fresh: bool) -> None:
    """Run (or continue) the confirm stage, show its table; exit 130 when it was cut short."""
    from rich.console import Console

    from cmx.confirm.stage import run_confirm
    from cmx.sweep.progress import RichSweepProgress

    console = Console(stderr=True)
    o = spec.objectives()[0]
    total = settings.top_k * settings.seeds

    def on_start(reruns: int, resumed: bool) -> None:
        verb = "continuing" if resumed else "starting"
        console.print(
            f"[bold]{verb} the confirm stage of sweep {spec.name}[/]: top {settings.top_k} configurations × "
            f"{settings.seeds} new seeds = {reruns} re-runs of {spec.max_epochs} epochs"
        )

    progress = RichSweepProgress(total=total, metric=o.metric, mode=o.mode, max_epochs=spec.max_epochs, console=console)
    summary = run_confirm(spec, settings, address=address, fresh=fresh, callbacks=[progress], on_start=on_start)
    show_confirm(summary)
    if not summary.complete:
        console.print(
            f"[yellow]confirm stage interrupted[/]: finished re-runs are saved. Continue with: cmx sweep confirm {spec.name}"
        )
        sys.exit(130)


def show_confirm(summary: ConfirmSummary) -> None:
    """The confirmed configurations as a table (mean ± std over seeds), then the winner."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    names = list(dict.fromkeys(n for c in summary.configs for n in c.stats))
    table = Table(
        title=f"sweep {summary.sweep}: top {summary.top_k} re-trained with {summary.seeds} new seeds each "
        f"({summary.max_epochs} epochs), mean ± std",
        title_justify="left",
    )
    for col in ("search rank", "trial", f"search {summary.metric}", "re-runs", *names, "params"):
        table.add_column(col, overflow="fold")
    for c in summary.configs:
        style = "bold green" if c.of == summary.winner else None
        table.add_row(
            str(c.rank),
            c.of + (" ★" if c.of == summary.winner else ""),
            f"{c.search_value:.4f}",
            f"{c.completed}/{len(c.seeds)}",
            *[c.stats[n].show() if n in c.stats else "—" for n in names],
            ", ".join(f"{k.split('.')[-1]}={_short(v)}" for k, v in c.params.items()),
            style=style,
        )
    console.print(table)
    win = summary.winner_summary()
    if win is None:
        console.print("confirmed winner: none (no re-run completed)")
        return
    same = (
        "the search's pick too"
        if win.of == summary.search_winner
        else f"the search alone picked {summary.search_winner}"
    )
    console.print(
        f"confirmed winner: trial {win.of}, {summary.metric} {win.stats[summary.metric].show()} over "
        f"{win.stats[summary.metric].n} seeds ({same})"
    )


def _short(value: object) -> str:
    """A parameter for a table cell: floats to 4 significant digits (the full value is in best-config.yaml)."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def show_outcome(outcome: SweepOutcome, spec: SweepSpec) -> None:
    """Top trials as a table, then where the best config and checkpoint are."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    o = spec.objectives()[0]
    table = Table(title=f"sweep {outcome.name}: top trials by {o.metric} ({o.mode})", title_justify="left")
    # Test scores sit in columns of their own: the search saw only the val metric.
    test_cols = (M.TEST_TOP1, M.TEST_TOP5) if spec.base.data.test_path else ()
    for col in ("#", "trial", "status", "epochs", o.metric, *test_cols, "params"):
        table.add_column(col, overflow="fold")
    for i, row in enumerate(outcome.trials[:10], 1):
        best = "—" if row.best is None else f"{row.best:.4f}"
        score = outcome.test.get(row.trial_id)
        tests = [f"{v:.4f}" if score else "—" for v in ((score.top1, score.top5) if score else test_cols)]
        params = ", ".join(f"{k.split('.')[-1]}={_short(v)}" for k, v in row.params.items())
        status = row.status + (f": {row.error}" if row.error else "")
        table.add_row(str(i), row.trial_id, status, str(row.epochs), best, *tests, params)
    console.print(table)
    for score in outcome.test.values():
        console.print(
            f"held-out test ({score.num_samples} images of {spec.base.data.test_path}), trial {score.trial_id}: "
            f"{M.TEST_TOP1} {score.top1:.2f}, {M.TEST_TOP5} {score.top5:.2f}  (the search selected on {o.metric})",
            soft_wrap=True,
        )
    if outcome.pareto:
        front = Table(title="Pareto front", title_justify="left")
        front.add_column("trial")
        for obj in spec.objectives():
            front.add_column(f"{obj.metric} ({obj.mode})")
        for row in outcome.pareto:
            front.add_row(row.trial_id, *[f"{row.metrics.get(x.metric, float('nan')):.4g}" for x in spec.objectives()])
        console.print(front)
    if outcome.best_config_path:
        console.print(f"best config: {outcome.best_config_path}  (run: cmx train --config {outcome.best_config_path})")
    if outcome.best_checkpoint:
        console.print(f"best checkpoint: {outcome.best_checkpoint}")
    console.print(f"sweep state: {outcome.path}")


@sweep.command("confirm")
@click.argument("name")
@click.option("--storage", metavar="PATH", help="Storage root (default $CMX_HOME/sweeps).")
@click.option(
    "--top-k", type=int, metavar="K", help="Configurations to confirm [default: the file's confirm.top_k, else 3]."
)
@click.option("--seeds", type=int, metavar="N", help="New seeds per configuration [default: confirm.seeds, else 3].")
@click.option("--fresh", is_flag=True, help="Discard this sweep's earlier confirm re-runs and start them over.")
@address_option("Join a running Ray cluster instead of starting a local one.")
def confirm_command(
    name: str, storage: str | None, top_k: int | None, seeds: int | None, fresh: bool, address: str | None
) -> None:
    """Re-train a finished sweep's top-k configurations with new seeds; the winner by the mean.

    Running it again continues the same re-runs (finished ones are not redone).
    """
    if storage and is_uri(storage):
        raise ConfigError(
            f"cmx sweep confirm reads a local sweep folder, not {storage}",
            "run it where the storage is mounted (e.g. the head node)",
        )
    spec_path = _saved_spec_path(name, storage)
    spec = load_sweep_spec(spec_path, (f"storage.path={storage}",) if storage else ())
    settings = confirm_settings(spec, top_k, seeds)
    s = sweep_status(spec_path.parent)
    ended = sum(n for status, n in s.counts.items() if status.finished)
    # A sweep with a time budget may end before all its trials ran: every trial it started must have ended.
    if ended < len(s.trials) or (not s.complete and spec.search.time_budget is None):
        raise ConfigError(
            f"sweep {name} is not finished ({ended} of {s.num_samples} trials ended): its top trials may still change",
            f"finish it first: cmx sweep --resume {name}",
        )
    _confirm(spec, settings, address, fresh=fresh)


@sweep.command("list")
@click.option("--storage", metavar="PATH", help="Storage root (default $CMX_HOME/sweeps).")
def list_command(storage: str | None) -> None:
    """Sweeps on disk with their progress and best result."""
    from rich.console import Console
    from rich.table import Table

    unreadable: list[ConfigError] = []
    rows = list_sweeps(storage, unreadable)
    for e in unreadable:
        click.secho(f"skipped: {e.one_line()}", err=True, fg="yellow")
    if not rows:
        click.echo("no sweeps yet; start one with: cmx sweep --space examples/search.yaml")
        return
    table = Table()
    for col in ("name", "trials", "state", "metric", "best", "path"):
        table.add_column(col)
    for s in rows:
        n = len(s.trials)
        state = "complete" if s.complete else "incomplete"
        best = "—" if s.best is None else f"{s.best.best:.4f} ({s.best.trial_id})"
        table.add_row(s.name, f"{n}/{s.num_samples}", state, s.metric, best, s.path)
    Console().print(table)


@sweep.command("status")
@click.argument("name")
@click.option("--storage", metavar="PATH", help="Storage root (default $CMX_HOME/sweeps).")
def status_command(name: str, storage: str | None) -> None:
    """Per-trial state of one sweep."""
    from rich.console import Console
    from rich.table import Table

    if storage and is_uri(storage):
        raise ConfigError(
            f"cmx sweep status reads a local sweep folder, not {storage}",
            "run it where the storage is mounted (e.g. the head node), or compare the trials in MLflow",
        )
    s: SweepStatus = sweep_status(_saved_spec_path(name, storage).parent)
    table = Table(
        title=f"sweep {s.name} ({'complete' if s.complete else 'incomplete'}): "
        + ", ".join(f"{k} {v}" for k, v in sorted(s.counts.items())),
        title_justify="left",
    )
    for col in ("trial", "status", "epochs", f"best {s.metric}"):
        table.add_column(col)
    for t in s.trials:
        table.add_row(t.trial_id, t.status, str(t.epochs), "—" if t.best is None else f"{t.best:.4f}")
    Console().print(table)
    if not s.complete:
        click.echo(f"resume with: cmx sweep --resume {s.name}")
    confirmed = read_summary(s.path)
    win = confirmed.winner_summary() if confirmed else None
    if confirmed and win:
        click.echo(
            f"confirmed winner: trial {win.of}, {confirmed.metric} {win.stats[confirmed.metric].show()} over "
            f"{win.completed} new seeds (top {confirmed.top_k} re-trained; table: {s.path}/confirm-summary.md)"
        )


@sweep.command("dashboard")
@click.argument("name")
@click.option("--storage", metavar="PATH", help="Storage root (default $CMX_HOME/sweeps).")
@click.option("--port", type=click.IntRange(0, 65535), default=0, show_default=True, help="0: a free port.")
def dashboard_command(name: str, storage: str | None, port: int) -> None:
    """optuna-dashboard on a sweep's Optuna study, at 127.0.0.1, until Ctrl-C."""
    from cmx.sweep.study import serve_dashboard

    if storage and is_uri(storage):
        raise ConfigError(
            f"cmx sweep dashboard: sweeps under {storage} keep their Optuna study in memory, not in a file",
            "use a local or shared (NFS) storage path to get a study file",
        )
    folder = safe_child(storage or sweeps_dir(), name, "sweep name")

    def ready(url: str) -> None:
        click.echo(f"optuna-dashboard for sweep {name}: {url}  (Ctrl-C to stop)", nl=True)

    serve_dashboard(Path(folder), name, port=port, on_ready=ready)
