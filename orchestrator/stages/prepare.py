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
"""
from __future__ import annotations

import logging
import random
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from imitate_nat.data import read_parallel

from ..run.files import atomic_write_text
from ..run.runner import StageContext, StageResult
from ..spec.schema import DataSpec

log = logging.getLogger("imitate_orch")

SPLITS = ("train", "valid", "test")
HF_VALID_SPLITS = ("validation", "valid", "dev")
Pairs = tuple[list[str], list[str]]


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


def _carve(train: Pairs, valid_size: int, seed: int) -> tuple[Pairs, Pairs]:
    """Split valid_size pairs off train (seeded sample, corpus order kept on both sides)."""
    n = len(train[0])
    if valid_size >= n:
        raise ValueError(f"data.valid_size={valid_size} needs more than {n} training pairs to carve from")
    chosen = set(_sample_indices(n, valid_size, seed * 1_000_003 + 2))
    valid: Pairs = ([], [])
    rest: Pairs = ([], [])
    for i, pair in enumerate(zip(*train)):
        dest = valid if i in chosen else rest
        dest[0].append(pair[0])
        dest[1].append(pair[1])
    return valid, rest


# ------------------------------------------------------------------------------ sources --

def _load_synthetic(data: DataSpec, seed: int) -> dict[str, Pairs]:
    from imitate_nat.synthetic import write_splits

    syn = data.synthetic
    with tempfile.TemporaryDirectory(prefix="imitate-synthetic-") as tmp:
        paths = write_splits(tmp, syn.train_size, syn.valid_size, syn.test_size, seed=seed,
                             vocab_words=syn.vocab_words, src_lang=data.src_lang, tgt_lang=data.tgt_lang)
        return {split: read_parallel(*map(str, paths[split])) for split in SPLITS}


def _load_files(data: DataSpec, seed: int) -> dict[str, Pairs]:
    train = read_parallel(*data.split_files(data.train_prefix))
    cap = _cap_indices(len(train[0]), data.max_train, seed)
    if cap is not None:
        train = tuple([side[i] for i in cap] for side in train)
    valid_files = data.split_files(data.valid_prefix)
    if all(Path(p).is_file() for p in valid_files):
        valid = read_parallel(*valid_files)
    elif data.valid_size:
        valid, train = _carve(train, data.valid_size, seed)
    else:
        raise FileNotFoundError(f"missing valid file(s) {', '.join(valid_files)} "
                                "(or set data.valid_size to carve valid from train)")
    return {"train": train, "valid": valid, "test": read_parallel(*data.split_files(data.test_prefix))}


def _import_datasets():
    try:
        import datasets
    except ImportError as exc:
        raise ImportError("data.source 'huggingface' needs the `datasets` package: "
                          "pip install datasets  (or pip install -e .[hf])") from exc
    return datasets


def _hf_pairs(ds, data: DataSpec, split: str, indices: Optional[Sequence[int]] = None) -> Pairs:
    """Rows {"translation": {src_lang: ..., tgt_lang: ...}} -> (sources, targets)."""
    if "translation" not in ds.column_names:
        raise ValueError(f"{data.hf_name} split {split!r}: expected a 'translation' column, "
                         f"found {ds.column_names}")
    if indices is not None:
        ds = ds.select(indices)
    src, tgt = [], []
    for batch in ds.iter(batch_size=10_000):
        for row in batch["translation"]:
            try:
                s, t = row[data.src_lang], row[data.tgt_lang]
            except (KeyError, TypeError):
                keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise ValueError(f"{data.hf_name} split {split!r}: a translation has keys {keys}, "
                                 f"need {data.src_lang!r} and {data.tgt_lang!r}") from None
            src.append(s or "")
            tgt.append(t or "")
    return src, tgt


def _load_huggingface(data: DataSpec, seed: int) -> dict[str, Pairs]:
    datasets = _import_datasets()
    local = Path(data.hf_name).expanduser()
    if local.is_dir() and ((local / "dataset_dict.json").is_file() or (local / "state.json").is_file()):
        dd = datasets.load_from_disk(str(local))     # a dataset saved with save_to_disk
    else:
        dd = datasets.load_dataset(data.hf_name, data.hf_config, revision=data.hf_revision,
                                   cache_dir=data.hf_cache_dir)
    if not isinstance(dd, datasets.DatasetDict):
        raise ValueError(f"{data.hf_name}: expected a dataset with train/validation/test splits, "
                         f"got a single {type(dd).__name__}")
    for needed in ("train", "test"):
        if needed not in dd:
            raise ValueError(f"{data.hf_name}: no {needed!r} split (splits: {sorted(dd)})")
    train = _hf_pairs(dd["train"], data, "train", _cap_indices(dd["train"].num_rows, data.max_train, seed))
    valid_split = next((s for s in HF_VALID_SPLITS if s in dd), None)
    if valid_split is not None:
        valid = _hf_pairs(dd[valid_split], data, valid_split)
    elif data.valid_size:
        valid, train = _carve(train, data.valid_size, seed)
    else:
        raise ValueError(f"{data.hf_name}: no validation split (splits: {sorted(dd)}); "
                         "set data.valid_size to carve one from train")
    return {"train": train, "valid": valid, "test": _hf_pairs(dd["test"], data, "test")}


# ----------------------------------------------------------------------------- cleaning --

def clean_train(src: Sequence[str], tgt: Sequence[str], max_tokens: int, max_ratio: float
                ) -> tuple[list[str], list[str], dict[str, int]]:
    """Drop empty / over-long / bad-ratio / duplicate pairs (inputs already normalized)."""
    counts = dict.fromkeys(("dropped_empty", "dropped_length", "dropped_ratio", "dropped_duplicate"), 0)
    seen: set[tuple[str, str]] = set()
    out_s, out_t = [], []
    for s, t in zip(src, tgt):
        ls, lt = len(s.split()), len(t.split())
        if ls == 0 or lt == 0:
            reason = "dropped_empty"
        elif ls > max_tokens or lt > max_tokens:
            reason = "dropped_length"
        elif max(ls, 1) / max(lt, 1) > max_ratio or max(lt, 1) / max(ls, 1) > max_ratio:
            reason = "dropped_ratio"
        elif (s, t) in seen:
            reason = "dropped_duplicate"
        else:
            seen.add((s, t))
            out_s.append(s)
            out_t.append(t)
            continue
        counts[reason] += 1
    return out_s, out_t, counts


# -------------------------------------------------------------------------------- stage --

LOADERS = {"synthetic": _load_synthetic, "files": _load_files, "huggingface": _load_huggingface}


def prepare(ctx: StageContext) -> StageResult:
    data, seed = ctx.spec.data, ctx.spec.seed
    splits = LOADERS[data.source](data, seed)
    splits = {k: ([normalize(x) for x in s], [normalize(x) for x in t]) for k, (s, t) in splits.items()}

    raw = len(splits["train"][0])
    train_src, train_tgt, dropped = clean_train(*splits["train"], data.max_tokens, data.max_ratio)
    if not train_src:
        raise ValueError(f"no training pairs left after cleaning ({raw} read, dropped: {dropped})")
    splits["train"] = (train_src, train_tgt)
    for split in ("valid", "test"):
        if not splits[split][0]:
            raise ValueError(f"the {split} split is empty")

    out_dir = ctx.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs = {}
    for split, (s, t) in splits.items():
        for ext, lines in (("src", s), ("tgt", t)):
            name = f"{split}.{ext}"
            atomic_write_text(out_dir / name, "".join(line + "\n" for line in lines))
            outputs[name] = name

    metrics = {"train_pairs_raw": raw, "train_pairs": len(train_src), **dropped,
               "valid_pairs": len(splits["valid"][0]), "test_pairs": len(splits["test"][0])}
    log.info("prepare (%s %s-%s): train %d -> %d pairs (empty %d, length %d, ratio %d, duplicate %d), "
             "valid %d, test %d", data.source, data.src_lang, data.tgt_lang, raw, len(train_src),
             dropped["dropped_empty"], dropped["dropped_length"], dropped["dropped_ratio"],
             dropped["dropped_duplicate"], metrics["valid_pairs"], metrics["test_pairs"])
    return StageResult(outputs=outputs, metrics=metrics)
