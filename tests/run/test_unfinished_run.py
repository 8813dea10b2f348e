"""One "is this run usable" check (run/layout.check_finished) and one message: eval, report,
serve and translate --run refuse the same unfinished run dir with the same words, exit 2, and
serve starts neither Ray nor a server."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.run.layout import STAGES
from orchestrator.run.manifest import Manifest, write_manifest


@pytest.fixture
def unfinished(tmp_path):
    """A run dir whose stages up to distill are done and whose student never ran."""
    rd = tmp_path / "job"
    for stage in STAGES[: STAGES.index("student")]:
        write_manifest(rd / stage, Manifest(stage=stage, input_hash="h", status="done"))
    (tmp_path / "src.txt").write_text("a b\n")
    (tmp_path / "ref.txt").write_text("c d\n")
    return rd


def test_eval_report_serve_and_translate_refuse_an_unfinished_run_alike(unfinished, monkeypatch):
    import ray

    import orchestrator.serve.server as server

    def must_not_start(*args, **kwargs):
        raise AssertionError("started although the run is unfinished")
    monkeypatch.setattr(ray, "init", must_not_start)
    monkeypatch.setattr(server, "run_server", must_not_start)
    rd, tmp = unfinished.resolve(), unfinished.parent
    expected = (f"error: {rd} is not finished: stage 'student' is pending. "
                "Run `imitate-orch run JOB` to finish it first.")
    commands = {"eval": ["eval", str(rd), "--src", str(tmp / "src.txt"), "--ref", str(tmp / "ref.txt")],
                "report": ["report", str(rd), "--no-progress"],
                "serve": ["serve", str(rd)],
                "translate": ["translate", "--run", str(rd), "a b"]}
    for name, args in commands.items():
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 2, (name, res.output, res.exception)
        assert res.output.strip() == expected, name
