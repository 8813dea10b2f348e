"""What must never be reused although the spec did not change: data edited in place (its bytes
are part of the prepare stage's identity), and a run dir that another `run` holds.

The stages are cheap fakes (the real ones run in test_pipeline.py): each writes one file from
its upstream's, prepare from the data's train.en, so a changed file shows all the way down."""
import dataclasses
import os
import time

import pytest
from click.testing import CliRunner

from orchestrator import pipeline
from orchestrator.cli import main
from orchestrator.run import hashing, runner
from orchestrator.run.files import sha256_file
from orchestrator.run.layout import STAGES, run_dir
from orchestrator.run.manifest import package_version, read_manifest, write_manifest
from orchestrator.run.sharing import RunLocked, run_lock
from orchestrator.spec.loading import spec_from_dict

from helpers import fake_stages

HOUR_AGO = time.time() - 3600


def _data(d):
    """A files source (train/valid/test, en-de), its files dated an hour back."""
    d.mkdir()
    for prefix in ("train", "valid", "test"):
        for lang in ("en", "de"):
            p = d / f"{prefix}.{lang}"
            p.write_text(f"{prefix} {lang} one\n{prefix} {lang} two\n")
            os.utime(p, (HOUR_AGO, HOUR_AGO))
    return d


@pytest.fixture
def fake_job(tmp_path, monkeypatch):
    calls = fake_stages(monkeypatch,   # prepare's output follows the data file's bytes
                        source=lambda stage: (tmp_path / "data" / "train.en").read_text() if stage == "prepare" else "")
    # The data was just written (ctime now), so it would not be cached for 2 s: cache at once.
    monkeypatch.setattr(hashing, "_RACY_NS", 0)
    raw = {"name": "fake", "workdir": str(tmp_path / "runs"), "data": {"source": "files", "dir": str(_data(tmp_path / "data"))}}
    return spec_from_dict(raw), raw, calls


def _states(spec):
    return [s.state for s in runner.stage_states(spec)]


def test_data_edited_in_place_makes_prepare_and_all_after_it_stale(fake_job, tmp_path):
    spec, raw, calls = fake_job
    pipeline.run_pipeline(spec, "", progress=False)
    assert calls == list(STAGES)
    m = read_manifest(run_dir(spec) / "prepare")
    files = sorted((tmp_path / "data").iterdir())
    assert m.inputs == {str(p.resolve()): sha256_file(p) for p in files}     # every split, both sides
    for stage in STAGES:
        assert read_manifest(run_dir(spec) / stage).package_version == package_version()

    # The sneakiest edit: same size, and the mtime put back (cp -p, touch -r): only the ctime moves.
    train = tmp_path / "data" / "train.en"
    train.write_text(train.read_text().replace("one", "ONE"))
    os.utime(train, (HOUR_AGO, HOUR_AGO))
    assert _states(spec) == ["stale"] * len(STAGES)
    job = tmp_path / "job.yaml"
    job.write_text(f"name: fake\nworkdir: {raw['workdir']}\ndata: {{source: files, dir: {raw['data']['dir']}}}\n")
    shown = CliRunner().invoke(main, ["status", str(job)])
    assert shown.exit_code == 0 and shown.output.count(" stale ") == len(STAGES)
    assert shown.output.count(f"(imitate-orch {package_version()})") == len(STAGES)

    calls.clear()
    pipeline.run_pipeline(spec, "", progress=False)
    assert calls == list(STAGES)                                           # nothing built on the old bytes
    assert "ONE" in (run_dir(spec) / "evaluate" / "out.txt").read_text()
    assert _states(spec) == ["done"] * len(STAGES)
    calls.clear()
    pipeline.run_pipeline(spec, "", progress=False)
    assert calls == []

    # A manifest from before input digests were recorded is trusted, as before (no mass retraining).
    m = read_manifest(run_dir(spec) / "prepare")
    write_manifest(run_dir(spec) / "prepare", dataclasses.replace(m, inputs={}, package_version=None))
    assert _states(spec) == ["done"] * len(STAGES)


