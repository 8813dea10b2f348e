"""The prepare stage's data sources: each split as a stream of raw (source, target) pairs.

data.source is one of
* synthetic: a generated toy language pair (imitate_nat/synthetic.py);
* files: <dir>/<prefix>.<lang>, one sentence a line, parallel by line number;
* huggingface: `datasets.load_dataset(hf_name, hf_config, data_files=hf_data_files, ...)` (a Hub
  dataset, or a builder such as json/csv/parquet reading local or remote files), or a local
  `save_to_disk` folder as hf_name. Rows are {"translation": {src_lang: ..., tgt_lang: ...}},
  or two text columns named by data.hf_src_column / data.hf_tgt_column.

data.extra_train lists more training corpora, each read like a files or huggingface source
(its train split only). The train stream is the source's train split followed by each extra
corpus, in order; data.max_train samples from that whole stream and data.valid_size carves
from it (both seeded, corpus order kept). valid and test come from the source alone.

Nothing holds a whole split: files are counted (a byte scan) and then streamed, Arrow datasets
are memory-mapped and iterated in batches.
"""
from __future__ import annotations

import contextlib
import importlib
import itertools
import random
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

from imitate_nat.data import count_lines, iter_lines

from ..spec.data import CorpusSpec, DataSpec

HF_VALID_SPLITS = ("validation", "valid", "dev")
Pair = tuple[str, str]


# ------------------------------------------------------------------------------ helpers --

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


# ---------------------------------------------------------------------------- the shape --

@dataclass
class Corpus:
    """A train corpus: its number of pairs, and `read(positions)`: its pairs at those increasing
    positions (None: all), streamed."""
    size: int
    read: Callable[[Optional[np.ndarray]], Iterator[Pair]]


@dataclass
class _Splits:
    """What a data source has: its train corpus and its valid (None: none) and test streams."""
    train: Corpus
    valid: Optional[Iterable[Pair]]
    test: Iterable[Pair]
    no_valid: Optional[Exception] = None   # raised when valid is None and data.valid_size is unset


@dataclass
class Source:
    """The splits prepare writes, as streams of raw pairs."""
    train: Iterable[Pair]             # every train corpus in order, data.max_train applied
    valid: Optional[Iterable[Pair]]   # None: carve it from train at `carve`
    test: Iterable[Pair]
    carve: Optional[np.ndarray] = None


def load_source(data: DataSpec, seed: int, stack: contextlib.ExitStack) -> Source:
    """data's source and extra train corpora as one Source (temp files live as long as `stack`).
    Every corpus is opened (and its layout checked) here, before anything is written."""
    splits = LOADERS[data.source](data, seed, stack)
    extras = [EXTRA_LOADERS[c.source](c, data, f"data.extra_train[{i}]") for i, c in enumerate(data.extra_train)]
    n, train = _train_stream([splits.train, *extras], data.max_train, seed)
    if splits.valid is not None:
        return Source(train, splits.valid, splits.test)
    if not data.valid_size:
        raise splits.no_valid
    return Source(train, None, splits.test, _carve_positions(n, data.valid_size, seed))


def _train_stream(corpora: Sequence[Corpus], max_train: Optional[int], seed: int) -> tuple[int, Iterator[Pair]]:
    """The corpora's pairs one after the other, at most max_train of them (a seeded sample of
    positions in the whole stream): (how many, the stream)."""
    sizes = [c.size for c in corpora]
    cap = _cap_indices(sum(sizes), max_train, seed)
    if cap is None:
        return sum(sizes), itertools.chain.from_iterable(c.read(None) for c in corpora)
    cap = np.asarray(cap, dtype=np.int64)              # 8 bytes a sampled pair, not ~36
    starts = np.cumsum([0, *sizes])                     # each corpus's first position in the stream
    bounds = np.searchsorted(cap, starts)
    parts = [cap[bounds[i]:bounds[i + 1]] - starts[i] for i in range(len(corpora))]
    return len(cap), itertools.chain.from_iterable(c.read(p) for c, p in zip(corpora, parts) if p.size)


# -------------------------------------------------------------------- synthetic, files --

def _load_synthetic(data: DataSpec, seed: int, stack: contextlib.ExitStack) -> _Splits:
    from imitate_nat.synthetic import write_splits

    syn = data.synthetic
    tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="imitate-synthetic-"))
    paths = write_splits(tmp, syn.train_size, syn.valid_size, syn.test_size, seed=seed,
                         vocab_words=syn.vocab_words, src_lang=data.src_lang, tgt_lang=data.tgt_lang)
    train = Corpus(_count_parallel(*paths["train"]), partial(_read_pairs, *paths["train"]))
    return _Splits(train, _read_pairs(*paths["valid"]), _read_pairs(*paths["test"]))


def _files_corpus(corpus: CorpusSpec, data: DataSpec, where: str = "data") -> Corpus:
    """The train split of a files corpus (data's own or one of data.extra_train). `where` (as
    for the huggingface loader) is not needed: errors name the corpus's file paths."""
    src, tgt = corpus.files_of(corpus.train_prefix, data.src_lang, data.tgt_lang)
    return Corpus(_count_parallel(src, tgt), partial(_read_pairs, src, tgt))


def _load_files(data: DataSpec, seed: int, stack: contextlib.ExitStack) -> _Splits:
    train = _files_corpus(data, data)
    valid_files = data.split_files(data.valid_prefix)
    valid = None
    if all(Path(p).is_file() for p in valid_files):
        _count_parallel(*valid_files)
        valid = _read_pairs(*valid_files)
    test_files = data.split_files(data.test_prefix)
    _count_parallel(*test_files)
    no_valid = FileNotFoundError(f"missing valid file(s) {', '.join(valid_files)} "
                                 "(or set data.valid_size to carve valid from train)")
    return _Splits(train, valid, _read_pairs(*test_files), no_valid)


