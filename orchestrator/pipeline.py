"""The stage graph: decides which stages run, runs them, records manifests and MLflow runs.

Each stage's input hash covers the spec sections it reads plus the hash of the stage before
it, so a change anywhere upstream invalidates everything downstream. A stage whose manifest
is done with the same hash and intact outputs (checksums) is skipped; a stage left running
or failed with the same hash is resumed (its dir keeps finished shards and Ray Train
checkpoints); a stage whose hash changed starts from an empty dir — except a training stage
(teacher, student) whose only change is a higher max_steps: it keeps its dir and trains on
from its last checkpoint. Checkpoints hold the RNG states, and the data order and learning
rate are functions of the step, so that equals training to the new max_steps from scratch.

Sharing work between runs (sweep trials, ablation variants): `run_pipeline(..., linked=...)`
makes <run>/<stage> a symlink to another directory, typically a content-addressed one from
`shared_stage_dirs` (<root>/<stage>/<hash>). Every stage runs under an exclusive file lock on
its (resolved) directory, so two runs that need the same teacher train it once: the second
waits, then finds it done and reuses it.
"""
from __future__ import annotations

import fcntl
import logging
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .artifacts import Manifest, is_complete, read_manifest, record_outputs, sha256_json, utc_now, write_manifest
from .spec import JobSpec
from .spec_io import dump_spec
from .stages import STAGES, StageContext, StageResult
from .tracking import Tracker, default_artifact_root, resolve_tracking_uri

log = logging.getLogger("imitate_orch")

# Spec sections each stage reads (besides the upstream hash). `seed` is read by all.
SECTIONS = {"prepare": ("data",), "tokenizer": ("tokenizer",), "teacher": ("model", "teacher"),
            "distill": ("distill",), "student": ("model", "student"), "evaluate": ("eval",)}
# Training stages; each reads max_steps from the spec section of its own name (see `continue_key`).
TRAINING = ("teacher", "student")
# Outputs logged to MLflow as artifacts (large text corpora stay in the run dir).
LOGGED_OUTPUTS = {"tokenizer": ("spm.model",), "teacher": ("model.pt",), "student": ("model.pt",),
                  "evaluate": ("summary.json", "summary.md", "test.at.txt", "test.nat.txt", "test.lpd.txt")}


class StageFailed(RuntimeError):
    def __init__(self, stage: str, error: BaseException):
        super().__init__(f"stage '{stage}' failed: {type(error).__name__}: {error}")
        self.stage, self.error = stage, error


def stage_functions() -> dict[str, Callable[[StageContext], StageResult]]:
    # Imported here: the stages pull in torch, Ray and sentencepiece, which `status` doesn't need.
    from .stages.distill import distill
    from .stages.evaluate import evaluate
    from .stages.prepare import prepare
    from .stages.tokenizer import tokenizer
    from .stages.train import student, teacher
    return {"prepare": prepare, "tokenizer": tokenizer, "teacher": teacher, "distill": distill,
            "student": student, "evaluate": evaluate}


def stage_hashes(spec: JobSpec) -> dict[str, str]:
    hashes, upstream = {}, None
    for stage in STAGES:
        sections = {name: getattr(spec, name).model_dump(mode="json") for name in SECTIONS[stage]}
        hashes[stage] = upstream = sha256_json({"stage": stage, "seed": spec.seed, "sections": sections,
                                                "upstream": upstream})
    return hashes


def continue_key(spec: JobSpec, stage: str) -> str | None:
    """A training stage's input hash with its max_steps left out (None for other stages): runs
    that agree on it differ at most in how long they train."""
    if stage not in TRAINING:
        return None
    sections = {name: getattr(spec, name).model_dump(mode="json") for name in SECTIONS[stage]}
    del sections[stage]["max_steps"]
    upstream = stage_hashes(spec)[STAGES[STAGES.index(stage) - 1]]
    return sha256_json({"stage": stage, "seed": spec.seed, "sections": sections, "upstream": upstream,
                        "without": "max_steps"})


def max_steps(spec: JobSpec, stage: str) -> int | None:
    return getattr(spec, stage).max_steps if stage in TRAINING else None


def can_continue(m: Manifest | None, spec: JobSpec, stage: str) -> bool:
    """Did this stage dir train on the same inputs for at most the max_steps the spec asks now?
    (Fewer steps cannot be had from a longer run: that retrains.)"""
    key = continue_key(spec, stage)
    return (key is not None and m is not None and m.continue_key == key and m.max_steps is not None
            and m.max_steps <= max_steps(spec, stage))


def shared_stage_dirs(spec: JobSpec, root: Path,
                      stages: Iterable[str] = ("prepare", "tokenizer", "teacher", "distill")) -> dict[str, Path]:
    """Content-addressed dirs for `stages`: runs whose specs agree up to a stage share its dir."""
    hashes = stage_hashes(spec)
    return {stage: Path(root).resolve() / stage / hashes[stage][:16] for stage in stages}


def link_stage(run: Path, stage: str, target: Path) -> None:
    """Make <run>/<stage> a symlink to `target` (replacing whatever was there)."""
    link = run / stage
    target.mkdir(parents=True, exist_ok=True)
    if link.is_symlink():
        if link.resolve() == target.resolve():
            return
        link.unlink()
    elif link.exists():
        shutil.rmtree(link)
    os.symlink(target.resolve(), link, target_is_directory=True)


