"""Tokenizer, sacreBLEU scores, model files, batching."""
import sacrebleu
import pytest
import torch

from imitate_nat import ATDemonstrator, NATLearner, preset
from imitate_nat.checkpoint import CheckpointError, load_model, save_model
from imitate_nat.data import make_batch, token_batches
from imitate_nat.metrics import bleu, chrf
from imitate_nat.tokenizer import Tokenizer, train_sentencepiece

EN = ["a man is riding a red bicycle down the street .", "two dogs play in the snow .",
      "a woman reads a book in the park .", "children are playing football on the beach ."] * 5
DE = ["ein mann fährt ein rotes fahrrad die straße hinunter .", "zwei hunde spielen im schnee .",
      "eine frau liest ein buch im park .", "kinder spielen fußball am strand ."] * 5


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    d = tmp_path_factory.mktemp("spm")
    (d / "train.en").write_text("\n".join(EN) + "\n")
    (d / "train.de").write_text("\n".join(DE) + "\n")
    return train_sentencepiece([d / "train.en", d / "train.de"], d / "spm.model", vocab_size=120)


def test_tokenizer_roundtrip_and_special_ids(tokenizer):
    assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2, 3)
    assert 40 < tokenizer.vocab_size <= 120
    for text in EN[:4] + DE[:4]:
        ids = tokenizer.encode(text)
        assert ids and min(ids) > 3
        assert tokenizer.decode(ids) == text
    assert tokenizer.decode([2] + tokenizer.encode("zwei hunde") + [3, 0, 0]) == "zwei hunde"
    assert tokenizer.encode_batch(["zwei hunde", "a man"]) == [tokenizer.encode("zwei hunde"), tokenizer.encode("a man")]
    reloaded = Tokenizer(tokenizer.path)
    assert reloaded.encode(DE[0]) == tokenizer.encode(DE[0])


def test_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        Tokenizer(tmp_path / "missing.model")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="no text"):
        train_sentencepiece([tmp_path / "empty.txt"], tmp_path / "x.model", vocab_size=50)


def test_tokenizer_streams_files_same_model_as_in_memory(tmp_path):
    """Training from the files (streamed) writes the bytes SentencePiece gives for the same
    lines held in a list, the way the tokenizer used to be trained."""
    import io
    import os

    import sentencepiece as spm

    (tmp_path / "a.txt").write_text("\n".join(EN) + "\n\n  \n")
    (tmp_path / "b.txt").write_text("\n".join(DE))
    tok = train_sentencepiece([tmp_path / "a.txt", tmp_path / "b.txt"], tmp_path / "m.model", vocab_size=120)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(EN + DE), model_writer=model, vocab_size=120, model_type="unigram",
        character_coverage=1.0, pad_id=0, unk_id=1, bos_id=2, eos_id=3, hard_vocab_limit=False,
        num_threads=os.cpu_count() or 1, minloglevel=2, input_sentence_size=0, shuffle_input_sentence=False)
    assert tok.path.read_bytes() == model.getvalue()
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_tokenizer_sample_is_seeded(tmp_path):
    import random

    from imitate_nat.tokenizer import _selection_sample

    items = [str(i) for i in range(1000)]
    picked = list(_selection_sample(iter(items), 1000, 100, seed=5))
    assert len(picked) == 100 and picked == sorted(picked, key=int)          # corpus order
    assert picked == list(_selection_sample(iter(items), 1000, 100, seed=5))
    assert picked != list(_selection_sample(iter(items), 1000, 100, seed=6))
    assert list(_selection_sample(iter(items[:10]), 10, 10, seed=5)) == items[:10]

    rng = random.Random(0)
    words = [f"w{i}x{rng.randint(0, 9)}" for i in range(400)]
    (tmp_path / "c.txt").write_text("".join(" ".join(rng.choices(words, k=8)) + "\n" for _ in range(3000)))
    models = [train_sentencepiece([tmp_path / "c.txt"], tmp_path / f"{i}.model", vocab_size=300,
                                  max_sentences=500, seed=seed).path.read_bytes()
              for i, seed in enumerate((1, 1, 2))]
    assert models[0] == models[1] != models[2]


def test_bleu_and_chrf_match_sacrebleu_and_keep_signature():
    hyps = ["the cat sat on the mat", "a dog barks loudly"]
    refs = ["the cat sat on a mat", "the dog barks loudly"]
    b, c = bleu(hyps, refs), chrf(hyps, refs)
    assert b.score == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert c.score == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    assert 0 < b.score < 100 and bleu(refs, refs).score == pytest.approx(100.0)
    assert "tok:13a" in b.signature and "version:" in b.signature
    assert c.signature.startswith("nrefs:1")
    with pytest.raises(ValueError, match="hypotheses"):
        bleu(hyps[:1], refs)


