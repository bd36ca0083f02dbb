"""A Tune callback that shows one live line: trials running/waiting/done/stopped, and the best so far."""

from __future__ import annotations

import time
from typing import Any

from ray import tune
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from cmx.core.metrics import DIVERGED, REJECTED, TrialStatus, better, epochs_of


class RichSweepProgress(tune.Callback):
    """Live sweep progress for the terminal (Tune's own table output is turned off)."""

    def __init__(self, *, total: int, metric: str, mode: str, max_epochs: int, console: Console | None = None) -> None:
        self.metric, self.mode, self.max_epochs = metric, mode, max_epochs
        self.running: set[str] = set()
        self.waiting = 0  # paused at a rung (scheduler asha-promotion)
        self.done = self.stopped = self.failed = 0
        self._recounted = 0.0
        self.best: tuple[float, str] | None = None
        self.total = total
        self.console = console
        self.progress: Progress | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles RunConfig (callbacks included) into the experiment dir; a live display
        # holds locks and a terminal, so it is rebuilt on first use instead.
        state = dict(self.__dict__)
        state.update(progress=None, console=None)
        return state

    def setup(
        self, stop: Any = None, num_samples: int | None = None, total_num_samples: int | None = None, **info: Any
    ) -> None:
        self._live()

    def _live(self) -> Progress:
        if self.progress is None:
            self.progress = Progress(
                SpinnerColumn(),
                TextColumn("[bold]trials"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.description}"),
                TimeElapsedColumn(),
                console=self.console or Console(stderr=True),
            )
            self.task = self.progress.add_task("", total=self.total)
            self.progress.start()
        return self.progress

    def _refresh(self) -> None:
        best = f"best {self.metric} {self.best[0]:.4f} ({self.best[1]})" if self.best else "best —"
        waiting = f"waiting {self.waiting} · " if self.waiting else ""
        stopped = f"{TrialStatus.SCHEDULER_STOPPED} {self.stopped}"  # "stopped early N", as the tables say
        text = f"running {len(self.running)} · {waiting}done {self.done} · {stopped} · failed {self.failed} · {best}"
        self._live().update(self.task, description=text, completed=self.done + self.stopped + self.failed)

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.running.add(trial.trial_id)
        self._refresh()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        value = result.get(self.metric)
        trained = not result.get(REJECTED) and not result.get(DIVERGED)
        if (
            trained
            and isinstance(value, (int, float))
            and better(value, self.best[0] if self.best else None, self.mode)
        ):
            self.best = (float(value), trial.trial_id)
        self._refresh()

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        # Trials pause and resume without a callback of their own: recount twice a second.
        now = time.monotonic()
        if now - self._recounted < 0.5:
            return
        self._recounted = now
        if self._recount(trials):
            self._refresh()

    def _recount(self, trials: list) -> bool:
        """Take running and waiting from the trials' statuses; True when either changed."""
        running = {t.trial_id for t in trials if t.status == "RUNNING"}
        waiting = sum(t.status == "PAUSED" for t in trials)
        changed = running != self.running or waiting != self.waiting
        self.running, self.waiting = running, waiting
        return changed

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.running.discard(trial.trial_id)
        if epochs_of(trial.last_result or {}) >= self.max_epochs:
            self.done += 1
        else:
            self.stopped += 1
        self._refresh()

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.running.discard(trial.trial_id)
        self.failed += 1
        self._refresh()

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._recount(trials)  # waiting trials stopped at the end are no longer waiting
        self._refresh()
        self._live().stop()
