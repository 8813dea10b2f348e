"""Binarized, memory-mapped token datasets (fairseq style) and batch planning on length arrays.

A corpus side is stored under a prefix P as two files:

* ``P.bin``: the token ids of every sentence, concatenated, raw little-endian integers with no
  header; ``uint16`` when the vocabulary has at most 65536 entries, else ``uint32``.
* ``P.idx``: a 24-byte header, then ``n + 1`` little-endian int64 offsets (in tokens, not bytes)
  into ``P.bin``; sentence i is ``bin[offsets[i]:offsets[i+1]]``, ``offsets[0] == 0`` and
  ``offsets[n]`` is the number of tokens. The header is ``struct`` format ``"<8sBB6xQ"``:
  magic ``b"IMNATIDX"``, format version (1), itemsize of the .bin dtype (2 or 4), 6 zero
  bytes, n. Offsets therefore start at byte 24 and are memory-mapped, like the tokens.

Both files are written atomically: to temporary names in the same folder, fsync'ed, then
``os.replace``'d into place on ``close()``; an exception inside ``with IndexedWriter(...)``
removes the temporaries and leaves no (partial) P.bin / P.idx. A reader checks that the two
files agree (``offsets[n] * itemsize == size of P.bin``).

Batch planning (``plan_batches``) reproduces ``imitate_nat.data.token_batches`` exactly, with
numpy arrays instead of per-sentence Python objects, and ``collate`` builds the same ``Batch``
as ``make_batch``.
"""
from __future__ import annotations

import contextlib
import os
import random
import shutil
import struct
import uuid
from functools import cached_property
from typing import Iterable, Sequence

import numpy as np
import torch

from .config import BOS_ID, EOS_ID, PAD_ID
from .data import Batch

MAGIC, VERSION = b"IMNATIDX", 1
_HEADER = struct.Struct("<8sBB6xQ")  # magic, version, itemsize, padding, n sentences
HEADER_SIZE = _HEADER.size            # 24
_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}
_CHUNK = 1 << 20                      # offsets copied per step when merging


def dtype_for(vocab_size: int) -> np.dtype:
    """uint16 for vocab_size <= 65536, uint32 up to 2**32."""
    if not 0 < vocab_size <= 1 << 32:
        raise ValueError(f"vocab_size {vocab_size} out of range (1..2**32)")
    return _DTYPES[2] if vocab_size <= 1 << 16 else _DTYPES[4]


def _read_header(idx_path: str) -> tuple[np.dtype, int]:
    with open(idx_path, "rb") as f:
        raw = f.read(HEADER_SIZE)
    magic, version, itemsize, n = _HEADER.unpack(raw) if len(raw) == HEADER_SIZE else (raw, 0, 0, 0)
    if magic != MAGIC or version != VERSION or itemsize not in _DTYPES:
        raise ValueError(f"{idx_path}: not an index file (magic {magic!r}, version {version}, itemsize {itemsize})")
    return _DTYPES[itemsize], n


