"""prepare and tokenizer stages: synthetic, files and (offline) huggingface sources."""
from __future__ import annotations

import logging
import os
import re
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


# A fresh interpreter: `datasets` and `huggingface_hub` read the offline switches when they are
# imported, which this test process may have done already.
_NO_HUB_SCRIPT = """
import logging
import os
import re
import sys
from pathlib import Path
from orchestrator.run.runner import StageContext
from orchestrator.spec.loading import spec_from_dict
from orchestrator.stages.prepare import prepare
data = {"source": "huggingface", "hf_name": "wmt14", "hf_config": "de-en", "src_lang": "en",
        "tgt_lang": "de", "hf_cache_dir": sys.argv[1] + "/hf-cache"}
spec = spec_from_dict({"name": "t", "workdir": sys.argv[1], "data": data})
prepare(StageContext(spec, run_dir=Path(sys.argv[1]) / "run", stage="prepare"))
"""


def test_huggingface_without_the_hub_says_how_to_proceed(tmp_path):
    """jobs/wmt14.yaml's data on a machine without the Hub: offline mode, an empty cache."""
    import os
    import subprocess

    pytest.importorskip("datasets")
    (tmp_path / "hf-cache").mkdir()
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    proc = subprocess.run([sys.executable, "-c", _NO_HUB_SCRIPT, str(tmp_path)], cwd=Path(__file__).parents[2],
                          env=env, capture_output=True, text=True, timeout=300)
    msg = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and msg.startswith("orchestrator.stages.sources.HubUnreachable: "), proc.stderr[-3000:]
    assert "\nConnectionError: " in proc.stderr and "direct cause" in proc.stderr   # the library's error, kept
    assert "'wmt14'" in msg and str(tmp_path / "hf-cache") in msg
    for way_out in ("HF_DATASETS_OFFLINE=1", "data.hf_cache_dir", "save_to_disk", "data.hf_name=DIR",
                    "data.source=files", "data.dir"):
        assert way_out in msg
    assert not (tmp_path / "run" / "prepare" / "train.src").exists()


def test_huggingface_network_errors_are_told_from_other_errors(tmp_path, monkeypatch):
    """A download that loses the network mid-way raises the HTTP library's error: also wrapped.
    Any other error (here a bad config name) reaches the caller unchanged."""
    datasets = pytest.importorskip("datasets")
    requests = pytest.importorskip("requests")
    from orchestrator.stages.sources import HubUnreachable

    data = {"source": "huggingface", "hf_name": "wmt14", "hf_config": "de-en", "src_lang": "en", "tgt_lang": "de"}
    for error in (requests.exceptions.ConnectionError("Connection reset by peer"), ValueError("no config 'xx'")):
        monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: (_ for _ in ()).throw(error))
        with pytest.raises(Exception) as caught:
            _run(tmp_path, data)
        if isinstance(error, ValueError):
            assert caught.value is error
        else:
            assert isinstance(caught.value, HubUnreachable) and caught.value.__cause__ is error


def test_tokenizer_stage(ray_local, synthetic_run, caplog):
    tmp, _, out = synthetic_run
    spec = _spec(tmp, SYNTH, tokenizer={"vocab_size": 200})
    with caplog.at_level(logging.INFO, logger="imitate_orch"):
        result = tokenizer(StageContext(spec, run_dir=out.parent, stage="tokenizer", progress=False))
    # SentencePiece's trainer (GBs at WMT scale) runs in a Ray task, not in the driver
    [trained] = [r.getMessage() for r in caplog.records if "trained by a Ray task" in r.getMessage()]
    assert int(re.search(r"pid (\d+)", trained).group(1)) != os.getpid()
    assert result.outputs == {n: n for n in ("spm.model", "train.src.bin", "train.src.idx", "train.tgt.bin",
                                             "train.tgt.idx")}
    model = out.parent / "tokenizer" / "spm.model"
    assert model.is_file()
    from imitate_nat.tokenizer import Tokenizer

    tok = Tokenizer(model)
    assert result.metrics["vocab_size"] == tok.vocab_size <= 200
    assert result.metrics["avg_src_pieces"] > 1 and result.metrics["avg_tgt_pieces"] > 1
    for sentence in _lines(out, "valid.src")[:5] + _lines(out, "valid.tgt")[:5]:
        assert tok.decode(tok.encode(sentence)) == sentence


# ------------------------------------------------------------- streaming and memory --

