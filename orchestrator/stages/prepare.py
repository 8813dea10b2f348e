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
* data.max_train: at most that many pairs are taken from the source's train split, a random
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
import importlib
import logging
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterable, Iterator, Optional, Sequence

import numpy as np

from imitate_nat.atomic import atomic_writer
from imitate_nat.data import count_lines, iter_lines

from ..run.runner import StageContext, StageResult
from ..spec.schema import DataSpec

log = logging.getLogger("imitate_orch")

SPLITS = ("train", "valid", "test")
HF_VALID_SPLITS = ("validation", "valid", "dev")
DROP_REASONS = ("dropped_empty", "dropped_length", "dropped_ratio", "dropped_duplicate")
CHUNK = 8192          # train pairs buffered per duplicate lookup (a few MB of strings)
Pair = tuple[str, str]


# ------------------------------------------------------------------------------ helpers --

def normalize(line: str) -> str:
    """Strip and collapse all whitespace (incl. tabs, CR, U+2028) to single spaces."""
    return " ".join(line.split())


def _sample_indices(n: int, k: int, seed: int) -> list[int]:
    """k of range(n), a seeded random sample, in increasing order."""
    return sorted(random.Random(seed).sample(range(n), k))


def _cap_indices(n: int, max_train: Optional[int], seed: int) -> Optional[list[int]]:
    if max_train is None or n <= max_train:
        return None
    return _sample_indices(n, max_train, seed * 1_000_003 + 1)


def _carve_positions(n: int, valid_size: int, seed: int) -> np.ndarray:
    """Positions (in the train stream, after max_train) of the valid_size pairs carved off."""
    if valid_size >= n:
        raise ValueError(f"data.valid_size={valid_size} needs more than {n} training pairs to carve from")
    return np.asarray(_sample_indices(n, valid_size, seed * 1_000_003 + 2), dtype=np.int64)


def _select(items: Iterable, indices: Sequence[int]) -> Iterator:
    """The items at the given increasing positions, streamed."""
    wanted = map(int, indices)
    nxt = next(wanted, None)
    if nxt is None:
        return
    for i, item in enumerate(items):
        if i == nxt:
            yield item
            nxt = next(wanted, None)
            if nxt is None:
                return


def _count_parallel(src_path: str, tgt_path: str) -> int:
    """The number of pairs, with read_parallel's check that both sides have as many lines."""
    n_src, n_tgt = count_lines(src_path), count_lines(tgt_path)
    if n_src != n_tgt:
        raise ValueError(f"{src_path} has {n_src} lines but {tgt_path} has {n_tgt}")
    return n_src


def _read_pairs(src_path, tgt_path, indices: Optional[Sequence[int]] = None) -> Iterator[Pair]:
    pairs = zip(iter_lines(src_path), iter_lines(tgt_path))
    return pairs if indices is None else _select(pairs, indices)


# ------------------------------------------------------------------------------ sources --

@dataclass
class _Source:
    """A data source's splits as streams of raw (source, target) pairs."""
    train: Iterable[Pair]             # corpus order, data.max_train already applied
    valid: Optional[Iterable[Pair]]   # None: carve it from train at `carve`
    test: Iterable[Pair]
    carve: Optional[np.ndarray] = None


def _load_synthetic(data: DataSpec, seed: int, stack: contextlib.ExitStack) -> _Source:
    from imitate_nat.synthetic import write_splits

    syn = data.synthetic
    tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="imitate-synthetic-"))
    paths = write_splits(tmp, syn.train_size, syn.valid_size, syn.test_size, seed=seed,
                         vocab_words=syn.vocab_words, src_lang=data.src_lang, tgt_lang=data.tgt_lang)
    return _Source(*(_read_pairs(*paths[split]) for split in SPLITS))


def _load_files(data: DataSpec, seed: int, stack: contextlib.ExitStack) -> _Source:
    train_files = data.split_files(data.train_prefix)
    n = _count_parallel(*train_files)
    cap = _cap_indices(n, data.max_train, seed)
    if cap is not None:
        n, cap = len(cap), np.asarray(cap, dtype=np.int64)   # 8 bytes a line, not ~36
    train = _read_pairs(*train_files, cap)
    valid_files = data.split_files(data.valid_prefix)
    valid, carve = None, None
    if all(Path(p).is_file() for p in valid_files):
        _count_parallel(*valid_files)
        valid = _read_pairs(*valid_files)
    elif data.valid_size:
        carve = _carve_positions(n, data.valid_size, seed)
    else:
        raise FileNotFoundError(f"missing valid file(s) {', '.join(valid_files)} "
                                "(or set data.valid_size to carve valid from train)")
    test_files = data.split_files(data.test_prefix)
    _count_parallel(*test_files)
    return _Source(train, valid, _read_pairs(*test_files), carve)


def _import_datasets():
    try:
        import datasets
    except ImportError as exc:
        raise ImportError("data.source 'huggingface' needs the `datasets` package: "
                          "pip install datasets  (or pip install -e .[hf])") from exc
    return datasets


class HubUnreachable(ConnectionError):
    """No Hugging Face Hub (offline mode or no network) and the dataset is not cached."""


