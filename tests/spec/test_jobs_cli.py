"""`imitate-orch jobs` lists the shipped job specs (the repository's jobs/, package data of a
wheel), `jobs copy NAME [DEST]` copies one without ever overwriting, and a JOB argument that
names a shipped job and is no path reads it."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from orchestrator.cli import main

from helpers import ROOT

SHIPPED = sorted(p.stem for p in (ROOT / "jobs").glob("*.yaml"))


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_jobs_lists_every_shipped_job_with_its_first_comment_line():
    res = cli("jobs")
    assert res.exit_code == 0, res.output
    assert {"tiny", "multi30k", "wmt14"} <= set(SHIPPED)
    listed = {line.split()[0]: line for line in res.stdout.splitlines()[:len(SHIPPED)]}
    assert sorted(listed) == SHIPPED
    first = (ROOT / "jobs" / "tiny.yaml").read_text().splitlines()[0]   # "# tiny: the embedded default job. ..."
    assert listed["tiny"].split(None, 1)[1] == first.removeprefix("# tiny:").strip()


def test_copy_writes_the_shipped_file_and_never_overwrites(tmp_path):
    dest = tmp_path / "mine.yaml"
    res = cli("jobs", "copy", "tiny", dest)
    assert res.exit_code == 0, res.output
    assert dest.read_bytes() == (ROOT / "jobs" / "tiny.yaml").read_bytes()
    dest.write_text("name: edited\n")
    res = cli("jobs", "copy", "wmt14", dest)
    assert res.exit_code == 2 and f"{dest} exists: not overwritten" in res.output
    assert dest.read_text() == "name: edited\n"


def test_copy_defaults_to_name_yaml_here_and_refuses_an_unknown_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli("jobs", "copy", "multi30k").exit_code == 0
    assert (tmp_path / "multi30k.yaml").read_bytes() == (ROOT / "jobs" / "multi30k.yaml").read_bytes()
    res = cli("jobs", "copy", "nope")
    assert res.exit_code == 2 and "no shipped job 'nope'; one of " in res.output


def test_a_job_argument_naming_a_shipped_job_reads_it_unless_a_path_has_that_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = cli("validate", "tiny")
    assert res.exit_code == 0 and "valid job spec 'tiny'" in res.output
    (tmp_path / "tiny").write_text("name: local\n")   # a file of that name here wins
    res = cli("validate", "tiny")
    assert res.exit_code == 0 and "tiny: valid job spec 'local'" in res.output


def test_pyproject_lists_every_package_and_maps_jobs_into_the_wheel():
    """The package list is explicit (see pyproject.toml): a new package left out of it would be
    missing from a wheel."""
    tomllib = pytest.importorskip("tomllib")
    from setuptools import find_packages

    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = find_packages(str(ROOT), include=["imitate_nat*", "orchestrator*"])
    assert sorted(tool["packages"]) == sorted([*found, "orchestrator.jobs"])
    assert tool["package-dir"] == {"orchestrator.jobs": "jobs"}
    assert tool["package-data"] == {"orchestrator.jobs": ["*.yaml"]}
