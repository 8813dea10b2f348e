"""What a stage's identity is, and what changed since it ran.

A stage's input hash covers the spec sections it reads (run/layout.py's stage table), the
job's seed and the hash of the stage before it, so a change anywhere upstream invalidates
everything downstream. Beside it, a manifest records the sha256 of the outputs each earlier
stage had when this one ran ("consumed"): a stage redone with different bytes makes the later
ones stale even when no setting changed. A training stage whose only change is a higher
max_steps is not stale but extended from its last checkpoint (its extend key
is the input hash without max_steps).
"""
from __future__ import annotations

from pathlib import Path

from ..spec.schema import JobSpec
from .files import sha256_json
from .layout import STAGE, STAGES, TRAINING
from .manifest import Manifest, read_manifest


def stage_hashes(spec: JobSpec) -> dict[str, str]:
    hashes, upstream = {}, None
    for stage in STAGES:
        sections = {name: getattr(spec, name).model_dump(mode="json") for name in STAGE[stage].reads}
        identity = {"stage": stage, "seed": spec.seed, "sections": sections, "upstream": upstream}
        if STAGE[stage].version > 1:   # (version 1 is left out: the hashes of run dirs made before versions)
            identity["version"] = STAGE[stage].version
        hashes[stage] = upstream = sha256_json(identity)
    return hashes


def extend_key(spec: JobSpec, stage: str) -> str | None:
    """A training stage's input hash with its max_steps left out (None for other stages): runs
    that agree on it differ at most in how long they train."""
    if stage not in TRAINING:
        return None
    sections = {name: getattr(spec, name).model_dump(mode="json") for name in STAGE[stage].reads}
    del sections[stage]["max_steps"]
    upstream = stage_hashes(spec)[STAGES[STAGES.index(stage) - 1]]
    return sha256_json({"stage": stage, "seed": spec.seed, "sections": sections, "upstream": upstream,
                        "without": "max_steps"})


def max_steps(spec: JobSpec, stage: str) -> int | None:
    return getattr(spec, stage).max_steps if stage in TRAINING else None


def can_extend(m: Manifest | None, spec: JobSpec, stage: str) -> bool:
    """Did this stage dir train on the same inputs for at most the max_steps the spec asks now?
    (Fewer steps cannot be had from a longer run: that retrains.)"""
    key = extend_key(spec, stage)
    return (key is not None and m is not None and m.extend_key == key and m.max_steps is not None
            and m.max_steps <= max_steps(spec, stage))


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
