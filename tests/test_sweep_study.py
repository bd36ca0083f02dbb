"""Each sweep's Optuna study: kept in a journal file in the sweep folder, opened by
`optuna.load_study` and by `cmx sweep dashboard` (optuna-dashboard, read in headless Chromium),
and used by `search.warm_start` to seed a later sweep. Real Ray sweeps on tiny real data."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from click.testing import CliRunner, Result
from optuna.trial import TrialState
from support.browser import rendered_text
from support.cli import run_cmx, start_cmx
from support.sweeps import write_spec

from cmx.cli.main import cli
from cmx.core.errors import ConfigError
from cmx.core.net import is_listening
from cmx.core.search_space import preview
from cmx.core.sweep_spec import load_sweep_spec
from cmx.sweep.storage import STUDY_FILE
from cmx.sweep.study import STATUS_ATTR, TRIAL_ID_ATTR, WARM_ATTR, journal_storage, warm_start
from cmx.sweep.tuner import StudySearch, build_searcher, run_sweep

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]  # the two sweeps take ~45 s together
A, B = "study_a", "study_b"
# Forced first trials: one the constraint rejects (16 * 5 > 60), one good, one whose tiny lr ASHA
# cuts at the first rung (trials run one at a time, so the good one sets that rung's bar first).
POINTS = [
    {"model.dim": 16, "model.kernel_size": 5, "optim.lr": 0.01},
    {"model.dim": 16, "model.kernel_size": 3, "optim.lr": 0.02},
    {"model.dim": 8, "model.kernel_size": 3, "optim.lr": 0.0001},
]


def _cmx(*args: str) -> Result:
    """`cmx ARGS` in this process (the commands that start no server or Ray)."""
    return CliRunner(env={"COLUMNS": "200"}).invoke(cli, list(args))


def _load(folder: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=journal_storage(folder / STUDY_FILE))


@pytest.fixture(scope="module")
def sweeps(fmnist_tiny_paths: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Sweep A (4 trials x 2 epochs, ASHA, one at a time, val/loss), then sweep B warm-started
    from A over a space that keeps only A's dim-8 trials (1 trial x 1 epoch)."""
    import ray

    tmp = tmp_path_factory.mktemp("study")
    common: dict[str, Any] = {"epochs": 2, "backend": "torchvision"}
    a = write_spec(tmp, fmnist_tiny_paths, name=A, samples=4, **common,
                   search={"metric": "val/loss", "mode": "min", "max_concurrent": 1, "points_to_evaluate": POINTS})  # fmt: skip
    a.write_text(a.read_text() + "constraints: ['model.dim * model.kernel_size <= 60']\n")
    b = write_spec(tmp, fmnist_tiny_paths, name=B, samples=1, **common,
                   search={"metric": "val/loss", "mode": "min", "warm_start": [A]},
                   scheduler={"max_epochs": 1},
                   space={"model.dim": {"type": "choice", "values": [8, 12]}})  # fmt: skip
    started = time.monotonic()
    try:
        out_a = run_sweep(load_sweep_spec(a), source_text=a.read_text())
        a_seconds = time.monotonic() - started
        dry = _cmx("sweep", "--space", str(b), "--dry-run")
        out_b = run_sweep(load_sweep_spec(b), source_text=b.read_text())
    finally:
        ray.shutdown()
    print(f"sweep A {a_seconds:.1f} s, both {time.monotonic() - started:.1f} s")
    yield {"tmp": tmp, "a": out_a, "b": out_b, "b_spec": b, "dry": dry, "root": tmp / "sweeps"}


