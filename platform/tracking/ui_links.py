"""Deep links into MLflow's UI that open on a sweep's trials, not on MLflow's GenAI pages.

MLflow 3.17's UI starts every new browser on its GenAI pages (traces, judges, prompts): which
side it shows comes from the `workflowType` URL parameter, else from the browser's localStorage
(`mlflow.workflowType`, default `genai`); the experiment tag `mlflow.experimentKind` is not read
by this release (docs/architecture.md, MLflow). Its runs page shows only the parent row of a
sweep, collapsed, with no metric columns: which rows are expanded and which columns are shown live
in localStorage too, except for a *shared view*, an experiment tag `mlflow.sharedViewState.KEY`
that the URL parameter `viewStateShareKey=KEY` applies (the UI's own view sharing writes them).

So every link here carries `workflowType=machine_learning`, and a sweep's links name a shared
view that cmx writes: the sweep's trials (filtered by their parent run, so none is hidden under a
collapsed parent), sorted by the objective, with the objective and the searched parameters as
columns, and in the chart view a "Sweep" section with the objective per trial and a
parallel-coordinates chart of the searched parameters against it.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

from mlflow.exceptions import MlflowException

from cmx.core.errors import TrackingError
from cmx.tracking.query import objective_of, pick_best, sweep_trials
from cmx.tracking.store import PARENT_TAG, TAG_STATUS, TAG_SWEEP, is_server_uri, make_client, short

log = logging.getLogger("cmx.tracking")

# The experiment kind MLflow's UI offers for classic training ("Machine learning"); set on every
# experiment cmx creates. MLflow 3.17's UI ignores it (see the module doc), other releases read it.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
WORKFLOW = {"workflowType": "machine_learning"}  # the UI's "Model training" side, for this page load
SHARED_VIEW_TAG = "mlflow.sharedViewState."  # + key: a runs-page view the URL can name
SEARCHED_TAG = "cmx.searched"  # on each trial run: the searched parameters, comma-separated
LOCAL_UI_PORT = 5000  # `cmx ui`'s default port (its --port option, env CMX_UI_PORT)


@dataclass(frozen=True)
class SweepLinks:
    """Where a sweep is in MLflow's UI."""

    sweep: str
    experiment_id: str
    runs: str  # the trials as a table: objective and searched parameters as columns
    charts: str  # the same trials in the chart view
    best: str | None  # the best trial's run page, once a trial finished
    local: bool  # True when the links point at the server `cmx ui` starts (a local store)


def local_ui_url(host: str = "127.0.0.1", port: int | None = None) -> str:
    """The address `cmx ui` serves a local store on."""
    return f"http://{host}:{port or int(os.environ.get('CMX_UI_PORT') or LOCAL_UI_PORT)}"


def ui_base(uri: str, local_ui: str | None = None) -> str:
    """The UI for a tracking URI: a tracking server serves its own; any other store, `cmx ui`."""
    if is_server_uri(uri):
        return uri.rstrip("/")
    return (local_ui or local_ui_url()).rstrip("/")


def experiment_url(base: str, experiment_id: str, **params: str) -> str:
    """The experiment's runs page in the "Model training" side of the UI."""
    query = urlencode({**WORKFLOW, **params}, quote_via=quote)
    return f"{base}/#/experiments/{quote(experiment_id)}/runs?{query}"


def run_url(base: str, experiment_id: str, run_id: str) -> str:
    """A run's page (its metrics, params, artifacts) in the "Model training" side of the UI."""
    query = urlencode(WORKFLOW, quote_via=quote)
    return f"{base}/#/experiments/{quote(experiment_id)}/runs/{quote(run_id)}?{query}"


def view_key(parent_run_id: str) -> str:
    """The shared-view key of one sweep run (tag keys and URLs allow it as is)."""
    return f"cmx-sweep-{parent_run_id}"


def _column(kind: str, key: str) -> str:
    return f"{kind}.`{key}`"  # the UI's column ids: attributes / params / metrics / tags


