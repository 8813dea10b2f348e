"""imitate-orch sweep: Ray Tune trials of a micro job through the real CLI (subprocesses, a local
Ray, MLflow on SQLite) — teachers shared by config hash, a failing trial recorded while the sweep
goes on, MLflow runs nested sweep → trial → stage, best.yaml valid and runnable (reusing the
sweep's stages), resume by Tuner.restore — plus the pieces that need no Ray."""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow import MlflowClient

from orchestrator.run.manifest import read_manifest
from orchestrator.run.sharing import shared_stage_dirs
from orchestrator.spec.loading import SpecError, load_spec, spec_from_dict
from orchestrator.sweep.driver import (SweepError, TrialRunCloser, asha_scheduler, check_same_job, search_space,
                                      student_report_steps)
from orchestrator.sweep.results import best_spec, root_error
from orchestrator.sweep.trial import trial_spec

from helpers import MICRO_JOB_SETS, micro_job_spec

ROOT = Path(__file__).resolve().parents[2]
# Two action counts, one λ1: the 16-action trials share one teacher; the 8-action trial fails
# (block_teacher_dir; the seeded search gives 8, 16, 16 for seed 1). grace_period = all rounds: no ASHA
# stopping here, so every non-failing trial finishes (which ASHA stops is not deterministic).
SWEEP_SETS = [*MICRO_JOB_SETS, "ray.num_cpus=2", "ray.object_store_memory=150000000", "student.cpus_per_worker=1",
              "sweep.n_actions=[8, 16]", "sweep.lambda1=[0.001, 0.001]", "sweep.delta_t=[0, 1, 2]",
              "sweep.grace_period=3"]


def cli(*args, env_extra=None, timeout=600):
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(ROOT), **(env_extra or {})}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def sweep_cli(wd, *extra):
    sets = [a for s in [f"workdir={wd}", *SWEEP_SETS] for a in ("--set", s)]
    return cli("sweep", "jobs/tiny.yaml", *sets, "--num-samples", "3", "--max-concurrent", "2", "--no-progress",
               *extra)


def block_teacher_dir(wd, n_actions: int) -> Path:
    """A real fault, injected through the file system: a plain file where the shared teacher dir
    of the trials with `n_actions` goes, so those trials fail (their teacher dir cannot be made)
    while the others go on."""
    spec = load_spec(ROOT / "jobs" / "tiny.yaml", [f"workdir={wd}", *SWEEP_SETS])
    config = {"lambda1": spec.teacher.lambda1, "n_actions": n_actions, "lambda2": spec.student.lambda2}
    blocked = shared_stage_dirs(trial_spec(spec.model_dump(mode="json"), config, wd), wd / "tiny-sweep" / "shared",
                                stages=("teacher",))["teacher"]
    blocked.parent.mkdir(parents=True)
    blocked.write_text("in the way\n")
    return blocked


