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
import itertools
import json
import os
import random
import shutil
import struct
import uuid
from functools import cached_property
from typing import Iterable, Sequence

import numpy as np
import torch

from .atomic import atomic_write_bytes, atomic_writer
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
        """Appends sentences as add() does, a batch at a time: one array for all their ids, so
        the per-sentence cost is a length, not a numpy call (binarizing is mostly this)."""
        seqs = list(seqs)
        if not seqs:
            return
        lengths = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
        flat = np.asarray(list(itertools.chain.from_iterable(seqs)))
        if flat.size:
            if flat.dtype.kind not in "iu":
                raise TypeError(f"expected sequences of integer ids, got {flat.dtype}")
            lo, hi = int(flat.min()), int(flat.max())
            if lo < 0 or hi >= self.vocab_size:
                raise ValueError(f"token id out of range [0, {self.vocab_size}): {lo if lo < 0 else hi}")
            self._bin.write(flat.astype(self.dtype, copy=False).tobytes())
        self._idx.write((self.num_tokens + np.cumsum(lengths)).astype("<i8").tobytes())
        self.num_tokens += int(lengths.sum())
        self.num_sentences += len(seqs)

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


def write_batch_plan(src_prefix: str | os.PathLike, tgt_prefix: str | os.PathLike, max_len: int,
                     max_tokens: int, out_prefix: str | os.PathLike) -> dict:
    """Plans the training batches of a binarized pair corpus once, for workers to memory-map
    (``BatchPlan``), so that no worker holds per-sentence arrays: pairs with an empty side or
    a side of max_len tokens or more are left out (``filter_lengths``), the rest cut into
    token-bucketed batches (``plan_batches`` on ``pair_lengths``, in length order).

    Writes, each atomically: P.pairs.npy (the pairs' dataset indices, batch after batch; int32
    below 2**31 sentences), P.batches.npy (int64 per batch: its end in P.pairs.npy and its
    target tokens + EOS), then P.json (what the plan is made from; written last, so a
    P.json that matches means the arrays are whole). A plan whose P.json already matches is
    kept as it is. Returns the P.json dict."""
    out_prefix = os.fspath(out_prefix)
    src, tgt = IndexedDataset(src_prefix), IndexedDataset(tgt_prefix)
    if len(src) != len(tgt):
        raise ValueError(f"{src.prefix} holds {len(src)} sentences, {tgt.prefix} {len(tgt)}")
    meta = {"version": 1, "max_len": int(max_len), "max_tokens": int(max_tokens),
            **{side: [os.path.realpath(ds.prefix), len(ds), ds.num_tokens, os.stat(ds.prefix + ".idx").st_mtime_ns]
               for side, ds in (("src", src), ("tgt", tgt))}}
    with contextlib.suppress(OSError, ValueError):
        with open(out_prefix + ".json", encoding="utf-8") as f:
            old = json.load(f)
        if {k: old.get(k) for k in meta} == meta:
            return old
    s_len, t_len = src.lengths, tgt.lengths
    keep = filter_lengths(s_len, t_len, max_len)
    keep = keep.astype(np.int32) if len(src) < 2 ** 31 else keep
    batches = plan_batches(pair_lengths(s_len[keep], t_len[keep]), max_tokens)
    pairs = keep[np.concatenate(batches)] if batches else keep[:0]
    ends = np.cumsum([len(b) for b in batches], dtype=np.int64)
    # target tokens + EOS per batch: one reduction over the pairs in plan order
    tokens = np.add.reduceat(t_len[pairs].astype(np.int64) + 1, np.r_[0, ends[:-1]]) if batches else ends
    with atomic_writer(out_prefix + ".pairs.npy", "wb") as f:
        np.save(f, pairs)
    with atomic_writer(out_prefix + ".batches.npy", "wb") as f:
        np.save(f, np.stack([ends, tokens], axis=1) if batches else np.empty((0, 2), np.int64))
    meta.update(pairs=len(pairs), batches=len(batches))
    atomic_write_bytes(out_prefix + ".json", (json.dumps(meta, indent=1) + "\n").encode())
    return meta


class BatchPlan:
    """A plan written by ``write_batch_plan``, opened read-only: the pair indices stay on disk
    (memory-mapped; a worker reads the pages of its own batches), the per-batch ends and
    token counts (16 bytes a batch) are in memory."""

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = os.fspath(prefix)
        with open(self.prefix + ".json", encoding="utf-8") as f:
            self.meta = json.load(f)
        table = np.load(self.prefix + ".batches.npy")
        self.ends, self.tokens = table[:, 0].copy(), table[:, 1].copy()
        self.pairs = (np.load(self.prefix + ".pairs.npy", mmap_mode="r") if self.meta["pairs"]
                      else np.empty(0, np.int32))  # mmap refuses empty files
        if len(self.ends) != self.meta["batches"] or len(self.pairs) != self.meta["pairs"]:
            raise ValueError(f"{self.prefix}: the plan's arrays do not match its .json")

    def __len__(self) -> int:
        return len(self.ends)

    @property
    def num_pairs(self) -> int:
        return len(self.pairs)

    def __getitem__(self, k: int) -> np.ndarray:
        """The dataset indices of batch k."""
        k = int(k)
        return np.asarray(self.pairs[(self.ends[k - 1] if k else 0): self.ends[k]])

    def __reduce__(self):  # pickles as its prefix and reopens there
        return BatchPlan, (self.prefix,)


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
