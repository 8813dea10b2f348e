"""The job spec's `data` section: where the corpus comes from and how train is cleaned
(read by the prepare stage, orchestrator/stages/prepare.py and sources.py)."""
from __future__ import annotations

import glob
import os
from typing import Any, Literal, Optional

from pydantic import Field, field_validator, model_serializer, model_validator

from .base import FieldError, _Section


class SyntheticSpec(_Section):
    train_size: int = Field(20000, gt=0)
    valid_size: int = Field(500, gt=0)
    test_size: int = Field(500, gt=0)
    vocab_words: int = Field(300, gt=0)


def _local_path(v: str) -> bool:
    """A path on this machine, not a URL (http://, hf://, s3://, ...) the `datasets` library fetches."""
    return "://" not in v


class CorpusSpec(_Section):
    """Where a corpus is read from with the files or huggingface source: the fields data's own
    source reads, and all that an entry of data.extra_train has (an extra corpus gives its train
    split only; the languages are data's)."""

    source: Literal["files", "huggingface"] = "files"
    # files: <dir>/<prefix>.<lang>, one sentence per line, parallel by line number.
    dir: Optional[str] = None
    train_prefix: str = "train"
    # huggingface: datasets.load_dataset(hf_name, hf_config, data_files=hf_data_files,
    # revision=hf_revision), or datasets.load_from_disk(hf_name) for a local save_to_disk folder.
    hf_name: Optional[str] = None
    hf_config: Optional[str] = None
    hf_revision: Optional[str] = None
    hf_cache_dir: Optional[str] = None
    # Files a builder (hf_name: json, csv, parquet, ...) reads, by split: {"train": "x.jsonl"};
    # a split may list several files or globs; local paths are pinned absolute, URLs kept.
    hf_data_files: Optional[dict[str, list[str]]] = None
    # The columns holding the source and target text, for rows that are not
    # {"translation": {src_lang: ..., tgt_lang: ...}} (None: that layout).
    hf_src_column: Optional[str] = Field(None, min_length=1)
    hf_tgt_column: Optional[str] = Field(None, min_length=1)

    @field_validator("dir")
    @classmethod
    def _absolute(cls, v: Optional[str]) -> Optional[str]:
        # Resolved against the CWD now, so later stages on other processes see the same path.
        return os.path.abspath(os.path.expanduser(v)) if v else v

    @field_validator("hf_name")
    @classmethod
    def _absolute_if_local(cls, v: Optional[str]) -> Optional[str]:
        # A local save_to_disk folder is a path: pin it like data.dir. A hub name stays as is.
        return os.path.abspath(os.path.expanduser(v)) if v and os.path.isdir(os.path.expanduser(v)) else v

    @field_validator("hf_data_files", mode="before")
    @classmethod
    def _one_file_is_a_list(cls, v: Any) -> Any:
        return {k: [f] if isinstance(f, str) else f for k, f in v.items()} if isinstance(v, dict) else v

    @field_validator("hf_data_files")
    @classmethod
    def _local_files_found(cls, v: Optional[dict[str, list[str]]]) -> Optional[dict[str, list[str]]]:
        if v is None:
            return v
        pinned = {split: [os.path.abspath(os.path.expanduser(f)) if _local_path(f) else f for f in files]
                  for split, files in v.items()}
        for split, files in pinned.items():
            missing = [f for f in files if _local_path(f) and not glob.glob(f, recursive=True)]
            if not files or missing:
                raise ValueError(f"{split}: no file matches {', '.join(missing) or '[]'}")
        return pinned

    @model_validator(mode="after")
    def _check_corpus(self) -> "CorpusSpec":
        if (self.hf_src_column is None) != (self.hf_tgt_column is None):
            missing = "hf_tgt_column" if self.hf_tgt_column is None else "hf_src_column"
            raise FieldError(missing, "hf_src_column and hf_tgt_column are set together (or neither)")
        if self.source == "huggingface" and not self.hf_name:
            raise FieldError("hf_name", "required when source is 'huggingface'")
        if self.source == "files":
            if not self.dir:
                raise FieldError("dir", "required when source is 'files'")
            if not os.path.isdir(self.dir):
                raise FieldError("dir", f"directory not found: {self.dir}")
        return self

    def files_of(self, prefix: str, src_lang: str, tgt_lang: str) -> tuple[str, str]:
        """(source file, target file) of one split for source=files."""
        return tuple(os.path.join(self.dir or "", f"{prefix}.{lang}") for lang in (src_lang, tgt_lang))

    def missing_files(self, prefix: str, src_lang: str, tgt_lang: str) -> list[str]:
        return [p for p in self.files_of(prefix, src_lang, tgt_lang) if not os.path.isfile(p)]

    def local_data_files(self) -> list[str]:
        """The local files hf_data_files names (its globs expanded), sorted."""
        patterns = [f for files in (self.hf_data_files or {}).values() for f in files if _local_path(f)]
        return sorted({f for pattern in patterns for f in glob.glob(pattern, recursive=True) if os.path.isfile(f)})


