"""Batches of token ids for the AT and the NAT, and token-bucketed batching."""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .config import BOS_ID, EOS_ID, PAD_ID


@dataclass
class Batch:
    src: torch.Tensor      # (B, S)   source ids + EOS, padded
    tgt: torch.Tensor      # (B, T)   target ids, no BOS/EOS, padded: what the NAT emits
    tgt_in: torch.Tensor   # (B, T+1) BOS + target: the AT's teacher-forcing input
    tgt_out: torch.Tensor  # (B, T+1) target + EOS: what the AT predicts

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device, non_blocking=True) for t in (self.src, self.tgt, self.tgt_in, self.tgt_out)))


def pad(seqs: Sequence[Sequence[int]], pad_id: int = PAD_ID) -> torch.Tensor:
    width = max((len(s) for s in seqs), default=0)
    out = torch.full((len(seqs), max(width, 1)), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    return out


def source_tensor(srcs: Sequence[Sequence[int]], eos_id: int = EOS_ID, pad_id: int = PAD_ID) -> torch.Tensor:
    return pad([list(s) + [eos_id] for s in srcs], pad_id)


def make_batch(srcs: Sequence[Sequence[int]], tgts: Sequence[Sequence[int]],
               bos_id: int = BOS_ID, eos_id: int = EOS_ID, pad_id: int = PAD_ID) -> Batch:
    if len(srcs) != len(tgts):
        raise ValueError(f"{len(srcs)} sources but {len(tgts)} targets")
    if any(len(t) == 0 for t in tgts):
        raise ValueError("empty target sequence in batch")
    return Batch(src=source_tensor(srcs, eos_id, pad_id),
                 tgt=pad(tgts, pad_id),
                 tgt_in=pad([[bos_id] + list(t) for t in tgts], pad_id),
                 tgt_out=pad([list(t) + [eos_id] for t in tgts], pad_id))


def token_batches(lengths: Sequence[int], max_tokens: int, shuffle: bool = False, seed: int = 0,
                  max_sentences: int | None = None, max_length_ratio: float | None = None) -> list[list[int]]:
    """Group indices of similar length so that (count × longest) ≤ max_tokens per batch.

    Sorting by length first keeps padding small; with shuffle the batch order (not the
    bucketing) is randomized. A sentence longer than max_tokens gets a batch of its own.
    max_length_ratio also starts a new batch where the longest would exceed that multiple of
    the batch's shortest: for a few sentences of mixed lengths (a Serve batch on a CPU, where
    padding costs as much as real tokens), several tight batches instead of one padded one."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches, cur, longest = [], [], 0
    for i in order:
        new_longest = max(longest, lengths[i], 1)
        too_many = max_sentences is not None and len(cur) >= max_sentences
        too_mixed = bool(cur) and max_length_ratio is not None and lengths[i] > max_length_ratio * max(lengths[cur[0]], 1)
        if cur and (new_longest * (len(cur) + 1) > max_tokens or too_many or too_mixed):
            batches.append(cur)
            cur, new_longest = [], max(lengths[i], 1)
        cur.append(i)
        longest = new_longest
    if cur:
        batches.append(cur)
    if shuffle:
        random.Random(seed).shuffle(batches)
    return batches


def read_lines(path: str | Path) -> list[str]:
    """Lines split on "\n" only (a stray "\r" inside a sentence must not add a line, or a
    parallel file would lose its alignment); a UTF-8 byte-order mark is dropped."""
    text = Path(path).read_bytes().decode("utf-8-sig")
    if not text:
        return []
    return (text[:-1] if text.endswith("\n") else text).split("\n")


_BOM = "\ufeff".encode("utf-8")


def iter_lines(path: str | Path) -> Iterator[str]:
    """read_lines(path) one line at a time: the same lines (split on "\n" only, BOM dropped,
    no line after a final "\n"), in bounded memory."""
    with open(path, encoding="utf-8-sig", newline="\n") as f:
        for line in f:
            yield line[:-1] if line.endswith("\n") else line


def count_lines(path: str | Path) -> int:
    """len(read_lines(path)) without decoding or holding the file: counts "\n" bytes (never
    part of a multi-byte UTF-8 character), plus one for a last line with no final "\n"."""
    n, last, size = 0, b"", 0
    with open(path, "rb") as f:
        head = f.read(len(_BOM))
        f.seek(0)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            n += chunk.count(b"\n")
            size += len(chunk)
            last = chunk[-1:]
    if size - (len(_BOM) if head == _BOM else 0) > 0 and last != b"\n":
        n += 1
    return n


def read_parallel(src_path: str | Path, tgt_path: str | Path) -> tuple[list[str], list[str]]:
    src, tgt = read_lines(src_path), read_lines(tgt_path)
    if len(src) != len(tgt):
        raise ValueError(f"{src_path} has {len(src)} lines but {tgt_path} has {len(tgt)}")
    return src, tgt
