"""Run directory layout, stage manifests, atomic writes and checksums.

A stage writes into ``<workdir>/<job>/<stage>/`` and finishes by writing ``manifest.json``.
The runner skips a stage only when :func:`is_complete` says the manifest matches the stage's
input hash *and* every recorded output still hashes to what was recorded, so a truncated or
hand-edited artifact makes the stage run again instead of being silently consumed.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
STATUSES = ("running", "done", "failed")
_CHUNK = 1 << 20

# mkstemp creates files 0600; give atomically written files the mode a plain open() would
# (0666 & ~umask) so other users/processes on a shared cluster can read them. The umask can
# only be read by setting it, so do that once at import time.
_UMASK = os.umask(0)
os.umask(_UMASK)


# ---------------------------------------------------------------- atomic writes

def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` so that readers see either the old file or the complete new one.

    Temp file in the same directory (os.replace is only atomic within a filesystem),
    fsync before the rename (else a crash can leave a renamed-but-empty file), then fsync
    the directory so the rename itself survives a power loss.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        # Never leave temp debris behind; the old file (if any) is untouched.
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    text = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, default=_json_default)
    return atomic_write_text(path, text + "\n")


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. platforms that cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _json_default(obj: Any) -> Any:
    # Paths are common in configs; anything else unknown is a bug, not something to str().
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


# ---------------------------------------------------------------- checksums

def sha256_file(path: str | os.PathLike) -> str:
    """Streamed sha256 of a file (checkpoints can be GBs)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_path(path: str | os.PathLike) -> str:
    """sha256 of a file, or of a directory tree (relative names + file hashes, sorted).

    Directories matter because checkpoints (Ray Train, DeepSpeed) are directories.
    """
    path = Path(path)
    if not path.is_dir():
        return sha256_file(path)
    entries = sorted(
        (p.relative_to(path).as_posix(), sha256_file(p)) for p in path.rglob("*") if p.is_file()
    )
    return sha256_json(entries)


def sha256_json(obj: Any) -> str:
    """Stable hash of a JSON-able object: key order and whitespace do not matter."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      default=_json_default)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------- layout and manifests

def stage_dir(workdir: str | os.PathLike, job: str, stage: str) -> Path:
    """``<workdir>/<job>/<stage>/`` (not created here)."""
    return Path(workdir) / job / stage


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


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
    # asking for more steps on the same inputs trains on from the last checkpoint.
    continue_key: str | None = None
    max_steps: int | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"manifest status must be one of {STATUSES}, got {self.status!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Manifest":
        # Ignore unknown keys so a newer writer doesn't break an older reader.
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


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


# ---------------------------------------------------------------- distillation shards

def _shard_paths(directory: str | os.PathLike, index: int) -> tuple[Path, Path]:
    d = Path(directory)
    return d / f"shard-{index:05d}.txt", d / f"shard-{index:05d}.done"


def _encode_lines(lines: Iterable[str]) -> tuple[bytes, int]:
    lines = list(lines)
    for i, line in enumerate(lines):
        if "\n" in line:  # would silently change the line count (lines out must = lines in)
            raise ValueError(f"line {i} contains a newline")
    text = "".join(line + "\n" for line in lines)
    return text.encode("utf-8"), len(lines)


def write_shard(directory: str | os.PathLike, index: int, lines: Iterable[str], **meta: Any) -> Path:
    """Write ``shard-NNNNN.txt`` then its ``.done`` marker (sha256 + line count, plus `meta`,
    e.g. the node that made it).

    The marker is written last, so a crash in between leaves a shard without a marker,
    which :func:`shard_done` reports as not done.
    """
    shard, marker = _shard_paths(directory, index)
    marker.unlink(missing_ok=True)  # a stale marker must not vouch for a new shard
    data, n = _encode_lines(lines)
    atomic_write_bytes(shard, data)
    atomic_write_json(marker, {**meta, "sha256": hashlib.sha256(data).hexdigest(), "lines": n})
    return shard


def shard_marker(directory: str | os.PathLike, index: int) -> dict | None:
    """The shard's done marker (sha256, lines, meta), or None if absent or unreadable."""
    try:
        info = json.loads(_shard_paths(directory, index)[1].read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def shard_done(directory: str | os.PathLike, index: int, expected_lines: int) -> bool:
    """True only if the marker exists and the shard has its line count and checksum: a
    half-written, truncated or altered shard is redone, never merged."""
    info = shard_marker(directory, index)
    if info is None:
        return False
    try:
        data = _shard_paths(directory, index)[0].read_bytes()
    except OSError:
        return False
    return (info.get("lines") == expected_lines
            and data.count(b"\n") == expected_lines
            and info.get("sha256") == hashlib.sha256(data).hexdigest())


def read_shard(directory: str | os.PathLike, index: int) -> list[str]:
    # Bytes, not text mode: universal newlines would turn a stray "\r" into a line break.
    text = _shard_paths(directory, index)[0].read_bytes().decode("utf-8")
    if not text:
        return []
    return (text[:-1] if text.endswith("\n") else text).split("\n")
