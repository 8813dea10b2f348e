"""What a Ray Train checkpoint of the teacher/student holds besides the model, and how it is
verified before it is trusted.

Every rank writes its torch RNG state (dropout draws) and a `sha256-rank<r>.json` of the files
it put into the checkpoint. On restore they are verified first: a damaged checkpoint (bit rot,
a partial copy, a rank's checksum list missing) is never loaded; the newest intact older one is
used instead (steps after it are trained again), and if none is intact the run fails naming the
damaged files. The checker is told how many ranks wrote the checkpoint (the run's worker count:
a run's name changes with it, so all its checkpoints have that many).

A run that averages checkpoints (average_last) keeps its last N checkpoints rather than its
best, so each of them also carries the best model file so far (BEST_MODEL).
"""
from __future__ import annotations

import json
import logging
import posixpath
from pathlib import Path

import torch

from ..run.files import atomic_write_json, sha256_file

CHECKSUMS = "sha256-rank{}.json"
RNG = "rng-rank{}.pt"        # each rank's torch RNG state (CPU, and CUDA where used)
BEST_MODEL = "best-model.pt"  # averaging runs: the model file of the best checkpoint so far
log = logging.getLogger("imitate_orch")


def save_rng(d: Path, rank: int, device) -> None:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    torch.save(state, d / RNG.format(rank))


def restore_rng(d: Path, rank: int, device) -> None:
    """This rank's RNG state from checkpoint dir `d`. A checkpoint from before RNG states were
    saved, or from a run with fewer workers, has none for this rank: the seeded stream goes on."""
    f = d / RNG.format(rank)
    if not f.is_file():
        log.warning("checkpoint %s holds no RNG state for rank %d: dropout draws differ from an "
                    "uninterrupted run", d, rank)
        return
    state = torch.load(f, weights_only=True)
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def write_checksums(d: Path, rank: int) -> None:
    """sha256 of every file this rank wrote into checkpoint dir `d` (Ray merges the ranks' dirs)."""
    files = sorted(p for p in d.rglob("*") if p.is_file() and not p.name.startswith("sha256-rank"))
    atomic_write_json(d / CHECKSUMS.format(rank), {p.relative_to(d).as_posix(): sha256_file(p) for p in files})


def checkpoint_problems(d: Path, ranks: int) -> list[str]:
    """What is wrong with checkpoint dir `d` written by `ranks` workers: a rank's checksum list
    missing (what that rank wrote could not be verified: a partial copy looks just like this),
    listed files missing or altered; [] if intact."""
    problems = [f"{CHECKSUMS.format(r)} missing" for r in range(ranks) if not (d / CHECKSUMS.format(r)).is_file()]
    for listing in sorted(d.glob(CHECKSUMS.format("*"))):
        try:
            expected = json.loads(listing.read_text())
            if not isinstance(expected, dict):
                raise ValueError("not a name -> sha256 map")
        except (OSError, ValueError):
            problems.append(f"{listing.name} unreadable")
            continue
        for name, digest in expected.items():
            p = d / name
            if not p.is_file():
                problems.append(f"{name} missing")
            elif sha256_file(p) != digest:
                problems.append(f"{name} checksum mismatch")
    return problems


def intact_checkpoint_dirs(checkpoints, stage: str, ranks: int):
    """Yields the local dir of each of `checkpoints` (Ray Train checkpoints of a `ranks`-worker
    run, in the caller's order) that verifies, while it is open (a remote one is a temporary
    download); a damaged one is skipped with a warning."""
    for checkpoint in checkpoints:
        with checkpoint.as_directory() as d:
            problems = checkpoint_problems(Path(d), ranks)
            if not problems:
                yield Path(d)
                continue
        log.warning("%s: skipping damaged checkpoint %s: %s", stage, checkpoint.path, ", ".join(problems))


def older_checkpoints(checkpoint) -> list:
    """The run's other checkpoints older than `checkpoint`, newest first (local or s3:// storage)."""
    import pyarrow.fs as pafs
    import ray.train

    parent, name = posixpath.split(checkpoint.path.rstrip("/"))
    infos = checkpoint.filesystem.get_file_info(pafs.FileSelector(parent))
    names = sorted((i.base_name for i in infos if i.type == pafs.FileType.Directory
                    and i.base_name.startswith("checkpoint_") and i.base_name < name), reverse=True)
    return [ray.train.Checkpoint(posixpath.join(parent, n), filesystem=checkpoint.filesystem) for n in names]


def restore_intact(checkpoint, load, ranks: int):
    """load(dir) from the newest intact checkpoint of a `ranks`-worker run, starting at
    `checkpoint` (Ray's latest)."""
    damaged = []
    for candidate in [checkpoint, *older_checkpoints(checkpoint)]:
        with candidate.as_directory() as d:
            problems = checkpoint_problems(Path(d), ranks)
            if not problems:
                if damaged:
                    log.warning("restoring from %s: newer checkpoint(s) are damaged: %s", candidate.path,
                                "; ".join(damaged))
                return load(Path(d))
        damaged.append(f"{candidate.path}: {', '.join(problems)}")
    raise RuntimeError("every checkpoint of this training run is damaged, none was loaded: "
                       f"{'; '.join(damaged)}. Delete {posixpath.dirname(checkpoint.path)} to train from scratch.")
