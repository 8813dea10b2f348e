"""Pipeline stages: plain functions `stage(ctx) -> StageResult`.

Each stage reads the outputs of earlier stages through `ctx.stage_path(stage, name)` and writes
its own into `ctx.out_dir` (= <workdir>/<job>/<stage>/). It never decides whether it must run:
the pipeline does that from manifests. A stage may be interrupted at any point; whatever it
keeps for resuming (finished shards, Ray Train checkpoints) lives in its out_dir.

Stage order and outputs (file names relative to the stage dir):
    prepare    train.src train.tgt valid.src valid.tgt test.src test.tgt   (text, one sentence a line)
    tokenizer  spm.model
    teacher    model.pt          (imitate_nat.checkpoint model file: ATDemonstrator, best on valid)
    distill    train.distilled.tgt   (one line per line of prepare/train.src, same order)
    student    model.pt          (NATLearner, best on valid)
    evaluate   summary.json summary.md test.at.txt test.nat.txt test.lpd.txt
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..spec import JobSpec
from ..tracking import NullRunHandle, RunHandle

STAGES = ("prepare", "tokenizer", "teacher", "distill", "student", "evaluate")


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
    extra: dict[str, Any] = field(default_factory=dict)       # e.g. ray address, parent run id

    @property
    def out_dir(self) -> Path:
        return self.run_dir / self.stage

    def stage_path(self, stage: str, name: str) -> Path:
        return self.run_dir / stage / name


def init_ray(spec: JobSpec, address: str | None = None) -> None:
    """Join the cluster at `address` (or spec.ray.address), else start a local one sized from
    spec.ray. Does nothing when Ray is already initialized in this process."""
    import os

    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    kwargs = {"address": address or spec.ray.address, "log_to_driver": True}
    if not kwargs["address"]:
        kwargs.update(num_cpus=spec.ray.num_cpus, object_store_memory=spec.ray.object_store_memory,
                      include_dashboard=spec.ray.include_dashboard)
    ray.init(**{k: v for k, v in kwargs.items() if v is not None})
