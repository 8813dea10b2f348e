"""Atomic file writes and checksums: a killed process leaves the old file or the new one,
never half of one, and what a stage recorded can be verified later."""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

log = logging.getLogger(__name__)

_CHUNK = 1 << 20

# mkstemp creates files 0600; give atomically written files the mode a plain open() would
# (0666 & ~umask) so other users/processes on a shared cluster can read them. The umask can
# only be read by setting it, so do that once at import time.
_UMASK = os.umask(0)
os.umask(_UMASK)


# ---------------------------------------------------------------- atomic writes

@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, mode: str = "w", encoding: str = "utf-8",
                  buffering: int = _CHUNK) -> Iterator[IO]:
    """Stream into ``path`` so that readers see either the old file or the complete new one.

    Yields a file object on a temp file in the same directory (os.replace is only atomic
    within a filesystem). When the ``with`` block ends normally the temp file is fsynced
    (else a crash can leave a renamed-but-empty file), renamed over ``path``, and the
    directory fsynced so the rename itself survives a power loss. If the block raises, the
    temp file is removed and ``path`` is left as it was. Text mode ("w") writes UTF-8 with
    no newline translation; "wb" writes bytes. Memory use is one buffer, whatever the size.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', not {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if mode == "wb":
            f = os.fdopen(fd, "wb", buffering=buffering)
        else:
            f = os.fdopen(fd, "w", encoding=encoding, newline="", buffering=buffering)
        with f:
            yield f
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


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` atomically (see atomic_writer)."""
    with atomic_writer(path, "wb") as f:
        f.write(data)
    return Path(path)


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


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------- distillation shards


