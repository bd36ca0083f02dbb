"""Ray's private APIs, reached only through this module, for the version range they were read in.

Each use is a gap in Ray's public API that cmx needed (docs/architecture.md, Ray Tune):
- a restored `Tuner` keeps the callbacks pickled in its state: the driver's must replace them;
- a trial's checkpoint manager (`run_metadata.checkpoint_manager`) and its list of results, to
  find the best checkpoint and to delete superseded ones only when resuming stays safe;
- the controller's "save this trial with the next state" mark, for a paused trial that is stopped;
- a scheduler that must see every result unbuffered (`_supports_buffered_results`);
- the cluster launcher's `prepare_config` + `validate_config`, what `ray up` runs minus cloud calls;
- `OptunaSearch`'s study and its map of Tune trial id to Optuna trial, which have no public getter:
  cmx's searcher records each trial's true end (pruned, failed) in the sweep's study;
- the GCS placement-group table with each group's creator and whether it died (the public table
  leaves these out): a stopped data-parallel trial's worker group outlives its dead controller.
Every entry point checks the installed Ray against `TESTED` first and fails with one line.
"""

from __future__ import annotations

import functools
from typing import Any, TypeVar

from cmx.core.errors import ClusterError
from cmx.core.versions import checked_version

# The Ray releases these internals were read in and tested against (pyproject pins the same range).
TESTED = ((2, 60, 0), (2, 61, 0))  # [low, high)

T = TypeVar("T", bound=type)


@functools.cache
def check_version() -> str:
    """The installed Ray version; ClusterError (one line) outside the tested range."""
    return checked_version(
        "ray",
        "Ray",
        TESTED,
        ClusterError,
        missing_hint="run `make setup`",
        install_hint="install a tested release: pip install 'ray[default,tune,train]>=2.60,<2.61'",
    )


def replace_restored_callbacks(tuner: Any, callbacks: list[Any]) -> None:
    """Give a `Tuner.restore`d tuner this driver's callbacks (Ray has no public setter)."""
    check_version()
    tuner._local_tuner._run_config.callbacks = callbacks  # noqa: SLF001


def checkpoint_manager(trial: Any) -> Any:
    """The trial's Tune checkpoint manager, or None (before its first checkpoint)."""
    check_version()
    return getattr(getattr(trial, "run_metadata", None), "checkpoint_manager", None)


def forget_checkpoint(manager: Any, result: Any) -> None:
    """Drop one checkpoint result from the manager's list, as Tune's own `num_to_keep` does."""
    check_version()
    manager._checkpoint_results = [r for r in manager._checkpoint_results if r is not result]  # noqa: SLF001


def save_trial_with_next_state(tune_controller: Any, trial: Any) -> None:
    """Make Tune re-serialize `trial` at its next experiment-state save."""
    check_version()
    controller = getattr(tune_controller, "_tune_controller", tune_controller)  # unwrap Tune's wrapper
    mark = getattr(controller, "_mark_trial_to_checkpoint", None)
    if mark is not None:
        mark(trial)


def unbuffered_results(cls: T) -> T:
    """Class decorator: Tune must hand this scheduler every result as it comes (no buffering)."""
    check_version()
    cls._supports_buffered_results = False  # type: ignore[attr-defined]  # noqa: SLF001
    return cls


def prepare_cluster_config(config: dict[str, Any]) -> dict[str, Any]:
    """Ray's defaults filled into a cluster-launcher config, as `ray up` does (no cloud calls)."""
    check_version()
    from ray.autoscaler._private.util import prepare_config

    return prepare_config(config)


def validate_cluster_config(prepared: dict[str, Any]) -> None:
    """Ray's schema check of a prepared config (validating before preparing rejects valid files)."""
    check_version()
    from ray.autoscaler._private.util import validate_config

    validate_config(prepared)


def optuna_search_study(searcher: Any) -> Any:
    """The `optuna.Study` an `OptunaSearch` proposes from (None before its space is set)."""
    check_version()
    return searcher._ot_study  # noqa: SLF001


def optuna_search_trials(searcher: Any) -> dict[str, Any]:
    """An `OptunaSearch`'s live `optuna.Trial` per Tune trial id (those it proposed)."""
    check_version()
    trials: dict[str, Any] = searcher._ot_trials  # noqa: SLF001
    return trials


def actor_placement_groups(job_id: str) -> list[tuple[Any, bool]]:
    """This job's live placement groups made by an actor, each with whether that actor has died.

    Detached groups and the driver's own (Tune's trial groups) are left out. Ray frees a group whose
    creator died only when the job ends too. Read from the GCS, as `ray.util.placement_group_table`
    does, so no dashboard is needed.
    """
    check_version()
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup

    table = gcs_pb2.PlacementGroupTableData  # type: ignore[attr-defined]  # generated protobuf
    nil_actor = ray.ActorID.nil().binary()
    job = bytes.fromhex(job_id)
    found = []
    for raw in state._connect_and_get_accessor().get_placement_group_table():  # noqa: SLF001
        data = table.FromString(raw)
        if data.is_detached or data.state == table.REMOVED or data.creator_job_id != job:
            continue
        if data.creator_actor_id in (b"", nil_actor):
            continue
        found.append((PlacementGroup(ray.PlacementGroupID(data.placement_group_id)), data.creator_actor_dead))
    return found
