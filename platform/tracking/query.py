"""Reading runs back for `cmx runs`: sweeps, their trials, the best trial, runs by id or name."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cmx.core import metrics as M
from cmx.core.errors import TrackingError
from cmx.tracking.store import (
    PARENT_TAG,
    ROLE_CONFIRM,
    TAG_OBJECTIVE,
    TAG_ROLE,
    TAG_STATUS,
    TAG_SWEEP,
    check_tracking_reachable,
    make_client,
    resolve_uri,
)


@dataclass
class RunRow:
    """One run as `cmx runs` shows it."""

    run_id: str
    name: str
    experiment: str
    status: str  # MLflow's
    cmx_status: str
    role: str
    start_time: int
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]

    @classmethod
    def of(cls, run: Any, experiment: str = "") -> RunRow:
        tags = dict(run.data.tags)
        return cls(
            run_id=run.info.run_id,
            name=run.info.run_name or tags.get("mlflow.runName", ""),
            experiment=experiment or run.info.experiment_id,
            status=run.info.status,
            cmx_status=tags.get(TAG_STATUS, run.info.status.lower()),
            role=tags.get(TAG_ROLE, ""),
            start_time=int(run.info.start_time or 0),
            params=dict(run.data.params),
            metrics=dict(run.data.metrics),
            tags=tags,
        )


def _all_runs(
    client: Any, experiment_ids: list[str], filter_string: str, order_by: list[str] | None = None
) -> list[Any]:
    runs, token = [], None
    while True:
        page = client.search_runs(
            experiment_ids,
            filter_string=filter_string,
            max_results=1000,
            order_by=order_by,
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _experiment_ids(client: Any) -> dict[str, str]:
    return {e.experiment_id: e.name for e in client.search_experiments()}


def list_sweeps(uri: str | None = None) -> list[RunRow]:
    """Sweep (parent) and `cmx train` runs in the store, newest first."""
    client = make_client(check_tracking_reachable(uri))
    names = _experiment_ids(client)
    if not names:
        return []
    rows = []
    for role in ("sweep", "train"):
        for run in _all_runs(client, list(names), f"tags.`{TAG_ROLE}` = '{role}'"):
            rows.append(RunRow.of(run, names.get(run.info.experiment_id, "")))
    return sorted(rows, key=lambda r: r.start_time, reverse=True)


def find_sweep(client: Any, sweep: str | None) -> Any:
    """The newest parent run of a sweep name (or of any sweep)."""
    names = _experiment_ids(client)
    where = f"tags.`{TAG_ROLE}` = 'sweep'" + (f" and tags.`{TAG_SWEEP}` = '{sweep}'" if sweep else "")
    runs = (
        client.search_runs(list(names), filter_string=where, max_results=1, order_by=["attributes.start_time DESC"])
        if names
        else []
    )
    if not runs:
        what = f"sweep {sweep!r}" if sweep else "any sweep"
        raise TrackingError(f"no MLflow runs for {what} in {client.tracking_uri}", "list them with `cmx runs list`")
    return runs[0]


def sweep_trials(uri: str | None, sweep: str | None) -> tuple[RunRow, list[RunRow]]:
    """A sweep's parent run and its trial runs (not the confirm stage's re-runs: `cmx.role` confirm)."""
    client = make_client(check_tracking_reachable(uri))
    parent = find_sweep(client, sweep)
    children = _all_runs(client, [parent.info.experiment_id], f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'")
    name = client.get_experiment(parent.info.experiment_id).name
    trials = [c for c in children if c.data.tags.get(TAG_ROLE) != ROLE_CONFIRM]
    return RunRow.of(parent, name), [RunRow.of(c, name) for c in trials]


def objective_of(parent: RunRow) -> tuple[str, str]:
    """(metric, mode) of a sweep from its parent run's tag."""
    mode, _, metric = parent.tags.get(TAG_OBJECTIVE, f"max {M.VAL_TOP1}").partition(" ")
    return metric, mode


def pick_best(parent: RunRow, trials: list[RunRow]) -> RunRow | None:
    """The best of a sweep's trials by its objective (completed or stopped-early trials only)."""
    metric, mode = objective_of(parent)
    key = f"best/{metric}"
    usable_tags = {s.tag for s in M.TrialStatus if s.usable}  # `cmx_status` is the tag's spelling
    usable = [t for t in trials if key in t.metrics and t.cmx_status in usable_tags]
    if not usable:
        return None
    pick = max if mode == "max" else min
    return pick(usable, key=lambda t: t.metrics[key])


def best_trial(uri: str | None, sweep: str | None) -> tuple[RunRow, RunRow]:
    """The sweep's best trial by its objective (completed or stopped-early trials only)."""
    parent, trials = sweep_trials(uri, sweep)
    best = pick_best(parent, trials)
    if best is None:
        metric, _ = objective_of(parent)
        raise TrackingError(f"sweep {parent.tags.get(TAG_SWEEP)!r} has no finished trial with best/{metric}")
    return parent, best


def download_best(uri: str | None, trial: RunRow, dest: Path) -> list[Path]:
    """The trial's checkpoint (or registered model) and config into `dest`."""
    client = make_client(resolve_uri(uri))
    dest.mkdir(parents=True, exist_ok=True)
    got = []
    names = {a.path for a in client.list_artifacts(trial.run_id)}
    for path in ("checkpoint", "config.yaml", "model"):
        if path in names:
            got.append(Path(client.download_artifacts(trial.run_id, path, str(dest))))
    if not got:
        raise TrackingError(f"run {trial.run_id} has no checkpoint, model or config artifacts")
    return got


def get_runs(uri: str | None, refs: list[str]) -> list[RunRow]:
    """Runs by id, or by run name (the newest with that name)."""
    client = make_client(check_tracking_reachable(uri))
    names = _experiment_ids(client)
    out = []
    for ref in refs:
        try:
            run = client.get_run(ref)
        except Exception:
            found = client.search_runs(
                list(names), filter_string=f"attributes.run_name = '{ref}'", max_results=1,
                order_by=["attributes.start_time DESC"],
            ) if names else []  # fmt: skip
            if not found:
                raise TrackingError(f"no run with id or name {ref!r}", "see `cmx runs list`") from None
            run = found[0]
        out.append(RunRow.of(run, names.get(run.info.experiment_id, "")))
    return out
