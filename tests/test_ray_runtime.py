"""The embedded local Ray: two cmx processes starting one at the same moment both get a dashboard;
worker groups left by dead Train controllers are given back."""

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


def test_groups_of_dead_creators_are_released_and_live_ones_kept(ray_local: None) -> None:
    """A killed actor's placement group is removed; a live actor's and the driver's are untouched.
    No dashboard: the release reads the GCS, unlike Ray's own cleaner."""
    import ray
    from ray.util.placement_group import placement_group, placement_group_table

    from cmx.cluster.data_parallel import release_orphaned_worker_groups
    from cmx.cluster.runtime import init_ray

    init_ray(num_cpus=3, dashboard=False)

    @ray.remote(num_cpus=0)
    class Controller:  # stands in for a Train controller: it makes its workers' group
        def make_group(self) -> str:
            group = placement_group([{"CPU": 1}])
            ray.get(group.ready())
            return group.id.hex()

    drivers = placement_group([{"CPU": 1}])  # like Tune's trial groups, made by the driver
    ray.get(drivers.ready())
    dead, alive = Controller.remote(), Controller.remote()
    dead_group, alive_group = ray.get([dead.make_group.remote(), alive.make_group.remote()])
    assert ray.available_resources().get("CPU", 0) == 0
    assert release_orphaned_worker_groups() == (0, 2)  # nothing to free while both live
    ray.kill(dead)
    deadline = time.monotonic() + 30
    released = release_orphaned_worker_groups()
    while released.removed == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
        released = release_orphaned_worker_groups()
    assert released == (1, 1)
    states = {g: placement_group_table()[g]["state"] for g in (dead_group, alive_group, drivers.id.hex())}
    assert states == {dead_group: "REMOVED", alive_group: "CREATED", drivers.id.hex(): "CREATED"}
    while ray.available_resources().get("CPU", 0) < 1 and time.monotonic() < deadline:
        time.sleep(0.2)  # the raylet returns the bundle's CPU a moment after the GCS removes it
    assert ray.available_resources().get("CPU", 0) == 1
    assert release_orphaned_worker_groups() == (0, 1)  # a second pass finds nothing more
