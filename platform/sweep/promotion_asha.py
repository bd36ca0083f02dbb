"""Promotion-based ASHA (Li et al. 2020, "A System for Massively Parallel Hyperparameter Tuning").

Tune's `ASHAScheduler` decides at each rung whether a trial *stops*: a trial continues unless it is
below the cut-off of the results the rung holds so far. The first trials to reach a rung have
nothing to be compared with, so they pass every rung; with two trial slots the first three to five
of 16 trials ran all their epochs, half of the sweep's budget (docs/benchmarks.md §4).

Here a trial *pauses* at each rung (Tune checkpoints it and frees its slot) and is resumed only
once it ranks in the top 1/η of all the trials that have reached that rung, as the paper's ASHA
does: when a slot is free the scheduler promotes the best waiting trial of the highest rung that
has one, and starts a new trial otherwise. When the search has proposed all its trials and nothing
runs any more, the best waiting trial of the highest rung is promoted until one trial has trained
the full budget; the rest stay stopped where they waited.

Two things Tune does not do for a scheduler are handled here:
- The searcher (Optuna) hears of a trial when it completes; a paused trial is not complete, so TPE
  would learn nothing until the end. `RungFeedback` wraps the searcher and tells it a trial's
  result when the trial first waits at a rung (as Tune's ASHA did by stopping it there); later
  results of that trial are not passed on.
- Tune saves the searcher's state with each experiment-state save but not the scheduler's, so the
  rung table lives in the `RungFeedback` wrapper and `cmx sweep --resume` continues with it: the
  trials that were waiting stay paused instead of all running on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher

from cmx.cluster.ray_compat import save_trial_with_next_state, unbuffered_results
from cmx.core.metrics import EPOCH


@dataclass
class RungBook:
    """Which trials reached each rung (and their score, higher is better) and which moved on."""

    milestones: list[int]
    scores: list[dict[str, float]] = field(default_factory=list)
    promoted: list[set[str]] = field(default_factory=list)
    waiting: set[str] = field(default_factory=set)
    finishing: set[str] = field(default_factory=set)  # promoted to the full budget at the end
    full_budget_reached: bool = False

    def __post_init__(self) -> None:
        self.scores = self.scores or [{} for _ in self.milestones]
        self.promoted = self.promoted or [set() for _ in self.milestones]

    def promotable(self, rung: int, reduction_factor: float) -> list[str]:
        """Trials in the rung's top 1/η (of all that reached it) not yet promoted, best first."""
        scores = self.scores[rung]
        top = math.floor(len(scores) / reduction_factor + 1e-9)
        ranked = sorted(scores, key=lambda tid: scores[tid], reverse=True)[:top]
        return [tid for tid in ranked if tid not in self.promoted[rung]]

    def promote(self, rung: int, trial_id: str) -> None:
        self.promoted[rung].add(trial_id)
        self.waiting.discard(trial_id)

    def highest_rung(self, trial_id: str) -> int | None:
        reached = [k for k, s in enumerate(self.scores) if trial_id in s]
        return max(reached) if reached else None


def rung_milestones(grace_period: int, reduction_factor: float, max_t: int) -> list[int]:
    """Epochs at which trials are compared: grace·η^k below max_t (max_t itself ends a trial)."""
    out: list[int] = []
    t = float(grace_period)
    while round(t) < max_t:
        if not out or round(t) > out[-1]:
            out.append(round(t))
        t *= reduction_factor
    return out


class RungFeedback(Searcher):
    """Wraps a searcher: tells it a trial's result when the trial first waits at a rung.

    Also carries the scheduler's `RungBook`, so that Tune saves it with the searcher's state, and
    caps the trials at work (proposed, not finished, not waiting) at `max_concurrent`: Tune's own
    ConcurrencyLimiter counts waiting trials too, and stops proposing once they fill its slots.
    """

    def __init__(self, searcher: Searcher, book: RungBook, max_concurrent: int | None = None) -> None:
        self.searcher = searcher
        self.book = book
        self.max_concurrent = max_concurrent
        self.told: set[str] = set()
        self.live: set[str] = set()  # proposed and not finished
        super().__init__(metric=searcher.metric, mode=searcher.mode)

    def tell(self, trial_id: str, result: dict[str, Any]) -> None:
        """Complete the trial in the wrapped searcher with this result (once)."""
        if trial_id in self.told:
            return
        self.told.add(trial_id)
        self.searcher.on_trial_complete(trial_id, result=result)

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return self.searcher.set_search_properties(metric, mode, config, **spec)

    def suggest(self, trial_id: str) -> dict | None:
        if self.max_concurrent is not None and len(self.live - self.book.waiting) >= self.max_concurrent:
            return None
        config = self.searcher.suggest(trial_id)
        if config is not None:
            self.live.add(trial_id)
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id not in self.told:
            self.searcher.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.live.discard(trial_id)
        if trial_id not in self.told:
            self.searcher.on_trial_complete(trial_id, result=result, error=error)

    def get_state(self) -> dict:
        return {"book": self.book, "told": set(self.told), "live": set(self.live)}

    def set_state(self, state: dict) -> None:
        self.book = state["book"]
        self.told = set(state["told"])
        self.live = set(state["live"])

    def save(self, checkpoint_path: str) -> None:
        self.searcher.save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        self.searcher.restore(checkpoint_path)


