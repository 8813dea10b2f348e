"""Atomic file writes and checksums: a killed process leaves the old file or the new one,
never half of one, and what a stage recorded can be verified later. The atomic writer itself
is imitate_nat's (its model and tokenizer files are written the same way); the text and JSON
writers here build on it."""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable

from imitate_nat.atomic import atomic_write_bytes

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


# ---------------------------------------------------------------- atomic writes (text, JSON)

def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_lines(path: str | os.PathLike, lines: Iterable[str]) -> Path:
    """One line per item, each ended by "\n" (translations: line i answers source line i)."""
    return atomic_write_text(path, "".join(f"{line}\n" for line in lines))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    text = json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, default=_json_default)
    return atomic_write_text(path, text + "\n")


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