def test_study_holds_every_trial_with_its_true_end(sweeps: dict[str, Any]) -> None:
    study = _load(sweeps["root"] / A, A)
    trials = study.get_trials()
    rows = {r.trial_id: r for r in sweeps["a"].trials}
    assert len(trials) == len(rows) == 4
    assert {t.user_attrs[TRIAL_ID_ATTR] for t in trials} == set(rows)  # one Optuna trial per Tune trial
    expected = {"completed": TrialState.COMPLETE, "stopped early": TrialState.PRUNED, "rejected": TrialState.PRUNED}
    for t in trials:
        row = rows[t.user_attrs[TRIAL_ID_ATTR]]
        assert t.state == expected[row.status], (t.number, row.status, t.state)
        assert t.user_attrs[STATUS_ATTR] == row.status.tag
        assert {k: t.params[k] for k in row.params} == row.params
        if row.status == "rejected":  # never trained: no value, no curve (TPE ranks it below all others)
            assert t.values is None and not t.intermediate_values
            continue
        # Every epoch's val/loss, keyed by epoch, and the value the sweep ranked it by.
        assert sorted(t.intermediate_values) == list(range(1, row.epochs + 1)), t.intermediate_values
        assert t.values == [t.intermediate_values[row.epochs]]
        assert abs(t.values[0] - row.metrics["val/loss"]) < 1e-9
    assert {"completed", "stopped early", "rejected"} <= {r.status for r in rows.values()}, rows
    best = study.best_trial
    assert (
        best.user_attrs[TRIAL_ID_ATTR]
        == min((r for r in rows.values() if r.status == "completed"), key=lambda r: r.metrics["val/loss"]).trial_id
    )


