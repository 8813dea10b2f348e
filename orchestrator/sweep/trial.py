"""One trial of `imitate-orch sweep`, as Ray Tune runs it.

A trial is the job with three settings sampled (teacher.lambda1, model.n_actions,
student.lambda2), working in `<sweep>/trials/<trial id>/<job>/`:

1. prepare → tokenizer → teacher → distill through `run_pipeline`, each stage symlinked into the
   trial's run dir from the job's own run dir when `run` has already made that very stage
   there (a sweep after `run` trains no teacher again), else from a content-addressed dir under
   `<sweep>/shared/`, so every trial with the same data and teacher config (λ1, action count,
   …) shares one teacher and one distilled corpus: the first trains it, the others wait on its
   lock and reuse it. Nothing is written into the job's run dir.
2. student: the pipeline's student stage (manifest, MLflow run, Ray Train checkpoints and
   resume), trained with a `TuneReportCallback`, so the valid BLEU that the training loop reports
   at every eval/checkpoint interval reaches Tune and ASHA can stop the trial early. A trial
   with the job's own settings, whose student `run` has finished, links that student instead of
   training it again, and its valid BLEU curve (from the job's MLflow run) is replayed to Tune
   step by step, so ASHA sets the other trials against it as if it had trained here.
3. valid evaluation: the student (with its teacher for rescoring) decodes the whole valid set
   with NAT+LPD at every ΔT of `sweep.delta_t`, plus the one-pass NAT and the AT beam; BLEU and
   batch-1 latency per ΔT become the trial's final Tune result and MLflow metrics.

Resources. Tune runs the trial function in an actor inside a placement group that captures the
actors its children create; the distillation actors would then have to fit into the trial's
own bundle, which (on a small machine) holds no CPU for them: a deadlock. So the trial actor
reserves no CPU (only a nominal bit of memory, as Tune needs a non-empty bundle) and does its
work in a 0-CPU task scheduled outside the placement group; everything that computes — Ray Train
workers, distillation actors, the valid decoding task (1 CPU, a GPU if the student trains on
GPUs) — asks Ray for its own resources (`teacher.cpus_per_worker`, `distill.cpus_per_actor`, …)
and waits in Ray's queue while another trial holds them: no trial holds anything while it
waits, so trials cannot deadlock. The trial task itself drives the stages; only prepare and the
tokenizer run in it, unreserved (once per sweep: every trial shares them). Set
`student.cpus_per_worker` lower to train more students side by side.

MLflow: the trial's run is nested under the sweep's run; its stage runs are nested under it.
"""
from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import ray

from ..pipeline import run_pipeline
from ..run.files import atomic_write_text
from ..run.layout import run_dir
from ..run.runner import StageContext, StageResult, run_stage
from ..run.sharing import (drop_link_of_other_settings, finished_job_stage, job_or_shared_stage_dirs, link_stage,
                           stage_lock)
from ..run.tracking import NestedTracker, RunHandle, Tracker
from ..spec.loading import spec_from_dict
from ..spec.schema import JobSpec, ModelSpec

log = logging.getLogger("imitate_orch")

# Tune refuses an all-zero bundle; a trial reserves this much memory and no CPU (see above).
TRIAL_RESOURCES = {"memory": 64 * 1024 ** 2}
TRAIN_START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
REPLAYED = "replayed_valid_bleu"   # trial_body → trial: the job's student's [[step, valid BLEU], ...]
SAMPLED = {"lambda1": ("teacher", "lambda1"), "n_actions": ("model", "n_actions"), "lambda2": ("student", "lambda2")}


@dataclass
class TrialSetup:
    """What every trial needs besides its sampled config (shipped once via tune.with_parameters)."""
    base: dict                    # the job spec (JSON dump, workdir absolute)
    job_yaml: str                 # path of the job file (logged with each trial)
    sweep_dir: str
    tracker: Tracker              # the sweep's MLflow experiment
    sweep_run_id: str | None      # the sweep's MLflow run: trials nest under it
    delta_t: list[int]


