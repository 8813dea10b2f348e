"""The whole tiny pipeline through the real CLI (a subprocess, a local Ray cluster, MLflow on
SQLite), shrunk with --set so it fits CI: every stage runs, MLflow holds a parent run with a
nested run per stage, a rerun reuses everything, --force reruns from a stage, a failing
stage exits non-zero with its MLflow run FAILED, and a bad spec exits 2 before Ray starts."""
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from orchestrator.run.layout import STAGE_TABLE, STAGES

from helpers import MICRO_JOB_SETS, copy_micro_workdir, fake_stages, free_port, micro_job_spec

ROOT = Path(__file__).resolve().parents[2]
SMALL = [*MICRO_JOB_SETS, "ray.num_cpus=2", "ray.object_store_memory=150000000"]


def cli(*args, workdir, timeout=600, cwd=ROOT):
    cmd = [sys.executable, "-m", "orchestrator.cli", *args]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def sets(workdir, *extra):
    out = []
    for s in [f"workdir={workdir}", *SMALL, *extra]:
        out += ["--set", s]
    return out


def runs_of(workdir):
    client = MlflowClient(f"sqlite:///{workdir}/mlflow.db")
    exp = client.get_experiment_by_name("tiny")
    return client, client.search_runs([exp.experiment_id], max_results=200)


