"""Does the job fit the Ray cluster? Checked right after connecting, before any stage runs.

Ray does not reject a request it cannot place, it waits: a Ray Train worker group larger than
the cluster (workers are gang-scheduled), or a single worker or distillation actor larger than
every node, would hang the job for ever on a fixed-size cluster. So the CLI compares the spec
with the cluster and exits 2 naming the field, as for any other bad spec.

What the cluster can offer:
- a cluster config published to the GCS (autoscaler v2, KubeRay): the largest size each node
  type can scale to, the same source Ray Train's own pre-check uses;
- else, if an autoscaler with node types is running (`ray up`): the `available_node_types` of
  the config file its monitor was started with (`--autoscaling-config`, on the head:
  ~/ray_bootstrap_config.yaml), each type up to its max_workers. That file is read where the
  driver runs, so this needs the driver on the head (`ray job submit`, or `run` on the head);
  elsewhere, or if a type leaves its resources to be detected, the sizes are unknown and the
  check is skipped (`ray status` shows infeasible requests). A cluster made by hand
  (`ray start`, `ray.init()`) also runs the autoscaler's monitor, but read-only: its node types
  are the nodes themselves, named `node_<node id>`;
- else (a local or fixed cluster): the nodes alive now.
Only CPU and GPU are compared; memory and custom resources are left to Ray.
"""
from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable
from contextlib import contextmanager
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
    source: str       # "nodes" | "cluster config" | "autoscaler node types" | "autoscaler (sizes unknown)"

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
        types = node_types_capacity(autoscaler_config(ray.get_runtime_context().gcs_address))
        return types or ClusterCapacity(alive, "autoscaler (sizes unknown)")
    return ClusterCapacity(alive, "nodes")


def autoscaler_config(gcs_address: str) -> dict | None:
    """The cluster config the autoscaler monitor of the cluster at `gcs_address` was started
    with, if that monitor runs on this machine (its `--autoscaling-config` file); else None."""
    import psutil
    import yaml

    for proc in psutil.process_iter(["cmdline"]):
        try:
            args = proc.info["cmdline"] or []
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if not any(a.endswith("autoscaler/_private/monitor.py") for a in args) or f"--gcs-address={gcs_address}" not in args:
            continue
        path = next((a.split("=", 1)[1] for a in args if a.startswith("--autoscaling-config=")), None)
        try:
            with open(os.path.expanduser(path)) as f:
                return yaml.safe_load(f)   # YAML or JSON (fake_multinode writes JSON)
        except (TypeError, OSError, yaml.YAMLError) as e:
            log.info("autoscaler config %s not readable here (%s)", path, e)
            return None
    return None


def node_types_capacity(config: dict | None) -> ClusterCapacity | None:
    """What an autoscaler config's node types can offer: the head once, every other type up to its
    max_workers (capped by the cluster's). None if a type leaves its CPU/GPU to be detected."""
    types = (config or {}).get("available_node_types") or {}
    if not types:
        return None
    cluster_max = config.get("max_workers", math.inf)
    nodes = []
    for name, t in types.items():
        res = t.get("resources")
        if res is None or "CPU" not in res:   # filled in by the provider at launch: unknown here
            return None
        count = 1 if name == config.get("head_node_type") else min(t.get("max_workers", cluster_max), cluster_max)
        if count:
            nodes.append(({k: float(v) for k, v in res.items() if k in KINDS}, count))
    return ClusterCapacity(nodes, "autoscaler node types")


def autoscaler_adds_nodes(status: bytes | str | None) -> bool:
    """From the autoscaler monitor's status (GCS key `__autoscaling_status`): does it launch
    nodes of configured types, or only mirror the nodes there are (types `node_<id>`)?"""
    report = (json.loads(status).get("autoscaler_report") or {}) if status else {}
    node_types = set(report.get("active_nodes") or {}) | set((report.get("node_type_mapping") or {}).values())
    return any(not t.startswith("node_") for t in node_types)


def _need(cpus: float, gpus: float) -> dict[str, float]:
    return {"CPU": float(cpus), "GPU": float(gpus)}


