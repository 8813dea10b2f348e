"""The model registry (registry.py) on a real SQLite store: a pipeline run registers its models
under the job's name; the registered pyfunc model, `translate --run` and `eval` with a models:/
URI (a version or an alias), `serve`'s resolving of one and `mlflow models predict` all decode as
offline LPD does; a rerun of the same models adds no version; bad URIs exit 2 before a model loads."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from mlflow import MlflowClient

from imitate_nat.data import read_lines
from imitate_nat.translate import translate
from orchestrator import decoding
from orchestrator.cli import main
from orchestrator.pipeline import run_pipeline
from orchestrator.registry import EVAL_SETTINGS, model_digests
from orchestrator.serve.target import ServeSetupError, latest_parent_run, load_models, resolve_target

from helpers import copy_micro_workdir, micro_job_spec


def store_uri(rd: Path) -> str:
    return f"sqlite:///{rd.parent / 'mlflow.db'}"


def offline_lpd(rd: Path, spec, lines: list[str]) -> list[str]:
    """The evaluate stage's LPD decoding of `lines` with the job's eval settings."""
    tok, at, nat = decoding.load_run_models(rd, "cpu")
    e = spec.eval
    at, nat, _ = decoding.for_device(at, nat, "cpu", e.cpu_fast)
    decoder, cost = decoding.decoders(at, nat, e.beam_size, e.delta_t, e.length_penalty)["lpd"]
    return translate(lines, tok, decoder, batch_tokens=e.batch_tokens, max_src_len=at.cfg.max_positions,
                     cost_factor=cost)


@pytest.fixture(scope="module")
def registry(micro_run, tmp_path_factory):
    """A writable copy of micro_run's work dir whose version 1 also has the alias `champion`:
    (run dir, spec, tracking URI, 5 test sentences)."""
    rd, spec = copy_micro_workdir(micro_run, tmp_path_factory.mktemp("registry") / "runs")
    uri = store_uri(rd)
    MlflowClient(uri).set_registered_model_alias(spec.name, "champion", "1")
    return rd, spec, uri, read_lines(rd / "prepare" / "test.src")[:5]


@pytest.fixture
def store_env(registry, monkeypatch):
    """The copy as the store that models:/ URIs are looked up in (no --tracking-uri for eval/translate)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry[2])
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", registry[2])
    return registry


def test_the_pipeline_run_registered_its_models(micro_run):
    rd, spec = micro_run
    uri = store_uri(rd)
    client = MlflowClient(uri)
    parent = latest_parent_run(uri, spec.name)
    assert parent.data.tags["registered_model"] == f"{spec.name}/1"
    (version,) = client.search_model_versions(f"name = '{spec.name}'")
    assert str(version.version) == "1" and version.run_id == parent.info.run_id
    assert {stage: version.tags[f"sha256.{stage}"] for stage in model_digests(rd)} == model_digests(rd)
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "model")}
    assert {"model/MLmodel", "model/artifacts", "model/input_example.json", "model/python_model.pkl"} <= logged


def test_predict_is_offline_lpd(store_env):
    import mlflow.pyfunc
    import pandas as pd

    rd, spec, _, lines = store_env
    model = mlflow.pyfunc.load_model(f"models:/{spec.name}/1")
    want = offline_lpd(rd, spec, lines)
    assert model.predict(pd.DataFrame({"text": lines})) == want
    assert model.predict(lines) == want


def test_translate_and_eval_take_a_version_or_an_alias(store_env):
    rd, spec, _, lines = store_env
    src, ref = rd / "prepare" / "test.src", rd / "prepare" / "test.tgt"
    want = offline_lpd(rd, spec, lines)
    by_dir = CliRunner().invoke(main, ["eval", str(rd), "--src", str(src), "--ref", str(ref), "--decoders", "lpd",
                                       "--json"])
    assert by_dir.exit_code == 0, by_dir.output
    for uri in (f"models:/{spec.name}/1", f"models:/{spec.name}@champion"):
        res = CliRunner().invoke(main, ["translate", "--run", uri, *lines])
        assert res.exit_code == 0, res.output
        assert res.stdout.splitlines() == want
        res = CliRunner().invoke(main, ["eval", uri, "--src", str(src), "--ref", str(ref), "--decoders", "lpd", "--json"])
        assert res.exit_code == 0, res.output
        got, expected = json.loads(res.stdout), json.loads(by_dir.stdout)
        assert (got["beam"], got["delta_t"]) == (spec.eval.beam_size, spec.eval.delta_t)
        for key in ("bleu", "chrf", "ter"):
            assert got["rows"]["lpd"][key] == expected["rows"]["lpd"][key]