def test_warm_start_seeds_the_new_study_with_fitting_trials(sweeps: dict[str, Any]) -> None:
    old = [t for t in _load(sweeps["root"] / A, A).get_trials() if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    fits = [t for t in old if t.params["model.dim"] == 8]
    assert fits and len(fits) < len(old)  # some of A's trials fit B's space, some do not
    study = _load(sweeps["root"] / B, B)
    seeded = [t for t in study.get_trials() if t.user_attrs.get(WARM_ATTR) == A]
    own = [t for t in study.get_trials() if WARM_ATTR not in t.user_attrs]
    assert sorted((t.params["optim.lr"], t.state, t.values) for t in seeded) == sorted(
        (t.params["optim.lr"], t.state, t.values) for t in fits
    )
    assert len(own) == 1 and own[0].state == TrialState.COMPLETE  # B's own trial ran after them
    # The dry run's preview starts from the same history, so it shows the config B then ran.
    spec_b = load_sweep_spec(sweeps["b_spec"])
    assert preview(spec_b, 1, warm_start(spec_b, "b").trials) == [own[0].params]
    assert len(sweeps["b"].trials) == 1  # seeded trials are told to the sampler, not run again
    dry = sweeps["dry"]
    assert dry.exit_code == 0, dry.output[-2000:]
    assert f"warm start: {len(fits)} trials taken from {A} ({len(fits)}); {len(old) - len(fits)} skipped" in dry.output
    assert re.search(rf"warm start: skipped trial \d+ of '{A}': model.dim=16 is outside choices \[8, 12\]", dry.output)


def test_warm_start_from_an_unknown_sweep_names_the_field(sweeps: dict[str, Any]) -> None:
    spec = sweeps["b_spec"]
    bad = spec.with_name("bad.yaml")
    bad.write_text(spec.read_text().replace(f"- {A}", "- nosuch"))
    out = _cmx("sweep", "--space", str(bad), "--dry-run")
    assert isinstance(out.exception, ConfigError), out.output
    assert f"{bad}: search.warm_start: 'nosuch': no sweep named 'nosuch'" in out.exception.one_line()


def test_dashboard_unknown_sweep_and_grid_are_one_line_errors(sweeps: dict[str, Any], tmp_path: Path) -> None:
    out = _cmx("sweep", "dashboard", "nosuch", "--storage", str(sweeps["root"]))
    assert isinstance(out.exception, ConfigError) and "no sweep named 'nosuch'" in str(out.exception), out.output
    (tmp_path / "grid").mkdir()
    (tmp_path / "grid" / "cmx-sweep.yaml").write_text("name: grid\n")
    out = run_cmx("sweep", "dashboard", "grid", "--storage", str(tmp_path), timeout=60)
    assert out.returncode == 2 and "sweep 'grid' has no Optuna study" in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


@pytest.mark.browser
def test_dashboard_shows_the_study_and_its_trials_in_chromium(sweeps: dict[str, Any]) -> None:
    proc = start_cmx("sweep", "dashboard", A, "--storage", str(sweeps["root"]))
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"(http://127\.0\.0\.1:(\d+)/\S+)", line)
        assert match, line + (proc.stdout.read() if proc.poll() is not None else "")
        url, port = match.group(1), int(match.group(2))
        n = len(sweeps["a"].trials)
        # The trial list: the study, each trial with its state, params and cmx's trial id.
        wanted = [A, f"{n} Trials", "Complete", "Pruned", "Best Trial", "model.kernel_size", "cmx_status", "rejected"]
        text = rendered_text(f"{url}/trials", sweeps["tmp"] / "chromium-profile", wanted)
        assert all(w in text for w in wanted), ([w for w in wanted if w not in text], text[-1500:])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert not is_listening("127.0.0.1", port)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_study_search_ends_and_resume_without_ray_running(tmp_path: Path, fmnist_tiny_paths: dict[str, str]) -> None:
    """StudySearch driven as Tune drives it (suggest, results, completion, save/restore), on a real
    journal: every cmx status ends in its Optuna state; a trial proposed after the last save is
    failed on restore; a trial already ended is not told twice."""
    spec = load_sweep_spec(write_spec(tmp_path, fmnist_tiny_paths, name="unit", epochs=3))
    folder = tmp_path / "sweeps" / "unit"
    searcher = build_searcher(spec, str(folder))
    assert isinstance(searcher, StudySearch)

    def epoch(n: int, top1: float, **flags: float) -> dict[str, float]:
        return {"epoch": n, "training_iteration": n, "val/top1": top1, **flags}

    for tid in ("done", "cut", "rej", "div", "err", "late"):
        assert searcher.suggest(tid) is not None
    for n in (1, 2, 3):
        searcher.on_trial_result("done", epoch(n, 10.0 * n))
    searcher.on_trial_complete("done", epoch(3, 30.0))
    searcher.on_trial_complete("cut", epoch(1, 12.0))
    searcher.on_trial_complete("rej", {"epoch": 0, "val/top1": 0.0, "trial/rejected": 1.0})
    searcher.on_trial_result("div", epoch(1, 11.0))
    searcher.on_trial_complete("div", {"epoch": 2, "val/top1": 0.0, "trial/diverged": 1.0})
    searcher.on_trial_complete("err", None, error=True)
    searcher.save(str(tmp_path / "searcher.pkl"))
    assert searcher.suggest("after-save") is not None  # the driver dies before the next save

    restored = build_searcher(spec)  # what Tune rebuilds, then restores the saved state into
    restored.restore(str(tmp_path / "searcher.pkl"))
    restored.on_trial_complete("done", epoch(3, 99.0))  # Tune re-reports an ended trial: ignored
    restored.on_trial_complete("late", epoch(3, 20.0))
    trials = {t.user_attrs[TRIAL_ID_ATTR]: t for t in _load(folder, "unit").get_trials()}
    got = {
        tid: (t.state, t.values, dict(t.intermediate_values), t.user_attrs.get(STATUS_ATTR))
        for tid, t in trials.items()
    }
    nan = got["div"][2][2]
    assert nan != nan  # the diverged epoch is recorded as NaN, which TPE ranks worst
    got["div"][2][2] = "nan"
    assert got == {
        "done": (TrialState.COMPLETE, [30.0], {1: 10.0, 2: 20.0, 3: 30.0}, "completed"),
        "cut": (TrialState.PRUNED, [12.0], {1: 12.0}, "stopped_early"),
        "rej": (TrialState.PRUNED, None, {}, "rejected"),
        "div": (TrialState.PRUNED, None, {1: 11.0, 2: "nan"}, "diverged"),
        "err": (TrialState.FAIL, None, {}, "failed"),
        "late": (TrialState.COMPLETE, [20.0], {3: 20.0}, "completed"),
        "after-save": (TrialState.FAIL, None, {}, None),
    }
