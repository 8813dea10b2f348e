"""The micro job on an autoscaling cluster, with Ray's own autoscaler and its fake multi-node
provider: a CPU head and a GPU worker node type shaped like cluster.yaml's. The GPU-requesting
worker groups, distillation actors and evaluation task make the autoscaler launch worker nodes,
the job's outputs equal the single-node run's (`micro_run`), idle workers are removed, and a job
no node type can ever hold exits 2 before any stage (the fit check reads the autoscaler's
`available_node_types`).

The fake nodes advertise GPUs that CUDA cannot see, so the GPU-requesting code paths run on the
CPU (Ray Train with `backend: gloo`); the placement and scaling are Ray's real ones.
"""
import json

import pytest
from mlflow import MlflowClient

from ray_nodes import LocalCluster, fake_autoscaling_config

from helpers import MICRO_JOB_SETS

GPU_NODE = {"resources": {"CPU": 2, "GPU": 1, "object_store_memory": 100_000_000}, "max_workers": 2}
GPU_SETS = ["teacher.gpus_per_worker=1", "teacher.backend=gloo", "student.gpus_per_worker=1", "student.backend=gloo",
            "distill.gpus_per_actor=1", "eval.gpus=1"]


def sets(*items):
    return [a for s in items for a in ("--set", s)]


@pytest.mark.slow
def test_the_autoscaler_launches_gpu_nodes_for_the_job_and_removes_them(micro_run, tmp_path):
    rd_single, spec_single = micro_run
    workdir = tmp_path / "runs"
    cluster = LocalCluster()
    try:
        cluster.start_head(cpus=0, autoscaling=fake_autoscaling_config(
            cluster.address, head={"CPU": 0}, workers={"gpu_worker": GPU_NODE}, idle_timeout_minutes=0.25))
        too_big = cluster.imitate_orch("run", "jobs/tiny.yaml", *sets(f"workdir={workdir}", *MICRO_JOB_SETS,
                                                                       *GPU_SETS, "teacher.gpus_per_worker=2"))
        head = [n["NodeID"] for n in cluster.alive_nodes()]
        refused_left = (workdir / "tiny").exists()
        r = cluster.imitate_orch("run", "jobs/tiny.yaml", "--no-progress",
                                 *sets(f"workdir={workdir}", *MICRO_JOB_SETS, *GPU_SETS), timeout=900)
        after = cluster.wait_for_nodes(1, timeout=120)          # idle GPU nodes go away
    finally:
        leftovers = cluster.stop()
    assert too_big.returncode == 2, too_big.stderr[-3000:]
    assert "teacher.gpus_per_worker" in too_big.stderr and "autoscaler node types" in too_big.stderr
    assert len(head) == 1 and not refused_left           # nothing launched, no stage started
    assert r.returncode == 0, (r.stdout + r.stderr)[-5000:]
    assert [n["NodeID"] for n in after] == head
    assert leftovers == []

    rd = workdir / "tiny"
    shard_nodes = {json.loads(m.read_text())["node"] for m in (rd / "distill" / "shards").glob("shard-*.done")}
    assert shard_nodes and head[0] not in shard_nodes        # on GPU nodes the autoscaler launched
    summary = json.loads((rd / "evaluate" / "summary.json").read_text())
    assert summary["node"]["id"] not in head
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    for run in client.search_runs([client.get_experiment_by_name("tiny").experiment_id], "tags.stage = 'teacher'"):
        assert json.loads(run.data.tags["worker.0"])["node"] not in head
    # Equal to the single-node run: same data, teacher translations, test translations.
    for rel in ("prepare/train.src", "tokenizer/spm.model", "distill/train.distilled.tgt",
                "evaluate/test.at.txt", "evaluate/test.nat.txt", "evaluate/test.lpd.txt"):
        assert (rd / rel).read_bytes() == (rd_single / rel).read_bytes(), rel
    single = json.loads((rd_single / "evaluate" / "summary.json").read_text())
    assert {k: r["bleu"] for k, r in summary["rows"].items()} == {k: r["bleu"] for k, r in single["rows"].items()}
