"""Faults injected into the real system (local Ray, real processes killed with SIGKILL), each
checked for nothing lost and nothing duplicated:

- a distillation actor killed mid-shard: the shard is redone on the restarted actor and the
  merged output is byte-identical to a fault-free run (one line per input line, in order);
- a Ray Train worker killed mid-epoch: training resumes from the last reported checkpoint (the
  step counter goes on from there, not from 0) and ends with the fault-free run's weights;
- a damaged Ray Train checkpoint is never loaded: the newest intact one is, and the run, asked
  for more steps, trains on with exactly the fault-free run's losses and ends with its weights;
  or, every checkpoint damaged, the run fails naming the damaged files;
- the `imitate-orch run` driver SIGKILLed mid-distillation, then the same command again: finished
  stages and shards are reused, and every output equals an uninterrupted run's;
- damaged artifacts of finished stages (a bit-flipped model file, a truncated merge, a
  half-written shard) are caught by their checksums and redone, never used.

The fault-free reference is the session's `micro_run` (same micro job, in-process). Training
and decoding are deterministic on CPU here (same seeds, same thread counts): outputs are
compared byte for byte.
"""
import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from mlflow import MlflowClient

from orchestrator.run.layout import DISTILLED
from orchestrator.run.runner import StageContext
from orchestrator.run.shards import shard_done
from orchestrator.run.tracking import Tracker
from orchestrator.spec.loading import spec_from_dict
from orchestrator.stages.distill import distill, shard_bounds
from orchestrator.stages.train import teacher

from helpers import MICRO_JOB_SETS, micro_train

ROOT = Path(__file__).resolve().parents[2]
COMPARED = ("teacher/model.pt", f"distill/{DISTILLED}", "student/model.pt", "evaluate/test.at.txt",
            "evaluate/test.nat.txt", "evaluate/test.lpd.txt")


def ray_processes(title: str) -> list[psutil.Process]:
    """This test process's Ray workers whose process title starts with `title` (Ray titles a
    worker `ray::Class.method` while it runs that method)."""
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = p.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if cmd and cmd[0].startswith(title):
            found.append(p)
    return found


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def done_shards(shard_dir: Path, n_lines: int, shards: int) -> dict[int, int]:
    """{index: mtime_ns} of the shards whose marker, line count and checksum verify."""
    return {i: (shard_dir / f"shard-{i:05d}.txt").stat().st_mtime_ns
            for i, (a, b) in enumerate(shard_bounds(n_lines, shards)) if shard_done(shard_dir, i, b - a)}


# --------------------------------------------------------------------------- distillation --

def test_distill_actor_killed_mid_shard_changes_nothing(ray_local, micro_run, tmp_path):
    ref, spec = micro_run
    run = tmp_path / spec.name
    for stage, name in (("prepare", "train.src"), ("tokenizer", "spm.model"), ("teacher", "model.pt")):
        (run / stage).mkdir(parents=True)
        shutil.copy(ref / stage / name, run / stage / name)
    (run / "distill").mkdir()
    killed, stop = [], threading.Event()

    def kill_a_busy_actor():
        while not stop.is_set():
            for p in ray_processes("ray::DistillWorker.translate_shard"):
                os.kill(p.pid, signal.SIGKILL)
                killed.append(p.pid)
                return
            time.sleep(0.005)

    killer = threading.Thread(target=kill_a_busy_actor, daemon=True)
    killer.start()
    try:
        result = distill(StageContext(spec, run, "distill", progress=False))
    finally:
        stop.set()
        killer.join()
    assert killed, "no distillation actor was caught translating"
    n = len((ref / "prepare" / "train.src").read_bytes().splitlines())
    out = (run / "distill" / DISTILLED).read_bytes()
    assert out.count(b"\n") == n and result.metrics["lines"] == n
    assert out == (ref / "distill" / DISTILLED).read_bytes()          # nothing lost, duplicated or reordered
    assert len(done_shards(run / "distill" / "shards", n, spec.distill.shards)) == spec.distill.shards
    assert not list((run / "distill" / "shards").glob(".*.tmp"))   # no half-written debris left


# ------------------------------------------------------------------------------- training --

def copy_run(prepared_run, tmp_path):
    run_dir, raw = prepared_run
    shutil.copytree(run_dir, tmp_path / "run")
    return tmp_path / "run", dict(raw)


def train_teacher(run_dir, raw, tracker, during=None):
    """The teacher stage in its own MLflow run; `during(run_id)` runs in a thread meanwhile."""
    with tracker.parent("t", {}), tracker.child("teacher") as h:
        thread = threading.Thread(target=during, args=(h.run_id,), daemon=True) if during else None
        if thread:
            thread.start()
        try:
            teacher(StageContext(spec_from_dict(raw), run_dir, "teacher", tracker=h, progress=False,
                                 experiment=tracker))
        finally:
            if thread:
                thread.join(timeout=60)
        return h.run_id


def losses(tracker, run_id) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in MlflowClient(tracker.tracking_uri).get_metric_history(run_id, "train/loss"))


