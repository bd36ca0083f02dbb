"""What one trial asks of Ray (CPU/GPU bundles) and how many trials fit on the cluster at once.

Checked against the nodes before a sweep starts, so a request no node can hold is one clear
`ConfigError` naming the field, instead of trials that wait forever.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cmx.cluster.runtime import NodeCapacity
from cmx.core.errors import ConfigError
from cmx.core.sweep_spec import SweepSpec

# A tiny CPU share for the Tune function that only drives a TorchTrainer (0 is rejected by Ray).
DRIVER_CPU = 0.01


@dataclass(frozen=True)
class ResourcePlan:
    """Ray resource bundles for one trial and how many trials fit at once."""

    trial_bundle: dict[str, float]
    worker_bundle: dict[str, float] | None
    workers: int
    concurrent: int


def plan_resources(spec: SweepSpec, nodes: list[NodeCapacity], source: str = "resources") -> ResourcePlan:
    """Check the per-trial request fits on the nodes; ConfigError names the field if not."""
    r = spec.resources
    if not nodes:
        raise ConfigError("no alive Ray nodes", "start the cluster first")
    if r.workers == 1:
        need_cpu, need_gpu = r.cpus, r.gpus
    else:
        need_cpu, need_gpu = r.cpus_per_worker, r.gpus_per_worker
    field_cpu = "resources.cpus" if r.workers == 1 else "resources.cpus_per_worker"
    field_gpu = "resources.gpus" if r.workers == 1 else "resources.gpus_per_worker"
    max_cpu = max(n.cpus for n in nodes)
    max_gpu = max(n.gpus for n in nodes)
    if need_cpu > max_cpu:
        raise ConfigError(
            f"{source}: {field_cpu}={need_cpu:g} but the largest node has {max_cpu:g} CPUs",
            f"lower {field_cpu} to at most {max_cpu:g}",
        )
    if need_gpu > max_gpu:
        raise ConfigError(
            f"{source}: {field_gpu}={need_gpu:g} but the largest node has {max_gpu:g} GPUs",
            f"set {field_gpu}: 0 or run on a GPU cluster (--address)",
        )
    slots = 0
    for n in nodes:
        fits_cpu = math.floor(n.cpus / need_cpu + 1e-9)
        fits_gpu = math.floor(n.gpus / need_gpu + 1e-9) if need_gpu > 0 else fits_cpu
        slots += min(fits_cpu, fits_gpu)
    if r.workers == 1:
        bundle = {"CPU": r.cpus, **({"GPU": r.gpus} if r.gpus else {})}
        return ResourcePlan(bundle, None, 1, max(1, slots))
    if slots < r.workers:
        raise ConfigError(
            f"{source}: resources.workers={r.workers} but the cluster holds only {slots} such workers",
            "lower resources.workers or the per-worker CPUs/GPUs",
        )
    worker = {"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if r.gpus_per_worker else {})}
    return ResourcePlan({"CPU": DRIVER_CPU}, worker, r.workers, max(1, slots // r.workers))


def concurrency(spec: SweepSpec, plan: ResourcePlan) -> int:
    """Trials run at once: what fits, capped by search.max_concurrent."""
    cap = spec.search.max_concurrent or plan.concurrent
    return max(1, min(cap, plan.concurrent, spec.search.num_samples))
