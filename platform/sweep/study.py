"""A sweep's Optuna study: where it is kept, warm starts from earlier sweeps, optuna-dashboard on it.

Every Optuna-searched sweep (all algorithms but `grid`) keeps its study in an Optuna *journal file*
in the sweep directory (`STUDY_FILE`), named after the sweep, so that `optuna.load_study`,
`optuna-dashboard` and `cmx sweep dashboard` work on it. A journal rather than an RDB (sqlite):
each change is one appended line, so a driver killed mid-write loses at most that line and the
study reopens; it needs no server; and its lock is a symlink/`open(O_EXCL)` file lock that works on
NFS, where sqlite's locking is unreliable. Sweeps stored under a URI (s3://...) keep their study in
memory, as Ray's `OptunaSearch` does by default (Optuna's journal needs a POSIX file): it is
pickled with Tune's searcher state, so resuming works, but there is no study file to open.

No Ray here: `cmx sweep --dry-run` reads warm starts without importing it. The searcher that
writes trial ends into the study is `cmx.sweep.tuner.StudySearch`.
"""

from __future__ import annotations

import math
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages import BaseStorage, InMemoryStorage, JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from cmx.core.errors import ConfigError
from cmx.core.metrics import TrialStatus
from cmx.core.paths import safe_child
from cmx.core.search_space import optuna_space
from cmx.core.sweep_spec import SweepSpec
from cmx.core.uris import is_uri
from cmx.sweep.storage import SPEC_FILE, STUDY_FILE, experiment_root

# Study and trial attributes cmx writes (user attributes: optuna-dashboard shows them).
METRICS_ATTR = "cmx_metrics"  # study: the objective metric names, in order
MAX_EPOCHS_ATTR = "cmx_max_epochs"  # study: epochs a trial that is not stopped trains
TRIAL_ID_ATTR = "cmx_trial_id"  # trial: Tune's trial id (the MLflow run's `cmx.trial_id`, trial_<id> folder)
STATUS_ATTR = "cmx_status"  # trial: cmx's TrialStatus tag (completed, stopped_early, rejected, ...)
WARM_ATTR = "cmx_warm_start"  # trial: the earlier sweep a warm-start trial was copied from
TAKEN = (TrialState.COMPLETE, TrialState.PRUNED)  # what a warm start copies: trials that ended with a value


def study_file(path: str) -> Path | None:
    """The journal file of the sweep at `path`; None when the sweep is stored under a URI."""
    return None if is_uri(path) else Path(path) / STUDY_FILE


def journal_storage(file: Path) -> JournalStorage:
    """Optuna's journal storage on `file` (created on first write)."""
    return JournalStorage(JournalFileBackend(str(file)))


def new_study_storage(path: str) -> BaseStorage:
    """The storage a new sweep at `path` keeps its study in; a study left there by a run whose Tune
    state was never saved is discarded, as Tune starts that sweep over."""
    file = study_file(path)
    if file is None:
        return InMemoryStorage()
    file.parent.mkdir(parents=True, exist_ok=True)
    file.unlink(missing_ok=True)
    return journal_storage(file)


def directions(spec: SweepSpec) -> list[Literal["maximize", "minimize"]]:
    """Optuna's study directions for the spec's objectives."""
    return ["maximize" if o.mode == "max" else "minimize" for o in spec.objectives()]


def create_study(spec: SweepSpec, storage: BaseStorage, warm: list[FrozenTrial]) -> optuna.Study:
    """The sweep's study in `storage`, named after the sweep, seeded with the warm-start trials.

    Ray's `OptunaSearch` then opens it by name (`load_if_exists`) with its sampler."""
    study = optuna.create_study(storage=storage, study_name=spec.name, directions=directions(spec))
    study.set_user_attr(METRICS_ATTR, [o.metric for o in spec.objectives()])
    study.set_user_attr(MAX_EPOCHS_ATTR, spec.max_epochs)
    if warm:
        study.add_trials(warm)
    return study


# ------------------------------------------------------------------ reading a sweep's study


def load_sweep_study(folder: Path, name: str, *, what: str) -> optuna.Study:
    """The study of the sweep in `folder`; ConfigError (one line, starting with `what`) when the
    folder holds no sweep or the sweep has no study."""
    storage, study_name = _sweep_storage(folder, name, what=what)
    return optuna.load_study(study_name=study_name, storage=storage)


def _sweep_storage(folder: Path, name: str, *, what: str) -> tuple[JournalStorage, str]:
    """The journal storage of the sweep in `folder` and its study's name."""
    if not (folder / SPEC_FILE).is_file():
        raise ConfigError(f"{what}: no sweep named {name!r} under {folder.parent}", "see `cmx sweep list`")
    file = folder / STUDY_FILE
    if not file.is_file():
        raise ConfigError(
            f"{what}: sweep {name!r} has no Optuna study ({STUDY_FILE} is missing)",
            "grid sweeps have none, nor sweeps run before cmx kept studies; run it again to make one",
        )
    storage = journal_storage(file)
    names = optuna.get_all_study_names(storage)
    if not names:
        raise ConfigError(f"{what}: {file} holds no study yet", "wait for the sweep's first trial")
    return storage, name if name in names else names[0]


# ------------------------------------------------------------------ warm starts


@dataclass
class WarmStart:
    """What `search.warm_start` takes from earlier sweeps: trials ready for `study.add_trials`."""

    trials: list[FrozenTrial] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # one line per skipped trial (or sweep)
    skipped: int = 0
    sources: dict[str, int] = field(default_factory=dict)  # sweep name -> trials taken

    def summary(self) -> str:
        """One line, e.g. `warm start: 5 trials taken from a (3), b (2); 2 skipped`."""
        taken = ", ".join(f"{k} ({v})" for k, v in self.sources.items())
        return f"warm start: {len(self.trials)} trials taken from {taken}; {self.skipped} skipped"


