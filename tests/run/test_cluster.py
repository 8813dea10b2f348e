"""cluster.yaml passes Ray's own cluster-config validation (offline: the schema plus
prepare_config/validate_config, no AWS call) and fits jobs/wmt14.yaml; scripts/local_cluster.sh
builds a two-node Ray cluster on this machine (`ray start --head`, `ray start --address`) and
the job's Ray Train workers and distillation actors land on both nodes.

Both "nodes" share this machine's filesystem, which stands in for the shared storage (EFS, NFS)
that the work dir must be on in a real cluster.
"""
import copy
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import jsonschema
import pytest
import yaml

from orchestrator.run.cluster import ClusterCapacity, autoscaler_adds_nodes, fit_errors
from orchestrator.spec.loading import load_spec

from helpers import MICRO_JOB_SETS
from ray_nodes import processes_mentioning

ROOT = Path(__file__).resolve().parents[2]
PLACEHOLDERS = {"IMITATE_AMI": "ami-0123456789abcdef0",
                "IMITATE_HEAD_PROFILE": "arn:aws:iam::123456789012:instance-profile/imitate-head",
                "IMITATE_WORKER_PROFILE": "arn:aws:iam::123456789012:instance-profile/imitate-worker",
                "IMITATE_S3": "s3://my-bucket/imitate-nat",
                "IMITATE_EFS": "fs-0123456789abcdef0.efs.us-west-2.amazonaws.com",
                "IMITATE_MLFLOW_DB": "sqlite:////mnt/imitate/mlflow/mlflow.db"}


def cluster_config(fill: bool = False) -> dict:
    text = (ROOT / "cluster.yaml").read_text()
    if fill:  # what `envsubst '${IMITATE_S3} ...'` does
        for name, value in PLACEHOLDERS.items():
            text = text.replace("${" + name + "}", value)
    return yaml.safe_load(text)


def ray_validate(config: dict) -> dict:
    """Ray's own checks, as `ray up` runs them: the JSON schema, then defaults + validation."""
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.mark.parametrize("fill", [False, True], ids=["template", "filled"])
def test_cluster_yaml_passes_rays_validation(fill):
    prepared = ray_validate(cluster_config(fill))
    types = prepared["available_node_types"]
    head, gpu = types[prepared["head_node_type"]], types["gpu_worker"]
    assert prepared["provider"]["type"] == "aws"
    assert head["resources"].get("GPU", 0) == 0 and "GPU" not in head["node_config"]["InstanceType"]
    assert gpu["resources"]["GPU"] > 0 and 0 <= gpu["min_workers"] <= gpu["max_workers"] <= prepared["max_workers"]
    if fill:
        assert "${" not in json.dumps(prepared)


@pytest.mark.parametrize("breakage", ["unknown key", "head type missing", "min over max"])
def test_rays_validation_rejects_a_broken_config(breakage):
    """The validator used above does catch mistakes (so passing it means something)."""
    cfg = cluster_config(fill=True)
    if breakage == "unknown key":
        cfg["max_wrokers"] = 3
    elif breakage == "head type missing":
        cfg["head_node_type"] = "cpu_head"
    else:
        cfg["available_node_types"]["gpu_worker"]["min_workers"] = 5
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        ray_validate(cfg)


def test_cluster_yaml_installs_the_package_mounts_jobs_and_names_shared_storage():
    cfg = cluster_config()
    remote, local = next((r, loc) for r, loc in cfg["file_mounts"].items() if loc == ".")
    assert (ROOT / local / "jobs" / "wmt14.yaml").is_file() and (ROOT / local / "pyproject.toml").is_file()
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"   # cluster and submitter share it
    assert ".venv" in cfg["rsync_exclude"]
    setup = "\n".join(cfg["setup_commands"])
    assert f'pip install -q -e "$HOME/{remote.removeprefix("~/")}' in setup and "mount -t nfs4" in setup
    head = "\n".join(cfg["head_setup_commands"] + cfg["head_start_ray_commands"])
    assert "MLFLOW_TRACKING_URI=http://" in head and "--artifacts-destination ${IMITATE_S3}/mlflow" in head
    assert "--dashboard-host" not in head          # the dashboard stays on 127.0.0.1 (SSH tunnel)
    assert all(cfg["provider"][k] for k in ("region", "availability_zone"))


def test_placeholders_image_roles_and_workdir():
    """The envsubst line names every ${...} of the file (a bare envsubst would empty the nodes'
    $HOME); each node boots the pinned image, the head with its own role (iam:PassRole for the
    workers' role, cluster/iam/); the work dir is set where Ray's processes inherit it."""
    import re
    text = (ROOT / "cluster.yaml").read_text()
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert set(re.findall(r"\$\{(\w+)\}", body)) == set(PLACEHOLDERS)
    envsubst = re.search(r"envsubst '([^']*)'", text).group(1)
    assert set(re.findall(r"\$\{(\w+)\}", envsubst)) == set(PLACEHOLDERS)
    cfg = cluster_config()
    for node_type in cfg["available_node_types"].values():
        assert node_type["node_config"]["ImageId"] == "${IMITATE_AMI}"
        assert node_type["node_config"]["IamInstanceProfile"]["Arn"].startswith("${IMITATE_")
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in cfg[key] if "ray start" in c)
        assert "IMITATE_WORKDIR=/mnt/imitate/runs ray start" in start
    mlflow = next(c for c in cfg["head_start_ray_commands"] if "mlflow server" in c)
    assert '--backend-store-uri "${IMITATE_MLFLOW_DB}"' in mlflow
    # MLflow has no authentication: it binds the head's private address, not every interface.
    assert "--host $(hostname -I | awk '{print $1}') " in mlflow and "0.0.0.0" not in mlflow

    policies = {p.name: json.loads(p.read_text()) for p in (ROOT / "cluster" / "iam").glob("*.json")}
    assert {"head-policy.json", "worker-policy.json", "trust-ec2.json"} <= set(policies)
    head = policies["head-policy.json"]["Statement"]
    passrole = next(s for s in head if s["Action"] == "iam:PassRole")
    assert passrole["Resource"].endswith(":role/imitate-worker")
    assert any("ec2:RunInstances" in s["Action"] for s in head)