class IndexedWriter:
    """Streams sentences into P.bin / P.idx; memory stays bounded (buffered files only)."""

    def __init__(self, prefix: str | os.PathLike, vocab_size: int):
        self.prefix, self.vocab_size = os.fspath(prefix), int(vocab_size)
        self.dtype = dtype_for(self.vocab_size)
        tag = f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._tmp = {ext: f"{self.prefix}.{ext}{tag}" for ext in ("bin", "idx")}
        self._bin = open(self._tmp["bin"], "wb", buffering=_CHUNK)
        self._idx = open(self._tmp["idx"], "wb", buffering=_CHUNK)
        self._idx.write(_HEADER.pack(MAGIC, VERSION, self.dtype.itemsize, 0))  # n patched at close
        self._idx.write(struct.pack("<q", 0))
        self.num_sentences, self.num_tokens, self._done = 0, 0, False

    def add(self, ids: Sequence[int]) -> int:
        """Appends one sentence (a list or integer array of ids; may be empty); returns its index."""
        a = np.asarray(ids)
        if a.size:
            if a.ndim != 1 or a.dtype.kind not in "iu":
                raise TypeError(f"expected a flat sequence of integer ids, got {a.dtype} of shape {a.shape}")
            lo, hi = int(a.min()), int(a.max())
            if lo < 0 or hi >= self.vocab_size:
                raise ValueError(f"token id out of range [0, {self.vocab_size}): {lo if lo < 0 else hi}")
            self._bin.write(a.astype(self.dtype, copy=False).tobytes())
        self.num_tokens += a.size
        self._idx.write(struct.pack("<q", self.num_tokens))
        self.num_sentences += 1
        return self.num_sentences - 1

    def add_many(self, seqs: Iterable[Sequence[int]]) -> None:
        for ids in seqs:
            self.add(ids)

    def _append_dataset(self, ds: "IndexedDataset") -> None:
        """Appends a whole written dataset of the same dtype (bytes copied, offsets shifted)."""
        with open(ds.prefix + ".bin", "rb") as f:
            shutil.copyfileobj(f, self._bin, _CHUNK)
        for lo in range(1, len(ds) + 1, _CHUNK):
            chunk = np.asarray(ds.offsets[lo: lo + _CHUNK]) + self.num_tokens
            self._idx.write(chunk.astype("<i8", copy=False).tobytes())
        self.num_tokens += ds.num_tokens
        self.num_sentences += len(ds)

    def close(self) -> None:
        """Flushes, fsyncs and moves both files into place (P.bin first, then P.idx)."""
        if self._done:
            return
        try:
            self._idx.seek(0)
            self._idx.write(_HEADER.pack(MAGIC, VERSION, self.dtype.itemsize, self.num_sentences))
            for f in (self._bin, self._idx):
                f.flush()
                os.fsync(f.fileno())
                f.close()
            os.replace(self._tmp["bin"], self.prefix + ".bin")
            os.replace(self._tmp["idx"], self.prefix + ".idx")
        except BaseException:
            self.abort()
            raise
        self._done = True
        with contextlib.suppress(OSError):  # make the renames durable too
            dfd = os.open(os.path.dirname(os.path.abspath(self.prefix)), os.O_RDONLY)
            os.fsync(dfd)
            os.close(dfd)

    def abort(self) -> None:
        """Drops everything written so far; no final file is created."""
        self._done = True
        for f in (self._bin, self._idx):
            f.close()
        for path in self._tmp.values():
            if os.path.exists(path):
                os.unlink(path)

    def __enter__(self) -> "IndexedWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def merge_indexed(parts: Sequence[str | os.PathLike], out_prefix: str | os.PathLike) -> None:
    """Concatenates written parts, in order, into out_prefix (atomically); same dtype required."""
    if not parts:
        raise ValueError("nothing to merge")
    datasets = [IndexedDataset(p) for p in parts]
    dtypes = {ds.dtype for ds in datasets}
    if len(dtypes) != 1:
        raise ValueError(f"parts have different token dtypes: {sorted(str(d) for d in dtypes)}")
    # The largest vocabulary the dtype holds: the writer then picks that same dtype.
    with IndexedWriter(out_prefix, vocab_size=int(np.iinfo(datasets[0].dtype).max) + 1) as w:
        for ds in datasets:
            w._append_dataset(ds)


class IndexedDataset:
    """Read-only, memory-mapped P.bin / P.idx; opening reads the header and the last offset only."""

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = os.fspath(prefix)
        self.dtype, n = _read_header(self.prefix + ".idx")
        self.offsets = np.asarray(np.memmap(self.prefix + ".idx", dtype="<i8", mode="r",
                                            offset=HEADER_SIZE, shape=(n + 1,)))
        self.num_tokens = int(self.offsets[-1])
        size = os.path.getsize(self.prefix + ".bin")
        if size != self.num_tokens * self.dtype.itemsize:
            raise ValueError(f"{self.prefix}.bin has {size} bytes but the index expects "
                             f"{self.num_tokens} tokens of {self.dtype.itemsize} bytes")
        self._tokens = (np.asarray(np.memmap(self.prefix + ".bin", dtype=self.dtype, mode="r"))
                        if self.num_tokens else np.empty(0, self.dtype))  # mmap refuses empty files

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        n = len(self)
        i = int(i)
        if not -n <= i < n:
            raise IndexError(f"sentence {i} out of range for {n} sentences")
        i %= n
        return self._tokens[self.offsets[i]: self.offsets[i + 1]]

    @cached_property
    def lengths(self) -> np.ndarray:
        """Tokens per sentence (int32), computed once."""
        return np.diff(self.offsets).astype(np.int32)

    def __reduce__(self):  # pickles (e.g. to Ray workers) as its prefix and reopens there
        return IndexedDataset, (self.prefix,)

    def __repr__(self) -> str:
        return f"IndexedDataset({self.prefix!r}, {len(self)} sentences, {self.num_tokens} tokens, {self.dtype})"


