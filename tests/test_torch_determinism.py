"""`deterministic_algorithms`: torch's deterministic mode without importing inductor when nothing compiles."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(120)

PROBE = """
import sys, torch
from cmx.pipelines.trainer import deterministic_algorithms
deterministic_algorithms(True, compiling={compiling})
assert torch.are_deterministic_algorithms_enabled()
loaded = "torch._inductor.config" in sys.modules
if loaded:
    import torch._inductor.config as c
    assert c.deterministic
deterministic_algorithms(False)
assert not torch.are_deterministic_algorithms_enabled()
if loaded:
    assert not c.deterministic
print("inductor" if loaded else "eager")
"""


@pytest.mark.parametrize(("compiling", "expected"), [(False, "eager"), (True, "inductor")])
def test_eager_runs_skip_inductor_and_compiled_ones_set_its_flag(compiling: bool, expected: str) -> None:
    """A fresh process, as a sweep trial's: importing inductor (with dynamo) would cost it 1.4-1.6 s."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(compiling=compiling)], capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == [expected]
