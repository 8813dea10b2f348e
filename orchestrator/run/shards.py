"""Shard files with done markers: a distill actor's output survives a killed driver.

A shard is written atomically, then its `.done` marker (line count, checksum, metadata); a
shard without a marker, or whose text no longer matches it, is decoded again. The marker also
names the plan the shard was made for (distill's shards/plan.json, hashed): a shard an actor of
an earlier, killed driver finishes after the plan changed looks valid but is redone.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

from .files import atomic_write_bytes, atomic_write_json


def shard_path(directory: str | os.PathLike, index: int) -> Path:
    """The text file of shard `index`: its lines, each ending in "\\n"."""
    return _shard_paths(directory, index)[0]


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


def shard_done(directory: str | os.PathLike, index: int, expected_lines: int, plan: str | None = None) -> bool:
    """True only if the marker exists and the shard has its line count and checksum (and, when
    `plan` is given, the marker names that plan): a half-written, truncated, altered or
    stale-plan shard is redone, never merged."""
    info = shard_marker(directory, index)
    if info is None or (plan is not None and info.get("plan") != plan):
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
