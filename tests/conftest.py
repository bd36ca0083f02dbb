"""Shared test settings: keep Ray, MLflow and torch quiet, local and small."""

from __future__ import annotations

import os

# Set before any test imports ray/mlflow: no usage stats, no telemetry, no stray dashboards.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TQDM_DISABLE", "1")
