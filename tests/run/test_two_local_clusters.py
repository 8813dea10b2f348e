"""Two imitate-orch commands on one machine (a sweep beside a run, a run beside `serve`) each
start a local Ray cluster. Ray Train's placement-group cleaner, a worker, asks Ray's state API
about its controller without an address; Ray then looks for running clusters and, finding two,
fails ("Found multiple active Ray instances"). So the placement group of a controller that was
killed (a trial stopped by ASHA) was never removed and kept its CPUs: the tiny job's sweep beside
another job waited for them for ever (2026-12-04). init_ray's workers know their cluster by
RAY_ADDRESS; the driver's environment is left as it was."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

OTHER = ("import ray, sys; ray.init(num_cpus=1, include_dashboard=False); print('up', flush=True); "
         "sys.stdin.read()")  # the other command's cluster, up until its stdin closes

PROBE = """
import json, os, ray
from orchestrator.run.cluster import init_ray
from orchestrator.spec.loading import spec_from_dict

init_ray(spec_from_dict({"name": "x", "data": {"source": "synthetic"}, "ray": {"num_cpus": 1}}))

@ray.remote(num_cpus=0)
class Controller:
    pass

@ray.remote(num_cpus=0)
def cleaner(actor_id):  # what Ray Train's PlacementGroupCleaner asks, from a worker
    from ray._private.services import canonicalize_bootstrap_address_or_die
    from ray.util.state import get_actor
    return canonicalize_bootstrap_address_or_die(None), get_actor(actor_id, timeout=30).state

controller = Controller.remote()
found, state = ray.get(cleaner.remote(controller._actor_id.hex()))
print(json.dumps({"gcs": ray.get_runtime_context().gcs_address, "found": found, "state": state,
                  "driver_env": os.environ.get("RAY_ADDRESS")}))
"""


def test_workers_find_their_own_cluster_beside_another_local_cluster():
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT")}
    other = subprocess.Popen([sys.executable, "-c", OTHER], env=env, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "up"
        r = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=240)
        assert r.returncode == 0, r.stderr[-3000:]
        out = json.loads(r.stdout.strip().splitlines()[-1])
        assert out["found"] == out["gcs"]          # this job's cluster, not the other one
        assert out["state"] == "ALIVE"             # so a dead controller's placement group gets removed
        assert out["driver_env"] is None           # a later local start in the driver starts its own
    finally:
        other.stdin.close()
        other.wait(timeout=60)
