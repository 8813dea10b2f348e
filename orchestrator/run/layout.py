"""The run directory and the one table of stages.

A job's run lives in `<workdir>/<job>/`, one folder per stage, in pipeline order:

    prepare    train.src train.tgt valid.src valid.tgt test.src test.tgt   (text, one sentence a line)
    tokenizer  spm.model, train.src.bin/.idx, train.tgt.bin/.idx   (the train set binarized: imitate_nat/indexed.py)
    teacher    model.pt          (imitate_nat.checkpoint model file: ATDemonstrator, best on valid),
               plan.pairs.npy plan.batches.npy plan.json   (its batch plan: imitate_nat.indexed.write_batch_plan)
    distill    train.distilled.tgt (+ .bin/.idx)   (one line per line of prepare/train.src, same order)
    student    model.pt          (NATLearner, best on valid), plan.*   (as the teacher's)
    evaluate   summary.json summary.md test.at.txt test.nat.txt test.lpd.txt

Each stage folder also holds its manifest.json (run/manifest.py) and whatever the stage keeps
to resume (finished shards, Ray Train checkpoints). Every other module names these files
through this one: the stage table below and the path helpers.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..spec.schema import JobSpec
from .manifest import read_manifest

MODEL = "model.pt"                  # a trained model (teacher, student)
SPM = "spm.model"                   # the joint SentencePiece model (tokenizer)
PLAN = "plan"                       # a training stage's batch plan: plan.pairs.npy, plan.batches.npy, plan.json
DISTILLED = "train.distilled.tgt"   # the teacher's translations of prepare/train.src (distill)
SPLITS = ("train", "valid", "test")
SIDES = ("src", "tgt")
DECODERS = ("at", "nat", "lpd")     # the rows of Table 1, in the evaluate stage's files


@dataclass(frozen=True)
class Stage:
    name: str
    reads: tuple[str, ...]        # spec sections in its input hash (besides `seed` and the upstream hash)
    outputs: tuple[str, ...]      # files recorded (with sha256) in its manifest
    logged: tuple[str, ...] = ()  # outputs also logged to MLflow as artifacts (corpora stay in the run dir)
    training: bool = False        # reads max_steps from the spec section of its own name
    version: int = 1              # of its outputs' format: a new one makes run dirs from before rebuild it


def _binarized(name: str) -> tuple[str, str]:
    return f"{name}.bin", f"{name}.idx"


_SUMMARY = ("summary.json", "summary.md", *(f"test.{d}.txt" for d in DECODERS))
STAGE_TABLE = (
    Stage("prepare", ("data",), tuple(f"{split}.{side}" for split in SPLITS for side in SIDES)),
    Stage("tokenizer", ("tokenizer",), (SPM, *_binarized("train.src"), *_binarized("train.tgt")), logged=(SPM,),
          version=2),   # 2: the train set binarized (2026-12)
    Stage("teacher", ("model", "teacher"), (MODEL,), logged=(MODEL,), training=True),
    Stage("distill", ("distill",), (DISTILLED, *_binarized(DISTILLED)), version=2),
    Stage("student", ("model", "student"), (MODEL,), logged=(MODEL,), training=True),
    Stage("evaluate", ("eval",), _SUMMARY, logged=_SUMMARY, version=2),   # 2: TER in the summary (2026-12)
)
STAGES = tuple(s.name for s in STAGE_TABLE)
STAGE = {s.name: s for s in STAGE_TABLE}
TRAINING = tuple(s.name for s in STAGE_TABLE if s.training)
# What translating needs (serve, eval, report): stage -> file.
MODEL_FILES = {"tokenizer": SPM, "teacher": MODEL, "student": MODEL}


def run_dir(spec: JobSpec) -> Path:
    # Absolute: Ray workers and actors run with another working directory.
    return Path(spec.workdir).resolve() / spec.name


def split_path(rd: Path, split: str, side: str) -> Path:
    """prepare's text of one split and side ("src" or "tgt")."""
    return Path(rd) / "prepare" / f"{split}.{side}"


def model_path(rd: Path, stage: str) -> Path:
    """The model file of a training stage ("teacher" or "student")."""
    return Path(rd) / stage / MODEL


def spm_path(rd: Path) -> Path:
    return Path(rd) / "tokenizer" / SPM


def bin_prefix(rd: Path, stage: str, name: str) -> Path:
    """The prefix of a binarized corpus (prefix.bin + prefix.idx): tokenizer's "train.src" and
    "train.tgt", distill's "train.distilled.tgt"."""
    return Path(rd) / stage / name


class RunNotReady(Exception):
    """The run dir is missing or a stage it needs is not done; the message names it."""


def check_finished(rd: Path, stages=STAGES) -> None:
    """The one "is this run usable" check (report, eval, serve): raise RunNotReady naming the
    first of `stages` that is not done or whose recorded outputs are missing."""
    rd = Path(rd)
    if not rd.is_dir():
        raise RunNotReady(f"run directory not found: {rd}")
    for stage in stages:
        m = read_manifest(rd / stage)
        if m is None or m.status != "done":
            state = "pending" if m is None else m.status
            why = f" ({m.error})" if m is not None and m.error else ""
            raise RunNotReady(f"{rd} is not finished: stage '{stage}' is {state}{why}. "
                              f"Run `imitate-orch run JOB` to finish it first.")
        missing = [o["path"] for o in m.outputs.values() if not (rd / stage / o["path"]).is_file()]
        if missing:
            raise RunNotReady(f"{rd}: stage '{stage}' is done but {', '.join(missing)} is missing. "
                              f"Run `imitate-orch run JOB` to redo it.")