def test_the_gpu_nodes_fit_the_wmt14_job():
    """wmt14's worker groups and actors fit the GPU node type; the head takes no Ray work."""
    types = cluster_config()["available_node_types"]
    nodes = [({k: float(v) for k, v in t["resources"].items()}, t.get("max_workers", 1) if name != "head" else 1)
             for name, t in types.items()]
    spec = load_spec(ROOT / "jobs" / "wmt14.yaml")
    assert fit_errors(spec, ClusterCapacity(nodes, "cluster config")) == []
    one_node = ClusterCapacity([nodes[0], ({"CPU": 8.0, "GPU": 1.0}, math.inf)], "cluster config")
    assert [f for f, _ in fit_errors(spec, one_node)] == []    # 1-GPU nodes, as many as needed: fits
    small = ClusterCapacity([({"CPU": 48.0, "GPU": 2.0}, 1)], "nodes")
    assert [f for f, _ in fit_errors(spec, small)] == ["teacher.workers", "student.workers"]


def test_an_autoscaling_cluster_is_told_from_a_fixed_one():
    """The autoscaler monitor's status as Ray 2.60 writes it: a hand-made cluster (`ray start`,
    `ray.init()`) mirrors its nodes as types node_<id>; `ray up` reports the config's types."""
    nid = "397b0c76c64a098d3d93ed34a49228009d3e541b1747f624b53a3547"
    fixed = {"autoscaler_report": {"active_nodes": {f"node_{nid}": 1}, "node_type_mapping": {nid: f"node_{nid}"}}}
    launched = {"autoscaler_report": {"active_nodes": {"head": 1}, "pending_launches": {"gpu_worker": 1},
                                      "node_type_mapping": {"10.0.0.5": "head"}}}
    assert not autoscaler_adds_nodes(json.dumps(fixed)) and not autoscaler_adds_nodes(None)
    assert autoscaler_adds_nodes(json.dumps(launched).encode())
    assert fit_errors(load_spec(ROOT / "jobs" / "wmt14.yaml"), ClusterCapacity([], "autoscaler (sizes unknown)")) == []


# ----------------------------------------------------------------------- two nodes, one machine --

def free_port_block(n: int = 5) -> int:
    """A port p with p..p+n-1 all free now (the script uses p+1..p+4 for the node's other servers)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n > 65535:
            continue
        try:
            for port in range(base, base + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError("no free block of ports")


def test_two_node_cluster_runs_workers_and_actors_on_both_nodes(tmp_path):
    workdir = tmp_path / "runs"
    ray_temp = tempfile.mkdtemp(prefix="imo2n-", dir="/tmp")   # short: Ray's socket paths live under it
    env = {**os.environ, "PYTHON": sys.executable, "WORKDIR": str(workdir), "RAY_TEMP": ray_temp,
           "RAY_PORT": str(free_port_block()), "CPUS_PER_NODE": "1", "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    sets = [a for s in [*MICRO_JOB_SETS, "teacher.max_steps=10"] for a in ("--set", s)]   # placement, not learning
    proc = subprocess.Popen(["bash", "scripts/local_cluster.sh", "--until", "distill", *sets], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=600)
    finally:
        try:  # whatever the script did not stop (it should have): its whole process group
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    leftovers = processes_mentioning(ray_temp)
    shutil.rmtree(ray_temp, ignore_errors=True)
    assert proc.returncode == 0, out[-4000:]
    assert leftovers == []                                # the script stopped both nodes
    nodes = set(next(line for line in out.splitlines() if line.startswith("nodes: "))[7:].split(", "))
    assert len(nodes) == 2

    shards = sorted((workdir / "tiny" / "distill" / "shards").glob("shard-*.done"))
    shard_nodes = {json.loads(m.read_text())["node"] for m in shards}
    assert len(shards) == 4 and {n[:12] for n in shard_nodes} == nodes
    manifest = json.loads((workdir / "tiny" / "distill" / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["metrics"]["nodes"] == 2

    from mlflow import MlflowClient
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id], "tags.stage = 'teacher'")
    tags = runs[0].data.tags
    worker_nodes = {json.loads(tags[f"worker.{r}"])["node"] for r in (0, 1)}
    assert {n[:12] for n in worker_nodes} == nodes         # one DDP worker per node
    assert "teacher Ray Train worker.1: node" in out and "distill shard-00003: node" in out
