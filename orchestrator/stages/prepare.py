"""prepare: read the data source named by the spec, normalize, clean train, write the splits.

Outputs (in the stage dir): train.src train.tgt valid.src valid.tgt test.src test.tgt, one
sentence a line, parallel by line number.

* Every line is normalized: stripped, and every run of whitespace (tabs, CR, stray newlines,
  Unicode spaces/line separators) collapsed to one space, so a sentence is always one line.
* Only train is cleaned, in this order per pair: an empty side (dropped_empty), more than
  data.max_tokens whitespace tokens on a side (dropped_length), a token-length ratio above
  data.max_ratio (dropped_ratio), an exact (src, tgt) repeat of a kept pair
  (dropped_duplicate; the first occurrence stays). Kept pairs keep their order.
* valid/test are never filtered (scores stay comparable with published ones); empty lines
  there are kept, so both sides stay aligned.
* Train is the source's train split followed by each of data.extra_train, in order; the
  sources and how they are read: stages/sources.py.
* data.max_train: at most that many pairs are taken from all train corpora together, a random
  sample (seeded with spec.seed) kept in corpus order, before valid carving and cleaning.
* data.valid_size with no valid split (files: missing <valid_prefix> files; huggingface: no
  validation split): that many pairs are carved from train (seeded random sample, corpus
  order), before cleaning; they are not in train.

Memory (corpora of tens of millions of pairs): nothing holds a whole split. Every split is
streamed pair by pair from its source into temp files that are renamed into place only when
the stage succeeds (on an error the old outputs stay). What grows with the corpus:

* the duplicate filter: one 64-bit hash per kept train pair, in sorted numpy runs (_SeenHashes),
  8 bytes a pair (16 while the largest runs merge): ~36 MB for WMT14's 4.5M pairs;
* with data.max_train below the corpus size, the sorted sample of kept line numbers: 8 bytes
  each while streaming. Drawing it (random.sample, kept so that the sample stays the same)
  briefly takes ~120 bytes per sampled line, or ~40 per corpus line when max_train is more
  than about a twelfth of the corpus;
* with carving, the data.valid_size sampled positions.
Train pairs that pass the other filters are buffered CHUNK at a time for the hash lookup.
The files source counts lines first (a byte scan), for max_train and carving, then streams.
The huggingface source streams rows from the (memory-mapped) Arrow dataset.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
from typing import IO, Optional

import numpy as np

from imitate_nat.atomic import atomic_writer

from ..run.runner import StageContext, StageResult
from .sources import Pair, load_source

log = logging.getLogger("imitate_orch")

SPLITS = ("train", "valid", "test")
DROP_REASONS = ("dropped_empty", "dropped_length", "dropped_ratio", "dropped_duplicate")
CHUNK = 8192          # train pairs buffered per duplicate lookup (a few MB of strings)


# ------------------------------------------------------------------------------ helpers --

def normalize(line: str) -> str:
    """Strip and collapse all whitespace (incl. tabs, CR, U+2028) to single spaces."""
    return " ".join(line.split())


# ----------------------------------------------------------------------------- cleaning --

def drop_reason(src_tokens: int, tgt_tokens: int, max_tokens: int, max_ratio: float) -> Optional[str]:
    """Why a train pair with these whitespace-token counts is dropped (the filters before the
    duplicate check), or None to keep it."""
    ls, lt = src_tokens, tgt_tokens
    if ls == 0 or lt == 0:
        return "dropped_empty"
    if ls > max_tokens or lt > max_tokens:
        return "dropped_length"
    if max(ls, 1) / max(lt, 1) > max_ratio or max(lt, 1) / max(ls, 1) > max_ratio:
        return "dropped_ratio"
    return None


def pair_digest(src: str, tgt: str) -> bytes:
    """A 64-bit hash of a normalized pair. Normalized sentences contain no tab (normalize turns
    every whitespace run, tabs included, into one space), so "\\t" separates the sides
    unambiguously. Two different pairs share a hash with probability ~n²/2**65 for n pairs
    (~6e-7 for 4.5M pairs, ~4e-5 for 40M); a clash would drop one unique pair as a duplicate."""
    return hashlib.blake2b(f"{src}\t{tgt}".encode("utf-8"), digest_size=8).digest()


class _SeenHashes:
    """A set of uint64 hashes as a few sorted numpy runs (a small log-structured merge tree).

    8 bytes an element (16 for the elements of the two runs being merged, briefly: the runs
    and their concatenation), where a Python set of ints takes ~70-90 bytes. Lookups are
    vectorized binary searches, one per run; runs merge when the older one is at most twice
    the newer one, so there are O(log(n / CHUNK)) runs."""

    def __init__(self):
        self.runs: list[np.ndarray] = []

    def __len__(self) -> int:
        return sum(r.size for r in self.runs)

    def add_new(self, hashes: np.ndarray) -> np.ndarray:
        """Mask of the hashes seen neither earlier in this array nor in an earlier call;
        those are added."""
        order = np.argsort(hashes, kind="stable")    # equal hashes keep their input order
        keys = hashes[order]
        fresh = np.ones(keys.size, dtype=bool)
        fresh[1:] = keys[1:] != keys[:-1]                # first occurrence within this array
        for run in self.runs:                            # sorted keys make searchsorted fast
            pos = np.searchsorted(run, keys)
            pos[pos == run.size] = 0
            fresh &= run[pos] != keys
        if fresh.any():
            self.runs.append(keys[fresh])                # sorted already
        new = np.empty(hashes.size, dtype=bool)
        new[order] = fresh
        while len(self.runs) > 1 and self.runs[-2].size <= 2 * self.runs[-1].size:
            merged = np.concatenate(self.runs[-2:])
            del self.runs[-2:]                  # only `merged` holds the values from here on
            merged.sort(kind="stable")          # timsort: a linear merge of the two runs
            self.runs.append(merged)
        return new


class _TrainCleaner:
    """The train filters, streaming: raw pairs go in one at a time, kept pairs are written
    to src_out/tgt_out normalized and in order. Call flush() at the end."""

    def __init__(self, src_out: IO[str], tgt_out: IO[str], max_tokens: int, max_ratio: float):
        self.src_out, self.tgt_out = src_out, tgt_out
        self.max_tokens, self.max_ratio = max_tokens, max_ratio
        self.counts = dict.fromkeys(DROP_REASONS, 0)
        self.raw = self.kept = 0
        self.seen = _SeenHashes()
        self._pairs: list[Pair] = []
        self._digests: list[bytes] = []

    def add(self, src: str, tgt: str) -> None:
        self.raw += 1
        src_words, tgt_words = src.split(), tgt.split()
        reason = drop_reason(len(src_words), len(tgt_words), self.max_tokens, self.max_ratio)
        if reason is not None:
            self.counts[reason] += 1
            return
        src, tgt = " ".join(src_words), " ".join(tgt_words)    # = normalize(src), normalize(tgt)
        self._pairs.append((src, tgt))
        self._digests.append(pair_digest(src, tgt))
        if len(self._pairs) >= CHUNK:
            self.flush()

    def flush(self) -> None:
        if not self._pairs:
            return
        new = self.seen.add_new(np.frombuffer(b"".join(self._digests), dtype="<u8"))
        write_src, write_tgt = self.src_out.write, self.tgt_out.write
        for (src, tgt), keep in zip(self._pairs, new.tolist()):
            if keep:
                write_src(src + "\n")
                write_tgt(tgt + "\n")
        n_new = int(new.sum())
        self.kept += n_new
        self.counts["dropped_duplicate"] += len(self._pairs) - n_new
        self._pairs, self._digests = [], []


def _write_pair(src_out: IO[str], tgt_out: IO[str], src: str, tgt: str) -> None:
    src_out.write(normalize(src) + "\n")
    tgt_out.write(normalize(tgt) + "\n")


# -------------------------------------------------------------------------------- stage --

def prepare(ctx: StageContext) -> StageResult:
    data, seed = ctx.spec.data, ctx.spec.seed
    out_dir = ctx.out_dir
    names = [f"{split}.{ext}" for split in SPLITS for ext in ("src", "tgt")]
    # Everything is written to temp files that replace the outputs when the block ends
    # normally; any error below (incl. the checks at the end) removes them instead.
    with contextlib.ExitStack() as stack:
        source = load_source(data, seed, stack)
        out = {name: stack.enter_context(atomic_writer(out_dir / name)) for name in names}
        cleaner = _TrainCleaner(out["train.src"], out["train.tgt"], data.max_tokens, data.max_ratio)
        sizes = {"valid": 0, "test": 0}
        if source.carve is None:
            for src, tgt in source.train:
                cleaner.add(src, tgt)
        else:
            carve = iter(source.carve.tolist())
            nxt = next(carve, -1)
            for i, (src, tgt) in enumerate(source.train):
                if i == nxt:
                    _write_pair(out["valid.src"], out["valid.tgt"], src, tgt)
                    sizes["valid"] += 1
                    nxt = next(carve, -1)
                else:
                    cleaner.add(src, tgt)
        cleaner.flush()
        for split in ("valid", "test"):
            pairs = getattr(source, split)
            for src, tgt in (pairs if pairs is not None else ()):
                _write_pair(out[f"{split}.src"], out[f"{split}.tgt"], src, tgt)
                sizes[split] += 1

        raw, dropped = cleaner.raw, cleaner.counts
        if not cleaner.kept:
            raise ValueError(f"no training pairs left after cleaning ({raw} read, dropped: {dropped})")
        for split in ("valid", "test"):
            if not sizes[split]:
                raise ValueError(f"the {split} split is empty")

    outputs = {name: name for name in names}
    metrics = {"train_pairs_raw": raw, "train_pairs": cleaner.kept, **dropped,
               "valid_pairs": sizes["valid"], "test_pairs": sizes["test"]}
    log.info("prepare (%s %s-%s): train %d -> %d pairs (empty %d, length %d, ratio %d, duplicate %d), "
             "valid %d, test %d", data.source, data.src_lang, data.tgt_lang, raw, cleaner.kept,
             dropped["dropped_empty"], dropped["dropped_length"], dropped["dropped_ratio"],
             dropped["dropped_duplicate"], metrics["valid_pairs"], metrics["test_pairs"])
    return StageResult(outputs=outputs, metrics=metrics)