def _offline_errors() -> tuple[type[BaseException], ...]:
    """What `load_dataset` raises without the Hub: `datasets` wraps its lookup's errors in
    ConnectionError, a download that loses the network raises the HTTP libraries' own. HTTP
    status errors (a wrong name, a gated dataset) are left out: they need another fix."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, names in (("huggingface_hub.errors", ("LocalEntryNotFoundError",)),
                          ("requests.exceptions", ("ConnectionError", "Timeout")),
                          ("httpx", ("TransportError",)), ("httpx2", ("TransportError",))):
        with contextlib.suppress(ImportError):
            mod = importlib.import_module(module)
            errors += [getattr(mod, name) for name in names if hasattr(mod, name)]
    return tuple(errors)


def _hub_unreachable(data: DataSpec, cache: str, error: BaseException) -> HubUnreachable:
    name = f"{data.hf_name!r}" + (f" (config {data.hf_config!r})" if data.hf_config else "")
    return HubUnreachable(
        f"data.hf_name {name}: the Hugging Face Hub cannot be reached and the dataset is not in the "
        f"cache {cache} ({type(error).__name__}: {error}). Without the Hub, either: "
        "1) fill a cache where the Hub is reachable (datasets.load_dataset with cache_dir=DIR), "
        "copy DIR here, set data.hf_cache_dir=DIR and run with HF_DATASETS_OFFLINE=1; "
        "2) save the dataset there with DatasetDict.save_to_disk(DIR), copy DIR here and set "
        "data.hf_name=DIR; or 3) write the splits as text files and use data.source=files with "
        "data.dir=DIR (<prefix>.<lang>, one sentence a line).")


def _hf_pairs(ds, data: DataSpec, split: str, indices: Optional[Sequence[int]] = None) -> Iterator[Pair]:
    """Rows {"translation": {src_lang: ..., tgt_lang: ...}} -> a stream of (source, target)."""
    if "translation" not in ds.column_names:
        raise ValueError(f"{data.hf_name} split {split!r}: expected a 'translation' column, "
                         f"found {ds.column_names}")
    if indices is not None:
        ds = ds.select(indices)

    def rows() -> Iterator[Pair]:
        for batch in ds.iter(batch_size=10_000):
            for row in batch["translation"]:
                try:
                    s, t = row[data.src_lang], row[data.tgt_lang]
                except (KeyError, TypeError):
                    keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                    raise ValueError(f"{data.hf_name} split {split!r}: a translation has keys {keys}, "
                                     f"need {data.src_lang!r} and {data.tgt_lang!r}") from None
                yield s or "", t or ""
    return rows()


def _load_huggingface(data: DataSpec, seed: int, stack: contextlib.ExitStack) -> _Source:
    datasets = _import_datasets()
    local = Path(data.hf_name).expanduser()
    if local.is_dir() and ((local / "dataset_dict.json").is_file() or (local / "state.json").is_file()):
        dd = datasets.load_from_disk(str(local))     # a dataset saved with save_to_disk
    else:
        try:
            dd = datasets.load_dataset(data.hf_name, data.hf_config, revision=data.hf_revision,
                                       cache_dir=data.hf_cache_dir)
        except _offline_errors() as exc:
            raise _hub_unreachable(data, data.hf_cache_dir or datasets.config.HF_DATASETS_CACHE, exc) from exc
    if not isinstance(dd, datasets.DatasetDict):
        raise ValueError(f"{data.hf_name}: expected a dataset with train/validation/test splits, "
                         f"got a single {type(dd).__name__}")
    for needed in ("train", "test"):
        if needed not in dd:
            raise ValueError(f"{data.hf_name}: no {needed!r} split (splits: {sorted(dd)})")
    cap = _cap_indices(dd["train"].num_rows, data.max_train, seed)
    n = dd["train"].num_rows if cap is None else len(cap)
    train = _hf_pairs(dd["train"], data, "train", cap)
    valid_split = next((s for s in HF_VALID_SPLITS if s in dd), None)
    valid, carve = None, None
    if valid_split is not None:
        valid = _hf_pairs(dd[valid_split], data, valid_split)
    elif data.valid_size:
        carve = _carve_positions(n, data.valid_size, seed)
    else:
        raise ValueError(f"{data.hf_name}: no validation split (splits: {sorted(dd)}); "
                         "set data.valid_size to carve one from train")
    return _Source(train, valid, _hf_pairs(dd["test"], data, "test"), carve)


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

LOADERS = {"synthetic": _load_synthetic, "files": _load_files, "huggingface": _load_huggingface}


def prepare(ctx: StageContext) -> StageResult:
    data, seed = ctx.spec.data, ctx.spec.seed
    out_dir = ctx.out_dir
    names = [f"{split}.{ext}" for split in SPLITS for ext in ("src", "tgt")]
    # Everything is written to temp files that replace the outputs when the block ends
    # normally; any error below (incl. the checks at the end) removes them instead.
    with contextlib.ExitStack() as stack:
        source = LOADERS[data.source](data, seed, stack)
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
