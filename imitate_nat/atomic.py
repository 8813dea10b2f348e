"""Atomic file writes: a killed process leaves the old file or the new one, never half of one,
and no temp file behind when the write fails. Here (not in orchestrator/) because the model
and tokenizer files of this package are written this way; orchestrator/run/files.py builds
its text and JSON writers on it."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator

_CHUNK = 1 << 20

# mkstemp creates files 0600; give atomically written files the mode a plain open() would
# (0666 & ~umask) so other users/processes on a shared cluster can read them. The umask can
# only be read by setting it, so do that once at import time.
_UMASK = os.umask(0)
os.umask(_UMASK)


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
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` atomically (see atomic_writer)."""
    with atomic_writer(path, "wb") as f:
        f.write(data)
    return Path(path)


def _fsync_dir(directory: str | os.PathLike) -> None:
    """Make the renames in `directory` durable (best effort: not every platform can open a dir)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
