"""The stage graph: runs the six stages of a job in order, each reused, resumed, extended or
(re)run as its manifest says (run/runner.py, run/hashing.py), under one MLflow parent run.

A stage whose manifest is done with the same input hash and intact outputs (checksums) is
skipped; a stage left running or failed with the same hash is resumed (its dir keeps finished
shards and Ray Train checkpoints); a stage whose hash changed starts from an empty dir, except
a training stage (teacher, student) whose only change is a higher max_steps: it keeps its dir
and is extended from its last checkpoint. Checkpoints hold the RNG states, and the data order and
learning rate are functions of the step, so that equals training to the new max_steps at once.

After each stage its MLflow run is tagged with the sha256 of each output (run/tracking.py
OUTPUT_TAG), reused or not: `serve RUN_ID` finds the runs that logged the models by these.
After the evaluate stage the run's models are logged as one mlflow.pyfunc model and registered
under the job's name (registry.py; tracking.register_model: false turns it off).

`linked` makes stage dirs symlinks to dirs shared with other runs (run/sharing.py): sweep
trials and ablation variants train a shared teacher once. In such a run, a stage not linked
this time whose dir is still a link to a dir of other settings is unlinked and redone in the
run's own dir (never through the link, into another run's stage).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from .registry import register_run_models
from .run.layout import STAGES, run_dir
from .run.manifest import read_manifest
from .run.runner import StageContext, StageResult, run_stage, stage_states
from .run.sharing import drop_link_of_other_settings, link_stage, stage_lock
from .run.tracking import Tracker, make_tracker
from .spec.loading import dump_spec
from .spec.schema import JobSpec


def stage_functions() -> dict[str, Callable[[StageContext], StageResult]]:
    # Imported here, to keep `imitate-orch status/validate/--help` fast: the stages pull in
    # torch, Ray and sentencepiece.
    from .stages.distill import distill
    from .stages.evaluate import evaluate
    from .stages.prepare import prepare
    from .stages.tokenizer import tokenizer
    from .stages.train import student, teacher
    return {"prepare": prepare, "tokenizer": tokenizer, "teacher": teacher, "distill": distill,
            "student": student, "evaluate": evaluate}


def nothing_to_run(spec: JobSpec, force: str | None = None, until: str | None = None) -> bool:
    """Whether `run_pipeline` would reuse every stage up to `until` (none forced): a finished
    job (or ablation variant), whose rerun needs no Ray cluster. A stage found otherwise after
    all (its files changed meanwhile) starts the job's Ray itself, as every stage using Ray does."""
    if force:
        return False
    last = STAGES.index(until) if until else len(STAGES) - 1
    manifests = [read_manifest(run_dir(spec) / stage) for stage in STAGES[: last + 1]]
    if any(m is None or m.status != "done" for m in manifests):   # decided without hashing any output
        return False
    return all(s.state == "done" for s in stage_states(spec)[: last + 1])


def run_pipeline(spec: JobSpec, job_yaml: str, force: str | None = None, until: str | None = None,
                 progress: bool = True, tracker: Tracker | None = None,
                 linked: dict[str, Path] | None = None, before_stage: Callable[[], object] | None = None) -> dict:
    """Run every stage that is not already done. Ray must be initialized by the caller.
    `force` reruns that stage and every later one; `until` stops after that stage. `linked` maps
    stages to directories shared with other runs (see run/sharing.py `shared_stage_dirs`).
    `before_stage` runs before each stage (the CLI probes nodes an autoscaler added, run/workdir.py).
    Returns {stage: metrics}. Raises StageFailed naming the failed stage."""
    funcs = stage_functions()
    tracker = tracker or make_tracker(spec)
    rd = run_dir(spec)
    rd.mkdir(parents=True, exist_ok=True)
    forced = set(STAGES[STAGES.index(force):]) if force else set()
    last = STAGES.index(until) if until else len(STAGES) - 1
    results: dict[str, dict] = {}
    with tracker.parent(spec.name, spec.flat_params(), tags={"job": spec.name}) as parent:
        parent.log_text(dump_spec(spec), "job.yaml")
        parent.log_text(Path(job_yaml).read_text() if Path(job_yaml).is_file() else "", "job.original.yaml")
        for stage in STAGES[: last + 1]:
            if before_stage:
                before_stage()
            if linked and stage in linked:
                link_stage(rd, stage, linked[stage])
            elif linked is not None:   # a shared run (sweep trial, ablation variant)
                drop_link_of_other_settings(rd, stage, spec)
            with stage_lock(rd / stage, stage):
                results[stage] = run_stage(spec, stage, funcs[stage], tracker=tracker, force=stage in forced,
                                           progress=progress)
                tracker.tag_outputs(stage, read_manifest(rd / stage).outputs)
        summary = rd / "evaluate" / "summary.md"
        if summary.is_file():
            parent.log_artifact(str(summary))
        if "evaluate" in results and spec.tracking.register_model:   # the whole run is done
            register_run_models(tracker, parent, rd, spec)
    return results
