"""`imitate-orch sweep JOB`: Ray Tune over λ1, λ2 and the action count, ΔT swept on trained students.

Search (the job's `sweep:` section): λ1 and λ2 log-uniform (or each a grid: `lambda1_values`,
`lambda2_values`), the action count a uniform choice,
sampled by Tune's random search seeded with the job's `seed`; `num_samples` trials, at most
`max_concurrent` at once. λ1 and the action count change the teacher, λ2 only the student,
ΔT only decoding: trials share teachers (and distilled corpora) by config hash, and every
trained student is decoded at each ΔT of `sweep.delta_t` instead of being retrained
(trial.py runs one trial).

ASHA stops trials early on the student's valid BLEU (one NAT pass over up to 500 valid
sentences), which the training loop reports at every eval/checkpoint interval, comparing trials
at equal training steps (asha_scheduler); the trials are
ranked by `sweep.metric` on the whole valid set once a student is trained (default
`valid_bleu_lpd`: NAT+LPD at its best ΔT). A trial that fails is recorded as failed (Tune
error, MLflow run FAILED with the error) and the sweep goes on.

Everything lives in `<workdir>/<job>-sweep/`:
    tune/              the Tune experiment (rerunning the same command restores it: finished
                       trials are kept, unfinished ones continue, failed ones run again)
    shared/<stage>/<hash>/   prepare, tokenizer, teacher, distill dirs shared by trials (a stage
                       that `run` already made for the same settings is linked from the job's
                       run dir `<workdir>/<job>/` instead, and only read there)
    trials/<id>/<job>/ each trial's run dir (links to shared/ or the job's dirs, its own student)
    results.md, results.json, plots/*.png, best.yaml
`best.yaml` is the job with the best trial's λ1, action count, λ2 and ΔT, named `<job>-best`;
its run dir `<workdir>/<job>-best/` is seeded with (hard-linked copies of) the best trial's
finished stages, so `imitate-orch run best.yaml` only evaluates on the test set.

MLflow: one run for the sweep (params = the job, artifacts = results, best.yaml, plots) with a
nested run per trial (params, the student's valid BLEU curve, valid BLEU and latency by ΔT,
final metrics), each with its stage runs nested under it.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from ray import tune

from ..run.files import atomic_write_json, atomic_write_text
from ..run.tracking import make_tracker
from ..spec.loading import dump_spec, spec_from_dict
from ..spec.schema import JobSpec
from .results import (FINAL_METRICS, RESULT_KEYS, best_trial, collect_rows, make_plots, results_table, seed_best_run,
                      sweep_dir, write_best_job)
from .trial import TRIAL_RESOURCES, TrialSetup, trial

log = logging.getLogger("imitate_orch")
SCHEDULER_RECORD = "scheduler.json"   # in the sweep dir: written by a version whose ASHA counts steps


def search_space(spec: JobSpec) -> dict:
    sw = spec.sweep

    def sampled(bounds: tuple[float, float], grid: list[float] | None):
        if grid is not None:
            return tune.grid_search(grid)
        return bounds[0] if bounds[0] == bounds[1] else tune.loguniform(*bounds)

    return {"lambda1": sampled(sw.lambda1, sw.lambda1_values), "n_actions": tune.choice(sw.n_actions),
            "lambda2": sampled(sw.lambda2, sw.lambda2_values)}


def student_report_steps(spec: JobSpec) -> list[int]:
    """The steps at which a student's training reports its valid BLEU (stages/train_worker.py
    reports at every eval_every and checkpoint_every step and at the last), in order."""
    s = spec.student
    steps = {s.max_steps} | set(range(s.eval_every, s.max_steps + 1, s.eval_every)) \
        | set(range(s.checkpoint_every, s.max_steps + 1, s.checkpoint_every))
    return sorted(steps)


def asha_scheduler(spec: JobSpec):
    """ASHA on the students' valid BLEU, its time axis the training step: a trial resumed after
    an interruption reports its steps again as they are, where Tune's own training_iteration
    would start over at 1 and set a resumed trial's late scores against other trials' first
    ones. A trial may be stopped once it has made `sweep.grace_period` reports."""
    from ray.tune.schedulers import ASHAScheduler

    steps, sw = student_report_steps(spec), spec.sweep
    # stop_last_trials=False: a trial at max_steps still makes its final report (the valid scores).
    return ASHAScheduler(time_attr="step", metric="valid_bleu", mode="max", max_t=spec.student.max_steps,
                         grace_period=steps[min(sw.grace_period, len(steps)) - 1],
                         reduction_factor=sw.reduction_factor, stop_last_trials=False)


def trial_dirname(trial) -> str:
    return trial.trial_id  # <sweep>/tune/<trial id>, like <sweep>/trials/<trial id>


class TrialRunCloser(tune.Callback):
    """Closes the MLflow runs of trials that could not close them themselves: a trial stopped
    by ASHA (its process is ended mid-training) becomes KILLED with `stopped_early=asha`, a
    trial whose process died becomes FAILED; their stage runs left RUNNING follow."""

    def __init__(self, tracker, sweep_run_id: str | None):
        self.tracker, self.sweep_run_id = tracker, sweep_run_id

    def on_trial_complete(self, iteration, trials, trial, **info):
        if not all(k in trial.last_result for k in FINAL_METRICS):
            self.close(trial.trial_id, "KILLED", {"stopped_early": "asha"})

    def on_trial_error(self, iteration, trials, trial, **info):
        self.close(trial.trial_id, "FAILED", {"error": "the trial's process ended without closing its run"})

    def close(self, trial_id: str, status: str, tags: dict) -> None:
        """Tag the trial's run(s) (an error tag already there is kept); end those still RUNNING,
        and their RUNNING stage runs, as `status`."""
        if not (self.tracker.enabled and self.sweep_run_id):
            return
        from mlflow import MlflowClient

        client = MlflowClient(self.tracker.tracking_uri)
        exp = [self.tracker.experiment_id]
        for run in client.search_runs(exp, f"tags.trial_id = '{trial_id}' and "
                                           f"tags.`mlflow.parentRunId` = '{self.sweep_run_id}'"):
            running = client.search_runs(exp, f"tags.`mlflow.parentRunId` = '{run.info.run_id}' and "
                                              "attributes.status = 'RUNNING'")
            for r in [run, *running]:
                for k, v in tags.items():
                    if k != "error" or k not in r.data.tags:  # the error the trial recorded stays
                        client.set_tag(r.info.run_id, k, v)
                if r.info.status == "RUNNING":
                    client.set_terminated(r.info.run_id, status=status)


class SweepError(Exception):
    """The sweep cannot start as asked (e.g. its dir holds a sweep of another job spec)."""


def check_same_job(sd: Path, spec: JobSpec, fresh: bool) -> None:
    """A rerun resumes the sweep in `sd` only with the spec it was started with (`ray` and
    `serve` aside, which train and score nothing): Tune restores its own search space, sample
    count and scheduler. A setting the record lacks, at its default, is no change: a newer
    version added it, and the sweep ran as its default has it. A sweep whose scheduler predates
    the step-based ASHA (no SCHEDULER_RECORD) is not resumed. --fresh starts over (the shared
    stage dirs are content-addressed and stay)."""
    def compared(params: dict) -> dict:
        return {k: v for k, v in params.items() if not k.startswith(("ray.", "serve."))}

    record, scheduler = sd / "sweep_job.json", sd / SCHEDULER_RECORD
    now = compared(spec.flat_params())
    if fresh:
        for name in ("tune", "trials", "plots"):
            shutil.rmtree(sd / name, ignore_errors=True)
        for name in ("mlflow_run_id", "results.md", "results.json", "best.yaml", record.name, scheduler.name):
            (sd / name).unlink(missing_ok=True)
    if (sd / "tune").exists() and not scheduler.is_file():
        # Tune restores the scheduler it pickled: that of the imitate-orch that started the sweep.
        raise SweepError(f"{sd} holds a sweep started by an earlier imitate-orch, whose early stopping "
                         "(ASHA) counted a resumed trial's reports from 1 again and so could stop other "
                         "trials against its later, better scores. Pass --fresh to start it over (its "
                         "teachers and distilled data are shared by content and stay).")
    if record.is_file() and (sd / "tune").exists():  # a Tune experiment to restore
        before = compared(json.loads(record.read_text()))
        defaults = spec_from_dict({"name": spec.name, "data": {"source": "synthetic"}}).flat_params()
        changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k)
                         and not (k not in before and now.get(k) == defaults.get(k)))
        if changed:
            raise SweepError(f"{sd} holds a sweep of another job spec (changed: {', '.join(changed)}). "
                             f"Rerun with the same job and settings to resume it, or pass --fresh to start over.")
    atomic_write_json(record, now)
    atomic_write_json(scheduler, {"asha_time_attr": "step"})


def run_sweep(spec: JobSpec, job_yaml: str, fresh: bool = False, progress: bool = True, echo=print) -> dict:
    """Run (or resume) the sweep, then write and log its results. Ray must be initialized by
    the caller. Returns {"rows": [...], "best": row or None, "best_yaml": path or None}."""
    sd = sweep_dir(spec)
    sd.mkdir(parents=True, exist_ok=True)
    check_same_job(sd, spec, fresh)
    tracker = make_tracker(spec)
    id_file = sd / "mlflow_run_id"
    saved = id_file.read_text().strip() if id_file.is_file() else None
    with tracker.parent(f"{spec.name}-sweep", spec.flat_params(), tags={"job": spec.name, "sweep": "true"},
                        run_id=saved) as parent:
        if parent.run_id:
            atomic_write_text(id_file, parent.run_id)
        parent.log_text(dump_spec(spec), "job.yaml")
        setup = TrialSetup(base=spec.model_dump(mode="json"), job_yaml=str(Path(job_yaml).resolve()),
                           sweep_dir=str(sd), tracker=tracker, sweep_run_id=parent.run_id,
                           delta_t=list(spec.sweep.delta_t))
        grid = fit(spec, sd, setup, progress)
        rows = collect_rows(grid.experiment_path, spec)
        unfinished = [r["trial_id"] for r in rows if r["status"] == "unfinished"]
        best, best_yaml = publish(rows, spec, sd, parent, echo, finished=not unfinished)
        if unfinished:  # Ctrl-C: Tune stopped and saved the experiment; the runs say so
            closer = TrialRunCloser(tracker, parent.run_id)
            for trial_id in unfinished:
                closer.close(trial_id, "KILLED", {"interrupted": "rerun the sweep to resume"})
            echo(f"sweep interrupted: {len(unfinished)} trial(s) unfinished; rerun the same command to resume")
            raise KeyboardInterrupt  # the sweep's run ends KILLED
    return {"rows": rows, "best": best, "best_yaml": best_yaml}


def publish(rows: list[dict], spec: JobSpec, sd: Path, parent, echo,
            finished: bool = True) -> tuple[dict | None, Path | None]:
    """results.json/.md, the printed table, best.yaml (+ its seeded run dir) and the plots, all
    also logged to the sweep's MLflow run. Returns (best row, best.yaml) or (None, None). An
    interrupted sweep (not `finished`) publishes its best so far, and says it is not final."""
    best = best_trial(rows, spec.sweep.metric, spec.sweep.mode)
    atomic_write_json(sd / "results.json", {"job": spec.name, "metric": spec.sweep.metric, "mode": spec.sweep.mode,
                                            "rows": rows, "best": best})
    table = results_table(rows, spec, best)
    atomic_write_text(sd / "results.md", table)
    echo(table)
    best_yaml = None
    if best is not None:
        best_yaml = write_best_job(spec, best, sd, finished)
        seed_best_run(spec, best)
        parent.log_metrics({f"best/{k}": best[k] for k in RESULT_KEYS if isinstance(best.get(k), (int, float))})
        parent.set_tag("best_trial", best["trial_id"])
        parent.log_artifact(str(best_yaml))
        if finished:
            echo(f"best configuration (trial {best['trial_id']}): {best_yaml}\n  run it: imitate-orch run {best_yaml}")
        else:
            echo(f"best configuration so far (trial {best['trial_id']}): {best_yaml} (not final: the sweep is "
                 "not finished)")
    else:
        echo("no trial finished: no best configuration")
    for path in make_plots(rows, spec, sd / "plots"):
        parent.log_artifact(str(path), "plots")
    parent.log_artifact(str(sd / "results.md"))
    parent.log_artifact(str(sd / "results.json"))
    parent.log_metrics({f"trials_{s}": sum(r["status"] == s for r in rows)
                        for s in ("done", "stopped", "failed", "unfinished")})
    return best, best_yaml


def fit(spec: JobSpec, sd: Path, setup: TrialSetup, progress: bool):
    """Tuner.fit() of a new sweep, or of the one in `sd` restored (Tuner.restore)."""
    from ray.tune.search import BasicVariantGenerator

    trainable = tune.with_resources(tune.with_parameters(trial, setup=setup), TRIAL_RESOURCES)
    path = sd / "tune"
    if tune.Tuner.can_restore(str(path)):
        log.info("resuming the sweep in %s", path)
        tuner = tune.Tuner.restore(str(path), trainable, resume_unfinished=True, restart_errored=True)
        return tuner.fit()
    sw = spec.sweep
    scheduler = asha_scheduler(spec)
    closer = TrialRunCloser(setup.tracker, setup.sweep_run_id)
    tuner = tune.Tuner(
        trainable, param_space=search_space(spec),
        # The search algorithm enforces the concurrency limit (Tune ignores max_concurrent_trials
        # when it is given a BasicVariantGenerator).
        tune_config=tune.TuneConfig(num_samples=sw.num_samples, scheduler=scheduler, trial_dirname_creator=trial_dirname,
                                    search_alg=BasicVariantGenerator(max_concurrent=sw.max_concurrent,
                                                                     random_state=spec.seed)),
        run_config=tune.RunConfig(name=path.name, storage_path=str(sd), callbacks=[closer],
                                  verbose=1 if progress else 0))
    return tuner.fit()


