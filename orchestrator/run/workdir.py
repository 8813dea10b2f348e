"""Is the work dir one file system on every Ray node? Checked before any stage runs.

On a cluster the stages hand each other files through the run dir: Ray Train workers on GPU
nodes read the tokenizer and the binarized data that the driver's stages wrote, distillation
actors write shards the driver merges. A work dir on one node's local disk would let prepare and
tokenizer run, then fail an hour later on another node ("SentencePiece model not found").

So right after connecting, the driver writes a probe file with a fresh random token into the
work dir, and a zero-CPU task pinned to each alive node reads it back. A node that cannot see
the file (or sees another file there: a local folder at the same path) makes the job exit 2
naming `workdir`, the node and the fix. Nodes an autoscaler adds later are probed when a stage
starts (`check_new_nodes` before each stage); the token is fresh per driver, so a stale local
copy of an old probe never passes.
"""
from __future__ import annotations

import logging
import uuid
from pathlib import Path

from ..spec.loading import SpecError
from .files import atomic_write_text

log = logging.getLogger("imitate_orch")
PROBE_DIR = ".imitate-orch"      # under the work dir
ANSWER_TIMEOUT_S = 120.0         # a node busy starting workers may take a while to run the probe


def _read_probe(path: str, token: str) -> tuple[bool, str, str]:
    """On one node: (sees the driver's probe?, host name, what it saw instead)."""
    import socket

    try:
        seen = Path(path).read_text()
    except FileNotFoundError:
        return False, socket.gethostname(), f"{path} does not exist there"
    except OSError as e:
        return False, socket.gethostname(), f"reading {path} failed there: {e}"
    if seen != token:
        return False, socket.gethostname(), f"{path} there is another file (a local folder at the same path)"
    return True, socket.gethostname(), ""


class WorkdirProbe:
    """The driver's probe file and the nodes that have passed it."""

    def __init__(self, workdir: str | Path):
        self.workdir = Path(workdir).resolve()
        self.token = uuid.uuid4().hex
        self.path = self.workdir / PROBE_DIR / f"probe-{self.token[:16]}"
        self.checked: set[str] = set()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, self.token)

    def check_new_nodes(self) -> int:
        """Probe every alive node not probed yet; raise SpecError (field `workdir`) naming each
        node that does not see the file. Returns how many nodes were probed now."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        nodes = {n["NodeID"]: n for n in ray.nodes() if n.get("Alive") and n["NodeID"] not in self.checked}
        if not nodes:
            return 0
        probe = ray.remote(_read_probe)
        refs = {probe.options(num_cpus=0, max_retries=0,
                              scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
                .remote(str(self.path), self.token): node_id for node_id in nodes}
        ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=ANSWER_TIMEOUT_S)
        errors = []
        for ref in ready:
            node = nodes[refs[ref]]
            try:
                ok, host, detail = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - the node died meanwhile: probe it again later
                log.warning("work dir probe on node %s failed (%s); it is probed again at the next stage",
                            node["NodeManagerAddress"], e)
                continue
            if ok:
                self.checked.add(refs[ref])
            else:
                errors.append(f"node {node['NodeManagerAddress']} ({refs[ref][:12]}, host {host}): {detail}")
        for ref in pending:
            ray.cancel(ref, force=True)
            log.warning("node %s did not run the work dir probe within %.0f s; it is probed again at the "
                        "next stage", nodes[refs[ref]]["NodeManagerAddress"], ANSWER_TIMEOUT_S)
        if errors:
            raise SpecError([("workdir", (
                f"{self.workdir} is not one shared directory on every Ray node: "
                + "; ".join(errors)
                + ". Put the work dir on a file system every node mounts at the same path (NFS/EFS: "
                  "cluster.yaml mounts one at /mnt/imitate and sets IMITATE_WORKDIR=/mnt/imitate/runs) "
                  "and set `workdir` (or $IMITATE_WORKDIR) to it"))], "cluster")
        return len(ready)

    def close(self) -> None:
        self.path.unlink(missing_ok=True)