def _outside(value: Any, dist: BaseDistribution) -> bool:
    """True when `value` is not a value `dist` can sample."""
    if isinstance(dist, CategoricalDistribution):
        return value not in dist.choices
    if isinstance(dist, (FloatDistribution, IntDistribution)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return True
        if isinstance(dist, IntDistribution) and value != int(value):
            return True
        off_step = (
            dist.step is not None and abs((value - dist.low) / dist.step - round((value - dist.low) / dist.step)) > 1e-8
        )
        return not dist.low <= value <= dist.high or off_step
    return True


def _describe(dist: BaseDistribution) -> str:
    if isinstance(dist, CategoricalDistribution):
        return f"choices {list(dist.choices)}"
    if isinstance(dist, (FloatDistribution, IntDistribution)):
        return f"[{dist.low}, {dist.high}]"
    return type(dist).__name__


def _misfit(params: dict[str, Any], space: dict[str, BaseDistribution]) -> str | None:
    """Why `params` does not fit `space` (None when it does)."""
    if set(params) != set(space):
        missing, extra = sorted(set(space) - set(params)), sorted(set(params) - set(space))
        return (
            "other keys ("
            + "; ".join(
                part
                for part in (
                    f"lacks {', '.join(missing)}" if missing else "",
                    f"has {', '.join(extra)}" if extra else "",
                )
                if part
            )
            + ")"
        )
    for key, dist in space.items():
        if _outside(params[key], dist):
            return f"{key}={params[key]!r} is outside {_describe(dist)}"
    return None


def warm_start(spec: SweepSpec, source: str, *, max_notes: int = 10) -> WarmStart:
    """The finished (complete or pruned) trials of the sweeps `search.warm_start` names that fit
    this sweep's space (same keys, values inside its ranges and choices), as new trials of its study.
    Trials their sweep's constraints rejected carry no result and are skipped (this sweep's own
    constraints decide what it rejects).

    Trials that do not fit are skipped with a note; an unknown sweep, one without a study or one
    under URI storage is a ConfigError naming `search.warm_start`.
    """
    out = WarmStart()
    names = spec.search.warm_start
    if not names:
        return out
    root = experiment_root(spec)
    field_ = f"{source}: search.warm_start"
    if is_uri(root):
        raise ConfigError(
            f"{field_}: sweeps under {root} keep no Optuna study file to warm-start from",
            "warm-start from sweeps kept on a local or shared (NFS) path",
        )
    space = optuna_space(spec)
    objectives = [o.metric for o in spec.objectives()]
    for name in names:
        if name == spec.name:
            raise ConfigError(f"{field_}: {name!r} is this sweep itself", "name earlier sweeps only")
        folder = safe_child(root, name, "search.warm_start name")
        study = load_sweep_study(Path(folder), name, what=f"{field_}: {name!r}")
        theirs = study.user_attrs.get(METRICS_ATTR)
        if theirs != objectives or [d.name.lower() for d in study.directions] != directions(spec):
            raise ConfigError(
                f"{field_}: sweep {name!r} optimised {theirs}, this one {objectives}",
                "warm-start only from sweeps with the same objective (metric and mode)",
            )
        taken = 0
        for t in study.get_trials(deepcopy=False, states=TAKEN):
            if t.user_attrs.get(WARM_ATTR):
                continue  # itself a warm start: taken from its own sweep, if listed
            rejected = t.user_attrs.get(STATUS_ATTR) == TrialStatus.REJECTED.tag
            why = "its sweep's constraints rejected it (no result)" if rejected else _misfit(t.params, space)
            if why is not None:
                out.skipped += 1
                if len(out.notes) < max_notes:
                    out.notes.append(f"warm start: skipped trial {t.number} of {name!r}: {why}")
                continue
            out.trials.append(
                optuna.trial.create_trial(
                    state=t.state,
                    values=t.values,
                    params=t.params,
                    distributions={k: space[k] for k in t.params},
                    intermediate_values=t.intermediate_values,
                    user_attrs={**t.user_attrs, WARM_ATTR: name},
                )
            )
            taken += 1
        out.sources[name] = taken
    if out.skipped > len(out.notes):
        out.notes.append(f"warm start: ... and {out.skipped - len(out.notes)} more skipped")
    return out


# ------------------------------------------------------------------ optuna-dashboard


@contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    """SIGTERM stops the server as Ctrl-C does (KeyboardInterrupt), then the old handler is back."""

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        old = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: signals are not ours to handle
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def serve_dashboard(folder: Path, name: str, *, port: int = 0, on_ready: Callable[[str], None] | None = None) -> None:
    """optuna-dashboard on the sweep's study at http://127.0.0.1:PORT (0: a free port) until Ctrl-C
    or SIGTERM; `on_ready` gets the URL once the server listens."""
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    from optuna_dashboard import wsgi

    storage, study_name = _sweep_storage(folder, name, what="cmx sweep dashboard")

    class Server(ThreadingMixIn, WSGIServer):  # the page fetches several API routes at once
        daemon_threads = True

    class Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # one line per request is noise here
            pass

    try:
        server = make_server("127.0.0.1", port, wsgi(storage), server_class=Server, handler_class=Quiet)
    except OSError as e:
        raise ConfigError(
            f"cmx sweep dashboard: port {port} on 127.0.0.1: {e.strerror}", "give another --port"
        ) from None
    url = f"http://127.0.0.1:{server.server_port}/dashboard/studies/{storage.get_study_id_from_name(study_name)}"
    try:
        with _stop_on_sigterm():
            if on_ready:
                on_ready(url)
            sys.stdout.flush()
            server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