def runs_by_parent(wd):
    client = MlflowClient(f"sqlite:///{wd}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id], max_results=500)
    children = {}
    for r in runs:
        children.setdefault(r.data.tags.get("mlflow.parentRunId"), []).append(r)
    return client, children


@pytest.mark.slow
def test_sweep_shares_teachers_records_failures_writes_best_yaml_and_resumes(tmp_path):
    wd = tmp_path / "runs"
    blocked = block_teacher_dir(wd, 8)
    r = sweep_cli(wd)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "Best configuration" in r.stdout and "best.yaml" in r.stdout
    sd = wd / "tiny-sweep"
    result = json.loads((sd / "results.json").read_text())
    rows = {row["trial_id"]: row for row in result["rows"]}
    assert sorted(row["n_actions"] for row in rows.values()) == [8, 16, 16]
    for row in rows.values():  # the 8-action trial fails (its teacher dir is blocked), the sweep goes on
        assert row["status"] == ("failed" if row["n_actions"] == 8 else "done"), row
    failed = next(row for row in rows.values() if row["status"] == "failed")
    assert "FileExistsError" in failed["error"] and str(blocked) in failed["error"]
    done = [row for row in rows.values() if row["status"] == "done"]
    for row in done:  # every student decoded at each ΔT of the sweep
        assert {f"valid_bleu_lpd_dt{d}" for d in (0, 1, 2)} <= set(row)
        assert row["valid_bleu_lpd"] == max(row[f"valid_bleu_lpd_dt{d}"] for d in (0, 1, 2))
    assert result["best"]["trial_id"] == max(done, key=lambda row: row["valid_bleu_lpd"])["trial_id"]

    # One teacher for the two trials that share its config: trained once, linked into both.
    teachers = [d for d in (sd / "shared" / "teacher").iterdir() if d.is_dir()]
    assert len(teachers) == 1
    for row in done:
        assert (Path(row["run_dir"]) / "teacher").resolve() == teachers[0].resolve()

    # MLflow: the sweep's run, a nested run per trial, the stage runs nested under each trial.
    client, children = runs_by_parent(wd)
    [sweep_run] = [r for r in children[None] if r.info.run_name == "tiny-sweep"]
    trials = {t.data.tags["trial_id"]: t for t in children[sweep_run.info.run_id]}
    assert set(trials) == set(rows)
    assert trials[failed["trial_id"]].info.status == "FAILED"
    assert "FileExistsError" in trials[failed["trial_id"]].data.tags["error"]
    teacher_runs = []
    for row in done:
        t = trials[row["trial_id"]]
        assert t.info.status == "FINISHED" and t.data.params["student.lambda2"] == str(row["lambda2"])
        assert t.data.metrics["valid_bleu_lpd"] == pytest.approx(row["valid_bleu_lpd"])
        assert [m.step for m in client.get_metric_history(t.info.run_id, "valid/bleu")] == [15, 30]
        assert len(client.get_metric_history(t.info.run_id, "valid/bleu_lpd_by_delta_t")) == 3
        stages = {s.data.tags["stage"]: s for s in children[t.info.run_id]}
        assert set(stages) == {"prepare", "tokenizer", "teacher", "distill", "student"}
        teacher_runs.append(stages["teacher"].data.params["reused"])
    assert sorted(teacher_runs) == ["False", "True"]
    artifacts = {a.path for a in client.list_artifacts(sweep_run.info.run_id, "plots")}
    assert artifacts == {f"plots/{n}.png" for n in ("valid_bleu_vs_delta_t", "latency_vs_delta_t",
                                                    "valid_bleu_vs_lambda2", "valid_bleu_vs_n_actions")}

    # best.yaml: a valid job with the best trial's settings, which runs reusing the sweep's stages.
    best, best_yaml = result["best"], sd / "best.yaml"
    spec = load_spec(best_yaml)
    assert (spec.name, spec.teacher.lambda1, spec.model.n_actions, spec.student.lambda2, spec.eval.delta_t) == \
        ("tiny-best", best["lambda1"], best["n_actions"], best["lambda2"], best["best_delta_t"])
    r = cli("run", str(best_yaml), "--set", "ray.num_cpus=2", "--set", "ray.object_store_memory=150000000",
            "--no-progress")
    assert r.returncode == 0, r.stderr[-4000:]
    assert f"imitate-NAT + LPD (ΔT = {best['best_delta_t']})" in r.stdout
    for stage in ("teacher", "distill", "student"):
        assert f"{stage:<9} done (reused)" in r.stderr
    assert read_manifest(wd / "tiny-best" / "student").started == \
        read_manifest(Path(best["run_dir"]) / "student").started

    # Rerun: Tune restores the sweep; finished trials are kept, the failed one runs (and fails) again.
    started = {row["trial_id"]: read_manifest(Path(row["run_dir"]) / "student").started for row in done}
    r = sweep_cli(wd)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "resuming the sweep" in r.stderr
    again = {row["trial_id"]: row for row in json.loads((sd / "results.json").read_text())["rows"]}
    assert {t for t, row in again.items() if row["status"] == "done"} == set(started)
    for trial_id, when in started.items():
        assert read_manifest(Path(again[trial_id]["run_dir"]) / "student").started == when
    assert [row["status"] for row in again.values() if row["n_actions"] == 8] == ["failed"]
    _, children = runs_by_parent(wd)
    assert [r.info.run_name for r in children[None]].count("tiny-sweep") == 1  # the same sweep run, resumed

    # Another spec for the same sweep dir is refused before anything starts (exit 2).
    r = sweep_cli(wd, "--set", "student.lambda2=0.5")
    assert r.returncode == 2 and "changed: student.lambda2" in r.stderr


def test_a_sweep_after_run_links_the_job_student_and_replays_its_curve_to_tune(micro_run, tmp_path):
    """The trial with the job's own settings trains nothing: `run` has made its student, which
    is linked, decoded on the valid set, and its valid BLEU curve reaches Tune (and so ASHA)
    step by step, and the trial's MLflow run, as if it had trained there."""
    from helpers import copy_micro_workdir

    rd, spec = copy_micro_workdir(micro_run, tmp_path / "runs")
    wd, started = rd.parent, read_manifest(rd / "student").started
    sets = [f"workdir={wd}", *MICRO_JOB_SETS, "ray.num_cpus=2", "ray.object_store_memory=150000000",
            "sweep.delta_t=[0, 1]", f"sweep.lambda1=[{spec.teacher.lambda1}, {spec.teacher.lambda1}]",
            f"sweep.n_actions=[{spec.model.n_actions}]", f"sweep.lambda2_values=[{spec.student.lambda2}]"]
    r = cli("sweep", "jobs/tiny.yaml", *[a for s in sets for a in ("--set", s)], "--num-samples", "1",
            "--no-progress")
    assert r.returncode == 0, r.stderr[-4000:]
    [row] = json.loads((wd / "tiny-sweep" / "results.json").read_text())["rows"]
    assert row["status"] == "done" and {"valid_bleu_lpd_dt0", "valid_bleu_lpd_dt1"} <= set(row)
    for stage in ("teacher", "distill", "student"):
        assert (Path(row["run_dir"]) / stage).resolve() == (rd / stage).resolve()
    assert read_manifest(rd / "student").started == started                       # not trained again
    client, children = runs_by_parent(wd)
    [job_student] = [
        r for runs in children.values() for r in runs
        if r.data.tags.get("stage") == "student" and r.data.params.get("reused") == "False"]
    curve = [(m.step, m.value) for m in sorted(client.get_metric_history(job_student.info.run_id, "valid/bleu"),
                                               key=lambda m: m.step)]
    assert [step for step, _ in curve] == [15, 30]
    [trial_run] = [r for runs in children.values() for r in runs if r.data.tags.get("trial_id") == row["trial_id"]]
    assert [(m.step, m.value) for m in sorted(client.get_metric_history(trial_run.info.run_id, "valid/bleu"),
                                              key=lambda m: m.step)] == curve
    [result_json] = (wd / "tiny-sweep" / "tune").rglob(f"{row['trial_id']}/result.json")
    reported = [json.loads(line) for line in result_json.read_text().splitlines()]
    assert [(x["step"], x["valid_bleu"]) for x in reported if "step" in x] == curve  # what ASHA saw, in order
    assert reported[-1]["valid_bleu_lpd"] == pytest.approx(row["valid_bleu_lpd"])


# ------------------------------------------------------------------------ no Ray needed --

def test_student_report_steps_are_every_valid_report_of_the_training_loop(tmp_path):
    spec = micro_job_spec(tmp_path)  # 30 steps, eval and checkpoint every 15
    assert student_report_steps(spec) == [15, 30]
    spec = micro_job_spec(tmp_path, "student.max_steps=100", "student.eval_every=30", "student.checkpoint_every=40")
    assert student_report_steps(spec) == [30, 40, 60, 80, 90, 100]
    asha = asha_scheduler(micro_job_spec(tmp_path, "student.max_steps=100", "student.eval_every=30",
                                         "student.checkpoint_every=40", "sweep.grace_period=2"))
    assert (asha._time_attr, asha._max_t, asha._brackets[0]._rungs[-1][0]) == ("step", 100, 40)  # 2nd report


def test_asha_compares_trials_at_equal_steps_a_resumed_one_included(tmp_path):
    """A resumed trial's first report after an interruption is a late step (Tune's own
    training_iteration would call it 1): another trial's early score is not set against it."""
    from ray.tune.schedulers import TrialScheduler

    spec = micro_job_spec(tmp_path, "student.max_steps=2100", "student.eval_every=350", "student.checkpoint_every=350")

    def second_trial_at_step_350(first_trial_reports):
        asha = asha_scheduler(spec)
        a, b = SimpleNamespace(trial_id="a"), SimpleNamespace(trial_id="b")
        asha.on_trial_add(None, a)
        asha.on_trial_add(None, b)
        for step, bleu in first_trial_reports:
            asha.on_trial_result(None, a, {"step": step, "valid_bleu": bleu})
        return asha.on_trial_result(None, b, {"step": 350, "valid_bleu": 18.4})

    assert second_trial_at_step_350([(1750, 25.6)]) == TrialScheduler.CONTINUE  # a resumed at step 1750
    assert second_trial_at_step_350([(350, 20.0), (700, 23.0)]) == TrialScheduler.STOP  # worse at step 350
    assert second_trial_at_step_350([(350, 18.0)]) == TrialScheduler.CONTINUE
    asha = asha_scheduler(spec)   # the last training report does not end the trial: its valid scores follow
    asha.on_trial_add(None, SimpleNamespace(trial_id="a"))
    assert asha.on_trial_result(None, SimpleNamespace(trial_id="a"), {"step": 2100, "valid_bleu": 26.0}) == \
        TrialScheduler.CONTINUE


def test_a_sweep_started_before_the_step_based_asha_is_not_resumed(tmp_path):
    sd = tmp_path / "tiny-sweep"
    (sd / "tune").mkdir(parents=True)   # a Tune experiment, without the scheduler record
    with pytest.raises(SweepError, match="earlier imitate-orch.*--fresh"):
        check_same_job(sd, micro_job_spec(tmp_path), fresh=False)
    check_same_job(sd, micro_job_spec(tmp_path), fresh=True)
    (sd / "tune").mkdir()
    check_same_job(sd, micro_job_spec(tmp_path), fresh=False)   # started by this version: resumes


def test_search_space_samples_log_ranges_and_fixes_degenerate_ones(tmp_path):
    spec = micro_job_spec(tmp_path, "sweep.lambda1=[0.002, 0.002]", "sweep.n_actions=[32, 8, 8]")
    space = search_space(spec)
    assert space["lambda1"] == 0.002
    assert space["n_actions"].categories == [8, 32]
    samples = [space["lambda2"].sample() for _ in range(300)]
    assert all(1e-4 <= x <= 1e-1 for x in samples)
    assert 0.2 < sum(x < 1e-3 for x in samples) / len(samples) < 0.5  # log-uniform: 1/3 per decade


def test_a_grid_of_values_replaces_a_range(tmp_path):
    spec = micro_job_spec(tmp_path, "sweep.lambda2_values=[1, 0.001, 0.1, 0.01, 0.1]")
    space = search_space(spec)
    assert space["lambda2"] == {"grid_search": [0.001, 0.01, 0.1, 1]}
    assert not isinstance(search_space(micro_job_spec(tmp_path))["lambda2"], dict)   # without: a range
    for bad in ("[]", "[-1]", "[.inf]"):
        with pytest.raises(SpecError, match="lambda2_values"):
            micro_job_spec(tmp_path, f"sweep.lambda2_values={bad}")


def test_trials_share_teachers_by_config_and_best_yaml_keeps_their_hashes(tmp_path):
    from orchestrator.run.hashing import stage_hashes

    base = micro_job_spec(tmp_path).model_dump(mode="json")
    a = trial_spec(base, {"lambda1": 1e-3, "n_actions": 16, "lambda2": 1e-2}, tmp_path / "a")
    b = trial_spec(base, {"lambda1": 1e-3, "n_actions": 16, "lambda2": 5e-2}, tmp_path / "b")
    c = trial_spec(base, {"lambda1": 1e-3, "n_actions": 32, "lambda2": 1e-2}, tmp_path / "c")
    ha, hb, hc = stage_hashes(a), stage_hashes(b), stage_hashes(c)
    assert ha["distill"] == hb["distill"] and ha["student"] != hb["student"]   # λ2: student only
    assert hc["tokenizer"] == ha["tokenizer"] and hc["teacher"] != ha["teacher"]  # actions: teacher
    assert (a.workdir, a.teacher.lambda1, a.model.n_actions, a.student.lambda2) == (str(tmp_path / "a"), 1e-3, 16, 1e-2)
    # the size preset's own action count (tiny: 64) on a job that leaves it unset: the job's hashes
    job = micro_job_spec(tmp_path, "model.n_actions=null")
    same = trial_spec(job.model_dump(mode="json"), {"lambda1": job.teacher.lambda1, "n_actions": 64, "lambda2": 1e-2},
                      tmp_path / "d")
    assert same.model.n_actions is None and stage_hashes(same)["distill"] == stage_hashes(job)["distill"]
    other = trial_spec(job.model_dump(mode="json"), {"lambda1": job.teacher.lambda1, "n_actions": 32, "lambda2": 1e-2},
                       tmp_path / "d")
    assert other.model.n_actions == 32 and stage_hashes(other)["teacher"] != stage_hashes(job)["teacher"]
    best = best_spec(micro_job_spec(tmp_path), {"lambda1": 1e-3, "n_actions": 16, "lambda2": 1e-2, "best_delta_t": 2})
    assert best.name == "tiny-best" and best.eval.delta_t == 2
    hbest = stage_hashes(best)
    assert all(hbest[s] == ha[s] for s in ("prepare", "tokenizer", "teacher", "distill", "student"))


def test_a_sweep_dir_resumes_only_the_spec_it_was_started_with(tmp_path):
    sd = tmp_path / "tiny-sweep"
    sd.mkdir()
    check_same_job(sd, micro_job_spec(tmp_path, "student.lambda2=0.1"), fresh=False)
    check_same_job(sd, micro_job_spec(tmp_path), fresh=False)  # no Tune experiment yet: nothing to resume
    (sd / "tune").mkdir()
    check_same_job(sd, micro_job_spec(tmp_path, "ray.num_cpus=4"), fresh=False)  # placement only: same sweep
    with pytest.raises(SweepError, match=r"changed: student\.lambda2, sweep\.num_samples"):
        check_same_job(sd, micro_job_spec(tmp_path, "sweep.num_samples=9", "student.lambda2=0.5"), fresh=False)
    check_same_job(sd, micro_job_spec(tmp_path, "sweep.num_samples=9"), fresh=True)
    assert not (sd / "tune").exists()


def test_a_sweep_recorded_before_a_setting_existed_resumes(tmp_path):
    """A newer version's setting, absent from the record and left at its default, changes
    nothing; set to something else, it does. Serving settings never count."""
    import json

    sd = tmp_path / "tiny-sweep"
    sd.mkdir()
    check_same_job(sd, micro_job_spec(tmp_path), fresh=False)
    (sd / "tune").mkdir()
    record = json.loads((sd / "sweep_job.json").read_text())
    del record["student.il_reduction"]   # as written before the setting existed
    (sd / "sweep_job.json").write_text(json.dumps(record))
    check_same_job(sd, micro_job_spec(tmp_path, "serve.direct_port=9001"), fresh=False)
    (sd / "sweep_job.json").write_text(json.dumps(record))
    with pytest.raises(SweepError, match=r"changed: student\.il_reduction"):
        check_same_job(sd, micro_job_spec(tmp_path, "student.il_reduction=sum"), fresh=False)


@pytest.mark.parametrize("key, value", [("metric", "valid_loss"), ("lambda1", [1e-3, float("inf")]),
                                        ("delta_t", [0, 21]), ("reduction_factor", 1)])
def test_bad_sweep_settings_name_their_field(key, value):
    with pytest.raises(SpecError) as e:
        spec_from_dict({"name": "x", "sweep": {key: value}})
    assert [f for f, _ in e.value.errors] == [f"sweep.{key}"]


def test_closer_marks_trials_stopped_by_asha_killed_and_leaves_finished_ones(tmp_path):
    from orchestrator.run.tracking import Tracker

    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "tiny", tmp_path / "mlartifacts")
    client = MlflowClient(tracker.tracking_uri)
    sweep = client.create_run(tracker.experiment_id, run_name="tiny-sweep").info.run_id
    trial_runs = {}
    for tid in ("t1", "t2"):
        trial_runs[tid] = client.create_run(tracker.experiment_id, tags={"mlflow.parentRunId": sweep,
                                                                           "trial_id": tid}).info.run_id
    student = client.create_run(tracker.experiment_id, tags={"mlflow.parentRunId": trial_runs["t1"]}).info.run_id
    closer = TrialRunCloser(tracker, sweep)
    # Stand-ins for Tune's Trial objects: which trial ASHA stops is not deterministic on micro models.
    closer.on_trial_complete(0, [], SimpleNamespace(trial_id="t1", last_result={"valid_bleu": 1.0}))
    closer.on_trial_complete(0, [], SimpleNamespace(trial_id="t2", last_result={"valid_bleu_lpd": 2.0,
                                                                               "valid_bleu_nat": 1.0}))
    for run_id in (trial_runs["t1"], student):
        run = client.get_run(run_id)
        assert run.info.status == "KILLED" and run.data.tags["stopped_early"] == "asha"
    assert client.get_run(trial_runs["t2"]).info.status == "RUNNING"  # a finished trial closes its own run