def test_model_file_roundtrip_keeps_weights_config_and_action_usage(tmp_path):
    torch.manual_seed(0)
    cfg = preset("tiny", vocab_size=30, n_actions=8)
    at = ATDemonstrator(cfg)
    at.decoder.imitations[1].usage.copy_(torch.linspace(0, 1, 8))
    save_model(at, tmp_path / "at.pt", meta={"step": 7})
    loaded, meta = load_model(tmp_path / "at.pt")
    assert isinstance(loaded, ATDemonstrator) and meta == {"step": 7} and loaded.cfg == cfg
    for k, v in at.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert not list(tmp_path.glob("*.tmp*"))   # atomic write left nothing behind

    nat = NATLearner(cfg)
    save_model(nat, tmp_path / "nat.pt")
    assert isinstance(load_model(tmp_path / "nat.pt")[0], NATLearner)


def _write_events(monkeypatch) -> list[str]:
    """What happens to files from here on: "file fsync", "dir fsync", "rename", in order."""
    import os
    import stat

    events, fsync, replace = [], os.fsync, os.replace

    def recorded_fsync(fd):
        events.append("dir fsync" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file fsync")
        fsync(fd)

    def recorded_replace(src, dst):
        events.append("rename")
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", recorded_fsync)
    monkeypatch.setattr(os, "replace", recorded_replace)
    return events


def test_model_file_is_written_durably_and_a_failed_write_leaves_the_old_one(tmp_path, monkeypatch):
    """save_model: the new file is fsynced before it is renamed into place and the directory
    after (else a power loss can leave an empty model.pt); a write that fails half way leaves
    the old file and no temp file."""
    import os

    path = tmp_path / "at.pt"
    save_model(ATDemonstrator(preset("tiny", vocab_size=30)), path, meta={"v": 1})
    events = _write_events(monkeypatch)
    save_model(ATDemonstrator(preset("tiny", vocab_size=30)), path, meta={"v": 2})
    assert events == ["file fsync", "rename", "dir fsync"]

    def half_written(obj, f):
        if isinstance(f, (str, os.PathLike)):
            f = open(f, "wb")
        f.write(b"half a model")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", half_written)
    with pytest.raises(OSError, match="disk full"):
        save_model(ATDemonstrator(preset("tiny", vocab_size=30)), path, meta={"v": 3})
    assert load_model(path)[1] == {"v": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["at.pt"]


def test_tokenizer_model_is_written_durably_and_a_failed_write_leaves_the_old_one(tmp_path, monkeypatch):
    import os

    (tmp_path / "a.txt").write_text("\n".join(EN + DE) + "\n")
    path = tmp_path / "spm.model"
    old = train_sentencepiece([tmp_path / "a.txt"], path, vocab_size=100).path.read_bytes()
    events = _write_events(monkeypatch)
    train_sentencepiece([tmp_path / "a.txt"], path, vocab_size=100)
    assert events == ["file fsync", "rename", "dir fsync"]

    def crash(src, dst):
        raise OSError("simulated crash")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        train_sentencepiece([tmp_path / "a.txt"], path, vocab_size=90)
    assert path.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "spm.model"]


def test_damaged_or_foreign_files_are_refused(tmp_path):
    save_model(ATDemonstrator(preset("tiny", vocab_size=30)), tmp_path / "at.pt")
    data = (tmp_path / "at.pt").read_bytes()
    (tmp_path / "half.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read"):
        load_model(tmp_path / "half.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not an imitate_nat model"):
        load_model(tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nope.pt")


def test_make_batch_layout():
    b = make_batch([[5, 6], [7]], [[8, 9, 10], [11]])
    assert b.src.tolist() == [[5, 6, 3], [7, 3, 0]]
    assert b.tgt.tolist() == [[8, 9, 10], [11, 0, 0]]
    assert b.tgt_in.tolist() == [[2, 8, 9, 10], [2, 11, 0, 0]]
    assert b.tgt_out.tolist() == [[8, 9, 10, 3], [11, 3, 0, 0]]
    with pytest.raises(ValueError, match="empty target"):
        make_batch([[5]], [[]])


def test_token_batches_respect_budget_and_cover_every_index_once():
    lengths = [3, 10, 7, 7, 2, 30, 5, 9, 1, 12] * 3
    batches = token_batches(lengths, max_tokens=24, shuffle=True, seed=1)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(lengths)))
    for b in batches:
        assert len(b) == 1 or max(lengths[i] for i in b) * len(b) <= 24
    assert token_batches(lengths, 24, shuffle=True, seed=1) == batches
    assert all(len(b) <= 2 for b in token_batches(lengths, 1000, max_sentences=2))


def test_token_batches_with_a_length_ratio_never_pad_past_it():
    """A Serve batch on a CPU: 16 sentences of mixed lengths become tight groups, each longest
    within the ratio of its shortest, instead of one batch padded to the longest."""
    lengths = [3, 10, 7, 7, 2, 30, 5, 9, 1, 12, 4, 4, 16, 20, 8, 6]
    assert len(token_batches(lengths, 10_000)) == 1
    batches = token_batches(lengths, 10_000, max_length_ratio=1.25)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert max(lengths[i] for i in b) <= 1.25 * min(lengths[i] for i in b)
    assert [sorted(lengths[i] for i in b) for b in batches][:3] == [[1], [2], [3]]
    assert [lengths[i] for i in batches[3]] == [4, 4, 5]
