"""Ray clusters of several raylets on this machine, for the cluster tests.

Each cluster lives in its own short temp dir and GCS port, next to the session's in-process
`ray_local`, and is stopped by killing the processes that name its temp dir or GCS address
(`ray stop` would stop every Ray instance on the machine, `ray_local` included).
"""
import json
import os
import subprocess
import sys
import tempfile
import time

import psutil

from helpers import ROOT, free_port

RAY = [sys.executable, "-m", "ray.scripts.scripts"]
NODE_ARGS = ["--object-store-memory=100000000", "--disable-usage-stats", "--include-dashboard=false"]


def node_ip() -> str:
    import ray._private.services

    return ray._private.services.get_node_ip_address()


def processes_mentioning(*texts: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(t in arg for arg in p.info["cmdline"] or [] for t in texts):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


class LocalCluster:
    """A head started with `ray start --head` (optionally with an autoscaler on Ray's fake
    multi-node provider), plus nodes joined with `ray start --address` (optionally in a private
    mount namespace: `prefix=["unshare", "-m", ...]`)."""

    def __init__(self):
        self.temp = tempfile.mkdtemp(prefix="imrc-", dir="/tmp")   # short: Ray's socket paths live under it
        self.port = free_port()
        self.address = f"{node_ip()}:{self.port}"
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
                    "PYTHONPATH": str(ROOT)}
        for name in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
            self.env.pop(name, None)

    def start_head(self, cpus: int, autoscaling: dict | None = None) -> None:
        cmd = [*RAY, "start", "--head", f"--port={self.port}", f"--num-cpus={cpus}", "--num-gpus=0",
               f"--temp-dir={self.temp}", *NODE_ARGS]
        env = self.env
        if autoscaling is not None:
            path = os.path.join(self.temp, "autoscaling.json")
            with open(path, "w") as f:
                json.dump(autoscaling, f)
            cmd.append(f"--autoscaling-config={path}")
            env = {**env, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
        subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=180)

    def start_node(self, cpus: int, prefix: tuple[str, ...] = ()) -> None:
        cmd = [*prefix, *RAY, "start", f"--address={self.address}", f"--num-cpus={cpus}", "--num-gpus=0",
               *NODE_ARGS[:2]]
        subprocess.run(cmd, env=self.env, check=True, capture_output=True, timeout=180)

    def alive_nodes(self) -> list[dict]:
        out = subprocess.run([sys.executable, "-c", (
            "import json, ray; ray.init(address=%r, log_to_driver=False, logging_level='ERROR'); "
            "print(json.dumps([n for n in ray.nodes() if n['Alive']], default=str))") % self.address],
            env=self.env, capture_output=True, text=True, timeout=120, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    def wait_for_nodes(self, n: int, timeout: float = 120) -> list[dict]:
        deadline = time.time() + timeout
        while True:
            nodes = self.alive_nodes()
            if len(nodes) == n or time.time() > deadline:
                return nodes
            time.sleep(2)

    def imitate_orch(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args, "--address", self.address],
                              cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout)

    def stop(self) -> list[psutil.Process]:
        """Kill every process of this cluster; returns those still alive after (should be none)."""
        procs = processes_mentioning(self.temp, self.address)
        for p in procs:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=15)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)
        return processes_mentioning(self.temp, self.address)


def fake_autoscaling_config(address: str, head: dict, workers: dict, idle_timeout_minutes: float) -> dict:
    """A cluster config for Ray's fake multi-node provider: node types like cluster.yaml's, nodes
    started as local raylets by the autoscaler (what ray.cluster_utils.AutoscalingCluster builds,
    without its `ray stop --force`)."""
    types = {"ray.head.default": {"resources": head, "node_config": {}, "max_workers": 0}}
    types.update({name: {"node_config": {}, "min_workers": 0, **t} for name, t in workers.items()})
    return {"cluster_name": "imitate-fake", "max_workers": sum(t["max_workers"] for t in workers.values()),
            "upscaling_speed": 1.0, "idle_timeout_minutes": idle_timeout_minutes,
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                         "disable_launch_config_check": True, "gcs_address": address},
            "auth": {"ssh_user": "ubuntu"}, "available_node_types": types, "head_node_type": "ray.head.default",
            "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
            "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [], "setup_commands": [],
            "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
            "worker_start_ray_commands": []}
