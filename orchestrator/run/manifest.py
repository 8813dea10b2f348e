"""Stage manifests: what a stage ran on, what it wrote (with sha256), how it ended.

A stage finishes by writing `manifest.json` in its dir. The runner skips a stage only when
`is_complete` says the manifest matches the stage's input hash *and* every recorded output
still hashes to what was recorded, so a truncated or hand-edited artifact makes the stage run
again instead of being silently consumed.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import json
import logging
import os
from pathlib import Path
from typing import Any

from .files import atomic_write_json, sha256_path

log = logging.getLogger(__name__)


MANIFEST_NAME = "manifest.json"


STATUSES = ("running", "done", "failed")


@dataclasses.dataclass
class Manifest:
    stage: str
    input_hash: str
    status: str = "running"  # one of STATUSES
    # name -> {"path": path relative to the stage dir, "sha256": hex}
    outputs: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    started: str | None = None  # ISO-8601 UTC
    finished: str | None = None
    error: str | None = None
    # earlier stage -> sha256 of its recorded outputs when this stage ran: a stage redone with
    # different bytes makes every stage after it stale (empty in manifests from before this field)
    consumed: dict[str, str] = dataclasses.field(default_factory=dict)
    # training stages: the input hash without max_steps, and the max_steps trained to. A rerun
    # asking for more steps on the same inputs extends it from the last checkpoint.
    extend_key: str | None = None
    max_steps: int | None = None
    # files read from outside the run dir (the first stage's data) -> their sha256 when it ran: an
    # edited file makes the stage stale (run/hashing.py input_digests)
    inputs: dict[str, str] = dataclasses.field(default_factory=dict)
    # the imitate-orch version that ran the stage (None in manifests from before this field)
    package_version: str | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"manifest status must be one of {STATUSES}, got {self.status!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Manifest":
        # Ignore unknown keys so a newer writer doesn't break an older reader.
        names = {f.name for f in dataclasses.fields(cls)}
        if "continue_key" in d:  # the extend key's name in manifests written before 2026-12
            d = {"extend_key": d["continue_key"], **d}
        return cls(**{k: v for k, v in d.items() if k in names})


@functools.cache
def package_version() -> str:
    """This package's installed version, recorded in each manifest ("unknown" when run from a
    source tree that was never installed)."""
    try:
        return importlib.metadata.version("imitate-orch")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def write_manifest(stage_dir: str | os.PathLike, manifest: Manifest) -> Path:
    return atomic_write_json(Path(stage_dir) / MANIFEST_NAME, manifest.to_dict())


def read_manifest(stage_dir: str | os.PathLike) -> Manifest | None:
    """The stage's manifest, or None if missing or unreadable (then the stage is redone)."""
    path = Path(stage_dir) / MANIFEST_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("manifest is not a JSON object")
        return Manifest.from_dict(data)
    except FileNotFoundError:
        return None
    except (ValueError, TypeError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        log.warning("ignoring corrupted manifest %s: %s", path, e)
        return None


def record_outputs(stage_dir: str | os.PathLike,
                   names_to_paths: dict[str, str | os.PathLike]) -> dict[str, dict[str, str]]:
    """Checksum each output; paths may be absolute or relative to the stage dir.

    Stored paths are relative to the stage dir so a run directory can be moved or synced
    to another machine and still verify.
    """
    root = Path(stage_dir)
    out = {}
    for name, p in names_to_paths.items():
        full = Path(p) if Path(p).is_absolute() else root / p
        out[name] = {"path": os.path.relpath(full, root), "sha256": sha256_path(full)}
    return out


def is_complete(stage_dir: str | os.PathLike, input_hash: str) -> bool:
    """True only if the stage finished for exactly these inputs and its outputs are intact."""
    m = read_manifest(stage_dir)
    if m is None or m.status != "done" or m.input_hash != input_hash:
        return False
    root = Path(stage_dir)
    for name, entry in m.outputs.items():
        try:
            full = root / entry["path"]
            if not full.exists() or sha256_path(full) != entry["sha256"]:
                log.info("stage %s: output %r missing or changed", m.stage, name)
                return False
        except (KeyError, TypeError, OSError):
            return False
    return True
