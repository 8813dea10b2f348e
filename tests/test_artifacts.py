"""Atomic writes, manifests and shard markers: what lets a rerun trust (or redo) a stage."""

import json

import pytest

from orchestrator import artifacts as A


def _debris(d):
    return [p.name for p in d.iterdir() if p.name.endswith(".tmp")]


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    p = tmp_path / "a" / "b" / "out.txt"  # parents are created
    A.atomic_write_text(p, "old")
    A.atomic_write_text(p, "new")
    assert p.read_text() == "new"
    A.atomic_write_bytes(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    A.atomic_write_json(p, {"b": 1, "a": [1, 2]})
    assert json.loads(p.read_text()) == {"a": [1, 2], "b": 1}
    assert _debris(p.parent) == []


def test_crash_during_replace_keeps_old_file(tmp_path, monkeypatch):
    p = tmp_path / "out.txt"
    A.atomic_write_text(p, "old content")

    def boom(src, dst):
        raise OSError("simulated crash")

    monkeypatch.setattr(A.os, "replace", boom)
    with pytest.raises(OSError, match="simulated"):
        A.atomic_write_text(p, "new content")
    assert p.read_text() == "old content"
    assert _debris(tmp_path) == []


def test_hashes(tmp_path):
    assert A.sha256_json({"a": 1, "b": [1, 2]}) == A.sha256_json({"b": [1, 2], "a": 1})
    assert A.sha256_json({"a": 1}) != A.sha256_json({"a": 2})
    p = tmp_path / "f.bin"
    p.write_bytes(b"x" * (3 << 20))  # spans several read chunks
    import hashlib
    assert A.sha256_file(p) == hashlib.sha256(b"x" * (3 << 20)).hexdigest()


def test_stage_dir_layout(tmp_path):
    assert A.stage_dir(tmp_path, "tiny", "teacher") == tmp_path / "tiny" / "teacher"


def _done_stage(tmp_path, input_hash="h1"):
    d = A.stage_dir(tmp_path, "job", "teacher")
    A.atomic_write_text(d / "model.pt", "weights")
    A.atomic_write_text(d / "ckpt" / "part0.bin", "p0")  # a directory output
    m = A.Manifest(stage="teacher", input_hash=input_hash, status="done",
                   outputs=A.record_outputs(d, {"model": "model.pt", "ckpt": d / "ckpt"}),
                   metrics={"bleu": 12.5}, started=A.utc_now(), finished=A.utc_now())
    A.write_manifest(d, m)
    return d, m


def test_manifest_roundtrip(tmp_path):
    d, m = _done_stage(tmp_path)
    assert A.read_manifest(d) == m
    assert m.outputs["model"]["path"] == "model.pt"
    assert m.outputs["ckpt"]["path"] == "ckpt"
    assert A.read_manifest(tmp_path / "nowhere") is None
    with pytest.raises(ValueError):
        A.Manifest(stage="x", input_hash="h", status="weird")


def test_is_complete_happy_and_input_hash(tmp_path):
    d, _ = _done_stage(tmp_path)
    assert A.is_complete(d, "h1")
    assert not A.is_complete(d, "h2")


@pytest.mark.parametrize("status", ["running", "failed"])
def test_is_complete_requires_done(tmp_path, status):
    d, m = _done_stage(tmp_path)
    m.status = status
    A.write_manifest(d, m)
    assert not A.is_complete(d, "h1")


def test_is_complete_detects_truncated_modified_missing_outputs(tmp_path):
    d, _ = _done_stage(tmp_path)
    with open(d / "model.pt", "r+b") as f:
        f.truncate(3)
    assert not A.is_complete(d, "h1")

    d, _ = _done_stage(tmp_path)
    (d / "ckpt" / "part0.bin").write_text("tampered")
    assert not A.is_complete(d, "h1")

    d, _ = _done_stage(tmp_path)
    (d / "model.pt").unlink()
    assert not A.is_complete(d, "h1")


def test_corrupted_manifest_is_missing(tmp_path, caplog):
    d, _ = _done_stage(tmp_path)
    (d / A.MANIFEST_NAME).write_text('{"stage": "teacher", "input_')  # torn write
    with caplog.at_level("WARNING"):
        assert A.read_manifest(d) is None
    assert "corrupted manifest" in caplog.text
    assert not A.is_complete(d, "h1")
    (d / A.MANIFEST_NAME).write_text("[1, 2]")  # valid JSON, wrong shape
    assert A.read_manifest(d) is None


def test_shard_roundtrip_and_marker(tmp_path):
    lines = ["ein Haus .", "", "carriage\rreturn", "ünïcode"]
    p = A.write_shard(tmp_path, 3, lines)
    assert p.name == "shard-00003.txt"
    assert (tmp_path / "shard-00003.done").exists()
    assert A.shard_done(tmp_path, 3, 4)
    assert A.read_shard(tmp_path, 3) == lines
    A.write_shard(tmp_path, 4, [])
    assert A.shard_done(tmp_path, 4, 0) and A.read_shard(tmp_path, 4) == []
    A.write_shard(tmp_path, 5, [""])
    assert A.shard_done(tmp_path, 5, 1) and A.read_shard(tmp_path, 5) == [""]
    with pytest.raises(ValueError):
        A.write_shard(tmp_path, 6, ["two\nlines"])
    assert _debris(tmp_path) == []


def test_shard_marker_keeps_meta_and_checksum(tmp_path):
    A.write_shard(tmp_path, 2, ["x", "y"], node="abc123")
    info = A.shard_marker(tmp_path, 2)
    assert info["node"] == "abc123" and info["lines"] == 2 and len(info["sha256"]) == 64
    assert A.shard_marker(tmp_path, 3) is None
    (tmp_path / "shard-00002.txt").write_bytes(b"x\n")       # truncated: half the lines
    assert not A.shard_done(tmp_path, 2, 2)


def test_shard_not_done_cases(tmp_path):
    A.write_shard(tmp_path, 0, ["a", "b"])
    assert not A.shard_done(tmp_path, 0, 3)  # wrong line count
    assert not A.shard_done(tmp_path, 1, 2)  # nothing written at all

    (tmp_path / "shard-00000.txt").write_text("a\nX\n")  # same count, wrong checksum
    assert not A.shard_done(tmp_path, 0, 2)

    A.write_shard(tmp_path, 0, ["a", "b"])
    (tmp_path / "shard-00000.done").unlink()  # crash between shard and marker
    assert not A.shard_done(tmp_path, 0, 2)

    A.write_shard(tmp_path, 0, ["a", "b"])
    (tmp_path / "shard-00000.done").write_text("not json")
    assert not A.shard_done(tmp_path, 0, 2)


def test_shard_marker_written_after_shard(tmp_path, monkeypatch):
    # If the shard write fails, no marker may exist (and an old one is removed).
    A.write_shard(tmp_path, 0, ["old"])
    real = A.atomic_write_bytes

    def fail_shard(path, data):
        if str(path).endswith(".txt"):
            raise OSError("disk full")
        return real(path, data)

    monkeypatch.setattr(A, "atomic_write_bytes", fail_shard)
    with pytest.raises(OSError):
        A.write_shard(tmp_path, 0, ["new", "lines"])
    assert not (tmp_path / "shard-00000.done").exists()
    assert not A.shard_done(tmp_path, 0, 1)
