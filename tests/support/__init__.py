"""Helpers shared by the test modules; the pytest fixtures built on them are in tests/conftest.py.

Test modules import from here (`from support.sweeps import write_spec`), never from each other.

- `cli`: `run_cmx` / `start_cmx`, the real `cmx` console script in a subprocess
- `data`: tiny synthetic image folders (clean, corrupt, same-size) for the data tests
- `training`: the built-in Fashion-MNIST exported once and cached; tiny training configs
- `sweeps`: sweep files for the Ray Tune tests, and reading back trial results
- `mlflow_server`: a real `mlflow server` process (`MlflowServer`), `free_port`
- `ray_processes`: the Ray processes tests start (embedded by CMX_RAY_TMP, or a `ray start`
  multi-node cluster) and stopping exactly those
"""
