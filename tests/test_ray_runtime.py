"""The embedded local Ray: two cmx processes starting one at the same moment both get a dashboard."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.ray_processes import kill_ray_started_with, private_ray_tmp

from cmx.cluster.runtime import RAY_TMP_ENV

START = """
import sys, time
from pathlib import Path
go = Path(sys.argv[1])
while not go.exists():
    time.sleep(0.01)
import ray
from cmx.cluster.runtime import init_ray
init_ray(num_cpus=1)
print("dashboard", ray._private.worker.get_dashboard_url())
ray.shutdown()
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_local_starts_at_once_both_get_a_dashboard(tmp_path: Path) -> None:
    go = tmp_path / "go"
    temps = [private_ray_tmp(), private_ray_tmp()]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", START, str(go)],
            env={**os.environ, RAY_TMP_ENV: tmp},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for tmp in temps
    ]
    try:
        time.sleep(3)  # both imported and waiting
        go.touch()
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for tmp in temps:
            kill_ray_started_with(tmp)
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
    urls = [next(line.split()[1] for line in out.splitlines() if line.startswith("dashboard")) for out, _ in outs]
    assert len(set(urls)) == 2 and all(u.startswith("127.0.0.1:") for u in urls), urls
