"""glibc allocator setting for CPU training: fewer page faults, and the user's own choice wins.

Each case runs in a fresh interpreter: mallopt() changes the whole process for good.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import pytest

from cmx.pipelines.cpu_allocator import USER_ALLOCATOR_ENV, glibc_version

pytestmark = pytest.mark.skipif(glibc_version() is None, reason="glibc only")

PROBE = r"""
import json, resource, sys
import torch
from cmx.core.config import TrainConfig
from cmx.pipelines import cpu_allocator
from cmx.pipelines.trainer import setup_runtime

mode = sys.argv[1]
config = TrainConfig.model_validate({"loop": {"device": "cpu", "cpu_allocator": mode, "threads": 1}})
setup_runtime(config)
x = torch.ones(64, 1024, 1024 // 4)  # 64 MiB: far above glibc's mmap threshold
for _ in range(5):  # warm-up: the heap grows to its working size (takes glibc ~3 rounds)
    y = x + 1
    del y
faults = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    y = x + 1  # a fresh 64 MiB result each time
    del y
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
setting = cpu_allocator._applied
print(json.dumps({"faults": faults, "applied": setting.applied if setting else None,
                  "reason": setting.reason if setting else None}))
"""


def probe(mode: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in USER_ALLOCATOR_ENV and k != "LD_PRELOAD"}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_keep_removes_the_page_faults_of_large_temporaries() -> None:
    default = probe("default")
    keep = probe("keep")
    assert default["applied"] is None  # cpu_allocator=default: never touched
    assert keep["applied"] is True and "glibc" in keep["reason"]
    pages = 64 * 2**20 / 4096
    assert statistics.median(default["faults"]) > 0.9 * pages  # every result faulted in again
    assert statistics.median(keep["faults"]) < 0.05 * pages, keep  # reused from the heap
    assert sum(keep["faults"]) < 0.2 * sum(default["faults"]), keep


def test_user_allocator_settings_are_left_alone() -> None:
    out = probe("keep", MALLOC_MMAP_THRESHOLD_="1048576")
    assert out["applied"] is False
    assert "MALLOC_MMAP_THRESHOLD_" in out["reason"]


def test_cpu_allocator_is_a_validated_field() -> None:
    from pydantic import ValidationError

    from cmx.core.config import TrainConfig

    assert TrainConfig().loop.cpu_allocator == "keep"
    with pytest.raises(ValidationError, match="cpu_allocator"):
        TrainConfig.model_validate({"loop": {"cpu_allocator": "jemalloc"}})