def _messy_corpus(d: Path, n: int = 3000, seed: int = 0) -> list[tuple[str, str]]:
    """Random pairs with every kind of pair the cleaning drops, whitespace oddities, and
    exact repeats (also of pairs that only match once normalized) spread over the corpus."""
    import random

    rng = random.Random(seed)
    words = "the a cat dog sits runs big small red house tree river ship king".split()

    def sent(lo, hi):
        return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))

    pairs: list[tuple[str, str]] = []
    for _ in range(n):
        r = rng.random()
        if r < 0.05:
            pair = ("", sent(1, 4))
        elif r < 0.08:
            pair = (sent(1, 4), " \t ")
        elif r < 0.12:
            pair = (sent(12, 20), sent(12, 20))                      # too long for max_tokens=10
        elif r < 0.16:
            pair = (sent(1, 2), sent(8, 10))                         # ratio > 3
        elif r < 0.26 and pairs:
            s, t = rng.choice(pairs)
            pair = (s, t) if rng.random() < 0.5 else (f" {s}\t", t.replace(" ", "\u2028", 1))
        elif r < 0.28:
            pair = (sent(2, 4) + "\r", "x\u00a0" + sent(2, 4) + "\u3000")
        else:
            pair = (sent(1, 8), sent(1, 8))
        pairs.append(pair)
    d.mkdir(parents=True, exist_ok=True)
    _write(d / "train.en", [s for s, _ in pairs])
    _write(d / "train.de", [t for _, t in pairs])
    _write(d / "test.en", ["one  two"])
    _write(d / "test.de", ["eins\tzwei"])
    return pairs


def _reference_clean(pairs, max_tokens, max_ratio):
    """The cleaning rules of the module docstring, on lists in memory."""
    norm = [(" ".join(s.split()), " ".join(t.split())) for s, t in pairs]
    counts = dict.fromkeys(("dropped_empty", "dropped_length", "dropped_ratio", "dropped_duplicate"), 0)
    seen, kept = set(), []
    for s, t in norm:
        ls, lt = len(s.split()), len(t.split())
        if not ls or not lt:
            counts["dropped_empty"] += 1
        elif ls > max_tokens or lt > max_tokens:
            counts["dropped_length"] += 1
        elif max(ls / lt, lt / ls) > max_ratio:
            counts["dropped_ratio"] += 1
        elif (s, t) in seen:
            counts["dropped_duplicate"] += 1
        else:
            seen.add((s, t))
            kept.append((s, t))
    return kept, counts


def test_streaming_cleaning_matches_rules_across_chunks(tmp_path, monkeypatch):
    import orchestrator.stages.prepare as prep

    pairs = _messy_corpus(tmp_path / "corpus")
    valid = [(" a  b", "c\td"), ("", "")]
    _write(tmp_path / "corpus" / "valid.en", [s for s, _ in valid])
    _write(tmp_path / "corpus" / "valid.de", [t for _, t in valid])
    data = {**FILES, "dir": str(tmp_path / "corpus")}
    kept, counts = _reference_clean(pairs, 10, 3.0)
    assert counts["dropped_duplicate"] > 100 and min(counts.values()) > 50

    outs = {}
    for chunk in (prep.CHUNK, 7):          # 7: the duplicate lookups span hundreds of chunks
        monkeypatch.setattr(prep, "CHUNK", chunk)
        result, out = _run(tmp_path / f"chunk{chunk}", data)
        assert result.metrics == {"train_pairs_raw": len(pairs), "train_pairs": len(kept), **counts,
                                  "valid_pairs": 2, "test_pairs": 1}
        assert list(zip(_lines(out, "train.src"), _lines(out, "train.tgt"))) == kept
        assert _lines(out, "valid.src") == ["a b", ""] and _lines(out, "valid.tgt") == ["c d", ""]
        assert _lines(out, "test.tgt") == ["eins zwei"]
        assert not list(out.glob(".*.tmp"))
        outs[chunk] = {name: (out / name).read_bytes() for name in SPLIT_FILES}
    assert outs[prep.CHUNK] == outs[7]


