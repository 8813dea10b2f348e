"""The work dir must be one directory on every Ray node: a node that does not see it stops
`run` with exit 2 before any stage; a URI work dir is refused; $IMITATE_WORKDIR is the default."""
import shutil
import subprocess
import sys

import pytest

from orchestrator.run.workdir import WorkdirProbe
from orchestrator.spec.loading import SpecError, load_spec

from helpers import ROOT
from ray_nodes import LocalCluster


def can_unshare() -> bool:
    if not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0


def private_tmpfs_over(path) -> tuple[str, ...]:
    """A command prefix: run the rest in a private mount namespace where `path` is an empty tmpfs
    (a node whose 'shared' directory is really its own local one)."""
    return ("unshare", "-m", "--propagation", "private", "sh", "-c",
            f'mount -t tmpfs tmpfs "{path}" && exec "$0" "$@"')


@pytest.mark.skipif(not can_unshare(), reason="needs root and unshare(1) to give a raylet a private mount namespace")
def test_a_node_that_does_not_see_the_workdir_stops_the_run_before_any_stage(tmp_path):
    workdir = tmp_path / "runs"
    workdir.mkdir()
    cluster = LocalCluster()
    try:
        cluster.start_head(cpus=2)   # jobs/tiny.yaml's workers take 2 CPUs: the job fits
        cluster.start_node(cpus=2, prefix=private_tmpfs_over(workdir))
        assert len(cluster.wait_for_nodes(2)) == 2
        r = cluster.imitate_orch("run", "jobs/tiny.yaml", "--set", f"workdir={workdir}", "--no-progress")
    finally:
        leftovers = cluster.stop()
    assert r.returncode == 2, r.stderr[-3000:]
    assert "no stage was started" in r.stderr
    line = next((s for s in r.stderr.splitlines() if "workdir:" in s), r.stderr[-3000:])
    assert str(workdir) in line and "does not exist there" in line and "IMITATE_WORKDIR" in line
    assert line.count(", host ") == 1                  # the head sees it; only the private node is named
    assert not (workdir / "tiny").exists()             # no stage made its directory
    assert list((workdir / ".imitate-orch").iterdir()) == []   # the probe file is cleaned up
    assert leftovers == []


def test_the_probe_passes_a_shared_dir_and_names_another_file(ray_local, tmp_path):
    probe = WorkdirProbe(tmp_path)
    assert probe.check_new_nodes() == 1 and probe.check_new_nodes() == 0   # each node once
    other = WorkdirProbe(tmp_path)
    other.path.write_text("a local folder's old probe")
    with pytest.raises(SpecError) as e:
        other.check_new_nodes()
    assert e.value.errors[0][0] == "workdir" and "another file" in e.value.errors[0][1]
    probe.close(), other.close()
    assert not probe.path.exists()


def test_a_uri_workdir_exits_2_before_anything_starts(tmp_path):
    r = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", str(ROOT / "jobs" / "tiny.yaml"),
                        "--set", "workdir=s3://bucket/runs"], cwd=tmp_path, capture_output=True, text=True,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert r.returncode == 2 and "workdir" in r.stderr and "URI" in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []              # no local folder "s3:"


@pytest.mark.parametrize("uri", ["s3://bucket/runs", "gs://b/r", "file:///tmp/runs"])
def test_a_uri_workdir_is_refused_naming_the_field(uri):
    with pytest.raises(SpecError) as e:
        load_spec(str(ROOT / "jobs" / "tiny.yaml"), [f"workdir={uri}"])
    assert [f for f, _ in e.value.errors] == ["workdir"] and "storage_path" in str(e.value)


def test_imitate_workdir_is_the_default_workdir(monkeypatch, tmp_path):
    monkeypatch.setenv("IMITATE_WORKDIR", str(tmp_path / "shared"))
    assert load_spec(str(ROOT / "jobs" / "multi30k.yaml"), ["data.source=synthetic"]).workdir == str(tmp_path / "shared")
    assert load_spec(str(ROOT / "jobs" / "tiny.yaml"), [f"workdir={tmp_path}/mine"]).workdir == f"{tmp_path}/mine"
    monkeypatch.delenv("IMITATE_WORKDIR")
    assert load_spec(str(ROOT / "jobs" / "multi30k.yaml"), ["data.source=synthetic"]).workdir == "./runs"
