"""Model sources of `imitate-orch serve` (serve/target.py): a run dir, a job YAML, an MLflow run
id, the stage runs of reused stages, and what a job.yaml stored in MLflow may not decide."""
from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.decoding import load_run_models
from orchestrator.run.layout import RunNotReady
from orchestrator.serve.target import ServeSetupError, load_models, resolve_target, stage_runs
from orchestrator.spec.loading import SpecError

from helpers import copy_micro_workdir


def test_sources_job_yaml_and_errors(micro_run, tmp_path):
    run_dir, spec = micro_run
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps(spec.model_dump(mode="json")))  # JSON is YAML
    target = resolve_target(str(job), ["serve.replicas=2"])
    assert target.source.run_dir == str(run_dir) and target.spec.serve.replicas == 2
    assert target.source.run_id == resolve_target(str(run_dir)).source.run_id

    with pytest.raises(SpecError, match="eval.delta_t"):
        resolve_target(str(run_dir), ["eval.delta_t=8", "serve.max_delta_t=5"])
    with pytest.raises(SpecError, match="serve.prot"):
        resolve_target(str(run_dir), ["serve.prot=1"])
    (tmp_path / "unfinished" / "tokenizer").mkdir(parents=True)
    with pytest.raises(RunNotReady, match="stage 'tokenizer' is pending"):  # the one "is this run usable" check
        resolve_target(str(tmp_path / "unfinished"))
    with pytest.raises(ServeSetupError, match="not a run directory"):
        resolve_target("no-such-thing")
    # The CLI: exit 2 before starting anything (a port in use included).
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        for args in (["serve", str(tmp_path / "unfinished")], ["serve", str(job), "--set", "serve.prot=1"],
                     ["serve", str(run_dir), "--delta-t", "11"],
                     ["serve", str(run_dir), "--port", str(busy.getsockname()[1])]):
            res = CliRunner().invoke(main, args)
            assert res.exit_code == 2, (args, res.output)


def test_source_mlflow_run_id(micro_run):
    import torch

    run_dir, spec = micro_run
    uri = f"sqlite:///{run_dir.parent / 'mlflow.db'}"
    run_id = resolve_target(str(run_dir)).source.run_id
    target = resolve_target(run_id, ["serve.max_texts=5"], tracking_uri=uri)
    assert target.spec.name == spec.name and target.spec.serve.max_texts == 5
    assert target.source.run_dir is None and set(target.source.stage_runs) == {"tokenizer", "teacher", "student"}
    tok, at, nat = load_models(target.source, "cpu")
    ref_tok, ref_at, ref_nat = load_run_models(run_dir, "cpu")
    assert tok.encode("a happy bird") == ref_tok.encode("a happy bird")
    for got, ref in ((at, ref_at), (nat, ref_nat)):
        assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), ref.state_dict().values()))
    with pytest.raises(ServeSetupError, match="not found"):
        resolve_target("0" * 32, tracking_uri=uri)


def test_stage_runs_follow_reused_stages(tmp_path):
    """A rerun that reused stages logged no files for them: they come from the newest earlier
    run of the same job that ran the stage, never from another job."""
    from mlflow import MlflowClient

    from orchestrator.run.tracking import Tracker

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "exp", tmp_path / "art")
    (tmp_path / "model.pt").write_text("x")
    (tmp_path / "spm.model").write_text("x")

    def pipeline(job, reused):
        with tracker.parent(job, {}, tags={"job": job}) as parent:
            ids = {}
            for stage in ("tokenizer", "teacher", "student"):
                with tracker.child(stage, {"reused": stage in reused}) as h:
                    if stage not in reused:
                        h.log_artifact(tmp_path / ("spm.model" if stage == "tokenizer" else "model.pt"))
                    ids[stage] = h.run_id
        return parent.run_id, ids

    _, first = pipeline("a", reused=())
    pipeline("b", reused=())                       # another job, newer: must not be picked
    second_id, second = pipeline("a", reused=("tokenizer", "teacher"))
    client = MlflowClient(tracker.tracking_uri)
    assert stage_runs(client, client.get_run(second_id)) == {
        "tokenizer": first["tokenizer"], "teacher": first["teacher"], "student": second["student"]}


def test_a_stored_job_yaml_never_chooses_the_host_or_the_cluster(micro_run, tmp_path):
    """Anyone who can write to the tracking store could otherwise make `serve RUN_DIR` or
    `serve RUN_ID` listen on every interface or join their cluster: serve.host and ray.address
    come from a local job YAML or the flags only. The rest of the stored sections still apply."""
    from mlflow import MlflowClient

    rd, _ = copy_micro_workdir(micro_run, tmp_path / "work")
    uri = f"sqlite:///{rd.parent / 'mlflow.db'}"
    run_id = resolve_target(str(rd)).source.run_id
    client = MlflowClient(uri)
    stored = yaml.safe_load(Path(client.download_artifacts(run_id, "job.yaml", str(tmp_path))).read_text())
    stored["serve"] = {**(stored.get("serve") or {}), "host": "0.0.0.0", "max_texts": 5}
    stored["ray"] = {**(stored.get("ray") or {}), "address": "10.1.2.3:6379"}
    (tmp_path / "edited").mkdir()
    (tmp_path / "edited" / "job.yaml").write_text(yaml.safe_dump(stored))
    client.log_artifact(run_id, str(tmp_path / "edited" / "job.yaml"))

    for target in (resolve_target(str(rd)), resolve_target(run_id, tracking_uri=uri)):
        assert target.spec.serve.max_texts == 5                     # the stored spec is read ...
        assert target.spec.serve.host == "127.0.0.1" and target.spec.ray.address is None  # ... not these
    local = resolve_target(str(rd), ["serve.host=0.0.0.0", "ray.address=auto"])   # --host, --address
    assert local.spec.serve.host == "0.0.0.0" and local.spec.ray.address == "auto"
