"""Scale-out on one machine: 2 Ray Train workers on 2 nodes against 1, and 2 distillation
actors on 2 nodes against 1, side by side in one run.

Each case runs the tiny job through scripts/local_cluster.sh (a head and a second node started
with `ray start`, CPUS_PER_NODE CPUs each, stopped at the end) and reads the figures the stages
log to MLflow: train/tokens_per_s and train/steps_per_s (between log points, validation left
out) and distill/sentences_per_s.

    python bench/scale_out.py                       # ~10 min on 2 cores
    python bench/scale_out.py --steps 300 --train-size 5000

On a 2-core machine each node gets one core: the ratios say what the machinery costs (gradient
all-reduce over gloo, actor start-up, the shard queue), not what a GPU cluster gains.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def local_cluster(workdir: Path, sets: list[str], *options: str) -> float:
    """Run scripts/local_cluster.sh with these `--set`s and `run` options; returns its wall time."""
    args = [*options, *(a for s in (f"workdir={workdir}", *sets) for a in ("--set", s))]
    env = {**os.environ, "PYTHON": sys.executable, "WORKDIR": str(workdir), "CPUS_PER_NODE": "1",
           "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    t = time.perf_counter()
    r = subprocess.run(["bash", "scripts/local_cluster.sh", *args], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"local_cluster.sh failed ({r.returncode}):\n{(r.stdout + r.stderr)[-4000:]}")
    return time.perf_counter() - t


def latest_metrics(workdir: Path, stage: str) -> dict[str, list[float]]:
    """Metric histories of the newest MLflow run of `stage` (values in step order)."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tiny")
    run = client.search_runs([exp.experiment_id], f"tags.stage = '{stage}'", order_by=["start_time DESC"],
                             max_results=1)[0]
    return {k: [m.value for m in sorted(client.get_metric_history(run.info.run_id, k), key=lambda m: m.step)]
            for k in run.data.metrics}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200, help="teacher steps per case")
    ap.add_argument("--train-size", type=int, default=3000, help="synthetic training pairs (distilled in full)")
    a = ap.parse_args()
    base = [f"data.synthetic.train_size={a.train_size}", f"teacher.max_steps={a.steps}", "teacher.log_every=10",
            f"teacher.eval_every={a.steps}", f"teacher.checkpoint_every={a.steps}", "teacher.cpus_per_worker=1",
            "distill.cpus_per_actor=1", "distill.shards=8"]
    tmp = Path(tempfile.mkdtemp(prefix="scale-out-"))
    train = {}
    for workers in (1, 2):
        wd = tmp / f"w{workers}"
        wall = local_cluster(wd, [*base, f"teacher.workers={workers}"], "--until", "teacher")
        m = latest_metrics(wd, "teacher")
        tps, sps = m["train/tokens_per_s"][1:], m["train/steps_per_s"][1:]   # the first interval warms up
        train[workers] = (statistics.median(tps), statistics.median(sps), wall)
    distill = {}
    wd = tmp / "w2"   # its teacher (2 workers) is reused; only distill reruns
    for actors in (1, 2):
        local_cluster(wd, [*base, "teacher.workers=2", f"distill.actors={actors}"], "--force", "distill",
                      "--until", "distill")
        m = latest_metrics(wd, "distill")
        distill[actors] = m["distill/sentences_per_s"][-1]

    (t1, s1, _), (t2, s2, _) = train[1], train[2]
    print(f"\nscale-out on one machine ({os.cpu_count()} cores, 2 Ray nodes of 1 CPU), tiny model, "
          f"{a.steps} teacher steps, {a.train_size} pairs")
    print("| case | tokens/s (all workers) | tokens/s per worker | updates/s |")
    print("|---|---:|---:|---:|")
    for w, (tps, sps, _) in train.items():
        print(f"| teacher, {w} worker(s) | {tps:,.0f} | {tps / w:,.0f} | {sps:.2f} |")
    print(f"\n2 workers / 1: tokens/s ×{t2 / t1:.2f}, per worker ×{t2 / 2 / t1:.2f}, updates/s ×{s2 / s1:.2f} "
          f"(each update of 2 workers holds twice the tokens)")
    print(f"distill: 1 actor {distill[1]:.1f} sentences/s, 2 actors on 2 nodes {distill[2]:.1f} "
          f"(×{distill[2] / distill[1]:.2f})")


if __name__ == "__main__":
    main()