@pytest.mark.slow
def test_tiny_pipeline_end_to_end_then_resume_and_force(tmp_path):
    """First run as in the README: the default relative workdir, ./runs where the user stands.
    Ray Train workers run elsewhere, so every path handed to them must still point into the
    user's run dir. Every later command names the same work dir by its absolute path."""
    wd = tmp_path / "runs"
    r = cli("run", str(ROOT / "jobs" / "tiny.yaml"), *sets("runs"), "--no-progress", workdir=None, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "imitate-NAT + LPD (ΔT = 3)" in r.stdout and "sacreBLEU: nrefs:1" in r.stdout
    run_dir = wd / "tiny"
    for stage in STAGES:
        m = json.loads((run_dir / stage / "manifest.json").read_text())
        assert m["status"] == "done", stage
        assert all((run_dir / stage / o["path"]).is_file() for o in m["outputs"].values()), stage
    assert (wd / "mlflow.db").is_file()
    summary = json.loads((run_dir / "evaluate" / "summary.json").read_text())
    assert set(summary["rows"]) == {"at", "nat", "lpd"}
    distilled = (run_dir / "distill" / "train.distilled.tgt").read_text().splitlines()
    assert len(distilled) == len((run_dir / "prepare" / "train.src").read_text().splitlines())

    client, runs = runs_of(wd)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and sorted(c.data.tags["stage"] for c in children) == sorted(STAGES)
    by_stage = {c.data.tags["stage"]: c for c in children}
    assert len(client.get_metric_history(by_stage["teacher"].info.run_id, "train/loss")) == 6
    assert "test_bleu_lpd" in by_stage["evaluate"].data.metrics
    assert parents[0].data.params["student.lambda2"] == "0.001"
    assert all(r.info.status == "FINISHED" for r in [parents[0], *children])

    # A rerun reuses every stage.
    r = cli("run", "jobs/tiny.yaml", *sets(wd), "--no-progress", workdir=wd)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("done (reused)") == len(STAGES)
    mtime = (run_dir / "teacher" / "model.pt").stat().st_mtime

    # --force student reruns student and evaluate only.
    r = cli("run", "jobs/tiny.yaml", *sets(wd), "--no-progress", "--force", "student", workdir=wd)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("done (reused)") == 4 and "student   running" in r.stderr
    assert (run_dir / "teacher" / "model.pt").stat().st_mtime == mtime

    st = cli("status", "jobs/tiny.yaml", *sets(wd), workdir=wd)
    assert st.returncode == 0 and st.stdout.count(" done ") == len(STAGES)

    # `eval` on the run's own test set reproduces the evaluate stage's scores.
    test_src, test_ref = run_dir / "prepare" / "test.src", run_dir / "prepare" / "test.tgt"
    ev = cli("eval", str(run_dir), "--src", str(test_src), "--ref", str(test_ref), "--json", workdir=wd)
    assert ev.returncode == 0, ev.stderr[-2000:]
    scores = json.loads(ev.stdout)["rows"]
    summary = json.loads((run_dir / "evaluate" / "summary.json").read_text())["rows"]
    for name in ("at", "nat", "lpd"):
        assert scores[name]["bleu"] == pytest.approx(summary[name]["bleu"])
        assert scores[name]["chrf_signature"].startswith("nrefs:1")
    plain = cli("eval", str(run_dir), "--src", str(test_src), "--ref", str(test_ref), "--delta-t", "0", "--beam", "1",
                workdir=wd)
    assert plain.returncode == 0 and "NAT+LPD ΔT=0" in plain.stdout and "BLEU: nrefs:1" in plain.stdout
    assert "AT beam 1" in plain.stdout
    short = tmp_path / "short.tgt"
    short.write_text("one line\n")
    bad = cli("eval", str(run_dir), "--src", str(test_src), "--ref", str(short), workdir=wd)
    assert bad.returncode == 2 and "lines" in bad.stderr

    # A raised student.max_steps trains on from the student's last checkpoint (step 30).
    longer = sets(wd, "student.max_steps=45")
    st = cli("status", "jobs/tiny.yaml", *longer, workdir=wd)
    assert "student    extend" in st.stdout and "trained to max_steps 30, the job asks 45" in st.stdout
    r = cli("run", "jobs/tiny.yaml", *longer, "--no-progress", workdir=wd)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("done (reused)") == 4
    assert "student   extending from its last checkpoint (max_steps 30 -> 45)" in r.stderr
    client, runs = runs_of(wd)
    newest = max((x for x in runs if x.data.tags.get("stage") == "student"), key=lambda x: x.info.start_time)
    assert [m.step for m in client.get_metric_history(newest.info.run_id, "valid/bleu")] == [45]  # not 15, 30


def test_a_rerun_of_a_finished_job_reuses_every_stage_without_a_ray_cluster(micro_run, tmp_path):
    """Every stage done: `run` neither starts a local Ray nor joins one (its --address here is a
    port nothing listens on: any attempt to connect would fail the run) and prints the results.
    A forced, an extended or an unfinished stage needs the cluster."""
    from orchestrator.pipeline import nothing_to_run

    rd, spec = copy_micro_workdir(micro_run, tmp_path / "runs")
    wd = tmp_path / "runs"
    r = cli("run", "jobs/tiny.yaml", *sets(wd), "--address", f"127.0.0.1:{free_port()}", "--no-progress",
            workdir=wd)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stderr.count("done (reused)") == len(STAGES) and "every stage is done" in r.stderr
    assert "tiny: test set results" in r.stdout and " + LPD (ΔT = " in r.stdout
    assert "Ray" not in r.stderr.replace("without a Ray cluster", "")
    assert nothing_to_run(spec) and nothing_to_run(spec, until="teacher")
    assert not nothing_to_run(spec, force="evaluate")
    assert not nothing_to_run(micro_job_spec(wd, "student.max_steps=45"))        # extend the student
    assert nothing_to_run(micro_job_spec(wd, "student.max_steps=45"), until="distill")
    (rd / "evaluate" / "manifest.json").unlink()
    assert not nothing_to_run(spec) and nothing_to_run(spec, until="student")


def test_a_failing_stage_exits_nonzero_and_marks_its_run_failed(tmp_path):
    wd = tmp_path / "runs"
    # SentencePiece cannot build a 5-piece vocabulary: the tokenizer stage fails at run time.
    r = cli("run", "jobs/tiny.yaml", *sets(wd, "tokenizer.vocab_size=5"), "--no-progress", workdir=wd)
    assert r.returncode == 1
    assert "stage 'tokenizer' failed" in r.stderr and "rerun the same command" in r.stderr
    assert json.loads((wd / "tiny" / "tokenizer" / "manifest.json").read_text())["status"] == "failed"
    assert json.loads((wd / "tiny" / "prepare" / "manifest.json").read_text())["status"] == "done"
    _, runs = runs_of(wd)
    failed = [r for r in runs if r.data.tags.get("stage") == "tokenizer"]
    assert failed[0].info.status == "FAILED" and failed[0].data.tags.get("error")


@pytest.mark.parametrize("override, field", [("teacher.lrr=1", "teacher.lrr"),
                                             ("distill.shards=-1", "distill.shards"),
                                             ("student.copy=hard", "student.copy")])
def test_bad_spec_exits_2_naming_the_field_before_anything_starts(tmp_path, override, field):
    wd = tmp_path / "runs"
    r = cli("run", "jobs/tiny.yaml", "--set", f"workdir={wd}", "--set", override, workdir=wd, timeout=60)
    assert r.returncode == 2 and field in r.stderr
    assert not wd.exists()          # nothing was started or written


HOLD_RUN_LOCK = """import sys, time
from pathlib import Path
from orchestrator.run.sharing import run_lock
with run_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_a_second_run_of_the_same_job_exits_2_naming_the_first(tmp_path):
    """One `run` of a job at a time: while another process holds the job's run dir, `run`
    exits 2 naming its pid before any stage starts (the lock is taken right after the cluster
    checks, so a refused job leaves no file); the lock goes when that process dies (SIGKILL)."""
    from orchestrator.run.sharing import run_lock

    wd = tmp_path / "runs"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_RUN_LOCK, str(wd / "tiny")], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        r = cli("run", "jobs/tiny.yaml", *sets(wd), "--no-progress", workdir=wd, timeout=120)
        assert r.returncode == 2, r.stderr[-3000:]
        assert f"is being run by pid {holder.pid} on " in r.stderr
        assert not (wd / "tiny" / "prepare").exists() and "prepare" not in r.stderr
    finally:
        holder.kill()
        holder.wait()
    with run_lock(wd / "tiny"):
        pass


def test_runs_share_linked_stages_and_train_one_teacher(ray_local, tmp_path):
    """Two specs that differ only in the student share prepare/tokenizer/teacher through
    shared_stage_dirs: the second run links to the first one's teacher and trains nothing."""
    from orchestrator.pipeline import run_pipeline
    from orchestrator.run.layout import run_dir
    from orchestrator.run.manifest import read_manifest
    from orchestrator.run.sharing import shared_stage_dirs

    root = tmp_path / "shared"
    a = micro_job_spec(tmp_path / "a")
    b = micro_job_spec(tmp_path / "b", "student.lambda2=0.05")
    links_a, links_b = shared_stage_dirs(a, root), shared_stage_dirs(b, root)
    assert links_a["teacher"] == links_b["teacher"] and links_a["distill"] == links_b["distill"]
    run_pipeline(a, "jobs/tiny.yaml", until="teacher", progress=False, linked=links_a)
    started = read_manifest(links_a["teacher"]).started
    run_pipeline(b, "jobs/tiny.yaml", until="teacher", progress=False, linked=links_b)
    for stage in ("prepare", "tokenizer", "teacher"):
        link = run_dir(b) / stage
        assert link.is_symlink() and link.resolve() == links_a[stage].resolve()
    assert read_manifest(run_dir(b) / "teacher").started == started  # reused, not retrained
    # A spec with another teacher gets its own teacher dir but still shares the data stages.
    c = shared_stage_dirs(micro_job_spec(tmp_path / "c", "teacher.lambda1=0.01"), root)
    assert c["teacher"] != links_a["teacher"] and c["tokenizer"] == links_a["tokenizer"]


def test_a_sweep_trial_reads_the_stages_run_made_and_shares_the_rest(tmp_path):
    """job_or_shared_stage_dirs: the job's own stage dirs while `run` finished that very stage
    there (same hash, status done); from the first that is missing, unfinished or made with
    other settings, the sweep's content-addressed dirs, for it and every stage after it."""
    from orchestrator.run.hashing import stage_hashes
    from orchestrator.run.layout import run_dir
    from orchestrator.run.manifest import Manifest, write_manifest
    from orchestrator.run.sharing import job_or_shared_stage_dirs, shared_stage_dirs

    job, root = micro_job_spec(tmp_path / "runs"), tmp_path / "runs" / "tiny-sweep" / "shared"
    trial = micro_job_spec(tmp_path / "trial", "student.lambda2=0.05")        # same data, same teacher
    other = micro_job_spec(tmp_path / "trial", "model.n_actions=8")           # same data, another teacher
    hashes = stage_hashes(job)

    def made(stage, status="done", input_hash=None):
        (run_dir(job) / stage).mkdir(parents=True, exist_ok=True)
        write_manifest(run_dir(job) / stage, Manifest(stage, input_hash or hashes[stage], status=status))

    shared = shared_stage_dirs(trial, root)
    assert job_or_shared_stage_dirs(trial, job, root) == shared                     # nothing made yet
    for stage in ("prepare", "tokenizer", "teacher"):
        made(stage)
    made("distill", status="running")
    dirs = job_or_shared_stage_dirs(trial, job, root)
    assert {s: d == run_dir(job) / s for s, d in dirs.items()} == \
        {"prepare": True, "tokenizer": True, "teacher": True, "distill": False}
    assert dirs["distill"] == shared["distill"]
    dirs = job_or_shared_stage_dirs(other, job, root)                               # another teacher: shared
    assert dirs["tokenizer"] == run_dir(job) / "tokenizer" and dirs["teacher"] == shared_stage_dirs(other, root)["teacher"]
    made("tokenizer", input_hash="0" * 64)                                         # the job changed since
    dirs = job_or_shared_stage_dirs(trial, job, root)
    assert dirs["prepare"] == run_dir(job) / "prepare" and dirs["tokenizer"] == shared["tokenizer"]
    assert dirs["teacher"] == shared["teacher"]                                    # and nothing after it


def test_a_sweep_trial_reads_the_job_student_only_as_run_would_reuse_it(tmp_path):
    """finished_job_stage: the job's <run>/student for a trial with the job's own settings while
    `run` would reuse it as it is; None when the settings differ, it is unfinished, an output
    changed, or an earlier stage's output changed since it ran (run_stage would redo it, and a
    trial would redo it through its link, inside the job's run dir)."""
    from orchestrator.run.files import sha256_path
    from orchestrator.run.hashing import consumed_digests, stage_hashes
    from orchestrator.run.layout import STAGES, run_dir
    from orchestrator.run.manifest import Manifest, write_manifest
    from orchestrator.run.sharing import finished_job_stage

    job = micro_job_spec(tmp_path / "runs")
    rd, hashes = run_dir(job), stage_hashes(job)

    def made(stage, status="done", outputs=None):
        (rd / stage).mkdir(parents=True, exist_ok=True)
        write_manifest(rd / stage, Manifest(stage, hashes[stage], status=status, outputs=outputs or {},
                                            consumed=consumed_digests(rd, stage)))

    for stage in STAGES[:STAGES.index("student")]:
        made(stage)
    model = rd / "student" / "model.pt"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"weights")
    made("student", outputs={"model": {"path": "model.pt", "sha256": sha256_path(model)}})
    assert finished_job_stage(job, job, "student") == rd / "student"
    assert finished_job_stage(micro_job_spec(tmp_path / "t", "student.lambda2=0.05"), job, "student") is None
    model.write_bytes(b"other weights")                                             # an output changed
    assert finished_job_stage(job, job, "student") is None
    model.write_bytes(b"weights")
    made("distill", outputs={"corpus": {"path": "x", "sha256": "0" * 64}})          # redone since
    assert finished_job_stage(job, job, "student") is None
    made("student", status="running")
    assert finished_job_stage(job, job, "student") is None


