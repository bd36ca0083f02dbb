"""The default sqlite MLflow store: processes that open a fresh one at the same time all get it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from cmx.tracking.store import make_client

OPEN_AND_LOG = """
import sys
from cmx.tracking.store import make_client
client = make_client(sys.argv[1])
run = client.create_run(client.create_experiment("exp-" + sys.argv[2]))
client.log_metric(run.info.run_id, "val/top1", float(sys.argv[2]))
client.set_terminated(run.info.run_id)
"""


def test_concurrent_first_use_of_a_fresh_store(tmp_path: Path) -> None:
    """Without the file lock, MLflow's schema migrations race and all but one process fail."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    procs = [
        subprocess.Popen([sys.executable, "-c", OPEN_AND_LOG, uri, str(i)], stderr=subprocess.PIPE, text=True)
        for i in range(3)
    ]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    client = make_client(uri)
    names = {e.name for e in client.search_experiments()}
    assert {"exp-0", "exp-1", "exp-2"} <= names
    for i in range(3):
        exp = client.get_experiment_by_name(f"exp-{i}")
        (run,) = client.search_runs([exp.experiment_id])
        assert run.data.metrics["val/top1"] == float(i) and run.info.status == "FINISHED"
