"""prepare and tokenizer stages: synthetic, files and (offline) huggingface sources."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from imitate_nat.data import read_lines
from orchestrator.run.runner import StageContext
from orchestrator.spec.loading import spec_from_dict
from orchestrator.stages.prepare import prepare
from orchestrator.stages.tokenizer import tokenizer

SPLIT_FILES = [f"{s}.{e}" for s in ("train", "valid", "test") for e in ("src", "tgt")]


def _spec(tmp_path, data, **extra):
    return spec_from_dict({"name": "t", "workdir": str(tmp_path), "seed": 3, "data": data, **extra})


def _run(tmp_path, data, **extra):
    spec = _spec(tmp_path, data, **extra)
    run_dir = tmp_path / "run"
    return prepare(StageContext(spec, run_dir=run_dir, stage="prepare")), run_dir / "prepare"


def _lines(d: Path, name: str) -> list[str]:
    return read_lines(d / name)


def _write(path: Path, lines) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


SYNTH = {"source": "synthetic", "synthetic": {"train_size": 300, "valid_size": 40, "test_size": 30}}


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("synthetic")
    result, out = _run(tmp, SYNTH, tokenizer={"vocab_size": 200})
    return tmp, result, out


def test_synthetic_split_sizes(synthetic_run):
    _, result, out = synthetic_run
    assert set(result.outputs) == set(SPLIT_FILES) and all(result.outputs[k] == k for k in SPLIT_FILES)
    m = result.metrics
    assert m["train_pairs_raw"] == 300 and m["valid_pairs"] == 40 and m["test_pairs"] == 30
    assert 250 <= m["train_pairs"] <= 300
    assert m["train_pairs"] + m["dropped_empty"] + m["dropped_length"] + m["dropped_ratio"] \
        + m["dropped_duplicate"] == 300
    for split, n in (("train", m["train_pairs"]), ("valid", 40), ("test", 30)):
        src, tgt = _lines(out, f"{split}.src"), _lines(out, f"{split}.tgt")
        assert len(src) == len(tgt) == n
        assert all(s.strip() == s and s for s in src + tgt)
    assert not list(out.glob(".*.tmp"))


def test_synthetic_is_deterministic(synthetic_run, tmp_path):
    _, _, out = synthetic_run
    _, out2 = _run(tmp_path, SYNTH)
    for name in SPLIT_FILES:
        assert (out / name).read_bytes() == (out2 / name).read_bytes()


def _files_corpus(d: Path, with_valid: bool = True) -> None:
    d.mkdir(parents=True, exist_ok=True)
    train = [
        ("the cat sits", "die katze sitzt"),            # kept
        ("a b c d e f g h i j k l", "a b c d e f g h i j k l"),  # 12 tokens > max_tokens=10
        ("one", "eins zwei drei vier fuenf"),             # ratio 5 > 3
        ("   ", "leer"),                                  # empty source side
        ("the cat sits", "die katze sitzt"),            # duplicate of the first pair
        ("tab\there  now", "tab\t\thier jetzt\r"),       # normalized, kept
        ("the dog runs", "der hund laeuft"),            # kept
        ("the cat sits", "die katze sitzt nicht"),      # same source, other target: kept
        ("x\ry z", "x y z"),                             # stray CR must not split the line
    ]
    _write(d / "train.en", [s for s, _ in train])
    _write(d / "train.de", [t for _, t in train])
    valid = [("a b c d e f g h i j k l m", "x"), ("", ""), ("hello  world", "hallo\twelt")]
    test = [("one", "eins zwei drei vier fuenf"), ("the cat sits", "die katze sitzt")]
    if with_valid:
        _write(d / "valid.en", [s for s, _ in valid])
        _write(d / "valid.de", [t for _, t in valid])
    _write(d / "test.en", [s for s, _ in test])
    _write(d / "test.de", [t for _, t in test])


FILES = {"source": "files", "max_tokens": 10, "max_ratio": 3.0}


def test_files_cleaning_and_metrics(tmp_path):
    _files_corpus(tmp_path / "corpus")
    result, out = _run(tmp_path, {**FILES, "dir": str(tmp_path / "corpus")})
    assert result.metrics == {"train_pairs_raw": 9, "train_pairs": 5, "dropped_length": 1,
                              "dropped_ratio": 1, "dropped_empty": 1, "dropped_duplicate": 1,
                              "valid_pairs": 3, "test_pairs": 2}
    assert _lines(out, "train.src") == ["the cat sits", "tab here now", "the dog runs",
                                        "the cat sits", "x y z"]
    assert _lines(out, "train.tgt") == ["die katze sitzt", "tab hier jetzt", "der hund laeuft",
                                        "die katze sitzt nicht", "x y z"]
    # valid/test: whitespace normalized only, nothing dropped, empty lines kept aligned
    assert _lines(out, "valid.src") == ["a b c d e f g h i j k l m", "", "hello world"]
    assert _lines(out, "valid.tgt") == ["x", "", "hallo welt"]
    assert _lines(out, "test.src") == ["one", "the cat sits"]
    assert _lines(out, "test.tgt") == ["eins zwei drei vier fuenf", "die katze sitzt"]


def test_files_valid_carved_from_train(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    pairs = [(f"source sentence {i}", f"ziel satz {i}") for i in range(50)]
    _write(d / "train.en", [s for s, _ in pairs])
    _write(d / "train.de", [t for _, t in pairs])
    _write(d / "test.en", ["a test"])
    _write(d / "test.de", ["ein test"])
    data = {"source": "files", "dir": str(d), "valid_size": 10}
    result, out = _run(tmp_path / "a", data)
    assert result.metrics["valid_pairs"] == 10
    assert result.metrics["train_pairs_raw"] == result.metrics["train_pairs"] == 40
    valid = list(zip(_lines(out, "valid.src"), _lines(out, "valid.tgt")))
    train = list(zip(_lines(out, "train.src"), _lines(out, "train.tgt")))
    assert set(valid).isdisjoint(train) and sorted(valid + train) == sorted(pairs)
    assert valid == sorted(valid, key=pairs.index) and train == sorted(train, key=pairs.index)
    assert valid not in (pairs[:10], pairs[-10:])             # a seeded sample, not a fixed slice
    _, out2 = _run(tmp_path / "b", data)                      # deterministic for one seed
    assert _lines(out2, "valid.src") == [s for s, _ in valid]


def test_files_max_train_and_missing_valid(tmp_path):
    d = tmp_path / "corpus"
    _files_corpus(d)
    result, _ = _run(tmp_path, {**FILES, "dir": str(d), "max_train": 4})
    assert result.metrics["train_pairs_raw"] == 4
    (d / "valid.en").unlink()
    with pytest.raises(Exception, match="valid"):
        _spec(tmp_path, {**FILES, "dir": str(d)})


def _hf_dataset(path: Path, n_train: int = 30) -> None:
    datasets = pytest.importorskip("datasets")

    def rows(pairs):
        return datasets.Dataset.from_list([{"translation": {"en": s, "de": t}} for s, t in pairs])

    train = [(f"hello world {i}", f"hallo welt {i}") for i in range(n_train)]
    train += [("", "leer"), ("hello world 0", "hallo welt 0"), ("hi\tthere", "hallo  da")]
    dd = datasets.DatasetDict({
        "train": rows(train),
        "validation": rows([("good morning", "guten morgen"), ("a  b", "c\td")]),
        "test": rows([("good night", "gute nacht")]),
    })
    dd.save_to_disk(str(path))


def test_huggingface_offline_from_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    _hf_dataset(tmp_path / "hfds")
    data = {"source": "huggingface", "hf_name": str(tmp_path / "hfds"), "src_lang": "en", "tgt_lang": "de"}
    result, out = _run(tmp_path / "a", data)
    m = result.metrics
    assert (m["train_pairs_raw"], m["train_pairs"], m["dropped_empty"], m["dropped_duplicate"]) == (33, 31, 1, 1)
    assert (m["valid_pairs"], m["test_pairs"]) == (2, 1)
    assert _lines(out, "train.src")[-1] == "hi there" and _lines(out, "train.tgt")[-1] == "hallo da"
    assert _lines(out, "valid.src") == ["good morning", "a b"]
    assert _lines(out, "valid.tgt") == ["guten morgen", "c d"]
    assert _lines(out, "test.tgt") == ["gute nacht"]

    # reversed direction reads the same rows the other way round
    result, out = _run(tmp_path / "b", {**data, "src_lang": "de", "tgt_lang": "en", "max_train": 10})
    assert result.metrics["train_pairs_raw"] == 10 and result.metrics["train_pairs"] <= 10
    assert _lines(out, "test.src") == ["gute nacht"]


def test_huggingface_wrong_language_and_missing_package(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    _hf_dataset(tmp_path / "hfds", n_train=3)
    data = {"source": "huggingface", "hf_name": str(tmp_path / "hfds"), "src_lang": "en", "tgt_lang": "fr"}
    with pytest.raises(ValueError, match="'fr'"):
        _run(tmp_path, data)
    monkeypatch.setitem(sys.modules, "datasets", None)     # import datasets -> ImportError
    with pytest.raises(ImportError, match="pip install"):
        _run(tmp_path, {**data, "tgt_lang": "de"})


def test_tokenizer_stage(synthetic_run):
    tmp, _, out = synthetic_run
    spec = _spec(tmp, SYNTH, tokenizer={"vocab_size": 200})
    result = tokenizer(StageContext(spec, run_dir=out.parent, stage="tokenizer"))
    assert result.outputs == {"spm.model": "spm.model"}
    model = out.parent / "tokenizer" / "spm.model"
    assert model.is_file()
    from imitate_nat.tokenizer import Tokenizer

    tok = Tokenizer(model)
    assert result.metrics["vocab_size"] == tok.vocab_size <= 200
    assert result.metrics["avg_src_pieces"] > 1 and result.metrics["avg_tgt_pieces"] > 1
    for sentence in _lines(out, "valid.src")[:5] + _lines(out, "valid.tgt")[:5]:
        assert tok.decode(tok.encode(sentence)) == sentence
