#!/usr/bin/env bash
# A two-node Ray cluster on this machine (a head and a second node joined with
# `ray start --address`), then the tiny job run against it with `imitate-orch run --address`.
# Each node offers only CPUS_PER_NODE CPUs, so two Ray Train workers and two distillation actors
# cannot share a node: the script ends by printing which node ran each worker and each shard.
# Both nodes see this machine's filesystem, which stands in for the shared storage (NFS, a
# bucket) that the work dir must be on in a real cluster.
#
#   scripts/local_cluster.sh                                   # the whole tiny job (~10 min)
#   scripts/local_cluster.sh --until distill --set data.synthetic.train_size=600
#
# Arguments go to `imitate-orch run`. Settings (environment): WORKDIR (./runs-2nodes),
# RAY_PORT (6390), CPUS_PER_NODE (1), RAY_TEMP (a fresh dir under /tmp), PYTHON (python3).
# The nodes run in the foreground of this script (`ray start --block`) and are stopped when it
# exits, by their process ids; `ray stop` is not used because it stops every Ray instance on
# the machine, including ones this script did not start.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
PORT=${RAY_PORT:-6390}
CPUS=${CPUS_PER_NODE:-1}
WORKDIR=${WORKDIR:-./runs-2nodes}
# Short and private: Ray's socket paths live under it (Unix sockets allow ~100 characters), and
# a private temp dir keeps `ray start` from making itself the default cluster of the machine.
RAY_TEMP=${RAY_TEMP:-$(mktemp -d /tmp/imitate-2n.XXXXXX)}
export RAY_USAGE_STATS_ENABLED=0
# Every process of this cluster (and the job's driver) resolves "the cluster" to this one, even
# when other Ray instances run on the machine (Ray Train's helpers look it up by themselves).
export RAY_ADDRESS="127.0.0.1:$PORT"
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}   # Ray 2.60: a joining node must be told explicitly
RAY="$PYTHON -m ray.scripts.scripts"
if [ "$RAY_AUTH_MODE" = token ]; then
    $RAY get-auth-token --generate >/dev/null   # ~/.ray/auth_token, made only if there is none
fi
NODE_ARGS=(--block --num-cpus="$CPUS" --num-gpus=0 --temp-dir="$RAY_TEMP" --node-ip-address=127.0.0.1
           --object-store-memory=100000000 --disable-usage-stats)

pids=()
stop_nodes() {
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap stop_nodes EXIT

echo "== head node (127.0.0.1:$PORT, $CPUS CPU; dashboard http://127.0.0.1:$((PORT + 4)))"
$RAY start --head --port="$PORT" --dashboard-port=$((PORT + 4)) --ray-client-server-port=$((PORT + 1)) \
    --dashboard-agent-listen-port=$((PORT + 2)) "${NODE_ARGS[@]}" >"$RAY_TEMP/head.log" 2>&1 &
pids+=($!)
echo "== second node joins it ($CPUS CPU)"
$PYTHON - "$PORT" <<'EOF'   # the GCS must be up before a node can join
import socket, sys, time
deadline = time.time() + 60
while time.time() < deadline:
    try:
        socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1).close()
        break
    except OSError:
        time.sleep(0.5)
else:
    sys.exit("head node did not come up; see its log")
EOF
$RAY start --address="127.0.0.1:$PORT" --dashboard-agent-listen-port=$((PORT + 3)) "${NODE_ARGS[@]}" \
    >"$RAY_TEMP/node2.log" 2>&1 &
pids+=($!)
$PYTHON - <<'EOF'
import sys, time, ray
ray.init(log_to_driver=False, logging_level="ERROR")   # RAY_ADDRESS
deadline = time.time() + 60
while sum(n["Alive"] for n in ray.nodes()) < 2:
    if time.time() > deadline:
        sys.exit("the second node did not join; see its log")
    time.sleep(0.5)
print("nodes:", ", ".join(n["NodeID"][:12] for n in ray.nodes() if n["Alive"]))
EOF

echo "== imitate-orch run jobs/tiny.yaml --address $RAY_ADDRESS"
$PYTHON -m orchestrator.cli run jobs/tiny.yaml --address "$RAY_ADDRESS" --no-progress \
    --set "workdir=$WORKDIR" --set teacher.workers=2 --set "teacher.cpus_per_worker=$CPUS" \
    --set student.workers=2 --set "student.cpus_per_worker=$CPUS" \
    --set distill.actors=2 --set "distill.cpus_per_actor=$CPUS" --set "eval.cpus=$CPUS" "$@"

echo "== where the work ran (Ray logs: $RAY_TEMP)"
$PYTHON - "$WORKDIR" <<'EOF'
import json, sys
from pathlib import Path
from mlflow import MlflowClient
workdir = Path(sys.argv[1]).resolve()
for marker in sorted((workdir / "tiny" / "distill" / "shards").glob("shard-*.done")):
    print(f"distill {marker.stem}: node {json.loads(marker.read_text()).get('node', '?')[:12]}")
client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
exp = client.get_experiment_by_name("tiny")
latest = {}                      # the newest MLflow run of each training stage
for run in client.search_runs([exp.experiment_id], order_by=["start_time DESC"], max_results=50):
    if any(k.startswith("worker.") for k in run.data.tags):
        latest.setdefault(run.data.tags.get("stage"), run.data.tags)
for stage, tags in latest.items():
    for key in sorted(k for k in tags if k.startswith("worker.")):
        print(f"{stage} Ray Train {key}: node {json.loads(tags[key])['node'][:12]}")
EOF
