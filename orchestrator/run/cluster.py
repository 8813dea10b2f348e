"""Does the job fit the Ray cluster? Checked right after connecting, before any stage runs.

Ray does not reject a request it cannot place, it waits: a Ray Train worker group larger than
the cluster (workers are gang-scheduled), or a single worker or distillation actor larger than
every node, would hang the job for ever on a fixed-size cluster. So the CLI compares the spec
with the cluster and exits 2 naming the field, as for any other bad spec.

What the cluster can offer:
- a cluster config published to the GCS (autoscaler v2, KubeRay): the largest size each node
  type can scale to, the same source Ray Train's own pre-check uses;
- else, if an autoscaler with node types is running (`ray up`), nodes may still be added and
  their size is not known here: the check is skipped (`ray status` shows infeasible requests).
  A cluster made by hand (`ray start`, `ray.init()`) also runs the autoscaler's monitor, but
  read-only: its node types are the nodes themselves, named `node_<node id>`;
- else (a local or fixed cluster): the nodes alive now.
Only CPU and GPU are compared; memory and custom resources are left to Ray.
"""
from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass

from ..spec.loading import SpecError
from ..spec.schema import JobSpec

log = logging.getLogger("imitate_orch")
KINDS = ("CPU", "GPU")


@dataclass
class ClusterCapacity:
    # One entry per node the cluster has or can have: {"CPU": 8.0, "GPU": 1.0}.
    # `count` is how many such nodes (math.inf: the node type has no upper bound).
    nodes: list[tuple[dict[str, float], float]]
    source: str                       # "nodes" | "cluster config" | "autoscaler (sizes unknown)"

    @property
    def known(self) -> bool:
        return self.source != "autoscaler (sizes unknown)"

    def largest(self, kind: str) -> float:
        return max((n.get(kind, 0.0) for n, _ in self.nodes), default=0.0)

    def fits(self, need: dict[str, float]) -> float:
        """How many units of `need` the cluster can place, node by node (Ray never splits one)."""
        need = {k: v for k, v in need.items() if v > 0}
        if not need:
            return math.inf
        total = 0.0
        for res, count in self.nodes:
            per_node = min((math.floor(res.get(k, 0.0) / v + 1e-9) for k, v in need.items()), default=math.inf)
            total += per_node * count if per_node else 0
        return total

    def describe(self) -> str:
        parts = [f"{'∞' if c == math.inf else int(c)}× {{CPU: {n.get('CPU', 0):g}, GPU: {n.get('GPU', 0):g}}}"
                 for n, c in self.nodes]
        return f"{', '.join(parts) or 'no nodes'} ({self.source})"


def cluster_capacity() -> ClusterCapacity:
    """What the connected Ray cluster has, or can grow to (see the module docstring)."""
    import ray
    from ray._private import ray_constants
    from ray._private.state import state
    from ray.experimental.internal_kv import _internal_kv_get

    config = state.get_cluster_config()
    if config is not None and config.node_group_configs:
        nodes = [({k: float(v) for k, v in g.resources.items()}, math.inf if g.max_count == -1 else g.max_count)
                 for g in config.node_group_configs]
        return ClusterCapacity([(n, c) for n, c in nodes if c], "cluster config")
    alive = [({k: float(v) for k, v in n["Resources"].items()}, 1) for n in ray.nodes() if n.get("Alive")]
    if autoscaler_adds_nodes(_internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)):
        return ClusterCapacity(alive, "autoscaler (sizes unknown)")
    return ClusterCapacity(alive, "nodes")


def autoscaler_adds_nodes(status: bytes | str | None) -> bool:
    """From the autoscaler monitor's status (GCS key `__autoscaling_status`): does it launch
    nodes of configured types, or only mirror the nodes there are (types `node_<id>`)?"""
    report = (json.loads(status).get("autoscaler_report") or {}) if status else {}
    node_types = set(report.get("active_nodes") or {}) | set((report.get("node_type_mapping") or {}).values())
    return any(not t.startswith("node_") for t in node_types)


def _need(cpus: float, gpus: float) -> dict[str, float]:
    return {"CPU": float(cpus), "GPU": float(gpus)}


def _too_big(section: str, unit: str, need: dict[str, float], cap: ClusterCapacity) -> list[tuple[str, str]]:
    """One worker/actor that no node can hold: name the field that asks too much."""
    field = {"CPU": f"cpus_per_{unit}", "GPU": f"gpus_per_{unit}"}
    for kind in KINDS:
        if need[kind] > cap.largest(kind):
            return [(f"{section}.{field[kind]}",
                     (f"{need[kind]:g} {kind} per {unit}, but no node of the Ray cluster has more than "
                      f"{cap.largest(kind):g} {kind} (cluster: {cap.describe()})"))]
    return [(f"{section}.{field['GPU' if need['GPU'] else 'CPU']}",
             f"no single node has {need['CPU']:g} CPU and {need['GPU']:g} GPU together (cluster: {cap.describe()})")]


def fit_errors(spec: JobSpec, cap: ClusterCapacity,
               sections: Iterable[str] = ("teacher", "distill", "student")) -> list[tuple[str, str]]:
    """(field, message) for every part of the job the cluster cannot place."""
    if not cap.known:
        return []
    errors: list[tuple[str, str]] = []
    for section in sections:
        if section == "distill":
            d = spec.distill
            need = _need(d.cpus_per_actor, d.gpus_per_actor)
            if not cap.fits(need):   # fewer actors than asked is fine: the pool uses those that start
                errors += _too_big(section, "actor", need, cap)
            continue
        t = getattr(spec, section)
        need = _need(t.cpus_per_worker, t.gpus_per_worker)
        placeable = cap.fits(need)
        if not placeable:
            errors += _too_big(section, "worker", need, cap)
        elif placeable < t.workers:  # Ray Train starts all workers at once or none
            errors.append((f"{section}.workers",
                           (f"{t.workers} workers of {{CPU: {need['CPU']:g}, GPU: {need['GPU']:g}}} "
                            f"({section}.cpus_per_worker, {section}.gpus_per_worker), but the Ray cluster "
                            f"can place only {placeable:g} (cluster: {cap.describe()})")))
    return errors


def check_fits_cluster(spec: JobSpec, cap: ClusterCapacity | None = None,
                       sections: Iterable[str] = ("teacher", "distill", "student")) -> None:
    """Raise SpecError if the connected cluster cannot place the job (Ray must be initialized)."""
    cap = cap or cluster_capacity()
    if not cap.known:
        log.info("autoscaling Ray cluster: resource check skipped (`ray status` lists infeasible requests)")
    errors = fit_errors(spec, cap, sections)
    if errors:
        raise SpecError(errors, "cluster")


def init_ray(spec: JobSpec, address: str | None = None) -> None:
    """Join the cluster at `address` (or spec.ray.address), else start a local one sized from
    spec.ray. Does nothing when Ray is already initialized in this process."""
    import os

    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    kwargs = {"address": address or spec.ray.address, "log_to_driver": True}
    if not kwargs["address"]:
        kwargs.update(num_cpus=spec.ray.num_cpus, object_store_memory=spec.ray.object_store_memory,
                      include_dashboard=spec.ray.include_dashboard)
    ray.init(**{k: v for k, v in kwargs.items() if v is not None})
