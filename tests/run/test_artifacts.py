"""Atomic writes, manifests and shard markers: what lets a rerun trust (or redo) a stage."""

import json

import pytest

from orchestrator.run import files, manifest, shards


def _debris(d):
    return [p.name for p in d.iterdir() if p.name.endswith(".tmp")]


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    p = tmp_path / "a" / "b" / "out.txt"  # parents are created
    files.atomic_write_text(p, "old")
    files.atomic_write_text(p, "new")
    assert p.read_text() == "new"
    files.atomic_write_bytes(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    files.atomic_write_json(p, {"b": 1, "a": [1, 2]})
    assert json.loads(p.read_text()) == {"a": [1, 2], "b": 1}
    assert _debris(p.parent) == []


def test_crash_during_replace_keeps_old_file(tmp_path, monkeypatch):
    p = tmp_path / "out.txt"
    files.atomic_write_text(p, "old content")

    def boom(src, dst):
        raise OSError("simulated crash")

    monkeypatch.setattr(files.os, "replace", boom)
    with pytest.raises(OSError, match="simulated"):
        files.atomic_write_text(p, "new content")
    assert p.read_text() == "old content"
    assert _debris(tmp_path) == []


def test_hashes(tmp_path):
    assert files.sha256_json({"a": 1, "b": [1, 2]}) == files.sha256_json({"b": [1, 2], "a": 1})
    assert files.sha256_json({"a": 1}) != files.sha256_json({"a": 2})
    p = tmp_path / "f.bin"
    p.write_bytes(b"x" * (3 << 20))  # spans several read chunks
    import hashlib
    assert files.sha256_file(p) == hashlib.sha256(b"x" * (3 << 20)).hexdigest()


def _done_stage(tmp_path, input_hash="h1"):
    d = tmp_path / "job" / "teacher"
    files.atomic_write_text(d / "model.pt", "weights")
    files.atomic_write_text(d / "ckpt" / "part0.bin", "p0")  # a directory output
    m = manifest.Manifest(stage="teacher", input_hash=input_hash, status="done",
                   outputs=manifest.record_outputs(d, {"model": "model.pt", "ckpt": d / "ckpt"}),
                   metrics={"bleu": 12.5}, started=files.utc_now(), finished=files.utc_now())
    manifest.write_manifest(d, m)
    return d, m


def test_manifest_roundtrip(tmp_path):
    d, m = _done_stage(tmp_path)
    assert manifest.read_manifest(d) == m
    assert m.outputs["model"]["path"] == "model.pt"
    assert m.outputs["ckpt"]["path"] == "ckpt"
    assert manifest.read_manifest(tmp_path / "nowhere") is None
    with pytest.raises(ValueError):
        manifest.Manifest(stage="x", input_hash="h", status="weird")


def test_is_complete_happy_and_input_hash(tmp_path):
    d, _ = _done_stage(tmp_path)
    assert manifest.is_complete(d, "h1")
    assert not manifest.is_complete(d, "h2")


@pytest.mark.parametrize("status", ["running", "failed"])
def test_is_complete_requires_done(tmp_path, status):
    d, m = _done_stage(tmp_path)
    m.status = status
    manifest.write_manifest(d, m)
    assert not manifest.is_complete(d, "h1")


def test_is_complete_detects_truncated_modified_missing_outputs(tmp_path):
    d, _ = _done_stage(tmp_path)
    with open(d / "model.pt", "r+b") as f:
        f.truncate(3)
    assert not manifest.is_complete(d, "h1")

    d, _ = _done_stage(tmp_path)
    (d / "ckpt" / "part0.bin").write_text("tampered")
    assert not manifest.is_complete(d, "h1")

    d, _ = _done_stage(tmp_path)
    (d / "model.pt").unlink()
    assert not manifest.is_complete(d, "h1")


def test_corrupted_manifest_is_missing(tmp_path, caplog):
    d, _ = _done_stage(tmp_path)
    (d / manifest.MANIFEST_NAME).write_text('{"stage": "teacher", "input_')  # torn write
    with caplog.at_level("WARNING"):
        assert manifest.read_manifest(d) is None
    assert "corrupted manifest" in caplog.text
    assert not manifest.is_complete(d, "h1")
    (d / manifest.MANIFEST_NAME).write_text("[1, 2]")  # valid JSON, wrong shape
    assert manifest.read_manifest(d) is None


def test_shard_roundtrip_and_marker(tmp_path):
    lines = ["ein Haus .", "", "carriage\rreturn", "ünïcode"]
    p = shards.write_shard(tmp_path, 3, lines)
    assert p.name == "shard-00003.txt"
    assert (tmp_path / "shard-00003.done").exists()
    assert shards.shard_done(tmp_path, 3, 4)
    assert shards.read_shard(tmp_path, 3) == lines
    shards.write_shard(tmp_path, 4, [])
    assert shards.shard_done(tmp_path, 4, 0) and shards.read_shard(tmp_path, 4) == []
    shards.write_shard(tmp_path, 5, [""])
    assert shards.shard_done(tmp_path, 5, 1) and shards.read_shard(tmp_path, 5) == [""]
    with pytest.raises(ValueError):
        shards.write_shard(tmp_path, 6, ["two\nlines"])
    assert _debris(tmp_path) == []


def test_shard_marker_keeps_meta_and_checksum(tmp_path):
    shards.write_shard(tmp_path, 2, ["x", "y"], node="abc123")
    info = shards.shard_marker(tmp_path, 2)
    assert info["node"] == "abc123" and info["lines"] == 2 and len(info["sha256"]) == 64
    assert shards.shard_marker(tmp_path, 3) is None
    (tmp_path / "shard-00002.txt").write_bytes(b"x\n")       # truncated: half the lines
    assert not shards.shard_done(tmp_path, 2, 2)


def test_shard_done_checks_the_plan_when_asked(tmp_path):
    shards.write_shard(tmp_path, 0, ["a", "b"], plan="p1")
    assert shards.shard_done(tmp_path, 0, 2, "p1") and shards.shard_done(tmp_path, 0, 2)
    assert not shards.shard_done(tmp_path, 0, 2, "p2")          # made for another plan: redone


def test_shard_not_done_cases(tmp_path):
    shards.write_shard(tmp_path, 0, ["a", "b"])
    assert not shards.shard_done(tmp_path, 0, 3)  # wrong line count
    assert not shards.shard_done(tmp_path, 1, 2)  # nothing written at all

    (tmp_path / "shard-00000.txt").write_text("a\nX\n")  # same count, wrong checksum
    assert not shards.shard_done(tmp_path, 0, 2)

    shards.write_shard(tmp_path, 0, ["a", "b"])
    (tmp_path / "shard-00000.done").unlink()  # crash between shard and marker
    assert not shards.shard_done(tmp_path, 0, 2)

    shards.write_shard(tmp_path, 0, ["a", "b"])
    (tmp_path / "shard-00000.done").write_text("not json")
    assert not shards.shard_done(tmp_path, 0, 2)


def test_shard_marker_written_after_shard(tmp_path, monkeypatch):
    # If the shard write fails, no marker may exist (and an old one is removed).
    shards.write_shard(tmp_path, 0, ["old"])
    real = files.atomic_write_bytes

    def fail_shard(path, data):
        if str(path).endswith(".txt"):
            raise OSError("disk full")
        return real(path, data)

    monkeypatch.setattr(shards, "atomic_write_bytes", fail_shard)
    with pytest.raises(OSError):
        shards.write_shard(tmp_path, 0, ["new", "lines"])
    assert not (tmp_path / "shard-00000.done").exists()
    assert not shards.shard_done(tmp_path, 0, 1)
