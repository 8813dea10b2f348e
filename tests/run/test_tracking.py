"""Tracker against a real MLflow SQLite store in tmp_path (no mocks)."""

import pickle

import pytest
from mlflow import MlflowClient

from orchestrator.run.tracking import Tracker, default_artifact_root, resolve_tracking_uri


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A work dir, and a CWD elsewhere so a stray ./mlruns would be caught."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    workdir = tmp_path / "work"
    workdir.mkdir()
    return workdir, elsewhere


def _tracker(workdir, name="tiny"):
    uri = resolve_tracking_uri(None, workdir)
    return Tracker(uri, name, default_artifact_root(workdir)), MlflowClient(uri)


def test_resolve_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri("http://h:5000", tmp_path) == "http://h:5000"
    assert resolve_tracking_uri(None, tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert resolve_tracking_uri(None, tmp_path) == "http://env:5000"
    assert resolve_tracking_uri("http://h:5000", tmp_path) == "http://h:5000"


def test_parent_two_children_metrics_params_artifacts(work):
    workdir, elsewhere = work
    tracker, client = _tracker(workdir)
    f = workdir / "sample.txt"
    f.write_text("ein Haus")
    params = {"student.lambda2": 0.001, "long": "x" * 7000}
    params.update({f"p{i}": i for i in range(150)})  # more than one log_batch

    with tracker.parent("tiny", params, tags={"job": "tiny"}) as parent:
        with tracker.child("teacher", params={"lr": 3e-4}) as t:
            for step in range(3):
                t.log_metric("loss", 1.0 / (step + 1), step=step)
            t.log_metrics({"bleu": 20.0, "chrf": 40.0})
            t.log_artifact(f, artifact_path="samples")
            t.log_text("hello", "notes/hello.txt")
            t.set_tag("device", "cpu")
        with tracker.child("student") as s:
            s.log_metric("loss", 0.5, step=0)

    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id])
    children = [r for r in runs if r.info.run_id != parent.run_id]
    assert {r.info.run_name for r in children} == {"teacher", "student"}
    for r in children:
        assert r.data.tags["mlflow.parentRunId"] == parent.run_id
        assert r.info.status == "FINISHED"
    assert client.get_run(parent.run_id).info.status == "FINISHED"

    teacher = next(r for r in children if r.info.run_name == "teacher")
    hist = client.get_metric_history(teacher.info.run_id, "loss")
    assert [(m.step, m.value) for m in sorted(hist, key=lambda m: m.step)] == [
        (0, 1.0), (1, 0.5), (2, pytest.approx(1 / 3))]
    assert teacher.data.metrics["bleu"] == 20.0
    assert teacher.data.params == {"lr": "0.0003"}
    assert teacher.data.tags["device"] == "cpu"

    pparams = client.get_run(parent.run_id).data.params
    assert pparams["student.lambda2"] == "0.001"
    assert len(pparams["long"]) <= 6000 and len(pparams) == 152
    assert client.get_run(parent.run_id).data.tags["job"] == "tiny"

    # Artifacts live under the work dir, not ./mlruns in the CWD.
    art_dir = workdir / "mlartifacts" / "tiny" / teacher.info.run_id / "artifacts"
    assert (art_dir / "samples" / "sample.txt").read_text() == "ein Haus"
    assert (art_dir / "notes" / "hello.txt").read_text() == "hello"
    assert {a.path for a in client.list_artifacts(teacher.info.run_id)} == {"samples", "notes"}
    assert not (elsewhere / "mlruns").exists()
    assert list(elsewhere.iterdir()) == []


def test_failing_child_is_failed_and_propagates(work):
    workdir, _ = work
    tracker, client = _tracker(workdir)
    with pytest.raises(ZeroDivisionError):
        with tracker.parent("tiny", {}) as parent:
            with tracker.child("distill") as c:
                c.log_metric("shards_done", 2)
                1 / 0
    run = client.get_run(c.run_id)
    assert run.info.status == "FAILED"
    assert "ZeroDivisionError" in run.data.tags["error"]
    assert run.data.metrics["shards_done"] == 2  # what was logged before the error stays
    assert "error.txt" in {a.path for a in client.list_artifacts(c.run_id)}
    assert client.get_run(parent.run_id).info.status == "FAILED"


def test_long_error_message_is_truncated(work):
    workdir, _ = work
    tracker, client = _tracker(workdir)
    with tracker.parent("tiny", {}):
        with pytest.raises(ValueError):
            with tracker.child("x") as c:
                raise ValueError("y" * 20000)
    tag = client.get_run(c.run_id).data.tags["error"]
    assert tag.startswith("ValueError: yyy") and len(tag) <= 8000


def test_resume_parent_adds_children_to_same_run(work):
    workdir, _ = work
    tracker, client = _tracker(workdir)
    with tracker.parent("tiny", {"a": 1}) as p1:
        with tracker.child("prepare"):
            pass
    # A new process (new Tracker, same store) resumes the job's run after a crash.
    tracker2, _ = _tracker(workdir)
    with tracker2.parent("tiny", {"a": 2, "b": 3}, run_id=p1.run_id) as p2:
        assert p2.run_id == p1.run_id
        with tracker2.child("teacher"):
            pass
    runs = client.search_runs([tracker.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{p1.run_id}'")
    assert sorted(r.info.run_name for r in runs) == ["prepare", "teacher"]
    parent = client.get_run(p1.run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params == {"a": "1", "b": "3"}  # params are immutable; new keys added
    assert tracker2.experiment_id == tracker.experiment_id


def test_child_needs_parent_and_pickled_tracker_reattaches(work):
    workdir, _ = work
    tracker, client = _tracker(workdir)
    with pytest.raises(RuntimeError):
        with tracker.child("orphan"):
            pass
    with tracker.parent("tiny", {}) as p:
        # What a Ray worker gets: a pickled tracker and the parent's run id.
        remote = pickle.loads(pickle.dumps(tracker))
        with remote.child("trial-0", parent_run_id=p.run_id) as c:
            remote.handle(c.run_id).log_metric("bleu", 1.0)
    run = client.get_run(c.run_id)
    assert run.data.tags["mlflow.parentRunId"] == p.run_id
    assert run.data.metrics["bleu"] == 1.0


def test_disabled_tracker_is_noop(work):
    workdir, elsewhere = work
    t = Tracker.disabled()
    with t.parent("tiny", {"a": 1}) as p:
        assert p.run_id is None
        with t.child("teacher", {"lr": 1}) as c:
            c.log_metric("loss", 1.0, step=0)
            c.log_metrics({"a": 1.0})
            c.log_params({"x": 1})
            c.log_artifact(workdir)
            c.log_text("t", "t.txt")
            c.set_tag("k", "v")
        with pytest.raises(KeyError):
            with t.child("bad"):
                raise KeyError("propagates")
    assert pickle.loads(pickle.dumps(t)).enabled is False
    assert t.handle("anything").run_id is None
    assert list(elsewhere.iterdir()) == [] and list(workdir.iterdir()) == []