def _too_big(section: str, unit: str, need: dict[str, float], cap: ClusterCapacity,
             field: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """One worker/actor/task that no node can hold: name the field that asks too much
    (`field`: kind -> field name, default cpus_per_<unit>/gpus_per_<unit>)."""
    field = field or {"CPU": f"cpus_per_{unit}", "GPU": f"gpus_per_{unit}"}
    for kind in KINDS:
        if need[kind] > cap.largest(kind):
            return [(f"{section}.{field[kind]}",
                     (f"{need[kind]:g} {kind} per {unit}, but no node of the Ray cluster has more than "
                      f"{cap.largest(kind):g} {kind} (cluster: {cap.describe()})"))]
    return [(f"{section}.{field['GPU' if need['GPU'] else 'CPU']}",
             f"no single node has {need['CPU']:g} CPU and {need['GPU']:g} GPU together (cluster: {cap.describe()})")]


def fit_errors(spec: JobSpec, cap: ClusterCapacity,
               sections: Iterable[str] = ("teacher", "distill", "student", "eval")) -> list[tuple[str, str]]:
    """(field, message) for every part of the job the cluster cannot place."""
    if not cap.known:
        return []
    errors: list[tuple[str, str]] = []
    for section in sections:
        if section == "eval":   # the evaluate stage's one decoding task
            need = _need(spec.eval.cpus, spec.eval.gpus)
            if not cap.fits(need):
                errors += _too_big(section, "task", need, cap, {"CPU": "cpus", "GPU": "gpus"})
            continue
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
                       sections: Iterable[str] = ("teacher", "distill", "student", "eval")) -> None:
    """Raise SpecError if the connected cluster cannot place the job (Ray must be initialized)."""
    cap = cap or cluster_capacity()
    if not cap.known:
        log.info("autoscaling Ray cluster: resource check skipped (`ray status` lists infeasible requests)")
    errors = fit_errors(spec, cap, sections)
    if errors:
        raise SpecError(errors, "cluster")


def init_ray(spec: JobSpec, address: str | None = None) -> None:
    """Join the cluster at `address` (or spec.ray.address, or RAY_ADDRESS), else start a local
    one sized from spec.ray. Does nothing when Ray is already initialized in this process."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    address = address or spec.ray.address
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, log_to_driver=True)
        return
    local = {"num_cpus": spec.ray.num_cpus, "object_store_memory": spec.ray.object_store_memory,
             "include_dashboard": spec.ray.include_dashboard}
    if spec.ray.include_dashboard is False:
        # Without its HTTP server, Ray still records the dashboard's port in the cluster (8265 by
        # default) and the state API asks whatever listens there: another cluster's dashboard,
        # which knows no actor of this one. Ray Train's placement-group cleaner then takes the
        # live controller for dead and removes its workers' placement group, ending the run. A
        # port nothing listens on makes such a question fail instead (the cleaner then does
        # nothing: with no dashboard, a killed controller's group is not removed either).
        local["dashboard_port"] = free_port()
    with workers_know_their_cluster():
        try:
            ray.init(address="local", log_to_driver=True, **{k: v for k, v in local.items() if v is not None})
        except Exception as e:   # Ray raises a bare Exception when its raylet does not register in time
            if "timed out during startup" not in str(e):
                raise
            raise ClusterStartError(
                "Ray's local cluster did not start: its raylet did not register within Ray's 30 s (a busy "
                "machine: see `uptime`). Nothing was started here; rerun the command (finished stages are "
                "kept).") from e


class ClusterStartError(RuntimeError):
    """The local Ray cluster did not come up (not the job's fault: a rerun may succeed)."""


@contextmanager
def workers_know_their_cluster():
    """Start a local cluster whose processes find it by RAY_ADDRESS. Ray Train's placement-group
    cleaner (a worker) asks Ray's state API about its controller with no address, and Ray then
    looks for running clusters: with two on one machine (two imitate-orch commands, or one beside
    `serve`) it fails ("Found multiple active Ray instances"), so the placement group of a
    controller that was killed (a trial stopped by ASHA, a Ctrl-C) is never removed and holds its
    CPUs: the next trial waits for them for ever. So the GCS port is chosen here, and RAY_ADDRESS
    is set while Ray starts: the raylet, and every worker it starts, inherits it. The driver's own
    environment is restored after (a later local start must not join this cluster)."""
    import ray

    port = free_port()   # Ray's own choice would be known only after the start
    saved = {k: os.environ.get(k) for k in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT")}
    os.environ.update(RAY_ADDRESS=f"{ray.util.get_node_ip_address()}:{port}", RAY_GCS_SERVER_PORT=str(port))
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def free_port(host: str = "") -> int:
    """A TCP port nothing listens on right now (on every interface, by default)."""
    import socket

    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
