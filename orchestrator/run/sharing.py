"""Sharing stage dirs between runs, and one process at a time per stage dir.

Sweep trials and ablation variants that agree up to a stage share its dir: `run_pipeline(...,
linked=...)` makes <run>/<stage> a symlink to a content-addressed dir from `shared_stage_dirs`
(<root>/<stage>/<hash>). Every stage runs under an exclusive file lock on its resolved dir, so
two runs that need the same teacher train it once: the second waits, then finds it done and
reuses it.
"""
from __future__ import annotations

import fcntl
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from ..spec.schema import JobSpec
from .hashing import stage_hashes

log = logging.getLogger("imitate_orch")


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
