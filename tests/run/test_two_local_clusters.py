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

import pytest

ROOT = Path(__file__).resolve().parents[2]

# The other command's cluster, up until its stdin closes, with its dashboard on Ray's default
# port (or the next free one, when something holds 8265 already).
OTHER = ("import ray, sys; ray.init(num_cpus=1, include_dashboard=True); "
         "print('up', flush=True); sys.stdin.read()")

PROBE = """
import json, os, ray
from orchestrator.run.cluster import init_ray
from orchestrator.spec.loading import spec_from_dict

init_ray(spec_from_dict({"name": "x", "data": {"source": "synthetic"},
                         "ray": {"num_cpus": 1, "include_dashboard": json.loads(os.environ["DASHBOARD"])}}))

@ray.remote(num_cpus=0)
class Controller:
    def ready(self):
        return True

@ray.remote(num_cpus=0)
def cleaner(actor_id):  # what Ray Train's PlacementGroupCleaner asks, from a worker
    from ray._private.services import canonicalize_bootstrap_address_or_die
    from ray.util.state import get_actor
    try:
        actor = get_actor(actor_id, timeout=30)
    except Exception as e:   # Ray Train's cleaner then does nothing
        return canonicalize_bootstrap_address_or_die(None), type(e).__name__
    return canonicalize_bootstrap_address_or_die(None), actor.state if actor else None

controller = Controller.remote()
ray.get(controller.ready.remote())   # created, not PENDING_CREATION, before it is looked up
found, state = ray.get(cleaner.remote(controller._actor_id.hex()))
print(json.dumps({"gcs": ray.get_runtime_context().gcs_address, "found": found, "state": state,
                  "driver_env": os.environ.get("RAY_ADDRESS")}))
"""


@pytest.mark.parametrize("dashboard", [None, False])
def test_workers_find_their_own_cluster_beside_another_local_cluster(dashboard):
    """With a dashboard (Ray's default), a worker's state API finds the live actor. Without one
    (ray.include_dashboard: false), Ray still records a dashboard port for the cluster, and if
    that is 8265, where the other cluster's dashboard answers, the actor is "not found": Ray
    Train's cleaner took its live controller for dead and removed its workers (a test's run
    failed so, 2026-12-04). The question must fail instead."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_GCS_SERVER_PORT")}
    other = subprocess.Popen([sys.executable, "-c", OTHER], env=env, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "up"
        r = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env={**env, "DASHBOARD": json.dumps(dashboard)},
                           capture_output=True, text=True, timeout=240)
        assert r.returncode == 0, r.stderr[-3000:]
        out = json.loads(r.stdout.strip().splitlines()[-1])
        assert out["found"] == out["gcs"]          # this job's cluster, not the other one
        if dashboard is None:
            assert out["state"] == "ALIVE"         # so a dead controller's placement group gets removed
        else:
            assert out["state"] not in (None, "DEAD"), out   # an error, never a live actor taken for dead
        assert out["driver_env"] is None           # a later local start in the driver starts its own
    finally:
        other.stdin.close()
        other.wait(timeout=60)


@pytest.mark.parametrize("command", ["run", "sweep", "ablate"])
def test_a_local_cluster_that_does_not_come_up_is_an_error_message_not_a_traceback(command, tmp_path, monkeypatch):
    """On a machine too busy for the raylet to register within Ray's (fixed) 30 s, ray.init raises
    a bare Exception. That cannot be made to happen on demand here, so ray.init raises Ray's own
    error (the only mock): the command says what happened and what to do, exit 1."""
    import ray
    from click.testing import CliRunner

    from orchestrator.cli import main

    def busy_machine(*args, **kwargs):
        raise Exception("The current node timed out during startup. This could happen because some of the "
                        "raylet failed to startup or the GCS has become overloaded.")

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", busy_machine)
    r = CliRunner().invoke(main, [command, str(ROOT / "jobs" / "tiny.yaml"), "--set", f"workdir={tmp_path}"])
    assert r.exit_code == 1, r.output
    assert "error: Ray's local cluster did not start" in r.output and "rerun the command" in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)
    assert os.environ.get("RAY_ADDRESS") is None   # the driver's environment is restored