def sweep_view_state(parent_run_id: str, metric: str, mode: str, searched: list[str]) -> dict[str, Any]:
    """The runs-page view of one sweep: its trials by objective, its searched parameters shown."""
    best = f"best/{metric}"  # the trial's best epoch (query.best_trial ranks by it)
    section = "cmx-sweep"
    return {
        # Search facets (what the URL would carry): this sweep run's trials, best first.
        "searchFilter": f"tags.`{PARENT_TAG}` = '{parent_run_id}'",
        "orderByKey": _column("metrics", best),
        "orderByAsc": mode == "min",
        # Table columns, then the chart view's own section (MLflow adds its per-metric sections after it).
        "selectedColumns": [
            _column("metrics", best),
            _column("metrics", metric),
            _column("tags", TAG_STATUS),
            *[_column("params", p) for p in searched],
        ],
        "compareRunSections": [
            {
                "uuid": section,
                "name": "Sweep",
                "display": True,
                "isReordered": False,
                "deleted": False,
                "isGenerated": False,
            },
        ],  # fmt: skip
        "compareRunCharts": [
            {
                "uuid": "cmx-objective",
                "type": "BAR",
                "runsCountToCompare": 10,
                "metricSectionId": section,
                "deleted": False,
                "isGenerated": False,
                "metricKey": best,
            },
            {
                "uuid": "cmx-parallel",
                "type": "PARALLEL",
                "runsCountToCompare": 10,
                "metricSectionId": section,
                "deleted": False,
                "isGenerated": False,
                "selectedParams": searched,
                "selectedMetrics": [best],
                "showAllRuns": True,
            },
        ],  # fmt: skip
    }


def ensure_model_training_kind(client: Any, experiment_id: str, tags: dict[str, str]) -> None:
    """Tag an experiment as model training unless it already has a kind (a user's choice stays).

    A store that refuses (a user without write access to an experiment someone else created) costs
    a warning: the tag only labels the experiment.
    """
    if tags.get(EXPERIMENT_KIND_TAG):
        return
    try:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
    except MlflowException as e:
        log.warning("experiment %s not tagged as model training: %s", experiment_id, short(str(e)))


def sweep_links(uri: str, sweep: str | None = None, local_ui: str | None = None) -> SweepLinks:
    """Links to a sweep's newest run (or the newest sweep's); writes its shared view first.

    `uri` is a resolved tracking URI. Raises TrackingError when the store does not answer or has
    no such sweep.
    """
    parent, trials = sweep_trials(uri, sweep)
    metric, mode = objective_of(parent)
    searched = next(
        ([k.strip() for k in t.tags[SEARCHED_TAG].split(",") if k.strip()] for t in trials if t.tags.get(SEARCHED_TAG)),
        [],
    )
    client = make_client(uri)
    experiment_id = client.get_run(parent.run_id).info.experiment_id
    experiment = client.get_experiment(experiment_id)
    ensure_model_training_kind(client, experiment_id, dict(experiment.tags))
    key = view_key(parent.run_id)
    state = json.dumps(sweep_view_state(parent.run_id, metric, mode, searched), sort_keys=True)
    if experiment.tags.get(SHARED_VIEW_TAG + key) != state:
        try:
            client.set_experiment_tag(experiment_id, SHARED_VIEW_TAG + key, state)
        except MlflowException as e:
            raise TrackingError(
                f"could not save sweep {parent.tags.get(TAG_SWEEP)!r}'s view in experiment {experiment_id}: {short(str(e))}",
                "the links need write access to the experiment's tags",
            ) from None
    best = pick_best(parent, trials)
    base = ui_base(uri, local_ui)
    return SweepLinks(
        sweep=parent.tags.get(TAG_SWEEP, sweep or ""),
        experiment_id=experiment_id,
        runs=experiment_url(base, experiment_id, viewStateShareKey=key),
        charts=experiment_url(base, experiment_id, viewStateShareKey=key, compareRunsMode="CHART"),
        best=run_url(base, experiment_id, best.run_id) if best else None,
        local=not is_server_uri(uri),
    )