def test_root_error_unwraps_ray_and_tune_wrappers():
    inner = RuntimeError("the real reason\nwith a traceback")
    outer = Exception("ray::ImplicitFunc.train() (pid=1)")
    outer.cause = SimpleNamespace(cause=inner)
    assert root_error(outer) == "RuntimeError: the real reason"


def test_an_interrupted_sweep_publishes_its_best_so_far_and_does_not_call_it_final(tmp_path):
    from orchestrator.sweep.driver import publish

    spec = micro_job_spec(tmp_path)
    sd = tmp_path / "tiny-sweep"
    sd.mkdir()
    settings = {"lambda1": 0.001, "n_actions": 16, "lambda2": 0.01}
    scores = {"valid_bleu": 5.0, "valid_bleu_lpd": 6.0, "best_delta_t": 1, "latency_ms_lpd": 3.0,
              "valid_bleu_nat": 4.0, "valid_bleu_at": 9.0}
    scores.update({f"{k}_dt{d}": 6.0 for d in spec.sweep.delta_t for k in ("valid_bleu_lpd", "latency_ms_lpd")})
    rows = [{"trial_id": "a", **settings, "status": "done", "run_dir": str(tmp_path / "a"), **scores},
            {"trial_id": "b", **settings, "status": "unfinished", "run_dir": str(tmp_path / "b")}]
    noop = lambda *a, **k: None  # noqa: E731
    parent = SimpleNamespace(log_metrics=noop, set_tag=noop, log_artifact=noop)
    for finished in (False, True):
        said = []
        best, best_yaml = publish(rows, spec, sd, parent, said.append, finished=finished)
        assert best["trial_id"] == "a" and best_yaml == sd / "best.yaml"
        text = "\n".join(said)
        assert ("run it: imitate-orch run" in text) == finished, text
        assert ("so far" in text) != finished and ("so far" in best_yaml.read_text().splitlines()[0]) != finished