# Fields added to DataSpec after run dirs existed: left out of its dump while unset, so that
# the prepare stage's input hash (a hash of the dump) of those run dirs stays what it was.
_LATER_DATA_FIELDS = ("hf_data_files", "hf_src_column", "hf_tgt_column", "extra_train")


class DataSpec(CorpusSpec):
    """The job's data: its source's train/valid/test splits, cleaned (stages/prepare.py).
    extra_train: more training corpora, each read like a files or huggingface source (its
    train split), appended in order to the source's train split before max_train, valid
    carving and cleaning."""

    source: Literal["synthetic", "files", "huggingface"] = "synthetic"
    src_lang: str = Field("en", min_length=1)
    tgt_lang: str = Field("de", min_length=1)
    valid_prefix: str = "valid"
    test_prefix: str = "test"
    valid_size: Optional[int] = Field(None, gt=0)   # carve valid from train when the source has no valid split
    extra_train: list[CorpusSpec] = Field(default_factory=list)
    max_train: Optional[int] = Field(None, gt=0)     # cap on training pairs taken from all train corpora
    synthetic: SyntheticSpec = Field(default_factory=SyntheticSpec)
    # Cleaning of the training set (valid/test are never filtered: scores stay comparable).
    max_tokens: int = Field(100, gt=0)               # max whitespace tokens per side
    max_ratio: float = Field(3.0, ge=1.0)            # max length ratio between the sides

    @model_serializer(mode="wrap")
    def _omit_unset_later_fields(self, handler) -> dict[str, Any]:
        out = handler(self)
        for name in _LATER_DATA_FIELDS:
            if out.get(name) in (None, []):
                del out[name]
        return out

    @model_validator(mode="after")
    def _check_source(self) -> "DataSpec":
        if self.src_lang == self.tgt_lang:
            raise FieldError("tgt_lang", f"must differ from src_lang ({self.src_lang!r})")
        if self.source == "files":
            for field in ("train_prefix", "valid_prefix", "test_prefix"):
                missing = self.missing_files(getattr(self, field), self.src_lang, self.tgt_lang)
                if missing and not (field == "valid_prefix" and self.valid_size):
                    hint = " (or set data.valid_size to carve it from train)" if field == "valid_prefix" else ""
                    raise FieldError(field, f"missing file(s) in data.dir: {', '.join(missing)}{hint}")
        if self.extra_train and self.source == "synthetic":
            raise FieldError("extra_train", "needs data.source files or huggingface (synthetic data is generated)")
        for i, corpus in enumerate(self.extra_train):
            missing = corpus.missing_files(corpus.train_prefix, self.src_lang, self.tgt_lang)
            if corpus.source == "files" and missing:
                raise FieldError(f"extra_train[{i}].train_prefix",
                                 f"missing file(s) in data.extra_train[{i}].dir: {', '.join(missing)}")
        return self

    def split_files(self, prefix: str) -> tuple[str, str]:
        """(source file, target file) of one split for source=files."""
        return self.files_of(prefix, self.src_lang, self.tgt_lang)
