"""Binarize a text corpus once: SentencePiece ids in a memory-mapped `.bin` + `.idx` pair
(imitate_nat/indexed.py), encoded in parallel chunks by Ray tasks, so a cluster does it in
parallel and training never tokenizes again (nor holds a corpus in Python lists).

A chunk is a range of lines found by byte offsets in one streaming pass over the file; each task
reads only its byte range, encodes its lines and writes a part; the parts are merged in order
(streamed, `copyfileobj`), so sentence i of the `.bin` is line i of the text, empty lines
included (the training stages filter by length on the `.idx`, and distillation shards are line
ranges of the same file). Every task's peak memory is one chunk; the driver's is constant.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import NamedTuple

import ray
from tqdm.auto import tqdm

from imitate_nat.indexed import IndexedDataset, IndexedWriter, merge_indexed
from imitate_nat.tokenizer import Tokenizer

log = logging.getLogger("imitate_orch")

CHUNK_LINES = 250_000   # lines per Ray task: ~40 MB of text at WMT sentence lengths
ENCODE_BATCH = 8192     # lines encoded at once: Python id lists cost ~1 KB a sentence
BOM = b"\xef\xbb\xbf"


def _line_starts(path: str | os.PathLike, wanted) -> tuple[int, dict[int, int], int]:
    """One streaming pass: (number of lines, {line number: its first byte} for the line numbers
    where wanted(i), the end of the file). Lines are split on "\\n" only, as
    imitate_nat.data.read_lines splits them (a last line without "\\n" counts); a UTF-8
    byte-order mark at the start is skipped."""
    starts, n = {}, 0
    with open(path, "rb") as f:
        pos = 3 if f.read(3) == BOM else 0
        f.seek(pos)
        for line in f:
            if wanted(n):
                starts[n] = pos
            n, pos = n + 1, pos + len(line)
    return n, starts, pos


def chunk_ranges(path: str | os.PathLike, chunk_lines: int = CHUNK_LINES) -> tuple[int, list[tuple[int, int]]]:
    """(number of lines, [(byte start, byte end)] of consecutive chunks of `chunk_lines` lines)."""
    n, starts, end = _line_starts(path, lambda i: i % chunk_lines == 0)
    begins = [starts[i] for i in sorted(starts)]
    return n, list(zip(begins, begins[1:] + [end]))


def line_byte_ranges(path: str | os.PathLike, bounds: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The byte range of each line range [a, b) of `bounds` (consecutive, covering the file)."""
    n, starts, end = _line_starts(path, {a for a, _ in bounds}.__contains__)
    starts[n] = end
    return [(starts[a], starts[b]) for a, b in bounds]


def read_range(path: str | os.PathLike, start: int, end: int) -> list[str]:
    """The lines in bytes [start, end) of a file, a range from chunk_ranges."""
    if end <= start:
        return []
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    return data.removesuffix(b"\n").decode("utf-8").split("\n")


@ray.remote(num_cpus=1, max_retries=2)
def encode_chunk(text_path: str, start: int, end: int, spm_path: str, part_prefix: str) -> int:
    """Encode the lines in bytes [start, end) of `text_path` into the part `part_prefix`;
    returns the number of lines. Idempotent (the part is written atomically), so a retry after
    a lost worker redoes only this chunk."""
    tok = Tokenizer(spm_path)
    lines = read_range(text_path, start, end)
    with IndexedWriter(part_prefix, tok.vocab_size) as w:
        for i in range(0, len(lines), ENCODE_BATCH):   # id lists of a few thousand lines at a time
            w.add_many(tok.encode_batch(lines[i:i + ENCODE_BATCH]))
    return len(lines)


def binarize(text_path: str | os.PathLike, spm_path: str | os.PathLike, out_prefix: str | os.PathLike,
             chunk_lines: int = CHUNK_LINES, progress: bool = False) -> int:
    """Encode every line of `text_path` into `out_prefix`.bin/.idx with Ray tasks (Ray must be
    initialized); returns the number of sentences, which equals the number of lines."""
    return binarize_files([(text_path, out_prefix)], spm_path, chunk_lines, progress)[0]


class _File(NamedTuple):
    """One file being binarized: its chunk tasks and where their parts go."""
    text: Path
    out: Path
    lines: int
    parts: list[Path]
    refs: list


def binarize_files(jobs: list[tuple[str | os.PathLike, str | os.PathLike]], spm_path: str | os.PathLike,
                   chunk_lines: int = CHUNK_LINES, progress: bool = False) -> list[int]:
    """binarize() for several (text file, out prefix) pairs at once: the chunk tasks of all
    files are queued together, so the CPUs stay busy across the files (no idle tail between
    them); returns each file's number of sentences."""
    spm_path = str(Path(spm_path).resolve())
    files = []
    for text_path, out_prefix in jobs:
        text, out = Path(text_path).resolve(), Path(out_prefix).resolve()
        n, ranges = chunk_ranges(text, chunk_lines)
        parts = [out.with_name(f"{out.name}.part{k:05d}") for k in range(len(ranges))]
        refs = [encode_chunk.remote(str(text), a, b, spm_path, str(p)) for (a, b), p in zip(ranges, parts)]
        files.append(_File(text, out, n, parts, refs))
    owner = {ref: k for k, f in enumerate(files) for ref in f.refs}
    counted = [0] * len(files)
    desc = "binarize " + ", ".join(f.text.name for f in files)
    with tqdm(total=sum(f.lines for f in files), unit="line", desc=desc, disable=not progress) as bar:
        pending = list(owner)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            k = ray.get(done[0])
            counted[owner[done[0]]] += k
            bar.update(k)
    for f, got in zip(files, counted):
        _merge(f, got, spm_path)
    return [f.lines for f in files]


def _merge(f: _File, counted: int, spm_path: str) -> None:
    """The parts of one file, checked and merged in order into its out prefix; the parts removed."""
    if counted != f.lines:
        raise RuntimeError(f"binarize {f.text}: the chunks hold {counted} lines, the file {f.lines}")
    if f.parts:
        merge_indexed([str(p) for p in f.parts], str(f.out))
    else:  # an empty file: an empty dataset
        with IndexedWriter(f.out, Tokenizer(spm_path).vocab_size):
            pass
    for p in f.parts:
        for suffix in (".bin", ".idx"):
            Path(f"{p}{suffix}").unlink(missing_ok=True)
    if len(IndexedDataset(f.out)) != f.lines:
        raise RuntimeError(f"binarize {f.text}: {f.out} does not hold {f.lines} sentences")
