"""A real `mlflow server` process for the tracking tests (sqlite backend, temp artifact root).

The `mlflow_server` fixture (tests/conftest.py) runs one per test module. The server
binds 127.0.0.1 on a free port; `stop()` / `start()` take it down and bring it back on the same
port and backend (the outage test), and teardown stops it by pid.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from cmx.core.net import free_port

MLFLOW = str(Path(sys.executable).parent / "mlflow")
# `--workers 1` and no job runner: healthy in ~9 s at ~560 MB instead of 18 s / 1.4 GB with the
# defaults (2-core machine; docs/architecture.md, MLflow). Under a loaded machine it can take several times that.
START_TIMEOUT_S = 120.0


class MlflowServer:
    """One `mlflow server` on 127.0.0.1: `uri`, `backend_uri`, `artifact_root`, `stop()`, `start()`."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.backend_uri = f"sqlite:///{root / 'mlflow.db'}"
        self.artifact_root = root / "artifacts"
        self.log = root / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start the server (same port and backend as before) and wait for /health."""
        env = {
            **os.environ,
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "MLFLOW_DISABLE_TELEMETRY": "true",
        }
        cmd = [
            MLFLOW, "server",
            "--backend-store-uri", self.backend_uri,
            # Proxied artifacts, as `cmx server` runs it: uploads go over HTTP too.
            "--serve-artifacts", "--artifacts-destination", str(self.artifact_root),
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--workers", "1",
        ]  # fmt: skip
        with open(self.log, "ab") as log:
            # A session of its own so stop() ends uvicorn's worker too, and only it.
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({self.proc.returncode}):\n{self.log_tail()}")
            if self.healthy():
                return
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"mlflow server not healthy after {START_TIMEOUT_S:.0f} s:\n{self.log_tail()}")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        """Stop the server's process group (SIGTERM, then SIGKILL) and wait until the port is free."""
        if self.proc is None:
            return
        pid = self.proc.pid
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # The worker may outlive the master by a moment; the port must be free for a restart.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        self.proc = None
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and self.healthy():
            time.sleep(0.2)

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""
