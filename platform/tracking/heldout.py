"""The held-out test split: kept apart from val, and measured once per chosen finished trial.

A sweep's searcher and scheduler only ever see `val/` metrics (the trainer builds loaders on
`data.train_path` and `data.val_path` alone; `cmx.core.config.check_test_apart` refuses a test
split that is the val data). After the sweep, `evaluate_trials_on_test` runs the
chosen trials' best checkpoints on `data.test_path` and logs `test/top1`, `test/top5`, `test/loss`
to each trial's (finished) MLflow run. A trial folder given in `keep_in` keeps the score
(`metrics.TEST_SCORE_FILE`): running a finished sweep or confirm stage again reuses it, and measures again
only when the checkpoint or the test data changed, so the test split is touched once per trial.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

from cmx.core import metrics as M
from cmx.core.errors import DataError
from cmx.core.files import atomic_write_text, data_fingerprint, read_json
from cmx.core.uris import is_uri
from cmx.pipelines.trainer import evaluate
from cmx.tracking.query import sweep_trials
from cmx.tracking.store import TAG_TRIAL, make_client, resolve_uri

log = logging.getLogger("cmx.tracking")

TAG_TEST_PATH = "cmx.data.test_path"
TAG_TEST_FINGERPRINT = "cmx.data.test_fingerprint"
TAG_TEST_SAMPLES = "cmx.test_samples"


@dataclass(frozen=True)
class TestScore:
    """One trial's best checkpoint measured on the test split."""

    __test__ = False  # not a pytest test class

    trial_id: str
    checkpoint: str
    top1: float  # percent
    top5: float  # percent
    loss: float
    num_samples: int
    run_id: str | None  # the MLflow run the metrics went to (None: not logged)

    def metrics(self) -> dict[str, float]:
        """`test/top1`, `test/top5`, `test/loss`."""
        return {M.TEST_TOP1: self.top1, M.TEST_TOP5: self.top5, M.TEST_LOSS: self.loss}


def evaluate_trials_on_test(
    checkpoints: Mapping[str, str | Path],
    test_path: str,
    *,
    tracking_uri: str | None = None,
    sweep: str | None = None,
    device: Literal["auto", "cpu", "cuda"] = "auto",
    threads: int | None = None,
    batch_size: int | None = None,
    keep_in: Mapping[str, str | Path] | None = None,
) -> dict[str, TestScore]:
    """Evaluate each trial's checkpoint (`{trial_id: checkpoint}`) on `test_path` once.

    `keep_in` (`{trial_id: trial folder}`) keeps each score in the folder's `M.TEST_SCORE_FILE`; a kept
    score for the same checkpoint and test data is returned as it is, not measured or logged again.

    With `sweep` (its name) the scores are logged to each trial's run of that sweep in the
    MLflow store `tracking_uri` (the newest sweep of that name): metrics `test/top1`,
    `test/top5`, `test/loss` and the test path and fingerprint as tags. A store that cannot be
    written only logs a warning: the scores are returned either way, keyed by trial id.
    """
    if is_uri(test_path):
        raise DataError(f"data.test_path {test_path}: the test evaluation reads local data only", "copy it locally")
    if not Path(test_path).expanduser().exists():
        raise DataError(f"data.test_path: {test_path} does not exist", "fix the path, or export the test split")
    keep_in = keep_in or {}
    fingerprint = data_fingerprint(test_path)
    kept: dict[str, TestScore] = {}
    scores: dict[str, TestScore] = {}
    for trial_id, checkpoint in checkpoints.items():
        folder = keep_in.get(trial_id)
        earlier = kept_score(folder, checkpoint, test_path, fingerprint) if folder is not None else None
        if earlier is not None:
            kept[trial_id] = earlier
            continue
        out = evaluate(checkpoint, test_path, batch_size=batch_size, device=device, threads=threads)
        scores[trial_id] = TestScore(
            trial_id=trial_id,
            checkpoint=str(checkpoint),
            top1=float(out[M.VAL_TOP1]),
            top5=float(out[M.VAL_TOP5]),
            loss=float(out[M.VAL_LOSS]),
            num_samples=int(out["num_samples"]),
            run_id=None,
        )
    if sweep is not None:  # the new scores, and kept ones that no store took yet
        scores.update({t: s for t, s in kept.items() if s.run_id is None})
        if scores:
            scores = _log_scores(scores, test_path, tracking_uri, sweep, fingerprint)
    for trial_id, score in scores.items():
        if trial_id in keep_in:
            keep_score(keep_in[trial_id], score, test_path, fingerprint)
    return {trial_id: scores.get(trial_id) or kept[trial_id] for trial_id in checkpoints}


def kept_score(folder: str | Path, checkpoint: str | Path, test_path: str, fingerprint: str) -> TestScore | None:
    """The score kept in `folder` for this checkpoint and test data (path and fingerprint), or None."""
    if is_uri(str(folder)) or not (Path(folder) / M.TEST_SCORE_FILE).is_file():
        return None
    record = read_json(
        Path(folder) / M.TEST_SCORE_FILE, what="test score", error=DataError, hint="delete it to measure again"
    )
    if not isinstance(record, dict):
        return None
    same = (record.get("checkpoint"), record.get("test_path"), record.get("fingerprint")) == (
        str(checkpoint),
        test_path,
        fingerprint,
    )
    try:
        return TestScore(**{k: record[k] for k in TestScore.__dataclass_fields__}) if same else None
    except (KeyError, TypeError):
        return None  # an older or foreign file: measure again


def keep_score(folder: str | Path, score: TestScore, test_path: str, fingerprint: str) -> None:
    """Write `score` to `folder`'s M.TEST_SCORE_FILE (local folders only), with the test metrics by name."""
    if is_uri(str(folder)):
        return
    record = {**score.metrics(), **asdict(score), "test_path": test_path, "fingerprint": fingerprint}
    atomic_write_text(Path(folder) / M.TEST_SCORE_FILE, json.dumps(record, indent=1))


def _log_scores(
    scores: dict[str, TestScore], test_path: str, uri: str | None, sweep: str, fingerprint: str
) -> dict[str, TestScore]:
    """Log each score to its trial's run; returns the scores with the run ids filled in."""
    try:
        _, trials = sweep_trials(uri, sweep)
        client = make_client(resolve_uri(uri))
        runs = {t.tags.get(TAG_TRIAL): t.run_id for t in trials}
        out = {}
        for trial_id, score in scores.items():
            run_id = runs.get(trial_id)
            if run_id is None:
                log.warning("sweep %s: no MLflow run for trial %s; its test score is not logged", sweep, trial_id)
                out[trial_id] = score
                continue
            for key, value in score.metrics().items():
                client.log_metric(run_id, key, value)
            client.set_tag(run_id, TAG_TEST_PATH, test_path)
            client.set_tag(run_id, TAG_TEST_FINGERPRINT, fingerprint)
            client.set_tag(run_id, TAG_TEST_SAMPLES, str(score.num_samples))
            out[trial_id] = replace(score, run_id=run_id)
        return out
    except Exception as e:  # noqa: BLE001 - a store that is down: the scores still count
        log.warning("sweep %s: test scores not logged to MLflow (%s)", sweep, str(e).splitlines()[0][:200])
        return scores