def test_stage_lock_makes_a_second_runner_wait(tmp_path):
    import threading
    import time

    from orchestrator.run.sharing import stage_lock

    d, events = tmp_path / "teacher", []
    d.mkdir()
    link = tmp_path / "link"
    link.symlink_to(d, target_is_directory=True)

    def second():
        with stage_lock(link, "teacher"):  # same resolved dir: same lock
            events.append("second")

    with stage_lock(d, "teacher"):
        t = threading.Thread(target=second)
        t.start()
        time.sleep(0.3)
        events.append("first done")
    t.join(5)
    assert events == ["first done", "second"]


def test_a_stage_redone_with_new_bytes_makes_the_stages_after_it_stale(tmp_path, monkeypatch):
    """Stages are cheap fakes here (the real ones are covered above): damage the teacher's
    output; if its redo gives other bytes, distill/student/evaluate run again on them, and if
    it gives the same bytes, nothing after it reruns."""
    from orchestrator import pipeline
    from orchestrator.run import layout, runner
    from orchestrator.spec.loading import spec_from_dict

    version = {"teacher": 0}
    calls = fake_stages(monkeypatch, label=lambda stage: f"{stage}{version.get(stage, 0)}")
    spec = spec_from_dict({"name": "fake", "workdir": str(tmp_path)})
    rd = layout.run_dir(spec)
    pipeline.run_pipeline(spec, "", progress=False)
    assert calls == list(STAGES)

    calls.clear()
    version["teacher"] = 1                           # its redo will write other bytes
    (rd / "teacher" / "out.txt").write_text("bit rot")
    assert [s.state for s in runner.stage_states(spec)][2] == "damaged"
    pipeline.run_pipeline(spec, "", progress=False)
    assert calls == ["teacher", "distill", "student", "evaluate"]
    assert "teacher1" in (rd / "evaluate" / "out.txt").read_text()

    calls.clear()
    (rd / "teacher" / "out.txt").write_text("bit rot")  # the redo gives the same bytes again
    pipeline.run_pipeline(spec, "", progress=False)
    assert calls == ["teacher"]
    assert {s.state for s in runner.stage_states(spec)} == {"done"}