def trial_spec(base: dict, config: dict, workdir: str | Path) -> JobSpec:
    """The job with the trial's sampled settings, working in `workdir`. A sampled model field
    the job leaves to its size preset stays unset when the sample is the preset's own value
    (model.n_actions 512 on a base-size job): the stage hashes are then the job's, and the
    trial can read the stages `run` made (job_or_shared_stage_dirs)."""
    raw = copy.deepcopy(base)
    preset = ModelSpec.model_validate(base["model"]).to_model_config(vocab_size=1)
    for key, (section, name) in SAMPLED.items():
        if section == "model" and raw[section][name] is None and config[key] == getattr(preset, name):
            continue
        raw[section][name] = config[key]
    raw["workdir"] = str(workdir)
    return spec_from_dict(raw, f"sweep trial {config}")


def trial_workdir(sweep_dir: str | Path, trial_id: str) -> Path:
    return Path(sweep_dir) / "trials" / trial_id


def trial(config: dict, setup: TrialSetup) -> None:
    """The Tune function trainable: run the trial body outside this actor's placement group
    (see the module doc), then report its final valid scores."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    report = TuneReportCallback()  # made here: it needs this Tune session; Train reports through it
    body = ray.remote(num_cpus=0)(trial_body).options(scheduling_strategy="DEFAULT", max_retries=0)
    result = ray.get(body.remote(config, setup, trial_id, report))
    for step, bleu in result.pop(REPLAYED, []):  # the job's own student: its curve, as training reports it
        tune.report({"step": step, "valid_bleu": bleu})
    tune.report(result)


def trial_body(config: dict, setup: TrialSetup, trial_id: str, report_callback) -> dict:
    # Trials wait for each other's Train workers: Ray Train's 60 s startup timeout would only
    # make the controller log an error and retry (Train reads this where the trainer starts).
    os.environ.setdefault(TRAIN_START_TIMEOUT_ENV, str(24 * 3600))
    spec = trial_spec(setup.base, config, trial_workdir(setup.sweep_dir, trial_id))
    rd = run_dir(spec)
    rd.mkdir(parents=True, exist_ok=True)
    id_file = rd.parent / "mlflow_run_id"  # a restarted trial (Tuner.restore) continues its run
    saved = id_file.read_text().strip() if id_file.is_file() else None
    tags = {"trial_id": trial_id, "sweep": spec.name, **{f"trial.{k}": v for k, v in config.items()}}
    if setup.sweep_run_id:
        tags["mlflow.parentRunId"] = setup.sweep_run_id
    if saved:
        tags["interrupted"] = "resumed"
    with setup.tracker.parent(f"trial {trial_id}", spec.flat_params(), tags=tags, run_id=saved) as run:
        if run.run_id:
            atomic_write_text(id_file, run.run_id)
        tracker = NestedTracker(setup.tracker, run.run_id, adopt=True) if setup.tracker.enabled else setup.tracker
        job = spec_from_dict(setup.base, setup.job_yaml)
        linked = job_or_shared_stage_dirs(spec, job, Path(setup.sweep_dir) / "shared")
        run_pipeline(spec, setup.job_yaml, until="distill", progress=False, tracker=tracker, linked=linked)
        replayed = []
        own = finished_job_stage(spec, job, "student") \
            if all(d == run_dir(job) / stage for stage, d in linked.items()) else None
        if own is not None:  # the job's own settings, and `run` has trained this very student
            link_stage(rd, "student", own)
            replayed = job_student_curve(own.parent, setup.tracker, run)
        else:   # a link to the job's student from before the job's run dir held another one
            drop_link_of_other_settings(rd, "student", spec)
        with stage_lock(rd / "student", "student"):
            student = run_stage(spec, "student", lambda ctx: tuned_student(ctx, report_callback), tracker=tracker,
                                progress=False)
        scores = scored_on_valid(rd, spec, setup.delta_t, run)
    return {**scores, "valid_bleu": student["best_valid_bleu"], REPLAYED: replayed}


def job_student_curve(job_rd: Path, experiment: Tracker, run: RunHandle) -> list[list[float]]:
    """[[step, valid BLEU], ...] of the student that `run` trained in `job_rd` (the job's MLflow
    run; logged on the trial's run too, for the UI); [] when it is not in the store (then ASHA
    has only this trial's final result)."""
    from ..studies.measures import training_curves

    if not experiment.enabled:
        return []
    curves = training_curves(job_rd, experiment.tracking_uri, metrics=("valid/bleu",), stages=("student",))
    curve = curves.get("student", {}).get("valid/bleu", [])
    log.info("student   the job's own, trained by `run` in %s: linked, %s", job_rd,
             "its valid BLEU curve replayed to ASHA" if curve else "no valid BLEU curve in MLflow")
    run.log_history("valid/bleu", curve)
    return curve


def tuned_student(ctx: StageContext, report_callback) -> StageResult:
    """The student stage of orchestrator/stages/train.py (same trainer, same model.pt), with
    Tune's callback among the Ray Train callbacks so that each valid report reaches Tune."""
    from ..stages.train import train_model

    result = train_model(ctx, "nat", callbacks=[report_callback])
    tracker = ctx.experiment
    if isinstance(tracker, NestedTracker):
        tracker.copy_metric_history(ctx.tracker.run_id, "valid/bleu")
    return result


def valid_metrics(rd: Path, spec: JobSpec, delta_ts: list[int]) -> dict:
    """NAT+LPD valid BLEU and batch-1 latency at each ΔT of the sweep, plus the one-pass NAT and
    the AT beam, flat for Tune. Cached in <run>/sweep_valid.json by the checksums of what it
    decodes (models, tokenizer, valid set: measures.decoding_key)."""
    import torch

    from ..studies.measures import delta_t_sweep

    device = "cuda" if torch.cuda.is_available() else "cpu"
    sweep = delta_t_sweep(rd, spec, "valid", max(delta_ts), device, rd / "sweep_valid.json", progress=False)
    by_dt = {d: (b, ms) for d, b, ms in zip(sweep["delta_t"], sweep["bleu"], sweep["latency_ms"]) if d in delta_ts}
    best_dt = max(by_dt, key=lambda d: (by_dt[d][0], -d))  # ties: the smaller (faster) ΔT
    out = {"valid_bleu_lpd": by_dt[best_dt][0], "best_delta_t": best_dt, "latency_ms_lpd": by_dt[best_dt][1],
           "valid_bleu_nat": sweep["nat"]["bleu"], "latency_ms_nat": sweep["nat"]["latency_ms"],
           "valid_bleu_at": sweep["at"]["bleu"], "latency_ms_at": sweep["at"]["latency_ms"],
           "valid_sentences": sweep["sentences"]}
    for d, (b, ms) in by_dt.items():
        out.update({f"valid_bleu_lpd_dt{d}": b, f"latency_ms_lpd_dt{d}": ms})
    return out


def scored_on_valid(rd: Path, spec: JobSpec, delta_ts: list[int], run: RunHandle) -> dict:
    """valid_metrics as a Ray task holding what decoding uses (1 CPU, and a GPU when the student
    trains on GPUs: the student's workers have given theirs back by now), logged to the trial's
    run: final metrics, and curves over ΔT (step = ΔT) for the MLflow UI."""
    gpus = 1 if spec.student.gpus_per_worker > 0 else 0
    task = ray.remote(valid_metrics).options(num_cpus=1, num_gpus=gpus, max_retries=0)
    out = ray.get(task.remote(rd, spec, delta_ts))
    for d in delta_ts:
        run.log_metrics({"valid/bleu_lpd_by_delta_t": out[f"valid_bleu_lpd_dt{d}"],
                         "valid/latency_ms_lpd_by_delta_t": out[f"latency_ms_lpd_dt{d}"]}, step=d)
    run.log_metrics(out)
    return out