@contextmanager
def stage_lock(d: Path, stage: str) -> Iterator[None]:
    """Exclusive lock on a stage dir (its resolved path, so links share it) for as long as the
    stage is checked and run. Another process holding it makes this one wait."""
    real = d.resolve()
    real.parent.mkdir(parents=True, exist_ok=True)
    with open(real.parent / f".{real.name}.lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("%-9s is being run by another process (%s); waiting", stage, real)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def consumed_digests(rd: Path, stage: str) -> dict[str, str]:
    """sha256 of each earlier finished stage's recorded outputs, as `stage` would read them now."""
    out = {}
    for earlier in STAGES[: STAGES.index(stage)]:
        m = read_manifest(rd / earlier)
        if m is not None and m.status == "done":
            out[earlier] = sha256_json(m.outputs)
    return out


def upstream_changed(m: Manifest | None, consumed: dict[str, str]) -> bool:
    """Did an earlier stage's output change since this stage (manifest `m`) ran on it?"""
    return m is not None and bool(m.consumed) and m.consumed != consumed


def run_dir(spec: JobSpec) -> Path:
    # Absolute: Ray workers and actors run with another working directory.
    return Path(spec.workdir).resolve() / spec.name


@dataclass
class StageState:
    stage: str
    state: str          # done | stale | running | failed | pending
    manifest: Manifest | None


def stage_states(spec: JobSpec) -> list[StageState]:
    hashes, out = stage_hashes(spec), []
    for stage in STAGES:
        d = run_dir(spec) / stage
        m = read_manifest(d)
        if m is None:
            state = "pending"
        elif upstream_changed(m, consumed_digests(run_dir(spec), stage)):
            state = "stale"
        elif m.input_hash != hashes[stage]:
            state = "extend" if can_continue(m, spec, stage) else "stale"
        elif m.status == "done":
            state = "done" if is_complete(d, hashes[stage]) else "damaged"
        else:
            state = m.status
        out.append(StageState(stage, state, m))
    return out


def make_tracker(spec: JobSpec) -> Tracker:
    uri = resolve_tracking_uri(spec.tracking.uri, spec.workdir)
    root = default_artifact_root(spec.workdir) if uri.startswith("sqlite:") or "://" not in uri else None
    return Tracker(uri, spec.tracking.experiment or spec.name, root)


def prepare_stage_dir(d: Path, wipe: bool) -> None:
    """Empty the stage dir if `wipe`, else keep what it holds (checkpoints, finished shards)."""
    if d.exists() and wipe:
        for child in d.iterdir():  # the dir itself stays: it may be the target of links
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    d.mkdir(parents=True, exist_ok=True)


def run_pipeline(spec: JobSpec, job_yaml: str, force: str | None = None, until: str | None = None,
                 progress: bool = True, tracker: Tracker | None = None,
                 linked: dict[str, Path] | None = None) -> dict:
    """Run every stage that is not already done. Ray must be initialized by the caller.
    `linked` maps stages to directories shared with other runs (see `shared_stage_dirs`).
    Returns {stage: metrics}. Raises StageFailed naming the failed stage."""
    funcs, hashes = stage_functions(), stage_hashes(spec)
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
            d = rd / stage
            if linked and stage in linked:
                link_stage(rd, stage, linked[stage])
            with stage_lock(d, stage):
                results[stage] = run_stage(stage, d, hashes[stage], stage in forced, spec, rd, funcs[stage],
                                            tracker, progress)
        summary = rd / "evaluate" / "summary.md"
        if summary.is_file():
            parent.log_artifact(str(summary))
    return results


def run_stage(stage: str, d: Path, input_hash: str, force: bool, spec: JobSpec, rd: Path, func,
               tracker: Tracker, progress: bool) -> dict:
    """Reuse the stage if it is done with this hash, intact, and on the same upstream bytes, else
    (re)run it; returns its metrics."""
    consumed = consumed_digests(rd, stage)
    before = read_manifest(d)
    stale = upstream_changed(before, consumed)
    if stale:
        log.info("%-9s an earlier stage's output changed since it ran: redoing it", stage)
    if not force and not stale and is_complete(d, input_hash):
        m = read_manifest(d)
        log.info("%-9s done (reused)", stage)
        with tracker.child(stage, {"reused": True}) as h:
            h.log_metrics(m.metrics)
        return m.metrics
    extend = (not force and not stale and before is not None and before.input_hash != input_hash
              and can_continue(before, spec, stage))
    # Kept: a same-hash unfinished dir (resume) or one to train on; wiped: a stale, forced or changed one.
    prepare_stage_dir(d, wipe=force or stale or before is None or (before.input_hash != input_hash and not extend))
    manifest = Manifest(stage=stage, input_hash=input_hash, status="running", started=utc_now(), consumed=consumed,
                        continue_key=continue_key(spec, stage), max_steps=max_steps(spec, stage))
    write_manifest(d, manifest)
    if extend:
        log.info("%-9s running on from its last checkpoint (max_steps %d -> %d)", stage, before.max_steps,
                 manifest.max_steps)
    else:
        log.info("%-9s running", stage)
    try:
        with tracker.child(stage, {"reused": False}) as h:
            ctx = StageContext(spec, rd, stage, tracker=h, progress=progress, extra={"tracker": tracker})
            result = func(ctx)
            h.log_metrics(result.metrics)
            for name in LOGGED_OUTPUTS.get(stage, ()):
                h.log_artifact(str(d / result.outputs[name]))
    except Exception as e:
        manifest.status, manifest.error, manifest.finished = "failed", f"{type(e).__name__}: {e}", utc_now()
        write_manifest(d, manifest)
        raise StageFailed(stage, e) from e
    manifest.outputs = record_outputs(d, result.outputs)  # paths relative to the stage dir
    manifest.metrics, manifest.status, manifest.finished = result.metrics, "done", utc_now()
    write_manifest(d, manifest)
    return result.metrics