# -------------------------------------------------------------------------- huggingface --

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


def _hub_unreachable(corpus: CorpusSpec, where: str, cache: str, error: BaseException) -> HubUnreachable:
    name = f"{corpus.hf_name!r}" + (f" (config {corpus.hf_config!r})" if corpus.hf_config else "")
    return HubUnreachable(
        f"{where}.hf_name {name}: the Hugging Face Hub cannot be reached and the dataset is not in the "
        f"cache {cache} ({type(error).__name__}: {error}). Without the Hub, either: "
        "1) fill a cache where the Hub is reachable (datasets.load_dataset with cache_dir=DIR), "
        "copy DIR here, set data.hf_cache_dir=DIR and run with HF_DATASETS_OFFLINE=1; "
        "2) save the dataset there with DatasetDict.save_to_disk(DIR), copy DIR here and set "
        "data.hf_name=DIR; or 3) write the splits as text files and use data.source=files with "
        "data.dir=DIR (<prefix>.<lang>, one sentence a line).")


def _load_dataset_dict(corpus: CorpusSpec, where: str):
    """The corpus's DatasetDict: a local save_to_disk folder, else `datasets.load_dataset`."""
    datasets = _import_datasets()
    local = Path(corpus.hf_name).expanduser()
    if local.is_dir() and ((local / "dataset_dict.json").is_file() or (local / "state.json").is_file()):
        dd = datasets.load_from_disk(str(local))
    else:
        try:
            dd = datasets.load_dataset(corpus.hf_name, corpus.hf_config, data_files=corpus.hf_data_files,
                                       revision=corpus.hf_revision, cache_dir=corpus.hf_cache_dir)
        except _offline_errors() as exc:
            cache = corpus.hf_cache_dir or datasets.config.HF_DATASETS_CACHE
            raise _hub_unreachable(corpus, where, cache, exc) from exc
    if not isinstance(dd, datasets.DatasetDict):
        raise ValueError(f"{corpus.hf_name}: expected a dataset with train/validation/test splits, "
                         f"got a single {type(dd).__name__}")
    return dd


def _hf_text(value) -> str:
    return "" if value is None else str(value)


def _hf_corpus(ds, corpus: CorpusSpec, data: DataSpec, name: str) -> Corpus:
    """A split's rows as a Corpus of (source, target): the translation column's src_lang and
    tgt_lang, or the columns hf_src_column and hf_tgt_column. The columns are checked now."""
    columns = [corpus.hf_src_column, corpus.hf_tgt_column] if corpus.hf_src_column else ["translation"]
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        hint = "" if corpus.hf_src_column else "; name the text columns with data.hf_src_column and hf_tgt_column"
        raise ValueError(f"{name}: no column {', '.join(map(repr, missing))} (columns: {ds.column_names}){hint}")

    def translations(batch) -> Iterator[Pair]:
        for row in batch["translation"]:
            try:
                yield _hf_text(row[data.src_lang]), _hf_text(row[data.tgt_lang])
            except (KeyError, TypeError):
                keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise ValueError(f"{name}: a translation has keys {keys}, "
                                 f"need {data.src_lang!r} and {data.tgt_lang!r}") from None

    def text_columns(batch) -> Iterator[Pair]:
        for s, t in zip(batch[corpus.hf_src_column], batch[corpus.hf_tgt_column]):
            yield _hf_text(s), _hf_text(t)

    def read(indices: Optional[np.ndarray] = None) -> Iterator[Pair]:
        rows = ds if indices is None else ds.select(indices)
        pairs_of = text_columns if corpus.hf_src_column else translations
        for batch in rows.iter(batch_size=10_000):
            yield from pairs_of(batch)
    return Corpus(ds.num_rows, read)


def _hf_train_corpus(corpus: CorpusSpec, data: DataSpec, where: str) -> Corpus:
    """The train split of one of data.extra_train from the huggingface source."""
    dd = _load_dataset_dict(corpus, where)
    if "train" not in dd:
        raise ValueError(f"{where} {corpus.hf_name}: no 'train' split (splits: {sorted(dd)})")
    return _hf_corpus(dd["train"], corpus, data, f"{where} {corpus.hf_name} split 'train'")


def _load_huggingface(data: DataSpec, seed: int, stack: contextlib.ExitStack) -> _Splits:
    dd = _load_dataset_dict(data, "data")
    for needed in ("train", "test"):
        if needed not in dd:
            raise ValueError(f"{data.hf_name}: no {needed!r} split (splits: {sorted(dd)})")
    split = {name: _hf_corpus(dd[name], data, data, f"{data.hf_name} split {name!r}")
             for name in ("train", *HF_VALID_SPLITS, "test") if name in dd}
    valid = next((split[name].read(None) for name in HF_VALID_SPLITS if name in split), None)
    no_valid = ValueError(f"{data.hf_name}: no validation split (splits: {sorted(dd)}); "
                          "set data.valid_size to carve one from train")
    return _Splits(split["train"], valid, split["test"].read(None), no_valid)


LOADERS = {"synthetic": _load_synthetic, "files": _load_files, "huggingface": _load_huggingface}
EXTRA_LOADERS = {"files": _files_corpus, "huggingface": _hf_train_corpus}