def test_a_raised_max_steps_trains_on_and_anything_else_retrains(tmp_path, monkeypatch):
    """Fake training stages that record the steps they train and go on from what their dir
    holds: a raised max_steps keeps the teacher's dir and trains only the new steps (the
    stages after it rerun on its new output); a lowered max_steps, another changed field or
    --force wipes the dir and trains from step 1."""
    from orchestrator import pipeline
    from orchestrator.run import hashing, runner
    from orchestrator.run.manifest import read_manifest
    from orchestrator.run.runner import StageResult
    from orchestrator.spec.loading import spec_from_dict

    trained = {"teacher": [], "student": []}

    def fake(stage):
        def run(ctx):
            out = ctx.out_dir / "out.txt"          # a training stage's: the last step it trained (its "checkpoint")
            if stage in trained:
                start, end = (int(out.read_text()) if out.exists() else 0), getattr(ctx.spec, stage).max_steps
                trained[stage].append((start + 1, end))
                out.write_text(str(end))
            else:
                out.write_text(stage)
            return StageResult(outputs={"out.txt": "out.txt"})
        return run

    monkeypatch.setattr(pipeline, "stage_functions", lambda: {s: fake(s) for s in STAGES})
    monkeypatch.setattr(runner, "STAGE", {s.name: dataclasses.replace(s, logged=()) for s in STAGE_TABLE})

    def spec(**teacher):
        return spec_from_dict({"name": "fake", "workdir": str(tmp_path), "teacher": {"max_steps": 10, **teacher}})

    pipeline.run_pipeline(spec(), "", progress=False)
    assert trained["teacher"] == [(1, 10)]

    more = spec(max_steps=25)
    assert [s.state for s in runner.stage_states(more)] == ["done", "done", "extend", "stale", "stale", "stale"]
    pipeline.run_pipeline(more, "", progress=False)
    assert trained["teacher"][-1] == (11, 25)                             # only the new steps
    assert trained["student"][-1] == (1, trained["student"][0][1])        # retrained on the new teacher
    assert {s.state for s in runner.stage_states(more)} == {"done"}
    m = read_manifest(tmp_path / "fake" / "teacher")
    assert m.max_steps == 25 and m.input_hash == hashing.stage_hashes(more)["teacher"]

    pipeline.run_pipeline(spec(max_steps=15), "", progress=False)      # fewer steps: from scratch
    assert trained["teacher"][-1] == (1, 15)
    pipeline.run_pipeline(spec(max_steps=20, lr=2e-4), "", progress=False)  # other inputs: from scratch
    assert trained["teacher"][-1] == (1, 20)
    pipeline.run_pipeline(spec(max_steps=30, lr=2e-4), "", progress=False, force="teacher")
    assert trained["teacher"][-1] == (1, 30)                              # --force: from scratch
    assert hashing.extend_key(spec(max_steps=5), "teacher") == hashing.extend_key(spec(), "teacher")
    assert hashing.extend_key(spec(lr=2e-4), "teacher") != hashing.extend_key(spec(), "teacher")
    assert hashing.extend_key(spec(), "distill") is None