def loss_steps(tracker, run_id) -> list[int]:
    return [step for step, _ in losses(tracker, run_id)]


def fault_train(**kw) -> dict:
    """The teacher of the training fault tests: two DDP workers (dropout on), so a resume must
    restore every rank's RNG state, not only rank 0's."""
    return micro_train(workers=2, strategy="ddp", **kw)


def checkpoints(run_dir) -> list[Path]:
    return sorted(p for p in (run_dir / "teacher" / "ray").rglob("checkpoint_*") if p.is_dir())


def registered_step(run_dir) -> int:
    """Step of the newest checkpoint the Ray Train controller has registered (0: none yet). A
    checkpoint dir can exist before that; a worker lost in between resumes from the one before."""
    for snapshot in (run_dir / "teacher" / "ray").rglob("checkpoint_manager_snapshot.json"):
        try:
            latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
        except ValueError:   # being rewritten
            return 0
        return int(latest.get("metrics", {}).get("step", 0))
    return 0


@pytest.fixture
def tracker(tmp_path):
    return Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "faults", tmp_path / "artifacts")


@pytest.fixture(scope="module")
def fault_free(ray_local, prepared_run, tmp_path_factory):
    """The teacher of the training fault tests, 40 steps without a fault: the losses and the
    weights they must end with (resuming restores weights, Adam, every rank's RNG state and the
    data position exactly). Returns ({step: loss}, weights)."""
    tmp = tmp_path_factory.mktemp("fault-free")
    run_dir, raw = copy_run(prepared_run, tmp)
    assert raw["model"].get("dropout", 0.1) > 0
    raw["teacher"] = fault_train(max_steps=40)
    tracker = Tracker(f"sqlite:///{tmp / 'mlflow.db'}", "faults", tmp / "artifacts")
    run_id = train_teacher(run_dir, raw, tracker)
    return dict(losses(tracker, run_id)), weights(run_dir)


def weights(run_dir) -> dict:
    import torch

    return torch.load(run_dir / "teacher" / "model.pt", map_location="cpu", weights_only=True)["state_dict"]


def assert_same_weights(a: dict, b: dict) -> None:
    import torch

    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def test_train_worker_killed_mid_epoch_resumes_from_last_checkpoint(ray_local, prepared_run, tmp_path, tracker,
                                                                    fault_free):
    run_dir, raw = copy_run(prepared_run, tmp_path)
    raw["teacher"] = fault_train(max_steps=40, max_failures=1)       # checkpoint every 10 steps
    kill = {}

    def kill_worker_past_a_checkpoint(run_id):
        client = MlflowClient(tracker.tracking_uri)
        deadline = time.time() + 300
        while time.time() < deadline:
            steps, registered = loss_steps(tracker, run_id), registered_step(run_dir)
            if registered and max(steps) >= registered + 3:   # mid-epoch, past a registered checkpoint
                worker = json.loads(client.get_run(run_id).data.tags["worker.0"])
                os.kill(worker["pid"], signal.SIGKILL)
                kill.update(pid=worker["pid"], step=max(steps), registered=registered)
                return
            time.sleep(0.05)

    run_id = train_teacher(run_dir, raw, tracker, during=kill_worker_past_a_checkpoint)
    assert kill, "the worker was not killed"
    counts = collections.Counter(loss_steps(tracker, run_id))
    assert set(counts) == set(range(1, 41))                 # finished, no step lost
    again = sorted(s for s, c in counts.items() if c == 2)  # trained before the kill and again after it
    assert again and max(counts.values()) == 2
    resumed_from = again[0] - 1                              # not 0: from the checkpoint registered last
    assert kill["registered"] <= resumed_from <= kill["step"] and resumed_from % 10 == 0, (kill, resumed_from)
    assert again == list(range(resumed_from + 1, again[-1] + 1)) and again[-1] >= kill["step"]
    new = json.loads(MlflowClient(tracker.tracking_uri).get_run(run_id).data.tags["worker.0"])
    assert new["pid"] != kill["pid"]
    assert_same_weights(weights(run_dir), fault_free[1])


def test_damaged_train_checkpoint_is_never_loaded(ray_local, prepared_run, tmp_path, tracker, fault_free):
    """Also what a raised max_steps does: the stage asked for 40 steps after 20 trains on from
    its newest intact checkpoint with exactly the losses of the run trained for 40 at once."""
    run_dir, raw = copy_run(prepared_run, tmp_path)
    raw["teacher"] = fault_train(max_steps=20)              # checkpoints at steps 10 and 20
    train_teacher(run_dir, raw, tracker)
    _step10, step20 = checkpoints(run_dir)
    flip_byte(step20 / "trainer_state.pt")                  # the latest: what a restore would load

    raw["teacher"]["max_steps"] = 40
    run_id = train_teacher(run_dir, raw, tracker)
    resumed = losses(tracker, run_id)
    assert [step for step, _ in resumed] == list(range(11, 41))  # resumed from 10, the newest intact one
    assert resumed == [(step, fault_free[0][step]) for step in range(11, 41)]   # bit for bit
    assert_same_weights(weights(run_dir), fault_free[1])

    # Every checkpoint damaged, through a real run: the worker loads nothing and trains nothing,
    # and the error names the damaged files.
    for ckpt in checkpoints(run_dir):
        flip_byte(ckpt / "trainer_state.pt")
    raw["teacher"]["max_steps"] = 50
    with pytest.raises(Exception) as failed:
        train_teacher(run_dir, raw, tracker)
    message = "".join(str(e) for e in chain(failed.value))
    assert "every checkpoint of this training run is damaged, none was loaded: " in message
    assert "trainer_state.pt checksum mismatch" in message
    runs = MlflowClient(tracker.tracking_uri).search_runs([tracker.experiment_id], "tags.mlflow.runName = 'teacher'",
                                                          order_by=["start_time DESC"])
    assert loss_steps(tracker, runs[0].info.run_id) == []     # not one step trained from scratch


