"""The `Tracker`, through which every MLflow write goes, and its journal for unreachable stores.

Runs are keyed by a stable name ("sweep", "trial:<id>", "train") so a resumed or retried run
continues its own MLflow run; every call made while the store is unreachable goes to a
JSON-lines journal that is delivered in order once it answers (or with `cmx runs replay`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from cmx.core.errors import TrackingError
from cmx.core.files import atomic_write_text, read_json, read_utf8
from cmx.core.metrics import TrialStatus
from cmx.tracking.store import (
    PARENT_TAG,
    TAG_RUN_KEY,
    TAG_STATUS,
    artifact_root,
    check_tracking_reachable,
    is_server_uri,
    make_client,
    resolve_uri,
    short,
)
from cmx.tracking.ui_links import EXPERIMENT_KIND_TAG, MODEL_TRAINING, ensure_model_training_kind

log = logging.getLogger("cmx.tracking")

STATE_FILE = "cmx-mlflow.json"  # experiment id, session, run key -> run id, meta
JOURNAL_FILE = "cmx-mlflow-journal.jsonl"  # calls not yet delivered, in order
REJECTED_FILE = "cmx-mlflow-rejected.jsonl"  # calls the store refused for good (kept to inspect)
STAGING_DIR = "cmx-mlflow-staging"  # copies of journaled artifacts (their sources may vanish)
# cmx status -> MLflow run status. MLflow has only FINISHED/FAILED/KILLED for ended runs, so the
# `cmx.status` tag tells diverged from failed and scheduler stops from interruptions.
RUN_STATUS = {
    TrialStatus.COMPLETED: "FINISHED",
    TrialStatus.PATIENCE_STOPPED: "FINISHED",  # the trainer's own patience rule: a normal end
    TrialStatus.SCHEDULER_STOPPED: "KILLED",  # stopped by the sweep's scheduler (ASHA)
    TrialStatus.REJECTED: "KILLED",  # broke a constraint, never trained
    TrialStatus.INTERRUPTED: "KILLED",
    TrialStatus.DIVERGED: "FAILED",
    TrialStatus.FAILED: "FAILED",
}
OFFLINE_BACKOFF_S = (2.0, 60.0)  # first and longest wait before trying an unreachable store again
MAX_ATTEMPTS_WHILE_HEALTHY = 3  # a call that keeps failing while the server answers is refused


def _transient(error: BaseException) -> bool:
    """True when the call may succeed later: the store is down, overloaded or locked."""
    from mlflow.exceptions import MlflowException

    if isinstance(error, OSError):  # includes requests' ConnectionError and Timeout
        return True
    if isinstance(error, MlflowException):
        code = str(getattr(error, "error_code", ""))
        return code in {
            "INTERNAL_ERROR",  # what the REST client raises for refused connections
            "TEMPORARILY_UNAVAILABLE",
            "REQUEST_LIMIT_EXCEEDED",
            "DEADLINE_EXCEEDED",
            "ABORTED",
        }
    return type(error).__name__ in {"OperationalError", "DBAPIError"}  # sqlite "database is locked"


def _now_ms() -> int:
    return int(time.time() * 1000)


class Tracker:
    """One experiment's runs, keyed by name; every call goes to MLflow or, while the store is
    unreachable, to a journal in `state_dir` that is delivered in order once it answers.

    State (experiment id, session id, run key -> run id, `meta`) lives in `state_dir/cmx-mlflow.json`,
    so a new Tracker on the same directory continues the same runs.
    """

    def __init__(self, state_dir: str | Path, uri: str | None = None, *, experiment: str | None = None) -> None:
        self.dir = Path(state_dir).expanduser()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.state_file = self.dir / STATE_FILE
        self.journal_file = self.dir / JOURNAL_FILE
        saved = None
        if self.state_file.is_file():
            saved = read_json(self.state_file, what="tracking state", error=TrackingError, hint="move the file aside")
            if not isinstance(saved, dict):
                raise TrackingError(f"{self.state_file}: not a cmx tracking state", "move the file aside")
        self.uri = resolve_uri(uri or (saved or {}).get("uri"))
        if saved is not None and saved.get("uri") != self.uri:
            # Run ids of another store mean nothing here: start over, keep the old file to inspect.
            log.warning(
                "tracking store changed (%s -> %s): new runs will be created",
                saved.get("uri"),
                self.uri,
            )
            self.state_file.replace(self.dir / f"{STATE_FILE}.{int(time.time())}.old")
            saved = None
        self.state: dict[str, Any] = saved or {
            "version": 1,
            "uri": self.uri,
            "session": uuid.uuid4().hex[:12],
            "experiment": experiment,
            "experiment_id": None,
            "runs": {},
            "meta": {},
        }
        if experiment and not self.state.get("experiment"):
            self.state["experiment"] = experiment
        self._client: Any = None
        self._offline_until = 0.0
        self._backoff = OFFLINE_BACKOFF_S[0]
        self._warned_offline = False
        # A caller keeping its part of `meta` in a typed object sets this to write that part back;
        # every save calls it first, so a save inside a Tracker call (a run created, a model
        # registered) also holds the caller's latest state, as a plain dict in `meta` would.
        self.meta_writer: Callable[[dict[str, Any]], None] | None = None
        self.save()

    # ---------------------------------------------------------------- state

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = make_client(self.uri)
        return self._client

    @property
    def meta(self) -> dict[str, Any]:
        """Free-form persistent state for callers (e.g. the last epoch logged per run)."""
        return self.state["meta"]

    def save(self) -> None:
        """Write the state file (after `meta_writer`, if set, updated `meta`)."""
        if self.meta_writer is not None:
            self.meta_writer(self.meta)
        atomic_write_text(self.state_file, json.dumps(self.state, indent=1, sort_keys=True))

    def run_id(self, key: str) -> str | None:
        """The MLflow run id of a key, once the run exists in the store."""
        return self.state["runs"].get(key)

    def has_run(self, key: str) -> bool:
        """True when the key's run was created or its creation is journaled."""
        return key in self.state["runs"] or key in self.meta.get("pending_runs", [])

    @property
    def experiment_id(self) -> str:
        if self.state.get("experiment_id") is None:
            self.state["experiment_id"] = self._ensure_experiment(self.state["experiment"] or "Default")
            self.save()
        return self.state["experiment_id"]

    def _ensure_experiment(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found is not None:
            if found.lifecycle_stage == "deleted":
                self.client.restore_experiment(found.experiment_id)
            ensure_model_training_kind(self.client, found.experiment_id, dict(found.tags))
            return found.experiment_id
        root = artifact_root(self.uri)
        location = None if root is None else str(Path(root) / _safe_name(name))
        try:
            # Tagged as model training (not GenAI) for MLflow's UI: docs/architecture.md, MLflow.
            return self.client.create_experiment(
                name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING}
            )
        except MlflowException as e:  # created meanwhile by another process
            again = self.client.get_experiment_by_name(name)
            if again is None:
                raise e from None
            return again.experiment_id

    # ---------------------------------------------------------------- public calls

    def start_run(
        self,
        key: str,
        *,
        name: str,
        parent: str | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> bool:
        """Create the key's run, or mark it RUNNING again when it exists; True when it is new."""
        new = not self.has_run(key)
        if new:
            self.meta.setdefault("pending_runs", []).append(key)
            self.save()
        self._submit({
            "op": "start", "key": key, "name": name, "parent": parent,
            "tags": dict(tags or {}), "ts": _now_ms(),
        })  # fmt: skip
        return new

    def log(
        self,
        key: str,
        *,
        metrics: Mapping[str, float] | None = None,
        step: int = 0,
        params: Mapping[str, str] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        """Metrics (at `step`), params and tags of a run; non-finite metric values are skipped."""
        ts = _now_ms()
        rows = [
            [k, float(v), ts, int(step)]
            for k, v in (metrics or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
        ]
        if not (rows or params or tags):
            return
        self._submit({
            "op": "log", "key": key, "metrics": rows,
            "params": {k: str(v) for k, v in (params or {}).items()},
            "tags": {k: str(v) for k, v in (tags or {}).items()},
        })  # fmt: skip

    def end_run(self, key: str, status: TrialStatus, *, tags: Mapping[str, str] | None = None) -> None:
        """End a run with a cmx status (see RUN_STATUS); the tag `cmx.status` keeps the detail."""
        self._submit({
            "op": "end", "key": key, "status": RUN_STATUS.get(status, "FAILED"),
            "tags": {TAG_STATUS: status.tag, **(tags or {})}, "ts": _now_ms(),
        })  # fmt: skip

    def log_artifact(self, key: str, local: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file or directory (copied aside first if it has to wait for the store)."""
        self._submit({"op": "artifact", "key": key, "local": str(local), "path": artifact_path})

    def log_text(self, key: str, text: str, artifact_file: str) -> None:
        """Upload text as a file."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_file).name
            path.write_text(text)
            parent = str(Path(artifact_file).parent)
            self.log_artifact(key, path, None if parent == "." else parent)

    def delete_artifacts(self, key: str, artifact_path: str) -> None:
        """Remove a run's artifacts under a path (bounded checkpoint storage)."""
        self._submit({"op": "delete", "key": key, "path": artifact_path})

    def delete_run(self, key: str) -> None:
        """Soft-delete a run (MLflow keeps it restorable; searches skip it)."""
        self._submit({"op": "delete_run", "key": key})

    def register_model(
        self,
        key: str,
        *,
        model_name: str,
        artifact_path: str,
        tags: Mapping[str, str],
        description: str,
    ) -> None:
        """A new version of `model_name` from the run's `artifact_path` directory."""
        self._submit({
            "op": "register", "id": uuid.uuid4().hex, "key": key, "name": model_name, "path": artifact_path,
            "tags": dict(tags), "description": description,
        })  # fmt: skip

    def last_logged_step(self, key: str, metric: str) -> int | None:
        """The highest step of `metric` the key's run holds in the store or waits with in the journal.

        A driver killed between an MLflow call and the save of its state file does not know that
        call went through; this asks. The store part is skipped while it is unreachable.
        """
        steps = [
            int(row[3])
            for op in self._read_journal()
            if op.get("op") == "log" and op.get("key") == key
            for row in op.get("metrics", [])
            if row[0] == metric
        ]
        run_id = self.run_id(key)
        if run_id is not None and time.monotonic() >= self._offline_until:
            try:
                steps += [m.step for m in self.client.get_metric_history(run_id, metric)]
            except Exception as e:  # noqa: BLE001 - unreachable or refused: the journal is what we know
                log.debug("MLflow history of %s/%s not read: %s", key, metric, short(str(e)))
        return max(steps) if steps else None

    def pending(self) -> int:
        """Calls waiting in the journal."""
        return len(self._read_journal())

    def flush(self, *, force: bool = False) -> bool:
        """Deliver journaled calls in order; True when the journal is empty.

        Outside `force`, a store that failed recently is not retried before its back-off ends.
        """
        ops = self._read_journal()
        if not ops:
            self._rewrite_journal([])  # nothing deliverable left (at most a torn line): drop the file
            return True
        if not force and time.monotonic() < self._offline_until:
            return False
        done = 0
        for i, op in enumerate(ops):
            outcome = self._try(op)
            if outcome == "retry":
                self._rewrite_journal(ops[i:])
                return False
            done += 1
        self._rewrite_journal([])
        if done:
            log.warning("MLflow store %s is back: delivered %d journaled call(s)", self.uri, done)
        self._warned_offline = False
        return True

    # ---------------------------------------------------------------- delivery

    def _submit(self, op: dict[str, Any]) -> None:
        if self._read_journal() and not self.flush():
            self._journal(op)
            return
        if self._try(op) == "retry":
            self._journal(op)

    def _try(self, op: dict[str, Any]) -> str:
        """Apply one call: "ok", "refused" (moved to the rejected file) or "retry" (store down)."""
        try:
            self._apply(op)
        except Exception as e:
            if _transient(e) and not self._answers_while_failing(op):
                self._go_offline(e)
                return "retry"
            self._refuse(op, e)
            return "refused"
        self._backoff = OFFLINE_BACKOFF_S[0]
        self._offline_until = 0.0
        staged = op.get("staged")
        if staged:
            shutil.rmtree(staged, ignore_errors=True)
        return "ok"

    def _answers_while_failing(self, op: dict[str, Any]) -> bool:
        """A server that is healthy yet keeps failing one call: refuse it after a few attempts,
        so one bad call cannot hold the journal back for ever."""
        if not is_server_uri(self.uri):
            op["attempts"] = op.get("attempts", 0) + 1
            return op["attempts"] >= MAX_ATTEMPTS_WHILE_HEALTHY * 3
        try:
            check_tracking_reachable(self.uri)
        except TrackingError:
            return False
        op["attempts"] = op.get("attempts", 0) + 1
        return op["attempts"] >= MAX_ATTEMPTS_WHILE_HEALTHY

    def _go_offline(self, error: BaseException) -> None:
        self._offline_until = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, OFFLINE_BACKOFF_S[1])
        if not self._warned_offline:
            self._warned_offline = True
            log.warning(
                "MLflow store %s unreachable (%s): calls are kept in %s and delivered when it answers "
                "(or run `cmx runs replay %s`)",
                self.uri, short(str(error), 120), self.journal_file, self.dir,
            )  # fmt: skip

    def _refuse(self, op: dict[str, Any], error: BaseException) -> None:
        log.warning("MLflow refused %s for %s: %s", op["op"], op.get("key"), short(str(error)))
        with open(self.dir / REJECTED_FILE, "a") as f:
            f.write(json.dumps({**op, "error": short(str(error), 2000)}) + "\n")

    def _journal(self, op: dict[str, Any]) -> None:
        if op["op"] == "artifact" and not op.get("staged"):
            src = Path(op["local"])
            staged = self.dir / STAGING_DIR / uuid.uuid4().hex[:12]
            staged.mkdir(parents=True)
            if src.is_dir():
                shutil.copytree(src, staged / src.name)
            elif src.exists():
                shutil.copy2(src, staged / src.name)
            op = {**op, "local": str(staged / src.name), "staged": str(staged)}
        with open(self.journal_file, "a") as f:
            f.write(json.dumps(op) + "\n")

    def _read_journal(self) -> list[dict[str, Any]]:
        if not self.journal_file.is_file():
            return []
        ops = []
        text = read_utf8(self.journal_file, what="journal", error=TrackingError, hint="move the file aside")
        for line in text.splitlines():
            with contextlib.suppress(json.JSONDecodeError):  # a torn last line after a crash
                op = json.loads(line)
                if isinstance(op, dict) and isinstance(op.get("op"), str):  # `replay` reports other lines
                    ops.append(op)
        return ops

    def _rewrite_journal(self, ops: list[dict[str, Any]]) -> None:
        if not ops:
            self.journal_file.unlink(missing_ok=True)
            return
        atomic_write_text(self.journal_file, "".join(json.dumps(op) + "\n" for op in ops))

    def _rid(self, key: str) -> str:
        run_id = self.run_id(key)
        if run_id is None:
            raise KeyError(f"no MLflow run for {key!r}")
        return run_id

    def _apply(self, op: dict[str, Any]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        kind, key = op["op"], str(op.get("key"))  # the run an op acts on
        if kind == "start":
            self._apply_start(op)
        elif kind == "log":
            run_id = self._rid(key)
            metrics = [Metric(k, v, ts, step) for k, v, ts, step in op["metrics"]]
            params = [Param(k, v) for k, v in op["params"].items()]
            tags = [RunTag(k, v) for k, v in op["tags"].items()]
            # MLflow takes at most 1000 metrics and 100 params + tags per batch.
            for i in range(0, len(metrics), 1000):
                self.client.log_batch(run_id, metrics=metrics[i : i + 1000], synchronous=True)
            rest = [("p", p) for p in params] + [("t", t) for t in tags]
            for i in range(0, len(rest), 100):
                chunk = rest[i : i + 100]
                self.client.log_batch(
                    run_id,
                    params=[x for k, x in chunk if k == "p"],
                    tags=[x for k, x in chunk if k == "t"],
                    synchronous=True,
                )
        elif kind == "end":
            run_id = self._rid(key)
            if op["tags"]:
                self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in op["tags"].items()], synchronous=True)
            self.client.set_terminated(run_id, status=op["status"], end_time=op["ts"])
        elif kind == "artifact":
            run_id, local = self._rid(key), Path(op["local"])
            if local.is_dir():
                self.client.log_artifacts(run_id, str(local), op["path"])
            elif local.is_file():
                self.client.log_artifact(run_id, str(local), op["path"])
            else:
                raise FileNotFoundError(f"{local} vanished before upload")  # noqa: TRY003
        elif kind == "delete":
            from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

            run = self.client.get_run(self._rid(key))
            repo = get_artifact_repository(run.info.artifact_uri, tracking_uri=self.uri)
            repo.delete_artifacts(op["path"])
        elif kind == "delete_run":
            self.client.delete_run(self._rid(key))
        elif kind == "register":
            self._apply_register(op)
        else:
            raise ValueError(f"unknown journal op {kind!r}")

    def _apply_start(self, op: dict[str, Any]) -> None:
        key = op["key"]
        run_id = self.run_id(key)
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
            return
        run_key = f"{self.state['session']}/{key}"
        # A run created just before a crash, before its id reached the state file.
        found = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{TAG_RUN_KEY}` = '{run_key}'", max_results=1
        )
        if found:
            run_id = found[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            tags = {**op["tags"], TAG_RUN_KEY: run_key, "mlflow.runName": op["name"]}
            if op.get("parent"):
                tags[PARENT_TAG] = self._rid(op["parent"])
            run = self.client.create_run(self.experiment_id, start_time=op["ts"], tags=tags, run_name=op["name"])
            run_id = run.info.run_id
        self.state["runs"][key] = run_id
        pending = self.meta.get("pending_runs", [])
        if key in pending:
            pending.remove(key)
        self.save()

    def _apply_register(self, op: dict[str, Any]) -> None:
        from mlflow.exceptions import MlflowException

        run = self.client.get_run(self._rid(op["key"]))
        done = [r for r in self.meta.get("registered", []) if r.get("id") == op["id"]]
        if done:  # created before a failure later in this call: only the tag is missing
            self.client.set_tag(run.info.run_id, "cmx.registered_model", f"{done[0]['name']}/{done[0]['version']}")
            return
        try:
            self.client.create_registered_model(
                op["name"],
                description="ConvMixer models found by cmx sweeps (one version per sweep).",
            )
        except MlflowException as e:
            if "RESOURCE_ALREADY_EXISTS" not in str(e.error_code):
                raise
        mv = self.client.create_model_version(
            op["name"],
            source=f"{run.info.artifact_uri.rstrip('/')}/{op['path']}",
            run_id=run.info.run_id,
            tags=op["tags"],
            description=op["description"],
        )
        self.meta.setdefault("registered", []).append({"id": op["id"], "name": mv.name, "version": str(mv.version)})
        self.save()
        self.client.set_tag(run.info.run_id, "cmx.registered_model", f"{mv.name}/{mv.version}")


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "experiment"


# op -> {field: (accepted types, in words)}: what `Tracker` journals. `replay` checks every line
# against it before delivering anything, so a damaged journal is one TrackingError naming the line.
_STR, _DICT, _LIST, _INT = (str,), (dict,), (list,), (int,)
_OP_FIELDS: dict[str, dict[str, tuple[tuple[type, ...], str]]] = {
    "start": {"key": (_STR, "a string"), "tags": (_DICT, "an object"), "ts": (_INT, "an integer")},
    "log": {
        "key": (_STR, "a string"),
        "metrics": (_LIST, "a list"),
        "params": (_DICT, "an object"),
        "tags": (_DICT, "an object"),
    },
    "end": {
        "key": (_STR, "a string"),
        "status": (_STR, "a string"),
        "tags": (_DICT, "an object"),
        "ts": (_INT, "an integer"),
    },
    "artifact": {"key": (_STR, "a string"), "local": (_STR, "a string")},
    "delete": {"key": (_STR, "a string"), "path": (_STR, "a string")},
    "delete_run": {"key": (_STR, "a string")},
    "register": {
        "key": (_STR, "a string"),
        "id": (_STR, "a string"),
        "name": (_STR, "a string"),
        "path": (_STR, "a string"),
        "tags": (_DICT, "an object"),
        "description": (_STR, "a string"),
    },
}


def _journal_problem(op: Any) -> str | None:
    """Why one journal entry cannot be delivered, or None."""
    if not isinstance(op, dict):
        return f"a JSON {type(op).__name__}, not an object"
    kind = op.get("op")
    if kind not in _OP_FIELDS:
        return f"unknown op {json.dumps(kind)[:40]}"
    for name, (types, words) in _OP_FIELDS[kind].items():
        value = op.get(name)
        if isinstance(value, bool) or not isinstance(value, types):
            return f"{kind}: {name} is {json.dumps(value)[:40]}, expected {words}"
    if kind == "log":
        for row in op["metrics"]:
            ok = isinstance(row, list) and len(row) == 4 and isinstance(row[0], str)
            if not ok or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in row[1:]):
                return f"log: metric row {json.dumps(row)[:40]} is not [name, value, timestamp, step]"
    return None


def check_journal(state_dir: str | Path) -> None:
    """`TrackingError` naming the first damaged line of a directory's state file or journal.

    A torn last line (the writer was killed mid-write) is not damage: delivery skips it.
    """
    path = Path(state_dir).expanduser()
    state_file, journal = path / STATE_FILE, path / JOURNAL_FILE
    hint = "fix or delete that line (the other calls stay pending), or move the file aside"
    state = read_json(state_file, what="tracking state", error=TrackingError, hint="move the file aside")
    if not isinstance(state, dict) or not isinstance(state.get("runs", {}), dict):
        raise TrackingError(f"{state_file}: not a cmx tracking state (expected an object with runs)", "move it aside")
    for key in ("uri", "session", "experiment_id", "experiment"):
        if state.get(key) is not None and not isinstance(state[key], str):
            raise TrackingError(
                f"{state_file}: {key} is {json.dumps(state[key])[:40]}, expected a string", "move it aside"
            )
    if not journal.is_file():
        return
    try:
        text = journal.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise TrackingError(f"{journal}: unreadable ({short(str(e), 120)})", "move the file aside") from None
    lines = text.splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            op = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines) and not text.endswith("\n"):
                continue  # torn last line
            raise TrackingError(f"{journal}:{number}: not JSON ({short(line, 60)})", hint) from None
        problem = _journal_problem(op)
        if problem:
            raise TrackingError(f"{journal}:{number}: {problem}", hint)


def replay(state_dir: str | Path, uri: str | None = None) -> tuple[int, int]:
    """Deliver what a sweep or run directory's journal holds; returns (delivered, still pending)."""
    path = Path(state_dir).expanduser()
    if not (path / STATE_FILE).is_file():
        raise TrackingError(f"{path}: no {STATE_FILE} here", "pass a sweep directory or a `cmx train` run directory")
    check_journal(path)
    tracker = Tracker(path, uri)
    before = tracker.pending()
    if before and is_server_uri(tracker.uri):
        check_tracking_reachable(tracker.uri)
    tracker.flush(force=True)
    after = tracker.pending()
    return before - after, after
