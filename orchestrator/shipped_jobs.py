"""The job specs shipped with imitate-orch: the repository's jobs/ directory, which a wheel
installs as package data (orchestrator/jobs/: pyproject.toml maps it there).

`imitate-orch jobs` lists them, `imitate-orch jobs copy NAME [DEST]` copies one to edit (as
torchtune's `tune ls` and `tune cp`), and a JOB argument that is not a path but a shipped
job's name (`imitate-orch validate tiny`) reads that job.
"""
from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

SUFFIX = ".yaml"


class JobCopyError(Exception):
    """An unknown job name, or a destination that exists: the CLI exits 2, nothing was written."""


def shipped_dir() -> Traversable:
    """orchestrator/jobs of an installed wheel; in a source checkout or an editable install,
    where the package is the repository's orchestrator/, the repository's jobs/ beside it."""
    packaged = importlib.resources.files("orchestrator") / "jobs"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[1] / "jobs"


def shipped_jobs() -> dict[str, Traversable]:
    """name -> file of every shipped job, by name."""
    files = (f for f in shipped_dir().iterdir() if f.name.endswith(SUFFIX))
    return {f.name.removesuffix(SUFFIX): f for f in sorted(files, key=lambda f: f.name)}


def summary_line(name: str, text: str) -> str:
    """A job file's first comment line, less the "NAME: " it starts with."""
    first = next((line.lstrip("#").strip() for line in text.splitlines() if line.startswith("#")), "")
    return first.removeprefix(f"{name}:").strip()


def jobs_table() -> str:
    """What `imitate-orch jobs` prints: each shipped job's name and first comment line."""
    jobs = shipped_jobs()
    width = max(map(len, jobs)) + 2
    lines = [f"{name:<{width}}{summary_line(name, f.read_text(encoding='utf-8'))}" for name, f in jobs.items()]
    return "\n".join([*lines, "", "imitate-orch jobs copy NAME [DEST] writes one to edit (default ./NAME.yaml)."])


def copy_job(name: str, dest: str | None) -> Path:
    """Write shipped job `name` to `dest` (default ./NAME.yaml; into it if it is a directory).
    An existing file is never overwritten."""
    jobs = shipped_jobs()
    if name not in jobs:
        raise JobCopyError(f"no shipped job {name!r}; one of {', '.join(jobs)} (imitate-orch jobs)")
    target = Path(dest or f"{name}{SUFFIX}")
    if target.is_dir():
        target = target / f"{name}{SUFFIX}"
    try:
        with open(target, "x", encoding="utf-8") as f:   # "x": fails if it exists, even if created just now
            f.write(jobs[name].read_text(encoding="utf-8"))
    except FileExistsError:
        raise JobCopyError(f"{target} exists: not overwritten (remove it, or give another DEST)") from None
    except OSError as e:
        raise JobCopyError(f"cannot write {target}: {e.strerror or e}") from None
    return target


def job_path(job: str) -> str:
    """A JOB argument: `job` itself when it is a path that exists or no shipped job's name,
    else the shipped job's file."""
    if Path(job).exists() or job not in (jobs := shipped_jobs()):
        return job
    return str(jobs[job])
