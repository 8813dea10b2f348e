"""Running one stage: reuse it, resume it, extend it or (re)run it, and record its manifest.

A stage is a plain function `stage(ctx: StageContext) -> StageResult` (orchestrator/stages/).
It reads earlier stages' outputs through `ctx.stage_path(stage, name)` and writes its own into
`ctx.out_dir`; it never decides whether it must run: `run_stage` does that from the manifests
(run/hashing.py says what changed). A stage may be interrupted at any point; whatever it keeps
for resuming (finished shards, Ray Train checkpoints) lives in its out_dir.
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..spec.schema import JobSpec
from .files import utc_now
from .hashing import (can_extend, consumed_digests, extend_key, input_digests, inputs_changed, max_steps,
                      stage_hashes, upstream_changed)
from .layout import STAGE, STAGES, run_dir
from .manifest import Manifest, is_complete, package_version, read_manifest, record_outputs, write_manifest
from .sharing import no_readers
from .tracking import NullRunHandle, RunHandle, Tracker

log = logging.getLogger("imitate_orch")


@dataclass
class StageResult:
    outputs: dict[str, str] = field(default_factory=dict)   # name -> path relative to out_dir
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class StageContext:
    spec: JobSpec
    run_dir: Path                      # <workdir>/<job>
    stage: str
    tracker: RunHandle = field(default_factory=NullRunHandle)  # this stage's MLflow run
    progress: bool = True              # show progress bars
    experiment: Tracker | None = None  # the job's MLflow experiment (Ray workers re-attach to the run through it)

    @property
    def out_dir(self) -> Path:
        return self.run_dir / self.stage

    def stage_path(self, stage: str, name: str) -> Path:
        return self.run_dir / stage / name


class StageFailed(RuntimeError):
    def __init__(self, stage: str, error: BaseException):
        super().__init__(f"stage '{stage}' failed: {type(error).__name__}: {error}")
        self.stage, self.error = stage, error


@dataclass
class StageState:
    stage: str
    state: str          # done | stale | running | failed | pending
    manifest: Manifest | None


def stage_states(spec: JobSpec) -> list[StageState]:
    """Each stage's state as `run` would find it. A done stage after a stale one shows stale: it
    is redone when the stale one's redo changes its outputs (changed data would; a redo that
    gives the same bytes leaves it reused)."""
    hashes, out, after_stale = stage_hashes(spec), [], False
    for stage in STAGES:
        d = run_dir(spec) / stage
        m = read_manifest(d)
        if m is None:
            state = "pending"
        elif (upstream_changed(m, consumed_digests(run_dir(spec), stage))
              or inputs_changed(m, input_digests(spec, stage))):
            state = "stale"
        elif m.input_hash != hashes[stage]:
            state = "extend" if can_extend(m, spec, stage) else "stale"
        elif m.status == "done":
            state = "done" if is_complete(d, hashes[stage]) else "damaged"
        else:
            state = m.status
        if after_stale and state == "done":
            state = "stale"
        after_stale = after_stale or state == "stale"
        out.append(StageState(stage, state, m))
    return out


def prepare_stage_dir(d: Path, wipe: bool) -> None:
    """Empty the stage dir if `wipe`, else keep what it holds (checkpoints, finished shards)."""
    if d.exists() and wipe:
        for child in d.iterdir():  # the dir itself stays: it may be the target of links
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    d.mkdir(parents=True, exist_ok=True)


def run_stage(spec: JobSpec, stage: str, func: Callable[[StageContext], StageResult], *, tracker: Tracker,
              force: bool = False, progress: bool = True) -> dict:
    """Reuse the stage if it is done with this hash, intact, and on the same upstream bytes, else
    (re)run it with `func`; returns its metrics. The caller holds the stage's lock (run/sharing.py)."""
    rd = run_dir(spec)
    d, input_hash = rd / stage, stage_hashes(spec)[stage]
    # Hashed before the stage runs: a file edited while it runs no longer matches next time.
    consumed, inputs = consumed_digests(rd, stage), input_digests(spec, stage)
    before = read_manifest(d)
    stale = upstream_changed(before, consumed)
    if stale:
        log.info("%-9s an earlier stage's output changed since it ran: redoing it", stage)
    elif inputs_changed(before, inputs):
        stale = True
        log.info("%-9s its input files changed since it ran: redoing it", stage)
    if not force and not stale and is_complete(d, input_hash):
        m = read_manifest(d)
        log.info("%-9s done (reused)", stage)
        with tracker.child(stage, {"reused": True}) as h:
            h.log_metrics(m.metrics)
        return m.metrics
    extend = (not force and not stale and before is not None and before.input_hash != input_hash
              and can_extend(before, spec, stage))
    # Other runs' stages reading this dir (a shared one) finish first, and no new one starts
    # until it is done again: nothing reads a dir while it is wiped or rewritten.
    with no_readers(d, stage):
        # Kept: a same-hash unfinished dir (resume) or one to extend; wiped: a stale, forced or changed one.
        prepare_stage_dir(d, wipe=force or stale or before is None or (before.input_hash != input_hash and not extend))
        manifest = Manifest(stage=stage, input_hash=input_hash, status="running", started=utc_now(), consumed=consumed,
                            extend_key=extend_key(spec, stage), max_steps=max_steps(spec, stage), inputs=inputs,
                            package_version=package_version())
        write_manifest(d, manifest)
        if extend:
            log.info("%-9s extending from its last checkpoint (max_steps %d -> %d)", stage, before.max_steps,
                     manifest.max_steps)
        else:
            log.info("%-9s running", stage)
        try:
            with tracker.child(stage, {"reused": False}) as h:
                ctx = StageContext(spec, rd, stage, tracker=h, progress=progress, experiment=tracker)
                result = func(ctx)
                h.log_metrics(result.metrics)
                for name in STAGE[stage].logged:
                    h.log_artifact(str(d / result.outputs[name]))
        except Exception as e:
            manifest.status, manifest.error, manifest.finished = "failed", f"{type(e).__name__}: {e}", utc_now()
            write_manifest(d, manifest)
            raise StageFailed(stage, e) from e
        manifest.outputs = record_outputs(d, result.outputs)  # paths relative to the stage dir
        manifest.metrics, manifest.status, manifest.finished = result.metrics, "done", utc_now()
        write_manifest(d, manifest)
        return result.metrics
