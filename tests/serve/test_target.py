"""Model sources of `imitate-orch serve` (serve/target.py): a run dir, a job YAML, an MLflow run
id, the stage runs of reused stages (matched by sha256), that what is loaded belongs together,
and what a job.yaml stored in MLflow may not decide."""
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
from orchestrator.serve.target import ServeSetupError, flag_overrides, load_models, resolve_target, stage_runs
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
    # serve --cpu-fast becomes eval.cpu_fast; `off` reads as YAML false and still means off.
    assert flag_overrides(cpu_fast="off") == ["eval.cpu_fast=off"]
    assert resolve_target(str(run_dir), flag_overrides(cpu_fast="off")).spec.eval.cpu_fast == "off"
    with pytest.raises(SpecError, match="eval.cpu_fast"):
        resolve_target(str(run_dir), ["eval.cpu_fast=fast"])
    (tmp_path / "unfinished" / "tokenizer").mkdir(parents=True)
    with pytest.raises(RunNotReady, match="stage 'tokenizer' is pending"):  # the one "is this run usable" check
        resolve_target(str(tmp_path / "unfinished"))
    with pytest.raises(ServeSetupError, match="not a run directory"):
        resolve_target("no-such-thing")
    # The CLI: exit 2 before starting anything (a port in use included).
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        for args in (["serve", str(tmp_path / "unfinished")], ["serve", str(job), "--set", "serve.prot=1"],
                     ["serve", str(run_dir), "--delta-t", "11"], ["serve", str(run_dir), "--cpu-fast", "fast"],
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


def test_stage_runs_match_reused_stages_by_sha256(tmp_path):
    """A rerun that reused stages logged no files for them: they come from a run that ran the
    stage and logged the same bytes (the sha256 tags), not from the newest earlier run of the
    job, which here is the same job in another work dir sharing the store, with other models.
    A replica checks each download against the tag: a replaced artifact is refused."""
    from mlflow import MlflowClient

    from orchestrator.run.files import sha256_file
    from orchestrator.run.layout import MODEL_FILES
    from orchestrator.run.tracking import Tracker
    from orchestrator.serve.target import ModelSource

    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "exp", tmp_path / "art")

    def pipeline(content: dict, reused=()):
        with tracker.parent("a", {}, tags={"job": "a"}) as parent:
            ids = {}
            for stage, name in MODEL_FILES.items():
                path = tmp_path / content[stage] / stage / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(f"{content[stage]} {stage}")
                with tracker.child(stage, {"reused": stage in reused}) as h:
                    if stage not in reused:
                        h.log_artifact(path)
                    ids[stage] = h.run_id
                tracker.tag_outputs(stage, {name: {"path": name, "sha256": sha256_file(path)}})
        return parent.run_id, ids

    _, first = pipeline({"tokenizer": "x", "teacher": "x", "student": "x"})
    pipeline({"tokenizer": "y", "teacher": "y", "student": "y"})    # newer, other bytes: never picked
    second_id, second = pipeline({"tokenizer": "x", "teacher": "x", "student": "x2"}, reused=("tokenizer", "teacher"))
    client = MlflowClient(tracker.tracking_uri)
    runs, digests = stage_runs(client, client.get_run(second_id))
    assert runs == {"tokenizer": first["tokenizer"], "teacher": first["teacher"], "student": second["student"]}
    assert digests["teacher"] == sha256_file(tmp_path / "x" / "teacher" / "model.pt")

    stored = Path(client.get_run(first["tokenizer"]).info.artifact_uri.removeprefix("file://")) / "spm.model"
    stored.write_text("replaced")
    with pytest.raises(ServeSetupError, match="tokenizer/spm.model is not the file its sha256.spm.model tag names"):
        load_models(ModelSource("a", second_id, None, tracker.tracking_uri, runs, digests), "cpu")


@pytest.mark.parametrize("tamper", ["model file edited", "teacher redone after the student"])
def test_a_run_dir_whose_models_do_not_belong_together_is_refused(micro_run, tmp_path, tamper):
    """What serve loads must be what the manifests recorded (checksums), and the student must
    have been trained on the teacher and tokenizer there now (its recorded upstream digests)."""
    import shutil

    from orchestrator.run.files import sha256_file
    from orchestrator.run.manifest import read_manifest, write_manifest

    rd = tmp_path / micro_run[0].name
    for stage in ("tokenizer", "teacher", "student"):
        shutil.copytree(micro_run[0] / stage, rd / stage)
    resolve_target(str(rd))                                   # intact: served
    if tamper == "model file edited":
        with open(rd / "student" / "model.pt", "ab") as f:
            f.write(b"\0")
        message = "student/model.pt changed since the 'student' stage wrote it"
    else:  # a retrained teacher: new bytes, recorded in its own manifest, never seen by the student
        with open(rd / "teacher" / "model.pt", "ab") as f:
            f.write(b"\0")
        m = read_manifest(rd / "teacher")
        m.outputs["model.pt"]["sha256"] = sha256_file(rd / "teacher" / "model.pt")
        write_manifest(rd / "teacher", m)
        message = "the 'student' stage ran on other 'teacher' outputs than those in teacher/ now"
    with pytest.raises(ServeSetupError, match=message):
        resolve_target(str(rd))
    res = CliRunner().invoke(main, ["serve", str(rd)])
    assert res.exit_code == 2 and message in res.output, res.output


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