def test_a_link_to_a_stage_of_other_settings_is_dropped_and_its_target_kept(tmp_path):
    """A shared run's stage dir still linked to a dir of other settings is unlinked (the stage is
    then redone in the run's own dir); a link to the same settings, and a plain dir, are kept."""
    from orchestrator.run.hashing import stage_hashes
    from orchestrator.run.manifest import Manifest, write_manifest
    from orchestrator.run.sharing import drop_link_of_other_settings, link_stage

    spec = micro_job_spec(tmp_path)
    run, elsewhere = tmp_path / "variant", tmp_path / "job"
    run.mkdir()
    for stage, hash_ in (("teacher", stage_hashes(spec)["teacher"]), ("student", "0" * 64)):
        write_manifest(elsewhere / stage, Manifest(stage=stage, input_hash=hash_, status="done"))
        link_stage(run, stage, elsewhere / stage)
        drop_link_of_other_settings(run, stage, spec)
    assert (run / "teacher").is_symlink()                      # the same settings: still shared
    assert not (run / "student").exists()                      # other settings: unlinked, to be redone here
    assert (elsewhere / "student" / "manifest.json").is_file()   # ... and the other run's stage untouched
    (run / "evaluate").mkdir()
    drop_link_of_other_settings(run, "evaluate", spec)
    assert (run / "evaluate").is_dir()
