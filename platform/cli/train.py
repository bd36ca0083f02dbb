"""`cmx train` and `cmx eval`: thin commands over `cmx.pipelines.trainer` and `cmx.cluster.data_parallel`."""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

import click

from cmx.cli.options import address_option, json_option, set_option, tracking_uri_option
from cmx.core import metrics as M
from cmx.core.config import (
    TrainConfig,
    apply_overrides,
    check_test_apart,
    load_yaml,
    resolve_data_paths,
    validate_config,
)
from cmx.core.errors import ConfigError, TrainingDiverged
from cmx.core.paths import check_dir_target, runs_dir, safe_child
from cmx.pipelines.presets import merge
from cmx.pipelines.presets import preset as get_preset


@click.command("train")
@click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    metavar="YAML",
    help="Run config (relative data paths are relative to this file).",
)
@click.option(
    "--preset",
    metavar="NAME",
    help="Start from a published recipe (imagenet, cifar10, step-adam); YAML and --set override it.",
)
@set_option("Override any config key, e.g. --set optim.lr=0.01 (repeatable).")
@click.option(
    "--run-dir",
    type=click.Path(path_type=Path, file_okay=False),
    metavar="DIR",
    help="Where the run is written  [default: $CMX_HOME/runs/<name>-<time>]",
)
@click.option(
    "--resume",
    "resume_dir",
    type=click.Path(path_type=Path, file_okay=False),
    metavar="RUN_DIR",
    help="Continue a run from its last checkpoint (with its own config plus --set).",
)
@click.option(
    "--from-run",
    metavar="RUN_ID",
    help="Re-create a tracked train run or sweep trial from MLflow: its logged config plus --set, its data "
    "checked against the fingerprints it logged, its metrics compared at the end.",
)
@click.option(
    "--full-budget",
    is_flag=True,
    help="With --from-run of a trial the sweep's scheduler stopped early: train all loop.epochs "
    "instead of stopping after the epoch where it stopped.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Data-parallel workers (Ray Train); 1 runs in this process without Ray.",
)
@click.option(
    "--gpus-per-worker",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="GPUs per data-parallel worker (NCCL); 0 trains on CPUs (gloo).",
)
@click.option(
    "--cpus-per-worker",
    type=click.FloatRange(min=0, min_open=True),
    metavar="N",
    help="CPUs per data-parallel worker  [default: CPUs / workers]",
)
@click.option(
    "--max-failures",
    type=click.IntRange(min=0),
    default=2,
    show_default=True,
    help="Worker-group restarts from the last checkpoint before giving up.",
)
@address_option("Ray cluster for --workers > 1 (default: a local Ray).")
@click.option(
    "--progress/--no-progress", default=True, show_default=True, help="Show the per-epoch progress line and bar."
)
@tracking_uri_option("MLflow store (http://server, sqlite:///file.db)  [default: sqlite under $CMX_HOME/mlflow]")
@click.option("--tracking/--no-tracking", default=True, show_default=True, help="Record the run in MLflow.")
def train(config_path: Path | None, preset: str | None, overrides: tuple[str, ...], run_dir: Path | None,
          resume_dir: Path | None, from_run: str | None, full_budget: bool, workers: int, gpus_per_worker: float,
          cpus_per_worker: float | None, max_failures: int, address: str | None, progress: bool, tracking_uri: str | None,
          tracking: bool) -> None:  # fmt: skip
    """Train one model: single process, or data-parallel with --workers N."""
    from rich.console import Console

    console = Console(highlight=False)
    resume_from = None
    source: Any = None  # the run --from-run re-creates
    stop_after: int | None = None  # its last epoch, when a sweep's scheduler stopped it there
    tags = {"cmx.workers": str(workers)}
    if full_budget and from_run is None:
        raise click.UsageError("--full-budget goes with --from-run")
    if resume_dir is not None:
        from cmx.pipelines.checkpoint import resolve_checkpoint

        if from_run is not None:
            raise click.UsageError("--resume continues a run dir; --from-run starts a new run: pick one")
        if config_path is not None or preset is not None:
            raise click.UsageError("--resume continues with the run's own config.yaml; change it with --set")
        resume_from = resolve_checkpoint(resume_dir)
        config = build_config(resume_dir / "config.yaml", None, overrides)
        run_dir = resume_dir
    else:
        if from_run is not None:
            if config_path is not None or preset is not None:
                raise click.UsageError("--from-run uses the run's logged config; change it with --set")
            source = _source_run(console, from_run, tracking_uri, overrides, workers)
            config = source.config
            tags["cmx.reproduces"] = source.run_id
            stop_after = None if full_budget else source.stopped_after
            if stop_after is not None:
                console.print(f"run {from_run} was stopped by its sweep's scheduler after epoch {stop_after} of "
                              f"{config.loop.epochs}: this run stops there too (--full-budget trains all "
                              f"{config.loop.epochs})", soft_wrap=True)  # fmt: skip
        else:
            config = build_config(config_path, preset, overrides)
        run_dir = run_dir or default_run_dir(config.name, config.output_dir)
        if (run_dir / "checkpoints").exists():
            raise ConfigError(
                f"{run_dir} already holds a run", f"continue it with --resume {run_dir}, or pick another --run-dir"
            )
    from cmx.pipelines.trainer import check_data_paths

    check_data_paths(config.data)  # before the run folder and the MLflow run exist
    check_test_apart(config.data, str(config_path or "--set"))  # test is never the val data
    run_dir = run_dir.expanduser().resolve()
    console.print(f"run dir: {run_dir}", soft_wrap=True)
    if tracking:
        from cmx.tracking.train_run import train_run  # checks the store before training starts

        tracked: Any = train_run(config, run_dir, uri=tracking_uri, tags=tags)
    else:
        tracked = contextlib.nullcontext(None)
    with tracked as reporter:
        if workers > 1:  # the data-parallel run's epochs are logged from metrics.jsonl at its end
            from cmx.cluster.data_parallel import run_data_parallel

            cpus = cpus_per_worker or max(1, (os.cpu_count() or 1) // workers)
            result = run_data_parallel(
                config, run_dir, workers=workers, gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus,
                resume_from=resume_from, max_failures=max_failures, address=address, progress=progress,
                stop_after=stop_after,
            )  # fmt: skip
            if result is None:
                raise ConfigError(f"{run_dir}: the data-parallel run left no result.json", "see the worker logs")
        else:
            from cmx.pipelines.trainer import train as train_fn

            if gpus_per_worker > 0:
                config.loop.device = "cuda"
            result = train_fn(
                config, run_dir, resume_from=resume_from, progress=progress, reporter=reporter, stop_after=stop_after
            )
        comparison = None
        if source is not None and result.status != M.TrialStatus.DIVERGED:
            from cmx.tracking.reproduce import TAG_REPRODUCTION, compare

            comparison = compare(source, result.history)
            if reporter is not None:
                verdict = f"{'exact' if comparison.exact else 'differs'}: {comparison.summary()}"
                reporter.tracker.log(reporter.key, tags={TAG_REPRODUCTION: verdict[:500]})
    console.print(history_table(result.history, config.loop.early_stop_metric))
    console.print(f"run dir: {result.run_dir}", soft_wrap=True)
    if result.best_checkpoint:
        console.print(f"best checkpoint: {result.best_checkpoint}", soft_wrap=True)
    if result.status == M.TrialStatus.DIVERGED:
        raise TrainingDiverged(result.message, "lower optim.lr or set optim.grad_clip, then start again")
    console.print(result.message, soft_wrap=True)
    if comparison is not None:
        verdict = "reproduced exactly" if comparison.exact else "differs from"
        console.print(f"{verdict} run {comparison.run_id}: {comparison.summary()}", soft_wrap=True)


def _source_run(console: Any, run_id: str, uri: str | None, overrides: tuple[str, ...], workers: int) -> Any:
    """The run `--from-run` names, its config rebuilt (plus --set) and its data fingerprints checked."""
    from cmx.tracking.reproduce import check_fingerprints, load_source_run

    source = load_source_run(run_id, uri, overrides)
    console.print(
        f"from run {run_id} ({source.role} {source.name}): config from its {source.config_from}", soft_wrap=True
    )
    for checked in check_fingerprints(source, source.config):
        console.print(f"data matches the run's fingerprint: {checked}", soft_wrap=True)
    logged_workers = source.tags.get("cmx.workers")
    if logged_workers and logged_workers != str(workers):
        console.print(f"note: run {run_id} trained with {logged_workers} worker(s), this one with {workers}; "
                      f"pass --workers {logged_workers} to match", soft_wrap=True)  # fmt: skip
    if not source.config.loop.deterministic:
        console.print(f"note: run {run_id} was not deterministic (loop.deterministic false): expect close, "
                      "not equal, metrics", soft_wrap=True)  # fmt: skip
    return source


def build_config(path: Path | None, preset: str | None, overrides: tuple[str, ...] | list[str]) -> Any:
    """Defaults -> preset -> YAML file (its relative data paths resolved against the file) -> --set."""

    data: dict[str, Any] = get_preset(preset) if preset else {}
    if path is not None:
        from_file = load_yaml(path)
        resolve_data_paths(from_file, path.parent)
        data = merge(data, from_file)
    apply_overrides(data, list(overrides))
    source = str(path) if path else (f"preset {preset}" if preset else "--set")
    return validate_config(TrainConfig, data, source)


def default_run_dir(name: str, output_dir: str | None) -> Path:
    """`<output_dir or $CMX_HOME/runs>/<name>-<YYYYmmdd-HHMMSS>`, never an existing folder."""

    parent = Path(output_dir).expanduser() if output_dir else runs_dir()
    safe_child(parent, name, "run name (config key `name`)")
    base = parent / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    check_dir_target(parent, "output_dir" if output_dir else "$CMX_HOME/runs")
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def history_table(history: list[dict[str, float]], best_key: str, max_rows: int = 30) -> Any:
    """A rich table of the epochs (the best marked); long runs show the best and the last rows."""
    from rich.table import Table

    table = Table(title="training", title_justify="left")
    for col in ("epoch", "train loss", "val loss", "top-1 %", "top-5 %", "lr", "img/s", "s", ""):
        table.add_column(col, justify="right")
    if not history:
        return table
    better = max if M.MODES.get(best_key) == "max" else min
    best = better(history, key=lambda h: h.get(best_key, float("nan")))
    rows = history if len(history) <= max_rows else [best, *history[-(max_rows - 1) :]]
    seen = set()
    for h in rows:
        if id(h) in seen:
            continue
        seen.add(id(h))
        table.add_row(
            f"{int(h[M.EPOCH])}", f"{h[M.TRAIN_LOSS]:.4f}", f"{h[M.VAL_LOSS]:.4f}", f"{h[M.VAL_TOP1]:.2f}",
            f"{h[M.VAL_TOP5]:.2f}", f"{h[M.LR]:.2e}", f"{h[M.IMAGES_PER_SEC]:,.0f}",
            f"{h[M.EPOCH_SECONDS]:.1f}", "best" if h is best else "",
        )  # fmt: skip
    return table


@click.command("eval")
@click.argument("checkpoint", type=click.Path(path_type=Path), metavar="CHECKPOINT")
@click.option(
    "--data",
    "data_path",
    required=True,
    type=click.Path(path_type=Path),
    metavar="PATH",
    help="A .beton file (FFCV) or an ImageFolder directory (torchvision).",
)
@click.option("--batch-size", type=click.IntRange(min=1), metavar="N", help="Validation batch size.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--no-ema", is_flag=True, help="Use the raw weights even when the checkpoint has EMA weights.")
@json_option("Print the metrics as JSON.")
def eval_command(checkpoint: Path, data_path: Path, batch_size: int | None, device: str, no_ema: bool,
                 as_json: bool) -> None:  # fmt: skip
    """Report top-1 / top-5 of a checkpoint (file, checkpoint dir or run dir) on a dataset."""
    from cmx.pipelines.trainer import evaluate

    out = evaluate(checkpoint, data_path, batch_size=batch_size, device=device, use_ema=not no_ema)  # type: ignore[arg-type]
    if as_json:
        click.echo(json.dumps(out))
        return
    click.echo(
        f"top-1 {out[M.VAL_TOP1]:.2f}%  top-5 {out[M.VAL_TOP5]:.2f}%  loss {out[M.VAL_LOSS]:.4f}  "
        f"({int(out['num_samples']):,} images)"
    )
