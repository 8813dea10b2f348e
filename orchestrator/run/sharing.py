"""Sharing stage dirs between runs, one process at a time per stage dir, one `run` per job.

Sweep trials and ablation variants that agree up to a stage share its dir: `run_pipeline(...,
linked=...)` makes <run>/<stage> a symlink to a content-addressed dir from `shared_stage_dirs`
(<root>/<stage>/<hash>). Every stage runs under an exclusive file lock on its resolved dir, so
two runs that need the same teacher train it once: the second waits, then finds it done and
reuses it. While a stage runs, it holds a shared lock on the dirs of the stages before it,
which another run must wait out before redoing one of them. `run` also holds an exclusive lock on the job's run dir (`run_lock`): a second `run`
of the same job stops at once instead.
"""
from __future__ import annotations

import fcntl
import logging
import os
import shutil
import socket
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO, Iterable, Iterator

from ..spec.schema import JobSpec
from .hashing import consumed_digests, stage_hashes, upstream_changed
from .layout import STAGES, run_dir
from .manifest import is_complete, read_manifest

log = logging.getLogger("imitate_orch")


def shared_stage_dirs(spec: JobSpec, root: Path,
                      stages: Iterable[str] = ("prepare", "tokenizer", "teacher", "distill")) -> dict[str, Path]:
    """Content-addressed dirs for `stages`: runs whose specs agree up to a stage share its dir."""
    hashes = stage_hashes(spec)
    return {stage: Path(root).resolve() / stage / hashes[stage][:16] for stage in stages}


def job_or_shared_stage_dirs(spec: JobSpec, job: JobSpec, root: Path,
                             stages: Iterable[str] = ("prepare", "tokenizer", "teacher", "distill")) -> dict[str, Path]:
    """Like shared_stage_dirs, but each stage comes from the job's own run dir while that dir
    holds the very same stage, finished (its manifest has this spec's hash for it): a sweep
    after `run` trains no teacher again. From the first stage that is not there so, the
    content-addressed dir under `root`; nothing is ever written into the job's run dir."""
    dirs, reuse = {}, True
    for stage, shared in shared_stage_dirs(spec, root, stages).items():
        own = finished_job_stage(spec, job, stage) if reuse else None
        reuse = own is not None
        dirs[stage] = own or shared
    return dirs


def finished_job_stage(spec: JobSpec, job: JobSpec, stage: str) -> Path | None:
    """The job's own <run>/<stage> when `run` finished that very stage there and it would be
    reused as it is (its manifest has `spec`'s hash for it, its outputs are intact, the job's
    earlier stages are still what it read), else None: a linked stage that runner.run_stage
    found stale would be redone through the link, inside the job's run dir."""
    rd = run_dir(job)
    reusable = is_complete(rd / stage, stage_hashes(spec)[stage]) and \
        not upstream_changed(read_manifest(rd / stage), consumed_digests(rd, stage))
    return rd / stage if reusable else None


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


def drop_link_of_other_settings(run: Path, stage: str, spec: JobSpec) -> None:
    """<run>/<stage> linked, by an earlier run of other settings, to a dir holding another hash
    (an ablation variant's student linked to the job's own, then `ablate --set
    student.lambda2=…`): the link goes, so the stage is redone in this run's own dir, never
    through the link into a dir that another run owns."""
    link = run / stage
    if not link.is_symlink():
        return
    m = read_manifest(link)
    if m is None or m.input_hash != stage_hashes(spec)[stage]:
        log.info("%s: %s was linked to %s, which holds other settings: redone in %s", spec.name, stage,
                 link.resolve(), run)
        link.unlink()


@contextmanager
def _dir_lock(d: Path, kind: str = "lock") -> Iterator[IO[str]]:
    """A lock file of dir `d` (its resolved path, so links share it), open: `.<name>.<kind>`
    beside the dir, not in it, because a stage dir is emptied when redone. An flock on it is
    released when the file is closed or the process dies, however it dies."""
    real = d.resolve()
    real.parent.mkdir(parents=True, exist_ok=True)
    with open(real.parent / f".{real.name}.{kind}", "a+") as f:
        yield f


def _flock(f: IO[str], kind: int, waiting_message: str) -> None:
    try:
        fcntl.flock(f, kind | fcntl.LOCK_NB)
    except BlockingIOError:
        log.info("%s", waiting_message)
        fcntl.flock(f, kind)


@contextmanager
def stage_lock(d: Path, stage: str) -> Iterator[None]:
    """Exclusive lock on stage dir `d` (<run>/<stage>) for as long as the stage is checked and
    run (another process holding it makes this one wait), and a shared "readers" lock on the
    dir of each stage before it in the same run dir, which it reads: another run sharing one of
    those dirs may check and reuse it meanwhile, but waits before redoing it (`no_readers`).
    Readers' locks are taken upstream first, in stage order, by every run alike, so runs never
    wait for each other in a cycle."""
    with ExitStack() as held:
        f = held.enter_context(_dir_lock(d))
        _flock(f, fcntl.LOCK_EX, f"{stage:<9} is being run by another process ({d.resolve()}); waiting")
        held.callback(fcntl.flock, f, fcntl.LOCK_UN)
        for up in ([d.parent / s for s in STAGES[:STAGES.index(stage)]] if stage in STAGES else []):
            r = held.enter_context(_dir_lock(up, "readers"))
            _flock(r, fcntl.LOCK_SH, f"{stage:<9} waits for another process redoing {up.resolve()}")
            held.callback(fcntl.flock, r, fcntl.LOCK_UN)
        yield


@contextmanager
def no_readers(d: Path, stage: str) -> Iterator[None]:
    """Held by a stage while it wipes, resumes or extends its dir `d`: waits until no stage of
    another run (sharing the dir) is reading it, and keeps new readers out until done."""
    with _dir_lock(d, "readers") as f:
        _flock(f, fcntl.LOCK_EX, f"{stage:<9} waits for other runs' stages reading {d.resolve()} to end")
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class RunLocked(RuntimeError):
    """Another process is running this job's run dir; the message names it."""


@contextmanager
def run_lock(rd: Path) -> Iterator[None]:
    """Exclusive lock on a job's run dir for a whole `run`: two runs of one job would wipe and
    rewrite the same stage dirs under each other. Never waits: raises RunLocked naming the
    holder (pid and host, which it writes into the lock file) if another process has it."""
    with _dir_lock(rd) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"   # (empty if it has not written itself yet)
            raise RunLocked(f"{rd.resolve()} is being run by {holder}; wait for it to end or stop it") from None
        try:
            f.truncate(0)
            f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            f.flush()
            yield
        finally:
            f.truncate(0)
            fcntl.flock(f, fcntl.LOCK_UN)