def chain(e: BaseException):
    """An exception and its causes and contexts."""
    while e is not None:
        yield e
        e = e.__cause__ or e.__context__


# ------------------------------------------------------------------------- the CLI driver --

def cli_command(workdir, *extra):
    sets = [a for s in [f"workdir={workdir}", *MICRO_JOB_SETS, "ray.num_cpus=2", "ray.object_store_memory=150000000",
                        *extra] for a in ("--set", s)]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    return [sys.executable, "-m", "orchestrator.cli", "run", "jobs/tiny.yaml", *sets, "--no-progress"], env


def cli(workdir, *extra):
    cmd, env = cli_command(workdir, *extra)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)


@pytest.fixture(scope="module")
def interrupted_run(micro_run, tmp_path_factory):
    """The micro job through the CLI, SIGKILLed (driver and its local Ray, one process group)
    once distillation has finished a shard, then the same command run again. One distillation
    actor, so shards finish one after another and the kill lands between them."""
    wd = tmp_path_factory.mktemp("interrupted") / "runs"
    cmd, env = cli_command(wd, "distill.actors=1")
    shard_dir, n = wd / "tiny" / "distill" / "shards", 600
    with open(wd.parent / "killed.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 600
        while proc.poll() is None and time.time() < deadline and not done_shards(shard_dir, n, 4):
            time.sleep(0.005)
        family = [proc, *psutil.Process(proc.pid).children(recursive=True)]   # the driver and its local Ray
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # Ray processes outside the group notice the driver's death and exit by themselves; an actor
    # may finish the shard in hand first (written atomically: harmless). Count the shards after.
    _, alive = psutil.wait_procs([p for p in family if p.pid != proc.pid], timeout=30)
    orphans = [p.pid for p in alive]
    for p in alive:   # not expected; cleaned up so they do not hold the CPUs, and reported below
        p.kill()
    at_kill = done_shards(shard_dir, n, 4)
    rerun = cli(wd, "distill.actors=1")
    (wd.parent / "rerun.log").write_text(rerun.stderr)
    return wd / "tiny", at_kill, rerun, orphans


def test_sigkilled_driver_resumes_and_matches_an_uninterrupted_run(interrupted_run, micro_run):
    run, at_kill, rerun, orphans = interrupted_run
    assert orphans == []                                    # killing the driver took its local Ray along
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert 1 <= len(at_kill) < 4, f"killed with {len(at_kill)} shard(s) done"
    for stage in ("prepare", "tokenizer", "teacher"):
        assert f"{stage:<9} done (reused)" in rerun.stderr
    assert f"4 shards ({len(at_kill)} already done)" in rerun.stderr
    assert done_shards(run / "distill" / "shards", 600, 4).items() >= at_kill.items()  # not rewritten
    ref = micro_run[0]
    for name in COMPARED:
        assert (run / name).read_bytes() == (ref / name).read_bytes(), name


@pytest.mark.slow
def test_damaged_artifacts_are_detected_and_redone(interrupted_run):
    """Runs after the test above, on the same finished run dir."""
    run = interrupted_run[0]
    before = {name: (run / name).read_bytes() for name in COMPARED}
    shard1 = run / "distill" / "shards" / "shard-00001.txt"
    shard_bytes, n_checkpoints = shard1.read_bytes(), len(checkpoints(run))
    flip_byte(run / "teacher" / "model.pt")                                   # bit rot in a finished stage
    merged = run / "distill" / DISTILLED
    merged.write_bytes(merged.read_bytes()[: merged.stat().st_size // 2])    # truncated output
    shard1.write_bytes(shard_bytes[: len(shard_bytes) // 2])                  # half-written shard, marker kept

    rerun = cli(run.parent, "distill.actors=1")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "teacher   running" in rerun.stderr and "distill   running" in rerun.stderr
    assert "4 shards (3 already done)" in rerun.stderr                        # only the damaged shard
    assert "student   done (reused)" in rerun.stderr and "evaluate  done (reused)" in rerun.stderr
    assert len(checkpoints(run)) == n_checkpoints       # the teacher came back from its checkpoint, not retrained
    assert shard1.read_bytes() == shard_bytes
    for name in COMPARED:
        assert (run / name).read_bytes() == before[name], name