def test_streaming_max_train_and_carving(tmp_path, monkeypatch):
    import orchestrator.stages.prepare as prep

    pairs = _messy_corpus(tmp_path / "corpus", n=2000, seed=1)
    data = {**FILES, "dir": str(tmp_path / "corpus"), "max_train": 1500, "valid_size": 200}
    result, out = _run(tmp_path / "a", data)
    m = result.metrics
    assert m["valid_pairs"] == 200 and m["train_pairs_raw"] == 1300
    # the carved valid pairs are normalized input pairs, in corpus order, never cleaned
    norm = [(" ".join(s.split()), " ".join(t.split())) for s, t in pairs]
    valid = list(zip(_lines(out, "valid.src"), _lines(out, "valid.tgt")))
    it = iter(norm)
    assert all(any(p == q for q in it) for p in valid)        # a subsequence of the corpus
    assert any(not s or not t for s, t in valid)               # an empty side stays in valid
    train = list(zip(_lines(out, "train.src"), _lines(out, "train.tgt")))
    assert len(set(train)) == len(train) == m["train_pairs"]
    monkeypatch.setattr(prep, "CHUNK", 5)
    _, out2 = _run(tmp_path / "b", data)
    for name in SPLIT_FILES:
        assert (out / name).read_bytes() == (out2 / name).read_bytes()


def test_failed_prepare_leaves_previous_outputs(tmp_path):
    d = tmp_path / "corpus"
    _files_corpus(d)
    data = {**FILES, "dir": str(d)}
    _, out = _run(tmp_path, data)
    before = {name: (out / name).read_bytes() for name in SPLIT_FILES}
    _write(d / "train.de", ["only one line"])                  # misaligned with train.en
    with pytest.raises(ValueError, match="lines but"):
        _run(tmp_path, data)
    _write(d / "train.de", [""] * 9)                          # every pair has an empty side
    with pytest.raises(ValueError, match="no training pairs left"):
        _run(tmp_path, data)
    assert {name: (out / name).read_bytes() for name in SPLIT_FILES} == before
    assert sorted(p.name for p in out.iterdir()) == sorted(SPLIT_FILES)     # no temp files


# Peak RSS of the child itself: VmHWM (the high-water mark of this process image). Not
# ru_maxrss on Linux: subprocess starts the child with vfork/posix_spawn, and at exec the
# kernel folds the *parent's* high-water RSS (pytest's, which holds the generated corpora)
# into the child's ru_maxrss. ru_maxrss is the fallback where /proc is missing.
_RSS_SCRIPT = """
import resource, sys
from pathlib import Path
from orchestrator.run.runner import StageContext
from orchestrator.spec.loading import spec_from_dict
from orchestrator.stages.prepare import prepare

def peak_kib():
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

spec = spec_from_dict({"name": "m", "seed": 1, "data": {"source": "files", "dir": sys.argv[1]}})
result = prepare(StageContext(spec, Path(sys.argv[2]), "prepare", progress=False))
print(peak_kib(), result.metrics["train_pairs"])
"""


def _peak_rss_kib(corpus: Path, run_dir: Path) -> tuple[int, int]:
    import subprocess

    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(corpus), str(run_dir)], cwd=repo,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak, kept = map(int, proc.stdout.split()[-2:])
    return peak, kept


def test_prepare_memory_does_not_grow_with_the_corpus(tmp_path):
    """Peak RSS of prepare on 200k pairs vs 50k pairs, each in a fresh process: the 150k extra
    pairs (~19 MB of text, ~75 MB as Python strings) add only their 8-byte hashes and
    allocator noise. Holding the corpus, as prepare used to, added ~90 MB here."""
    import random

    rng = random.Random(0)
    vocab = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(5000)]
    text = {}
    for side in ("en", "de"):
        text[side] = [" ".join(rng.choices(vocab, k=rng.randint(5, 15))) for _ in range(200_000)]
    peaks = {}
    for n in (50_000, 200_000):
        d = tmp_path / f"c{n}"
        d.mkdir()
        for side in ("en", "de"):
            _write(d / f"train.{side}", text[side][:n])
            _write(d / f"valid.{side}", ["a valid sentence"])
            _write(d / f"test.{side}", ["a test sentence"])
        peak, kept = _peak_rss_kib(d, tmp_path / f"run{n}")
        assert kept > 0.99 * n
        peaks[n] = peak
    growth_mb = (peaks[200_000] - peaks[50_000]) / 1024
    text_mb = sum(len(s) + 1 for side in text.values() for s in side[50_000:]) / 2**20
    print(f"prepare peak RSS: 50k pairs {peaks[50_000] / 1024:.0f} MB, 200k pairs "
          f"{peaks[200_000] / 1024:.0f} MB: +{growth_mb:.1f} MB for 150k more pairs "
          f"({text_mb:.0f} MB of text)")
    assert growth_mb < 40