def test_input_digests_are_cached_by_stat_in_the_run_dir(fake_job, tmp_path, monkeypatch):
    spec, _, _ = fake_job
    hashed = []
    monkeypatch.setattr(hashing, "sha256_file", lambda p: hashed.append(p.name) or sha256_file(p))
    first = hashing.input_digests(spec, "prepare")
    assert len(hashed) == 6 and (run_dir(spec) / hashing.DIGEST_CACHE).is_file()
    assert hashing.input_digests(spec, "prepare") == first and len(hashed) == 6      # no file read again
    assert hashing.input_digests(spec, "tokenizer") == {}                           # reads the run dir only

    train = tmp_path / "data" / "train.en"
    with open(train, "a") as f:
        f.write("three\n")
    again = hashing.input_digests(spec, "prepare")
    assert hashed[6:] == ["train.en"] and again != first
    assert hashing.input_digests(spec, "prepare") == again and len(hashed) == 7
    # A file written within the last 2 s may change again within one timestamp tick, its stat
    # unchanged: it is hashed, not cached.
    monkeypatch.setattr(hashing, "_RACY_NS", 2 * 10**9)
    with open(train, "a") as f:
        f.write("four\n")
    for _ in range(2):
        hashing.input_digests(spec, "prepare")
    assert hashed[7:] == ["train.en", "train.en"]


def test_a_local_hugging_face_dataset_is_hashed_a_hub_one_is_named_by_the_spec(tmp_path):
    ds = tmp_path / "hfds"
    (ds / "train").mkdir(parents=True)
    (ds / "dataset_dict.json").write_text('{"splits": ["train"]}')
    (ds / "train" / "data-00000-of-00001.arrow").write_bytes(b"arrow")
    local = spec_from_dict({"name": "h", "data": {"source": "huggingface", "hf_name": str(ds)}}).data
    assert [p.name for p in hashing.data_files(local)] == ["dataset_dict.json", "data-00000-of-00001.arrow"]
    hub = spec_from_dict({"name": "h", "data": {"source": "huggingface", "hf_name": "wmt14", "hf_config": "de-en"}})
    assert hashing.data_files(hub.data) == [] and hashing.data_files(spec_from_dict({"name": "s"}).data) == []


def test_run_lock_is_exclusive_names_its_holder_and_is_released(tmp_path):
    rd = tmp_path / "runs" / "job"
    with run_lock(rd):
        with pytest.raises(RunLocked, match=f"is being run by pid {os.getpid()} on "):
            with run_lock(rd):
                pass
    with run_lock(rd):      # released at the end of the block (and by the kernel when a process dies)
        pass


def test_a_shared_stage_dir_is_not_redone_while_another_run_reads_it(fake_job, tmp_path):
    """Run B's student reads the teacher dir it shares with run A (a link, as sweep trials and
    ablation variants share it). Meanwhile A may check and reuse that teacher at once, but
    redoing it (--force, stale) waits until B's stage has ended: it would wipe what B reads."""
    import threading

    from orchestrator.run.sharing import stage_lock
    from orchestrator.run.tracking import Tracker

    spec, _, calls = fake_job
    pipeline.run_pipeline(spec, "", progress=False)
    rd, other = run_dir(spec), tmp_path / "other-run"
    other.mkdir()
    (other / "teacher").symlink_to(rd / "teacher", target_is_directory=True)
    events, reading = [], threading.Event()

    def run_b_student():
        with stage_lock(other / "student", "student"):
            reading.set()
            time.sleep(1.0)
            events.append("B's student done reading")

    b = threading.Thread(target=run_b_student)
    b.start()
    reading.wait(5)
    t0 = time.monotonic()
    with stage_lock(rd / "teacher", "teacher"):
        assert time.monotonic() - t0 < 0.5                      # checking and reusing do not wait
        assert runner.run_stage(spec, "teacher", pipeline.stage_functions()["teacher"],
                                tracker=Tracker.disabled()) is not None and calls.count("teacher") == 1
        runner.run_stage(spec, "teacher", pipeline.stage_functions()["teacher"], tracker=Tracker.disabled(), force=True)
        events.append("A's teacher redone")
    b.join(5)
    assert events == ["B's student done reading", "A's teacher redone"]
    assert calls.count("teacher") == 2


def test_a_run_dir_from_before_a_stage_format_rebuilds_that_stage_and_after(fake_job, monkeypatch):
    """A run dir made before the tokenizer stage binarized the train set (its format version 1:
    no .bin/.idx) is never read as if it had them: the tokenizer and every stage after it show
    stale and are rebuilt, prepare is kept."""
    spec, _, calls = fake_job
    current = dict(hashing.STAGE)
    monkeypatch.setattr(hashing, "STAGE", {**current, "tokenizer": dataclasses.replace(current["tokenizer"], version=1)})
    pipeline.run_pipeline(spec, "", progress=False)                     # the old run dir
    monkeypatch.setattr(hashing, "STAGE", current)                      # today's code
    assert _states(spec) == ["done"] + ["stale"] * (len(STAGES) - 1)
    calls.clear()
    pipeline.run_pipeline(spec, "", progress=False)
    assert calls == list(STAGES[1:])
    assert _states(spec) == ["done"] * len(STAGES)
