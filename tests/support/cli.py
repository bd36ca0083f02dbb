"""Running the real `cmx` console script in a subprocess, as a user does (Click's CliRunner tests
the same commands in-process).

    out = run_cmx("train", "--config", str(path), home=tmp_path / "home")
    assert out.returncode == 0, out.stderr

Every run gets the test process's environment plus `COLUMNS=200` (Rich wraps nothing) and
`TQDM_DISABLE=1`; `home=` gives it a `CMX_HOME` of its own and drops an inherited
`MLFLOW_TRACKING_URI` (the home's default store is used); `env=` overrides last, and a `None`
value there removes the variable.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

CMX = str(Path(sys.executable).parent / "cmx")
# `cmx ARGS` in this interpreter, printing RAY_IMPORTED or NO_RAY as its last line at exit.
_REPORT_RAY = (
    "import sys, atexit; from cmx.cli import main;"
    "atexit.register(lambda: print('RAY_IMPORTED' if 'ray' in sys.modules else 'NO_RAY'));"
    "main(sys.argv[1:])"
)


def cmx_env(*, home: str | Path | None = None, env: Mapping[str, str | None] | None = None) -> dict[str, str]:
    """The environment `run_cmx` and `start_cmx` give the CLI (see the module docstring)."""
    full = {**os.environ, "COLUMNS": "200", "TQDM_DISABLE": "1"}
    if home is not None:
        full["CMX_HOME"] = str(home)
        full.pop("MLFLOW_TRACKING_URI", None)
    for key, value in (env or {}).items():
        if value is None:
            full.pop(key, None)
        else:
            full[key] = str(value)
    return full


def cmx_command(*args: str, report_ray: bool = False) -> list[str]:
    """The command line of `cmx ARGS`: the console script, or with `report_ray` this interpreter
    running the CLI and printing whether Ray was imported (`NO_RAY` / `RAY_IMPORTED`) last."""
    return [sys.executable, "-c", _REPORT_RAY, *args] if report_ray else [CMX, *args]


def run_cmx(
    *args: str,
    home: str | Path | None = None,
    env: Mapping[str, str | None] | None = None,
    timeout: float = 300,
    cwd: str | Path | None = None,
    report_ray: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run `cmx ARGS` to the end; stdout and stderr captured as text."""
    return subprocess.run(
        cmx_command(*args, report_ray=report_ray),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cmx_env(home=home, env=env),
        cwd=cwd,
    )


def start_cmx(
    *args: str,
    home: str | Path | None = None,
    env: Mapping[str, str | None] | None = None,
    cwd: str | Path | None = None,
    stderr: int = subprocess.STDOUT,
    new_session: bool = True,
) -> subprocess.Popen[str]:
    """Start `cmx ARGS` in the background, stdout piped (stderr into it unless `stderr=PIPE`).

    In a session of its own by default, so `os.killpg(proc.pid, ...)` reaches it and its children,
    never the test process (a local Ray it started may still outlive it: `kill_ray_started_with`).
    """
    return subprocess.Popen(
        cmx_command(*args),
        env=cmx_env(home=home, env=env),
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        start_new_session=new_session,
    )
