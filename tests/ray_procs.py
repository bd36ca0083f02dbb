"""Stopping exactly the Ray processes a test started, never anyone else's (no `ray stop`).

A test gives the embedded Ray it starts its own temp dir through CMX_RAY_TMP; every Ray process
(GCS, raylet, dashboard, workers) inherits the driver's environment, so the variable finds them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from pathlib import Path

from cmx.cluster.runtime import RAY_TMP_ENV


def private_ray_tmp() -> str:
    """A fresh, short temp dir for one embedded Ray (Unix socket paths must stay < 107 bytes)."""
    return f"/tmp/cmxt-{uuid.uuid4().hex[:8]}"


def pids_with_env(key: str, value: str) -> list[int]:
    """Processes of this user whose environment holds key=value."""
    needle = f"{key}={value}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if needle in (proc / "environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except OSError:  # gone, or not ours
            continue
    return found


def kill_ray_started_with(tmp: str, timeout: float = 30.0) -> None:
    """SIGKILL every process that inherited CMX_RAY_TMP=tmp, and wait until they are gone."""
    deadline = time.monotonic() + timeout
    while pids := pids_with_env(RAY_TMP_ENV, tmp):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise TimeoutError(f"Ray processes {pids} survived SIGKILL")
        time.sleep(0.2)
