"""Where cmx keeps its state on this machine: data, runs, sweeps, the local MLflow store."""

from __future__ import annotations

import os
from pathlib import Path


def cmx_home() -> Path:
    """`$CMX_HOME`, or `~/.cmx`; created on first use."""
    home = Path(os.environ.get("CMX_HOME") or Path.home() / ".cmx").expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


def data_dir() -> Path:
    """Default folder for built-in datasets and converted .beton files."""
    return cmx_home() / "data"


def runs_dir() -> Path:
    """Default folder for `cmx train` run directories."""
    return cmx_home() / "runs"


def sweeps_dir() -> Path:
    """Default Ray Tune storage path for sweeps."""
    return cmx_home() / "sweeps"