def find_feedback(search_alg: Any) -> RungFeedback | None:
    """The RungFeedback in Tune's chain of searcher wrappers, if there is one."""
    s = search_alg
    while s is not None:
        if isinstance(s, RungFeedback):
            return s
        s = getattr(s, "searcher", None)
    return None


# A trial must stop at the rung's epoch, not a few buffered results later (as HyperBand).
@unbuffered_results
class PromotionASHA(FIFOScheduler):
    """ASHA that pauses trials at rungs and resumes the top 1/η (see the module docstring)."""

    def __init__(
        self,
        *,
        metric: str,
        mode: str,
        max_t: int,
        grace_period: int = 1,
        reduction_factor: float = 3.0,
        time_attr: str = EPOCH,
        skip_flags: tuple[str, ...] = (),
        max_concurrent: int | None = None,
    ) -> None:
        super().__init__()
        self._metric, self._mode = metric, mode
        self._max_t = max_t
        self._rf = reduction_factor
        self._time_attr = time_attr
        self._skip_flags = skip_flags  # results carrying one of these ran no epoch (rejected, diverged)
        self._sign = 1.0 if mode == "max" else -1.0
        self._max_concurrent = max_concurrent  # trials at work at once, waiting ones not counted
        self._own_book = RungBook(rung_milestones(grace_period, reduction_factor, max_t))
        self._last_book = self._own_book

    def new_book(self) -> RungBook:
        """An empty rung table for these milestones (for a RungFeedback built beside this)."""
        return RungBook(list(self._own_book.milestones))

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return True  # metric and mode are fixed by the sweep spec

    def _book(self, controller: Any) -> RungBook:
        feedback = find_feedback(controller.search_alg)
        self._last_book = feedback.book if feedback is not None else self._own_book
        return self._last_book

    def _score(self, result: dict[str, Any]) -> float:
        if self._metric is None:
            return -math.inf
        value = result.get(self._metric)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return -math.inf
        return self._sign * float(value)

    def on_trial_add(self, tune_controller: Any, trial: Trial) -> None:
        # A resumed sweep: trials that waited at a rung when the driver stopped wait again.
        if trial.trial_id in self._book(tune_controller).waiting and trial.status == Trial.PENDING:
            trial.set_status(Trial.PAUSED)

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict[str, Any]) -> str:
        if any(result.get(flag) for flag in self._skip_flags):
            return TrialScheduler.CONTINUE
        epoch = result.get(self._time_attr)
        if epoch is None:
            return TrialScheduler.CONTINUE
        book = self._book(tune_controller)
        if epoch >= self._max_t:
            book.full_budget_reached = True
            return TrialScheduler.STOP
        tid = trial.trial_id
        for rung, milestone in enumerate(book.milestones):
            if epoch < milestone or tid in book.scores[rung]:
                continue
            book.scores[rung][tid] = self._score(result)
            if tid in book.finishing or tid in book.promotable(rung, self._rf):
                book.promote(rung, tid)
                return TrialScheduler.CONTINUE
            book.waiting.add(tid)
            feedback = find_feedback(tune_controller.search_alg)
            if feedback is not None:
                feedback.tell(tid, result)
            return TrialScheduler.PAUSE
        return TrialScheduler.CONTINUE

    def choose_trial_to_run(self, tune_controller: Any) -> Trial | None:
        book = self._book(tune_controller)
        trials = tune_controller.get_trials()
        paused = {t.trial_id: t for t in trials if t.status == Trial.PAUSED}
        at_work = sum(t.status in (Trial.PENDING, Trial.RUNNING) for t in trials)
        if self._max_concurrent is not None and at_work >= self._max_concurrent:
            paused = {}  # no promotion now; a pending trial may still start (Tune's FIFO)
        for rung in reversed(range(len(book.milestones))):
            for tid in book.promotable(rung, self._rf):
                if tid in paused:
                    book.promote(rung, tid)
                    return paused[tid]
        for t in trials:
            if t.status == Trial.PENDING:
                return t
        if at_work or not paused or not tune_controller.search_alg.is_finished():
            return None
        # The search is over and only waiting trials are left.
        if not book.full_budget_reached:
            best = self._best_waiting(book, paused)
            if best is not None:
                book.promote(book.highest_rung(best.trial_id) or 0, best.trial_id)
                book.finishing.add(best.trial_id)
                return best
        for t in paused.values():
            book.waiting.discard(t.trial_id)
            tune_controller.stop_trial(t)
            _save_status_with_next_state(tune_controller, t)
        return None

    def _best_waiting(self, book: RungBook, paused: dict[str, Trial]) -> Trial | None:
        for rung in reversed(range(len(book.milestones))):
            here = [tid for tid in book.scores[rung] if tid in paused and book.highest_rung(tid) == rung]
            if here:
                return paused[max(here, key=lambda tid: book.scores[rung][tid])]
        return None

    def debug_string(self) -> str:
        b = self._last_book
        rungs = zip(b.milestones, b.scores, b.promoted, strict=True)
        return "PromotionASHA: " + ", ".join(f"epoch {m}: {len(s)} reached, {len(p)} promoted" for m, s, p in rungs)


def _save_status_with_next_state(tune_controller: Any, trial: Trial) -> None:
    """Make Tune write a stopped paused trial's new status into its saved experiment state.

    Tune re-serializes only the trials it marked; stopping one that holds no actor marks nothing,
    so the saved state kept it PAUSED and re-running a finished sweep trained it on.
    """
    save_trial_with_next_state(tune_controller, trial)
