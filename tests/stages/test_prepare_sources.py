"""prepare's data sources beyond the {"translation": ...} layout: a `datasets` builder reading
local files (data.hf_data_files) with named text columns, and several train corpora
(data.extra_train) concatenated, sampled and carved as one, each in the input digests."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from imitate_nat.data import read_lines
from orchestrator.run import hashing
from orchestrator.run.runner import StageContext
from orchestrator.spec.loading import spec_from_dict
from orchestrator.stages.prepare import prepare

datasets = pytest.importorskip("datasets")


def _spec(tmp_path, data):
    return spec_from_dict({"name": "t", "workdir": str(tmp_path), "seed": 3, "data": data})


def _run(tmp_path, data):
    result = prepare(StageContext(_spec(tmp_path, data), run_dir=tmp_path / "run", stage="prepare"))
    out = tmp_path / "run" / "prepare"
    return result.metrics, {name: read_lines(out / name) for name in ("train.src", "train.tgt", "valid.src",
                                                                    "test.tgt")}


def _jsonl(path: Path, pairs) -> str:
    path.write_text("".join(json.dumps({"src_text": s, "tgt_text": t}) + "\n" for s, t in pairs))
    return str(path)


def _files(d: Path, prefix: str, pairs) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{prefix}.en").write_text("".join(s + "\n" for s, _ in pairs))
    (d / f"{prefix}.de").write_text("".join(t + "\n" for _, t in pairs))


def _pairs(tag: str, n: int) -> list[tuple[str, str]]:
    return [(f"{tag} source {i}", f"{tag} ziel {i}") for i in range(n)]


@pytest.fixture
def json_source(tmp_path, monkeypatch):
    """A json builder over local files, texts in the columns src_text / tgt_text."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")     # a builder over local files needs no Hub
    files = {"train": _jsonl(tmp_path / "train.jsonl", [*_pairs("j", 5), ("", "leer")]),
             "validation": _jsonl(tmp_path / "dev.jsonl", [("good  morning", "guten morgen")]),
             "test": _jsonl(tmp_path / "test.jsonl", [("good night", "gute nacht")])}
    return {"source": "huggingface", "hf_name": "json", "hf_data_files": files, "hf_cache_dir": str(tmp_path / "cache"),
            "hf_src_column": "src_text", "hf_tgt_column": "tgt_text", "src_lang": "en", "tgt_lang": "de"}


def test_a_json_builder_over_local_files_with_named_text_columns(tmp_path, json_source):
    metrics, out = _run(tmp_path / "a", json_source)
    assert (metrics["train_pairs_raw"], metrics["train_pairs"], metrics["dropped_empty"]) == (6, 5, 1)
    assert out["train.src"] == [s for s, _ in _pairs("j", 5)] and out["train.tgt"][0] == "j ziel 0"
    assert out["valid.src"] == ["good morning"] and out["test.tgt"] == ["gute nacht"]

    # the translation layout (the default) is not there: the error names the columns to set
    no_columns = {k: v for k, v in json_source.items() if k not in ("hf_src_column", "hf_tgt_column")}
    with pytest.raises(ValueError, match="no column 'translation'.*hf_src_column"):
        _run(tmp_path / "b", no_columns)
    with pytest.raises(ValueError, match="no column 'source'"):
        _run(tmp_path / "c", {**json_source, "hf_src_column": "source"})


def test_extra_train_corpora_follow_the_source_in_order(tmp_path, json_source):
    _files(tmp_path / "more", "extra", _pairs("f", 3))
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(
        [{"translation": {"en": s, "de": t}} for s, t in _pairs("d", 4)])}).save_to_disk(str(saved))
    data = {**json_source, "extra_train": [{"source": "files", "dir": str(tmp_path / "more"), "train_prefix": "extra"},
                                           {"source": "huggingface", "hf_name": str(saved)}]}
    metrics, out = _run(tmp_path / "a", data)
    everything = [*_pairs("j", 5), *_pairs("f", 3), *_pairs("d", 4)]
    assert metrics["train_pairs_raw"] == 6 + 3 + 4
    assert out["train.src"] == [s for s, _ in everything] and out["valid.src"] == ["good morning"]

    # max_train samples the whole stream and valid_size carves from it, corpus order kept
    carved = {**data, "hf_data_files": {k: v for k, v in data["hf_data_files"].items() if k != "validation"},
              "max_train": 10, "valid_size": 2}
    metrics, out = _run(tmp_path / "b", carved)
    assert metrics["train_pairs_raw"] == 8 and metrics["valid_pairs"] == 2
    order = [s for s, _ in [*_pairs("j", 5), ("", "leer"), *_pairs("f", 3), *_pairs("d", 4)]]
    kept = out["valid.src"] + out["train.src"]
    assert sorted(kept, key=order.index) == sorted(set(kept), key=order.index)     # no pair twice
    assert out["train.src"] == sorted(out["train.src"], key=order.index)            # corpus order
    assert {s.split()[0] for s in kept} == {"j", "f", "d"}                           # all corpora sampled


def test_every_train_corpus_is_in_the_input_digests(tmp_path, json_source):
    _files(tmp_path / "more", "train", _pairs("f", 3))
    data = {**json_source, "extra_train": [{"source": "files", "dir": str(tmp_path / "more")},
                                           {"source": "huggingface", "hf_name": "json",
                                            "hf_data_files": {"train": str(tmp_path / "*.jsonl")}}]}
    spec = _spec(tmp_path, data)
    names = sorted(p.name for p in hashing.data_files(spec.data))
    assert names == ["dev.jsonl", "test.jsonl", "train.de", "train.en", "train.jsonl"]   # each file once
    before = hashing.input_digests(spec, "prepare")
    (tmp_path / "more" / "train.de").write_text("x\ny\nz\n")
    after = hashing.input_digests(spec, "prepare")
    assert [Path(k).name for k in before if before[k] != after[k]] == ["train.de"]


def test_new_data_fields_unset_keep_the_stage_hashes_of_existing_jobs(tmp_path, json_source):
    """The prepare hash is a hash of the data section's dump: fields added later are left out of
    it while unset, so the run dirs of jobs written before them are not redone."""
    plain = spec_from_dict({"name": "x"})
    assert not {"hf_data_files", "hf_src_column", "hf_tgt_column", "extra_train"} & set(plain.data.model_dump())
    assert spec_from_dict(plain.model_dump()) == plain
    _files(tmp_path / "more", "train", _pairs("f", 1))
    more = _spec(tmp_path, {**json_source, "extra_train": [{"source": "files", "dir": str(tmp_path / "more")}]})
    assert hashing.stage_hashes(more)["prepare"] != hashing.stage_hashes(_spec(tmp_path, json_source))["prepare"]