def test_serve_resolves_a_model_uri_to_the_same_models(registry):
    rd, spec, uri, _ = registry
    target = resolve_target(f"models:/{spec.name}@champion", ["serve.replicas=2"], tracking_uri=uri)
    source = target.source
    assert source.model.uri == f"models:/{spec.name}/1"   # pinned: a moved alias changes no replica
    assert source.describe() == {"job": spec.name, "run_id": latest_parent_run(uri, spec.name).info.run_id,
                                 "source": "registry"}
    assert target.spec.serve.replicas == 2
    assert {k: getattr(target.spec.eval, k) for k in EVAL_SETTINGS} == {k: getattr(spec.eval, k) for k in EVAL_SETTINGS}
    for got, ref in zip(load_models(source, "cpu")[1:], decoding.load_run_models(rd, "cpu")[1:]):
        assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), ref.state_dict().values()))
    other = dataclasses.replace(source.model, digests={**source.model.digests, "student": "0" * 64})
    with pytest.raises(ServeSetupError, match="student/model.pt is not the file logged with the model"):
        load_models(dataclasses.replace(source, model=other), "cpu")


def test_unknown_versions_aliases_and_names_exit_2_before_a_model_loads(store_env, tmp_path, monkeypatch):
    rd, spec, _, _ = store_env
    src, ref = str(rd / "prepare" / "test.src"), str(rd / "prepare" / "test.tgt")
    monkeypatch.setattr(decoding, "load_run_models", lambda *a: pytest.fail("a model was loaded"))
    cases = {f"models:/{spec.name}/99": f"registered model '{spec.name}' has no version 99",
             f"models:/{spec.name}@nope": f"registered model '{spec.name}' has no alias 'nope'",
             "models:/nope/1": "no registered model named 'nope'",
             f"models:/{spec.name}": "not models:/NAME/VERSION or models:/NAME@ALIAS"}
    for uri, message in cases.items():
        for args in (["translate", "--run", uri, "a happy bird"], ["eval", uri, "--src", src, "--ref", ref],
                     ["serve", uri]):
            res = CliRunner().invoke(main, args)
            assert res.exit_code == 2 and message in res.output, (args, res.output)
            assert "Traceback" not in res.output
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'none.db'}")
    res = CliRunner().invoke(main, ["translate", "--run", f"models:/{spec.name}/1", "a happy bird"])
    assert res.exit_code == 2 and "not found, no model registry to look in" in res.output, res.output
    assert not (tmp_path / "none.db").exists()


def test_mlflow_models_predict_on_a_csv_file(registry, tmp_path):
    rd, spec, uri, lines = registry
    csv, out = tmp_path / "sentences.csv", tmp_path / "predictions.json"
    csv.write_text("text\n" + "".join(f'"{line}"\n' for line in lines[:3]))
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    res = subprocess.run([str(mlflow_cli), "models", "predict", "-m", f"models:/{spec.name}@champion", "-i", str(csv),
                          "-t", "csv", "-o", str(out), "--env-manager", "local"],
                         env={**os.environ, "MLFLOW_TRACKING_URI": uri}, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert json.loads(out.read_text())["predictions"] == offline_lpd(rd, spec, lines[:3])


def test_a_rerun_of_the_same_models_adds_no_version_and_the_switch_turns_registering_off(registry):
    rd, spec, uri, _ = registry
    client = MlflowClient(uri)
    run_pipeline(spec, "jobs/tiny.yaml", progress=False)   # every stage reused
    assert latest_parent_run(uri, spec.name).data.tags["registered_model"] == f"{spec.name}/1"
    run_pipeline(micro_job_spec(rd.parent, "tracking.register_model=false"), "jobs/tiny.yaml", progress=False)
    assert "registered_model" not in latest_parent_run(uri, spec.name).data.tags
    assert [str(v.version) for v in client.search_model_versions(f"name = '{spec.name}'")] == ["1"]