def filter_lengths(src_lengths, tgt_lengths, max_len: int) -> np.ndarray:
    """Indices i with 0 < src_len < max_len and 0 < tgt_len < max_len (the training stages keep these)."""
    s, t = np.asarray(src_lengths), np.asarray(tgt_lengths)
    if s.shape != t.shape:
        raise ValueError(f"{s.shape[0]} source but {t.shape[0]} target lengths")
    return np.flatnonzero((s > 0) & (s < max_len) & (t > 0) & (t < max_len))


def pair_lengths(src_lengths, tgt_lengths) -> np.ndarray:
    """max(len(src), len(tgt)) + 1 per pair: the length batching uses."""
    s, t = np.asarray(src_lengths), np.asarray(tgt_lengths)
    dtype = np.promote_types(np.promote_types(s.dtype, t.dtype), np.int32)  # int32 stays int32
    return np.maximum(s, t).astype(dtype) + 1


def plan_batches(lengths, max_tokens: int, shuffle: bool = False, seed: int = 0,
                 max_sentences: int | None = None) -> list[np.ndarray]:
    """The batches of data.token_batches (same indices, same order) as index arrays (int32 below 2**31 sentences).

    Sentences are sorted by (length, index); a batch grows while count × max(longest, 1) <=
    max_tokens (and count <= max_sentences), and always takes at least one sentence. In that
    order max(length, 1) never decreases, so the cut of a batch is the first position where
    the product goes over: found per batch with one vectorized test on a window of at most
    max_tokens // max(first length, 1) sentences. With shuffle, the batch order is permuted
    exactly as random.Random(seed).shuffle permutes a list of that many batches."""
    lengths = np.asarray(lengths)
    if lengths.dtype.kind not in "iu":
        lengths = lengths.astype(np.int64)
    n = len(lengths)
    order = np.argsort(lengths, kind="stable")
    if n < 2 ** 31:
        order = order.astype(np.int32)  # half the memory of a WMT-sized plan
    eff = np.maximum(lengths[order], 1)
    cap = n if max_sentences is None else max(int(max_sentences), 1)
    cuts, s = [], 0
    while s < n:
        width = int(max(1, min(n - s, max_tokens // int(eff[s]), cap)))
        over = eff[s + 1: s + width] * np.arange(2, width + 1) > max_tokens
        s += 1 + (int(over.argmax()) if over.any() else width - 1)
        cuts.append(s)
    batches = np.split(order, cuts[:-1]) if n else []
    return shuffled(batches, seed) if shuffle else batches


def shuffled(batches: Sequence, seed: int) -> list:
    """The batches in the order random.Random(seed).shuffle gives a list of them: a plan cut
    once (shuffle=False) and shuffled per epoch equals plan_batches(..., shuffle=True, seed)."""
    perm = list(range(len(batches)))
    random.Random(seed).shuffle(perm)
    return [batches[k] for k in perm]


def rank_batches(batches: Sequence, rank: int, world: int) -> list:
    """Whole batches for one rank: batches[rank::world], cut to len(batches) // world so that
    every rank runs the same number of steps. The last len(batches) % world (< world) batches
    are dropped for this pass."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} out of range for world size {world}")
    return list(batches[rank::world][: len(batches) // world])


def collate(src: IndexedDataset, tgt: IndexedDataset, indices, bos_id: int = BOS_ID,
            eos_id: int = EOS_ID, pad_id: int = PAD_ID) -> Batch:
    """The Batch that data.make_batch builds for these pairs (source + EOS; target alone,
    BOS + target, target + EOS; padded with pad_id, width at least 1)."""
    indices = [int(i) for i in indices]
    srcs, tgts = [src[i] for i in indices], [tgt[i] for i in indices]
    if any(len(t) == 0 for t in tgts):
        raise ValueError("empty target sequence in batch")
    s_w = max((len(s) for s in srcs), default=0) + 1
    t_w = max((len(t) for t in tgts), default=0)
    b = len(indices)
    src_a = np.full((b, s_w), pad_id, dtype=np.int64)
    tgt_a = np.full((b, max(t_w, 1)), pad_id, dtype=np.int64)
    tin_a = np.full((b, t_w + 1), pad_id, dtype=np.int64)
    tout_a = np.full((b, t_w + 1), pad_id, dtype=np.int64)
    for r, (s, t) in enumerate(zip(srcs, tgts)):
        src_a[r, : len(s)], src_a[r, len(s)] = s, eos_id
        tgt_a[r, : len(t)] = t
        tin_a[r, 0], tin_a[r, 1: len(t) + 1] = bos_id, t
        tout_a[r, : len(t)], tout_a[r, len(t)] = t, eos_id
    return Batch(*(torch.from_numpy(a) for a in (src_a, tgt_a, tin_a, tout_a)))
