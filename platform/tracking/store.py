"""Which MLflow store cmx talks to, whether it answers, and a client for it; the tags cmx sets.

Store: config > `MLFLOW_TRACKING_URI` > sqlite under `$CMX_HOME/mlflow`. Writes go through
`cmx.tracking.tracker.Tracker` (journaled while the store is unreachable), reads through
`cmx.tracking.query`; mlflow is imported only inside `cmx.tracking`.

Ray's stock `MLflowLoggerCallback` is not used: it uploads no checkpoints, opens new runs after
`Tuner.restore` (the old ones stay RUNNING) and marks ASHA-stopped trials FINISHED
(docs/architecture.md, MLflow); `cmx.sweep.mlflow_callback` records sweeps instead.
"""

from __future__ import annotations

import logging
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import mlflow

from cmx.core.errors import TrackingError
from cmx.core.paths import cmx_home
from cmx.core.uris import check_tracking_uri, is_uri

log = logging.getLogger("cmx.tracking")


# Tags cmx sets (the `mlflow.*` ones are MLflow's own, shown by its UI).
TAG_ROLE = "cmx.role"  # sweep | trial | train | confirm
ROLE_CONFIRM = "confirm"  # a confirm-stage re-run, nested under its sweep's run (cmx.confirm)
TAG_SWEEP = "cmx.sweep"
TAG_TRIAL = "cmx.trial_id"
TAG_STATUS = "cmx.status"  # a TrialStatus in its `tag` spelling (stopped_early, early_stopped, ...)
TAG_RUN_KEY = "cmx.run_key"  # "<session>/<key>": finds a run created just before a crash
TAG_OBJECTIVE = "cmx.objective"  # "max val/top1"
PARENT_TAG = "mlflow.parentRunId"


# Callers that log from a training loop must not block for minutes: MLflow's HTTP client retries
# 7 times with backoff 2 (~4 min) and waits 120 s per request by default. One retry and 10 s per
# socket operation, then the call goes to the journal. Users' own settings win.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    # Ending a run over HTTP otherwise prints "View run ... at URL" to stdout (and costs a GET).
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}
HEALTH_TIMEOUT_S = 5.0


# ============================================================================ store


def local_store_dir() -> Path:
    """Where the default sqlite store and its artifacts live."""
    return cmx_home() / "mlflow"


def resolve_uri(uri: str | None = None) -> str:
    """The tracking URI: the argument, else `$MLFLOW_TRACKING_URI`, else sqlite under `$CMX_HOME`."""
    chosen = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if chosen:
        check_tracking_uri(chosen, "tracking URI" if uri else "MLFLOW_TRACKING_URI")
        if not is_uri(chosen):  # a bare path means a local sqlite file
            return f"sqlite:///{Path(chosen).expanduser().resolve()}"
        return chosen
    return f"sqlite:///{local_store_dir() / 'mlflow.db'}"


def is_server_uri(uri: str) -> bool:
    """True for an HTTP(S) tracking server."""
    return uri.startswith(("http://", "https://"))


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///")).resolve()  # four slashes: absolute; three: relative


def artifact_root(uri: str) -> str | None:
    """The artifact root cmx gives new experiments; None lets a server choose (its own setting).

    Without an explicit location, MLflow puts artifacts in `./mlruns` of whatever directory the
    process runs in (docs/architecture.md, MLflow), so database stores get a directory beside the database.
    """
    if is_server_uri(uri):
        return None
    db = sqlite_path(uri)
    if db is not None:
        return str(db.parent / "artifacts")
    return os.environ.get("CMX_MLFLOW_ARTIFACT_ROOT") or str(local_store_dir() / "artifacts")


def short(text: str, limit: int = 160) -> str:
    """`text` on one line, cut to `limit` characters."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def check_tracking_reachable(uri: str | None) -> str:
    """Resolve the URI and make sure the store answers now; TrackingError (one line) if not.

    A server gets one `/health` request with a 5 s timeout (no retries); a sqlite store needs a
    writable directory.
    """
    resolved = resolve_uri(uri)
    if is_server_uri(resolved):
        url = resolved.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=HEALTH_TIMEOUT_S) as r:
                if r.status != 200:
                    raise TrackingError(f"MLflow server {resolved} answered {r.status} on /health")
        except urllib.error.HTTPError as e:
            raise TrackingError(
                f"MLflow server {resolved} answered HTTP {e.code} on /health",
                "check the URL (and any proxy or auth in front of it)",
            ) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise TrackingError(
                f"MLflow tracking server {resolved} is unreachable ({short(str(reason), 80)})",
                "start it (`cmx server`), fix --tracking-uri / MLFLOW_TRACKING_URI, or unset it to use the local store",
            ) from None
        return resolved
    db = sqlite_path(resolved)
    if db is not None:
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrackingError(f"cannot create the MLflow store directory {db.parent}: {e.strerror}") from None
        if not os.access(db.parent, os.W_OK):
            raise TrackingError(f"the MLflow store directory {db.parent} is not writable")
    return resolved


def configure_http() -> None:
    """Short HTTP timeouts and retries for this process (unless the user set them)."""
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)


def make_client(uri: str) -> Any:
    """An MlflowClient for the URI (registry on the same store)."""
    configure_http()
    quiet_mlflow()
    db = sqlite_path(uri)
    if db is None:
        return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    # Create or upgrade the sqlite schema under a file lock: two processes opening a fresh store at
    # once (two `cmx train` runs, say) otherwise race through MLflow's migrations and one fails.
    from filelock import FileLock

    with FileLock(f"{db}.lock", timeout=300):
        client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
        client.search_experiments(max_results=1)
        client.search_registered_models(max_results=1)
    return client


def quiet_mlflow() -> None:
    # The sqlite store logs every migration step at INFO on first use.
    for name in (
        "mlflow.store.db.utils",
        "alembic.runtime.migration",
        "mlflow.store.model_registry",
    ):
        logging.getLogger(name).setLevel(logging.WARNING)
